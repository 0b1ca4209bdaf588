"""llama.cpp (llama-cpp-python) on a GGUF export: its own logits, its own timing.

python llamacpp.py JOB.json RESULT.json
"""

import sys
import time

import runner


def log_softmax_nll(logits, targets) -> float:
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return float((logz - x[np.arange(len(targets)), targets]).sum())


def check(job: dict, out: dict) -> None:
    import llama_cpp
    import numpy as np

    out["version"] = llama_cpp.__version__
    if not job.get("repack", True):  # Llama() takes no flag for it: its default params
        import llama_cpp.llama as module

        defaults = module.llama_cpp.llama_model_default_params

        def plain():
            params = defaults()
            params.use_extra_bufts = False
            return params

        module.llama_cpp.llama_model_default_params = plain
        out["repacked"] = False
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=job["model"],
        n_ctx=job["seqlen"] + job["decode"] + 16,
        n_batch=job["seqlen"],
        logits_all=True,
        n_threads=job["threads"],
        verbose=False,
    )
    out["load_s"] = time.perf_counter() - t0
    out["loaded"] = True
    nll, count, prefill = 0.0, 0, 0.0
    for window in job["windows"]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(window)
        prefill += time.perf_counter() - t
        nll += log_softmax_nll(llm.scores[: len(window) - 1], window[1:])
        count += len(window) - 1
    out.update(nll=nll, predicted=count, prefill_s=prefill)
    out["prefill_tokens"] = sum(len(w) for w in job["windows"])

    def decode() -> tuple[float, int]:
        llm.reset()
        llm.eval(job["windows"][0][:16])
        t = time.perf_counter()
        for _ in range(job["decode"]):  # greedy, one token at a time: batch 1
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - t, job["decode"]

    seconds, decoded = runner.best_of(job, decode)
    out.update(decode_s=seconds, decoded=decoded)


if __name__ == "__main__":
    sys.exit(runner.run("llama.cpp", check))
