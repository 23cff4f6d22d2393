"""The callbacks beside Lightning's LearningRateMonitor, CSV and TensorBoard loggers, ModelSummary, RichProgressBar."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze, Schedule
from tests.unfreeze_helpers import build_model

SCHEDULE = {1: "backbone.3", 2: ["backbone.1", "backbone.0"]}


def metrics_rows(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as file:
        return list(csv.DictReader(file))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.mark.parametrize("logging_interval", ["epoch", "step"])
def test_learning_rate_monitor_shows_one_stable_column_per_group(tmp_path: Path, logging_interval: str) -> None:
    model = build_model(optimizer="adam", lr=0.01)
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[
            GradualUnfreeze(what=Schedule(SCHEDULE, decay=0.5), lr_scale=0.1),
            LearningRateMonitor(logging_interval),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)

    rows = metrics_rows(logger.log_dir)
    head = column(rows, "lr-Adam/head")
    assert head and all(lr == pytest.approx(0.01) for lr in head)  # the head's column exists from the first log
    assert "lr-Adam" not in rows[0] and "lr-Adam/pg1" not in rows[0]  # no column renamed at a release
    for group, lr in (("backbone.3", 0.001), ("backbone.1", 0.0005), ("backbone.0", 0.0005)):
        logged = column(rows, f"lr-Adam/{group}")
        assert logged and logged == pytest.approx([lr] * len(logged))
    assert column(rows, "gradual_unfreeze/trainable_params")[0] < column(rows, "gradual_unfreeze/trainable_params")[-1]


def test_tensorboard_logger_rich_progress_bar_and_model_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model(optimizer="adam", lr=0.01)
    summary = ModelSummary(max_depth=1)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[
            BNFreezeCallback(),
            GradualUnfreeze(what=Schedule(SCHEDULE)),
            LearningRateMonitor("epoch"),
            summary,
            RichProgressBar(),
        ],
        enable_checkpointing=False,
    )
    with caplog.at_level("INFO"):
        trainer.fit(model)

    printed = caplog.text
    backbone = sum(p.numel() for p in model.backbone.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    # The summary is printed at fit start: the backbone is frozen then, the head trains.
    assert re.search(rf"{get_human_readable_count(head)}\s+Trainable params", printed)
    assert re.search(rf"{get_human_readable_count(backbone)}\s+Non-trainable params", printed)
    assert list(Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    assert "lr-Adam/backbone.3" in trainer.callback_metrics
