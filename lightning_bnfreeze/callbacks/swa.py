"""Frozen norm layers keep their statistics through Lightning's ``StochasticWeightAveraging``.

After its last averaging epoch, SWA resets the statistics of every BatchNorm layer (new zero and one
tensors, ``num_batches_tracked`` zeroed in place) and re-estimates them in one train-mode pass over
the training data. A frozen layer stays in inference mode through that pass, so it would end with
mean 0 and variance 1: the reset is made to leave frozen layers as they are, the same tensors with
the same values. Recognised by class name, so that ``pytorch_lightning``'s callback is too.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_bnfreeze.norm import is_norm_frozen, named_norm_layers

__all__ = ["keep_frozen_statistics_through_swa"]

_RESET = "reset_batch_norm_and_save_state"
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def keep_frozen_statistics_through_swa(trainer: pl.Trainer) -> None:
    """Make the ``StochasticWeightAveraging`` callbacks of ``trainer`` leave frozen layers alone (once each)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        swa = any(cls.__name__ == "StochasticWeightAveraging" for cls in type(callback).__mro__)
        if swa and _RESET not in vars(callback):
            setattr(callback, _RESET, _skipping_frozen(getattr(callback, _RESET)))


def _skipping_frozen(reset: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    def reset_all_but_frozen(pl_module: nn.Module) -> None:
        frozen = [layer for _, layer in named_norm_layers(pl_module) if is_norm_frozen(layer)]
        kept = [
            (layer, name, tensor, tensor.clone())
            for layer in frozen
            for name in _STATISTICS
            if (tensor := getattr(layer, name)) is not None
        ]
        reset(pl_module)
        with torch.no_grad():
            for layer, name, tensor, value in kept:
                setattr(layer, name, tensor.copy_(value))

    return reset_all_but_frozen
