"""Calibration on a Ray cluster (`spectra calibrate --ray`): the windows cut into one
shard per task, every task loading the model itself and streaming its blocks' Grams,
summed on the driver block by block."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spectra.errors import SpectraInputError
from spectra.io.model import Model, open_model


def sharded(model: Model, windows, address: str, progress=None):
    """block_grams of `model` on a Ray cluster: the windows cut into one shard per task
    (whole batches of activations.BATCH windows, at most one per CPU or GPU), every task
    loading the model from its path (one every node sees) and streaming its blocks'
    Grams; the driver sums block k over the shards (float64, shard order) and yields
    it before it asks for block k + 1, so it holds one block per shard at a time.
    """
    from compressors.activations import BATCH
    from spectra.linalg import cluster

    root, device = str(model.source.root), model.device
    info = cluster.connect(address)
    try:
        gpu = info["gpus"] > 0 and device != "cpu"
        if device.startswith("cuda") and not gpu:
            raise SpectraInputError(f"--device {device}: the Ray cluster has no GPUs")
        slots = max(1, info["gpus"] if gpu else info["cpus"])
        batches = math.ceil(len(windows) / BATCH)
        per = math.ceil(batches / min(slots, batches)) * BATCH
        jobs = [
            ShardJob(
                root,
                windows[lo : lo + per].clone(),
                "cuda" if gpu else "cpu",
                model.dtype,
                f"windows {lo}-",
            )
            for lo in range(0, len(windows), per)
        ]
        shards = cluster.streams(shard_grams, jobs, num_gpus=1 if gpu else 0)
        for index, parts in enumerate(shards):
            yield index, _sum_shards([grams for _, grams in parts])
            if progress:
                progress(index + 1, parts[0][0], f"block {index}")
    finally:
        cluster.disconnect(info)


@dataclass(frozen=True)
class ShardJob:
    root: str  # the model's directory, as every node sees it
    windows: object  # (windows, seqlen) token ids
    device: str
    dtype: str  # the driver's working dtype
    name: str


def shard_grams(job: ShardJob):
    """A Ray task (an entry point: it opens the model itself): (blocks, Grams) of one
    shard's windows, block by block."""
    from compressors.activations import block_grams
    from compressors.blocks import decoder_layers

    model = open_model(job.root, job.device, job.dtype, "none").load()
    layers = len(decoder_layers(model))
    for _, grams in block_grams(model, job.windows):
        yield layers, grams


def _sum_shards(parts: list[dict]) -> dict:
    """{name: (H, rows)} summed over shards; modules sharing an H keep sharing one."""
    out, by_id = {}, {}
    for name, (h, _) in parts[0].items():
        if id(h) not in by_id:
            total = parts[0][name][0].clone()
            for p in parts[1:]:
                total += p[name][0]
            by_id[id(h)] = (total, sum(p[name][1] for p in parts))
        out[name] = by_id[id(h)]
    return out
