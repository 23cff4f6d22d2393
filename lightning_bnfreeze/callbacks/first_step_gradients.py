"""The first release's gradients in a fit's first optimizer step, read once: a
:class:`~lightning_bnfreeze.first_step_estimates.GradientProbe`'s life cycle in a Lightning fit (created at the first
batch, read in the optimizer step that takes it, closed whatever happens); ``FitReleases`` decides from what it
reads."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from torch.optim import Optimizer

from lightning_bnfreeze.first_step_estimates import GradientProbe
from lightning_bnfreeze.internals import gradient_scale
from lightning_bnfreeze.release import Unfreezer

__all__ = ["FirstStepGradients"]


class FirstStepGradients:
    """Gradients for the frozen weights of ``unfreezer``'s first release in the first optimizer step of a fit, when
    :attr:`due`: the first step that release would take from them (:meth:`read`)."""

    def __init__(self, unfreezer: Unfreezer) -> None:
        self.unfreezer = unfreezer
        self.due = False  # to be read in the first optimizer step (a checkpoint keeps it: see `pending`)
        self._probe: GradientProbe | None = None
        self._step = 0  # the optimizer step whose gradients it reads (the next one after a skipped step)

    @property
    def pending(self) -> bool:
        """Whether they are still to be read (after steps that a gradient scaler skipped, a resumed fit reads the
        first step it takes)."""
        return self.due or self._probe is not None

    def before_step(self, step: int) -> None:
        """Before a batch of optimizer step ``step``: the weights get gradients if they are due and nothing is
        released yet (a release's own first step decides then)."""
        if self.unfreezer.history:
            self.close()
        elif self.due:
            self._probe, self._step = GradientProbe(self.unfreezer.largest_rates([0])), step
        self.due = False

    def read(self, trainer: pl.Trainer, optimizer: Optimizer) -> float | None:
        """In ``optimizer``'s step: the first step the first release would take (relative, momentum included; every
        rank's gradients averaged), then closed; ``None`` when there is nothing to read in this step, or when a
        gradient scaler skips it (an overflow on any rank: the next step it takes is read instead)."""
        probe = self._probe
        if probe is None or optimizer is not self.unfreezer.groups.optimizer:
            return None
        scale = gradient_scale(trainer)
        try:
            step = probe.step(
                self.unfreezer.groups.head, lambda grad: trainer.strategy.reduce(grad, reduce_op="mean"), scale or 1.0
            )
        except BaseException:
            self.close()
            raise
        overflow = trainer.strategy.reduce_boolean_decision(not math.isfinite(step), all=False)
        if scale is not None and overflow:
            probe.drop_gradients()
            self._step = trainer.global_step + 1
            return None
        self.close()
        return step

    def after_step(self, step: int) -> None:
        """After a batch, with ``step`` optimizer steps done: closed if its optimizer step passed without reading it
        (another optimizer's)."""
        if step > self._step:
            self.close()

    def close(self) -> None:
        """The weights frozen again, without gradients."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None
