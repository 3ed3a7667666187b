"""The decision core stays pure: its modules import nothing but the standard library, each
other and plain value modules (drivers.telemetry). No config models, no runtime, no I/O."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "controller" / "core"
PURE = ("planner.py", "caps.py", "budget.py", "curves.py", "allocation.py", "overhead.py")
ALLOWED_PREFIXES = ("controller.core", "drivers.telemetry")
# Standard-library modules that read a clock, do I/O or log: not in the pure core.
IMPURE_STDLIB = {"asyncio", "time", "logging", "socket", "os", "subprocess", "random", "sqlite3"}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("name", [n for n in PURE if (CORE / n).exists()])
def test_core_module_imports_only_pure_values(name: str) -> None:
    for mod in _imports(CORE / name):
        top = mod.split(".")[0]
        if mod.startswith(ALLOWED_PREFIXES) or top == "__future__":
            continue
        assert top in sys.stdlib_module_names, f"{name} imports {mod}"
        assert top not in IMPURE_STDLIB, f"{name} imports {mod}"
