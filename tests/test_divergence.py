"""The divergence check: an epoch whose training loss ends :data:`DIVERGED` times above the fit's first batches, once a
release trained, sends the fit back to the end of its lowest epoch with every release at a tenth of its rate
(``on_loss_rise="retry"``), or is named with the argument to change (``"warn"``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_bnfreeze import At, Blocks, Every, GradualUnfreeze
from lightning_bnfreeze.divergence import DIVERGED, EpochLoss, LossDivergence
from lightning_bnfreeze.snapshot import TrainingSnapshot
from tests.test_loss_rise import ConstantLoss, ScaledLoss, released_rates, step, trained_pair
from tests.unfreeze_helpers import (
    RESUME_WARNINGS,
    STEPS_PER_EPOCH,
    Run,
    assert_resumed_like,
    assert_same_nested,
    clone_state,
    fit_checkpointed,
    make_trainer,
)

pytestmark = RESUME_WARNINGS

# ------------------------------------------------------------------------------------------ the watch, plain


def epochs(watch: LossDivergence, *losses: list[float]) -> list[EpochLoss | None]:
    ended = []
    for epoch in losses:
        for loss in epoch:
            watch.record(loss)
        ended.append(watch.epoch_ended())
    return ended


def test_each_epoch_s_last_batches_are_compared_with_the_fit_s_first() -> None:
    ended = epochs(LossDivergence(window=2), [4.0, 2.0, 9.0], [1.0, 1.0, 1.0, 3.0], [5.0])
    assert ended[0] == EpochLoss(first=3.0, last=5.5, first_batches=2, batches=2)
    assert ended[1] == EpochLoss(first=3.0, last=2.0, first_batches=2, batches=2)
    assert ended[2] is None  # one batch: too few to judge


def test_an_epoch_diverged_at_the_line_or_above_or_when_its_loss_is_no_longer_finite() -> None:
    assert not EpochLoss(2.0, 2.0 * DIVERGED * 0.99, 2, 2).diverged
    assert EpochLoss(2.0, 2.0 * DIVERGED, 2, 2).diverged
    assert EpochLoss(2.0, math.nan, 2, 2).diverged and EpochLoss(2.0, math.inf, 2, 2).diverged
    no_ratio = EpochLoss(-1.0, 5.0, 2, 2)  # a loss that is not positive says nothing of how far it rose
    assert math.isnan(no_ratio.ratio) and not no_ratio.diverged


def test_the_lowest_epoch_is_kept_and_forgotten_batches_are_not_judged() -> None:
    watch = LossDivergence(window=2)
    first, second, third = epochs(watch, [2.0, 2.0], [1.0, 1.0], [1.5, 1.5])
    assert first is not None and second is not None and third is not None
    assert [watch.keep_if_lowest(epoch) for epoch in (first, second, third)] == [True, True, False]
    watch.record(9.0)
    watch.record(9.0)
    watch.forget(2)  # undone
    assert watch.epoch_ended() is None


def test_batches_undone_are_forgotten_from_the_epoch_and_the_fit_s_first_the_others_stay() -> None:
    watch = LossDivergence(window=4)
    for loss in (1.0, 1.0, 9.0, 9.0):  # a release after the second batch, undone after two more
        watch.record(loss)
    watch.forget(2)
    for loss in (2.0, 2.0):
        watch.record(loss)
    assert watch.epoch_ended() == EpochLoss(first=1.5, last=1.5, first_batches=4, batches=4)


def test_the_losses_kept_survive_a_state_dict_round_trip() -> None:
    watch = LossDivergence(window=2)
    (ended,) = epochs(watch, [2.0, torch.tensor(2.0), 1.0])  # type: ignore[list-item]
    assert ended is not None and watch.keep_if_lowest(ended)
    watch.record(3.0)
    resumed = LossDivergence(window=2)
    resumed.load_state_dict(watch.state_dict())
    assert resumed.state_dict() == {"first": [2.0, 2.0], "last": [3.0], "recorded": 4, "lowest": 1.5}
    resumed.record(3.0)
    assert resumed.epoch_ended() == EpochLoss(2.0, 3.0, 2, 2)


def test_a_window_is_a_positive_number_of_batches() -> None:
    with pytest.raises(ValueError, match=r"`window` must be a positive number of batches, got 0"):
        LossDivergence(0)


def test_a_snapshot_of_every_weight_without_optimizer_state_restores_the_frozen_ones_and_restarts_the_state() -> None:
    model, optimizer = trained_pair()  # the norm layer's weight frozen
    state = clone_state(model)
    snapshot = TrainingSnapshot(model, [optimizer], frozen=True, optimizer_state=False)
    model[1].weight.requires_grad = True  # released after the snapshot, then trained
    step(model, optimizer)
    snapshot.restore()
    assert_same_nested(clone_state(model), state, "state")
    assert not optimizer.state  # every weight's state starts afresh
    saved = TrainingSnapshot.from_state_dict(model, [optimizer], snapshot.state_dict())
    step(model, optimizer)
    saved.restore()
    assert_same_nested(clone_state(model), state, "state")


def test_a_snapshot_holds_every_weight_by_name() -> None:
    model = nn.Linear(2, 1)
    model.bias.requires_grad = False
    saved = TrainingSnapshot(model, [], frozen=True, optimizer_state=False).state_dict()
    assert set(saved["params"]) == {"weight", "bias"} and saved["optimizers"] == []


# ------------------------------------------------------------------------------------------ in a fit


class AtEpochEnds(Callback):
    """After GradualUnfreeze (place it after): the model's state at every epoch's end, and the model's and the
    optimizer's at the first batch of every epoch (after the divergence check)."""

    def __init__(self) -> None:
        self.ends: dict[int, dict[str, Tensor]] = {}
        self.starts: dict[int, tuple[dict[str, Tensor], int]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ends[trainer.current_epoch] = clone_state(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == 0:
            self.starts[trainer.current_epoch] = (clone_state(pl_module), len(trainer.optimizers[0].state))


def diverging(**model: Any) -> ScaledLoss:
    """The loss triples while two released parts train at more than half the head's rate: from epoch 2 on."""
    return ScaledLoss(after_release=3.0, releases=2, above=0.5, optimizer="sgd_momentum", **model)


def divergence_warnings(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recwarn if "training loss diverged" in str(w.message)]


def lowest_epoch(warning: str) -> int:
    match = re.search(r"back as it was at the end of epoch (\d+)", warning)
    assert match is not None, warning
    return int(match.group(1))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_fit_that_diverged_after_releases_goes_back_to_its_lowest_epoch_at_a_tenth_of_the_rates(
    accumulate: int, recwarn: pytest.WarningsRecorder
) -> None:
    probe = AtEpochEnds()
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None)
    trainer = make_trainer([unfreeze, probe], max_epochs=4, accumulate_grad_batches=accumulate)
    trainer.fit(diverging())
    (warning,) = divergence_warnings(recwarn)

    assert warning.startswith("GradualUnfreeze: the training loss diverged in epoch 2: ")
    assert f"over its last {STEPS_PER_EPOCH} batches against" in warning
    assert f"over the fit's first {STEPS_PER_EPOCH} (" in warning and f"x, at least {DIVERGED:g}x)" in warning
    assert (
        "the optimizer state starts afresh, and every release trains on at a tenth of its rate (the first at 0.1 x"
        in (warning)
    )
    lowest = lowest_epoch(warning)
    assert lowest in (0, 1)
    restored, moments = probe.starts[3]
    assert_same_nested(restored, probe.ends[lowest], "state")  # every weight (backbone.1's, released since, too)
    assert moments == 0
    assert [(r.parts, r.retries, r.lr_factors) for r in unfreeze.history] == [
        (("backbone.3",), 1, pytest.approx((0.1,))),
        (("backbone.1",), 0, pytest.approx((0.1,))),
        (("backbone.0",), 0, pytest.approx((0.1,))),  # a later release at a tenth too
    ]
    assert released_rates(trainer) == pytest.approx({"backbone.3": 0.1, "backbone.1": 0.1, "backbone.0": 0.1})


def test_a_divergence_in_the_last_epoch_or_with_on_loss_rise_warn_only_warns_once(
    recwarn: pytest.WarningsRecorder,
) -> None:
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None)
    make_trainer([unfreeze], max_epochs=3).fit(diverging())  # epoch 2 judged at the fit's end
    (warning,) = divergence_warnings(recwarn)
    assert warning.startswith("GradualUnfreeze: the training loss diverged in epoch 2: ")
    assert "try a smaller lr_scale (lr_scale=0.1)" in warning and "on_loss_rise='retry'" not in warning
    assert {r.retries for r in unfreeze.history} == {0}

    recwarn.clear()
    warned = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None, on_loss_rise="warn")
    make_trainer([warned], max_epochs=5).fit(diverging())  # epochs 2, 3 and 4 diverged
    (warning,) = divergence_warnings(recwarn)
    assert warning.startswith("GradualUnfreeze: the training loss diverged in epoch 2: ")
    assert "try a smaller lr_scale (lr_scale=0.1), or on_loss_rise='retry'" in warning
    assert {r.retries for r in warned.history} == {0}


