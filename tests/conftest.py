"""Shared fixtures: an isolated cache per test, tiny models built from configs, the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    return _save(LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    return _save(GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture()
def demo_dir() -> Path:
    """The converted demo model (converted into the checkout's cache on first use)."""
    from spectra import models

    saved = os.environ.pop("SPECTRA_CACHE")
    try:
        root = models.resolve("demo").root
    finally:
        os.environ["SPECTRA_CACHE"] = saved
    link = Path(saved) / "models" / "demo"
    if not link.exists():
        os.symlink(root, link)
    return root


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

    from spectra import mpo

    rng = np.random.default_rng(random_state)
    r = [1, *ranks, 1]
    cores = [rng.standard_normal((r[k], mf[k], nf[k], r[k + 1])) for k in range(len(mf))]
    return mpo.tt_to_dense(cores), mf, nf, list(ranks)


@pytest.fixture()
def planted():
    return planted_tt
