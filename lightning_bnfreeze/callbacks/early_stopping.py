r"""
Releasing Early Stopping
========================

An ``EarlyStopping`` that, while a ``GradualUnfreeze`` has blocks left, releases the next one instead of stopping.

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from typing_extensions import override

__all__ = ["ReleasingEarlyStopping", "is_early_stopping", "monitored_now"]


def is_early_stopping(callback: object) -> bool:
    """Whether ``callback`` is an ``EarlyStopping`` (``lightning``'s or ``pytorch_lightning``'s, or a subclass)."""
    return any(cls.__name__ == "EarlyStopping" for cls in type(callback).__mro__)


def monitored_now(trainer: pl.Trainer) -> dict[str, float]:
    """The logged metrics that are single numbers, as floats."""
    return {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}


class ReleasingEarlyStopping(EarlyStopping):
    r"""Lightning's ``EarlyStopping``, except that running out of patience makes the next release.

    While a :class:`~lightning_bnfreeze.GradualUnfreeze` of the trainer has releases left, a stop for lack
    of improvement becomes its next release (recorded with reason ``"early_stopping"``) and the fit goes
    on; every release (this one or the trigger's) gives this callback its full patience again. Once
    everything is released it stops the fit as ``EarlyStopping`` does; a stop for another reason (a
    threshold, a non-finite value) stops at once. This is finetuning-scheduler's ``FTSEarlyStopping``
    with Lightning's own class: the arguments are ``EarlyStopping``'s.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bnfreeze import GradualUnfreeze, ReleasingEarlyStopping
        >>> trainer = Trainer(callbacks=[GradualUnfreeze(), ReleasingEarlyStopping(monitor="val_loss", patience=3)])
    """

    releases_instead = True
    """Marks this class for ``GradualUnfreeze``, which warns about a plain ``EarlyStopping`` beside it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._releases_seen = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._releases_seen = 0

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, lambda: super(ReleasingEarlyStopping, self).on_train_epoch_end(trainer, pl_module))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, lambda: super(ReleasingEarlyStopping, self).on_validation_end(trainer, pl_module))

    @staticmethod
    def _unfreezers(trainer: pl.Trainer) -> list[Any]:
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        return [callback for callback in callbacks if hasattr(callback, "release_next")]

    def _releases(self, trainer: pl.Trainer) -> list[Any]:
        return [record for callback in self._unfreezers(trainer) for record in callback.history]

    def _check(self, trainer: pl.Trainer, check: Callable[[], None]) -> None:
        """``EarlyStopping``'s check; a release starts a new count of the patience after the check it happened at."""
        fresh = self._releases(trainer)[self._releases_seen :]
        at_this_check = any(record.step == trainer.global_step for record in fresh)
        if fresh and not at_this_check:
            self.wait_count = 0
        stopped_before = trainer.should_stop
        check()
        out_of_patience = self._stopped_for_patience(trainer)
        if at_this_check:  # this check released already: it counts once, and the new count starts after it
            self.wait_count = 0
            if out_of_patience:
                trainer.should_stop = stopped_before
                self._forget_stop()
        elif out_of_patience:
            self._release_instead(trainer)
        self._releases_seen = len(self._releases(trainer))

    def _stopped_for_patience(self, trainer: pl.Trainer) -> bool:
        stopped_now = trainer.should_stop and self.stopped_epoch == trainer.current_epoch
        # every rank agrees when it ran out of patience on any rank: the param groups stay identical
        return stopped_now and trainer.strategy.reduce_boolean_decision(self.wait_count >= self.patience, all=False)

    def _release_instead(self, trainer: pl.Trainer) -> None:
        left = [callback for callback in self._unfreezers(trainer) if callback.releases_left]
        value = monitored_now(trainer).get(self.monitor)
        if left and left[0].release_next(trainer, "early_stopping", self.monitor, value):
            trainer.should_stop = False
            self._forget_stop()

    def _forget_stop(self) -> None:
        self.wait_count = 0
        self.stopped_epoch = 0
        if hasattr(self, "stopping_reason"):
            self.stopping_reason = type(self.stopping_reason)(0)  # EarlyStoppingReason.NOT_STOPPED
