"""Progress that speaks: a phase, a count and the time left (shared by the pages)."""

import time

PHASES = ("compressing", "block", "windows", "dense", "candidates")
# seconds per item of each (job, phase), learned from the phases finished in this
# process (a calibration's blocks are not a preview's); a baseline's blocks ("dense")
# cost what a preview's blocks cost
RATES: dict[tuple[str, str], float] = {}
SAME_RATE = {"dense": "block"}


class Eta:
    """A progress callback that shows each phase (calibration, allocation, compressing,
    blocks) with its count and the time left.

    `plan` ({phase: items}, e.g. spectra.preview.Previewer.pending) names every phase
    of the job: the time left is then the current phase's, from its own rate, plus
    each phase still to come at the rate it ran at before (RATES); a phase that has not
    run yet in this process is named instead ("then 30 blocks"). The plan is in the
    order the phases run: a phase that starts ends those before it (a step that had
    nothing to do, e.g. an allocation read from the store). `labels` names what a
    phase is part of ({"block": "calibration"}: "calibration block 3")."""

    def __init__(
        self,
        bar,
        name: str = "",
        plan: dict[str, int] | None = None,
        labels: dict[str, str] | None = None,
    ):
        self.bar, self.name, self.phase, self.start = bar, name, None, time.perf_counter()
        self.ahead = {p: n for p, n in (plan or {}).items() if n}
        self.labels = labels or {}
        self.done = 0

    def expect(self, phase: str, items: int) -> None:
        """A phase still to come turns out to have `items` items (0: it will not run)."""
        if phase == self.phase:
            return
        if items:
            self.ahead[phase] = items
        else:
            self.ahead.pop(phase, None)

    def _learn(self, now: float) -> None:
        if self.phase in PHASES and self.done and now - self.start > 0.5:
            rate = (now - self.start) / self.done
            RATES[self.name, self.phase] = RATES[self.name, _base(self.phase)] = rate

    def __call__(self, done: int, total: int, what: str) -> None:
        first = what.split(" ")[0].rstrip(",")
        phase = first if first in PHASES else "items"  # a module's name: one phase of many
        now = time.perf_counter()
        if phase != self.phase:
            self._learn(now)
            self.phase, self.start = phase, now
            if phase in self.ahead:  # the phases planned before it are over
                order = list(self.ahead)
                for p in order[: order.index(phase) + 1]:
                    del self.ahead[p]
        self.done = done
        frac = done / max(total, 1)
        own = (now - self.start) / done if done and now - self.start > 0.5 else None
        rates = {p: r for (job, p), r in RATES.items() if job == self.name}
        if own is not None:  # this phase's rate holds for what costs the same later
            rates[phase] = rates[_base(phase)] = own
            if phase in PHASES:  # and for the next job of this name
                RATES[self.name, phase] = RATES[self.name, _base(phase)] = own
        rate = rates.get(SAME_RATE.get(phase, phase))
        later = list(self.ahead.items())
        known = sum(n * rates[_base(p)] for p, n in later if _base(p) in rates)
        unknown = ", ".join(f"{n} {_noun(p, n)}" for p, n in later if _base(p) not in rates)
        left = ""
        if rate is not None or known:
            secs = known + (rate * (total - done) if rate is not None else 0)
            about = "about" if rate is not None or done >= total else "over"
            left = f", {about} {secs:.0f} s left" + (f" then {unknown}" if unknown else "")
        elif unknown:
            left = f", then {unknown}"
        head = f"{self.name.capitalize()}: " if self.name else ""
        label = f"{self.labels[phase]} " if phase in self.labels else ""
        self.bar.progress(min(frac, 1.0), f"{head}{label}{what} ({done}/{total}{left})")


def _base(phase: str) -> str:
    return SAME_RATE.get(phase, phase)


def _noun(phase: str, n: int) -> str:
    word = {
        "compressing": "compression",
        "dense": "baseline block",
        "block": "block",
        "candidates": "candidate",
    }.get(phase, phase)
    return word if n == 1 else word + "s"
