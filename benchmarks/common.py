"""What the benchmark scripts share: the ResNet classifier and synthetic batches of the cost benchmarks, step
timing, statistics, Markdown, the environment, and the report's output (``--quick``: to a temporary directory,
checked for its tables)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchvision.models import resnet18

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
LR = 0.01
Sample = tuple[float, float]
"""One timed step: (wall ms, process CPU ms)."""

# ------------------------------------------------------------------------------------------- model and data


class Classifier(pl.LightningModule):
    """A torchvision ResNet without its ``fc`` as ``backbone`` and a linear ``head``; cross-entropy, and SGD
    (lr 0.01, momentum 0.9) over the parameters trainable when the optimizer is configured."""

    def __init__(self, arch: Callable[..., nn.Module] = resnet18, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        backbone = arch(weights=None)
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR, momentum=0.9)


class Batches:
    """``count`` ready-made random batches as a training "dataloader": no loading or collation cost."""

    def __init__(self, count: int, batch_size: int, image_size: int, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                torch.randn(batch_size, 3, image_size, image_size, generator=generator),
                torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
            )
            for _ in range(count)
        ]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU ``Trainer`` without logger, checkpoints, progress bar, model summary or sanity check."""
    options = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(accelerator="cpu", logger=False, num_sanity_val_steps=0, **{**options, **kwargs})


def quiet() -> None:
    """No warnings and no INFO lines from Lightning, finetuning-scheduler or the library: the report is the output."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "finetuning_scheduler", "lightning_bnfreeze"):
        logging.getLogger(name).setLevel(logging.ERROR)


class StepTimer(Callback):
    """Wall and process-CPU time of every training step per epoch, from ``on_train_batch_start`` to
    ``on_train_batch_end`` (put it first among the callbacks); the first ``warmup`` steps of each epoch dropped."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: dict[int, list[Sample]] = {}
        self._start = self._cpu_start = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._cpu_start = time.process_time_ns()
        self._start = time.perf_counter_ns()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        wall, cpu = (time.perf_counter_ns() - self._start) / 1e6, (time.process_time_ns() - self._cpu_start) / 1e6
        if idx >= self.warmup:
            self.steps.setdefault(trainer.current_epoch, []).append((wall, cpu))


class BatchLosses(Callback):
    """Every training batch's loss, in order (read once, at the fit's end)."""

    def __init__(self) -> None:
        self._losses: list[Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        from lightning_bnfreeze.callbacks.training_loss import training_loss

        loss = training_loss(outputs)
        assert loss is not None, "a training step without a loss"
        self._losses.append(loss)

    @property
    def losses(self) -> list[float]:
        return [float(loss) for loss in self._losses]


# ---------------------------------------------------------------------------------------------- statistics


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


def ratio_row(ours: Sequence[Sequence[Sample]], floor: Sequence[Sequence[Sample]], rng: random.Random) -> dict:
    """``ours`` against ``floor``, paired by group (a round): the medians of the pooled wall times, their ratio
    with its 95% bootstrap interval over the groups, and the ratio of the median CPU times."""
    pairs = list(zip(ours, floor, strict=True))

    def ratio(sample: Sequence[tuple[Sequence[Sample], Sequence[Sample]]], i: int = 0) -> float:
        return median([s[i] for o, _ in sample for s in o]) / median([s[i] for _, f in sample for s in f])

    walls = [s[0] for group in ours for s in group]
    return {
        "median_ms": median(walls),
        "floor_ms": median([s[0] for group in floor for s in group]),
        "ratio": ratio(pairs),
        "ratio_ci": list(bootstrap_ci(pairs, ratio, rng)),
        "cpu_ratio": ratio(pairs, 1),
        "steps": len(walls),
    }


# -------------------------------------------------------------------------------------------------- report


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    cpu = cpu_model()
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


def machine_line(env: dict[str, Any]) -> str:
    """One line on the machine and the software of a report (``env``: :func:`environment`'s)."""
    return (
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['platform']}; Python {env['python']}, torch"
        f" {env['torch']}.\n"
    )