def test_the_retries_are_shared_with_the_first_release_s_loss_check_two_in_all(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # the loss triples while two parts train, whatever their rates
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None)
    make_trainer([unfreeze], max_epochs=6).fit(ScaledLoss(after_release=3.0, releases=2, optimizer="sgd_momentum"))
    warnings = divergence_warnings(recwarn)
    assert [lowest_epoch(w) >= 0 for w in warnings[:2]] == [True, True]
    assert "retried 2 times" in warnings[2] and "lr_scale=0.001" in warnings[2]
    assert len(warnings) == 3 and unfreeze.history[0].retries == 2

    recwarn.clear()
    rising = GradualUnfreeze(what=Blocks(per_release=3), max_step=None, adapt=None)
    make_trainer([rising], max_epochs=5).fit(ScaledLoss(after_release=3.0, optimizer="sgd_momentum"))
    (warning,) = divergence_warnings(recwarn)  # the first release's retries took both
    assert "(retried 2 times)" in warning and rising.history[0].retries == 2


def test_the_batches_a_first_release_retry_undid_are_not_judged(recwarn: pytest.WarningsRecorder) -> None:
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None)
    make_trainer([unfreeze], max_epochs=3).fit(ScaledLoss(after_release=3.0, above=0.5, optimizer="sgd_momentum"))
    assert any("training loss rose" in str(w.message) for w in recwarn)
    assert divergence_warnings(recwarn) == [] and unfreeze.history[0].retries == 1


