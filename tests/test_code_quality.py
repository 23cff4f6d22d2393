"""The code stays ruff- and mypy-clean (the project's configuration is in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


CORE = sorted(
    path.stem
    for path in (ROOT / "lightning_bnfreeze").glob("*.py")
    if path.stem not in {"__init__", "cli", "dry_run", "pytorch_lightning"}
)


def test_the_plain_pytorch_core_imports_no_lightning() -> None:
    # Imported one by one: the first module after which Lightning is loaded is the culprit.
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('lightning_bnfreeze.' + name)\n"
        "    if 'lightning' in sys.modules: print(name)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == [], f"imports Lightning: {result.stdout.split()[:1]}"
    assert len(CORE) > 10  # the core really was imported


def test_the_callbacks_are_imported_on_first_use() -> None:
    code = (
        "import sys, lightning_bnfreeze as package; before = 'lightning' in sys.modules;"
        " package.GradualUnfreeze; print(before, 'lightning' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "True"]
