"""The library runs headless: nothing under spectra/ or compressors/ imports streamlit."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_streamlit_or_app():
    files = list((REPO / "spectra").rglob("*.py")) + list((REPO / "compressors").rglob("*.py"))
    assert len(files) > 5
    for f in files:
        bad = imported_modules(f) & {"streamlit", "app"}
        assert not bad, f"{f.relative_to(REPO)} imports {bad}"


def test_the_check_itself_sees_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from streamlit import session_state\n")
    assert "streamlit" in imported_modules(f)
