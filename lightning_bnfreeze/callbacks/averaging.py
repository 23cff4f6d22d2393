"""Frozen norm layers keep their statistics bitwise through weight averaging (SWA, EMA).

Lightning's ``StochasticWeightAveraging`` resets every BatchNorm's statistics after its last
averaging epoch (new zero and one tensors) and re-estimates them in a train-mode pass, which a
frozen layer sits out in inference mode; ``WeightAveraging`` callbacks (``EMAWeightAveraging``)
average buffers too (``decay * a + (1 - decay) * a`` is not exactly ``a``) and copy or swap the
average into the model for validation and at the end. :class:`FrozenStatistics` keeps the values
a frozen layer's statistics must have and puts them back, where they differ, at the points those
callbacks have just run (the owning callback is placed behind them): each training epoch's start,
each validation's start, the end of training. Only values are copied: the tensors stay those the
model holds; statistics a Lazy layer has not materialised yet are kept from the first time they are seen.
Callbacks are recognised by class name, so that ``pytorch_lightning``'s are too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["AVERAGING_CALLBACKS", "FrozenStatistics", "is_averaging"]

AVERAGING_CALLBACKS = frozenset({"StochasticWeightAveraging", "WeightAveraging"})
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_averaging(callback: object) -> bool:
    """Whether ``callback`` averages weights (SWA, EMA or another ``WeightAveraging``)."""
    return any(cls.__name__ in AVERAGING_CALLBACKS for cls in type(callback).__mro__)


class FrozenStatistics:
    """The statistics the frozen norm layers must keep, and where they drifted, their values put back."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, str, torch.Tensor | None]] = []

    def save(self, layers: Iterable[nn.Module]) -> None:
        """Remember the statistics of ``layers`` as they are now (call whenever the frozen set changes)."""
        self._saved = [
            (layer, name, None if is_lazy(tensor) else tensor.detach().clone())
            for layer in layers
            for name in _STATISTICS
            if isinstance(tensor := getattr(layer, name, None), torch.Tensor)
        ]

    def restore(self) -> None:
        """Copy the remembered values into the layers' statistics where they differ (nothing else changes)."""
        with torch.no_grad():
            for i, (layer, name, value) in enumerate(self._saved):
                current = getattr(layer, name, None)
                if not isinstance(current, torch.Tensor) or is_lazy(current):
                    continue
                if value is None:  # materialised since: these are its values
                    self._saved[i] = (layer, name, current.detach().clone())
                elif not torch.equal(current, value.to(current.device)):
                    current.copy_(value)
