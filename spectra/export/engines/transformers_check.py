"""transformers on an hf or compressed-tensors export, in a process that never imports
spectra: its logits over the windows, then greedy decoding at batch 1.

    python transformers_check.py JOB.json RESULT.json
"""

import sys
import time

import runner


def check(job: dict, out: dict) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    out["version"] = transformers.__version__
    torch.set_num_threads(job["threads"])
    out["runtime_rss_gb"] = runner.rss_gb()  # torch and transformers, before the model
    t0 = time.perf_counter()
    dtype = getattr(torch, job["dtype"]) if job.get("dtype") else "auto"
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=dtype, trust_remote_code=True
    ).eval()
    out["load_s"] = time.perf_counter() - t0
    out["loaded"] = True
    tensors = [*model.parameters(), *model.buffers()]
    out["weights_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    nll, count, prefill = 0.0, 0, 0.0
    with torch.no_grad():
        for window in job["windows"]:
            x = torch.tensor([window])
            t = time.perf_counter()
            logits = model(x, use_cache=False).logits[0, :-1].double()
            prefill += time.perf_counter() - t
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(window) - 1
        out.update(nll=nll, predicted=count, prefill_s=prefill)
        out["prefill_tokens"] = sum(len(w) for w in job["windows"])
        prompt = torch.tensor([job["windows"][0][:16]])

        def decode() -> tuple[float, int]:
            t = time.perf_counter()
            got = model.generate(
                prompt,
                max_new_tokens=job["decode"],
                min_new_tokens=job["decode"],
                do_sample=False,
            )
            return time.perf_counter() - t, got.shape[1] - prompt.shape[1]

        seconds, decoded = runner.best_of(job, decode)
        out.update(decode_s=seconds, decoded=decoded)


if __name__ == "__main__":
    sys.exit(runner.run("transformers", check))
