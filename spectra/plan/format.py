"""Compression plans: YAML/JSON in, validated typed objects, resolved per module.

A plan has `rules` (first match wins; `targets` and `ignore` are exact module names
or `re:` + a regex that must match the whole name) and explicit `layers` entries,
which win over rules. Every error is a PlanError whose one-line message names the
field, the value and, once a model is known, the module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spectra.data.calibration import CalibrationSpec
from spectra.data.heal import HealConfig, HealError
from spectra.data.heal import parse as heal_settings
from spectra.errors import SpectraInputError
from spectra.plan import block_plan
from spectra.plan.text import loads

PLAN_VERSION = 1
TOP_KEYS = {"version", "model", "calibration", "rules", "layers", "heal", "allocation"}
CALIB_KEYS = {"corpus", "samples", "seqlen", "seed", "sequential"}
NOT_TARGETABLE = {"embed"}  # embeddings are lookups, not linear layers


class PlanError(SpectraInputError):
    """An invalid plan, or a plan that does not fit the model."""


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern | None

    def matches(self, name: str) -> bool:
        return bool(self.regex.fullmatch(name)) if self.regex else name == self.text


@dataclass(frozen=True)
class Rule:
    where: str  # "rules[i]"
    targets: tuple[Pattern, ...]
    ignore: tuple[Pattern, ...]
    config: object

    def matches(self, name: str) -> bool:
        return any(p.matches(name) for p in self.targets) and not any(
            p.matches(name) for p in self.ignore
        )


@dataclass(frozen=True)
class Plan:
    version: int = PLAN_VERSION
    model: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    rules: tuple[Rule, ...] = ()
    layers: dict = field(default_factory=dict)  # module name -> config
    shapes: dict = field(default_factory=dict)  # module name -> (out, in) it was planned for
    heal: HealConfig | None = None  # distillation after compression (spectra.data.heal)
    # what `plan auto --allocate` recorded (strategy, knobs, per-block scores, fallbacks;
    # spectra.plan.strategies): informative, never read by apply
    allocation: dict | None = None


@dataclass
class Entry:
    """One module of the model under a plan."""

    name: str
    shape: tuple[int, int]
    role: str
    block: int | None
    source: str | None  # "rules[i]", "layers", or None (stays dense)
    config: object | None
    group: str | None = None  # a grouped method's (compressors.registry.groups): the parent
    params_after: int = 0
    bits_after: int = 0
    width: object | None = None  # the block's block-scope setting (spectra.plan.block_plan)
    width_source: str | None = None
    shape_after: tuple[int, int] | None = None  # (out, in) once `width` is applied; (0, 0): gone

    @property
    def removed(self) -> bool:
        """Whether the block's setting removes this module."""
        return self.shape_after == (0, 0)

    @property
    def params_before(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_before(self) -> int:
        from compressors.base import DENSE_BITS  # deferred: torch (`spectra --help`)

        return DENSE_BITS * self.params_before


def load(path: str | Path) -> Plan:
    """Read and validate a plan file (YAML or JSON)."""
    path = Path(path)
    try:
        data = loads(path.read_text())
    except OSError as e:
        raise PlanError(f"{path}: cannot read plan ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from e
    return parse(data)


def parse(data) -> Plan:
    """Validate a plan given as plain data."""
    from compressors.registry import make_config  # deferred: torch (`spectra --help`)

    if not isinstance(data, dict):
        raise PlanError("plan: must be a mapping with rules and/or layers")
    for k in data:
        if k not in TOP_KEYS:
            raise PlanError(f"plan: unknown key {k!r} (known: {', '.join(sorted(TOP_KEYS))})")
    version = data.get("version", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise PlanError(f"plan: version={version!r}: only version {PLAN_VERSION} is known")
    calib = _calibration(data.get("calibration") or {})
    rules = []
    for i, raw in enumerate(_as_list(data.get("rules"), "rules")):
        where = f"rules[{i}]"
        if not isinstance(raw, dict):
            raise PlanError(f"{where}: must be a mapping")
        raw = dict(raw)
        targets = _patterns(raw.pop("targets", None), f"{where}.targets", required=True)
        ignore = _patterns(raw.pop("ignore", None), f"{where}.ignore", required=False)
        rules.append(Rule(where, targets, ignore, _config(make_config, raw, where)))
    layers = {}
    raw_layers = data.get("layers") or {}
    if not isinstance(raw_layers, dict):
        raise PlanError("layers: must be a mapping of module name to settings")
    shapes = {}
    for name, raw in raw_layers.items():
        if not isinstance(raw, dict):
            raise PlanError(f"layers.{name}: must be a mapping with a method")
        raw = dict(raw)
        if "shape" in raw:
            shapes[str(name)] = _shape(raw.pop("shape"), f"layers.{name}.shape")
        layers[str(name)] = _config(make_config, raw, f"layers.{name}")
    model = data.get("model")
    model = None if model is None else str(model)
    try:
        heal = None if data.get("heal") is None else heal_settings(data["heal"])
    except HealError as e:
        raise PlanError(str(e)) from e
    allocation = data.get("allocation")
    if allocation is not None and not isinstance(allocation, dict):
        raise PlanError("allocation: must be a mapping (what plan auto --allocate recorded)")
    return Plan(version, model, calib, tuple(rules), layers, shapes, heal, allocation)


def _shape(value, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise PlanError(f"{where}={value!r}: must be [out, in], two positive integers")
    return (value[0], value[1])


def to_dict(plan: Plan) -> dict:
    """Plain data that `parse` turns back into an equal plan."""
    from compressors.base import config_to_dict  # deferred: torch (`spectra --help`)

    out: dict = {"version": plan.version}
    if plan.model is not None:
        out["model"] = plan.model
    out["calibration"] = dict(vars(plan.calibration))
    if plan.rules:
        out["rules"] = [
            {
                "targets": [p.text for p in r.targets],
                **({"ignore": [p.text for p in r.ignore]} if r.ignore else {}),
                **config_to_dict(r.config),
            }
            for r in plan.rules
        ]
    if plan.layers:
        out["layers"] = {
            k: {
                **config_to_dict(c),
                **({"shape": list(plan.shapes[k])} if k in plan.shapes else {}),
            }
            for k, c in plan.layers.items()
        }
    if plan.heal is not None:
        out["heal"] = plan.heal.to_dict()
    if plan.allocation is not None:
        out["allocation"] = plan.allocation
    return out


def dumps(plan: Plan, fmt: str = "yaml") -> str:
    data = to_dict(plan)
    return json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False)


def resolve(plan: Plan, modules, rank_of=None, heads=None) -> list[Entry]:
    """Entries for `modules` (objects with name, shape, role, block): who matches what,
    and costs.

    `rank_of(name, energy)` gives the rank that keeps `energy` for energy-based settings;
    `heads`: (attention heads, key/value heads) of the model (block_plan.heads_of), which
    a width `kv_heads` is costed with. Raises PlanError for layers entries naming unknown
    modules or blocks, rules that match nothing, and settings impossible for a module's
    or a block's shape.
    """
    from compressors.registry import is_block_config  # deferred: torch (`spectra --help`)

    shapes = {m.name: tuple(m.shape) for m in modules}
    module_rules = [r for r in plan.rules if not is_block_config(r.config)]
    for name, config in plan.layers.items():
        if is_block_config(config):
            continue  # named a block: block_plan.assign checks it
        if name not in shapes:
            raise PlanError(f"layers.{name}: no such module in this model")
        planned = plan.shapes.get(name)
        if planned is not None and planned != shapes[name]:
            raise PlanError(
                f"layers.{name}: planned for shape {planned[0]}x{planned[1]}, this model's "
                f"is {shapes[name][0]}x{shapes[name][1]} (a plan made for another model?)"
            )
    used = {r.where: 0 for r in module_rules}
    entries = []
    for m in modules:
        entry = Entry(m.name, tuple(m.shape), m.role, m.block, None, None)
        if m.role not in NOT_TARGETABLE:
            if m.name in plan.layers:
                entry.source, entry.config = "layers", plan.layers[m.name]
            else:
                for rule in module_rules:
                    if rule.matches(m.name):
                        entry.source, entry.config = rule.where, rule.config
                        used[rule.where] += 1
                        break
        entries.append(entry)
    for where, count in used.items():
        if count == 0:
            rule = next(r for r in plan.rules if r.where == where)
            targets = [p.text for p in rule.targets]
            raise PlanError(f"{where}.targets: {targets} match no module of this model")
    block_plan.assign(plan, entries, heads, _raise)
    _cost(entries, rank_of)
    return entries


def _raise(message: str):
    raise PlanError(message)


def totals(entries: list[Entry]) -> dict:
    """Budget of resolved entries over the linear modules (embeddings excluded)."""
    linear = [e for e in entries if e.role not in NOT_TARGETABLE]
    out = dict(
        modules=len(linear),
        compressed=sum(e.config is not None or e.width is not None for e in linear),
        params_before=sum(e.params_before for e in linear),
        params_after=sum(e.params_after for e in linear),
        bits_before=sum(e.bits_before for e in linear),
        bits_after=sum(e.bits_after for e in linear),
    )
    before = max(out["params_before"], 1)
    out["params_ratio"] = out["params_after"] / before
    out["bits_per_param"] = out["bits_after"] / before
    out["size_mb_after"] = out["bits_after"] / 8 / 2**20
    return out


def _cost(entries, rank_of):
    from compressors.base import DENSE_BITS  # deferred: torch (`spectra --help`)
    from compressors.registry import METHODS, groups

    together = []
    for e in entries:
        if e.removed:
            e.config = None  # nothing of it is left to compress
    for unit in groups(entries, lambda e: e.config and e.config.method, lambda e: e.source):
        if unit[0].removed:
            unit[0].params_after = unit[0].bits_after = 0
            continue
        if unit[0].config is not None and METHODS[unit[0].config.method].grouped:
            for e in unit:
                e.group = e.name.rsplit(".", 1)[0]
            together.append(unit)
            continue
        e = unit[0]
        m, n = e.shape_after or e.shape
        if e.config is None:
            e.params_after, e.bits_after = m * n, DENSE_BITS * m * n
        else:
            _check(e, e.config.check_shape, m, n)
            energy = getattr(e.config, "energy", None)  # sized from the spectrum
            if energy is not None and getattr(e.config, "rank", None) is None:
                if rank_of is None:
                    raise PlanError(
                        f"{e.name}: {e.config.method} energy={energy} needs the "
                        "model's spectra to be costed"
                    )
                rank = min(rank_of(e.name, energy), m, n)  # a narrowed module's shape caps it
                e.params_after, e.bits_after = e.config.cost(m, n, rank)
            else:
                e.params_after, e.bits_after = e.config.cost(m, n)
    for members in together:
        parent = members[0].name.rsplit(".", 1)[0]
        config = members[0].config
        now = [x.shape_after or x.shape for x in members]
        n = now[0][1]
        if any(s[1] != n for s in now):
            shapes = {x.name: s for x, s in zip(members, now, strict=True)}
            raise PlanError(
                f"{parent}: {config.method} members must read the same input size, got {shapes}"
            )
        total_m = sum(s[0] for s in now)
        _check(members[0], config.check_shape, total_m, n)
        costs = METHODS[config.method].member_costs(config, now)
        for x, (p, b) in zip(members, costs, strict=True):
            x.params_after, x.bits_after = p, b


def _check(entry, fn, *args):
    try:
        fn(*args)
    except SpectraInputError as e:
        raise PlanError(f"{entry.name}: {e}") from e


def _calibration(raw) -> CalibrationSpec:
    if not isinstance(raw, dict):
        raise PlanError("calibration: must be a mapping")
    for k in raw:
        if k not in CALIB_KEYS:
            raise PlanError(
                f"calibration: unknown key {k!r} (known: {', '.join(sorted(CALIB_KEYS))})"
            )
    spec = CalibrationSpec(**raw)
    for k in ("samples", "seqlen"):
        v = getattr(spec, k)
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"calibration.{k}={v!r}: must be an integer >= 1")
    if not isinstance(spec.sequential, bool):
        raise PlanError(f"calibration.sequential={spec.sequential!r}: must be true or false")
    return spec


def _as_list(value, where):
    if value is None:
        return []
    if not isinstance(value, list):
        raise PlanError(f"{where}: must be a list")
    return value


def _patterns(value, where, required: bool) -> tuple[Pattern, ...]:
    if value is None or value == []:
        if required:
            raise PlanError(f"{where}: at least one target is required")
        return ()
    if isinstance(value, str):
        value = [value]
    out = []
    for text in _as_list(value, where):
        if not isinstance(text, str):
            raise PlanError(f"{where}: {text!r} is not a string")
        regex = None
        if text.startswith("re:"):
            try:
                regex = re.compile(text[3:])
            except re.error as e:
                raise PlanError(f"{where}: {text!r} does not compile ({e})") from e
        out.append(Pattern(text, regex))
    return tuple(out)


def _config(make_config, raw: dict, where: str):
    method = raw.pop("method", None)
    if method is None:
        raise PlanError(f"{where}.method: missing")
    try:
        return make_config(method, **raw)
    except SpectraInputError as e:
        raise PlanError(f"{where}: {e}") from e
