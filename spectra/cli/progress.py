"""A terminal progress bar for long commands: tqdm on a TTY, silent otherwise."""

from __future__ import annotations

import sys


class progress_bar:
    """tqdm on an interactive terminal, silent otherwise; yields a progress callback."""

    def __init__(self, desc: str, unit: str = "matrix"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        def update(done, total, name):
            if self.bar is not None and (total != self.bar.total or done < self.bar.n):
                self.bar.close()  # a new phase (calibration, loss weights, candidates)
                self.bar = None
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr)
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(name[-40:], refresh=False)

        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
