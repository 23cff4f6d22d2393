"""The first release's loss check: a training loss that rises after it undoes the release and retries it at a tenth of
its rate (``on_loss_rise="retry"``), or is named with the argument to change (``"warn"``)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_bnfreeze import At, Blocks, Every, GradualUnfreeze
from lightning_bnfreeze.callbacks.release_loss import UNJUDGED_AT_FIRST_STEP
from lightning_bnfreeze.loss_rise import LOSS_RISE, LossRise, Rise
from lightning_bnfreeze.snapshot import TrainingSnapshot
from tests.unfreeze_helpers import (
    RESUME_WARNINGS,
    STEPS_PER_EPOCH,
    Run,
    UnfreezeModel,
    assert_resumed_like,
    assert_same_nested,
    clone_state,
    fit_checkpointed,
    make_trainer,
)

pytestmark = RESUME_WARNINGS

# ------------------------------------------------------------------------------------------ the watch, plain


def watched(before: list[float], after: list[float], window: int = 10) -> list[Rise | None]:
    watch = LossRise(window)
    for loss in before:
        assert watch.record(loss) is None
    watch.released()
    return [watch.record(loss) for loss in after]


def test_a_rise_is_judged_once_as_many_batches_followed_the_release_as_preceded_it() -> None:
    results = watched([1.0, 2.0, 2.0], [2.0, 3.0, 4.0, 9.0])
    assert results[:2] == [None, None]
    assert results[2] == Rise(before=5 / 3, after=3.0, before_batches=3, after_batches=3)
    assert results[2].rose
    assert results[3] is None  # judged once


def test_a_loss_that_falls_or_rises_less_than_the_line_did_not_rise() -> None:
    assert watched([2.0, 2.0], [1.0, 1.0]) == [None, Rise(before=2.0, after=1.0, before_batches=2, after_batches=2)]
    below, on_the_line = 2.0 * (2 * LOSS_RISE - 1) * 0.99, 2.0 * (2 * LOSS_RISE - 1)
    assert not any(rise.rose for rise in (watched([2.0, 2.0], [1.0, 1.0])[-1], watched([2.0, 2.0], [2.0, below])[-1]))
    assert watched([2.0, 2.0], [2.0, on_the_line])[-1].rose


def test_a_loss_that_is_no_longer_finite_rose_one_that_was_not_positive_gives_no_ratio() -> None:
    assert watched([2.0, 2.0], [2.0, math.nan])[-1].rose
    assert watched([2.0, 2.0], [math.inf, 2.0])[-1].rose
    rise = watched([-2.0, 0.0], [5.0, 5.0])[-1]
    assert rise is not None and math.isnan(rise.ratio) and not rise.rose


def test_the_batches_compared_are_the_window_s_last_before_the_release() -> None:
    rise = watched([9.0, 9.0, 1.0, 1.0], [2.0, 2.0], window=2)[-1]
    assert rise == Rise(before=1.0, after=2.0, before_batches=2, after_batches=2)


def test_with_one_batch_before_the_release_two_after_it_are_judged() -> None:
    assert watched([1.0], [3.0, 3.0]) == [None, Rise(before=1.0, after=3.0, before_batches=1, after_batches=2)]


def test_a_release_before_any_batch_starts_no_watch() -> None:
    watch = LossRise(5)
    watch.released()  # nothing before it to compare with
    assert not watch.watching
    assert [watch.record(loss) for loss in (1.0, 9.0, 9.0)] == [None, None, None]
    assert watch.judge() is None


def test_a_later_release_or_the_fit_s_end_ends_the_watch_with_the_batches_it_saw() -> None:
    early = LossRise(5)
    for loss in (1.0, 1.0, 1.0, 1.0):
        early.record(loss)
    early.released()
    early.record(3.0)
    early.record(3.0)
    assert early.judge() == Rise(before=1.0, after=3.0, before_batches=2, after_batches=2)
    assert not early.watching and early.judge() is None and early.record(9.0) is None  # judged once

    too_early = LossRise(5)
    too_early.record(1.0)
    too_early.released()
    too_early.record(3.0)
    assert too_early.judge() is None  # one batch after it: too few to judge, and the watch is over
    assert [too_early.record(loss) for loss in (9.0, 9.0)] == [None, None]


def test_every_release_is_watched_against_the_batches_before_it_those_after_the_last_one_included() -> None:
    watch = LossRise(3)
    for loss in (4.0, 4.0, 4.0):
        watch.record(loss)
    watch.released()
    assert [watch.record(loss) for loss in (2.0, 2.0, 2.0)][-1] == Rise(4.0, 2.0, 3, 3)
    watch.record(1.0)
    watch.released()  # the window's last 3 batches before it: two of the last watch's, one after it
    assert [watch.record(loss) for loss in (3.0, 3.0, 3.0)][-1] == Rise(5 / 3, 3.0, 3, 3)


def test_a_retry_is_watched_against_the_batches_before_the_release_it_retries() -> None:
    watch = LossRise(2)
    for loss in (1.0, 1.0):
        watch.record(loss)
    watch.released()
    assert [watch.record(loss) for loss in (5.0, 5.0)][-1] == Rise(1.0, 5.0, 2, 2)
    watch.retry()
    assert watch.watching
    assert [watch.record(loss) for loss in (0.5, 0.5)][-1] == Rise(1.0, 0.5, 2, 2)  # not against 5.0
    watch.released()
    assert [watch.record(loss) for loss in (0.5, 0.5)][-1] == Rise(0.5, 0.5, 2, 2)  # the retry's batches before it


def test_the_losses_kept_survive_a_state_dict_round_trip_inside_a_watch() -> None:
    watch = LossRise(3)
    for loss in (2.0, torch.tensor(2.0), 2.0):
        watch.record(loss)
    watch.released()
    watch.record(3.0)
    resumed = LossRise(3)
    resumed.load_state_dict(watch.state_dict())
    assert resumed.state_dict() == {"recent": [2.0, 2.0, 2.0], "before": [2.0, 2.0, 2.0], "after": [3.0]}
    assert [resumed.record(loss) for loss in (3.0, 3.0)][-1] == Rise(2.0, 3.0, 3, 3)


def test_losses_may_be_tensors() -> None:
    rise = watched([1.0, 1.0], [torch.tensor(2.0), torch.tensor(2.0)])[-1]  # type: ignore[list-item]
    assert rise == Rise(before=1.0, after=2.0, before_batches=2, after_batches=2)


def test_a_window_is_a_positive_number_of_batches() -> None:
    with pytest.raises(ValueError, match=r"`window` must be a positive number of batches, got 0"):
        LossRise(0)


# ------------------------------------------------------------------------------------------ the snapshot, plain


def trained_pair() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A linear layer and a BatchNorm1d under Adam, both trained for two steps; the norm layer's weight frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model[1].weight.requires_grad = False
    for _ in range(2):
        step(model, optimizer)
    return model, optimizer


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 3)).pow(2).sum().backward()
    optimizer.step()


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Tensor]]:
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_snapshot_puts_back_the_trainable_weights_the_buffers_and_the_optimizer_state_bitwise(
    device: str | None,
) -> None:
    model, optimizer = trained_pair()
    state, moments = clone_state(model), optimizer_state(optimizer)
    snapshot = TrainingSnapshot(model, [optimizer], device=device)
    for _ in range(3):
        step(model, optimizer)
    assert not torch.equal(model[0].weight, state["0.weight"])
    for _ in range(2):  # and again: the snapshot stays
        model(torch.randn(8, 3)).sum().backward()  # an accumulation in progress, at the weights undone
        snapshot.restore()
        assert_same_nested(clone_state(model), state, "state")  # running statistics and num_batches_tracked too
        assert_same_nested(optimizer_state(optimizer), moments, "optimizer")
        assert all(param.grad is None for param in model.parameters())
        step(model, optimizer)


def test_a_snapshot_leaves_the_buffers_it_is_told_to_keep() -> None:
    model, optimizer = trained_pair()
    snapshot = TrainingSnapshot(model, [optimizer])
    step(model, optimizer)
    moved = clone_state(model)
    snapshot.restore(keep=[model[1].running_mean])
    assert torch.equal(model[1].running_mean, moved["1.running_mean"])
    assert not torch.equal(model[1].running_var, moved["1.running_var"])


def test_a_parameter_released_after_the_snapshot_loses_its_optimizer_state_a_frozen_one_is_not_copied() -> None:
    model, optimizer = trained_pair()
    frozen = model[1].weight
    released = model[1].bias  # trainable at the snapshot, without state yet in a fresh optimizer
    fresh = torch.optim.SGD([released], lr=0.1, momentum=0.9)
    snapshot = TrainingSnapshot(model, [optimizer, fresh])
    frozen.requires_grad = True
    step(model, fresh)
    with torch.no_grad():
        frozen.add_(1.0)
    changed = frozen.detach().clone()
    assert released in fresh.state
    snapshot.restore()
    assert released not in fresh.state  # it starts afresh, as at the snapshot
    assert torch.equal(frozen, changed)  # frozen at the snapshot: never copied, never put back


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_a_snapshot_of_a_cuda_model_keeps_its_copies_on_the_cpu_and_puts_them_back_on_the_gpu(
    fused: bool, from_checkpoint: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 3, device="cuda")).pow(2).sum().backward()
        optimizer.step()
    state, moments = clone_state(model), optimizer_state(optimizer)
    steps_on = {s["step"].device.type for s in optimizer.state.values()}  # the CPU, unless fused
    snapshot = TrainingSnapshot(model, [optimizer], device="cpu")
    if from_checkpoint:
        snapshot = TrainingSnapshot.from_state_dict(model, [optimizer], snapshot.state_dict(), device="cpu")
    held = [copy.values for _, copy in (*snapshot._params.values(), *snapshot._buffers.values())]
    held += [value.values for states in snapshot._states for kept in states.values() for value in kept.values()]
    assert held and all(tensor.device.type == "cpu" for tensor in held)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    optimizer.state.clear()
    snapshot.restore()
    assert_same_nested(clone_state(model), state, "state")
    assert_same_nested(optimizer_state(optimizer), moments, "optimizer")
    assert all(s["exp_avg"].device.type == "cuda" for s in optimizer.state.values())
    assert {s["step"].device.type for s in optimizer.state.values()} == steps_on == {"cuda" if fused else "cpu"}


def test_a_snapshot_saved_and_loaded_by_name_restores_as_the_original() -> None:
    model, optimizer = trained_pair()
    state, moments = clone_state(model), optimizer_state(optimizer)
    saved = TrainingSnapshot(model, [optimizer]).state_dict()
    step(model, optimizer)
    TrainingSnapshot.from_state_dict(model, [optimizer], saved).restore()
    assert_same_nested(clone_state(model), state, "state")
    assert_same_nested(optimizer_state(optimizer), moments, "optimizer")


# ------------------------------------------------------------------------------------------ in a fit


class ScaledLoss(UnfreezeModel):
    """The training loss times ``after_release`` while ``releases`` parts of the backbone (children with parameters)
    train and, with ``above`` set, while a released group's rate is more than ``above`` times the head's (as a dict,
    with ``as_dict``)."""

    def __init__(
        self, after_release: float, releases: int = 1, above: float = 0.0, as_dict: bool = False, **model: Any
    ) -> None:
        super().__init__(**{"lr": 0.01, **model})
        self.after_release, self.releases, self.above, self.as_dict = after_release, releases, above, as_dict

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        training = sum(any(param.requires_grad for param in child.parameters()) for child in self.backbone)
        groups = self.trainer.optimizers[0].param_groups
        fast = any(group["lr"] > self.above * groups[0]["lr"] for group in groups if _released(group))
        if training >= self.releases and fast:
            loss = loss * self.after_release
        return {"loss": loss} if self.as_dict else loss


def rise_of(warning: str) -> float:
    """The ratio a loss-rise warning names."""
    match = re.search(r"before it \(([0-9.]+)x\)", warning)
    assert match is not None, warning
    return float(match.group(1))


def fit_warnings(
    model: UnfreezeModel, recwarn: pytest.WarningsRecorder, max_epochs: int = 3, **callback: Any
) -> tuple[GradualUnfreeze, list[str]]:
    unfreeze = GradualUnfreeze(**callback)
    make_trainer([unfreeze], max_epochs=max_epochs).fit(model)
    return unfreeze, [str(w.message) for w in recwarn if "training loss rose" in str(w.message)]


def released_rates(trainer: pl.Trainer) -> dict[str, float]:
    groups = trainer.optimizers[0].param_groups
    return {group["name"]: group["lr"] / groups[0]["lr"] for group in groups if _released(group)}


def _released(group: dict[str, Any]) -> bool:
    return str(group.get("name")).startswith("backbone.")


class AtTheRelease(Callback):
    """After GradualUnfreeze (place it after): the model's state and the optimizer's state at the first batch of
    epoch 1 (the release's first step) and at the end of its last batch (where the loss check judged)."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.current_epoch == 1 and idx == 0:
            self.states["release"] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.current_epoch == 1 and idx == STEPS_PER_EPOCH - 1:
            self.states["judged"] = self._state(trainer, pl_module)

    @staticmethod
    def _state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], dict[str, Any]]:
        names = {id(param): name for name, param in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        moments = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items() if s}
        return clone_state(pl_module), moments


