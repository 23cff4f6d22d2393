"""Where and when a release on a plateau is checked, and how an ``EarlyStopping`` yields to releases.

A plateau is checked where Lightning's ``EarlyStopping`` would check the same metric: after each
validation, or at the end of each training epoch (:func:`checks_on_train_epoch_end`). While
releases remain, an ``EarlyStopping`` that runs out of patience does not stop the fit: the next
release happens instead (:class:`EarlyStoppingGuard`), as in finetuning-scheduler's implicit mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_bnfreeze.names import closest_names

__all__ = ["EarlyStoppingGuard", "checks_on_train_epoch_end", "epoch_clock", "monitored_value"]


def checks_on_train_epoch_end(trainer: pl.Trainer, setting: bool | None) -> bool:
    """``EarlyStopping``'s rule: at the training epoch end when validation runs once per epoch (or never),
    else after each validation; ``setting`` (``True``/``False``) overrides it."""
    if setting is not None:
        return setting
    return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1


def epoch_clock(trainer: pl.Trainer) -> float:
    """Epochs trained so far: the current epoch plus the fraction of its batches done (``2.5`` halfway through 2)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    total = trainer.num_training_batches
    fraction = done / total if 0 < total < float("inf") else 0.0
    return trainer.current_epoch + min(fraction, 1.0)


def monitored_value(trainer: pl.Trainer, monitor: str) -> float:
    """The current value of the logged metric ``monitor``.

    Raises:
        RuntimeError: ``monitor`` is not logged (yet), naming the closest logged metrics.
    """
    metrics = trainer.callback_metrics
    if monitor not in metrics:
        close = closest_names(monitor, list(metrics))
        hint = f" Closest: {', '.join(map(repr, close))}." if close else ""
        raise RuntimeError(
            f"GradualUnfreeze: `monitor={monitor!r}` is not among the logged metrics.{hint} Logged:"
            f" {', '.join(map(repr, metrics)) or '(none)'}. Log it with `self.log({monitor!r}, ...)`."
        )
    return float(metrics[monitor].squeeze())


class EarlyStoppingGuard:
    """Turns the stops of the trainer's ``EarlyStopping`` callbacks into releases while releases remain.

    Args:
        trainer: the trainer whose ``EarlyStopping`` callbacks (``lightning`` or ``pytorch_lightning``)
            are guarded until :meth:`restore`.
        release: called as ``release(metric, value)`` when one runs out of patience; returns whether a
            release happened (then the fit goes on), ``False`` when none is left (then it stops).
    """

    def __init__(self, trainer: pl.Trainer, release: Callable[[str, float], bool]) -> None:
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        self.callbacks = [callback for callback in callbacks if _is_early_stopping(callback)]
        self._trainer = trainer
        self._release = release
        self._released_at: int | None = None
        for callback in self.callbacks:
            callback._evaluate_stopping_criteria = self._guarded(callback)

    def reset_patience(self, step: int) -> None:
        """A release happened at optimizer ``step``: each ``EarlyStopping`` gives the new phase its full patience,
        from the check that released it (if it checks there too) on."""
        self._released_at = step
        for callback in self.callbacks:
            callback.wait_count = 0

    def restore(self) -> None:
        """Give the callbacks their own stopping criteria back."""
        for callback in self.callbacks:
            vars(callback).pop("_evaluate_stopping_criteria", None)
        self.callbacks = []

    def _guarded(self, callback: Any) -> Callable[[Tensor], tuple[bool, str | None]]:
        evaluate = type(callback)._evaluate_stopping_criteria

        def evaluate_or_release(current: Tensor) -> tuple[bool, str | None]:
            reason_before = getattr(callback, "stopping_reason", None)
            should_stop, reason = evaluate(callback, current)
            out_of_patience = should_stop and callback.wait_count >= callback.patience
            released = self._released_at == self._trainer.global_step  # by another trigger, at this check
            # every rank releases when any runs out of patience: param groups stay identical across ranks
            if not released and self._trainer.strategy.reduce_boolean_decision(out_of_patience, all=False):
                released = self._release(str(callback.monitor), float(current.squeeze()))
            if not released:
                return should_stop, reason
            callback.wait_count = 0
            if not out_of_patience:  # a stop for another reason (a threshold, a non-finite value) still stops
                return should_stop, reason
            if reason_before is not None:
                callback.stopping_reason = reason_before
            return False, None

        return evaluate_or_release


def _is_early_stopping(callback: object) -> bool:
    # By class name, so that `pytorch_lightning`'s EarlyStopping is recognised too.
    return any(cls.__name__ == "EarlyStopping" for cls in type(callback).__mro__) and hasattr(
        callback, "_evaluate_stopping_criteria"
    )
