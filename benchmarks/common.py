"""Helpers shared by the benchmark scripts: the model, robust statistics, Markdown, the environment, output."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning
import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn

T = TypeVar("T")

NUM_CLASSES = 10


class Classifier(pl.LightningModule):
    """A torchvision ResNet without its ``fc`` as ``backbone``, and a linear ``head``."""

    def __init__(self, arch: Callable[..., nn.Module], num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        backbone = arch(weights=None)
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def bootstrap_ci(
    samples: Sequence[T], statistic: Callable[[Sequence[T]], float], rng: random.Random, resamples: int = 2000
) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``statistic`` over ``samples``."""
    values = sorted(statistic(rng.choices(samples, k=len(samples))) for _ in range(resamples))
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def write_report(text: str, results: dict[str, Any], markdown: Path | None, json_path: Path | None) -> None:
    """Print the Markdown report; write it, and the raw results as JSON, where asked."""
    print(text)
    if markdown is not None:
        markdown.write_text(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)  # benchmarks/raw/ is git-ignored: not in a fresh clone
        json_path.write_text(json.dumps({**results, "argv": sys.argv[1:]}, indent=2) + "\n")


def transfer_trainer(epochs: int, recipe: str, root: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer of one transfer-benchmark run: CPU, deterministic, quiet, no logger; checkpoints
    only for finetuning-scheduler, which restores from them between phases."""
    return pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=recipe.startswith("finetuning_scheduler"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        callbacks=callbacks,
    )
