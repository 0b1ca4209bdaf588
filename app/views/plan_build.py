"""The plan's modules compressed for the previews in the background.

Auto-allocate ends when the plan is chosen, as `spectra plan auto` does; compressing
the plan's modules into the previews' store (`Previewer.prebuild`, what `spectra
apply` would do) then runs in a thread while the page is in use, with its progress on
the Plan page. A preview waits for it (showing that progress), so the first preview
of an allocated plan only evaluates. A new Auto-allocate stops the old build first.
"""

from __future__ import annotations

import threading
import time

import streamlit as st

from app import state
from app.views.charts import POLL_S
from app.views.progress import Eta


class Cancelled(Exception):
    """Raised into the build's own loop to stop it at the next module."""


class Build:
    """Compressing `configs` into `pv`'s store in one thread."""

    def __init__(self, pv, configs: dict):
        self.pv, self.configs = pv, configs
        self.done, self.total = 0, pv.pending(configs)["compressing"]
        self.what, self.error = "compressing", None
        self.started, self.seconds = time.perf_counter(), None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="spectra-prebuild", daemon=True)

    def start(self) -> Build:
        self.thread.start()
        return self

    def _hear(self, done: int, total: int, what: str) -> None:
        self.done, self.total, self.what = done, total, what
        if self._stop.is_set():
            raise Cancelled

    def _run(self) -> None:
        try:
            self.pv.prebuild(self.configs, progress=self._hear)
        except Cancelled:
            pass
        except Exception as e:  # shown on the page; the preview then builds what it needs
            self.error = f"Compressing the plan's modules failed: {e}"
        self.seconds = time.perf_counter() - self.started

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """Stop at the next module (the modules built so far stay in the store)."""
        self._stop.set()
        self.thread.join()

    def wait(self, progress=None) -> None:
        """Until the build ends, telling `progress(done, total, what)` how far it is."""
        while self.thread.is_alive():
            if progress is not None and self.done:
                progress(self.done, self.total, self.what)
            self.thread.join(0.5)


def _key(spec: str) -> str:
    return f"prebuild::{spec}"


def current(spec: str) -> Build | None:
    return st.session_state.get(_key(spec))


def start(spec: str, configs: dict) -> Build | None:
    """Stop the model's running build, then compress `configs` in the background (a
    model that cannot be previewed, no tokenizer, builds nothing)."""
    stop(spec)
    st.session_state.pop(_key(spec), None)
    if not state.can_calibrate(spec):
        return None
    build = Build(state.previewer(spec), configs)
    if not build.total:
        return None
    st.session_state[_key(spec)] = build.start()
    return build


def stop(spec: str) -> None:
    build = current(spec)
    if build is not None and build.running:
        build.stop()


def wait(spec: str, bar) -> None:
    """Before a preview: the running build's end, its progress in `bar`."""
    build = current(spec)
    if build is not None and build.running:
        build.wait(Eta(bar, "compressing the plan"))


def status(spec: str) -> None:
    """The build's progress on the Plan page, redrawn until it ends."""
    build = current(spec)
    if build is None:
        return
    st.fragment(run_every=POLL_S if build.running else None)(_line)(spec, build.running)


def _line(spec: str, polling: bool) -> None:
    build = current(spec)
    if build is None:
        return
    if polling and not build.running:
        st.rerun()  # once more, without polling
    if build.error:
        st.warning(build.error)
    elif build.running:
        took = time.perf_counter() - build.started
        left = ""
        if build.done:
            left = f", about {took / build.done * (build.total - build.done):.0f} s left"
        st.progress(
            build.done / max(build.total, 1),
            f"Compressing the plan's modules for the previews: {build.done}/{build.total}"
            f"{left}. The page stays usable; a preview waits for the rest.",
        )
    else:
        st.caption(
            f"The plan's {build.total} compressions for the previews were built in "
            f"{build.seconds:.0f} s."
        )
