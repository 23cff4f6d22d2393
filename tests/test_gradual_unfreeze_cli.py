"""GradualUnfreeze configured from LightningCLI YAML (schedule included), and the dry run's command line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_bnfreeze import GradualUnfreeze
from tests.unfreeze_helpers import STEPS_PER_EPOCH, CLIModel, module_numel

ROOT = Path(__file__).resolve().parent.parent
CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning_bnfreeze.GradualUnfreeze
      init_args:
        schedule:
          1: backbone.3
          {second}: [backbone.0]
        lr_scale: 0.2
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
    assert callback.schedule == {1: "backbone.3", 2: ["backbone.0"]}
    assert callback.lr_scale == 0.2
    assert cli.model.steps_run == 3 * STEPS_PER_EPOCH
    groups = cli.trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups[1:]] == ["backbone.3", "backbone.0"]
    assert [len(g["params"]) for g in groups[1:]] == [4, 4]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.2, rel=1e-9)
    assert groups[2]["lr"] == pytest.approx(groups[0]["lr"] * 0.2 * callback.lr_decay, rel=1e-9)
    assert not any(p.requires_grad for p in cli.model.backbone[1].parameters())


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
    assert ["1", "backbone.3", f"{module_numel(model, 'backbone.3'):,}", "0.2"] in lines
    never = ["3", "(>=", "max_epochs:", "never)", "backbone.0", f"{module_numel(model, 'backbone.0'):,}"]
    assert any(line[:6] == never for line in lines), result.stdout
    assert ["never", "(rest", "of", "backbone)", f"{module_numel(model, 'backbone.1'):,}", "frozen"] in lines
    assert "Trainer.fit" not in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
