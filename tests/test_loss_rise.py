"""The first release's loss check: a training loss that rises after it is named, with the argument to change."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_bnfreeze import At, Blocks, Every, GradualUnfreeze
from lightning_bnfreeze.loss_rise import LOSS_RISE, LossRise, Rise
from tests.unfreeze_helpers import STEPS_PER_EPOCH, UnfreezeModel, make_trainer


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
    assert early.judge() is None and early.record(9.0) is None  # judged once

    too_early = LossRise(5)
    too_early.record(1.0)
    too_early.released()
    too_early.record(3.0)
    assert too_early.judge() is None  # one batch after it: too few to judge, and the watch is over
    assert [too_early.record(loss) for loss in (9.0, 9.0)] == [None, None]


def test_losses_may_be_tensors() -> None:
    rise = watched([1.0, 1.0], [torch.tensor(2.0), torch.tensor(2.0)])[-1]  # type: ignore[list-item]
    assert rise == Rise(before=1.0, after=2.0, before_batches=2, after_batches=2)


def test_a_window_is_a_positive_number_of_batches() -> None:
    with pytest.raises(ValueError, match=r"`window` must be a positive number of batches, got 0"):
        LossRise(0)


class ScaledLoss(UnfreezeModel):
    """The training loss times ``after_release`` once ``releases`` parts of the backbone (children with parameters)
    train (as a dict, with ``as_dict``)."""

    def __init__(self, after_release: float, releases: int = 1, as_dict: bool = False) -> None:
        super().__init__(lr=0.01)
        self.after_release, self.releases, self.as_dict = after_release, releases, as_dict

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        training = sum(any(param.requires_grad for param in child.parameters()) for child in self.backbone)
        if training >= self.releases:
            loss = loss * self.after_release
        return {"loss": loss} if self.as_dict else loss


def rise_of(warning: str) -> float:
    """The ratio a loss-rise warning names."""
    match = re.search(r"before it \(([0-9.]+)x\)", warning)
    assert match is not None, warning
    return float(match.group(1))


def fit_warnings(model: UnfreezeModel, recwarn: pytest.WarningsRecorder, **callback: Any) -> list[str]:
    make_trainer([GradualUnfreeze(**callback)], max_epochs=3).fit(model)
    return [str(w.message) for w in recwarn if "training loss rose" in str(w.message)]


def test_a_training_loss_that_rises_after_the_first_release_is_named_with_lr_scale(
    recwarn: pytest.WarningsRecorder,
) -> None:
    (warning,) = fit_warnings(ScaledLoss(after_release=3.0), recwarn, what=Blocks(per_release=1), lr_scale=0.5)
    assert warning.startswith("GradualUnfreeze: the training loss rose after the first release (epoch 1): ")
    assert f"over its first {STEPS_PER_EPOCH} batches against" in warning  # an epoch's
    assert (
        f"over the {STEPS_PER_EPOCH} before it (" in warning and rise_of(warning) > 1.5
    )  # three times the loss, as the head learns
    assert (
        "Its rate (0.5 x the head's, lr_scale=0.5)" in warning and "try a smaller lr_scale (lr_scale=0.05)" in warning
    )


def test_a_training_loss_that_falls_after_the_first_release_is_not_warned_about(
    recwarn: pytest.WarningsRecorder,
) -> None:
    assert fit_warnings(ScaledLoss(after_release=0.5, as_dict=True), recwarn) == []


def test_only_the_first_release_is_watched(recwarn: pytest.WarningsRecorder) -> None:
    # the loss rises at the second release (epoch 2), the first had nothing before it to compare with
    assert fit_warnings(ScaledLoss(after_release=3.0, releases=2), recwarn, what=Blocks(per_release=1)) == []
    assert fit_warnings(ScaledLoss(3.0, releases=2), recwarn, what=Blocks(per_release=1), when=Every(first=0)) == []


def test_two_releases_at_once_are_watched_as_the_first(recwarn: pytest.WarningsRecorder) -> None:
    (warning,) = fit_warnings(ScaledLoss(after_release=3.0), recwarn, what=Blocks(per_release=1), when=At([1, 1]))
    assert rise_of(warning) > 1.5  # three times the loss, as the head learns


class ConstantLoss(UnfreezeModel):
    """A training loss of 1 in epoch 0, 3 from epoch 1 on (that of the first release), without gradient."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return (3.0 if self.current_epoch >= 1 else 1.0) + 0.0 * self(batch[0]).sum()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_means_are_of_the_losses_the_training_step_returned(
    accumulate: int, recwarn: pytest.WarningsRecorder
) -> None:
    trainer = make_trainer(
        [GradualUnfreeze(what=Blocks(per_release=1))], max_epochs=3, accumulate_grad_batches=accumulate
    )
    trainer.fit(ConstantLoss())
    (warning,) = [str(w.message) for w in recwarn if "training loss rose" in str(w.message)]
    assert f": 3 on average over its first {STEPS_PER_EPOCH} batches against 1 over the {STEPS_PER_EPOCH}" in warning
