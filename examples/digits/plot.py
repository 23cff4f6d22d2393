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
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory, offset_copy
from torch.optim import Optimizer
from typing_extensions import override

__all__ = ["SchedulePlot"]


class SchedulePlot(Callback):
    """Record the learning rate of every param group and the accuracy per epoch; plot them at fit end.

    The plot has one small panel per param group (its learning rate over the epochs, shaded grey
    while it is frozen, with its ratio to the head's learning rate) and, below, the accuracy:
    ``monitor`` on the validation set at every epoch and, once ``trainer.test`` ran,
    ``test_monitor`` on the test set as a dashed line, each with the number of images behind it
    and its 95% sampling error. Dotted lines mark the releases, where they happened (a release at an
    epoch's start on the boundary before it, a mid-epoch one at its step), each with a marker and the
    released modules in a band of its own between the learning rates and the accuracy. The axes are
    fixed (accuracy 0 to 1; learning rate on a log scale from a thousandth of the run's peak, a tick
    per decade), so plots of runs with the same configuration compare at a glance.

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
        self.release_points: dict[str, float] = {}
        """Where each group added during the fit appeared, in epochs on the plot's axis: epoch ``e``'s
        point is at ``e``, its first batch starts at ``e - 0.5``; a release before batch ``b`` of ``n``
        is at ``e - 0.5 + b / n``."""
        self.metric: dict[int, float] = {}
        self.val_images = 0
        self.test_metric: float | None = None
        self.test_images = 0
        self.path: Path | None = None
        self._images = 0  # counted over the current evaluation epoch
        self._batch_idx = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # At every step (the last one of an epoch wins), after every callback's batch-start hook
        # (GradualUnfreeze's releases and warm-up), before any LR scheduler steps.
        epoch = trainer.current_epoch
        started = bool(self.lrs)
        batches = trainer.num_training_batches
        position = epoch - 0.5 + (self._batch_idx / batches if 0 < batches < math.inf else 0.0)
        for index, optimizer in enumerate(trainer.optimizers):
            prefix = f"opt{index}/" if len(trainer.optimizers) > 1 else ""
            for number, group in enumerate(optimizer.param_groups):
                name = prefix + (group.get("name") or ("head" if number == 0 else f"group{number}"))
                if started and name not in self.lrs:
                    self.release_points[name] = position
                self.lrs.setdefault(name, {})[epoch] = float(group["lr"])

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

    def releases(self) -> dict[float, list[str]]:
        """The param groups added during the fit, by where they appeared (see :attr:`release_points`).

        A group without a recorded point (a plot restored from an older checkpoint) counts as released at
        the start of the first epoch it has a learning rate in, if that is not the first epoch.
        """
        first_epoch = min((min(by_epoch) for by_epoch in self.lrs.values()), default=0)
        releases: dict[float, list[str]] = {}
        for name, by_epoch in self.lrs.items():
            point = self.release_points.get(name)
            if point is None and min(by_epoch) > first_epoch:
                point = min(by_epoch) - 0.5
            if point is not None:
                releases.setdefault(point, []).append(name)
        return dict(sorted(releases.items()))

    def figure(self, title: str = "") -> Figure:
        """The plot: a learning-rate panel per param group, the releases, the accuracy below, over the epochs."""
        groups = list(self.lrs)
        releases = self.releases()
        labels = [", ".join(name.rpartition(".")[2] for name in names) for names in releases.values()]
        # the release band: tall enough for the longest label, written upwards
        band = 0.2 + 0.045 * max((len(label) for label in labels), default=0) if releases else 0.0
        heights = [0.7] * len(groups) + ([band] if releases else []) + [2.8]
        figure = Figure(figsize=(8, 0.8 + sum(heights)), layout="constrained")
        figure.suptitle(title, fontsize="small")
        axes = figure.subplots(len(heights), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[
            :, 0
        ]
        epochs_seen = [e for by_epoch in (*self.lrs.values(), self.metric) for e in by_epoch]
        first, last = (min(epochs_seen), max(epochs_seen)) if epochs_seen else (0, 1)
        for number, (lr_axes, name) in enumerate(zip(axes, groups, strict=False)):
            self._plot_lr(lr_axes, name, first, f"C{number % 10}")
        if groups:
            axes[0].set_title("Learning rate of each param group (grey: frozen)", fontsize="medium")
        if releases:
            self._plot_releases(axes[len(groups)], releases, labels)
        self._plot_accuracy(axes[-1])
        for panel in axes:
            for point in releases:
                panel.axvline(point, color="grey", linestyle=":", linewidth=1)
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
        frozen_until = self.release_points.get(name, epochs[0] - 0.5 if epochs[0] > first_epoch else None)
        if frozen_until is not None and frozen_until > first_epoch - 0.5:
            axes.axvspan(first_epoch - 0.5, frozen_until, color="grey", alpha=0.2, linewidth=0)
        # a labelled tick per decade, unlabelled ones at 2..9 x each decade
        axes.yaxis.set_major_locator(LogLocator(base=10, numticks=10))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=10))
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.tick_params(axis="y", labelsize="x-small")
        head = self.lrs[next(iter(self.lrs))]
        ratios = [by_epoch[e] / head[e] for e in epochs if head.get(e)]
        ratio = "" if name == next(iter(self.lrs)) or not ratios else f"  ({statistics.median(ratios):.3g} x head)"
        axes.text(0.005, 0.95, name + ratio, transform=axes.transAxes, va="top", fontsize="small")

    def _plot_releases(self, axes: Axes, releases: dict[float, list[str]], labels: list[str]) -> None:
        """The release band: a marker at each release and the released modules above it, written upwards."""
        axes.set_ylim(0, 1)
        axes.set_yticks([])
        axes.set_ylabel("released", fontsize="small")
        to_band = blended_transform_factory(axes.transData, axes.transAxes)
        for point, label in zip(releases, labels, strict=True):
            axes.plot([point], [0.04], marker="^", color="grey", transform=to_band, clip_on=False)
            beside = offset_copy(to_band, axes.figure, x=2, units="points")  # right of the dotted line
            axes.text(point, 0.06, label, rotation=90, ha="left", va="bottom", fontsize="x-small", transform=beside)

    def _plot_accuracy(self, axes: Axes) -> None:
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
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.set_title("Accuracy on the target task (validation and test sets are disjoint)", fontsize="medium")
        if epochs or self.test_metric is not None:
            axes.figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", fontsize="small")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "metric": self.metric, "release_points": self.release_points}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lrs = {name: dict(by_epoch) for name, by_epoch in state_dict["lrs"].items()}
        self.metric = dict(state_dict["metric"])
        self.release_points = dict(state_dict.get("release_points", {}))


def _batch_size(batch: Any) -> int:
    """The number of samples in a batch: the length of its first element for a tuple or list batch."""
    return len(batch[0] if isinstance(batch, list | tuple) else batch)


def _error(accuracy: float, images: int) -> str:
    """The 95% sampling error of an accuracy measured on ``images`` images (normal approximation), as text."""
    if images <= 0:
        return ""
    return f", ±{196 * math.sqrt(accuracy * (1 - accuracy) / images):.1f} points at 95%"
