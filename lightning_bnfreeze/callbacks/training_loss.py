"""What the loss checks of :class:`~lightning_bnfreeze.GradualUnfreeze` read from a fit: the training loss of each
batch, how many batches they compare, and the rate they suggest when a loss they watch rose."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
from torch import Tensor

from lightning_bnfreeze.loss_rise import LOSS_WINDOW
from lightning_bnfreeze.release import Unfreezer

__all__ = ["batch_loss", "loss_window", "smaller_lr_scale", "training_loss"]


def training_loss(outputs: object) -> Tensor | None:
    """The loss of a training step's output (a one-element tensor, or a mapping with one as ``"loss"``), detached;
    ``None`` for an output without one (a skipped batch)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach() if isinstance(loss, Tensor) and loss.numel() == 1 else None


def batch_loss(trainer: pl.Trainer, loss: Tensor) -> Tensor:
    """The batch's training loss from its step output's (:func:`training_loss`), in float32: Lightning divides it by
    ``accumulate_grad_batches`` for the backward under automatic optimization."""
    if trainer.lightning_module.automatic_optimization:
        loss = loss * trainer.accumulate_grad_batches
    return loss.float()


def loss_window(trainer: pl.Trainer) -> int:
    """The most batches a loss check compares: an epoch's, at most :data:`~lightning_bnfreeze.loss_rise.LOSS_WINDOW`."""
    batches = trainer.num_training_batches
    return min(int(batches), LOSS_WINDOW) if math.isfinite(batches) else LOSS_WINDOW


def smaller_lr_scale(unfreezer: Unfreezer, on_rise: str) -> str:
    """The advice that ends a loss check's warning: a tenth of the rate the releases train at now."""
    scale = unfreezer.lr_scale * unfreezer.retry_scale
    retried = bool(unfreezer.history) and unfreezer.history[0].retries > 0
    return f"try a smaller lr_scale (lr_scale={scale / 10:g})" + (
        "" if on_rise == "retry" or retried else ", or on_loss_rise='retry'"
    )