def test_a_release_after_which_the_loss_rose_is_undone_and_retried_at_a_tenth_of_its_rate(
    recwarn: pytest.WarningsRecorder,
) -> None:
    model = ScaledLoss(after_release=3.0, above=0.5, optimizer="sgd_momentum")  # no rise once at a tenth
    probe = AtTheRelease()
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None, adapt=None)
    trainer = make_trainer([unfreeze, probe], max_epochs=3)
    trainer.fit(model)
    (warning,) = [str(w.message) for w in recwarn if "training loss rose" in str(w.message)]

    assert warning.startswith("GradualUnfreeze: the training loss rose after release 0 (epoch 1, 1 x the head's rate):")
    assert f"over its first {STEPS_PER_EPOCH} batches against" in warning and rise_of(warning) > 1.5
    assert "back as they were at the release, which trains on at a tenth of its rate (0.1 x the head's)" in warning
    (release_state, release_moments), (judged_state, judged_moments) = probe.states["release"], probe.states["judged"]
    assert_same_nested(judged_state, release_state, "state")  # weights and norm statistics as at the release
    assert_same_nested(judged_moments, release_moments, "optimizer")  # the head's momentum; none for backbone.3
    assert not any(name.startswith("backbone.") for name in judged_moments)
    assert [(r.parts, r.retries, r.lr_factors) for r in unfreeze.history] == [
        (("backbone.3",), 1, pytest.approx((0.1,))),
        (("backbone.1",), 0, pytest.approx((0.1,))),  # a later release at a tenth too
    ]
    assert released_rates(trainer) == pytest.approx({"backbone.3": 0.1, "backbone.1": 0.1})


