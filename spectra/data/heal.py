"""Healing: distil a compressed model from its dense source on calibration tokens.

Only the compact parameters train (compressors.healing): factors, shared projections,
sparse values on their fixed support, MPO cores, CALDERA's L and R. The objective is
the KL divergence from the dense model's next-token distribution to the compressed
model's at every position of a window, at `temperature` (scaled by T^2, as in Hinton
et al. 2015), plus `lm_weight` times the next-token cross-entropy; AdamW, linear
warmup then cosine decay to zero, gradient clipping; bf16 autocast on CUDA, float32
on the CPU. Teacher and student share every frozen tensor that the compression left
as it was (embeddings, norms, dense modules), so the model is not held twice.

Data: the calibration part of a corpus (builtin, or a text file: never the
evaluation part), cut into windows of `seqlen` as perplexity cuts them (BOS first
where the tokenizer adds one); step s reads windows s*B .. s*B+B-1 of an endless
sequence of seeded permutations (B = tokens_per_step / seqlen), so a resumed run
reads what an uninterrupted one would.

Every `eval_every` steps (and before and after) the perplexity on the first
`eval_tokens` of the evaluation part is recorded: the curve that report.json keeps.
It only records; nothing is chosen by it. Every `checkpoint_every` steps the trained
tensors, AdamW's state, the losses and the curve are written atomically to the
checkpoint folder; a run given a folder with a checkpoint of the same source and
settings resumes from it, with results equal to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from spectra.data import perplexity as ev
from spectra.data.distill import (
    CHECKPOINT,
    checkpoint_blocks,
    distill_loss,
    resume,
    save_checkpoint,
)
from spectra.errors import SpectraInputError

__all__ = ["CHECKPOINT", "HealConfig", "distill_loss", "heal", "parse"]


class HealError(SpectraInputError):
    """A `heal:` setting that cannot be used; names the key and value."""


@dataclass(frozen=True)
class HealConfig:
    """The plan's `heal:` section (every key optional).

    Attributes:
        steps: optimizer steps.
        tokens_per_step: tokens per step (a whole number of windows of `seqlen`).
        seqlen: tokens per window (at most tokens_per_step).
        lr: AdamW's peak learning rate (1e-5: on the demo 1e-4 and 3e-5 overshoot, as
            AdamW's first steps move every factor entry by about lr).
        warmup: steps of linear warmup (default a tenth of `steps`), then cosine to 0.
        weight_decay: AdamW's decoupled weight decay.
        clip: maximal gradient norm (0: no clipping).
        temperature: distillation temperature.
        lm_weight: weight of the next-token cross-entropy added to the KL term.
        corpus: builtin or a text file (default: the plan's calibration corpus).
        eval_every: steps between perplexity points of the curve (0: before and after only).
        eval_tokens: evaluation tokens of each point (windows of `seqlen`).
        checkpoint_every: steps between checkpoints (0: none).
        seed: order of the windows.
        ste: quantized factors (factor_bits < 16, CALDERA's L and R) trained through
            their grid with a straight-through estimator (compressors.healing), so the
            saved model is the one the last step computed; false: trained in float and
            rounded once at the end.
    """

    steps: int = 100
    tokens_per_step: int = 2048
    seqlen: int = 512
    lr: float = 1e-5
    warmup: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    lm_weight: float = 0.0
    corpus: str | None = None
    eval_every: int = 25
    eval_tokens: int = 4096
    checkpoint_every: int = 25
    seed: int = 0
    ste: bool = True

    def __post_init__(self):
        for key, low in (
            ("steps", 1),
            ("tokens_per_step", 2),
            ("seqlen", 2),
            ("eval_every", 0),
            ("eval_tokens", 2),
            ("checkpoint_every", 0),
            ("seed", 0),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise HealError(f"heal.{key}={value!r}: must be an integer >= {low}")
        for key, positive in (
            ("lr", True),
            ("temperature", True),
            ("weight_decay", False),
            ("clip", False),
            ("lm_weight", False),
        ):
            value = getattr(self, key)
            bad = isinstance(value, bool) or not isinstance(value, int | float)
            if bad or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise HealError(
                    f"heal.{key}={value!r}: must be a number {'> 0' if positive else '>= 0'}"
                )
        if self.warmup is None:
            object.__setattr__(self, "warmup", self.steps // 10)
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise HealError(f"heal.warmup={self.warmup!r}: must be an integer >= 0")
        if self.seqlen > self.tokens_per_step:
            object.__setattr__(self, "seqlen", self.tokens_per_step)
        if self.tokens_per_step % self.seqlen:
            raise HealError(
                f"heal.tokens_per_step={self.tokens_per_step}: must be a multiple of "
                f"heal.seqlen={self.seqlen}"
            )
        if self.eval_tokens < self.seqlen:
            raise HealError(
                f"heal.eval_tokens={self.eval_tokens}: less than one window of "
                f"heal.seqlen={self.seqlen}"
            )
        if not isinstance(self.ste, bool):
            raise HealError(f"heal.ste={self.ste!r}: must be true or false")
        if self.corpus is not None and not isinstance(self.corpus, str):
            raise HealError(f"heal.corpus={self.corpus!r}: must be builtin or a text file")

    @property
    def batch(self) -> int:
        return self.tokens_per_step // self.seqlen

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warmup, then cosine to 0."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


KEYS = tuple(f.name for f in dataclasses.fields(HealConfig))


def parse(raw, **overrides) -> HealConfig:
    """A HealConfig from a plan's `heal:` mapping; `overrides` (not None) win."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HealError("heal: must be a mapping of settings")
    for k in raw:
        if k not in KEYS:
            raise HealError(f"heal: unknown key {k!r} (known: {', '.join(KEYS)})")
    settings = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    if "warmup" not in raw and overrides.get("steps") is not None:
        settings.pop("warmup", None)  # a new step count gets its own default warmup
    return HealConfig(**settings)


def share_frozen(student, teacher) -> int:
    """Point the student's frozen tensors at the teacher's equal ones; returns the bytes
    no longer held twice."""
    import torch

    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    theirs.update(teacher.named_buffers(remove_duplicate=False))
    saved = 0
    for name, t in [
        *student.named_parameters(remove_duplicate=False),
        *student.named_buffers(remove_duplicate=False),
    ]:
        other = theirs.get(name)
        if (
            other is None
            or t.requires_grad
            or t.layout != torch.strided
            or other.layout != torch.strided
            or other.shape != t.shape
            or other.dtype != t.dtype
            or other.device != t.device
            or other.data_ptr() == t.data_ptr()
            or not torch.equal(other, t)
        ):
            continue
        t.data = other.data
        saved += t.numel() * t.element_size()
    return saved


def train_windows(tokenizer, config: HealConfig, corpus: str):
    """(windows, seqlen) of the corpus's calibration part."""
    return ev.token_stream(tokenizer, corpus, "calib").windows(config.seqlen)


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Window indices of step `step`: positions step*batch.. of seeded permutations."""
    import torch

    out, perms = [], {}
    for j in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(j, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g)
        out.append(int(perms[epoch][k]))
    return out


@dataclass
class HealResult:
    steps: int
    losses: list  # per step: distillation loss
    curve: list  # {"step", "ppl", "tokens"}
    seconds: float  # training time (evaluations and checkpoints excluded)
    tokens: int  # training tokens of this run (a resumed run counts its own)
    trainable_params: int
    resumed_from: int  # 0: a fresh run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}


def heal(
    student,
    teacher,
    factorizations: dict,
    tokenizer,
    config: HealConfig,
    corpus: str = "builtin",
    eval_corpus: str = "builtin",
    checkpoints: Path | None = None,
    identity: dict | None = None,
    progress=None,
    after_step=None,
) -> tuple[dict, HealResult]:
    """Heal `student` (a compressed model with `factorizations`) towards `teacher`.

    Returns (factorizations to save, result). The student is changed in place and left
    in its ordinary compact form. `checkpoints`: a folder for resumable checkpoints
    (`identity` must match for a checkpoint there to be resumed). `progress(done,
    total, text)`; `after_step(step)` is called after each completed step (and its
    checkpoint), for tests and interruption. The curve's points are perplexities on
    `eval_corpus`'s evaluation part.
    """
    import torch

    from compressors.healing import Trainable

    corpus = config.corpus or corpus
    device = next(student.parameters()).device
    windows = train_windows(tokenizer, config, corpus)
    eval_ids = ev.token_stream(tokenizer, eval_corpus, "eval")
    teacher.eval().requires_grad_(False)
    student.eval()
    trainable = Trainable(student, factorizations, ste=config.ste)
    params = trainable.named_parameters()
    if not params:
        from compressors.registry import METHODS

        names = [n for n, m in METHODS.items() if any(c.healable for c in m.factorizations)]
        raise SpectraInputError(
            f"nothing to heal: the plan has no {', '.join(names[:-1])} or {names[-1]} module"
        )
    share_frozen(student, teacher)
    opt = torch.optim.AdamW(
        list(params.values()), lr=config.lr, weight_decay=config.weight_decay, foreach=True
    )
    state = {"step": 0, "losses": [], "curve": []}
    ckpt = None if checkpoints is None else Path(checkpoints)
    meta = {"identity": identity or {}, "heal": config.to_dict(), "params": sorted(params)}
    resumed = resume(ckpt, meta, params, opt, state) if ckpt is not None else 0
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def evaluate(step):
        if state["curve"] and state["curve"][-1]["step"] == step:
            return
        r = ev.perplexity(
            student, tokenizer, ids=eval_ids, seqlen=config.seqlen, max_tokens=config.eval_tokens
        )
        state["curve"].append({"step": step, "ppl": r.ppl, "tokens": r.tokens})

    evaluate(state["step"])
    seconds, tokens = 0.0, 0
    # on CUDA each block's activations are recomputed in the backward instead of kept
    # (not exercised by the tests: they run without a GPU)
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    checkpointed = checkpoint_blocks(student) if on_gpu else contextlib.nullcontext()
    checkpointed.__enter__()
    try:
        while state["step"] < config.steps:
            step = state["step"]
            t0 = time.perf_counter()
            idx = batch_indices(step, config.batch, windows.shape[0], config.seed)
            x = windows[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = config.lr_at(step)
            with torch.no_grad(), autocast:
                target = teacher(x, use_cache=False).logits
            with autocast:
                logits = student(x, use_cache=False).logits
                loss, _ = distill_loss(
                    logits, target, x[:, 1:], config.temperature, config.lm_weight
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip)
            opt.step()
            del logits, target
            state["losses"].append(float(loss.detach()))
            state["step"] = step + 1
            dt = time.perf_counter() - t0
            seconds, tokens = seconds + dt, tokens + x.numel()
            if progress:
                progress(
                    state["step"],
                    config.steps,
                    f"loss {state['losses'][-1]:.4f}, {tokens / seconds:,.0f} tokens/s",
                )
            if config.eval_every and state["step"] % config.eval_every == 0:
                evaluate(state["step"])
            if (
                ckpt is not None
                and config.checkpoint_every
                and (state["step"] % config.checkpoint_every == 0)
            ):
                save_checkpoint(ckpt, meta, params, opt, state)
            if after_step is not None:
                after_step(state["step"])
        evaluate(state["step"])
    finally:
        checkpointed.__exit__(None, None, None)
        for p in params.values():
            p.grad = None
    n_trainable = sum(p.numel() for p in params.values())
    requantized = trainable.quantized_factors
    facts = trainable.finish()
    if requantized:  # factors went back to their grids: the curve ends on what is saved
        r = ev.perplexity(
            student, tokenizer, ids=eval_ids, seqlen=config.seqlen, max_tokens=config.eval_tokens
        )
        state["curve"].append(
            {"step": state["step"], "ppl": r.ppl, "tokens": r.tokens, "requantized": True}
        )
    result = HealResult(
        state["step"], state["losses"], state["curve"], seconds, tokens, n_trainable, resumed
    )
    return facts, result
