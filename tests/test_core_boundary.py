"""The pure core stays pure: importing any engine.core module in a fresh
interpreter pulls in no Twisted, no sockets and no event loop.

Each check runs in a subprocess, because this test process may already have
imported Twisted for the shell tests.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine.core

ROOT = Path(__file__).resolve().parent.parent
CORE_MODULES = sorted(f"engine.core.{m.name}" for m in pkgutil.iter_modules(engine.core.__path__))
FORBIDDEN = ("twisted", "socket", "asyncio", "select", "selectors", "sqlite3")


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    return set(result.stdout.split())


def test_the_core_package_has_the_modules_the_design_names():
    assert {"engine.core.mllp", "engine.core.header", "engine.core.ack", "engine.core.errors"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", ["engine.core", *CORE_MODULES])
def test_importing_a_core_module_in_a_fresh_interpreter_does_not_import_twisted_or_io(module):
    modules = imported_after(module)
    assert module in modules
    leaked = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    assert leaked == []


def test_the_boundary_check_can_fail():
    """The subprocess really reports what it imports (so the check above is not vacuous)."""
    assert "twisted" in imported_after("twisted")
