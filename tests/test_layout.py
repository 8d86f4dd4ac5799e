"""The tree draws the architecture: sizes of rooms, and imports that only point down.

Layers, top to bottom: ops -> web -> intake -> workers -> telemetry -> store -> transport, and
at the bottom the vocabulary every layer shares: settings (and its declaration, setting),
errors, schemas. A module imports only from its own layer or below: nothing below web knows
HTTP, nothing below intake knows the order path's policy, and transport knows only Redis.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"
SCRIPTS = [ROOT / "bench", ROOT / "loadtests"]  # sized like the package, outside its layers
MODULE_LINES_MAX = 400
FUNCTION_LINES_MAX = 60

# What each layer may import from the package (besides itself).
SHARED = {"settings", "setting", "errors", "schemas", "__init__", "__version__"}
LAYERS = ["ops", "web", "intake", "workers", "telemetry", "store", "transport"]
MAY_IMPORT = {layer: set(LAYERS[i + 1 :]) for i, layer in enumerate(LAYERS)}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def sized() -> list[Path]:
    """Every module the size rule covers: the package's, and the benchmark's and load tests'."""
    return modules() + sorted(path for folder in SCRIPTS for path in folder.rglob("*.py"))


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def imported_layers(tree: ast.AST) -> set[str]:
    """The first component below `gateway` of every absolute import of the package."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "gateway":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from gateway import x
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gateway" and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("path", sized(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_one_room(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    lines = len(source.splitlines())
    assert lines <= MODULE_LINES_MAX, f"{lines} lines: two jobs share this module?"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > FUNCTION_LINES_MAX
    ]
    assert not long, f"functions over {FUNCTION_LINES_MAX} lines: {long}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    layer = layer_of(path)
    allowed = MAY_IMPORT.get(layer)
    used = imported_layers(ast.parse(path.read_text(encoding="utf-8"))) - {layer} - SHARED
    if allowed is None:  # settings, errors, schemas, the entry points
        allowed = set() if layer in SHARED else set(MAY_IMPORT)
    assert used <= allowed, f"{layer} imports {sorted(used - allowed)}"


def test_every_layer_is_known() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - {"lua"} <= set(MAY_IMPORT), folders - set(MAY_IMPORT)
