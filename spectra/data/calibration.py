"""Calibration tokens: the windows every data-aware step computes its activations on."""

from __future__ import annotations

import torch

from spectra.data import perplexity as ev


def calibration_windows(tokenizer, spec):
    """`samples` windows of `seqlen` calibration tokens, chosen with `seed`."""
    ids = ev.token_stream(tokenizer, spec.corpus, "calib").windows(spec.seqlen)
    pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(spec.seed))
    return ids[pick[: spec.samples]]
