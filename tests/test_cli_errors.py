"""Configuration errors under LightningCLI (lightning_bnfreeze.cli, used by the example app): one line naming the
callback, the argument, its value and the fix, exit status 2, no traceback; whether the error is found by the parser
(a wrong type, an unknown or missing argument), by a constructor (a value out of range), when the callbacks meet the
model (a name that is not in it) or during the run (a metric never logged), at any depth of the configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from examples.digits.cli import DEFAULT_CONFIG
from examples.digits.data import DigitsTransfer
from examples.digits.model import DigitsClassifier
from lightning_bnfreeze.cli import DEBUG_HINT, configuration_error, parse_error

REPO = Path(__file__).resolve().parents[1]
GRADUAL_UNFREEZE = """
trainer:
  callbacks:
    - class_path: lightning_bnfreeze.GradualUnfreeze
      init_args:
        {}
"""
BN_FREEZE = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: lightning_bnfreeze.BNFreezeCallback
      init_args:
        {}
"""
SMALL_RUN = [
    "--model.init_args.pretrained=false",
    "--seed_everything=false",  # Lightning logs the seed before anything is constructed
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_checkpointing=false",
]


def run_app(tmp_path: Path, overlay: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m examples.digits fit`` on the main job's config with ``overlay`` on top, as a user runs it."""
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    command = [sys.executable, "-m", "examples.digits", "fit", "--config", str(DEFAULT_CONFIG), "--config", str(path)]
    command += [*SMALL_RUN, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    env = {key: value for key, value in os.environ.items() if key != "JSONARGPARSE_DEBUG"}
    env.update(XDG_CACHE_HOME=str(tmp_path), OMP_NUM_THREADS="1", **({"JSONARGPARSE_DEBUG": "true"} if debug else {}))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one-line error: exit status 2, no traceback, nothing but the line and the hint in stderr."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[1:] == [DEBUG_HINT], lines
    return lines[0]


@pytest.mark.parametrize(
    ("overlay", "first_line"),
    [
        pytest.param(
            GRADUAL_UNFREEZE.format("lr_scale: fast"),
            "error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a number, got 'fast'.",
            id="wrong-type",
        ),
        pytest.param(
            BN_FREEZE.format("{modules: backbone, train_affine: yes please}"),
            "error: trainer.callbacks (lightning_bnfreeze.BNFreezeCallback): `train_affine` must be true or false,"
            " got 'yes please'.",
            id="wrong-type-bool",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("adapt: {class_path: lightning_bnfreeze.AdaBN, init_args: {batches: lots}}"),
            "error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze), adapt (lightning_bnfreeze.AdaBN):"
            " `batches` must be an integer or a number, got 'lots'.",
            id="wrong-type-nested",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("lr_scal: 0.5"),
            "error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): no argument `lr_scal` (given 0.5);"
            " did you mean `lr_scale`?",
            id="unknown-key",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("what: {class_path: lightning_bnfreeze.Blocks, init_args: {per_releas: 1}}"),
            "error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze), what (lightning_bnfreeze.Blocks):"
            " no argument `per_releas` (given 1); did you mean `per_release`?",
            id="unknown-key-nested",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("when: {class_path: lightning_bnfreeze.Plateau}"),
            "error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze), when (lightning_bnfreeze.Plateau):"
            " `monitor` is required",
            id="missing-monitor",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("lr_scale: 0"),
            "error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze):"
            " `lr_scale` must be a positive number, got 0.0.",
            id="rejected-value",
        ),
        pytest.param(  # the user's trigger is built too: `when` is what the constructor gets from LightningCLI
            GRADUAL_UNFREEZE.format(
                "lr_scale: 0\n        when: {class_path: tests.unfreeze_helpers.BelowLoss, init_args: {threshold: 0.5}}"
            ),
            "error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze):"
            " `lr_scale` must be a positive number, got 0.0.",
            id="rejected-value-beside-a-users-trigger",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("bn: yes please"),
            "error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze): `bn` must be one of"
            " ('auto', 'train', 'frozen'), got 'yes please'.",
            id="rejected-choice",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("on_loss_rise: undo"),
            "error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): `on_loss_rise`: Expected a"
            " typing.Literal['retry', 'warn']. Got value: undo",
            id="rejected-literal",
        ),
        pytest.param(
            BN_FREEZE.format("train_affine: true"),
            "error: trainer.callbacks[1] (lightning_bnfreeze.BNFreezeCallback): `train_affine=True` needs `modules`",
            id="rejected-combination",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("what: {class_path: lightning_bnfreeze.Blocks, init_args: {per_release: 0}}"),
            "error: trainer.callbacks[0].init_args.what (lightning_bnfreeze.Blocks):"
            " `per_release` must be an integer >= 1, got 0.",
            id="rejected-value-nested",
        ),
        pytest.param(  # not the first class of `what`'s Union: jsonargparse keeps only the first one's error
            GRADUAL_UNFREEZE.format("what: {class_path: lightning_bnfreeze.Schedule, init_args: {releases: {}}}"),
            "error: trainer.callbacks[0].init_args.what (lightning_bnfreeze.Schedule): `releases` must map epochs",
            id="rejected-value-nested-schedule",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format("backbone: backbon"),
            "error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze): `backbone` is 'backbon', which is no"
            " module of the LightningModule. Closest names: 'backbone'",
            id="backbone-typo",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format(
                "what: {class_path: lightning_bnfreeze.Schedule, init_args: {releases: {1: backbone.nope}}}"
            ),
            "error: trainer.callbacks[0].init_args.what (lightning_bnfreeze.Schedule): `releases[1]` holds the name"
            " 'backbone.nope', which matches nothing in the LightningModule. Closest existing names: 'backbone.stem'",
            id="unknown-module-in-schedule",
        ),
        pytest.param(
            BN_FREEZE.format("modules: backbone.nope"),
            "error: trainer.callbacks[1] (lightning_bnfreeze.BNFreezeCallback): `modules` holds the name"
            " 'backbone.nope', which matches nothing",
            id="unknown-module-in-modules",
        ),
        pytest.param(
            GRADUAL_UNFREEZE.format(
                "what: {class_path: lightning_bnfreeze.Schedule, init_args: {releases: {1.5: backbone.stage3}}}"
            ),
            "error: trainer.callbacks[0].init_args.what (lightning_bnfreeze.Schedule): `releases` has the key 1.5",
            id="float-key",
        ),
    ],
)
def test_configuration_error_is_one_line(overlay: str, first_line: str, tmp_path: Path) -> None:
    assert error_line(run_app(tmp_path, overlay)).startswith(first_line)


def test_a_metric_never_logged_is_one_line_at_the_first_check(tmp_path: Path) -> None:
    """The run starts (Lightning's own lines come first), and stops at the first check with one line."""
    overlay = GRADUAL_UNFREEZE.format("when: {class_path: lightning_bnfreeze.Plateau, init_args: {monitor: val_accu}}")
    result = run_app(tmp_path, overlay)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(
        "error: trainer.callbacks[0].init_args.when (lightning_bnfreeze.Plateau): `monitor` is 'val_accu', which is"
        " not among the logged metrics. Closest: 'val_acc'"
    )
    assert error.endswith("Log it with `self.log('val_accu', ...)`.")
    assert result.stderr.splitlines()[-1] == DEBUG_HINT


def test_debug_variable_shows_the_traceback(tmp_path: Path) -> None:
    result = run_app(tmp_path, GRADUAL_UNFREEZE.format("backbone: backbon"), debug=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ValueError: `backbone` is 'backbon', which is no module")


def test_control_plain_lightning_cli_buries_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ClearErrorsCLI, the same configuration ends in jsonargparse's Union error (the callback's message
    only inside it)."""
    monkeypatch.setattr(sys, "argv", ["examples.digits"])  # LightningCLI parses `args`, not pytest's argv
    path = tmp_path / "overlay.yaml"
    path.write_text(GRADUAL_UNFREEZE.format("lr_scale: 0"))
    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes"):
        LightningCLI(
            DigitsClassifier,
            DigitsTransfer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["--config", str(DEFAULT_CONFIG), "--config", str(path), *SMALL_RUN],
            run=False,
        )


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            "Parser key \"trainer.max_epochs\":\n  Expected a <class 'int'>. Got value: ten",
            "`trainer.max_epochs` must be an integer, got 'ten'.",
        ),
        ("Unrecognized arguments: --trainer.max_epoch=3", "Unrecognized arguments: --trainer.max_epoch=3"),
        ("", None),
        pytest.param(
            'Problems parsing config: mapping values are not allowed in this context\n  in "<unicode string>", line 3,'
            " column 6",
            "Problems parsing config: mapping values are not allowed in this context (line 3, column 6)",
            id="no-yaml",
        ),
        pytest.param(  # jsonargparse 4.53's message for GradualUnfreeze(max_step="releasd")
            'Parser key "max_step":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class'
            " 'float'>, typing.Literal['auto', 'released'], <class 'NoneType'>]\n  Errors:\n    - Expected a <class"
            " 'float'>\n    - Expected a typing.Literal['auto', 'released']\n    - Expected a <class 'NoneType'>\n"
            "  Given value type: <class 'str'>\n  Given value: releasd",
            "`max_step` must be a number or one of 'auto', 'released', got 'releasd'.",
            id="a-literal-among-the-union",
        ),
        pytest.param(  # GradualUnfreeze(adapt="yes"): a class, a literal, None
            'Parser key "adapt":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class'
            " 'lightning_bnfreeze.adapt.AdaBN'>, typing.Literal['auto'], <class 'NoneType'>]\n  Errors:\n    -"
            " Expected a dot import path string: yes\n    - Expected a typing.Literal['auto']\n    - Expected a <class"
            " 'NoneType'>. Got value: True\n  Given value type: <class 'str'>\n  Given value: yes",
            "`adapt` must be a class ({class_path: ..., init_args: {...}}) or 'auto', got 'yes'.",
            id="a-class-or-a-literal",
        ),
    ],
)
def test_other_parse_errors_are_one_line_too(message: str, line: str | None) -> None:
    assert parse_error(message) == line


def test_errors_not_raised_by_the_library_are_left_alone() -> None:
    try:
        int("not a number")  # a ValueError raised by no constructor of the library
    except ValueError as error:
        assert configuration_error(error) is None
