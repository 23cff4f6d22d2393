"""Whether the first release made the training loss rise, batch by batch (plain PyTorch).

Releasing a block should let the training loss fall faster, or at least not rise. When the mean training loss over
the batches after the first release is :data:`LOSS_RISE` times the mean over as many batches before it, or more (or
no longer finite), the release's rate was more than the backbone could take: a pretrained transformer in the
real-weights benchmark collapsed that way (``benchmarks/transfer_minilm.md``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["LOSS_RISE", "MIN_BATCHES", "LossRise", "Rise"]

LOSS_RISE = 1.1
"""How many times the mean loss before the first release the mean after it must reach to be a rise. At the first
release of the default, on every setting of the transfer benchmarks (seeds 0-2, ``benchmarks/first_release_loss.md``):
at most 1.01x where the run ended above the linear probe; 1.25x to 1.51x where the pretrained transformer collapsed
at its first release (AdamW at head lr 3e-3). Its collapse under SGD at 3e-2 comes later: unseen here."""
MIN_BATCHES = 2
"""The fewest batches after the release that are judged."""


@dataclass(frozen=True)
class Rise:
    """The mean training loss over ``before_batches`` batches right before the first release and over
    ``after_batches`` batches after it."""

    before: float
    after: float
    before_batches: int
    after_batches: int

    @property
    def ratio(self) -> float:
        """``after / before``; ``nan`` for a loss before that is not positive (no ratio says how far it rose)."""
        return self.after / self.before if self.before > 0 else math.nan

    @property
    def rose(self) -> bool:
        """By :data:`LOSS_RISE` or more, or from a finite loss to one that is not."""
        return self.ratio >= LOSS_RISE or (math.isfinite(self.before) and not math.isfinite(self.after))


class LossRise:
    """The training losses around the first release, and whether they rose.

    Args:
        window: the most batches on each side of the release that are compared (an epoch's, say).

    Example::

        >>> watch = LossRise(window=3)
        >>> for loss in (1.6, 1.5, 1.6):
        ...     watch.record(loss)
        >>> watch.released()
        >>> [watch.record(loss) for loss in (3.3, 3.0, 1.5)][-1]
        Rise(before=1.5666666666666667, after=2.6, before_batches=3, after_batches=3)
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"`window` must be a positive number of batches, got {window!r}.")
        # Tensors stay on their device: read once, when judged (no synchronisation at every step).
        self._before: deque[float | Tensor] = deque(maxlen=window)
        self._after: list[float | Tensor] | None = None  # from the first release on, until judged
        self.judged = False

    def record(self, loss: float | Tensor) -> Rise | None:
        """A batch's training loss; after the first release, once as many batches followed it as preceded it (at
        most ``window``, at least :data:`MIN_BATCHES`): the :class:`Rise` (judged once)."""
        if self.judged:
            return None
        if self._after is None:
            self._before.append(loss)
            return None
        self._after.append(loss)
        if len(self._after) < max(len(self._before), MIN_BATCHES):
            return None
        return self.judge()

    def released(self) -> None:
        """The first release: the watch starts (none before it was recorded: nothing to compare with)."""
        if self._after is None and not self.judged:
            self._after = []
            self.judged = not self._before

    def judge(self) -> Rise | None:
        """End the watch (a later release, the fit's end): the :class:`Rise` over the batches after the first
        release so far and as many before it; ``None`` if fewer than :data:`MIN_BATCHES` followed it, or judged
        already."""
        if self.judged or self._after is None:
            return None
        self.judged = True
        before, after = list(self._before)[-len(self._after) :], self._after
        self._before, self._after = deque(), []
        if len(after) < MIN_BATCHES:
            return None
        return Rise(_mean(before), _mean(after), len(before), len(after))


def _mean(losses: Sequence[float | Tensor]) -> float:
    """One read of the values, wherever they are (a sum of tensors stays on their device)."""
    return float(sum(losses, 0.0)) / len(losses)
