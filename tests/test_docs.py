"""The documentation site builds with `mkdocs build --strict` (a broken link, a missing
page or image, an unknown marker or a registered method without its page fails), and
its generated references are complete: every flag of every `spectra` subcommand, every
plan key and every method setting, and every benchmark results file."""

import dataclasses
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "gen"))

import cli_ref  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def sections(page: Path, raw: bool = False) -> dict[str, str]:
    """Heading text -> the text (or HTML) under it, up to the next heading of any level."""
    parts = re.split(r"<h[1-4][^>]*>(.*?)</h[1-4]>", page.read_text())
    out = {}
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        out[text(title).replace("¶", "").strip()] = body if raw else text(body)
    return out


def first_cells(fragment: str) -> str:
    """The first column of every table row: where the reference names an argument."""
    return " ".join(text(c) for c in re.findall(r"<tr>\s*<td[^>]*>(.*?)</td>", fragment, re.S))


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_every_cli_flag_of_every_subcommand_is_documented(site):
    from spectra.cli import build_parser

    found = sections(site / "cli" / "index.html", raw=True)
    commands = list(cli_ref.commands(build_parser()))
    assert len(commands) >= 9
    for path, parser, _ in commands:
        assert path in found, f"no section for {path}"
        for name in cli_ref.option_names(parser):
            cells = first_cells(found[path])
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", cells), (
                f"{path}: {name} is not in its section of the CLI reference"
            )


def test_every_plan_key_and_method_setting_is_documented(site):
    from compressors.registry import METHODS
    from spectra.data.heal import KEYS as HEAL_KEYS
    from spectra.plan import format as plans

    found = {
        k: first_cells(v) for k, v in sections(site / "plan-format" / "index.html", True).items()
    }
    keys = {
        "Top level": plans.TOP_KEYS,
        "calibration": plans.CALIB_KEYS,
        "rules[]": {"targets", "ignore", "method"},
        "layers.<module>": {"method", "shape"},
        "heal": set(HEAL_KEYS),
    }
    for title, names in keys.items():
        for key in names:
            assert re.search(rf"\b{key}\b", found[title]), f"plan key {title}.{key} missing"
    assert list(METHODS)
    for name, method in METHODS.items():
        page = sections(site / "compressors" / name / "index.html", raw=True)
        for field in dataclasses.fields(method.config_cls):
            assert re.search(rf"\b{field.name}\b", found[name]), f"{name}.{field.name} missing"
            assert re.search(rf"\b{field.name}\b", first_cells(page["Settings"])), (
                f"{name}.{field.name} missing from docs/compressors/{name}.md"
            )


def test_every_metric_is_documented(site):
    """Once the one table of metric definitions exists, docs/analysis.md renders it with
    a `gen:metrics` marker (docs/gen/metrics_ref.py)."""
    from spectra.linalg import metrics

    if not hasattr(metrics, "METRICS"):
        pytest.skip("spectra.linalg.metrics.METRICS (issue 31, part 1) is not there yet")
    METRICS = metrics.METRICS

    cells = first_cells((site / "analysis" / "index.html").read_text())
    assert list(METRICS)
    for name in METRICS:
        assert re.search(rf"\b{name}\b", cells), f"metric {name} missing from analysis.md"


def test_every_benchmark_results_file_has_its_table(site):
    page = (site / "benchmarks" / "index.html").read_text()
    for results in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        assert f"benchmarks/results/{results.name}" in page, f"{results.name} has no table"
    assert "gen:" not in page


def test_readme_headline_results_are_the_results_files():
    """Each row of the README's results table names its file and row; the numbers match."""
    import json

    rows = re.findall(
        r"^\| .+ \| ([\d.]+) \| ([\d.]+) \| ([\d.,]+) \| `(\w+\.json)` `([^`]+)` \|$",
        (REPO / "README.md").read_text(),
        re.M,
    )
    assert len(rows) >= 4
    for kept, bits, ppl, name, key in rows:
        r = json.loads((REPO / "benchmarks" / "results" / name).read_text())[key]
        assert (kept, bits, ppl) == (
            f"{r['params_kept']:.3f}",
            f"{r['bits_per_param']:.2f}",
            f"{r['ppl']:,.2f}",
        ), f"README row {name} {key}"


def test_the_app_screenshots_are_the_browser_tests():
    """docs/img/ holds what tests/app/test_browser.py saves, and the pages use them."""
    browser = (REPO / "tests" / "app" / "test_browser.py").read_text()
    saved = set(re.findall(r'shots / "([\w-]+\.png)"', browser))
    used = set(re.findall(r"img/([\w-]+\.png)", (REPO / "docs" / "app.md").read_text()))
    assert used and used <= saved


def test_the_layout_page_names_every_file_and_only_files_that_exist():
    """docs/layout.md is the tree's map: every module of the packages is named there
    (by file name, in its folder's entry), and every file it names exists."""
    text = (REPO / "docs" / "layout.md").read_text()
    block = text.split("```")[1]
    named = set(re.findall(r"\b([a-z_][a-z0-9_]*\.py)\b", block))
    files = [
        p
        for pkg in ("spectra", "compressors", "app")
        for p in (REPO / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    present = {p.name for p in files} | {p.name for p in (REPO / "docs" / "gen").glob("*.py")}
    missing = sorted({p.name for p in files if p.name != "__init__.py"} - named)
    assert not missing, f"docs/layout.md does not name: {', '.join(missing)}"
    gone = sorted(named - present)
    assert not gone, f"docs/layout.md names files that do not exist: {', '.join(gone)}"
