"""The first optimizer step of each released part: how far it moved the part's weights, the cap on it
(``max_step``), and the norm mode ``bn="auto"`` decides from the first release's (plain PyTorch).

:class:`~lightning_bnfreeze.release.Unfreezer` tells :class:`FirstSteps` which parts a release frees and
when a step is taken; it applies the scales and the decision to its releases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.record import FirstStepNote
from lightning_bnfreeze.step_size import (
    AUTO,
    AUTO_STEP,
    NEAR_DECAY,
    RELEASED,
    SMALLEST_REFERENCE,
    STOP_STEP,
    FirstStep,
    MaxStep,
)

__all__ = ["FirstSteps", "Part"]

Part = tuple[int, int]
"""A released part: the index of its release and its position in that release."""


class FirstSteps:
    """The parts whose first step is still to come, and what the first steps taken so far decided.

    Args:
        bn: the released norm layers' mode: ``"train"`` (batch statistics), ``"frozen"`` (inference mode, frozen
            statistics, affine parameters training), or ``"auto"``: the first release whose first step moved its
            weights by more than :data:`~lightning_bnfreeze.step_size.SMALLEST_REFERENCE` decides: training if its
            largest part moved by more than :data:`AUTO_STEP` (relative; times ``1 / (1 - momentum)`` for momentum
            SGD), else frozen for every release; after training, the first later release whose largest first step
            is below :data:`STOP_STEP` stops it, for itself and every release after it (never a block with frozen
            statistics on the output side of one whose statistics train); frozen until the first decision.
        max_step: ``None``, ``"released"`` (no part's first step goes further than the parts released before
            it would move now: :meth:`judge`'s ``faster``), a number (the cap on every release's first step), or
            ``"auto"``: one of the first two, as :meth:`resolve` decides from the target's shift before the fit,
            near the source with later releases decayed once the first release moved fast (:meth:`rate_factor`),
            in rate and in the size of their first step.
        agree: turns a local decision into the decision of every rank (``any``; default: as it is).
    """

    def __init__(self, bn: str, max_step: MaxStep = None, agree: Callable[[bool], bool] = bool) -> None:
        self.bn = bn
        self.max_step = max_step
        self.source_shift: float | None = None  # max_step="auto": the shift it was resolved from
        self.near_decay = 1.0  # max_step="auto" near the source: NEAR_DECAY,
        self.near_step_cap = False  # which also caps first steps (from 0.7)
        self._agree = agree
        self.pending: list[Part] = []
        self._before: dict[Part, FirstStep] = {}
        self._first_index: int | None = None  # bn="auto": the first release whose weights moved,
        self._first_step = 0.0  # the largest first step of its parts,
        self._first_fast = False  # whether that step was above AUTO_STEP (on any rank),
        self._deciding: list[tuple[float, str, bool]] = []  # its parts: step, what it did, large; until decided
        self._measured: dict[int, tuple[float, str, bool]] = {}  # the same for each later release measured last
        self.norms_train: bool | None = None  # bn="auto": the mode of the releases from now on
        self.modes_matter = True  # False: no norm layer of the backbone keeps running statistics: no note on modes

    @property
    def first_step(self) -> float | None:
        """How far the first release whose weights moved moved them in its first step (relative, momentum included,
        after any cap); ``None`` before it is measured."""
        return None if self._first_index is None else self._first_step

    @property
    def unresolved(self) -> bool:
        """Whether ``max_step="auto"`` still waits for :meth:`resolve`."""
        return self.max_step == AUTO

    def resolve(self, shift: float | None, unknown: str = "no norm layer with running statistics measured it") -> str:
        """``max_step="auto"``: ``"released"`` and :data:`~lightning_bnfreeze.step_size.NEAR_DECAY` for later
        releases (:meth:`rate_factor`) when the target's norm statistics are less than
        :data:`~lightning_bnfreeze.domain_shift.NEAR_SOURCE` from the backbone's (``shift``), else ``None`` and no
        decay (also for ``shift=None``: nothing measured, as ``unknown`` says); what to say of it."""
        near = shift is not None and shift < NEAR_SOURCE
        self.max_step, self.source_shift = (RELEASED if near else None), shift
        self.near_decay = NEAR_DECAY if near else 1.0
        self.near_step_cap = near
        if shift is None:
            return (
                f"how far the target is from the backbone's source is unknown ({unknown}): released blocks train at"
                " their full rates (max_step=None)"
            )
        if near:
            return (
                f"the target's norm statistics are {shift:.2f} from the backbone's (< {NEAR_SOURCE}: near its source):"
                " no released block's first step goes further than the blocks released before it would move"
                f" (max_step='released'); once the first release's first step moves more than {AUTO_STEP:.1%},"
                f" release k trains at {NEAR_DECAY:g}**k of its rate and its first step moves at most"
                f" {NEAR_DECAY:g}**k as far as the first release's"
            )
        return (
            f"the target's norm statistics are {shift:.2f} from the backbone's (>= {NEAR_SOURCE}: far from its"
            " source): released blocks train at their full rates (max_step=None)"
        )

    def expect(self, index: int, parts: int) -> None:
        """Release ``index`` freed ``parts`` parts: their first steps are to come."""
        self.pending += [(index, position) for position in range(parts)]

    def snapshot(self, params_of: Callable[[Part], Iterable[nn.Parameter]]) -> None:
        """Before a step: keep the weights of the pending parts not kept yet (an accumulated batch keeps them)."""
        for part in self.pending:
            if part not in self._before:
                self._before[part] = FirstStep(params_of(part))

    def taken(self, released_at: Callable[[int], int], step: int) -> list[Part]:
        """The pending parts whose first step is done once ``step`` optimizer steps are (``released_at``: the
        step of a release)."""
        return [part for part in self.pending if part in self._before and released_at(part[0]) < step]

    def judge(
        self, part: Part, name: str, momentum: float, ramp: float, faster: float | None = None
    ) -> tuple[float, FirstStepNote | None]:
        """Measure part ``part``'s (named ``name``) first step, taken at ``ramp`` of its rate (a warm-up) with
        ``momentum``: the factor its rate is to be scaled by (the cap), and what to say of it. ``faster``: with
        ``max_step="released"``, how many times as far as the parts released before it that step would move them
        (:func:`~lightning_bnfreeze.step_size.step_now`; ``None``: nothing to compare with).

        A part of norm layers alone (no parameter with ``ndim >= 2``) is not judged: factor 1, nothing said.
        A collective under FSDP2 (sharded weights): call it on every rank alike.
        """
        self.pending.remove(part)
        probe = self._before.pop(part)
        if not probe.has_weights:  # norm layers alone: no step to judge, no cap, nothing to decide or say
            return 1.0, None
        change = probe.change(momentum) / ramp  # as at the full rate
        moved = f"{name}: its first step {'at the full rate ' if ramp < 1 else ''}moved its weights by {change:.2%}"
        if self.max_step == RELEASED:
            scale = 1.0 if faster is None or faster <= 1 else 1 / faster
            beyond = f"{faster or 0:.1f} times as far as the blocks released before it would move now"
            factor = self.rate_factor(part[0]) if self.near_step_cap else 1.0
            target = self._first_step * factor  # near the source: the decayed first step
            if factor < 1 and change * scale > target:
                scale = target / change
                beyond = f"more than {factor:.3g} x as far as the first release's first step ({target:.2%})"
        else:
            cap = None if self.max_step is None else float(self.max_step)
            scale = 1.0 if cap is None or change <= cap else cap / change
            beyond = f"above the cap of {cap or 0:.2%}"
        if scale < 1:
            change *= scale
            moved += f", {beyond}: its rate is scaled by {scale:.2f}, to steps of {change:.2%}"
        large, keeps = self._agree(change > AUTO_STEP), self._agree(change > STOP_STEP)
        if self._first_index in (None, part[0]) and change > SMALLEST_REFERENCE:  # the first release that moved
            self._first_index, self._first_step = part[0], max(self._first_step, change)
            self._first_fast = self._first_fast or large
            self._deciding.append((change, moved, large))
        elif self._first_index is not None and part[0] > self._first_index:
            self._measured[part[0]] = max(self._measured.get(part[0], (0.0, "", False)), (change, moved, keeps))
        bn = self.bn if self.modes_matter else ""  # the mode changes nothing: no warning about it
        return scale, FirstStepNote.judge(moved, bn, large, scale < 1, self.norms_train)

    def rate_factor(self, index: int) -> float:
        """The factor of release ``index``'s rates: ``near_decay ** k`` for the ``k``-th release after the first one
        whose weights moved, once that one's first step was above :data:`AUTO_STEP`; else (and before it is
        measured) 1. :meth:`judge` also caps that release's first step at this factor of the first one's."""
        if self._first_index is None or not self._first_fast or index <= self._first_index:
            return 1.0
        return self.near_decay ** (index - self._first_index)

    def decide(self) -> list[tuple[int, bool, FirstStepNote | None]]:
        """With ``bn="auto"``, after first steps were judged: each change of :attr:`norms_train` (the first decision,
        training stopped by a slow release), as the release it applies from, the mode, and what to say of it (``None``
        while the modes matter not: see :attr:`modes_matter`)."""
        measured, self._measured = self._measured, {}
        if self.bn != "auto":
            return []
        changes = []
        if self.norms_train is None and self._deciding:
            _, moved, self.norms_train = max(self._deciding)
            changes.append((0, self.norms_train, FirstStepNote.decide(moved, self.norms_train, len(self._deciding))))
        for index, (_, moved, keeps) in sorted(measured.items()):
            if self.norms_train and not keeps:
                self.norms_train = False
                changes.append((index, False, FirstStepNote.stop(moved)))
        return [(index, train, note if self.modes_matter else None) for index, train, note in changes]

    def state_dict(self) -> dict[str, Any]:
        return {
            "undecided": [list(part) for part in self.pending],
            "first_step": [self._first_index, self._first_step],
            "first_fast": self._first_fast,
            "norms_train": self.norms_train,
            "max_step": self.max_step,
            "source_shift": self.source_shift,
            "near_decay": self.near_decay,
            "near_step_cap": self.near_step_cap,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = [(int(index), int(position)) for index, position in state.get("undecided", ())]
        self._before = {}
        first_index, self._first_step = state.get("first_step", (None, 0.0))
        self._first_index = None if first_index is None else int(first_index)
        decided = None if self._first_index is None else self._first_step > AUTO_STEP  # a checkpoint from 0.3
        self._first_fast = bool(state.get("first_fast", decided))
        self.near_decay = float(state.get("near_decay", 1.0))  # before 0.6: no decay
        self.near_step_cap = bool(state.get("near_step_cap", False))  # before 0.7: the decayed rate alone
        self.norms_train = state.get("norms_train", decided) if self.bn == "auto" else None
        self._deciding = []
        if self.unresolved and "first_step" in state:  # a saved fit (from 0.4: no "max_step", which was None then)
            self.max_step, self.source_shift = state.get("max_step"), state.get("source_shift")
