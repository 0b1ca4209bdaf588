"""What every engine script shares: read the job, run the engine, write one result.

Imported by its siblings from their own directory (Python puts a script's directory on
its path); it imports nothing of spectra's either."""

import json
import sys
from pathlib import Path


def run(engine: str, body) -> int:
    """`body(job, out)` fills `out` (loaded, nll, timings); any exception becomes the
    engine's own error in one line. Exit 0 when it got as far as decoding."""
    job = json.loads(Path(sys.argv[1]).read_text())
    out = {"engine": engine, "loaded": False}
    try:
        body(job, out)
    except Exception as e:  # the engine's own words, one line
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    Path(sys.argv[2]).write_text(json.dumps(out))
    return 0 if out.get("decoded") else 1


def best_of(job: dict, decode) -> tuple[float, int]:
    """The fastest (seconds, tokens) of `job["repeats"]` calls of `decode()`, each of
    which times its own decoding: on a shared CPU a single run is mostly noise."""
    return min(decode() for _ in range(max(1, job.get("repeats", 1))))


def rss_gb() -> float | None:
    """This process's resident set now (Linux's /proc), in GB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        return None
    return None
