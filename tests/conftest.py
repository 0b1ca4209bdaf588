"""Shared fixtures: an isolated cache per test, tiny models built from configs, the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spectra.io.model import open_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache; the converted demo model is shared by symlink."""
    cache = tmp_path / "spectra-cache"
    (cache / "models").mkdir(parents=True)
    demo = REPO / "cache" / "models" / "demo"
    if (demo / ".complete").is_file():
        os.symlink(demo, cache / "models" / "demo")
    monkeypatch.setenv("SPECTRA_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _save(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


def save_tiny_llama(path: Path, intermediate_size: int = 96) -> Path:
    """A seeded 2-block Llama (hidden 64, vocab 128, untied head) saved to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    return _save(LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    return _save(GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("tiny-gpt2"))


def bos_tokenizer(path: Path):
    """A real byte-level BPE tokenizer (320 tokens, trained on pydoc topics) that adds
    BOS like Llama's, saved to `path`; returns the loaded tokenizer."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


TINY_VOCAB = 320


def tiny_family(family: str):
    """A tiny causal LM of `family` (vocab TINY_VOCAB) from its config, seeded."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=TINY_VOCAB, num_hidden_layers=2)
    attn = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, **attn, num_key_value_heads=2))
    if family == "gemma3":  # final logit softcapping, sliding attention, tied head
        cfg = tf.Gemma3TextConfig(
            **common, **attn, num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0
        )
        return tf.Gemma3ForCausalLM(cfg)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **attn, num_key_value_heads=2))
    if family == "phi3":  # fused qkv and gate_up
        return tf.Phi3ForCausalLM(tf.Phi3Config(**common, **attn, pad_token_id=0))
    if family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=TINY_VOCAB,
            num_hidden_layers=2,
            hidden_size=64,
            ffn_dim=96,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        )
        return tf.OPTForCausalLM(cfg)
    if family == "gpt2":  # Conv1D weights, stored (in, out)
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128)
        )
    raise ValueError(family)


FAMILIES = ("llama", "gemma3", "qwen2", "phi3", "opt", "gpt2")


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family_dir(name): a saved tiny model of that family with the BOS tokenizer."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            _save(tiny_family(family), path)
            bos_tokenizer(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture()
def demo_dir() -> Path:
    """The converted demo model (converted into the checkout's cache on first use)."""
    from spectra.io import models

    saved = os.environ.pop("SPECTRA_CACHE")
    try:
        root = models.resolve("demo").root
    finally:
        os.environ["SPECTRA_CACHE"] = saved
    link = Path(saved) / "models" / "demo"
    if not link.exists():
        os.symlink(root, link)
    return root


_DEMO: dict = {}


@pytest.fixture()
def demo_block(demo_dir):
    """Block 5's matrices of the demo with their Grams on 2048 calibration tokens."""
    if not _DEMO:
        from compressors import activations
        from compressors.apply import linear_targets
        from compressors.base import Calibration
        from spectra.data.calibration import CalibrationSpec, calibration_windows

        model = open_model(str(demo_dir), "cpu", "float32", "none").load()
        windows = calibration_windows(
            open_model(str(demo_dir)).tokenizer(), CalibrationSpec(samples=4, seqlen=512)
        )
        targets = linear_targets(model)
        for block, grams in activations.block_grams(model, windows):
            if block == 5:
                for name, (h, rows) in grams.items():
                    t, mod = targets[name]
                    _DEMO[name.rsplit(".", 1)[1]] = (t.weight(mod).double(), Calibration(h, rows))
                break
    return _DEMO


def _run_cli(*args, env=None, timeout=600):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "spectra.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture()
def cli():
    """Run `spectra ARGS...` as a real subprocess; returns the CompletedProcess."""
    return _run_cli


def planted_tt(random_state, mf=(4, 4, 4), nf=(3, 4, 5), ranks=(2, 3)):
    """(W, mf, nf, ranks): a matrix that is exactly an MPO with the given bond ranks."""
    import numpy as np

    from spectra.linalg import mpo

    rng = np.random.default_rng(random_state)
    r = [1, *ranks, 1]
    cores = [rng.standard_normal((r[k], mf[k], nf[k], r[k + 1])) for k in range(len(mf))]
    return mpo.tt_to_dense(cores), mf, nf, list(ranks)


@pytest.fixture()
def planted():
    return planted_tt