def test_epochs_before_the_first_release_trained_are_not_judged(recwarn: pytest.WarningsRecorder) -> None:
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), when=At([2]))
    make_trainer([unfreeze], max_epochs=3).fit(ConstantLoss())  # 1 in epoch 0, 3 from epoch 1 on
    warnings = divergence_warnings(recwarn)
    assert len(warnings) == 1 and "diverged in epoch 2" in warnings[0]  # epoch 1 not judged; epoch 2 at the end
    assert {r.retries for r in unfreeze.history} == {0}  # at the fit's end it only warns


class EpochStates(Callback):
    """After GradualUnfreeze: its divergence check's state at every epoch's end, and the training losses."""

    def __init__(self, unfreeze: GradualUnfreeze) -> None:
        self.unfreeze = unfreeze
        self.states: list[dict[str, Any]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append(self.unfreeze.state_dict()["divergence_check"])


def test_no_copy_is_kept_once_the_first_release_s_retries_took_both(recwarn: pytest.WarningsRecorder) -> None:
    unfreeze = GradualUnfreeze(what=Blocks(per_release=3), max_step=None, adapt=None)
    probe = EpochStates(unfreeze)
    make_trainer([unfreeze, probe], max_epochs=5).fit(ScaledLoss(after_release=3.0, optimizer="sgd_momentum"))
    assert unfreeze.history[0].retries == 2  # at the ends of epochs 1 and 2
    assert [state["snapshot"] is not None for state in probe.states] == [False, True, True, False, False]


def test_a_first_release_retry_leaves_the_batches_before_the_release_in_the_fit_s_first(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # released at step 2 and undone at step 3 (as many batches after it as before)
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), when=Every(steps=6, first=2), max_step=None, adapt=None)
    probe = EpochStates(unfreeze)
    model = ScaledLoss(after_release=3.0, above=0.5, optimizer="sgd_momentum")
    make_trainer([unfreeze, probe], max_epochs=1).fit(model)
    assert unfreeze.history[0].retries == 1
    assert probe.states[0]["first"] == pytest.approx(probe.losses[:2]) and probe.states[0]["recorded"] == 2


