"""The analysis as a background job: one matrix at a time, each row stored as it finishes.

An interactive front end (the app) starts an `AnalysisJob` and shows what is known
at once; the job computes the rows in a thread with the same pool as `analyze` (one
worker per core, one BLAS thread each), stores each row in the per-matrix cache
(spectra.rows) as it finishes, and when the last one is in writes the same table,
under the same key, that `analyze` would have. A job started again resumes: the rows
already stored are read, not computed (the tensor hashes of the rows done so far are
remembered per file). The files are checked before each row is stored: a checkpoint
replaced during the job stops it with one message, and nothing half-written is kept.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from spectra import analysis as an
from spectra import rows as rowlib
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Matrix, Model
from spectra.linalg import scratch
from spectra.rows import AnalysisSettings

_BLAS = threading.Lock()
_BLAS_USERS = [0, None]  # jobs running, the threadpool limiter they share


@contextlib.contextmanager
def one_blas_thread():
    """One BLAS thread per worker while any job runs; restored when the last ends (the
    limit is process-wide, so jobs in several threads share one)."""
    from threadpoolctl import threadpool_limits

    with _BLAS:
        if _BLAS_USERS[0] == 0:
            _BLAS_USERS[1] = threadpool_limits(1, user_api="blas")
        _BLAS_USERS[0] += 1
    try:
        yield
    finally:
        with _BLAS:
            _BLAS_USERS[0] -= 1
            if _BLAS_USERS[0] == 0:
                _BLAS_USERS[1].restore_original_limits()


def cost(m: Matrix) -> int:
    """Relative work of one matrix's spectrum (a Gram of the smaller side)."""
    a, b = m.shape
    return a * b * min(a, b)


def order(mats: list[Matrix], workers: int) -> list[Matrix]:
    """The order rows are computed in: block by block, so the blocks fill in from the
    first; each matrix outside the blocks (embeddings and heads, often the largest by
    far) goes in where the work queued after it can keep the other workers busy while
    it runs, so it neither holds the blocks back nor leaves cores idle at the end."""
    queue = sorted((m for m in mats if m.block is not None), key=lambda m: (m.block, -cost(m)))
    for m in sorted((m for m in mats if m.block is None), key=cost):
        after, at = 0, len(queue)
        while at > 0 and after + cost(queue[at - 1]) <= (workers - 1) * cost(m):
            at -= 1
            after += cost(queue[at])
        queue.insert(at, m)
    return queue


