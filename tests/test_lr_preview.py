"""The learning-rate preview: without training, every param group's rate at every optimizer step equals what
``LearningRateMonitor`` logs in the real fit; plateau releases at their earliest steps; the plot; the command line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from lightning_bnfreeze import Blocks, Every, GradualUnfreeze, Plateau, Schedule
from tests.unfreeze_helpers import (
    STEPS_PER_EPOCH,
    UnfreezeModel,
    assert_same_nested,
    build_model,
    clone_state,
    make_trainer,
)

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 4


def cosine_per_step(optimizer: Optimizer) -> dict[str, Any]:
    return {"scheduler": sched.CosineAnnealingLR(optimizer, T_max=9, eta_min=1e-3), "interval": "step"}


def cosine_per_two_batches(optimizer: Optimizer) -> dict[str, Any]:
    scheduler = sched.CosineAnnealingLR(optimizer, T_max=6, eta_min=1e-4)
    return {"scheduler": scheduler, "interval": "step", "frequency": 2}


def step_per_epoch(optimizer: Optimizer) -> dict[str, Any]:
    return {"scheduler": sched.StepLR(optimizer, step_size=1, gamma=0.5), "interval": "epoch"}


CASES: dict[str, dict[str, Any]] = {
    # epoch schedule, per-step cosine, warm-up across epochs
    "epochs-cosine-warmup": {
        "scheduler": cosine_per_step,
        "unfreeze": {
            "what": Schedule({1: "backbone.3", 2: ["backbone.1", "backbone.0"]}, decay=0.5),
            "warmup_steps": 3,
        },
        "accumulate": 1,
    },
    # step schedule (mid-epoch releases), cosine stepped every 2 batches, accumulation: 2 optimizer steps per epoch
    "steps-cosine-warmup-accumulation": {
        "scheduler": cosine_per_two_batches,
        "unfreeze": {"what": Schedule({1: "backbone.3", 3: "backbone.1"}, unit="step", decay=0.5), "warmup_steps": 2},
        "accumulate": 2,
    },
    # step schedule with a per-epoch scheduler and the default cadence in steps
    "steps-default-cadence-steplr": {
        "scheduler": step_per_epoch,
        "unfreeze": {
            "what": Blocks(per_release=1, decay=0.5),
            "when": Every(steps=5, first=2),
            "warmup_steps": 4,
        },
        "accumulate": 1,
    },
}


def logged_lrs(log_dir: str) -> dict[str, dict[int, float]]:
    """``lr-Adam/<group>`` -> {step: rate}, as LearningRateMonitor wrote them to metrics.csv."""
    with open(f"{log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("lr-Adam/") and value:
                logged.setdefault(key.removeprefix("lr-Adam/"), {})[int(row["step"])] = float(value)
    return logged


@pytest.mark.parametrize("case", list(CASES))
def test_preview_equals_what_learning_rate_monitor_logs_step_by_step(case: str, tmp_path: Path) -> None:
    config = CASES[case]
    model = build_model(optimizer="adam", lr=0.01, scheduler=config["scheduler"])
    callback = GradualUnfreeze(lr_scale=0.3, bn="train", **config["unfreeze"])
    before = clone_state(model)

    preview = callback.preview(
        model, batches_per_epoch=STEPS_PER_EPOCH, max_epochs=EPOCHS, accumulate_grad_batches=config["accumulate"]
    )

    # nothing of the model changed: no forward, no backward, no freezing left behind
    assert_same_nested(clone_state(model), before)
    assert all(p.requires_grad for p in model.parameters())
    assert model.steps_run == 0

    logger = CSVLogger(tmp_path, name="", version=0)
    trainer = make_trainer(
        [callback, LearningRateMonitor(logging_interval="step")],
        max_epochs=EPOCHS,
        logger=logger,
        log_every_n_steps=1,
        accumulate_grad_batches=config["accumulate"],
    )
    trainer.fit(model)
    logged = logged_lrs(logger.log_dir)
    steps = trainer.global_step
    assert steps == EPOCHS * -(-STEPS_PER_EPOCH // config["accumulate"])
    assert set(preview.lrs) == set(logged) and len(logged) >= 3
    for name, rates in preview.lrs.items():
        assert len(rates) == steps
        expected = {step: rate for step, rate in enumerate(rates) if rate is not None}
        assert expected == pytest.approx(logged[name], rel=1e-12, abs=0), name
    # the preview saw the releases where the fit did them
    history = [(record.step, record.index) for record in callback.history]
    assert [(release.step, release.earliest) for release in preview.releases] == [(step, False) for step, _ in history]
    # and the rates moved: the scheduler stepped, a warm-up ramped
    assert len(set(preview.lrs["head"])) > 2
    first = preview.releases[0]
    name = first.names[0]
    assert preview.lrs[name][first.step] == pytest.approx(preview.lrs["head"][first.step] * 0.3 / callback.warmup_steps)


def test_plateau_preview_gives_the_earliest_releases_a_never_improving_metric_gets(tmp_path: Path) -> None:
    """Patience 2, one check per epoch end: releases train from epochs 3, 5 and 7 at the earliest."""

    class FlatMetric(UnfreezeModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.log("flat", 1.0, on_step=False, on_epoch=True)
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = FlatMetric(scheduler=cosine_per_step)
    callback = GradualUnfreeze(what=Blocks(per_release=1), when=Plateau("flat", patience=2), bn="train")
    preview = callback.preview(model, batches_per_epoch=STEPS_PER_EPOCH, max_epochs=8)
    assert [(r.step, r.epoch, r.names, r.earliest) for r in preview.releases] == [
        (3 * STEPS_PER_EPOCH, 3, ("backbone.3",), True),
        (5 * STEPS_PER_EPOCH, 5, ("backbone.1",), True),
        (7 * STEPS_PER_EPOCH, 7, ("backbone.0",), True),
    ]
    assert "earliest possible" in preview.table()
    make_trainer([callback], max_epochs=8).fit(model)
    assert [(record.step, record.reason) for record in callback.history] == [
        (release.step, "plateau") for release in preview.releases
    ]

    png = preview.plot(tmp_path / "lr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_command_line_previews_the_learning_rates(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            model:
              class_path: tests.unfreeze_helpers.CLIModel
            trainer:
              max_epochs: 3
              accumulate_grad_batches: 2
              logger: false
              callbacks:
                - class_path: lightning_bnfreeze.GradualUnfreeze
                  init_args:
                    what:
                      class_path: lightning_bnfreeze.Schedule
                      init_args:
                        releases: {2: backbone.3, 4: backbone.1}
                        unit: step
                        decay: 1.0
                    lr_scale: 0.5
            """
        )
    )
    png = tmp_path / "lr.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lightning_bnfreeze.dry_run", "--config", str(config)]
    result = subprocess.run(
        [*command, "--batches-per-epoch", "4", "--preview", str(png)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["step", "epoch", "head", "backbone.3", "backbone.1"] in lines
    # 4 batches accumulated by 2: 2 optimizer steps per epoch; lr 0.1, no scheduler
    assert ["2", "1", "0.1", "0.05", "-"] in lines and ["4", "2", "0.1", "0.05", "0.05"] in lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Trainer.fit" not in result.stdout + result.stderr
