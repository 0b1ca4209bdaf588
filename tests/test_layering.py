"""The layers point one way: numerics and weight I/O, then compressors, then planning
and data, then the interfaces (CLI, app); no cycle between files; no streamlit below
the app. Every import counts, inside functions too."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("spectra", "compressors", "app")

# module (or package prefix) -> layer; the longest matching prefix decides
LAYERS = {
    "spectra.errors": 1,
    "spectra.io": 1,  # tensors, gguf_file, models, roles, cache
    "spectra.linalg": 1,  # svd, metrics, mpo, scratch, parallel
    "spectra.analysis": 1,
    "spectra.rows": 1,  # one matrix's analysis row and its cache
    "spectra.background": 1,  # the analysis as a background job, row by row
    "compressors": 2,
    "spectra.plan": 3,  # format, edit, candidates, allocate, auto, sensitivity
    "spectra.data": 3,  # perplexity, calibration, memory
    "spectra.preview": 3,
    "spectra.preview_width": 3,
    "spectra.export": 3,  # compressed-tensors, gguf and hf exports of an apply output
    "spectra": 4,  # the package root (load_compressed) and __main__
    "spectra.cli": 4,
    "app": 4,
}
NAMES = {1: "numerics and weight I/O", 2: "compressors", 3: "planning and data", 4: "interfaces"}


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            out[name] = f
    return out


def imports(path: Path, me: str, known) -> set[str]:
    """The project modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import (the project imports absolutely)"
            base = node.module
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != me}


def layer_of(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({NAMES[layer_of(m)]}) imports {d} ({NAMES[layer_of(d)]})"
        for m, deps in graph.items()
        for d in deps
        if layer_of(d) > layer_of(m)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {m: imports(f, m, known) for m, f in known.items()}


def test_imports_point_down_and_never_in_a_circle():
    graph = import_graph(REPO)
    assert len(graph) > 40
    assert upward(graph) == []
    assert cycles(graph) == []


def test_every_module_has_a_layer():
    for name in modules(REPO):
        assert layer_of(name) in NAMES, name


def _tree(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize("where", ["top", "function"])
def test_the_check_catches_a_planted_upward_import(tmp_path, where):
    body = (
        "from spectra.plan import resolve\n"
        if where == "top"
        else "def f():\n    from spectra import plan\n"
    )
    root = _tree(tmp_path, {"compressors/apply.py": body, "spectra/plan.py": "x = 1\n"})
    assert upward(import_graph(root)) == [
        "compressors.apply (compressors) imports spectra.plan (planning and data)"
    ]


def test_the_check_catches_a_planted_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            "spectra/cli.py": "from spectra.cli_compress import cmd\n",
            "spectra/cli_compress.py": "def cmd():\n    from spectra.cli import check\n",
        },
    )
    assert cycles(import_graph(root)) == [["spectra.cli", "spectra.cli_compress"]]


def test_library_never_imports_streamlit_or_app():
    for name, f in modules(REPO).items():
        if layer_of(name) == 4 and name.startswith("app"):
            continue
        tree = ast.parse(f.read_text())
        roots = {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        roots |= {
            n.module.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and not n.level
        }
        assert not roots & {"streamlit", "app"}, (
            f"{f.relative_to(REPO)} imports {roots & {'streamlit', 'app'}}"
        )


def private_uses(root: Path) -> list[str]:
    """`module: other.name` for every underscore name a module takes from a module of
    another top-level package (`from m import _x`, or `m._x` on an imported module)."""
    known = modules(root)
    found = []
    for me, f in known.items():
        tree = ast.parse(f.read_text())
        bound = {}  # local name -> project module
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                bound |= {a.asname or a.name: a.name for a in n.names if a.name in known}
            elif isinstance(n, ast.ImportFrom) and n.module:
                for a in n.names:
                    if f"{n.module}.{a.name}" in known:
                        bound[a.asname or a.name] = f"{n.module}.{a.name}"
                    elif n.module in known and _private(a.name):
                        found.append((me, n.module, a.name))
        for n in ast.walk(tree):
            on_module = isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            if on_module and n.value.id in bound and _private(n.attr):
                found.append((me, bound[n.value.id], n.attr))
    return sorted(
        f"{me}: {other}.{name}"
        for me, other, name in found
        if me.split(".")[0] != other.split(".")[0]
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_package_uses_a_private_name_of_another():
    assert private_uses(REPO) == []


@pytest.mark.parametrize("how", ["from", "attribute"])
def test_the_check_catches_a_planted_private_use(tmp_path, how):
    body = (
        "from compressors.apply import _stand_in\n"
        if how == "from"
        else "from compressors import apply as applying\nx = applying._stand_in\n"
    )
    root = _tree(tmp_path, {"spectra/preview.py": body, "compressors/apply.py": "x = 1\n"})
    assert private_uses(root) == ["spectra.preview: compressors.apply._stand_in"]


def import_names(root: Path, dirs=("spectra", "compressors", "app", "tests", "benchmarks")):
    """{project module: the names it is bound to where `from pkg import module [as x]` or
    `import pkg.module as x` imports it}."""
    known = set(modules(root))
    names: dict[str, set[str]] = {}
    for d in dirs:
        for f in (root / d).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    for a in node.names:
                        if f"{node.module}.{a.name}" in known:
                            names.setdefault(f"{node.module}.{a.name}", set()).add(
                                a.asname or a.name
                            )
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name in known and a.asname:
                            names.setdefault(a.name, set()).add(a.asname)
    return names


def test_every_module_has_one_import_name():
    several = {m: sorted(n) for m, n in import_names(REPO).items() if len(n) > 1}
    assert not several, f"modules imported under several names: {several}"


def test_the_name_check_catches_a_second_alias(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "spectra" / "fmt.py").write_text("")
    (tmp_path / "compressors" / "a.py").write_text("from spectra import fmt as plans\n")
    (tmp_path / "app" / "b.py").write_text("from spectra import fmt as plan_mod\n")
    assert import_names(tmp_path, PACKAGES)["spectra.fmt"] == {"plans", "plan_mod"}
