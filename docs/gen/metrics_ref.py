"""The table of per-matrix metrics, rendered from `spectra.linalg.metrics.METRICS`,
the one table of metric definitions that the analysis, the CLI summary and the app
read. `python docs/gen/metrics_ref.py` prints the Markdown."""

from __future__ import annotations


def render() -> str:
    from spectra.linalg.metrics import METRICS

    lines = ["| column | label | definition | spectrum |", "| --- | --- | --- | --- |"]
    for name, m in METRICS.items():
        formula = str(m.formula).replace("|", "\\|")
        kind = "activation-aware (W L)" if m.aware else "weights"
        lines.append(f"| `{name}` | {m.label} | {formula} | {kind} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
