"""What both callbacks share: their place among the trainer's callbacks, frozen statistics kept through
weight averaging, letting go when a fit ends or fails, announcing, and waiting for ``configure_model``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_bnfreeze.callbacks.averaging import FrozenStatistics, is_averaging
from lightning_bnfreeze.freezer import NormFreezer

__all__ = ["NormFreezingCallback", "after_configure_model", "announce", "overrides_configure_model"]

log = logging.getLogger("lightning_bnfreeze")


class NormFreezingCallback(Callback):
    """A callback that keeps norm layers frozen through ``self._freezer`` from fit start until teardown.

    In ``setup`` it moves itself behind the trainer's weight-averaging callbacks, so that its hooks see
    what they did: frozen statistics are put back where those changed them (only with weight averaging:
    a change by anyone else, a user's own re-estimation, stands).
    """

    _freezer: NormFreezer | None = None
    _statistics: FrozenStatistics | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks: list[Any] = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning's connector
        behind = [i for i, callback in enumerate(callbacks) if is_averaging(callback)]
        self._statistics = FrozenStatistics() if behind else None
        if self in callbacks and behind and callbacks.index(self) < behind[-1]:
            callbacks.remove(self)
            callbacks.insert(behind[-1], self)  # right behind the last of them (whose index moved down by one)
            # A new list: Lightning is calling each callback's `setup` from the one it holds, which must stay as it is.
            trainer.callbacks = callbacks  # type: ignore[attr-defined]

    def remember_statistics(self) -> None:
        """The frozen layers changed: their statistics as they are now are those to keep (with weight averaging)."""
        if self._statistics is not None:
            self._statistics.save(self._freezer.layers if self._freezer is not None else ())

    def keep_statistics(self) -> None:
        """Put back the frozen layers' statistics where weight averaging changed them."""
        if self._statistics is not None:
            self._statistics.restore()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keep_statistics()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keep_statistics()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keep_statistics()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._freezer is not None:
            self._freezer.unfreeze_all()
        self._freezer = self._statistics = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` hook when a fit fails: let go here, or the layers stay frozen for good.
        self.teardown(trainer, pl_module, "fit")


def announce(trainer: pl.Trainer, message: str) -> None:
    """One INFO line on rank zero, through the progress bar when one is shown, so that it gets a line of its own."""
    bar = trainer.progress_bar_callback
    if bar is not None:
        if trainer.is_global_zero:
            log.info(message)  # for the user's logging configuration; printed by the bar
            bar.print(message)
    else:
        rank_zero_info(message)


def after_configure_model(pl_module: pl.LightningModule, prepare: Callable[[], None]) -> None:
    """Run ``prepare`` once the model is complete: now, or right after the module's ``configure_model``.

    Layers built in ``configure_model`` (the FSDP2 way) exist only once Lightning has called it,
    after the callbacks' ``setup`` and before the strategy wraps the model and configures the optimizers.
    """
    if not overrides_configure_model(pl_module):
        prepare()
        return
    configure_model = pl_module.configure_model

    def configure_then_prepare() -> None:
        # Back to the class's method, for later stages (the outermost of several callbacks' wrappers removes all).
        vars(pl_module).pop("configure_model", None)
        configure_model()
        prepare()

    pl_module.configure_model = configure_then_prepare  # type: ignore[method-assign]


def overrides_configure_model(pl_module: object) -> bool:
    """Whether the LightningModule's class defines ``configure_model`` (by class name, so that ``pytorch_lightning``
    modules are recognised too)."""
    for cls in type(pl_module).__mro__:
        if cls.__name__ == "LightningModule":
            return False
        if "configure_model" in vars(cls):
            return True
    return False
