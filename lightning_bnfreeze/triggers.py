"""When the next release happens: ``GradualUnfreeze(when=...)``, in plain Python.

A :class:`Trigger` is asked, at the points of a fit its :attr:`~Trigger.checked_at` names, whether
the next release of the plan is due; it answers with a reason (``"scheduled"``, ``"plateau"``,
...) or ``None``. :class:`Every` releases on a cadence of epochs or optimizer steps,
:class:`Plateau` when a logged metric stops improving, :class:`At` at given times (the trigger of
an explicit schedule). Write your own by subclassing :class:`Trigger`::

    >>> class BelowLoss(Trigger):
    ...     '''Release the next block once the validation loss is below ``threshold``.'''
    ...
    ...     checked_at = "metrics"  # where EarlyStopping checks: after validation
    ...
    ...     def __init__(self, threshold: float, monitor: str = "val_loss") -> None:
    ...         self.threshold, self.monitor = threshold, monitor
    ...
    ...     def check(self, moment: Moment) -> str | None:
    ...         return "below threshold" if moment.metric(self.monitor) < self.threshold else None
    >>> BelowLoss(0.5).check(Moment(epoch=2, step=40, released=1, metrics={"val_loss": 0.4}))
    'below threshold'

A trigger that keeps state across a fit (a best value, a count) returns it from ``state_dict`` and
takes it back in ``load_state_dict``: it is saved in checkpoints, so that a resumed fit goes on as
the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import inf, isfinite
from typing import Any, ClassVar

from lightning_bnfreeze.checks import check_bool, check_choice, check_integer
from lightning_bnfreeze.names import closest_names

__all__ = ["CHECK_POINTS", "MODES", "UNITS", "At", "Every", "Moment", "Plateau", "Trigger"]

UNITS = ("epoch", "step")
MODES = ("min", "max")
CHECK_POINTS = ("epoch", "step", "metrics")


@dataclass(frozen=True)
class Moment:
    """Where a fit stands when a trigger is asked.

    ``epoch`` counts the epochs trained (an integer at an epoch's start; with the fraction of its
    batches done inside one), ``step`` the optimizer steps (``trainer.global_step``), ``released``
    the releases done, ``last_release`` the ``(epoch, step)`` of the last one (``None`` before the
    first), ``metrics`` the logged metrics (``trainer.callback_metrics``) as floats.
    """

    epoch: float
    step: int
    released: int = 0
    last_release: tuple[float, int] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def metric(self, name: str, argument: str = "monitor") -> float:
        """The logged metric ``name`` (the value of the trigger's ``argument``).

        Raises:
            RuntimeError: it is not logged, naming ``argument`` and the closest logged metrics.
        """
        if name not in self.metrics:
            close = closest_names(name, list(self.metrics))
            hint = f" Closest: {', '.join(map(repr, close))}." if close else ""
            raise RuntimeError(
                f"`{argument}` is {name!r}, which is not among the logged metrics.{hint} Logged:"
                f" {', '.join(map(repr, self.metrics)) or '(none)'}. Log it with `self.log({name!r}, ...)`."
            )
        return self.metrics[name]

    def now(self, unit: str) -> float:
        """The time in ``unit``: ``epoch`` or ``step``."""
        return float(self.step) if unit == "step" else float(self.epoch)

    def since_release(self, unit: str) -> float:
        """The time in ``unit`` since the last release (since the fit's start before the first)."""
        if self.last_release is None:
            return self.now(unit)
        epoch, step = self.last_release
        return self.now(unit) - (float(step) if unit == "step" else epoch)


class Trigger:
    """Decides when the next release happens. Subclass it and override :meth:`check`.

    ``checked_at`` says where :meth:`check` is called: ``"epoch"`` before each training epoch,
    ``"step"`` before each optimizer step (several releases may fall due at once there), or
    ``"metrics"`` where Lightning's ``EarlyStopping`` would check a metric (after each validation,
    or at the end of each training epoch when validation runs once per epoch; at most one release
    per check).
    """

    checked_at: ClassVar[str] = "epoch"

    def check(self, moment: Moment) -> str | None:
        """Why the next release is due at ``moment`` (a short reason, e.g. ``"scheduled"``), or ``None``."""
        raise NotImplementedError

    def released(self, moment: Moment) -> None:
        """A release happened at ``moment`` (asked by this trigger or another, e.g. an ``EarlyStopping``)."""

    def reset(self) -> None:
        """Forget the state of an earlier fit."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this trigger (plain Python types)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""

    def times(self, count: int) -> list[int] | None:
        """The times (in its unit) of the first ``count`` releases if known in advance, else ``None``."""
        return None

    @property
    def unit(self) -> str:
        """What the trigger's times count: ``"epoch"`` or ``"step"``."""
        return "step" if self.checked_at == "step" else "epoch"

    def __repr__(self) -> str:
        """The class and its public attributes, as the dry run shows a trigger of your own:
        ``BelowLoss(threshold=0.5, monitor='val_loss')``."""
        arguments = ", ".join(f"{name}={value!r}" for name, value in vars(self).items() if not name.startswith("_"))
        return f"{type(self).__name__}({arguments})"


class Every(Trigger):
    """A release every ``epochs`` epochs (at the epoch's start) or every ``steps`` optimizer steps.

    Args:
        epochs: epochs between releases (give this or ``steps``; default 1).
        steps: optimizer steps between releases; the release at step ``s`` trains from step ``s``.
        first: the time of the first release, in the same unit; default: one interval, so that the
            head trains alone first (``0``: release from the start).

    Raises:
        ValueError: both or neither interval, or an interval or ``first`` that is not an integer >= 1 (>= 0).
    """

    def __init__(self, epochs: int | None = None, steps: int | None = None, first: int | None = None) -> None:
        if epochs is not None and steps is not None:
            raise ValueError(f"`Every` takes `epochs` or `steps`, not both (got epochs={epochs}, steps={steps}).")
        interval = steps if steps is not None else 1 if epochs is None else epochs
        check_integer("steps" if steps is not None else "epochs", interval, 1)
        first = interval if first is None else first
        check_integer("first", first, 0)
        self.every = interval
        self.first = first
        self._unit = "step" if steps is not None else "epoch"

    @property
    def checked_at(self) -> str:  # type: ignore[override]
        return self._unit

    def check(self, moment: Moment) -> str | None:
        return "scheduled" if moment.now(self._unit) >= self.first + self.every * moment.released else None

    def times(self, count: int) -> list[int]:
        return [self.first + self.every * k for k in range(count)]

    def __repr__(self) -> str:
        return f"Every({self._unit}s={self.every}, first={self.first})"


class At(Trigger):
    """Release ``k`` at ``times[k]`` (epochs, or optimizer steps with ``unit="step"``): an explicit schedule's trigger.

    Raises:
        ValueError: a time that is not an integer >= 0, times out of order, or an unknown ``unit``.
    """

    def __init__(self, times: Sequence[int], unit: str = "epoch") -> None:
        check_choice("unit", unit, UNITS)
        for time in times:
            check_integer("times", time, 0)
        if list(times) != sorted(times):
            raise ValueError(f"`times` must be in increasing order, got {list(times)}.")
        self.at = list(times)
        self._unit = unit

    @property
    def checked_at(self) -> str:  # type: ignore[override]
        return self._unit

    def check(self, moment: Moment) -> str | None:
        due = moment.released < len(self.at) and moment.now(self._unit) >= self.at[moment.released]
        return "scheduled" if due else None

    def times(self, count: int) -> list[int]:
        return self.at[:count]

    def __repr__(self) -> str:
        return f"At({self.at}, unit={self._unit!r})"


class Plateau(Trigger):
    """The next release when a logged metric stops improving, where Lightning's ``EarlyStopping`` would stop.

    A check improves when ``monitor`` beats the best value so far by more than ``min_delta`` (lower
    with ``mode="min"``, higher with ``"max"``); after ``patience`` checks in a row without
    improvement the next release is due, once the time since the last release is at least
    ``min_phase``; at ``max_phase`` it is due whatever the metric. The best value carries over
    releases (a new phase must beat the earlier ones); each release restarts the count.

    Args:
        monitor: the logged metric.
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement before a release.
        min_delta: the least change that counts as an improvement.
        min_phase: the least time between two releases (and before the first), in ``unit``.
        max_phase: the most time between two releases, in ``unit`` (``None``: no limit).
        unit: what ``min_phase`` and ``max_phase`` count: ``"epoch"`` or ``"step"``.
        check_on_train_epoch_end: check at the end of each training epoch (``True``) or after each
            validation (``False``); ``None``: ``EarlyStopping``'s rule.

    Raises:
        ValueError: a bad argument, naming it and its value.
    """

    checked_at = "metrics"

    def __init__(
        self,
        monitor: str,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        min_phase: int = 0,
        max_phase: int | None = None,
        unit: str = "epoch",
        check_on_train_epoch_end: bool | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor.strip():
            raise ValueError(f"`monitor` must be the name of a logged metric, got {monitor!r}.")
        check_choice("mode", mode, MODES)
        check_choice("unit", unit, UNITS)
        check_integer("patience", patience, 1)
        check_integer("min_phase", min_phase, 0)
        check_bool("check_on_train_epoch_end", check_on_train_epoch_end, none=True)
        if max_phase is not None:
            check_integer("max_phase", max_phase, 1)
            if max_phase < min_phase:
                raise ValueError(f"`max_phase={max_phase}` is below `min_phase={min_phase}`.")
        if isinstance(min_delta, bool) or not isinstance(min_delta, int | float) or not min_delta >= 0:
            raise ValueError(f"`min_delta` must be a number >= 0, got {min_delta!r}.")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.min_phase = min_phase
        self.max_phase = max_phase
        self._unit = unit
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.reset()

    @property
    def unit(self) -> str:
        return self._unit

    def reset(self) -> None:
        self.best = inf if self.mode == "min" else -inf
        self.wait = 0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (NaN never does)."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def check(self, moment: Moment) -> str | None:
        value = moment.metric(self.monitor)
        if self.improves(value):
            self.best = value
            self.wait = 0
        else:
            self.wait += 1
        age = moment.since_release(self._unit)
        if self.wait >= self.patience and age >= self.min_phase:
            return "plateau"
        if self.max_phase is not None and age >= self.max_phase:
            return "max_phase"
        return None

    def released(self, moment: Moment) -> None:
        self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if isfinite(self.best) else None, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = (inf if self.mode == "min" else -inf) if best is None else float(best)
        self.wait = int(state.get("wait", 0))

    def __repr__(self) -> str:
        return f"Plateau({self.monitor!r}, mode={self.mode!r}, patience={self.patience})"
