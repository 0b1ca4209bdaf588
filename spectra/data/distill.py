"""What healing trains against and how it survives an interruption: the distillation
loss (KL to the teacher at a temperature, in a fused autograd function, plus an
optional next-token term), activation checkpointing of the blocks, and the atomic,
resumable training checkpoint."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

from spectra.errors import SpectraInputError

CHECKPOINT = "checkpoint.pt"


def distill_loss(student_logits, teacher_logits, targets=None, temperature=1.0, lm_weight=0.0):
    """(loss, kl): mean over positions of KL(teacher || student) at `temperature`, times
    T^2, plus `lm_weight` times the next-token cross-entropy of `targets` (the student's
    logits at position i scored on targets[i], all positions but the last), float32."""
    import torch
    import torch.nn.functional as F

    t = temperature
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)
    with torch.no_grad():
        p = torch.softmax(teacher_logits.float().reshape(-1, vocab) / t, dim=-1)
        neg_entropy = torch.special.xlogy(p, p).sum()
    kl = _soft_kl()(s / t if t != 1 else s, p, neg_entropy) * (t * t)
    loss = kl
    if lm_weight:
        shifted = student_logits[:, :-1].float().reshape(-1, vocab)
        loss = loss + lm_weight * F.cross_entropy(shifted, targets.reshape(-1))
    return loss, kl


_SOFT_KL = None


def _soft_kl():
    """An autograd function: mean over rows of KL(p || softmax(s)), from s, p and
    sum(p log p), in three passes over the logits forward and one backward (the
    gradient is (softmax(s) - p) / rows); F.kl_div on log-softmaxes takes about three
    times as many."""
    global _SOFT_KL
    if _SOFT_KL is None:
        import torch

        class SoftKL(torch.autograd.Function):
            @staticmethod
            def forward(ctx, s, p, neg_entropy):
                lse = torch.logsumexp(s, dim=-1)
                ctx.save_for_backward(s, p, lse)
                cross = (lse - torch.linalg.vecdot(p, s)).sum()  # -sum p log softmax(s)
                return (cross + neg_entropy) / s.shape[0]

            @staticmethod
            def backward(ctx, grad):
                s, p, lse = ctx.saved_tensors
                out = torch.exp(s - lse[:, None]).sub_(p).mul_(grad / s.shape[0])
                return out, None, None

        _SOFT_KL = SoftKL.apply
    return _SOFT_KL


@contextlib.contextmanager
def checkpoint_blocks(model):
    """Within, every transformer block of `model` runs under activation checkpointing
    (torch.utils.checkpoint, non-reentrant): its inner activations are recomputed in the
    backward pass, so training holds one block's at a time."""
    from torch.utils.checkpoint import checkpoint

    from compressors import blocks

    layers = list(blocks.decoder_layers(model))
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's own forward again


def save_checkpoint(folder: Path, meta: dict, params: dict, opt, state: dict) -> None:
    """The trained tensors, AdamW's state and the history so far, written atomically."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": json.dumps(meta, sort_keys=True),
        "params": {k: p.detach().cpu().clone() for k, p in params.items()},
        "optimizer": opt.state_dict(),
        "state": json.dumps(state),
    }
    tmp = folder / f".{CHECKPOINT}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def resume(folder: Path, meta: dict, params: dict, opt, state: dict) -> int:
    """Load the folder's checkpoint into params, opt and state when it matches `meta`;
    returns the step resumed from (0: none)."""
    import torch

    path = folder / CHECKPOINT
    if not path.is_file():
        return 0
    try:
        payload = torch.load(path, weights_only=True)
        same = json.loads(payload["meta"]) == json.loads(json.dumps(meta, sort_keys=True))
    except Exception as e:  # a foreign or damaged file is not silently overwritten
        raise SpectraInputError(f"{path}: not a readable healing checkpoint ({e})") from e
    if not same:
        raise SpectraInputError(
            f"{path}: a checkpoint of another model or other heal settings "
            f"(delete {folder} to start over)"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(payload["params"][k].to(p.device))
    opt.load_state_dict(payload["optimizer"])
    state.update(json.loads(payload["state"]))
    return state["step"]