def environment_table(env: dict[str, Any]) -> str:
    rows = [[f"`{key}`", f"{value:.2f}" if isinstance(value, float) else str(value)] for key, value in env.items()]
    return "### Environment\n\n" + markdown_table(["", ""], rows)


def finish_environment(env: dict[str, Any], start: float) -> dict[str, Any]:
    """Add the load average at the end and the runtime since ``start`` (``time.perf_counter()``)."""
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    env["runtime_s"] = round(time.perf_counter() - start, 1)
    return env


def size_arguments(parser: argparse.ArgumentParser, threads: bool = True, per: str = "") -> None:
    """``--batch-size``, ``--image-size``, ``--seed`` (of the bootstrap) and, with ``threads``, ``--threads``."""
    if threads:
        parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help=f"batch size{per} (default: 16)")
    parser.add_argument("--image-size", type=int, default=64, help="training image side (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")


def output_arguments(parser: argparse.ArgumentParser, name: str, raw: bool = True) -> None:
    """``--quick``, ``--markdown`` and (with ``raw``) ``--json``, whose defaults :func:`write_report` resolves."""
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke test: tiny sizes, one round; the report goes to a temp dir"
    )
    if raw:
        parser.add_argument("--json", type=Path, help=f"raw results (default: benchmarks/raw/{name}.json)")
    parser.add_argument("--markdown", type=Path, help=f"the report (default: benchmarks/{name}.md)")


def benchmark_arguments(
    doc: str | None,
    name: str,
    argv: Sequence[str] | None,
    threads: int = 1,
    add: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """A measuring benchmark's command line, parsed (its docstring's first line, :func:`output_arguments` and what
    ``add`` adds); then torch runs on ``threads`` threads and Lightning is quiet."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    output_arguments(parser, name)
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(threads)
    quiet()
    return args


def write_report(
    args: argparse.Namespace, name: str, text: str, results: dict[str, Any], tables: int, defaults: bool = True
) -> None:
    """Print the report and write it, and the raw results as JSON, where ``args`` asks; neither asked (and
    ``defaults``): to ``benchmarks/<name>.md`` (committed) and ``benchmarks/raw/<name>.json`` (git-ignored).

    With ``--quick``: to a temporary directory, and exit with an error unless the report holds ``tables``
    Markdown tables, each with rows.
    """
    print(text)
    markdown, raw = args.markdown, getattr(args, "json", None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            markdown, raw = Path(tmp) / f"{name}.md", Path(tmp) / f"{name}.json"
        elif defaults and markdown is None and raw is None:
            markdown, raw = HERE / f"{name}.md", (HERE / "raw" / f"{name}.json" if hasattr(args, "json") else None)
        if markdown is not None:
            markdown.write_text(text)
        if raw is not None:
            raw.parent.mkdir(parents=True, exist_ok=True)  # benchmarks/raw/ is git-ignored: not in a fresh clone
            raw.write_text(json.dumps({**results, "argv": sys.argv[1:]}, indent=2) + "\n")
        if args.quick:
            check_tables(markdown.read_text() if markdown else text, tables, name)


def measure_and_report(
    args: argparse.Namespace,
    name: str,
    measure: Callable[[], list[dict[str, Any]]],
    report: Callable[[dict[str, Any], list[dict[str, Any]]], str],
    tables: int = 1,
) -> None:
    """Run ``measure`` (its rows), then :func:`write_report` of ``report(environment, rows)`` and the raw rows."""
    env, start = environment(), time.perf_counter()
    rows = measure()
    finish_environment(env, start)
    write_report(args, name, report(env, rows), {"environment": env, "rows": rows}, tables)


def check_tables(text: str, expected: int, name: str) -> None:
    """Exit with an error unless ``text`` holds ``expected`` Markdown tables, each with at least one row."""
    lines = [*text.splitlines(), ""]
    separators = [i for i, line in enumerate(lines) if line.startswith("|---")]
    filled = [i for i in separators if lines[i + 1].startswith("| ")]
    if len(separators) != expected or len(filled) != expected:
        raise SystemExit(f"{name}: {len(filled)} of {len(separators)} tables with rows, expected {expected}")
    print(f"{name}: {expected} table(s) with rows, as expected", file=sys.stderr)
