"""Dependencies point one way, from the edge to the core (DESIGN §2)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "runtime"

CORE = {
    "errors",
    "settings",
    "tenancy",
    "tenants",
    "protocol",
    "models",
    "envelopes",
    "turn",
    "auth",
    "mediatypes",
    "observability",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("imhub")}


def _modules(folder: Path) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imports(p) for p in folder.rglob("*.py")}


def test_nothing_in_the_runtime_imports_the_operator() -> None:
    for path, imports in _modules(RUNTIME).items():
        assert not any(i.startswith("imhub.operator") for i in imports), path


def test_services_never_import_adapters_or_the_gateway() -> None:
    for path, imports in _modules(RUNTIME / "services").items():
        bad = [
            i
            for i in imports
            if i.startswith(
                ("imhub.runtime.adapters", "imhub.runtime.gateway", "imhub.runtime.wiring")
            )
        ]
        assert not bad, (path, bad)


def test_core_modules_import_only_core() -> None:
    allowed = {f"imhub.runtime.{name}" for name in CORE} | {"imhub.runtime"}
    for name in CORE:
        imports = _imports(RUNTIME / f"{name}.py")
        bad = [i for i in imports if i not in allowed]
        assert not bad, (name, bad)


def test_adapters_never_import_services_or_the_gateway() -> None:
    for path, imports in _modules(RUNTIME / "adapters").items():
        bad = [
            i
            for i in imports
            if i.startswith(
                ("imhub.runtime.services", "imhub.runtime.gateway", "imhub.runtime.wiring")
            )
        ]
        assert not bad, (path, bad)
