"""A callback that plots each param group's learning rate and the validation and test accuracy over the epochs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator
from torch.optim import Optimizer
from typing_extensions import override

__all__ = ["SchedulePlot"]


class SchedulePlot(Callback):
    """Record the learning rate of every param group and the accuracy per epoch; plot them at fit end.

    The plot has one small panel per param group (its learning rate over the epochs, shaded grey
    while it is frozen, with its ratio to the head's learning rate) and, below, the accuracy:
    ``monitor`` on the validation set at every epoch and, once ``trainer.test`` ran,
    ``test_monitor`` on the test set as a dashed line, each with the number of images behind it
    and its 95% sampling error. Dotted lines mark the releases, labelled with the released modules.
    The axes are fixed (accuracy 0 to 1; learning rate on a log scale from a thousandth of the run's
    peak), so plots of runs with the same configuration compare at a glance.

    The learning rate recorded for an epoch is the one of its last optimizer step. A group is
    labelled by its ``"name"`` (``GradualUnfreeze`` names the groups it adds after the released
    modules), an unnamed first group ``"head"`` and other unnamed ones ``"group<i>"``. The PNG goes
    to ``filename`` in the run's log directory (``trainer.log_dir``), written at fit end and again
    after a test; its path is logged and kept in :attr:`path`.

    Args:
        filename: name of the PNG file.
        monitor: the logged validation accuracy (a metric in [0, 1]).
        test_monitor: the logged test accuracy.
    """

    def __init__(
        self, filename: str = "schedule.png", monitor: str = "val_acc", test_monitor: str = "test_acc"
    ) -> None:
        self.filename = filename
        self.monitor = monitor
        self.test_monitor = test_monitor
        self.lrs: dict[str, dict[int, float]] = {}
        self.metric: dict[int, float] = {}
        self.val_images = 0
        self.test_metric: float | None = None
        self.test_images = 0
        self.path: Path | None = None
        self._images = 0  # counted over the current evaluation epoch

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
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = 0

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._images += _batch_size(batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None:
            self.metric[trainer.current_epoch] = float(value)
            self.val_images = self._images

    # a test epoch counts its images as a validation epoch does
    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not (self.lrs or self.metric):
            return
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.filename
        self._save()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.test_monitor)
        if value is None:
            return
        self.test_metric, self.test_images = float(value), self._images
        if trainer.is_global_zero and self.path is not None:  # a test after this callback's fit: add it to the plot
            self._save()

    def _save(self) -> None:
        assert self.path is not None
        self.figure(title=str(self.path.parent)).savefig(self.path, dpi=120)
        rank_zero_info(f"SchedulePlot: learning rates and accuracy per epoch plotted in {self.path}")

    def releases(self) -> dict[int, list[str]]:
        """The param groups that appeared after the first epoch, by the epoch they appeared in."""
        first_epoch = min((min(by_epoch) for by_epoch in self.lrs.values()), default=0)
        releases: dict[int, list[str]] = {}
        for name, by_epoch in self.lrs.items():
            if min(by_epoch) > first_epoch:
                releases.setdefault(min(by_epoch), []).append(name)
        return dict(sorted(releases.items()))

    def figure(self, title: str = "") -> Figure:
        """The plot: one learning-rate panel per param group on top, the accuracy below, over the epochs."""
        groups = list(self.lrs)
        figure = Figure(figsize=(8, 3.6 + 0.7 * len(groups)), layout="constrained")
        figure.suptitle(title, fontsize="small")
        axes = figure.subplots(
            len(groups) + 1, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [1] * len(groups) + [4]}
        )[:, 0]
        epochs_seen = [e for by_epoch in (*self.lrs.values(), self.metric) for e in by_epoch]
        first, last = (min(epochs_seen), max(epochs_seen)) if epochs_seen else (0, 1)
        releases = self.releases()
        for number, (lr_axes, name) in enumerate(zip(axes, groups, strict=False)):
            self._plot_lr(lr_axes, name, first, f"C{number % 10}")
        if groups:
            axes[0].set_title("Learning rate of each param group (grey: frozen)", fontsize="medium")
        self._plot_accuracy(axes[-1], releases)
        for panel in axes:
            for epoch in releases:
                panel.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
            panel.set_xlim(first - 0.5, last + 0.5)
            panel.grid(alpha=0.3)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[-1].set_xlabel("epoch")
        return figure

    def _plot_lr(self, axes: Axes, name: str, first_epoch: int, color: str) -> None:
        by_epoch = self.lrs[name]
        epochs = sorted(by_epoch)
        values = [by_epoch[e] for e in epochs]
        # Log scale, fixed to the run's peak learning rate: three decades below it (rates are multiples of
        # the head's, lr_scale x decay**k), room for the label above it.
        peak = max((lr for lrs in self.lrs.values() for lr in lrs.values() if math.isfinite(lr) and lr > 0), default=1)
        bottom = peak / 1000
        axes.set_yscale("log")
        axes.set_ylim(bottom, 30 * peak)
        axes.plot(epochs, [max(value, bottom) for value in values], marker=".", color=color)
        axes.fill_between(epochs, [max(value, bottom) for value in values], bottom, color=color, alpha=0.15)
        if epochs[0] > first_epoch:
            axes.axvspan(first_epoch - 0.5, epochs[0] - 0.5, color="grey", alpha=0.2, linewidth=0)
        axes.set_yticks([bottom, peak])
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
        axes.yaxis.set_minor_locator(NullLocator())
        head = self.lrs[next(iter(self.lrs))]
        ratios = [by_epoch[e] / head[e] for e in epochs if head.get(e)]
        ratio = "" if name == next(iter(self.lrs)) or not ratios else f"  ({statistics.median(ratios):.3g} x head)"
        axes.text(0.005, 0.95, name + ratio, transform=axes.transAxes, va="top", fontsize="small")

    def _plot_accuracy(self, axes: Axes, releases: dict[int, list[str]]) -> None:
        epochs = sorted(self.metric)
        accuracy = [self.metric[e] for e in epochs]
        if epochs:
            error = _error(accuracy[-1], self.val_images)
            label = f"validation accuracy each epoch ({self.monitor}): {self.val_images} images{error}"
            axes.plot(epochs, accuracy, marker="o", color="black", label=label)
        if self.test_metric is not None:
            label = (
                f"test accuracy after training ({self.test_monitor}): {self.test_metric:.1%} on"
                f" {self.test_images} other images{_error(self.test_metric, self.test_images)}"
            )
            axes.axhline(self.test_metric, color="C3", linestyle="--", label=label)
        for epoch, names in releases.items():
            released = ", ".join(name.rpartition(".")[2] for name in names)
            box = {"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1}
            axes.text(
                epoch - 0.45, 0.03, f"released: {released}", rotation=90, va="bottom", fontsize="x-small", bbox=box
            )
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.set_title("Accuracy on the target task (validation and test sets are disjoint)", fontsize="medium")
        if epochs or self.test_metric is not None:
            axes.figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", fontsize="small")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "metric": self.metric}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lrs = {name: dict(by_epoch) for name, by_epoch in state_dict["lrs"].items()}
        self.metric = dict(state_dict["metric"])


def _batch_size(batch: Any) -> int:
    """The number of samples in a batch: the length of its first element for a tuple or list batch."""
    return len(batch[0] if isinstance(batch, list | tuple) else batch)


def _error(accuracy: float, images: int) -> str:
    """The 95% sampling error of an accuracy measured on ``images`` images (normal approximation), as text."""
    if images <= 0:
        return ""
    return f", ±{196 * math.sqrt(accuracy * (1 - accuracy) / images):.1f} points at 95%"
