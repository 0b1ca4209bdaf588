"""The `spectra` parser: every subcommand, its flags and their help, built from the
registries where they name methods (the help of `plan auto --method` is made when shown)."""

from __future__ import annotations

import argparse
from pathlib import Path

from spectra.cli.analyze import cmd_analyze
from spectra.cli.app import cmd_app
from spectra.cli.apply import cmd_apply
from spectra.cli.calibrate import cmd_calibrate
from spectra.cli.evaluate import cmd_eval
from spectra.cli.export import add_export_parsers
from spectra.cli.heal import cmd_heal
from spectra.cli.plan import cmd_plan_auto, cmd_plan_show
from spectra.cli.sensitivity import cmd_sensitivity
from spectra.data.calibration import DEFAULT_SEQLEN, DEFAULT_TOKENS
from spectra.errors import SpectraInputError
from spectra.plan import defaults


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise SpectraInputError(message)


class _Deferred(str):
    """A help text made when help is shown: the method registry imports torch, which
    `spectra --help` and every other command's parsing should not wait for."""

    def __new__(cls, make):
        self = super().__new__(cls, "(computed)")
        self.make = make
        return self

    def __mod__(self, params):
        return self.make() % params

    def strip(self, chars=None):
        return self.make().strip(chars)


class _Registered:
    """The names of a registry, read when argparse checks a value or shows them (the
    registries import torch; parsing another command should not wait for it)."""

    def __init__(self, names):
        self.names = names

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __iter__(self):
        return iter(self.names())


def _kinds():
    from spectra.plan.sensitivity import KINDS  # deferred: torch

    return tuple(KINDS)


def _method_help() -> str:
    from compressors.registry import mixed
    from spectra.plan.grid import auto_methods  # deferred: torch

    methods = auto_methods()
    return f"one of {', '.join(methods[:-1])} or {methods[-1]} (mixed: {', '.join(mixed())})"


def _ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run the work as Ray tasks: auto (default: the cluster RAY_ADDRESS names, "
        "else a local one) or a cluster address (needs the distributed extra)",
    )


def _run_options(p: argparse.ArgumentParser, offload_help: str = "", dtype_help: str = "") -> None:
    """--offload and --dtype: how a command that runs the model holds it (the choices
    are spectra.io.model's OFFLOADS and DTYPES, written here to keep --help light)."""
    p.add_argument(
        "--offload",
        default="auto",
        choices=("auto", "none", "disk"),
        help=offload_help
        or "none: every weight resident; disk: weights stay on disk, one block at a time "
        "is materialised; auto (default): resident when it takes at most half the free memory",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help=dtype_help
        or "working dtype (auto: the checkpoint's own, e.g. bfloat16; float32 for a GGUF)",
    )


MODEL_HELP = "demo, a model directory, a .safetensors/.gguf file or a hub id"
DEVICE_HELP = "auto (cuda when present), cpu or cuda"
JSON_HELP = "print machine-readable results on stdout"
PLAN_HELP = "plan file (.yaml or .json)"

EXAMPLES = """examples:
  spectra analyze demo
  spectra plan auto demo -o plan.yaml
  spectra app demo"""


