"""The `spectra` command line.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 internal error.
"""

from __future__ import annotations

import logging
import os
import sys

from spectra.cli.parser import build_parser
from spectra.errors import SpectraInputError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    _speak()
    try:
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args) or 0
    except SpectraInputError as e:
        print(f"spectra: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spectra: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: one line unless SPECTRA_DEBUG is set
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        print(f"spectra: internal error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _speak() -> None:
    """The library's log lines (a one-time GGUF conversion) go to stderr."""
    log = logging.getLogger("spectra")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("spectra: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
