"""`spectra heal OUT -o OUT2` and the healing step of `spectra apply` (a plan's `heal:`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from spectra.cli.progress import progress_bar
from spectra.data import heal
from spectra.errors import SpectraInputError
from spectra.io.devices import free_bytes
from spectra.io.model import WORK_MARGIN, footprint
from spectra.plan import format as plans


def checkpoint_folder(out: Path) -> Path:
    """Where healing into `out` keeps its resumable checkpoint (beside it, hidden)."""
    return out.parent / f".{out.name}.heal"


def run_heal(student, teacher, facts, tokenizer, config, corpus, out: Path, identity: dict):
    """Heal with a progress bar and resumable checkpoints beside `out`; returns
    (factorizations, the report's `heal` section)."""
    if tokenizer is None:
        raise SpectraInputError("healing needs the model's tokenizer, and it has none")
    folder = checkpoint_folder(out)
    with progress_bar("healing", unit="step") as progress:
        facts, result = heal.heal(
            student,
            teacher,
            facts,
            tokenizer,
            config,
            corpus=corpus,
            checkpoints=folder,
            identity=identity,
            progress=progress,
        )
    section = {
        "settings": config.to_dict(),
        "corpus": config.corpus or corpus,
        "eval": {"corpus": "builtin", "split": "eval", "tokens_per_point": config.eval_tokens},
        "ppl_before": result.curve[0]["ppl"],
        "ppl_after": result.curve[-1]["ppl"],
        **result.to_dict(),
    }
    return facts, section


def finish(out: Path) -> None:
    """After OUT is written: its checkpoint folder is no longer needed."""
    shutil.rmtree(checkpoint_folder(out), ignore_errors=True)


def cmd_heal(args) -> int:
    from compressors import io  # deferred: torch
    from compressors.opened import open_out

    src, out = Path(args.checkpoint), Path(args.out)
    if not io.is_compressed_checkpoint(src):
        raise SpectraInputError(f"{src}: not a `spectra apply` output (no manifest.json)")
    if out.exists() and not args.force:
        raise SpectraInputError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise SpectraInputError(f"{out}: directory {out.parent} does not exist")
    if out.resolve() == src.resolve():
        raise SpectraInputError(f"{out}: the source OUT itself; write the healed model elsewhere")
    try:
        report = json.loads((src / "report.json").read_text())
        plan_text = (src / "plan.yaml").read_text()
        plan_raw = plans.loads(plan_text) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SpectraInputError(f"{src}: unreadable report.json or plan.yaml ({e})") from e
    config = heal.parse(
        plan_raw.get("heal") if isinstance(plan_raw, dict) else None,
        steps=args.steps,
        lr=args.lr,
        tokens_per_step=args.tokens_per_step,
        corpus=args.corpus,
    )
    corpus = (report.get("calibration") or {}).get("corpus") or "builtin"
    if args.offload == "disk":
        raise SpectraInputError(
            "heal trains the whole model on the device: --offload disk cannot; heal where the "
            "model fits (--offload none or auto)"
        )
    model = open_out(src, args.device)  # loaded whole below, when check_memory says it fits
    dense = model.baseline(args.dtype, "none", fit=False)  # what check_memory weighs
    check_memory(model, dense)
    student, facts = model.load_with_factors()
    tokenizer = model.tokenizer()
    teacher = dense.with_run(offload="none").load()
    factors = io.shard_files(src)["factors"]
    size = sum((src / f).stat().st_size for f in factors)
    identity = {"out": str(src.resolve()), "factors_bytes": size}
    facts, section = run_heal(student, teacher, facts, tokenizer, config, corpus, out, identity)
    if "heal" in report:
        section["previous"] = report["heal"]
    report["heal"] = section
    io.save(out, student, facts, plan_text, report, tokenizer, args.dense, args.force)
    finish(out)
    if args.json:
        print(json.dumps({"out": str(out), **{k: section[k] for k in _SUMMARY}}))
    else:
        print(summary(out, section))
    return 0


def check_memory(model, dense) -> None:
    """Refuse, before any work, a heal whose models and optimizer state do not fit the
    device: the dense teacher in its working dtype, the compressed student as OUT stores
    it, and gradients plus AdamW's two moments for its factors (float32), with a margin."""
    from compressors import io

    src, device, dtype = model.source.root, model.device, dense.dtype
    teacher = footprint(dense.source, dtype)["total"]
    shards = io.shard_files(src)
    size = {
        k: sum((src / p).stat().st_size for p in v if (src / p).is_file())
        for k, v in shards.items()
    }
    need = (teacher + size["dense"] + 4 * size["factors"]) * WORK_MARGIN
    free = free_bytes(device)
    if free is not None and need > free:
        where = "GPU" if device.startswith("cuda") else "host"
        raise SpectraInputError(
            f"{src}: healing needs about {need / 1e9:.3g} GB of {where} memory (the dense "
            f"model in {dtype}, the compressed one and its optimizer state), "
            f"{free / 1e9:.3g} GB is free"
        )


_SUMMARY = ("steps", "ppl_before", "ppl_after", "seconds", "tokens_per_s", "trainable_params")


def summary(out: Path, section: dict) -> str:
    return (
        f"{out}: healed {section['steps']} steps ({section['trainable_params'] / 1e6:.2f}M "
        f"trainable parameters, {section['tokens_per_s']:,.0f} tokens/s); perplexity on "
        f"{section['eval']['tokens_per_point']} evaluation tokens {section['ppl_before']:.3f} "
        f"-> {section['ppl_after']:.3f}"
    )
