"""`spectra serve-check`: an export loaded by the engine it is meant for, in that
engine's own virtual environment and process (spectra.export.engines: scripts that
import no spectra), beside a dense export loaded the same way.

The evaluation windows are `spectra eval`'s (the export's tokenizer, the corpus's
evaluation split, `seqlen`-token windows up to `max_tokens`), passed to the engine as
token ids, so its perplexity is comparable with `spectra eval OUT`. Each row reports
whether it loaded, the perplexity from the engine's own logits, the engine process's
peak resident set (its ru_maxrss), the weight files' bytes, prefill tokens/s over the
windows and greedy decode tokens/s at batch 1 (the fastest of `repeats` runs of the
same prompt: one run on a shared CPU is mostly noise).

Environments: `make engines` creates `.venv-llamacpp` and `.venv-vllm` in the
checkout (SPECTRA_ENGINES names another folder holding them); transformers runs in the
project's own interpreter, in a fresh process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from spectra.errors import SpectraInputError

ENGINES = {  # name -> (virtual environment, script)
    "llama.cpp": (".venv-llamacpp", "llamacpp.py"),
    "vllm": (".venv-vllm", "vllm_check.py"),
    "transformers": (None, "transformers_check.py"),
}
# an engine's error that means its build lacks a kernel, and what to say
KERNELS = {
    "cpu_gemm_wna16": "this vLLM CPU build's 4-bit weight kernel (cpu_gemm_wna16) has no "
    "float32 path: run it in bfloat16 (--dtype bfloat16), or export dense (hf) for float32",
    "kernel that can implement the WNA16": "this vLLM CPU build has no weight-only "
    "quantized kernel (WNA16, 4- or 8-bit) for this CPU; export dense (hf) for it",
}
WEIGHTS = (".gguf", ".safetensors", ".bin")
# vLLM's engine process logs its traceback as "(Worker pid=N) ERROR <time> [file:line] ..."
_LOGGED = re.compile(r"^(\(\w+ pid=\d+\) )?(ERROR \S+ \S+ \[[^\]]+\] )?")
_RAISED = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")
STAMP = ".spectra-engine"  # written by `make engines` once an environment is complete

WRAP = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "peak_kb": peak}))
"""


def engine_of(export_dir: Path) -> str:
    """The engine an export is meant for: llama.cpp for a GGUF, vLLM for
    compressed-tensors, transformers for a plain checkpoint."""
    if list(export_dir.glob("*.gguf")):
        return "llama.cpp"
    config = export_dir / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return "vllm"
    return "transformers"


def python_of(engine: str) -> str:
    venv, _ = ENGINES[engine]
    if venv is None:
        return sys.executable
    root = Path(os.environ.get("SPECTRA_ENGINES") or Path(__file__).resolve().parents[2])
    python = root / venv / "bin" / "python"
    if not (root / venv / STAMP).is_file():  # `make engines` finished building it
        raise SpectraInputError(
            f"{engine}: no engine environment at {root / venv}: run `make engines`"
        )
    return str(python)


def windows(export_dir: Path, corpus: str, seqlen: int, max_tokens: int) -> list[list[int]]:
    """`spectra eval`'s evaluation windows, tokenized by the export's own tokenizer."""
    from transformers import AutoTokenizer

    from spectra.data.perplexity import token_stream
    from spectra.io import remote_code

    beside = export_dir / "tokenizer"  # a GGUF export keeps it in a folder of its own
    try:
        where = beside if beside.is_dir() else export_dir
        tok = AutoTokenizer.from_pretrained(where, **remote_code.trusted(where))
    except (OSError, ValueError) as e:
        raise SpectraInputError(f"{export_dir}: no tokenizer beside the export ({e})") from e
    return token_stream(tok, corpus, "eval").windows(seqlen, max_tokens).tolist()


