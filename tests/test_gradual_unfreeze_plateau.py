"""Releases on a plateau: ``Plateau`` decides as Lightning's ``EarlyStopping`` would stop; in a fit the next
release happens where the monitored metric is checked, is recorded (reason, value), logged and announced, and
resumes exactly; an ``EarlyStopping`` running out of patience releases the next block instead of stopping."""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_bnfreeze import Blocks, GradualUnfreeze, Moment, Plateau, ReleasingEarlyStopping, Schedule
from tests.unfreeze_helpers import (
    STEPS_PER_EPOCH,
    BelowLoss,
    LrProbe,
    ScriptedScore,
    assert_same_nested,
    clone_state,
    make_trainer,
)

# --------------------------------------------------------------------------------------------- the trigger


def early_stopping_check(callback: EarlyStopping, value: float) -> bool:
    should_stop, _ = callback._evaluate_stopping_criteria(torch.tensor(value))
    return should_stop


class Checks:
    """Drives a trigger as a fit would: a check at each time, a release whenever it answers."""

    def __init__(self, trigger: Plateau) -> None:
        self.trigger = trigger
        self.released = 0
        self.last: tuple[float, int] | None = None

    def check(self, value: float, epoch: float, step: int) -> str | None:
        reason = self.trigger.check(Moment(epoch, step, self.released, self.last, {"m": value}))
        if reason is not None:
            self.released += 1
            self.last = (epoch, step)
            self.trigger.released(Moment(epoch, step, self.released, self.last, {"m": value}))
        return reason


@pytest.mark.parametrize(("mode", "min_delta", "patience"), [("min", 0.0, 1), ("min", 0.05, 2), ("max", 0.1, 3)])
def test_the_trigger_falls_due_where_early_stopping_would_stop(mode: str, min_delta: float, patience: int) -> None:
    rng = random.Random(f"{mode}{min_delta}{patience}")
    for _ in range(20):
        values = [round(rng.uniform(0, 1), 2) for _ in range(12)]
        reference = EarlyStopping("m", min_delta=min_delta, patience=patience, mode=mode)
        stops = [early_stopping_check(reference, value) for value in values]
        trigger = Plateau("m", mode, patience, min_delta)
        decisions = [trigger.check(Moment(epoch, 0, metrics={"m": value})) for epoch, value in enumerate(values, 1)]
        first = stops.index(True) if True in stops else None
        assert decisions.index("plateau") == first if first is not None else "plateau" not in decisions, values
    assert isinstance(first, int)  # the sequences do reach plateaus


def test_min_and_max_phase_bound_each_phase_in_the_unit() -> None:
    # two checks per epoch, a flat metric: each check past the first counts
    checks = Checks(Plateau("m", patience=1, min_phase=2))
    due = [clock for clock in (epoch / 2 for epoch in range(1, 13)) if checks.check(1.0, clock, int(clock * 4))]
    assert due == [2.0, 4.0, 6.0]
    # an improving metric: only max_phase releases, counted in optimizer steps with unit="step"
    checks = Checks(Plateau("m", patience=1, max_phase=8, unit="step"))
    reasons = {step: checks.check(-step, step / 4, step) for step in range(2, 30, 2)}
    assert {step: reason for step, reason in reasons.items() if reason} == {
        8: "max_phase",
        16: "max_phase",
        24: "max_phase",
    }


def test_the_trigger_state_round_trips() -> None:
    values = [1.0, 0.9, 0.95, 0.7, 0.8, 0.85, 0.6, 0.9, 0.9, 0.9]

    def decisions(checks: Checks, part: list[float], start: int) -> list[str | None]:
        return [checks.check(value, epoch, 0) for epoch, value in enumerate(part, start=start)]

    whole = decisions(Checks(Plateau("m", patience=2, min_phase=1)), values, 1)
    first = Checks(Plateau("m", patience=2, min_phase=1))
    head = decisions(first, values[:5], 1)
    second = Checks(Plateau("m", patience=2, min_phase=1))
    second.trigger.load_state_dict(first.trigger.state_dict())
    second.released, second.last = first.released, first.last  # the history: the Unfreezer's part of the state
    assert head + decisions(second, values[5:], 6) == whole
    assert "plateau" in whole


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"monitor": ""}, "monitor"),
        ({"monitor": "m", "mode": "maximum"}, "mode"),
        ({"monitor": "m", "patience": 0}, "patience"),
        ({"monitor": "m", "min_delta": -0.1}, "min_delta"),
        ({"monitor": "m", "min_phase": -1}, "min_phase"),
        ({"monitor": "m", "max_phase": 0}, "max_phase"),
        ({"monitor": "m", "min_phase": 3, "max_phase": 2}, "max_phase"),
        ({"monitor": "m", "unit": "batch"}, "unit"),
        ({"monitor": "m", "check_on_train_epoch_end": "false"}, "check_on_train_epoch_end"),
    ],
)
def test_bad_plateau_arguments_raise_at_construction(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}"):
        Plateau(**kwargs)


