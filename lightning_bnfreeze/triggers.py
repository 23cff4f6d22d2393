"""When releases happen, and the record of those that did, in plain Python.

A trigger decides which releases of a plan are due: :class:`ScheduleTrigger` at their time in the
plan (epochs or optimizer steps), :class:`PlateauTrigger` when a monitored metric stops improving.
The history of releases done is the state that a checkpoint keeps, so that a resumed run rebuilds
exactly the groups it had.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import inf
from typing import Any

from lightning_bnfreeze.checks import check_choice, check_integer
from lightning_bnfreeze.schedule import ReleasePlan

__all__ = ["MODES", "REASONS", "UNITS", "PlateauTrigger", "ReleaseRecord", "ScheduleTrigger", "describe_release"]

UNITS = ("epoch", "step")
MODES = ("min", "max")
REASONS = ("scheduled", "plateau", "max_phase", "early_stopping")


@dataclass(frozen=True)
class ReleaseRecord:
    """A release done: which one of the plan, when, why, and where its groups sit in the optimizer.

    ``step`` is the first optimizer step that trains it (``trainer.global_step`` at the release),
    ``epoch`` the epoch it happened in. ``reason`` is one of :data:`REASONS`; ``value`` is the
    monitored metric's value at the check that released it (``None`` for a scheduled release).
    """

    index: int
    epoch: int
    step: int
    reason: str
    positions: tuple[int, ...] = ()
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so that checkpoints load with ``torch.load(weights_only=True)``."""
        return {**asdict(self), "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ReleaseRecord:
        return cls(**{**state, "positions": tuple(state.get("positions", ()))})


class ScheduleTrigger:
    """Releases fall due when the epoch (or optimizer step) reaches their time in the plan."""

    def __init__(self, plan: ReleasePlan) -> None:
        self.plan = plan

    def due(self, epoch: int, step: int, done: set[int]) -> list[int]:
        """Indices of the plan's releases due at ``epoch``/``step`` and not in ``done``."""
        now = step if self.plan.unit == "step" else epoch
        return [i for i, release in enumerate(self.plan.releases) if release.at <= now and i not in done]


class PlateauTrigger:
    """Falls due when a monitored metric stops improving, where Lightning's ``EarlyStopping`` would stop.

    A check (:meth:`update`) improves when the value beats the best so far by more than ``min_delta``
    (lower with ``mode="min"``, higher with ``"max"``); after ``patience`` checks in a row without
    improvement the next release is due, once the current phase (the time since the last release,
    or since the start) is at least ``min_phase`` long. At ``max_phase`` it is due whatever the metric.
    The best value is kept across phases (a new phase must beat the earlier ones); the count of checks
    without improvement restarts at each release (:meth:`start_phase`). Times (``min_phase``,
    ``max_phase``) are in ``unit``: epochs (fractional for a check inside an epoch) or optimizer steps.

    Raises:
        ValueError: a bad argument, naming it and its value.
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        min_phase: int = 0,
        max_phase: int | None = None,
        unit: str = "epoch",
    ) -> None:
        if not isinstance(monitor, str) or not monitor.strip():
            raise ValueError(f"`monitor` must be the name of a logged metric, got {monitor!r}.")
        check_choice("mode", mode, MODES)
        check_choice("unit", unit, UNITS)
        check_integer("patience", patience, 1)
        check_integer("min_phase", min_phase, 0)
        if max_phase is not None:
            check_integer("max_phase", max_phase, 1)
        if isinstance(min_delta, bool) or not isinstance(min_delta, int | float) or not min_delta >= 0:
            raise ValueError(f"`min_delta` must be a number >= 0, got {min_delta!r}.")
        if max_phase is not None and max_phase < min_phase:
            raise ValueError(f"`max_phase={max_phase}` is below `min_phase={min_phase}`.")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.min_phase = min_phase
        self.max_phase = max_phase
        self.unit = unit
        self.reset()

    def reset(self) -> None:
        """Back to the start of a fit: no best value, no check counted, the first phase starting at 0."""
        self.best = inf if self.mode == "min" else -inf
        self.wait = 0
        self.phase_start = 0.0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (NaN never does)."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: float, step: int) -> str | None:
        """Count a check of ``value`` at ``epoch`` (fractional inside one) and optimizer ``step``.

        Returns why the next release is due (``"plateau"`` or ``"max_phase"``), or ``None``.
        """
        if self.improves(value):
            self.best = value
            self.wait = 0
        else:
            self.wait += 1
        age = self._now(epoch, step) - self.phase_start
        if self.wait >= self.patience and age >= self.min_phase:
            return "plateau"
        if self.max_phase is not None and age >= self.max_phase:
            return "max_phase"
        return None

    def start_phase(self, epoch: float, step: int) -> None:
        """A release happened at ``epoch``/``step``: a new phase starts, with its own patience."""
        self.phase_start = self._now(epoch, step)
        self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "phase_start": self.phase_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.wait = int(state["wait"])
        self.phase_start = float(state["phase_start"])

    def _now(self, epoch: float, step: int) -> float:
        return float(step) if self.unit == "step" else float(epoch)


def describe_release(record: ReleaseRecord, unit: str, metric: str | None = None) -> str:
    """When and why ``record`` happened, in words: ``"epoch 3"``, ``"step 40 (epoch 2), val_loss stopped improving"``"""
    when = f"epoch {record.epoch}" if unit == "epoch" else f"step {record.step} (epoch {record.epoch})"
    value = "" if record.value is None else f" at {record.value:.4g}"
    why = {
        "scheduled": "",
        "plateau": f", {metric} stopped improving{value}",
        "max_phase": f", the phase reached `max_phase` ({metric}{value})",
        "early_stopping": f", EarlyStopping on {metric} ran out of patience{value}: releasing instead of stopping",
    }[record.reason]
    return when + why
