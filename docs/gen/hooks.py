"""MkDocs hook: fills the generated parts of the pages at build time.

A page marks a generated part with an HTML comment, replaced here:
`<!-- gen:cli -->` (the argparse parser), `<!-- gen:plan-keys -->`,
`<!-- gen:methods -->`, `<!-- gen:method NAME -->` (the plan code and the method
registry), `<!-- gen:metrics -->` (the table of metric definitions),
`<!-- gen:bench SECTION -->` (benchmarks/results/*.json). An unknown marker, or a
registered method without its page docs/compressors/NAME.md, fails the build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # docs/gen, then the repository root

import bench_ref  # noqa: E402
import cli_ref  # noqa: E402
import metrics_ref  # noqa: E402
import plan_ref  # noqa: E402
from mkdocs.exceptions import PluginError  # noqa: E402

RESULTS = HERE.parents[1] / "benchmarks" / "results"
MARKER = re.compile(r"<!-- gen:([\w-]+)(?: ([\w:%.-]+))? -->")


def _generate(kind: str, arg: str | None) -> str:
    if kind == "cli":
        return cli_ref.render()
    if kind == "metrics":
        return metrics_ref.render()
    if kind == "plan-keys":
        return plan_ref.render_keys()
    if kind == "methods":
        return plan_ref.render_methods()
    if kind == "method" and arg:
        return plan_ref.render_method(arg)
    if kind == "bench" and arg in bench_ref.SECTIONS:
        return bench_ref.render(arg)
    raise PluginError(f"unknown docs marker gen:{kind} {arg or ''}")


def on_files(files, config):
    from mkdocs.structure.files import File

    from compressors.registry import METHODS

    for png in sorted(RESULTS.glob("*.png")):  # the benchmarks' plots, not copies of them
        files.append(File.generated(config, f"img/bench/{png.name}", abs_src_path=str(png)))

    for name in METHODS:
        if files.get_file_from_path(f"compressors/{name}.md") is None:
            raise PluginError(
                f"method {name!r} is registered but docs/compressors/{name}.md is missing"
            )
    return files


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: _generate(m.group(1), m.group(2)), markdown)