def build_parser() -> argparse.ArgumentParser:
    from spectra import __version__

    p = _Parser(
        prog="spectra",
        description="Weight spectra of transformer language models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"spectra {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("analyze", help="spectra, metrics and MPO bond profiles of every matrix")
    a.add_argument("model", help=MODEL_HELP)
    a.add_argument("--device", default="auto", help=DEVICE_HELP)
    a.add_argument("--cores", type=int, default=3, help="MPO cores K for bond profiles (2..6)")
    a.add_argument(
        "--no-mpo",
        action="store_true",
        help="skip the MPO bond profiles (spectra and metrics only)",
    )
    a.add_argument(
        "--calib",
        action="store_true",
        help="add activation-aware spectra (calib_sigma, calib_* metrics) from the "
        "calibration cache (spectra calibrate's defaults; computed when missing)",
    )
    a.add_argument("--out", type=Path, help="write the full table (.parquet, .csv or .json)")
    a.add_argument("--json", action="store_true", help=JSON_HELP)
    a.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    _ray_option(a)
    a.set_defaults(func=cmd_analyze)

    cal = sub.add_parser(
        "calibrate", help="cache H = X^T X of every linear module's calibration inputs"
    )
    cal.add_argument("model", help=MODEL_HELP)
    cal.add_argument("--corpus", default="builtin", help="builtin, wikitext2 or a text file")
    cal.add_argument("--tokens", type=int, help=f"calibration tokens (default {DEFAULT_TOKENS:,})")
    cal.add_argument(
        "--seqlen",
        type=int,
        help=f"tokens per window (default {DEFAULT_SEQLEN}, or the model's context if shorter)",
    )
    cal.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    cal.add_argument("--device", default="auto", help=DEVICE_HELP)
    _run_options(cal)
    cal.add_argument("--no-cache", action="store_true", help="recompute even when cached")
    cal.add_argument("--json", action="store_true", help=JSON_HELP)
    _ray_option(cal)
    cal.set_defaults(func=cmd_calibrate)

    se = sub.add_parser(
        "sensitivity",
        help="per-module loss sensitivity, and which spectral metric predicts it",
    )
    se.add_argument("model", help=MODEL_HELP)
    se.add_argument(
        "--kind",
        default="fisher",
        choices=_Registered(_kinds),
        help="the loss increase of compressing each module alone to the rank that keeps half "
        "its parameters: fisher (default: predicted by the diagonal Fisher, one gradient "
        "pass), ppl (measured, one forward pass per module) or calib (the calibrated loss "
        "estimate of plan auto's calib damage)",
    )
    se.add_argument(
        "--tokens",
        type=int,
        help="tokens (fisher 4096, ppl 512; calib: the newest cached calibration, else "
        f"{defaults.FIRST_CALIB_TOKENS:,})",
    )
    se.add_argument(
        "--correlate",
        action="store_true",
        help="Spearman rho of each spectral metric (alpha, FARMS alpha, stable rank, erank, "
        "energy ranks; calib_* ones where a calibration exists) with the sensitivity, "
        "overall and per role, ranked by |rho|",
    )
    se.add_argument("--out", type=Path, help="write the per-module table (.parquet, .csv or .json)")
    se.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    se.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    se.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    _run_options(se)
    se.set_defaults(func=cmd_sensitivity)

    plan = sub.add_parser("plan", help="compression plans")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True, parser_class=_Parser)
    show = plan_sub.add_parser("show", help="the plan resolved against a model, module by module")
    show.add_argument("plan", type=Path, help=PLAN_HELP)
    show.add_argument(
        "--model", required=True, help=f"the model it is resolved against: {MODEL_HELP}"
    )
    show.add_argument("--json", action="store_true", help="print the resolved table as JSON")
    show.set_defaults(func=cmd_plan_show)

    auto = plan_sub.add_parser(
        "auto", help="choose every module's setting for a global budget (explicit layers plan)"
    )
    auto.add_argument("model", help=MODEL_HELP)
    auto.add_argument(
        "--method",
        default=defaults.DEFAULT_METHOD,
        help=_Deferred(lambda: f"{_method_help()} (default {defaults.DEFAULT_METHOD})"),
        metavar="METHOD",
    )
    budget = auto.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-params",
        type=float,
        help="fraction of linear parameters kept (default "
        f"{defaults.DEFAULT_TARGET_PARAMS} when no budget is given)",
    )
    budget.add_argument("--target-bits", type=float, help="average bits per linear parameter")
    auto.add_argument(
        "--sensitivity",
        default="auto",
        help="damage: none (weight error), fisher, ppl, calib (calibration-weighted error, "
        "calibrated methods), or auto (default: calib on the model's cached calibration, "
        f"else on a {defaults.FIRST_CALIB_TOKENS:,}-token one computed first; none, with a "
        "warning, for a model that cannot be calibrated)",
    )
    auto.add_argument(
        "--tokens", type=int, help="sensitivity tokens (fisher 4096, calib 32768, ppl 512)"
    )
    auto.add_argument(
        "--allocate",
        default="loss",
        metavar="STRATEGY",
        help="who gives up how much: loss (default: least predicted damage), uniform, "
        "alpha (AlphaPruning: blocks with higher mean alpha compressed more), farms (the "
        "same on fixed-aspect-ratio alpha) or owl (blocks with more Wanda outliers "
        "compressed less; needs a calibration); every one meets the budget",
    )
    auto.add_argument(
        "--alpha-e",
        type=float,
        metavar="E",
        help="alpha and farms: the band [1-E, 1+E] x target, in (0, 1) (default 0.2, "
        "0.3 for data-free pruning)",
    )
    auto.add_argument(
        "--owl-band",
        type=float,
        default=0.08,
        metavar="BAND",
        help="owl: the band target +- BAND, in (0, 1) (default 0.08)",
    )
    auto.add_argument(
        "--multiple",
        type=int,
        default=None,
        metavar="N",
        help="--method width: MLP widths in multiples of N neurons (default 32, what GGUF's "
        "quantized rows need; llama.cpp's Nemotron-NAS converter rounds to 256)",
    )
    auto.add_argument(
        "--uniform",
        action="store_true",
        help="--method width: one width in every block (the widest multiple the budget "
        "allows; the allocation's own widths are recorded beside it), so that the export "
        "is the checkpoint's own architecture, which every engine and format runs",
    )
    auto.add_argument(
        "--no-anchor",
        action="store_true",
        help="--method width --allocate loss: allocate on the second-order curves alone, "
        "without measuring each block's KL at the uniform width (four forward passes of "
        "the model per block; a model streamed from disk never measures it)",
    )
    auto.add_argument("--keep-dense", help="full-match regex of modules left dense")
    auto.add_argument(
        "--min-rank",
        action="append",
        metavar="ROLE=FRACTION",
        help="rank floor as a fraction of min(m, n), e.g. down=0.5 (repeatable)",
    )
    auto.add_argument(
        "--min-bits",
        action="append",
        metavar="ROLE=BITS",
        help="bits floor for quant and caldera, e.g. down=4 (repeatable)",
    )
    auto.add_argument(
        "--preset",
        help="llama.cpp: quant grids GGUF keeps with their own codes (symmetric 4 and "
        "8 bits in groups of 32: Q4_0, Q8_0)",
    )
    auto.add_argument("--device", default="auto", help=DEVICE_HELP)
    _run_options(auto)  # how fisher, ppl and calib hold the model
    auto.add_argument("-o", "--out", type=Path, required=True, help="plan file (.yaml or .json)")
    auto.add_argument("--json", action="store_true", help=JSON_HELP)
    auto.set_defaults(func=cmd_plan_auto)

    ap = sub.add_parser("apply", help="compress a model with a plan into OUT")
    ap.add_argument("plan", type=Path, help=PLAN_HELP)
    ap.add_argument("--model", required=True, help=f"the model to compress: {MODEL_HELP}")
    ap.add_argument(
        "-o", "--out", type=Path, required=True, help="output directory (written atomically)"
    )
    ap.add_argument("--dense", action="store_true", help="also write OUT/dense, a plain checkpoint")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    _run_options(ap)
    ap.add_argument("--json", action="store_true", help=JSON_HELP)
    _ray_option(ap)
    ap.set_defaults(func=cmd_apply)

    he = sub.add_parser(
        "heal", help="distil an apply output's compact parameters from its dense model"
    )
    he.add_argument("checkpoint", metavar="OUT", help="a `spectra apply` output")
    he.add_argument("-o", "--out", type=Path, required=True, help="where the healed model goes")
    he.add_argument("--steps", type=int, help="optimizer steps (default: the plan's heal, or 100)")
    he.add_argument("--lr", type=float, help="peak learning rate (default 1e-5)")
    he.add_argument(
        "--tokens-per-step", type=int, help="calibration tokens per step (default 2048)"
    )
    he.add_argument(
        "--corpus", help="builtin or a text file (default: the plan's calibration corpus)"
    )
    he.add_argument("--dense", action="store_true", help="also write OUT2/dense (plain weights)")
    he.add_argument("--force", action="store_true", help="replace an existing OUT2")
    he.add_argument("--device", default="auto", help=DEVICE_HELP)
    _run_options(
        he,
        "heal trains the whole model on the device: auto and none hold it resident "
        "(refused, before any work, where it does not fit); disk is refused",
        "working dtype of the dense teacher (auto: the checkpoint's own); the "
        "compressed student trains in float32",
    )
    he.add_argument("--json", action="store_true", help=JSON_HELP)
    he.set_defaults(func=cmd_heal)

    add_export_parsers(sub, JSON_HELP)

    ev = sub.add_parser("eval", help="perplexity on a corpus (GPTQ / SVD-LLM convention)")
    ev.add_argument("model", help=f"{MODEL_HELP}, or a `spectra apply` output")
    ev.add_argument("--corpus", default="builtin", help="builtin, wikitext2 or a text file")
    ev.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    _run_options(ev)
    ev.add_argument("--json", action="store_true", help=JSON_HELP)
    ev.add_argument(
        "--no-baseline",
        action="store_true",
        help="for a compressed OUT: skip the dense model's perplexity",
    )
    ev.set_defaults(func=cmd_eval)

    app = sub.add_parser("app", help="open the Streamlit app")
    app.add_argument("model", nargs="?", default="demo", help=f"{MODEL_HELP} (default demo)")
    app.add_argument("--port", type=int, default=8501, help="the app's port (default 8501)")
    _run_options(
        app,
        dtype_help="working dtype of previews, sensitivities and calibration "
        "(auto: the checkpoint's own)",
    )
    app.set_defaults(func=cmd_app)
    return p
