"""What :class:`~lightning_bnfreeze.GradualUnfreeze` keeps in a checkpoint, and how a resumed fit takes it back.

The state is held from ``load_state_dict`` until ``on_fit_start`` builds the fit's releases from it (their param
groups must exist before Lightning restores the optimizer), or, under ``ModelParallelStrategy``, applied to them
later, when the strategy restores the checkpoint. Keys: ``"unfreezer"`` (the releases done, the groups' rates, the
first-step decisions, the ``lr_scale`` and ``bn`` they ran with), ``"adapt_auto"`` (whether ``adapt="auto"``
applies: absent in checkpoints of 0.7 and older, which resume without it), ``"source_statistics"`` (far from the
source, from fit start until ``bn="auto"`` decides: the backbone's statistics before ``adapt="auto"`` replaced them,
as lists), ``"first_step_gradients"`` (whether the first release's gradients are still to be read: steps that a
gradient scaler skipped; absent before 0.11), ``"loss_check"`` (the losses around the first release that the loss
check keeps and, while it watches them, its snapshot; absent before 0.13), ``"divergence_check"`` (the losses of
the fit's first batches and of the epoch's last, the lowest epoch and its copy; absent before 0.14, whose fits resume
without it) and the adaptation's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_bnfreeze.adapt import AUTO_BATCHES, AdaBN
from lightning_bnfreeze.callbacks.adaptation import TrainDataAdaptation
from lightning_bnfreeze.callbacks.fit_releases import FitReleases
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.saved_releases import changed_rate

__all__ = ["FitState"]


class FitState:
    """The fit's releases (``fit``, ``None`` outside a fit) and the checkpointed state they start from.

    ``adapt_auto``: the callback was built with ``adapt="auto"``; ``adaptation``: its AdaBN, saved alongside;
    ``on_loss_rise``: its ``on_loss_rise``.
    """

    def __init__(self, adapt_auto: bool, adaptation: TrainDataAdaptation, on_loss_rise: str = "retry") -> None:
        self._adapt_auto = adapt_auto
        self._adaptation = adaptation
        self._on_loss_rise = on_loss_rise
        self._saved: dict[str, Any] | None = None
        self.fit: FitReleases | None = None

    def reset(self) -> None:
        """A new fit: it takes that fit's checkpoint, if any, not an earlier one's."""
        self._saved = None
        self.fit = None

    def start(self, unfreezer: Unfreezer, statistics_changed: Callable[[], None]) -> FitReleases:
        """The fit's releases, as the checkpoint being resumed left them (if any): frozen, groups rebuilt."""
        if self._saved is not None:
            _load_releases(unfreezer, self._saved["unfreezer"])
        unfreezer.freeze()
        unfreezer.restore()
        self.fit = FitReleases(
            unfreezer, self._adaptation, statistics_changed, self._on_training_norms(self._saved), self._on_loss_rise
        )
        self._load_fit_state(self._saved)
        self._saved = None  # the fit holds what it needs (a snapshot's copies among it)
        return self.fit

    def restore_late(self, state: dict[str, Any] | None) -> None:
        """The checkpoint's ``state`` once the fit has started (``ModelParallelStrategy`` restores after
        ``on_fit_start``)."""
        if state is not None and self.fit is not None:
            _load_releases(self.fit.unfreezer, state["unfreezer"])
            self.fit.unfreezer.restore()
            self.fit.on_training_norms = self._on_training_norms(state)
            self._load_fit_state(state)

    def _load_fit_state(self, saved: dict[str, Any] | None) -> None:
        assert self.fit is not None
        self.fit.source_statistics = _source_statistics(saved)
        self.fit.first_step_gradients.due = _gradients_pending(saved)
        self.fit.loss_check.load_state_dict((saved or {}).get("loss_check", {}))
        self.fit.divergence_check.load_state_dict({} if saved is None else saved.get("divergence_check"))

    def _on_training_norms(self, saved: dict[str, Any] | None) -> AdaBN | None:
        """``adapt="auto"``'s AdaBN, unless the fit resumes a checkpoint of a run without it (0.7 and older)."""
        ran_with_it = saved is None or saved.get("adapt_auto", False)
        return AdaBN(AUTO_BATCHES) if self._adapt_auto and ran_with_it else None

    def state_dict(self) -> dict[str, Any]:
        """The fit's state; before a fit, the state loaded (saved again as it was read)."""
        if self.fit is not None:
            unfreezer, adabn = self.fit.unfreezer.state_dict(), self.fit.on_training_norms
            source, pending = self.fit.source_statistics, self.fit.first_step_gradients.pending
            statistics = None if source is None else [[mean.tolist(), var.tolist()] for mean, var in source]
            losses = self.fit.loss_check.state_dict()
            divergence: dict[str, Any] | None = self.fit.divergence_check.state_dict()
        else:
            saved = self._saved or {}
            unfreezer, adabn = saved.get("unfreezer", {}), self._on_training_norms(self._saved)
            statistics, pending = saved.get("source_statistics"), _gradients_pending(saved)
            # a checkpoint of 0.13 or older: its fit resumes without the divergence check, and saves so again
            losses = saved.get("loss_check", {})
            divergence = saved.get("divergence_check") if self._saved is not None else {}
        return {
            "unfreezer": unfreezer,
            "adapt_auto": adabn is not None,
            "source_statistics": statistics,
            "first_step_gradients": pending,
            "loss_check": losses,
            "divergence_check": divergence,
            **self._adaptation.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hold ``state_dict`` for the fit about to start (a fit in progress keeps its own releases)."""
        if "unfreezer" not in state_dict:
            raise ValueError(
                "GradualUnfreeze: the checkpoint was saved by lightning_bnfreeze 0.2 or older, whose state is laid out"
                " otherwise: resume it with that version, or start the fit anew."
            )
        self._adaptation.load_state_dict(state_dict)
        if self.fit is None:  # before `on_fit_start`: it rebuilds the groups from this
            self._saved = state_dict


def _load_releases(unfreezer: Unfreezer, saved: dict[str, Any]) -> None:
    """Load the checkpoint's releases into ``unfreezer`` (it refuses those it cannot take), with a warning if they ran
    at another ``lr_scale``."""
    unfreezer.load_state_dict(saved)
    if (changed := changed_rate(saved, unfreezer.lr_scale)) is not None:
        rank_zero_warn(changed)


def _source_statistics(saved: dict[str, Any] | None) -> list[tuple[Tensor, Tensor]] | None:
    """The checkpoint's ``"source_statistics"`` as tensors (float64: every value of a float buffer, exactly)."""
    statistics = (saved or {}).get("source_statistics")
    if statistics is None:
        return None
    return [
        (torch.tensor(mean, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)) for mean, var in statistics
    ]


def _gradients_pending(saved: dict[str, Any] | None) -> bool:
    """The checkpoint's ``"first_step_gradients"`` (absent before 0.11: none pending)."""
    return bool((saved or {}).get("first_step_gradients", False))