# --------------------------------------------------------------------------------------------- in a fit


def one_block_per_release(monitor: str = "score", bn: str = "train", **plateau: Any) -> GradualUnfreeze:
    return GradualUnfreeze(what=Blocks(per_release=1), when=Plateau(monitor, **plateau), bn=bn)


# epoch: 0    1    2     3     4    5     6     7; mode min, patience 2: plateaus after epochs 3 and 6
SCORES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87]


def fit(model: ScriptedScore, callbacks: list[Any], epochs: int = 8, **kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(callbacks, max_epochs=epochs, num_sanity_val_steps=0, limit_val_batches=1, **kwargs)
    trainer.fit(model)
    return trainer


def test_a_plateau_releases_the_next_block_at_the_epoch_end_and_records_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model, probe = ScriptedScore(SCORES), LrProbe()
    when = Plateau("score", patience=2)
    callback = GradualUnfreeze(what=Blocks(per_release=1, decay=0.5), when=when, lr_scale=0.3, bn="train")
    logger = CSVLogger(tmp_path, name="", version=0)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO):
        fit(model, [callback, probe], logger=logger)

    records = [(r.index, r.epoch, r.step, r.reason) for r in callback.history]
    assert records == [(0, 3, 4 * STEPS_PER_EPOCH, "plateau"), (1, 6, 7 * STEPS_PER_EPOCH, "plateau")]
    assert [r.value for r in callback.history] == pytest.approx([0.96, 0.86])
    # the released groups train from the next epoch's first step, in the plan's order, at its factors
    for record in probe.records:
        expected = ["backbone.3"] * (record.epoch >= 4) + ["backbone.1"] * (record.epoch >= 7)
        assert record.names[1:] == expected, record
    assert probe.records[-1].lrs[1:] == pytest.approx([0.1 * 0.3, 0.1 * 0.15])
    # logged to the trainer's loggers, announced once per release
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("gradual_unfreeze/release")]
    assert [(int(r["step"]), float(r["gradual_unfreeze/release"])) for r in rows] == [(16, 0.0), (28, 1.0)]
    assert [float(r["gradual_unfreeze/release_value"]) for r in rows] == pytest.approx([0.96, 0.86])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GradualUnfreeze")]
    assert len(lines) == 3 and "max_step=" in lines[0]  # max_step="auto" at fit start, then the releases
    assert "epoch 3, score stopped improving at 0.96: released backbone.3" in lines[1]


@pytest.mark.parametrize(("min_phase", "release_steps"), [(0, [4, 6, 8]), (1, [4, 8, 12])])
def test_checks_follow_validation_inside_epochs_and_min_phase_holds(min_phase: int, release_steps: list[int]) -> None:
    """Validation twice per epoch: a check after each; a flat score and patience 1 release at every check but the
    first, unless ``min_phase`` (in epochs) keeps the phase longer."""
    model = ScriptedScore([0.5] * 20)
    callback = one_block_per_release(patience=1, min_phase=min_phase)
    fit(model, [callback], epochs=4, val_check_interval=0.5)
    assert [(r.step, r.reason) for r in callback.history] == [(step, "plateau") for step in release_steps]


def test_a_release_right_after_a_validation_trains_its_norm_layers_from_the_next_step() -> None:
    """Validation leaves every module in the mode it found: a block released then still trains its statistics."""
    model = ScriptedScore([0.5] * 20, record=True)
    fit(model, [one_block_per_release(patience=1)], epochs=3, val_check_interval=0.5)
    assert model.recorder is not None
    tags = [record.tag for record in model.recorder.records if record.layer == "backbone.3.1"]
    assert len(tags) == 3 * STEPS_PER_EPOCH
    verdicts = model.recorder.verdicts()
    for layer, release_step in (("backbone.3.1", 4), ("backbone.1.1", 6), ("backbone.0.1", 8)):
        expected = ["batch" if epoch * STEPS_PER_EPOCH + batch >= release_step else "running" for epoch, batch in tags]
        assert verdicts[layer] == expected, layer