class BeforeTheRetry(Callback):
    """Before GradualUnfreeze (place it first): the model's state at the end of epoch 1's last batch, before the loss
    check judges it."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.current_epoch == 1 and idx == STEPS_PER_EPOCH - 1:
            self.state = clone_state(pl_module)


def test_by_default_a_retry_keeps_the_statistics_the_first_step_decided_and_re_estimates_the_released_ones(
    recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    model = ScaledLoss(after_release=3.0, above=0.5, optimizer="sgd_momentum")
    before, after = BeforeTheRetry(), AtTheRelease()
    unfreeze = GradualUnfreeze(what=Blocks(per_release=1), max_step=None)  # bn="auto", adapt="auto"
    with caplog.at_level("INFO"):
        make_trainer([before, unfreeze, after], max_epochs=2).fit(model)
    assert unfreeze.history[0].retries == 1 and unfreeze.first_step is not None and unfreeze.first_step > 0.005
    released, frozen = "backbone.3.", ("backbone.0.", "backbone.1.")
    (at_release, _), (retried, _) = after.states["release"], after.states["judged"]
    for name, value in retried.items():
        if name.startswith(frozen):  # adapted at the first step's decision: kept
            assert torch.equal(value, before.state[name]), name
        elif name.startswith(released) and "running" in name:  # put back, then re-estimated on the weights put back
            assert not torch.equal(value, at_release[name]), name
        elif not name.endswith("num_batches_tracked"):
            assert torch.equal(value, at_release[name]), name  # weights, the head's statistics: as at the release
    assert "on the weights put back after the first release's loss rose (adapt='auto')" in caplog.text


def test_a_loss_that_rises_at_every_retry_is_retried_twice_then_warned_about(
    recwarn: pytest.WarningsRecorder,
) -> None:
    unfreeze, warnings = fit_warnings(ScaledLoss(after_release=3.0), recwarn, 4, what=Blocks(per_release=3))
    assert ["which trains on at a tenth" in warning for warning in warnings] == [True, True, False]
    assert "its rate (retried 2 times) may be more than the backbone can take" in warnings[-1]
    assert "try a smaller lr_scale (lr_scale=0.001)" in warnings[-1]
    assert unfreeze.history[0].retries == 2 and unfreeze.history[0].lr_factors == pytest.approx((0.01,) * 3)


def test_on_loss_rise_warn_only_warns_naming_lr_scale(recwarn: pytest.WarningsRecorder) -> None:
    unfreeze, (warning,) = fit_warnings(
        ScaledLoss(after_release=3.0, releases=1), recwarn, 2, what=Blocks(per_release=1), lr_scale=0.5,
        on_loss_rise="warn",
    )  # fmt: skip
    assert warning.startswith("GradualUnfreeze: the training loss rose after release 0 (epoch 1, 0.5 x the head's")
    assert "try a smaller lr_scale (lr_scale=0.05), or on_loss_rise='retry'" in warning
    assert [(r.retries, r.lr_factors) for r in unfreeze.history] == [(0, (0.5,))]


def test_a_loss_that_falls_after_each_release_changes_nothing(recwarn: pytest.WarningsRecorder) -> None:
    ends = []
    for on_loss_rise in ("retry", "warn"):
        torch.manual_seed(0)
        model = ScaledLoss(after_release=0.5, as_dict=True)
        assert fit_warnings(model, recwarn, on_loss_rise=on_loss_rise)[1] == []
        ends.append(clone_state(model))
    assert_same_nested(*ends, "state")  # the snapshot taken at each release leaves the fit as it was


def test_only_the_first_release_is_watched(recwarn: pytest.WarningsRecorder) -> None:
    # the loss rises at the second release (epoch 2; with `first=0`, epoch 1), not at the first: what follows is the
    # divergence check's (tests/test_divergence.py), which slows every release down from the first
    for when in (Every(), Every(first=0)):
        unfreeze, warnings = fit_warnings(ScaledLoss(3.0, releases=2), recwarn, what=Blocks(per_release=1), when=when)
        assert len(unfreeze.history) >= 2 and warnings == [] and {r.retries for r in unfreeze.history[1:]} == {0}


@pytest.mark.parametrize("on_loss_rise", ["retry", "warn"])
def test_a_first_release_at_the_first_step_is_said_to_go_unjudged(on_loss_rise: str) -> None:
    said = []
    for when in (Every(first=0), At([0], unit="step"), Every()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the same line again, from the same place
            make_trainer([GradualUnfreeze(when=when, on_loss_rise=on_loss_rise)], max_epochs=2).fit(  # type: ignore[arg-type]
                ScaledLoss(after_release=0.5)
            )
        said.append([str(w.message) for w in caught if str(w.message) == UNJUDGED_AT_FIRST_STEP])
    assert said == [[UNJUDGED_AT_FIRST_STEP], [UNJUDGED_AT_FIRST_STEP], []]


def test_two_releases_at_one_step_are_watched_and_retried_as_one(recwarn: pytest.WarningsRecorder) -> None:
    unfreeze, warnings = fit_warnings(
        ScaledLoss(after_release=3.0, above=0.5), recwarn, what=Blocks(per_release=1), when=At([1, 1])
    )
    assert len(warnings) == 1 and rise_of(warnings[0]) > 1.5 and "rose after release 0 (epoch 1" in warnings[0]
    assert [(r.retries, r.lr_factors) for r in unfreeze.history] == [(1, (0.1,)), (0, (0.1,))]


class ConstantLoss(UnfreezeModel):
    """A training loss of 1 in epoch 0, 3 from epoch 1 on (that of the first release), without gradient."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return (3.0 if self.current_epoch >= 1 else 1.0) + 0.0 * self(batch[0]).sum()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_means_are_of_the_losses_the_training_step_returned(
    accumulate: int, recwarn: pytest.WarningsRecorder
) -> None:
    trainer = make_trainer(
        [GradualUnfreeze(what=Blocks(per_release=1))], max_epochs=2, accumulate_grad_batches=accumulate
    )
    trainer.fit(ConstantLoss())
    (warning,) = [str(w.message) for w in recwarn if "training loss rose" in str(w.message)]
    assert f": 3 on average over its first {STEPS_PER_EPOCH} batches against 1 over the {STEPS_PER_EPOCH}" in warning