def test_at_the_fit_s_end_the_batches_the_first_release_s_watch_judges_are_not_judged_again(
    recwarn: pytest.WarningsRecorder,
) -> None:
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None)
    trainer = make_trainer([unfreeze], max_epochs=3, max_steps=6)  # the release's watch (steps 4-7) still open
    trainer.fit(ScaledLoss(after_release=3.0, optimizer="sgd_momentum"))
    assert any("training loss rose" in str(w.message) for w in recwarn) and divergence_warnings(recwarn) == []


# ------------------------------------------------------------------------------------------ resumed


def train(ckpt_path: Path | None = None, checkpoint_dir: Path | None = None) -> Run:
    torch.manual_seed(0)
    model = diverging(record=True, batches_by_index=True)
    return fit_checkpointed(model, GradualUnfreeze(what=Blocks(per_release=1)), 4, ckpt_path, checkpoint_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    directory = tmp_path_factory.mktemp("diverged")
    with pytest.warns(UserWarning, match="training loss diverged in epoch 2"):
        return train(checkpoint_dir=directory), directory


@pytest.mark.parametrize(
    "checkpoint",
    [
        "epoch=0.ckpt",  # the lowest epoch's copy taken at the next epoch's first batch
        "step=6.ckpt",  # inside epoch 1, with the copy of epoch 0
        "epoch=2.ckpt",  # the diverged epoch ended: judged as the resumed fit starts
        "step=15.ckpt",  # after going back, the copy kept for another retry
    ],
)
def test_a_resumed_fit_judges_and_goes_back_as_the_uninterrupted_one(
    uninterrupted: tuple[Run, Path], checkpoint: str
) -> None:
    reference, directory = uninterrupted
    assert [r.retries for r in reference.callback.history] == [1, 0, 0]
    content = torch.load(directory / checkpoint, weights_only=True)
    saved = content["callbacks"][reference.callback.state_key]["divergence_check"]
    assert saved["first"] and (saved["snapshot"] is not None) == (checkpoint != "epoch=0.ckpt")

    resumed = train(ckpt_path=directory / checkpoint)

    assert resumed.callback.history == reference.callback.history
    assert_resumed_like(resumed, reference, content["global_step"])


def test_a_fit_resumed_from_a_checkpoint_without_the_check_s_state_is_not_judged(
    uninterrupted: tuple[Run, Path], tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    # saved before 0.14: the fit's first losses are gone, and later ones would be a lower line
    _, directory = uninterrupted
    content = torch.load(directory / "epoch=0.ckpt", weights_only=True)
    state = next(state for key, state in content["callbacks"].items() if key.startswith("GradualUnfreeze"))
    del state["divergence_check"]
    torch.save(content, tmp_path / "old.ckpt")
    resumed = train(ckpt_path=tmp_path / "old.ckpt")
    assert divergence_warnings(recwarn) == [] and {r.retries for r in resumed.callback.history} == {0}
    assert resumed.callback.state_dict()["divergence_check"] == {"off": True}  # and saved so again