class AnalysisJob:
    """The analysis of one model under one settings, computed in a background thread.

    `progress()` says how far it is, `table()` gives the rows that have arrived (the
    full table once done), `row(name)` one matrix's row now (computed on the spot,
    and stored, if it has not arrived).
    """

    def __init__(
        self, model: Model, settings: AnalysisSettings | None = None, lease: float | None = None
    ):
        """`lease`: pause between rows while nobody has called `touch()` for that many
        seconds (work for one page, done while the page is open); None: never pause."""
        self.model, self.settings = model, settings or AnalysisSettings(mpo=False)
        self.lease, self._touched = lease, time.monotonic()
        self.mats = model.matrices
        self.total = len(self.mats)
        self.error: str | None = None
        self.cached = self.computed = 0
        self._rows: dict[str, dict] = {}
        self._final = None
        self._frame = (-1, None)
        self._sigmas = (None, {})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._stamps = {f: cache.file_stamp(f) for f in model.source.files}
        self._hashes = self._remembered()
        self._t0 = self._t1 = None
        self._left_cost = sum(cost(m) for m in self.mats)
        self._done_cost = 0
        self._thread = threading.Thread(target=self._run, name="spectra-analysis", daemon=True)

    def start(self) -> AnalysisJob:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def touch(self) -> None:
        """Someone still wants the rows (see `lease`)."""
        self._touched = time.monotonic()

    def stop(self) -> None:
        """Stop after the rows in flight (they are stored; the table is not written)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (or `timeout` s pass); whether it has ended."""
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def progress(self) -> dict:
        """done and total matrices, seconds so far, seconds left (None until known),
        rows read from the cache and computed, whether it ended, its error if any."""
        end = self._t1 or time.perf_counter()
        secs = end - self._t0 if self._t0 is not None else 0.0
        with self._lock:
            done, spent, left = len(self._rows), self._done_cost, self._left_cost
        rate = secs / spent if spent and self.computed else None
        return dict(
            done=done,
            total=self.total,
            seconds=secs,
            left=0.0 if self.finished else (rate * left if rate is not None else None),
            cached=self.cached,
            computed=self.computed,
            finished=self.finished,
            error=self.error,
        )

    def table(self):
        """The rows arrived so far as the analysis table (the whole table once the job
        is done: that of `analyze`, tied copies listed as aliases)."""
        if self._final is not None:
            return self._final
        with self._lock:
            n, rows = len(self._rows), list(self._rows.values())
        if self._frame[0] != n:
            self._frame = (n, an.frame([dict(r, aliases=[]) for r in rows]))
        return self._frame[1]

    def sigmas(self) -> dict:
        """Singular values (numpy) by module name, aliases included, of what has arrived."""
        df = self.table()
        if self._sigmas[0] is not df:
            import numpy as np

            got = {}
            for name, aliases, s in df.select("name", "aliases", "sigma").iter_rows():
                for n in [name, *aliases]:
                    got[n] = np.asarray(s)
            self._sigmas = (df, got)
        return self._sigmas[1]

    def row(self, name: str) -> dict:
        """One matrix's row (with its identity columns): arrived, stored, or computed now."""
        with self._lock:
            got = self._rows.get(name)
        if got is not None:
            return got
        m = self.model.matrix(name)
        row, h, _ = self._one(m)
        return dict(row, **an.identity(m, h))

    def _remembered(self) -> dict[str, str]:
        hashes: dict[str, str] = {}
        for f, stamp in self._stamps.items():
            memo = cache.memoized_hashes(f, stamp) or cache.read_json(_partial(f, stamp)) or {}
            hashes.update(memo if isinstance(memo, dict) else {})
        return hashes

    def _run(self) -> None:
        try:
            hit = an.analyze(self.model, settings=self.settings, cached_only=True)
            if hit is not None:
                self._take_table(hit)
                return
            self._compute()
            if not self._stop.is_set():
                self._finish()
        except Exception as e:  # shown by the page; the app keeps serving
            self.error = _message(self.model, e)
            self._stop.set()
        finally:
            self._t1 = time.perf_counter()
            self._done.set()

    def _take_table(self, df) -> None:
        self.cached = df.height
        with self._lock:
            self._rows = {r["name"]: r for r in df.to_dicts()}
            self._left_cost = 0
        self._final = df
        self.total = df.height

    def _compute(self) -> None:
        if self.model.device.startswith("cuda"):  # batched by shape on the GPU, at once
            self._take_table(an.analyze(self.model, settings=self.settings))
            self.cached = 0
            return
        scratch.tune_allocator()
        with one_blas_thread(), ThreadPoolExecutor(rowlib.workers()) as pool:
            futures = [pool.submit(self._work, m) for m in order(self.mats, rowlib.workers())]
            for f in as_completed(futures):
                f.result()  # the first failure ends the job, the others stop soon

    def _work(self, m: Matrix) -> None:
        while self.lease is not None and time.monotonic() - self._touched > self.lease:
            if self._stop.wait(0.5):  # nobody looks: wait for a page to ask again
                return
        if self._stop.is_set():
            return
        try:
            row, h, hit = self._one(m)
        except BaseException:
            self._stop.set()
            raise
        with self._lock:
            self._rows[m.name] = dict(row, **an.identity(m, h))
            self._done_cost += 0 if hit else cost(m)
            self._left_cost -= cost(m)
            self.cached += hit
            self.computed += not hit

    def _one(self, m: Matrix) -> tuple[dict, str, bool]:
        """(row, content hash, read from the cache) of one matrix."""
        s, got, w = self.settings, {}, None
        h = self._hashes.get(m.ref.name)
        row = self._stored(m, h, s)
        if row is None and not rowlib.streams(m, s):  # hash the bytes read, then look
            w = m.read_scratch(got)
            h = got[m.ref.name]
            row = self._stored(m, h, s)
        hit = row is not None
        if w is not None and not hit:
            row = rowlib.matrix_row(w, s, self._spectrum(m, h))
        elif not hit:
            row = rowlib.cpu_row(m, s, got)
            h = got.get(m.ref.name, h)
        if not hit:
            self._check(m)
            rowlib.write_row(rowlib.row_path(m, h, s), row)
        self._remember(m, h)
        return row, h, hit

    @staticmethod
    def _stored(m: Matrix, h: str | None, s: AnalysisSettings) -> dict | None:
        return None if h is None else rowlib.read_row(rowlib.row_path(m, h, s), s)

    def _spectrum(self, m: Matrix, h: str):
        """The spectrum the spectra-only analysis stored (the same numbers: never the
        streamed kind), so bond profiles do not compute it again; else None."""
        plain = AnalysisSettings(mpo=False)
        if not self.settings.mpo or rowlib.streams(m, plain):
            return None
        row = self._stored(m, h, plain)
        return None if row is None else np.asarray(row["sigma"])

    def _check(self, m: Matrix) -> None:
        """The file `m` was read from is the one the job started on."""
        f = m.ref.path
        try:
            same = cache.file_stamp(f) == self._stamps[f]
        except OSError:
            same = False
        if not same:
            raise SpectraInputError(
                f"{self.model.spec}: {f.name} changed while the app was reading it "
                "(the model was replaced); open it again to analyse the new weights"
            )

    def _remember(self, m: Matrix, h: str) -> None:
        f = m.ref.path
        with self._lock:
            if self._hashes.get(m.ref.name) == h:
                return
            self._hashes[m.ref.name] = h
            mine = {r.ref.name for r in self.mats if r.ref.path == f}
            known = {k: v for k, v in self._hashes.items() if k in mine}
            cache.write_json(_partial(f, self._stamps[f]), known)

    def _finish(self) -> None:
        """Store the hashes and the whole table, as `analyze` would have."""
        for f, stamp in self._stamps.items():
            mine = [m.ref.name for m in self.mats if m.ref.path == f]
            cache.store_hashes(f, stamp, {k: self._hashes[k] for k in mine})
        unique, aliases = an.dedupe(self.mats, self._hashes)
        path = an.table_path(unique, self._hashes, self.settings)
        rows = {m.name: self._rows[m.name] for m in unique}
        self._final = an.table(unique, rows, self._hashes, aliases, path)


def _partial(f, stamp) -> str:
    return cache.cache_dir() / "hashes" / f"partial-{cache.key(stamp)}.json"


def _message(model: Model, e: Exception) -> str:
    if isinstance(e, SpectraInputError):
        return str(e)
    if isinstance(e, OSError):
        return f"{model.spec}: its files cannot be read any more ({e}); open it again"
    return f"{model.spec}: the analysis failed: {type(e).__name__}: {e}"


def eta_text(p: dict) -> str:
    """'12/200 matrices, 34 s, about 80 s left' from `AnalysisJob.progress()`."""
    left = "" if p["left"] is None else f", about {math.ceil(p['left'])} s left"
    return f"{p['done']}/{p['total']} matrices, {p['seconds']:.0f} s{left}"