def test_max_phase_releases_while_the_metric_still_improves() -> None:
    model = ScriptedScore([1.0 - 0.01 * i for i in range(10)])
    callback = one_block_per_release(patience=1, max_phase=2)
    fit(model, [callback], epochs=8)
    assert [(r.epoch, r.step, r.reason) for r in callback.history] == [
        (1, 8, "max_phase"),
        (3, 16, "max_phase"),
        (5, 24, "max_phase"),
    ]


def test_the_dry_run_gives_the_order_and_says_the_times_are_not_used() -> None:
    model = ScriptedScore(SCORES)
    table = one_block_per_release().dry_run(model, max_epochs=2)
    rows = [line.split() for line in table.partition("Releases:")[2].splitlines() if line.startswith("release ")]
    assert [row[2] for row in rows] == ["backbone.3", "backbone.1", "backbone.0"]
    assert "each when Plateau('score'" in table and "never)" not in table
    # the control: a cadence's times count
    assert "never)" in GradualUnfreeze(what=Blocks(per_release=1)).dry_run(model, max_epochs=2)


def test_an_unlogged_monitor_raises_naming_the_closest_metric() -> None:
    model = ScriptedScore(SCORES)
    with pytest.raises(
        RuntimeError,
        match=r"`monitor` is 'scor', which is not among the logged metrics. Closest: 'score'.*self.log\('scor'",
    ):
        fit(model, [one_block_per_release("scor")], epochs=2)


def test_a_users_own_trigger_releases_where_it_says() -> None:
    """``BelowLoss``: a Trigger subclass checked after validation, as the ``triggers`` module shows how to write."""
    model, probe = ScriptedScore([0.9, 0.7, 0.4, 0.6, 0.3, 0.2]), LrProbe()
    callback = GradualUnfreeze(what=Blocks(per_release=1), when=BelowLoss(0.5, monitor="score"), bn="train")
    fit(model, [callback, probe], epochs=6)
    assert [(r.epoch, r.step, r.reason, r.metric, r.value) for r in callback.history] == [
        (2, 3 * STEPS_PER_EPOCH, "below threshold", "score", pytest.approx(0.4)),
        (4, 5 * STEPS_PER_EPOCH, "below threshold", "score", pytest.approx(0.3)),
        (5, 6 * STEPS_PER_EPOCH, "below threshold", "score", pytest.approx(0.2)),
    ]
    assert [len(r.names) for r in probe.records] == [1] * 12 + [2] * 8 + [3] * 4


def test_the_dry_run_names_a_users_own_trigger_with_its_arguments() -> None:
    callback = GradualUnfreeze(when=BelowLoss(0.5, monitor="score"))
    assert "Releases in this order, each when BelowLoss(threshold=0.5, monitor='score') says." in callback.dry_run(
        ScriptedScore([0.9])
    )


class SetupCounter(pl.Callback):
    def __init__(self) -> None:
        self.setups = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.setups += 1


def test_every_callback_is_set_up_once_when_the_callback_moves_behind_early_stopping() -> None:
    counter, stopper = SetupCounter(), EarlyStopping("score", patience=2)
    fit(ScriptedScore(SCORES), [GradualUnfreeze(what=Schedule({1: "backbone.3"})), counter, stopper], epochs=1)
    assert counter.setups == 1


# --------------------------------------------------------------------------------------------- resume


