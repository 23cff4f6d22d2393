"""While blocks remain frozen, an ``EarlyStopping`` that runs out of patience releases the next one instead of stopping.

This is finetuning-scheduler's answer (``FTSEarlyStopping`` moves to the next phase), with
Lightning's own ``EarlyStopping`` and only its public attributes: :class:`StopsToReleases` runs
right after the ``EarlyStopping`` callbacks (the callback that owns it moves behind them in ``setup``),
sees the stop it asked for (``trainer.should_stop``, its ``wait_count`` at ``patience``), and turns
it into a release: the fit goes on and the ``EarlyStopping`` starts a new count of its patience.
A stop for another reason (a threshold, a non-finite value) still stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

__all__ = ["StopsToReleases", "is_early_stopping", "monitored_now"]


def is_early_stopping(callback: object) -> bool:
    """Whether ``callback`` is an ``EarlyStopping`` (``lightning``'s or ``pytorch_lightning``'s, or a subclass)."""
    return any(cls.__name__ == "EarlyStopping" for cls in type(callback).__mro__)


def monitored_now(trainer: pl.Trainer) -> dict[str, float]:
    """The logged metrics that are single numbers, as floats."""
    return {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}


class StopsToReleases:
    """Turns the patience stops of the trainer's ``EarlyStopping`` callbacks into releases while releases remain.

    Call :meth:`check` from hooks that run behind the ``EarlyStopping`` callbacks' (``on_validation_end``
    and ``on_train_epoch_end``).

    Args:
        trainer: the trainer whose ``EarlyStopping`` callbacks are watched.
        release: called as ``release(metric, value)``; returns whether a release happened (``False``: none left).
    """

    def __init__(self, trainer: pl.Trainer, release: Callable[[str, float], bool]) -> None:
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        self.callbacks = [callback for callback in callbacks if is_early_stopping(callback)]
        self._release = release

    def check(self, trainer: pl.Trainer) -> None:
        """After the ``EarlyStopping`` callbacks checked: release instead of stopping, when one ran out of patience."""
        if not trainer.should_stop:
            return
        stopped = [callback for callback in self.callbacks if callback.wait_count >= callback.patience]
        # every rank releases when any EarlyStopping stopped for patience on any rank: the groups stay identical
        if not trainer.strategy.reduce_boolean_decision(bool(stopped), all=False):
            return
        callback = stopped[0] if stopped else self.callbacks[0]
        metric = str(callback.monitor)
        value = monitored_now(trainer).get(metric, float("nan"))
        if not self._release(metric, value):
            return  # nothing left to release: the stop stands
        trainer.should_stop = False
        for each in self.callbacks:
            each.wait_count = 0  # every EarlyStopping gives the new phase its full patience
            each.stopped_epoch = 0
            if hasattr(each, "stopping_reason"):
                each.stopping_reason = type(each.stopping_reason)(0)  # EarlyStoppingReason.NOT_STOPPED

    def reset_patience(self) -> None:
        """A release happened by another trigger: each ``EarlyStopping`` starts a new count of its patience."""
        for callback in self.callbacks:
            callback.wait_count = 0
