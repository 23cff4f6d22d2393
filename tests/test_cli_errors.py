"""Configuration errors under LightningCLI (lightning_bnfreeze.cli, used by the example app): one clear first line
naming the argument and its value, and the closest argument name for an unknown ``init_args`` key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from examples.digits.cli import DEFAULT_CONFIG, main
from examples.digits.data import DigitsTransfer
from examples.digits.model import DigitsClassifier
from lightning_bnfreeze.cli import construction_error, unknown_argument_hint

REPO = Path(__file__).resolve().parents[1]
LR_SCALE_0 = """
trainer:
  callbacks:
    - class_path: lightning_bnfreeze.GradualUnfreeze
      init_args:
        lr_scale: 0
"""
TRAIN_AFFINE_WITHOUT_MODULES = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: lightning_bnfreeze.BNFreezeCallback
      init_args:
        train_affine: true
"""
LR_SCAL = """
trainer:
  callbacks:
    - class_path: lightning_bnfreeze.GradualUnfreeze
      init_args:
        lr_scal: 0.5
"""


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["examples.digits"])  # LightningCLI parses `args`, not pytest's argv


def fit_args(tmp_path: Path, overlay: str) -> list[str]:
    """The main job's config with ``overlay`` on top; no pretraining, and no "Seed set to 0" line before the error."""
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    return [
        "fit",
        *("--config", str(DEFAULT_CONFIG), "--config", str(path)),
        "--model.init_args.pretrained=false",
        "--seed_everything=false",  # Lightning logs the seed before anything is constructed
    ]


@pytest.mark.parametrize(
    ("overlay", "first_line"),
    [
        (
            LR_SCALE_0,
            "error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze):"
            " `lr_scale` must be a positive number, got 0.0.",
        ),
        (
            TRAIN_AFFINE_WITHOUT_MODULES,
            "error: trainer.callbacks[1] (lightning_bnfreeze.BNFreezeCallback): `train_affine=True` needs `modules`",
        ),
    ],
    ids=["lr_scale_0", "train_affine_without_modules"],
)
def test_argument_rejected_by_a_callback_is_one_line(
    overlay: str, first_line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, overlay))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(first_line), lines
    assert lines[1:] == ["(set JSONARGPARSE_DEBUG=true for the traceback)"]


def test_control_plain_lightning_cli_buries_the_message(tmp_path: Path) -> None:
    """Without ClearErrorsCLI, the same configuration ends in jsonargparse's Union error (the callback's message
    only inside it)."""
    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes"):
        LightningCLI(
            DigitsClassifier,
            DigitsTransfer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=fit_args(tmp_path, LR_SCALE_0)[1:],  # no subcommand with run=False
            run=False,
        )


def test_unknown_init_args_key_suggests_the_closest_argument(tmp_path: Path) -> None:
    """As a user runs it: the first line of stderr names the key, its value and the argument meant."""
    command = [sys.executable, "-m", "examples.digits", *fit_args(tmp_path, LR_SCAL)]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    first_line = result.stderr.splitlines()[0]
    assert first_line == (
        "error: trainer.callbacks: lightning_bnfreeze.GradualUnfreeze has no argument `lr_scal` (given 0.5);"
        " did you mean `lr_scale`?"
    )


def test_other_errors_are_left_alone() -> None:
    assert unknown_argument_hint("Parser key \"trainer.max_epochs\":\n  Expected a <class 'int'>") is None
    try:
        int("not a number")  # a ValueError raised by no constructor
    except ValueError as error:
        assert construction_error(error) is None
