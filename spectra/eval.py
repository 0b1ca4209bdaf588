"""Perplexity, as GPTQ / SVD-LLM / Wanda report it.

The texts are joined with "\\n\\n" and tokenized once; the token stream is cut into
non-overlapping windows of `seqlen` tokens (the tail that does not fill a window is
dropped); each window's mean next-token NLL comes from the model, and
ppl = exp(mean over windows). Corpora:
- `builtin`: the Python reference documentation that ships with CPython
  (`pydoc_data.topics`, 79 topics, about 113k SmolLM2 tokens), split by topic: every
  fourth topic in sorted order is the evaluation part, the rest the calibration part;
- a path to a text file (used whole for either split);
- `wikitext2`: through the `datasets` package, where the hub is reachable.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spectra.errors import SpectraInputError

SPLITS = ("eval", "calib")


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token NLL
    tokens: int  # tokens scored (windows x seqlen)
    windows: int
    seqlen: int
    corpus: str
    split: str
    dtype: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_texts(corpus: str = "builtin", split: str = "eval") -> list[str]:
    """The documents of a corpus split, in a fixed order."""
    if split not in SPLITS:
        raise SpectraInputError(f"split={split!r}: expected one of {SPLITS}")
    if corpus == "builtin":
        from pydoc_data.topics import topics

        keys = sorted(topics)
        pick = (lambda i: i % 4 == 3) if split == "eval" else (lambda i: i % 4 != 3)
        return [topics[k] for i, k in enumerate(keys) if pick(i)]
    if corpus == "wikitext2":
        try:
            from datasets import load_dataset

            name = "test" if split == "eval" else "train"
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=name)
        except Exception as e:  # missing package or unreachable hub
            raise SpectraInputError(
                f"corpus wikitext2 is not available here ({e.__class__.__name__})"
            ) from e
        return [t for t in data["text"]]
    path = Path(corpus)
    if not path.is_file():
        raise SpectraInputError(f"corpus {corpus!r}: not builtin, wikitext2 or a text file")
    try:
        return [path.read_text()]
    except (OSError, UnicodeDecodeError) as e:
        raise SpectraInputError(
            f"corpus {corpus}: cannot read as text ({e.__class__.__name__})"
        ) from e


def token_stream(tokenizer, corpus: str = "builtin", split: str = "eval"):
    """The corpus split joined with blank lines and tokenized once, as a 1-D LongTensor."""
    import torch

    text = "\n\n".join(corpus_texts(corpus, split))
    ids = tokenizer(text, return_tensors=None, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids, seqlen: int, max_tokens: int | None = None):
    """(n_windows, seqlen) non-overlapping windows; the tail is dropped."""
    if seqlen < 2:
        raise SpectraInputError(f"seqlen={seqlen}: must be at least 2")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise SpectraInputError(f"only {ids.numel()} tokens: not one window of seqlen={seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def window_nll(model, x):
    """Mean next-token NLL of each window of x (B, seqlen), float64 on the CPU."""
    import torch

    logits = model(x, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    ).reshape(x.shape[0], -1)
    return nll.mean(dim=1).double().cpu()


def perplexity(
    model,
    tokenizer,
    corpus: str = "builtin",
    split: str = "eval",
    seqlen: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    ids=None,
    progress=None,
) -> PerplexityResult:
    """Perplexity of `model` on a corpus split (see the module docstring for the convention)."""
    import torch

    t0 = time.perf_counter()
    if ids is None:
        ids = token_stream(tokenizer, corpus, split)
    batches = windows(ids, seqlen, max_tokens)
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for lo in range(0, batches.shape[0], batch_size):
            losses.append(window_nll(model, batches[lo : lo + batch_size].to(device)))
            if progress:
                progress(min(lo + batch_size, batches.shape[0]), batches.shape[0])
    nll = float(torch.cat(losses).mean())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return PerplexityResult(
        math.exp(nll),
        nll,
        batches.numel(),
        batches.shape[0],
        seqlen,
        corpus,
        split,
        dtype,
        time.perf_counter() - t0,
    )
