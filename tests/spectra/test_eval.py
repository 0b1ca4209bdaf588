"""Perplexity convention against an independent computation; corpora; the CLI."""

import json
import math

import pytest
import torch

from spectra import eval as ev
from spectra.errors import SpectraInputError


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
    r = ev.perplexity(model, None, ids=ids, seqlen=32, batch_size=2)
    ref, n = reference_ppl(model, ids, 32)
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert (r.windows, r.tokens, r.seqlen, r.dtype) == (n, 96, 32, "float32")  # tail dropped
    capped = ev.perplexity(model, None, ids=ids, seqlen=32, max_tokens=70)
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
