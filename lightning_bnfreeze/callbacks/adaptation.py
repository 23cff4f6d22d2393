"""Glue between the callbacks and :func:`~lightning_bnfreeze.adapt.adapt_norm_statistics`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.modules.batchnorm import _NormBase

from lightning_bnfreeze.adapt import adapt_norm_statistics

__all__ = ["ADAPT_HOOK", "adapt_on_train_data", "check_adapt_batches"]

ADAPT_HOOK = "adapt_norm_step"
"""A LightningModule method ``adapt_norm_step(batch)``, if defined, runs the model on one batch."""


def check_adapt_batches(value: int | float | None) -> None:
    """Raise unless ``value`` is ``None``, an integer >= 1 (batches) or a float in (0, 1] (of an epoch)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    if isinstance(value, float) and 0 < value <= 1:
        return
    raise ValueError(
        f"`adapt_batches` must be None, a number of batches >= 1, or a fraction of an epoch in (0, 1], got {value!r}."
    )


def _default_forward(pl_module: pl.LightningModule) -> Any:
    def forward(batch: Any) -> Any:
        return pl_module(batch[0] if isinstance(batch, list | tuple) else batch)

    return forward


def adapt_on_train_data(
    trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[_NormBase], batches: int | float, owner: str
) -> None:
    """Re-estimate ``layers``' statistics on the first training batches, leaving the data order as it was.

    A batch reaches the model through ``pl_module.adapt_norm_step(batch)`` if the LightningModule
    defines it, else as ``pl_module(batch[0])`` for a tuple or list batch and ``pl_module(batch)``
    otherwise.
    """
    loader = trainer.train_dataloader
    if not isinstance(loader, Iterable):
        raise TypeError(f"{owner}: `adapt_batches` needs a single training dataloader, got {type(loader).__name__}.")
    count = batches if isinstance(batches, int) else 0
    if isinstance(batches, float):
        try:
            count = max(1, math.ceil(batches * len(loader)))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{owner}: `adapt_batches={batches}` is a fraction of an epoch, but the training dataloader has no"
                " length; give a number of batches."
            ) from None
    forward = getattr(pl_module, ADAPT_HOOK, None) or _default_forward(pl_module)
    with torch.random.fork_rng(devices=[]):  # the training data order stays as without adaptation
        on_device = (trainer.strategy.batch_to_device(batch) for batch in islice(loader, count))
        used = adapt_norm_statistics(pl_module, layers, on_device, forward)
    rank_zero_info(f"{owner}: statistics of {len(layers)} frozen norm layer(s) re-estimated on {used} batch(es).")
