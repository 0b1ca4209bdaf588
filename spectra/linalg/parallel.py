"""One thread per core with one BLAS thread each, for lists of mid-sized numeric jobs."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor


def parallel_map(fn, jobs, workers: int | None = None):
    """fn over jobs in order, on one thread per core (or `workers`) with one BLAS
    thread each.

    Factorizations and per-module error curves are chains of mid-sized BLAS calls and
    short Python loops: one single-threaded job per core is about twice as fast on 2
    cores as one job at a time on both (CALDERA: 12.1 s vs 24.1 s for four demo-sized
    matrices). Torch and numpy release the GIL inside those calls. Results come back
    in submission order. At most one job more than there are workers is submitted
    ahead: a consumer that stops early (a cancelled build) waits for those only, and
    results that finish early do not pile up.
    """
    import torch
    from threadpoolctl import threadpool_limits

    jobs = list(jobs)
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers < 2:
        yield from map(fn, jobs)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
            ahead = deque(pool.submit(fn, job) for job in jobs[: workers + 1])
            for job in jobs[workers + 1 :]:
                done = ahead.popleft().result()
                ahead.append(pool.submit(fn, job))
                yield done
            while ahead:
                yield ahead.popleft().result()
    finally:
        torch.set_num_threads(threads)


# A job on a weight this large (an 8B q_proj: 16.8M elements) runs alone on every core:
# two at once hold two sets of working matrices (an 8B down_proj's whitened candidates
# or compression alone are 1.5 to 3 GB: its 14,336-wide Gram in float64 and products).
SERIAL_NUMEL = 1 << 24


def map_by_size(fn, jobs, numel):
    """(job, fn(job)) pairs: jobs whose `numel(job)` is below SERIAL_NUMEL first, one per
    core (parallel_map), then the others one at a time in this thread on every core."""
    jobs = list(jobs)
    small = [j for j in jobs if numel(j) < SERIAL_NUMEL]
    big = [j for j in jobs if numel(j) >= SERIAL_NUMEL]
    yield from zip(small, parallel_map(fn, small), strict=True)
    for job in big:
        yield job, fn(job)


def sized_map(fn, jobs, numel) -> list:
    """[fn(job) for job in jobs], in order, run as map_by_size runs them."""
    jobs = list(jobs)
    out = [None] * len(jobs)
    pairs = map_by_size(lambda p: fn(p[1]), list(enumerate(jobs)), lambda p: numel(p[1]))
    for (i, _), got in pairs:
        out[i] = got
    return out
