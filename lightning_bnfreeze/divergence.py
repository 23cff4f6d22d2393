"""Whether a fit lost what it had learned, epoch by epoch (plain PyTorch).

A fit diverged when the mean training loss over an epoch's last batches is :data:`DIVERGED` times the mean over the
fit's first batches, or more (or no longer finite): it is back above where the new head started. A pretrained
transformer of the real-weights benchmark collapsed so at a large SGD rate, epochs after its first release
(``benchmarks/release_loss.md``), where the loss check of the first release
(:mod:`~lightning_bnfreeze.loss_rise`) sees it fall.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_bnfreeze.loss_rise import MIN_BATCHES, mean_loss, read_losses

__all__ = ["DIVERGED", "EpochLoss", "LossDivergence"]

DIVERGED = 1.1
"""How many times the mean loss over the fit's first batches an epoch's last batches must reach to have diverged.
Calibrated on every fit of the release-loss benchmark (the default's, on every setting of the transfer benchmarks,
seeds 0-2, ``benchmarks/release_loss.md``): at most 1.03 in the runs that ended above the linear probe, 1.31 to 1.90
in the transformer's collapses at SGD 3e-2. 1.2 until 0.15, and a 5-step warm-up's collapses on the transformer stayed
under it on some seeds (1.16 and 1.14; every setting of every transfer bench with ``warmup_steps=5``, seeds 0-2,
``benchmarks/release_loss_warmup.md``: at most 1.01 in the runs that did not collapse): a classifier collapsed to
chance has about the new head's loss."""


@dataclass(frozen=True)
class EpochLoss:
    """The mean training loss over an epoch's last ``batches`` batches (``last``) and over the fit's first
    ``first_batches`` (``first``)."""

    first: float
    last: float
    first_batches: int
    batches: int

    @property
    def ratio(self) -> float:
        """``last / first``; ``nan`` for a first loss that is not positive (no ratio says how far it rose)."""
        return self.last / self.first if self.first > 0 else math.nan

    @property
    def diverged(self) -> bool:
        """By :data:`DIVERGED` or more, or from a finite loss to one that is not."""
        return self.ratio >= DIVERGED or (math.isfinite(self.first) and not math.isfinite(self.last))


class LossDivergence:
    """The training losses of a fit's first ``window`` batches and of each epoch's last ``window``, and the lowest
    epoch's.

    Args:
        window: the most batches compared at each end (an epoch's, say).

    Example::

        >>> watch = LossDivergence(window=2)
        >>> for loss in (2.0, 1.6, 1.0, 0.8):
        ...     watch.record(loss)
        >>> ended = watch.epoch_ended()
        >>> ended.last, ended.diverged, watch.keep_if_lowest(ended)
        (0.9, False, True)
        >>> for loss in (3.0, 2.4):
        ...     watch.record(loss)
        >>> watch.epoch_ended().diverged
        True
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"`window` must be a positive number of batches, got {window!r}.")
        # Tensors stay on their device: read once an epoch (no synchronisation at every step).
        self._first: list[float | Tensor] = []
        self._last: deque[float | Tensor] = deque(maxlen=window)
        self._recorded = 0  # batches recorded in the fit (but those undone)
        self._lowest = math.inf

    def record(self, loss: float | Tensor) -> None:
        """A batch's training loss."""
        if len(self._first) < (self._last.maxlen or 0):
            self._first.append(loss)
        self._last.append(loss)
        self._recorded += 1

    def epoch(self) -> EpochLoss | None:
        """The epoch so far as an :class:`EpochLoss`; ``None`` if fewer than
        :data:`~lightning_bnfreeze.loss_rise.MIN_BATCHES` of it, or of the fit's first, were recorded."""
        if len(self._last) < MIN_BATCHES or len(self._first) < MIN_BATCHES:
            return None
        return EpochLoss(mean_loss(self._first), mean_loss(self._last), len(self._first), len(self._last))

    def epoch_ended(self) -> EpochLoss | None:
        """:meth:`epoch`, its batches forgotten."""
        ended = self.epoch()
        self._last.clear()
        return ended

    def keep_if_lowest(self, ended: EpochLoss) -> bool:
        """Whether ``ended`` is the lowest epoch yet (kept as such if so)."""
        if not ended.last < self._lowest:
            return False
        self._lowest = ended.last
        return True

    def forget(self, batches: int) -> None:
        """The last ``batches`` recorded were undone: neither the epoch's nor the fit's first any more."""
        for _ in range(min(batches, len(self._last))):
            self._last.pop()
        self._recorded = max(self._recorded - batches, 0)
        del self._first[self._recorded :]

    def state_dict(self) -> dict[str, Any]:
        """The losses kept, as floats (read now)."""
        return {
            "first": read_losses(self._first),
            "last": read_losses(self._last),
            "recorded": self._recorded,
            "lowest": self._lowest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._first = list(state.get("first", ()))
        self._last = deque(state.get("last", ()), maxlen=self._last.maxlen)
        self._recorded = state.get("recorded", len(self._first))
        self._lowest = state.get("lowest", math.inf)
