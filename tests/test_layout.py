"""The house layout: `admin/` (control plane) sits on top of `proxy/` (data plane).

Only the composition roots, `proxy/app.py` and `proxy/cli.py`, may import
`admin`; everything else in `proxy/` must work without it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

COMPOSITION_ROOTS = {"proxy/app.py", "proxy/cli.py"}


def imported_modules(source: str) -> set[str]:
    """Every module a Python source imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def is_admin(module: str) -> bool:
    return module == "admin" or module.startswith("admin.")


def imports_admin(path: Path) -> bool:
    return any(is_admin(m) for m in imported_modules(path.read_text()))


def test_the_data_plane_does_not_import_the_control_plane() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "proxy").rglob("*.py"))
        if str(path.relative_to(REPO)) not in COMPOSITION_ROOTS and imports_admin(path)
    ]
    assert not offenders, f"only {sorted(COMPOSITION_ROOTS)} may import admin: {offenders}"


def test_the_check_sees_every_form_of_import() -> None:
    for source in (
        "import admin",
        "import admin.audit as a",
        "from admin import audit",
        "from admin.audit import record",
        "def f():\n    from admin.audit import record\n",
    ):
        assert any(is_admin(m) for m in imported_modules(source)), source
    assert not any(is_admin(m) for m in imported_modules("import administrative"))
