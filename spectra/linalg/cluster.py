"""Ray as the fan-out engine of `--ray`: connecting, and one task per job.

`connect(address)` joins a cluster: `auto` joins the one that `RAY_ADDRESS` names and
otherwise starts a local one (one CPU per core); any other value is an address
(`HOST:PORT`, or `ray://HOST:PORT` for Ray Client). A process that already called
`ray.init` keeps its cluster. `task_map(fn, jobs, names)` runs `fn(job)` as one Ray
task per job and, once all have finished, returns an iterator over the results in
submission order (what `parallel_map` yields). `task_pull(fn, take, width=W)` draws
its jobs from `take()` only as one of its W task slots frees, so the driver's own
threads can work through the same queue beside the cluster.

Each task runs with one torch and one BLAS thread, as every job of the local
thread pool does, so that the floating-point results are the local path's bit for bit.
Ray retries a task whose worker dies (`max_retries`); a task that raises fails for
good, and `task_map` raises `TaskFailed` naming its job. Jobs should be small (a
matrix's location, or one module's weight and H): nothing model-sized goes through
the object store. Workers import this package, so every node needs it installed
(a local cluster shares this interpreter's environment).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from spectra.errors import SpectraInputError

INSTALL_HINT = 'pip install -e ".[distributed]"'
MAX_RETRIES = 3  # attempts after a worker dies (Ray's own default for tasks)


class TaskFailed(RuntimeError):
    """A Ray task that failed for good (its exception, or its retries spent)."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise SpectraInputError(
            f"--ray needs the distributed extra (Ray), which is not installed: {INSTALL_HINT}"
        ) from e
    return ray


def _target(address: str) -> str | None:
    """The address `connect` joins, or None when it starts a local cluster."""
    return (os.environ.get("RAY_ADDRESS") or None) if address == "auto" else address


def starts_local(address: str = "auto") -> bool:
    """Whether `connect(address)` would start a local cluster (rather than join one)."""
    if _target(address) is not None:
        return False
    try:
        import ray
    except ImportError:
        return False
    return not ray.is_initialized()


def connect(address: str = "auto") -> dict:
    """Join (or start) the cluster `address` names; {address, started, cpus, gpus}.

    `started` is True when this call started a local cluster (`disconnect` stops it).
    An address that cannot be reached is bad input.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        target = _target(address)
        if target:
            _reachable(target)
        try:
            if target:
                ray.init(address=target, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(
                    num_cpus=os.cpu_count() or 1,
                    include_dashboard=False,
                    logging_level="ERROR",
                    log_to_driver=False,
                )
                started = True
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpectraInputError(f"--ray {target}: cannot reach a Ray cluster ({first})") from e
    res = ray.cluster_resources()
    return dict(
        address=address,
        started=started,
        cpus=int(res.get("CPU", 0)),
        gpus=int(res.get("GPU", 0)),
    )


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Bad input unless HOST:PORT (or ray://HOST:PORT) accepts a TCP connection: Ray
    itself keeps retrying an unreachable address for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpectraInputError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SpectraInputError(f"--ray {address}: cannot reach a Ray cluster ({e})") from e


def disconnect(info: dict) -> None:
    """Stop the local cluster that `connect` started (leave any other one running)."""
    if info.get("started"):
        _ray().shutdown()


_LIMITED = []  # this worker process's BLAS pools are down to one thread


def _single_threaded(fn, job):
    """fn(job) with one BLAS and one torch thread (set once per worker process: a
    threadpoolctl scan costs tens of milliseconds, torch's import seconds)."""
    import sys

    if not _LIMITED:
        from threadpoolctl import threadpool_limits

        _LIMITED.append(threadpool_limits(1))  # kept: the worker is ours
    torch = sys.modules.get("torch")  # imported by unpickling a job that holds tensors
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return fn(job)


_REMOTE = {}


def _remote(num_gpus: float):
    ray = _ray()
    if num_gpus not in _REMOTE:
        _REMOTE[num_gpus] = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=MAX_RETRIES)(
            _single_threaded
        )
    return _REMOTE[num_gpus]


def task_map(
    fn: Callable,
    jobs: Iterable,
    names: Callable[[object], str] | None = None,
    num_gpus: float = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> Iterator:
    """fn(job) for every job as Ray tasks; results in submission order.

    `names(job)` says which job a failure is about (default: its `name`, else str);
    `progress(done, total, name)` is called as tasks finish, in the order they finish.
    """
    names = names or (lambda job: str(getattr(job, "name", job)))
    jobs = list(jobs)
    todo = iter(enumerate(jobs))
    results: list = [None] * len(jobs)
    pulled = task_pull(fn, lambda: next(todo, None), names, num_gpus, len(jobs))
    for done, (i, result) in enumerate(pulled, 1):
        results[i] = result
        if progress:
            progress(done, len(jobs), names(jobs[i]))
    return iter(results)


def task_pull(
    fn: Callable,
    take: Callable[[], tuple[object, object] | None],
    names: Callable[[object], str] | None = None,
    num_gpus: float = 0,
    width: int = 1,
) -> Iterator[tuple[object, object]]:
    """fn(job) as Ray tasks for the jobs `take()` hands out ((key, job), or None when
    there are no more), at most `width` in flight; yields (key, result) as each
    finishes. Jobs are drawn only when a task slot frees, so other consumers of the
    same queue (the driver's own threads) share the work."""
    ray = _ray()
    names = names or (lambda job: str(getattr(job, "name", job)))
    remote = _remote(num_gpus)
    fn_ref = ray.put(fn)
    running: dict = {}

    def submit() -> bool:
        got = take()
        if got is None:
            return False
        running[remote.remote(fn_ref, got[1])] = got
        return True

    while len(running) < max(1, width) and submit():
        pass
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        key, job = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:  # RayTaskError, WorkerCrashedError after the retries
            raise _failed(e, names(job), list(running)) from e
        submit()
        yield key, result


def streams(
    fn: Callable, jobs: list, names: Callable[[object], str] | None = None, num_gpus: float = 0
) -> Iterator[list]:
    """fn(job) as one streaming Ray task per job, each a generator; yields the lists of
    their n-th items, n = 0, 1, ..., fetched in lockstep (so the driver holds one item
    per job at a time, never a whole stream)."""
    ray = _ray()
    names = names or (lambda job: str(getattr(job, "name", job)))
    if num_gpus not in _STREAMING:
        _STREAMING[num_gpus] = ray.remote(
            num_cpus=1, num_gpus=num_gpus, max_retries=MAX_RETRIES, num_returns="streaming"
        )(_single_threaded_stream)
    fn_ref = ray.put(fn)
    gens = [_STREAMING[num_gpus].remote(fn_ref, job) for job in jobs]
    while True:
        items = []
        for gen, job in zip(gens, jobs, strict=True):
            try:
                items.append(ray.get(next(gen)))
            except StopIteration:
                return
            except Exception as e:  # a task that raised, or its retries spent
                raise _failed(e, names(job), gens) from e
        yield items


_STREAMING = {}


def _single_threaded_stream(fn, job):
    """The items of the generator fn(job), under _single_threaded's thread limits."""
    yield from _single_threaded(fn, job)


def _failed(e: Exception, name: str, others: list) -> TaskFailed:
    """The TaskFailed that names the job behind `e`, the other tasks cancelled."""
    ray = _ray()
    for r in others:
        ray.cancel(r, force=True)
    cause = getattr(e, "cause", None) or e
    line = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
    return TaskFailed(f"{name}: {type(cause).__name__}: {line}")
