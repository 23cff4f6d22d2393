"""A callback that plots each param group's learning rate and the validation accuracy over the epochs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch.optim import Optimizer
from typing_extensions import override

__all__ = ["SchedulePlot"]


class SchedulePlot(Callback):
    """Record the learning rate of every param group and a validation metric per epoch; plot them at fit end.

    The learning rate recorded for an epoch is the one of its last optimizer step.

    A group is labelled by its ``"name"`` (``GradualUnfreeze`` names the groups it adds after the
    released modules), an unnamed first group ``"head"`` and other unnamed ones ``"group<i>"``. A
    group released mid-run appears from its release epoch on, so the plot shows the schedule. The
    PNG goes to ``filename`` in the run's log directory (``trainer.log_dir``); its path is logged
    and kept in :attr:`path`.

    Args:
        filename: name of the PNG file.
        monitor: the logged validation metric to plot.
    """

    def __init__(self, filename: str = "schedule.png", monitor: str = "val_acc") -> None:
        self.filename = filename
        self.monitor = monitor
        self.lrs: dict[str, dict[int, float]] = {}
        self.metric: dict[int, float] = {}
        self.path: Path | None = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # At every step (the last one of an epoch wins), after every callback's batch-start hook
        # (GradualUnfreeze's releases and warm-up), before any LR scheduler steps.
        epoch = trainer.current_epoch
        for index, optimizer in enumerate(trainer.optimizers):
            prefix = f"opt{index}/" if len(trainer.optimizers) > 1 else ""
            for number, group in enumerate(optimizer.param_groups):
                name = group.get("name") or ("head" if number == 0 else f"group{number}")
                self.lrs.setdefault(prefix + name, {})[epoch] = float(group["lr"])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None:
            self.metric[trainer.current_epoch] = float(value)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not (self.lrs or self.metric):
            return
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.filename
        self.figure(title=str(directory)).savefig(self.path, dpi=120)
        rank_zero_info(f"SchedulePlot: learning rates and {self.monitor} per epoch plotted in {self.path}")

    def figure(self, title: str = "") -> Figure:
        """The plot: learning rates (log scale) on top, the validation metric below, over the epochs.

        Dotted vertical lines mark the epochs at which a param group first appears (a release).
        """
        figure = Figure(figsize=(7, 6), layout="constrained")
        figure.suptitle(title, fontsize="small")
        lr_axes, metric_axes = figure.subplots(2, 1, sharex=True)
        for name, by_epoch in self.lrs.items():
            epochs = sorted(by_epoch)
            lr_axes.plot(epochs, [by_epoch[e] for e in epochs], marker=".", label=name)
        if any(lr > 0 and math.isfinite(lr) for by_epoch in self.lrs.values() for lr in by_epoch.values()):
            lr_axes.set_yscale("log")
        lr_axes.set_ylabel("learning rate")
        lr_axes.set_title("Learning rate per param group")
        if self.lrs:
            lr_axes.legend(fontsize="small")
        epochs = sorted(self.metric)
        metric_axes.plot(epochs, [self.metric[e] for e in epochs], marker="o", color="black")
        metric_axes.set_ylabel(self.monitor)
        metric_axes.set_xlabel("epoch")
        metric_axes.set_title(f"Validation {self.monitor}")
        metric_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        first_epoch = min((min(by_epoch) for by_epoch in self.lrs.values()), default=0)
        for release in sorted({min(by_epoch) for by_epoch in self.lrs.values()} - {first_epoch}):
            for axes in (lr_axes, metric_axes):
                axes.axvline(release, color="grey", linestyle=":", linewidth=1)
        for axes in (lr_axes, metric_axes):
            axes.grid(alpha=0.3)
        return figure

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "metric": self.metric}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lrs = {name: dict(by_epoch) for name, by_epoch in state_dict["lrs"].items()}
        self.metric = dict(state_dict["metric"])
