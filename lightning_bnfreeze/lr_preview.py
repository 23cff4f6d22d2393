"""Every param group's learning rate at every optimizer step of a fit, without training, in plain PyTorch.

:func:`simulate` runs the real optimizer's real LR schedulers on a budget (epochs, batches per
epoch, gradient accumulation) the way Lightning steps them (``interval``, ``frequency``), and
drives the same :class:`~lightning_bnfreeze.release.Unfreezer` as a fit (its trigger, scaled groups,
warm-up, schedulers extended): no forward, no backward, no optimizer step. Releases on a plateau
are placed at their earliest possible step: a metric that never improves after its first check,
checked at each epoch end.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_bnfreeze.release import Unfreezer

__all__ = ["Budget", "LrPreview", "PreviewRelease", "SchedulerStep", "simulate"]


@dataclass(frozen=True)
class Budget:
    """A Trainer's budget: ``max_epochs`` epochs (``None``/``-1``: no limit) or ``max_steps`` optimizer
    steps (``-1``: no limit), whichever ends first, of ``batches_per_epoch`` batches accumulated by
    ``accumulate_grad_batches`` (the last batch of an epoch always steps, as in Lightning)."""

    batches_per_epoch: int
    max_epochs: int | None = None
    max_steps: int = -1
    accumulate_grad_batches: int = 1

    def __post_init__(self) -> None:
        for argument, value, least in (
            ("batches_per_epoch", self.batches_per_epoch, 1),
            ("accumulate_grad_batches", self.accumulate_grad_batches, 1),
            ("max_epochs", -1 if self.max_epochs is None else self.max_epochs, -1),
            ("max_steps", self.max_steps, -1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{argument}` must be an integer >= {least}, got {value!r}.")
        if self.max_steps < 0 and (self.max_epochs is None or self.max_epochs < 0):
            raise ValueError("The preview needs an end: set `max_epochs` or `max_steps`.")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulate_grad_batches)

    @property
    def total_steps(self) -> int:
        limits = [self.max_steps] if self.max_steps >= 0 else []
        if self.max_epochs is not None and self.max_epochs >= 0:
            limits.append(self.max_epochs * self.steps_per_epoch)
        return min(limits)


@dataclass(frozen=True)
class SchedulerStep:
    """An LR scheduler as Lightning steps it: every ``frequency`` ``interval``\\ s (``"step"`` or ``"epoch"``)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    reduce_on_plateau: bool = False


@dataclass(frozen=True)
class PreviewRelease:
    """A release at optimizer ``step`` (in ``epoch``); ``earliest``: on a plateau, at the earliest it can happen."""

    step: int
    epoch: int
    names: tuple[str, ...]
    earliest: bool = False


