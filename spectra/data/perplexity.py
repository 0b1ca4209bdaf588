"""Perplexity, as GPTQ / SVD-LLM / Wanda report it.

The texts are joined with "\\n\\n" and tokenized once, without special tokens; the
token stream is cut into non-overlapping windows (the tail that does not fill a window
is dropped); each window's mean next-token NLL comes from the model, and
ppl = exp(mean over windows). When the tokenizer adds a BOS token by default
(Llama-2/3, Gemma, Mistral), every window is BOS + (seqlen - 1) text tokens and all of
its text tokens are scored, as lm-evaluation-harness does; otherwise a window is
seqlen text tokens and its first token is context only. Eval, the previews, the
sensitivity probes and calibration all cut their windows with `windows`. The NLL is
computed from the final hidden states in chunks of positions, so memory does not grow
with vocabulary x batch x seqlen. Corpora:
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

from spectra.data import memory
from spectra.errors import SpectraInputError

SPLITS = ("eval", "calib")


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token NLL
    tokens: int  # window tokens (windows x seqlen), a BOS included
    windows: int
    seqlen: int
    corpus: str
    split: str
    dtype: str
    seconds: float
    bos: bool = False  # every window starts with the tokenizer's BOS token
    peak_mb: float | None = None  # peak memory above the start (RSS on CPU, CUDA allocated)

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


@dataclass(frozen=True)
class Tokens:
    """A corpus split's text tokens (no special tokens) and the BOS id every window gets."""

    ids: object  # 1-D LongTensor
    bos: int | None = None

    def windows(self, seqlen: int, max_tokens: int | None = None):
        return windows(self.ids, seqlen, max_tokens, self.bos)