def test_on_loss_rise_is_retry_or_warn() -> None:
    with pytest.raises(ValueError, match=r"`on_loss_rise` must be one of \('retry', 'warn'\), got 'undo'"):
        GradualUnfreeze(on_loss_rise="undo")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ resumed


def train(ckpt_path: Path | None = None, checkpoint_dir: Path | None = None, on_loss_rise: str = "retry") -> Run:
    torch.manual_seed(0)
    model = ScaledLoss(3.0, above=0.5, record=True, batches_by_index=True, optimizer="adam")
    callback = GradualUnfreeze(what=Blocks(per_release=1), on_loss_rise=on_loss_rise)  # type: ignore[arg-type]
    return fit_checkpointed(model, callback, 3, ckpt_path, checkpoint_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    directory = tmp_path_factory.mktemp("retried")
    with pytest.warns(UserWarning, match="which trains on at a tenth"):
        return train(checkpoint_dir=directory), directory


@pytest.mark.parametrize(
    ("checkpoint", "watching", "snapshot"),
    [
        ("epoch=0.ckpt", False, False),  # before the release: its watch compares with the losses saved
        ("step=6.ckpt", True, True),  # inside the release's watch (steps 4-7): its snapshot saved
        ("epoch=1.ckpt", True, True),  # after the retry: its watch, the snapshot, the rates and the retry's scale
    ],
)
def test_a_resumed_fit_watches_and_retries_as_the_uninterrupted_one(
    uninterrupted: tuple[Run, Path], checkpoint: str, watching: bool, snapshot: bool
) -> None:
    reference, directory = uninterrupted
    assert [(r.index, r.retries) for r in reference.callback.history] == [(0, 1), (1, 0)]
    content = torch.load(directory / checkpoint, weights_only=True)
    saved = content["callbacks"][reference.callback.state_key]["loss_check"]
    assert (saved["after"] is not None, saved["snapshot"] is not None) == (watching, snapshot)

    resumed = train(ckpt_path=directory / checkpoint)

    assert resumed.callback.history == reference.callback.history
    assert_resumed_like(resumed, reference, content["global_step"])


def test_a_fit_resumed_inside_the_watch_with_on_loss_rise_warn_only_warns(
    uninterrupted: tuple[Run, Path], recwarn: pytest.WarningsRecorder
) -> None:
    _, directory = uninterrupted
    resumed = train(ckpt_path=directory / "step=6.ckpt", on_loss_rise="warn")  # the checkpoint holds a snapshot
    assert [r.retries for r in resumed.callback.history] == [0, 0]
    assert any("or on_loss_rise='retry'" in str(w.message) for w in recwarn)
