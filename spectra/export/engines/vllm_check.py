"""vLLM on a compressed-tensors or hf export: prompt_logprobs for the windows' tokens,
then greedy decoding at batch 1.

    python vllm_check.py JOB.json RESULT.json
"""

import json
import sys
import time
from pathlib import Path

import runner


def check(job: dict, out: dict) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out["version"] = vllm.__version__
    config = json.loads((Path(job["model"]) / "config.json").read_text())
    if config.get("architectures") == ["DeciLMForCausalLM"]:  # width's per-block export:
        remote = dict(trust_remote_code=True)  # vLLM's own model, the export's config class
    elif "auto_map" in config:  # a compact hf export: its modeling file, through vLLM's
        remote = dict(trust_remote_code=True, model_impl="transformers")  # transformers backend
    else:
        remote = {}
    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job.get("dtype") or "auto",
        enforce_eager=True,
        max_model_len=job["seqlen"] + job["decode"] + 16,
        seed=0,
        **remote,
    )
    out["load_s"] = time.perf_counter() - t0
    out["loaded"] = True
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    nll, count, prefill = 0.0, 0, 0.0
    for window in job["windows"]:
        t = time.perf_counter()
        got = llm.generate([TokensPrompt(prompt_token_ids=window)], score, use_tqdm=False)
        prefill += time.perf_counter() - t
        for i, lp in enumerate(got[0].prompt_logprobs[1:], start=1):
            nll -= lp[window[i]].logprob
        count += len(window) - 1
    out.update(nll=nll, predicted=count, prefill_s=prefill)
    out["prefill_tokens"] = sum(len(w) for w in job["windows"])
    decode = SamplingParams(max_tokens=job["decode"], ignore_eos=True, temperature=0.0)
    prompt = TokensPrompt(prompt_token_ids=job["windows"][0][:16])

    def timed() -> tuple[float, int]:
        t = time.perf_counter()
        got = llm.generate([prompt], decode, use_tqdm=False)
        return time.perf_counter() - t, len(got[0].outputs[0].token_ids)

    seconds, decoded = runner.best_of(job, timed)
    out.update(decode_s=seconds, decoded=decoded)


if __name__ == "__main__":
    sys.exit(runner.run("vllm", check))