@dataclass
class LrPreview:
    """The learning rate of each param group (by name, ``pg<i>`` if unnamed) at each optimizer step.

    ``lrs[name][s]`` is the rate step ``s`` runs with (``None`` before the group exists): what
    ``LearningRateMonitor(logging_interval="step")`` logs at step ``s``.
    """

    steps_per_epoch: int
    lrs: dict[str, list[float | None]]
    releases: list[PreviewRelease]
    notes: list[str]

    def table(self) -> str:
        """A text table: the rates at the first step, each epoch start, each release and the last step."""
        last = max((len(values) for values in self.lrs.values()), default=0) - 1
        steps = {0, last, *range(0, last + 1, self.steps_per_epoch), *(r.step for r in self.releases if r.step <= last)}
        header = ["step", "epoch", *self.lrs]
        rows = [header]
        for step in sorted(s for s in steps if s >= 0):
            rates = [self.lrs[name][step] for name in self.lrs]
            rows.append(
                [str(step), str(step // self.steps_per_epoch), *("-" if r is None else f"{r:.4g}" for r in rates)]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        for release in self.releases:
            when = "earliest possible, on a plateau" if release.earliest else "scheduled"
            lines.append(f"release at step {release.step} (epoch {release.epoch}, {when}): {', '.join(release.names)}")
        return "\n".join([*lines, *self.notes])

    def plot(self, path: str | Path, title: str = "Learning rate of each param group") -> Path:
        """Write a PNG: one line per group (each in its own style, so equal rates stay visible), releases marked.

        Needs matplotlib (``pip install matplotlib``).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("The learning-rate plot needs matplotlib: `pip install matplotlib`.") from None
        figure = Figure(figsize=(10, 5), layout="constrained")
        axes = figure.subplots()
        styles = ("-", "--", "-.", ":")
        widths = [4.0 - 3.0 * i / max(1, len(self.lrs) - 1) for i in range(len(self.lrs))]  # wide lines first
        for i, (name, rates) in enumerate(self.lrs.items()):
            points = [(step, rate) for step, rate in enumerate(rates) if rate is not None]
            axes.plot(*zip(*points, strict=True), styles[i % len(styles)], lw=widths[i], label=name, alpha=0.85)
        top = max((r for rates in self.lrs.values() for r in rates if r is not None), default=1.0)
        for release in self.releases:
            axes.axvline(release.step, color="grey", lw=0.8, ls=":" if release.earliest else "-")
            label = ", ".join(release.names) + (" (earliest)" if release.earliest else "")
            axes.text(release.step, top, f" {label}", rotation=90, va="top", ha="left", fontsize=7, color="dimgrey")
        axes.set(xlabel="optimizer step", ylabel="learning rate", title=title)
        axes.legend(fontsize=8)
        figure.savefig(path, dpi=120)
        return Path(path)


def simulate(unfreezer: Unfreezer, schedulers: Sequence[SchedulerStep], budget: Budget) -> LrPreview:
    """The learning rates of the unfreezer's optimizer groups over ``budget``, as its trigger releases its plan.

    ``unfreezer`` (on a copy of the model, with that copy's optimizer and ``schedulers``) is driven as a
    fit would drive it, without forward, backward or optimizer step. A trigger checked on metrics sees
    its metric never improve after its first check, at each epoch end: a plateau's earliest releases.
    """
    unfreezer.freeze()
    optimizer = unfreezer.groups.optimizer
    trigger = unfreezer.trigger
    on_metrics = trigger.checked_at == "metrics"
    monitor = getattr(trigger, "monitor", None)
    lrs: dict[str, list[float | None]] = {}
    releases: list[PreviewRelease] = []
    step, epoch, per_epoch = 0, 0, budget.steps_per_epoch

    def advance(checked_at: str, metrics: dict[str, float] | None = None) -> None:
        moment = unfreezer.moment(epoch, step, metrics)
        for record in unfreezer.advance(moment, checked_at):
            names = tuple(part.name for part in unfreezer.plan.releases[record.index])
            releases.append(PreviewRelease(step, epoch, names, on_metrics))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        while step < budget.total_steps:
            advance("epoch")
            for batch in range(budget.batches_per_epoch):
                if step >= budget.total_steps:
                    break
                if batch % budget.accumulate_grad_batches == 0:  # the first batch of an optimizer step
                    advance("step")
                    unfreezer.before_step(step)
                    for i, group in enumerate(optimizer.param_groups):
                        lrs.setdefault(str(group.get("name", f"pg{i + 1}")), [None] * step).append(float(group["lr"]))
                last_batch = batch == budget.batches_per_epoch - 1
                if (batch + 1) % budget.accumulate_grad_batches == 0 or last_batch:
                    step += 1
                    _step_schedulers(schedulers, "step", batch + 1)
                if last_batch:
                    _step_schedulers(schedulers, "epoch", epoch + 1)
            epoch += 1
            if on_metrics and isinstance(monitor, str):
                advance("metrics", {monitor: 0.0})  # never better than the first check
    notes = [
        f"{type(s.scheduler).__name__}: held constant (it follows a metric)." for s in schedulers if s.reduce_on_plateau
    ]
    if on_metrics:
        notes.append(
            f"Releases on {monitor!r}, checked at each epoch end: the earliest possible steps."
            if isinstance(monitor, str)
            else f"Releases of {trigger!r} depend on the logged metrics: not previewed."
        )
    return LrPreview(per_epoch, lrs, releases, notes)


def _step_schedulers(schedulers: Sequence[SchedulerStep], interval: str, count: int) -> None:
    # Lightning counts batches (not optimizer steps) for `interval="step"`, epochs for "epoch", from 1.
    for item in schedulers:
        if item.interval == interval and not item.reduce_on_plateau and count % item.frequency == 0:
            item.scheduler.step()