def bos_token(tokenizer) -> int | None:
    """The BOS id when `tokenizer` prepends it by default, else None (probed, not assumed)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def token_stream(tokenizer, corpus: str = "builtin", split: str = "eval") -> Tokens:
    """The corpus split joined with blank lines and tokenized once (no special tokens)."""
    import torch

    text = "\n\n".join(corpus_texts(corpus, split))
    ids = tokenizer(text, return_tensors=None, add_special_tokens=False)["input_ids"]
    return Tokens(torch.tensor(ids, dtype=torch.long), bos_token(tokenizer))


def windows(ids, seqlen: int, max_tokens: int | None = None, bos: int | None = None):
    """(n_windows, seqlen) non-overlapping windows; the tail is dropped.

    With `bos`, each window is bos + (seqlen - 1) text tokens. `max_tokens` caps the
    window tokens (max_tokens // seqlen windows at most).
    """
    import torch

    if seqlen < 2:
        raise SpectraInputError(f"seqlen={seqlen}: must be at least 2")
    text = seqlen - (bos is not None)
    n = ids.numel() // text
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise SpectraInputError(f"only {ids.numel()} tokens: not one window of seqlen={seqlen}")
    out = ids[: n * text].reshape(n, text)
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=out.dtype), out], dim=1)
    return out


CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MB of float32


def window_nll(model, x):
    """Mean next-token NLL of each window of x (B, seqlen), float64 on the CPU.

    The head runs on chunks of positions of the final hidden states (the model itself
    computes logits for the last position only), so the full (B, seqlen, vocab) logits
    never exist. The chunked logits are checked against the model's own at the last
    position; a model whose logits are not head(hidden) (a softcap is applied where
    the config has one) is scored from its full logits instead.
    """
    import torch
    import torch.nn.functional as F

    hidden, last = _final_hidden(model, x)
    finish = _logit_transform(model, hidden, last) if hidden is not None else None
    if finish is None:
        logits = model(x, use_cache=False).logits[:, :-1]
        h, head = logits.reshape(-1, logits.shape[-1]), None
    else:
        h, head = hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.get_output_embeddings()
    targets = x[:, 1:].reshape(-1)
    vocab = model.config.get_text_config().vocab_size
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    nll = torch.empty(targets.numel(), dtype=torch.float32, device=x.device)
    for lo in range(0, targets.numel(), rows):
        chunk = h[lo : lo + rows] if head is None else finish(head(h[lo : lo + rows]))
        nll[lo : lo + rows] = F.cross_entropy(
            chunk.float(), targets[lo : lo + rows], reduction="none"
        )
    return nll.reshape(x.shape[0], -1).mean(dim=1).double().cpu()


def _final_hidden(model, x):
    """(final hidden states (B, T, d), the model's own last-position logits), or
    (None, None) when the model cannot compute logits for the last position alone."""
    base = model.get_decoder()  # what the head reads (OPT's decoder, not its base model)
    got = {}

    def grab(module, args, out):
        got["h"] = out[0]  # last_hidden_state of a ModelOutput or a tuple

    hook = base.register_forward_hook(grab)
    head = model.get_output_embeddings()
    # the model hands its head a strided slice (hidden[:, -1:]): torch's CPU bfloat16
    # matmul on a strided input is ~400x slower and holds ~4 GB beside an 8B head
    # (17 s for 4 positions), so the head reads a contiguous copy of its few rows
    fix = head.register_forward_pre_hook(_contiguous) if head is not None else None
    try:
        out = model(x, use_cache=False, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        return None, None
    finally:
        hook.remove()
        if fix is not None:
            fix.remove()
    if "h" not in got or out.logits.shape[1] != 1:
        return None, None
    return got["h"], out.logits


def _contiguous(module, args):
    """A forward pre-hook: the module's first input as a contiguous tensor."""
    return (args[0].contiguous(), *args[1:]) if args else None


def _logit_transform(model, hidden, last):
    """The function f with logits = f(head(hidden)) that reproduces the model's own
    last-position logits, or None when neither identity nor the config's softcap does."""
    import torch

    head = model.get_output_embeddings()
    if head is None:
        return None
    raw = head(hidden[:, -1:].contiguous()).float()  # strided: see _final_hidden
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    options = [lambda z: z]
    if cap:
        options.append(lambda z: torch.tanh(z / cap) * cap)
    for f in options:
        if torch.allclose(f(raw), last.float(), rtol=1e-4, atol=1e-4):
            return f
    return None


def perplexity(
    model,
    tokenizer,
    corpus: str = "builtin",
    split: str = "eval",
    seqlen: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    ids: Tokens | None = None,
    progress=None,
) -> PerplexityResult:
    """Perplexity of `model` on a corpus split (see the module docstring for the
    convention), block by block (compressors.blocks): a model streamed from disk reads
    each block once per group of windows, a resident one runs the same code."""
    import torch

    from compressors import blocks

    t0 = time.perf_counter()
    if ids is None:
        ids = token_stream(tokenizer, corpus, split)
    windows_ = ids.windows(seqlen, max_tokens)
    device = blocks.working_device(model)
    memory.page_in(model.parameters())  # the model's own pages are not the evaluation's
    group = group_size(model, seqlen, batch_size)
    n = windows_.shape[0]
    steps = math.ceil(n / group) * (len(blocks.decoder_layers(model)) + 1)
    done = [0]

    def tick(*_):
        done[0] += 1
        if progress:
            progress(done[0], steps)

    losses = []
    with memory.peak(device) as peak, torch.no_grad():
        for lo in range(0, n, group):
            xs = [
                windows_[b : b + batch_size].to(device)
                for b in range(lo, min(lo + group, n), batch_size)
            ]
            losses += stream_nll(model, xs, tick)
    nll = float(torch.cat(losses).mean())
    return PerplexityResult(
        math.exp(nll),
        nll,
        windows_.numel(),
        n,
        seqlen,
        corpus,
        split,
        str(blocks.working_dtype(model)).removeprefix("torch."),
        time.perf_counter() - t0,
        ids.bos is not None,
        peak.mb,
    )


ACTIVATION_BYTES = 2**30  # block inputs held at once while streaming: windows per pass


def group_size(model, seqlen: int, batch_size: int) -> int:
    """Windows that go through the blocks together: all of them for a resident model,
    as many as keep the held activations (float32 size) under ACTIVATION_BYTES for a
    streamed one, whose blocks are read again for every group."""
    from compressors import blocks

    if not blocks.is_streamed(model):
        return 2**31
    d = model.config.get_text_config().hidden_size
    per_window = 3 * seqlen * d * 4  # block input, output, and the call's scratch
    return max(batch_size, ACTIVATION_BYTES // per_window // batch_size * batch_size)


def stream_nll(model, batches: list, progress=None) -> list:
    """Mean NLL of each window of each batch: the blocks run one at a time over all
    batches, then the model's own head scores the final hidden states (window_nll)."""
    from compressors import blocks

    captured = blocks.capture(model, batches)
    finals = blocks.hidden_through(model, captured, progress)
    out = []
    with blocks.with_final_hidden(model, finals) as state:
        for b, x in enumerate(batches):
            state.batch = b
            out.append(window_nll(model, x))
    if progress:
        progress()
    return out
