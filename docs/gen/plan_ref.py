"""The plan-format reference, rendered from the code that parses plans.

The keys come from `spectra.plan.format` (top level, calibration), from
`spectra.data.heal.HealConfig` (heal) and, per method, from the method registry
(`compressors.registry.METHODS`: config class, knobs, data use, paper). A key added
there appears here at the next `make docs`; a top-level or calibration key without a
sentence below fails the build, so none goes undocumented.

`python docs/gen/plan_ref.py` prints the Markdown of every section.
"""

from __future__ import annotations

import dataclasses
import re

# What each top-level and calibration key means: the only hand-written part. The key
# sets themselves are read from spectra.plan.format, and a key missing here is an error.
TOP = {
    "version": "format version; only `1` is known (default 1)",
    "model": "what the plan was made for (informative: another model gets one warning line)",
    "calibration": "the calibration its data-aware settings use (mapping, below)",
    "rules": "list of rules, first match wins; modules no rule matches stay dense",
    "layers": "explicit per-module settings (module name -> settings); win over rules",
    "heal": "optional distillation of the compressed model from the dense one (mapping, below)",
    "allocation": "written by `plan auto --allocate` with a rule strategy: `strategy`, its "
    "knob (`e` or `band`), the `level` found, the `metric` and its per-block values "
    "(`blocks`), and `fallback` (module -> `block mean` or `global mean`) where a score "
    "was undefined; informative, never read by `apply`",
}
CALIBRATION = {
    "corpus": "`builtin` (CPython's pydoc topics), `wikitext2` or a text file",
    "samples": "number of calibration windows",
    "seqlen": "tokens per window",
    "seed": "which windows are drawn from the corpus's calibration part",
    "sequential": "calibrate each block on the outputs of the blocks before it as already "
    "compressed (recomputed per plan), instead of the dense model's cached Grams",
}
RULE = {
    "targets": "list of exact module names or `re:` + a regex that must match the WHOLE name",
    "ignore": "optional list of names or `re:` patterns excluded from `targets`",
    "method": "a registered method (below); every other key is one of its settings",
}
LAYER = {
    "method": "a registered method (below); every other key is one of its settings",
    "shape": "`[out, in]` the entry was planned for (written by `plan auto` and the app); "
    "a module of another shape is refused",
}
DATA = {
    "never": "never reads calibration data",
    "optional": "reads the calibration only for its calibrated settings",
    "whiten": "reads the calibration when `whiten: true`",
    "required": "always reads the calibration",
}


def attribute_docs(cls) -> dict[str, str]:
    """`name: text` entries of a Google-style `Attributes:` section, continuation joined."""
    doc = cls.__doc__ or ""
    m = re.search(r"^(\s*)Attributes:\s*$", doc, re.M)
    if not m:
        return {}
    out, name, entry_indent = {}, None, 0
    for line in doc[m.end() :].splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= len(m.group(1)):  # the next section
            break
        entry = re.match(r"\s*(\w+)(?: \([^)]*\))?: (.*)", line)
        if entry and (name is None or indent <= entry_indent):
            name, entry_indent = entry.group(1), indent
            out[name] = entry.group(2).strip()
        elif name:
            out[name] += " " + line.strip()
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_yaml(f.default_factory())}`"
    return "required"


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _table(rows: dict[str, str], head: str = "key") -> str:
    lines = [f"| {head} | meaning |", "| --- | --- |"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _described(keys, text: dict[str, str], where: str) -> dict[str, str]:
    missing = sorted(set(keys) - set(text))
    if missing:
        raise KeyError(f"docs/gen/plan_ref.py: {where} key(s) {missing} have no description")
    return {k: text[k] for k in text if k in keys}


def dataclass_table(cls, knobs=()) -> str:
    """One row per field: name, type, default, range (from the knobs) and meaning."""
    docs = attribute_docs(cls)
    knobs = {k.name: k for k in knobs}
    lines = ["| setting | type | default | range | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        knob = knobs.get(f.name)
        help_ = docs.get(f.name) or (knob.help if knob else "")
        lines.append(
            f"| `{f.name}` | `{_cell(f.type)}` | {_default(f)} | {_cell(_range(knob))} "
            f"| {_cell(help_)} |"
        )
    return "\n".join(lines)


def _range(knob) -> str:
    if knob is None:
        return ""
    if getattr(knob, "choices", None):
        return ", ".join(f"`{_yaml(c)}`" for c in knob.choices)
    low, high = getattr(knob, "low", None), getattr(knob, "high", None)
    if low is None and high is None:
        return ""
    return f"{_yaml(low) if low is not None else ''}..{_yaml(high) if high is not None else ''}"


def render_keys() -> str:
    """Top level, calibration, rules, layers and heal keys."""
    from spectra.data.calibration import CalibrationSpec
    from spectra.data.heal import HealConfig
    from spectra.plan import format as plans

    calib_defaults = {f.name: _default(f) for f in dataclasses.fields(CalibrationSpec)}
    calib = _described(plans.CALIB_KEYS, CALIBRATION, "calibration")
    calib_lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    calib_lines += [
        f"| `{k}` | {calib_defaults.get(k, '')} | {_cell(v)} |" for k, v in calib.items()
    ]
    return "\n\n".join(
        [
            "### Top level",
            _table(_described(plans.TOP_KEYS, TOP, "top-level")),
            "### `calibration`",
            "\n".join(calib_lines),
            "### `rules[]`",
            _table(RULE),
            "### `layers.<module>`",
            _table(LAYER),
            "### `heal`",
            "Every key is optional.\n\n" + dataclass_table(HealConfig),
        ]
    )


def render_method(name: str) -> str:
    """One method's settings (every key a plan entry of this method may carry)."""
    from compressors.registry import METHODS

    m = METHODS[name]
    head = [m.summary[0].upper() + m.summary[1:].rstrip(".") + "."]
    if m.paper:
        head.append(f"Paper: {m.paper}.")
    head.append(f"Calibration data: {DATA.get(m.data, m.data)}.")
    return "\n\n".join([" ".join(head), dataclass_table(m.config_cls, m.knobs)])


def render_methods() -> str:
    """Every registered method, in the registry's order."""
    from compressors.registry import METHODS

    return "\n\n".join(
        f"### `{name}`\n\n{render_method(name)}\n\nMore: [{name}](compressors/{name}.md)."
        for name in METHODS
    )


def render() -> str:
    return render_keys() + "\n\n## Methods\n\n" + render_methods()


if __name__ == "__main__":
    print(render())