def train(directory: Path, ckpt_path: Path | None = None) -> tuple[GradualUnfreeze, dict]:
    torch.manual_seed(0)
    model = ScriptedScore(SCORES, record=True)
    callback = one_block_per_release(patience=2, bn="auto")
    checkpoints = ModelCheckpoint(directory, "{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(
        [callback, checkpoints], max_epochs=8, num_sanity_val_steps=0, limit_val_batches=1, enable_checkpointing=True
    )
    if ckpt_path is not None:
        model.validations = torch.load(ckpt_path, weights_only=True)["epoch"] + 1
    trainer.fit(model, ckpt_path=ckpt_path)
    return callback, clone_state(model)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize(
    ("checkpoint", "released"),
    [
        ("epoch=2.ckpt", []),  # one check without improvement since the best (epoch 1)
        ("epoch=3.ckpt", [(0, 3)]),  # right after a release, before its first step (bn="auto" has not decided)
    ],
)
def test_resume_releases_where_the_uninterrupted_fit_did(
    tmp_path: Path, checkpoint: str, released: list[tuple[int, int]]
) -> None:
    reference, final = train(tmp_path)
    state = torch.load(tmp_path / checkpoint, weights_only=True)["callbacks"][reference.state_key]["unfreezer"]
    assert [(record["index"], record["epoch"]) for record in state["history"]] == released
    assert state["trigger"]["wait"] == (1 if not released else 0)

    resumed, resumed_final = train(tmp_path / "resumed", tmp_path / checkpoint)
    assert resumed.state_dict() == reference.state_dict()
    assert any(train for record in reference.history for train in record.train_norms)  # "auto" decided to train
    assert_same_nested(resumed_final, final)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_contrast_without_the_trigger_state_a_resumed_fit_releases_later(tmp_path: Path) -> None:
    reference, _ = train(tmp_path)
    content = torch.load(tmp_path / "epoch=2.ckpt", weights_only=True)
    del content["callbacks"][reference.state_key]["unfreezer"]["trigger"]
    torch.save(content, tmp_path / "stripped.ckpt")
    stripped, _ = train(tmp_path / "stripped", tmp_path / "stripped.ckpt")
    assert [r.step for r in stripped.history] != [r.step for r in reference.history]


# --------------------------------------------------------------------------------------------- EarlyStopping

ORDERS = {"callback first": lambda callback, stopper: [callback, stopper], "EarlyStopping first": lambda c, s: [s, c]}


@pytest.mark.parametrize("order", list(ORDERS))
def test_releasing_early_stopping_releases_the_next_block_instead_of_stopping_until_all_are_released(
    order: str,
) -> None:
    flat = [1.0, 0.9] + [0.95] * 20  # no improvement after epoch 1
    alone = EarlyStopping("score", patience=2)
    fit(ScriptedScore(flat), [alone], epochs=20)
    assert alone.stopped_epoch == 3  # the control: EarlyStopping alone stops after 2 checks without improvement

    stopper = ReleasingEarlyStopping("score", patience=2)
    what = Schedule({30: "backbone.3", 40: "backbone.1", 50: "backbone.0"})
    callback = GradualUnfreeze(what=what, bn="train")
    with pytest.warns(UserWarning, match="max_epochs"):
        trainer = fit(ScriptedScore(flat), ORDERS[order](callback, stopper), epochs=20)
    # each time patience runs out, the next release; each release gives the full patience again
    assert [(r.index, r.epoch, r.reason) for r in callback.history] == [
        (0, 3, "early_stopping"),
        (1, 5, "early_stopping"),
        (2, 7, "early_stopping"),
    ]
    assert [r.value for r in callback.history] == pytest.approx([0.95] * 3)
    assert stopper.stopped_epoch == 9 and trainer.current_epoch == 10 < 20


@pytest.mark.parametrize("order", list(ORDERS))
def test_releasing_early_stopping_and_a_plateau_on_the_same_check_release_once(order: str) -> None:
    stopper = ReleasingEarlyStopping("score", patience=2)
    callback = one_block_per_release(patience=2)
    trainer = fit(ScriptedScore(SCORES + [0.9] * 12), ORDERS[order](callback, stopper), epochs=20)
    assert [(r.index, r.reason) for r in callback.history] == [(0, "plateau"), (1, "plateau"), (2, "plateau")]
    assert [r.epoch for r in callback.history] == [3, 6, 8]
    assert trainer.current_epoch < 20  # it stops once everything is released


@pytest.mark.parametrize("order", list(ORDERS))
def test_contrast_releasing_early_stopping_stops_once_every_block_is_released(order: str) -> None:
    stopper = ReleasingEarlyStopping("score", patience=2)
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3"}), bn="train")
    trainer = fit(ScriptedScore([1.0, 0.9] + [0.95] * 20), ORDERS[order](callback, stopper), epochs=20)
    assert [r.reason for r in callback.history] == ["scheduled"]
    assert stopper.stopped_epoch == 3 and trainer.current_epoch == 4


def test_lightnings_own_early_stopping_stops_as_usual_and_the_callback_says_how_to_release_instead() -> None:
    stopper = EarlyStopping("score", patience=2)
    callback = GradualUnfreeze(what=Schedule({30: "backbone.3"}), bn="train")
    with pytest.warns(UserWarning, match="ReleasingEarlyStopping"):
        trainer = fit(ScriptedScore([1.0, 0.9] + [0.95] * 20), [callback, stopper], epochs=20)
    assert callback.history == () and stopper.stopped_epoch == 3 and trainer.current_epoch == 4
