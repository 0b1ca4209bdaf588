"""A plan file's text as plain data: YAML (with YAML 1.2's floats) or JSON."""

from __future__ import annotations

import re

import yaml


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: `1e-5` is a number, as it is in JSON (a YAML 1.1
    float needs a point: PyYAML's own loader reads `1e-5`, and JSON's `1e-05`, as text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def loads(text: str):
    """A plan file's text (YAML or JSON) as plain data; yaml.YAMLError when it is neither."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