def run(engine: str, export_dir: Path, job: dict, timeout: float = 3600) -> dict:
    """One engine process on one export; its result with peak RSS and file bytes."""
    _, script = ENGINES[engine]
    model = next(iter(sorted(export_dir.glob("*.gguf"))), export_dir)
    with tempfile.TemporaryDirectory(prefix="spectra-check-") as tmp:
        t = Path(tmp)
        (t / "job.json").write_text(json.dumps({**job, "model": str(model)}))
        cmd = [python_of(engine), str(Path(__file__).parent / "engines" / script)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        env.pop("PYTHONPATH", None)  # the engine's own packages only
        proc = subprocess.run(
            [sys.executable, "-c", WRAP, str(t / "rusage.json"), *cmd, str(t / "job.json"),
             str(t / "result.json")],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp,
        )  # fmt: skip
        got = json.loads((t / "result.json").read_text()) if (t / "result.json").is_file() else {}
        usage = json.loads((t / "rusage.json").read_text())
    signal = -usage.get("rc", 0)  # the engine process's own end (the wrapper's is 0)
    if not got and engine == "llama.cpp" and signal > 0 and job.get("repack", True):
        # llama.cpp 0.3.36's repacked weight buffers (its AMX and AVX-512 int8 paths)
        # crash on some CPUs for Q8_0: once more without them, and the row says so
        again = run(engine, export_dir, dict(job, repack=False), timeout)
        return dict(again, note=f"killed by signal {signal} with llama.cpp's "
                                "repacked weight buffers; run without them")  # fmt: skip
    if not got:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        got = {"engine": engine, "loaded": False, "error": tail[-1] if tail else "no result"}
    if "root cause" in got.get("error", ""):  # vLLM's engine process died first
        got["error"] = root_cause(f"{proc.stdout}\n{proc.stderr}") or got["error"]
    for marker, why in KERNELS.items():
        if marker in got.get("error", ""):
            got["error"] = f"{why} ({got['error']})"
    got["peak_rss_gb"] = round(usage["peak_kb"] * 1024 / 1e9, 3)
    got["file_bytes"] = sum(p.stat().st_size for p in export_dir.iterdir() if p.suffix in WEIGHTS)
    if got.get("predicted"):
        got["ppl"] = math.exp(got["nll"] / got["predicted"])
        got["prefill_tok_s"] = got["prefill_tokens"] / got["prefill_s"]
    if got.get("decoded"):
        got["decode_tok_s"] = got["decoded"] / got["decode_s"]
    got["export"] = str(export_dir)
    return got


def root_cause(stderr: str | None) -> str | None:
    """The first exception line an engine's own processes logged (vLLM's worker dies
    with the real error; the processes above it only point back at it)."""
    lines = [_LOGGED.sub("", line).strip() for line in (stderr or "").splitlines()]
    raised = [line for line in lines if _RAISED.match(line) and "root cause" not in line]
    return raised[0] if raised else None


def serve_check(
    export_dir,
    baseline=None,
    engine: str = "auto",
    corpus: str = "builtin",
    seqlen: int = 512,
    max_tokens: int = 2048,
    decode: int = 32,
    dtype: str | None = None,
    repeats: int = 3,
) -> list[dict]:
    """The export's row, then the baseline's (a dense export loaded the same way)."""
    if repeats < 1 or decode < 1:
        raise SpectraInputError(f"--decode {decode} --repeats {repeats}: both must be >= 1")
    dirs = [Path(export_dir)] + ([Path(baseline)] if baseline else [])
    for d in dirs:
        if not d.is_dir():
            raise SpectraInputError(f"{d}: not an export directory")
    name = engine_of(dirs[0]) if engine == "auto" else engine
    if name not in ENGINES:
        raise SpectraInputError(f"--engine {engine!r}: use auto or one of {', '.join(ENGINES)}")
    python_of(name)  # a missing environment: exit 2 before any work
    job = dict(
        windows=windows(dirs[0], corpus, seqlen, max_tokens),
        seqlen=seqlen,
        decode=decode,
        repeats=repeats,
        threads=os.cpu_count() or 1,
        dtype=dtype,
    )
    rows = []
    for d in dirs:
        rows.append(run(name, d, job))
        if rows[-1].get("repacked") is False:  # the baseline would crash the same way
            job["repack"] = False
    return rows
