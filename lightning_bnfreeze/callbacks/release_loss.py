"""The first release's loss check in a fit: the training losses of the step outputs around it, and one warning if
they rose (:class:`~lightning_bnfreeze.loss_rise.LossRise`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_bnfreeze.loss_rise import LossRise, Rise
from lightning_bnfreeze.record import ReleaseRecord
from lightning_bnfreeze.release import Unfreezer

__all__ = ["LOSS_WINDOW", "ReleaseLossCheck", "training_loss"]

LOSS_WINDOW = 50
"""The most batches on each side of the first release whose training losses are compared (fewer: an epoch's)."""


class ReleaseLossCheck:
    """Watches the training loss around ``unfreezer``'s first release (not one restored from a checkpoint), over an
    epoch's batches at most, and warns once if it rose. The losses are the process's own: under DDP, rank 0's."""

    def __init__(self, unfreezer: Unfreezer) -> None:
        self.unfreezer = unfreezer
        self._watch: LossRise | None = None  # from the first batch or release on: the window needs the trainer

    def record(self, trainer: pl.Trainer, loss: Tensor) -> None:
        """A batch's training loss as the step output holds it (on its device: read only when judged)."""
        if trainer.lightning_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divides it by that for the backward
        self._warn(self._watching(trainer).record(loss))

    def released(self, trainer: pl.Trainer, record: ReleaseRecord) -> None:
        """A release: the plan's first starts the watch; a later one, at a later step, ends it if still open."""
        watch = self._watching(trainer)
        if record.index == 0:
            watch.released()
        elif record.step > self.unfreezer.history[0].step:  # (a watch of a resumed fit never started)
            self._warn(watch.judge())

    def close(self) -> None:
        """The fit's end: a watch still open is judged on the batches it saw."""
        if self._watch is not None:
            self._warn(self._watch.judge())

    def _watching(self, trainer: pl.Trainer) -> LossRise:
        if self._watch is None:
            batches = trainer.num_training_batches
            self._watch = LossRise(min(int(batches), LOSS_WINDOW) if math.isfinite(batches) else LOSS_WINDOW)
        return self._watch

    def _warn(self, rise: Rise | None) -> None:
        if rise is None or not rise.rose:
            return
        record = self.unfreezer.history[0]
        when = record.when(self.unfreezer.trigger.unit)
        rates = " and ".join(dict.fromkeys(f"{factor:.3g}" for factor in record.lr_factors))
        scale = self.unfreezer.lr_scale
        rank_zero_warn(
            f"GradualUnfreeze: the training loss rose after the first release ({when}): {rise.after:.4g} on average"
            f" over its first {rise.after_batches} batches against {rise.before:.4g} over the {rise.before_batches}"
            f" before it ({rise.ratio:.2f}x). Its rate ({rates} x the head's, lr_scale={scale:g}) may be more than"
            " the backbone can take: in the real-weights benchmark a pretrained transformer collapsed so at the"
            f" head's rate (benchmarks/transfer_minilm.md); try a smaller lr_scale (lr_scale={scale / 10:g})."
        )


def training_loss(outputs: object) -> Tensor | None:
    """The loss of a training step's output (a one-element tensor, or a mapping with one as ``"loss"``), detached;
    ``None`` for an output without one (a skipped batch)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach() if isinstance(loss, Tensor) and loss.numel() == 1 else None
