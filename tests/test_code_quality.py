"""The layout holds: the plain-PyTorch core imports no Lightning, the callbacks load on first use.

(ruff and mypy run as steps of ``.ci/run``, not as tests.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


CORE = sorted(
    path.stem
    for path in (ROOT / "lightning_bnfreeze").glob("*.py")
    if path.stem not in {"__init__", "cli", "cli_config_errors", "dry_run", "dry_run_plans", "pytorch_lightning"}
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
