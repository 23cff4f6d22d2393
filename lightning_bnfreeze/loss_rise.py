"""Whether a release made the training loss rise, batch by batch (plain PyTorch).

Releasing a block should let the training loss fall faster, or at least not rise. When the mean training loss over
the batches after a release is :data:`LOSS_RISE` times the mean over as many batches before it, or more (or no
longer finite), the release's rate was more than the backbone could take: a pretrained transformer in the
real-weights benchmark collapsed that way (``benchmarks/transfer_minilm.md``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["LOSS_RISE", "LOSS_WINDOW", "MIN_BATCHES", "ON_LOSS_RISE", "RETRIES", "RETRY_SCALE", "LossRise", "Rise"]

LOSS_RISE = 1.1
"""How many times the mean loss before a release the mean after it must reach to be a rise. Calibrated on the first
release of the default fit, on every setting of the transfer benchmarks (seeds 0-2, ``benchmarks/release_loss.md``)."""
MIN_BATCHES = 2
"""The fewest batches after a release that are judged."""
LOSS_WINDOW = 50
"""The most batches on each side of a release whose training losses are compared (fewer: an epoch's)."""
ON_LOSS_RISE = ("retry", "warn")
"""What a rise does: the release undone and retried at :data:`RETRY_SCALE` of its rate, or a warning alone."""
RETRY_SCALE = 0.1
"""A retried release's rate, and every later release's, relative to the rate that made the loss rise."""
RETRIES = 2
"""The most times the release is retried (at a tenth, then a hundredth of its rate); a rise after the last warns."""


@dataclass(frozen=True)
class Rise:
    """The mean training loss over ``before_batches`` batches right before a release and over ``after_batches``
    batches after it."""

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
    """The training losses around each release, and whether they rose.

    Args:
        window: the most batches on each side of a release that are compared (an epoch's, say).

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
        self._recent: deque[float | Tensor] = deque(maxlen=window)  # the last batches, a release's "before"
        self._before: list[float | Tensor] = []  # the batches before the release watched
        self._after: list[float | Tensor] | None = None  # the batches since it: ``None`` outside a watch

    @property
    def watching(self) -> bool:
        """Whether a release is being watched (it started, and is not judged yet)."""
        return self._after is not None

    def record(self, loss: float | Tensor) -> Rise | None:
        """A batch's training loss; in a watch, once as many batches followed the release as preceded it (at most
        ``window``, at least :data:`MIN_BATCHES`): the :class:`Rise` (:meth:`judge`)."""
        if self._after is None:
            self._recent.append(loss)
            return None
        self._after.append(loss)
        if len(self._after) < max(len(self._before), MIN_BATCHES):
            return None
        return self.judge()

    def released(self) -> None:
        """A release: its watch starts, against the batches before it (none recorded: nothing to compare with, no
        watch). Judge an open watch first (:meth:`judge`): a watch still open is left as it is."""
        if self._after is None and self._recent:
            self._before, self._after = list(self._recent), []

    def judge(self) -> Rise | None:
        """End the watch (at its last batch, at a later release, at the fit's end): the :class:`Rise` over the
        batches after the release so far and as many before it; ``None`` if fewer than :data:`MIN_BATCHES` followed
        it, or outside a watch. Its batches are the next release's "before"."""
        if self._after is None:
            return None
        before, after = self._before[len(self._before) - len(self._after) :], self._after
        self._after = None
        self._recent.extend(after)
        if len(after) < MIN_BATCHES:
            return None
        return Rise(mean_loss(before), mean_loss(after), len(before), len(after))

    def retry(self) -> None:
        """Just after :meth:`judge`: the release was undone and starts again; its batches are forgotten, and its
        retry is watched against the same batches before it."""
        self._recent = deque(self._before, maxlen=self._recent.maxlen)
        self._after = []

    def state_dict(self) -> dict[str, Any]:
        """The losses kept, as floats (read now)."""
        return {
            "recent": read_losses(self._recent),
            "before": read_losses(self._before),
            "after": None if self._after is None else read_losses(self._after),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._recent = deque(state.get("recent", ()), maxlen=self._recent.maxlen)
        self._before = list(state.get("before", ()))
        after = state.get("after")
        self._after = None if after is None else list(after)


def mean_loss(losses: Sequence[float | Tensor]) -> float:
    """The mean of ``losses`` in double precision (:func:`read_losses`): the same whether they are still tensors or
    floats a checkpoint kept."""
    return sum(read_losses(losses)) / len(losses)


def read_losses(losses: Sequence[float | Tensor] | deque[float | Tensor]) -> list[float]:
    """``losses`` as floats, the tensors among them read at once, wherever they are."""
    tensors = [loss.reshape(()) for loss in losses if isinstance(loss, Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return [next(read) if isinstance(loss, Tensor) else float(loss) for loss in losses]
