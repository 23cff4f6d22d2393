"""GradualUnfreeze configured from LightningCLI YAML (schedule and a user's own trigger included), and the dry run's
command line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_bnfreeze import AdaBN, Blocks, GradualUnfreeze, Schedule
from tests.unfreeze_helpers import STEPS_PER_EPOCH, BelowLoss, CLIModel, ScriptedScore, module_numel

ROOT = Path(__file__).resolve().parent.parent
CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning_bnfreeze.GradualUnfreeze
      init_args:
        what:
          class_path: lightning_bnfreeze.Schedule
          init_args:
            releases:
              1: backbone.3
              {second}: [backbone.0]
            decay: 0.5
        lr_scale: 0.2
        bn: frozen
"""
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.log_every_n_steps=1",
]


def test_lightning_cli_yaml_configures_the_schedule_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli"])  # only `args` below, not pytest's own arguments
    config = tmp_path / "config.yaml"
    config.write_text(CALLBACKS.format(second=2))
    cli = LightningCLI(
        CLIModel,
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=3",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        save_config_callback=None,
    )
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, GradualUnfreeze)]
    assert isinstance(callback.what, Schedule) and callback.what.releases == {1: "backbone.3", 2: ["backbone.0"]}
    assert callback.lr_scale == 0.2 and callback.bn == "frozen"
    assert cli.model.steps_run == 3 * STEPS_PER_EPOCH
    groups = cli.trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups[1:]] == ["backbone.3", "backbone.0"]
    assert [len(g["params"]) for g in groups[1:]] == [4, 4]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.2, rel=1e-9)
    assert groups[2]["lr"] == pytest.approx(groups[0]["lr"] * 0.2 * 0.5, rel=1e-9)
    assert not any(p.requires_grad for p in cli.model.backbone[1].parameters())


def callback_from_yaml(init_arg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GradualUnfreeze:
    """The GradualUnfreeze a LightningCLI config builds with the one ``init_args`` line ``init_arg``."""
    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_bnfreeze.GradualUnfreeze\n"
        f"      init_args:\n        {init_arg}\n"
    )
    cli = LightningCLI(CLIModel, args=["--config", str(config), *QUIET], run=False, save_config_callback=None)
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, GradualUnfreeze)]
    return callback


@pytest.mark.parametrize(
    ("value", "parsed"), [("auto", "auto"), ("released", "released"), ("0.01", 0.01), ("null", None)]
)
def test_max_step_takes_each_of_its_kinds_from_yaml(
    value: str, parsed: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert callback_from_yaml(f"max_step: {value}", tmp_path, monkeypatch).max_step == parsed


@pytest.mark.parametrize("value", ["retry", "warn"])
def test_on_loss_rise_takes_each_choice_from_yaml(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert callback_from_yaml(f"on_loss_rise: {value}", tmp_path, monkeypatch).on_loss_rise == value


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("auto", "auto"), ("null", None), ("{class_path: lightning_bnfreeze.AdaBN, init_args: {prior: 8}}", "AdaBN")],
)
def test_adapt_takes_each_of_its_kinds_from_yaml(
    value: str, parsed: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    callback = callback_from_yaml(f"adapt: {value}", tmp_path, monkeypatch)
    if parsed == "AdaBN":
        assert isinstance(callback.adapt, AdaBN) and callback.adapt.prior == 8
    else:
        assert callback.adapt == parsed


def test_dry_run_command_line_prints_the_plan(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: tests.unfreeze_helpers.CLIModel\n"
        + CALLBACKS.format(second=3)
        + textwrap.indent("max_epochs: 3\nlogger: false\n", "  ")
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_bnfreeze.dry_run", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = CLIModel()
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["1", "backbone.3", f"{module_numel(model, 'backbone.3'):,}", "0.2"] in [line[:4] for line in lines]
    never = ["3", "(>=", "max_epochs:", "never)", "backbone.0", f"{module_numel(model, 'backbone.0'):,}", "0.1"]
    assert any(line[:7] == never for line in lines), result.stdout
    assert f"Never released (stays frozen): {module_numel(model, 'backbone.1'):,} parameters" in result.stdout
    assert "Trainer.fit" not in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


OWN_TRIGGER = """
trainer:
  callbacks:
    - class_path: lightning_bnfreeze.GradualUnfreeze
      init_args:
        what:
          class_path: lightning_bnfreeze.Blocks
          init_args:
            per_release: 1
        when:
          class_path: tests.unfreeze_helpers.BelowLoss
          init_args:
            threshold: 0.5
            monitor: score
        bn: train
"""


def test_a_users_own_trigger_is_configured_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(OWN_TRIGGER)
    cli = LightningCLI(
        ScriptedScore,
        args=[
            "fit",
            "--config",
            str(config),
            "--model.scores=[0.9, 0.7, 0.4, 0.6, 0.3, 0.2]",
            "--trainer.max_epochs=6",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        save_config_callback=None,
    )
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, GradualUnfreeze)]
    assert isinstance(callback.when, BelowLoss) and callback.when.threshold == 0.5
    assert isinstance(callback.what, Blocks) and callback.what.per_release == 1
    # below 0.5 after epochs 2, 4 and 5: a release at each of those checks, with the trigger's reason
    assert [(r.epoch, r.reason) for r in callback.history] == [
        (2, "below threshold"),
        (4, "below threshold"),
        (5, "below threshold"),
    ]
    assert [g["name"] for g in cli.trainer.optimizers[0].param_groups[1:]] == ["backbone.3", "backbone.1", "backbone.0"]
