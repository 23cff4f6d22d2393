"""GradualUnfreeze with ``unit="step"``: a release at step ``s`` happens right before optimizer step ``s`` (with
gradient accumulation, before its first batch), the default cadence counts steps, and a fit resumed from a
mid-epoch checkpoint (before, inside the warm-up of, or after a mid-epoch release) ends bitwise where the
uninterrupted fit ends."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_bnfreeze import Blocks, Every, GradualUnfreeze, Schedule
from tests.unfreeze_helpers import (
    RESUME_WARNINGS,
    STEPS_PER_EPOCH,
    Run,
    ValidatedModel,
    assert_resumed_like,
    build_model,
    cosine,
    fit_run,
    make_trainer,
)

pytestmark = RESUME_WARNINGS

RELEASED_AT = {"backbone.3": 3, "backbone.1": 5, "backbone.0": 5}


class BatchProbe(Callback):
    """At every training batch (after GradualUnfreeze's hooks): the global step, the optimizer's released groups, and
    whether ``backbone.3`` trains in that batch's step (its weight requires grad and is the optimizer's; far from the
    source under SGD it gets a gradient in the first step, not a step)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, list[str], bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        names = [str(group.get("name")) for group in trainer.optimizers[0].param_groups[1:]]
        weight = pl_module.get_submodule("backbone.3").get_parameter("0.weight")
        held = any(weight is param for group in trainer.optimizers[0].param_groups for param in group["params"])
        trains = weight.requires_grad and held
        self.records.append((trainer.global_step, names, trains))


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_a_release_at_step_s_trains_from_optimizer_step_s(accumulate: int) -> None:
    model, probe = build_model(), BatchProbe()
    callback = GradualUnfreeze(what=Schedule({3: "backbone.3", 5: ["backbone.1", "backbone.0"]}, unit="step"))
    trainer = make_trainer([callback, probe], max_epochs=4, accumulate_grad_batches=accumulate)
    trainer.fit(model)

    steps_per_epoch = -(-STEPS_PER_EPOCH // accumulate)  # the last batch of an epoch always steps
    assert trainer.global_step == 4 * steps_per_epoch >= 6
    batches_per_step = Counter(step for step, _, _ in probe.records)
    assert sum(batches_per_step.values()) == 4 * STEPS_PER_EPOCH
    assert set(batches_per_step) == set(range(trainer.global_step))
    for step, names, trains in probe.records:
        # every batch accumulated into step s, the first included, sees what is released at s
        assert names == [name for name, at in RELEASED_AT.items() if at <= step], (step, names)
        assert trains == (step >= 3), step
    assert [(r.index, r.epoch, r.step, r.reason) for r in callback.history] == [
        (0, 3 // steps_per_epoch, 3, "scheduled"),
        (1, 5 // steps_per_epoch, 5, "scheduled"),
    ]


def test_the_default_cadence_counts_optimizer_steps() -> None:
    model = build_model()
    callback = GradualUnfreeze(what=Blocks(per_release=1), when=Every(steps=3, first=2))
    plan = callback.plan(model)
    assert callback.when.unit == "step"
    assert [[part.name for part in release] for release in plan.releases] == [
        ["backbone.3"],
        ["backbone.1"],
        ["backbone.0"],
    ]
    assert callback.when.times(len(plan.releases)) == [2, 5, 8]
    table = callback.dry_run(model, 6)
    assert "\nstep " in table and "8 (>= max_steps: never)" in table and "5 (>=" not in table
    with pytest.warns(UserWarning, match=r"release step\(s\) \[8\].*max_steps=7"):
        make_trainer([callback], max_steps=7, max_epochs=-1).fit(model)
    assert [record.step for record in callback.history] == [2, 5]


def test_step_releases_past_the_fits_last_step_are_warned_about_without_max_steps() -> None:
    """Without ``max_steps`` the fit's last step is ``max_epochs`` times the epoch's steps, known once it starts."""
    callback = GradualUnfreeze(what=Blocks(per_release=1), when=Every(steps=3, first=2))  # at steps 2, 5, 8
    last = 2 * STEPS_PER_EPOCH
    assert 5 < last <= 8
    with pytest.warns(
        UserWarning, match=rf"release step\(s\) \[8\] are at or past the fit's last optimizer step \({last},"
    ):
        make_trainer([callback], max_epochs=2).fit(build_model())
    assert [record.step for record in callback.history] == [2, 5]


def test_every_takes_epochs_or_steps_not_both() -> None:
    with pytest.raises(ValueError, match=r"`Every` takes `epochs` or `steps`, not both.*epochs=1, steps=2"):
        Every(epochs=1, steps=2)


# --------------------------------------------------------------------------------------------- mid-epoch resume

STEP_SCHEDULE = {3: "backbone.3", 9: ["backbone.1", "backbone.0"]}  # both mid-epoch (4 steps per epoch)


def train(ckpt_path: Path | None = None, checkpoint_dir: Path | None = None) -> Run:
    torch.manual_seed(0)
    model = ValidatedModel(record=True, batches_by_index=True, optimizer="adam", lr=0.01, scheduler=cosine)
    what = Schedule(STEP_SCHEDULE, unit="step", decay=0.4)
    callback = GradualUnfreeze(what=what, lr_scale=0.3, bn="train", warmup_steps=4)
    callbacks: list[Any] = [callback]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(checkpoint_dir, "{step}", save_top_k=-1, every_n_train_steps=3))
    trainer = make_trainer(
        callbacks,
        max_epochs=4,
        enable_checkpointing=checkpoint_dir is not None,
        val_check_interval=0.5,
        limit_val_batches=1,
    )
    return fit_run(trainer, model, callback, ckpt_path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    directory = tmp_path_factory.mktemp("steps")
    return train(checkpoint_dir=directory), directory


@pytest.mark.parametrize(
    ("checkpoint", "released"),
    [
        ("step=3.ckpt", []),  # epoch 0, batch 3: the release at step 3 is next
        ("step=6.ckpt", [(0, 0, 3)]),  # epoch 1, batch 2: inside the released group's warm-up
        ("step=9.ckpt", [(0, 0, 3)]),  # epoch 2, batch 1: the release at step 9 is next
        ("step=12.ckpt", [(0, 0, 3), (1, 2, 9)]),  # after both
    ],
)
def test_mid_epoch_resume_ends_bitwise_where_the_uninterrupted_fit_ends(
    uninterrupted: tuple[Run, Path], checkpoint: str, released: list[tuple[int, int, int]]
) -> None:
    reference, directory = uninterrupted
    content = torch.load(directory / checkpoint, weights_only=True)
    history = content["callbacks"][reference.callback.state_key]["unfreezer"]["history"]
    assert [(record["index"], record["epoch"], record["step"]) for record in history] == released

    resumed = train(ckpt_path=directory / checkpoint)

    assert [(r.index, r.step) for r in reference.callback.history] == [(0, 3), (1, 9)]
    assert_resumed_like(resumed, reference, content["global_step"])
