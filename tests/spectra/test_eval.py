"""Perplexity convention against an independent computation; corpora; the CLI."""

import json
import math

import pytest
import torch

from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io.model import open_model


def reference_ppl(model, ids, seqlen):
    """Window by window, log-softmax by hand: exp(mean over windows of mean token NLL)."""
    n = ids.numel() // seqlen
    per_window = []
    for w in range(n):
        x = ids[w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
        per_window.append(-logp[torch.arange(seqlen - 1), x[1:]].mean())
    return math.exp(float(torch.stack(per_window).mean())), n


def test_perplexity_matches_a_direct_computation(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 128, (3 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    r = ev.perplexity(model, None, ids=ev.Tokens(ids), seqlen=32, batch_size=2)
    ref, n = reference_ppl(model, ids, 32)
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert (r.windows, r.tokens, r.seqlen, r.dtype) == (n, 96, 32, "float32")  # tail dropped
    capped = ev.perplexity(model, None, ids=ev.Tokens(ids), seqlen=32, max_tokens=70)
    assert capped.windows == 2 and capped.ppl == pytest.approx(
        reference_ppl(model, ids[:64], 32)[0], rel=1e-5
    )


def test_builtin_splits_are_disjoint_and_deterministic():
    a, b = ev.corpus_texts("builtin", "eval"), ev.corpus_texts("builtin", "calib")
    assert a and b and not set(a) & set(b)
    assert a == ev.corpus_texts("builtin", "eval")
    assert len(a) + len(b) == len(__import__("pydoc_data.topics").topics.topics)


def test_text_file_corpus_and_bad_corpora(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert ev.corpus_texts(str(f)) == ["hello world"]
    with pytest.raises(SpectraInputError, match="not builtin"):
        ev.corpus_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(SpectraInputError, match="not one window"):
        ev.windows(torch.arange(10), 32)


@pytest.mark.demo
def test_eval_cli_on_the_demo(demo_dir, cli):
    r = cli("eval", "demo", "--max-tokens", "1024", "--seqlen", "256", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == 1024 and out["windows"] == 4 and out["corpus"] == "builtin"
    assert 2 < out["ppl"] < 100  # SmolLM2 on Python's own documentation
    bad = cli("eval", "demo", "--corpus", "nope.txt")
    assert bad.returncode == 2 and "nope.txt" in bad.stderr and len(bad.stderr.splitlines()) == 1


def bos_reference(model, tok, seqlen, n_windows):
    """BOS + (seqlen - 1) text tokens per window, every text token scored, by hand."""
    text = "\n\n".join(ev.corpus_texts("builtin", "eval"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    per_window = []
    for w in range(n_windows):
        body = ids[w * (seqlen - 1) : (w + 1) * (seqlen - 1)]
        x = torch.tensor([tok.bos_token_id, *body])
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
        per_window.append(-logp[torch.arange(seqlen - 1), x[1:]].mean())
    return math.exp(float(torch.stack(per_window).mean()))


def test_windows_start_with_bos_when_the_tokenizer_adds_one(family_dir, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = family_dir("llama")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS
    stream = ev.token_stream(tok)
    assert ev.bos_token(tok) == tok.bos_token_id == stream.bos
    assert stream.ids[0] != tok.bos_token_id  # the text itself carries no BOS
    w = stream.windows(32, 32 * 5)
    assert w.shape == (5, 32) and (w[:, 0] == tok.bos_token_id).all()
    assert torch.equal(w[:, 1:].reshape(-1), stream.ids[: 5 * 31])  # text tokens, in order
    r = cli("eval", path, "--seqlen", "32", "--max-tokens", "160", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bos"] is True and out["windows"] == 5 and out["tokens"] == 160
    assert out["peak_mb"] is not None and out["peak_mb"] >= 0
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert out["ppl"] == pytest.approx(bos_reference(model, tok, 32, 5), rel=1e-5)


def test_the_preview_uses_eval_windows_with_bos(family_dir):
    from compressors.registry import make_config
    from spectra.preview import Previewer

    path = str(family_dir("llama"))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    layers = {"model.layers.1.mlp.up_proj": make_config("lowrank", rank=8)}
    pv = Previewer(model, tok, seqlen=32)
    result = pv.preview(layers, 128)
    dense = ev.perplexity(model, tok, seqlen=32, max_tokens=128)
    assert dense.bos and result.dense_ppl == pytest.approx(dense.ppl, rel=1e-6)
    assert result.dense_ppl == pytest.approx(bos_reference(model, tok, 32, 4), rel=1e-5)
    assert result.ppl != pytest.approx(result.dense_ppl, rel=1e-4)  # the change is scored


@pytest.mark.demo
def test_the_demo_tokenizer_adds_no_bos(demo_dir):

    tok = open_model(str(demo_dir)).tokenizer()
    assert ev.bos_token(tok) is None
    stream = ev.token_stream(tok)
    assert torch.equal(stream.windows(512, 1024).reshape(-1), stream.ids[:1024])


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "phi3", "opt", "gpt2"])
def test_chunked_nll_equals_the_full_logits(family, monkeypatch):
    from conftest import TINY_VOCAB, tiny_family

    model = tiny_family(family).eval()
    x = torch.randint(0, TINY_VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ev, "CHUNK_ELEMENTS", 7 * TINY_VOCAB)  # many chunks of 7 positions
    with torch.no_grad():
        logits = model(x).logits[:, :-1].double()
        ref = torch.nn.functional.cross_entropy(
            logits.reshape(-1, TINY_VOCAB), x[:, 1:].reshape(-1), reduction="none"
        )
        hidden, last = ev._final_hidden(model, x)
        assert ev._logit_transform(model, hidden, last) is not None  # the chunked path ran
        got = ev.window_nll(model, x)
    assert torch.allclose(got, ref.reshape(3, -1).mean(1), rtol=1e-5, atol=1e-6)


def test_a_model_whose_logits_are_not_the_head_falls_back(monkeypatch):
    from conftest import TINY_VOCAB, tiny_family

    model = tiny_family("llama").eval()
    x = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    forward = model.forward

    def scaled(*a, **k):  # logits = 2 * head(hidden): unknown to the chunked path
        out = forward(*a, **k)
        out.logits = out.logits * 2
        return out

    monkeypatch.setattr(model, "forward", scaled)
    with torch.no_grad():
        logits = model(x).logits[:, :-1].double()
        ref = torch.nn.functional.cross_entropy(
            logits.reshape(-1, TINY_VOCAB), x[:, 1:].reshape(-1), reduction="none"
        )
        assert torch.allclose(ev.window_nll(model, x), ref.reshape(2, -1).mean(1), rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_head_reads_only_contiguous_rows(family, monkeypatch):
    """The model slices hidden[:, -1:] for its own last-position logits: a strided
    input that torch's CPU bfloat16 matmul runs ~400x slower (17 s on an 8B head)."""
    from conftest import TINY_VOCAB, tiny_family

    model = tiny_family(family).eval()
    head = model.get_output_embeddings()
    forward, seen = head.forward, []

    def recording(x):
        seen.append(x.is_contiguous())
        return forward(x)

    x = torch.randint(0, TINY_VOCAB, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ev.window_nll(model, x)
        monkeypatch.setattr(head, "forward", recording)
        got = ev.window_nll(model, x)
    assert len(seen) >= 3 and all(seen)  # the model's own call, the check, the chunks
    assert torch.equal(got, ref)
