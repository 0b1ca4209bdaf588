"""Progress that speaks: a phase, a count and the time left (shared by the pages)."""

import time

PHASES = ("compressing", "block", "windows", "dense", "candidates")


class Eta:
    """A progress callback that shows each phase (calibration, allocation, compressing,
    blocks) with its count and the time left, estimated from that phase's own rate."""

    def __init__(self, bar, name: str = ""):
        self.bar, self.name, self.phase, self.start = bar, name, None, time.perf_counter()

    def __call__(self, done: int, total: int, what: str) -> None:
        first = what.split(" ")[0].rstrip(",")
        phase = first if first in PHASES else "items"  # a module's name: one phase of many
        now = time.perf_counter()
        if phase != self.phase:
            self.phase, self.start = phase, now
        frac = done / max(total, 1)
        left = ""
        if done and now - self.start > 0.5:
            left = f", about {(now - self.start) / frac * (1 - frac):.0f} s left"
        head = f"{self.name.capitalize()}: " if self.name else ""
        self.bar.progress(min(frac, 1.0), f"{head}{what} ({done}/{total}{left})")
