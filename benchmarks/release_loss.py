"""The training loss around every release of the default fit, per setting of every transfer bench: what
``GradualUnfreeze``'s loss check judges (:mod:`lightning_bnfreeze.loss_rise`), and what its retry does.

Each setting of ``benchmarks.transfer``'s rows (bench, task, K, optimizer, head learning rate), seeds 0-2: the default
``GradualUnfreeze(on_loss_rise="warn")`` fits as a transfer run does (the fit ``on_loss_rise="retry"``, the default,
runs until its first release's loss rises), every training batch's loss recorded (``--recipe``: a variant of the
default, a transfer recipe ``ours:<options>``, instead). For each release, the mean loss
over its first batches (an epoch's, at most
:data:`~lightning_bnfreeze.loss_rise.LOSS_WINDOW`, fewer if the next release comes first) is divided by
the mean over as many batches before it (:class:`~lightning_bnfreeze.loss_rise.LossRise`, as the callback computes
it). Where the first release's ratio reaches :data:`~lightning_bnfreeze.loss_rise.LOSS_RISE`, the default fit
(``"retry"``) runs too, and its accuracy stands beside the other's (elsewhere both are the same fit). A run
*collapsed* when it ended at or below the linear probe of its setting and seed in the committed transfer rows.

Run from the repository root (about 20 minutes on 2 cores; the ``bench`` extra)::

    OMP_NUM_THREADS=1 python -m benchmarks.release_loss --jobs 2
    python -m benchmarks.release_loss --rows benchmarks/raw/release_loss.json  # the report again
    python -m benchmarks.release_loss --quick   # CI smoke test: the cnn bench, one rate, one seed
    OMP_NUM_THREADS=1 python -m benchmarks.release_loss --recipe ours:warmup_steps=5 \\
        --json benchmarks/raw/release_loss_warmup.json --markdown benchmarks/release_loss_warmup.md

The report goes to ``benchmarks/release_loss.md``, the rows (every batch's loss) to ``benchmarks/raw/release_loss.json``
(both committed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import markdown_table
from benchmarks.tasks import BENCHES
from lightning_bnfreeze.divergence import DIVERGED, LossDivergence
from lightning_bnfreeze.loss_rise import LOSS_RISE, LOSS_WINDOW, LossRise, Rise

HERE = Path(__file__).resolve().parent
SETTINGS: dict[str, tuple[tuple[int, ...], tuple[tuple[str, float], ...]]] = {
    "real": ((5, 10), (("adamw", 1e-4), ("adamw", 1e-3), ("adamw", 3e-3), ("sgd", 1e-3), ("sgd", 1e-2), ("sgd", 3e-2))),
    "lite2": ((5,), (("adamw", 1e-4), ("adamw", 1e-3), ("adamw", 3e-3), ("sgd", 1e-3), ("sgd", 1e-2), ("sgd", 3e-2))),
    "cnn": ((10,), (("adamw", 1e-3), ("adamw", 2e-3), ("sgd", 1e-3), ("sgd", 1e-2), ("sgd", 3e-2))),
    "vit": ((10,), (("adamw", 1e-3), ("adamw", 2e-3))),
    "minilm": ((10,), (("adamw", 1e-4), ("adamw", 1e-3), ("adamw", 3e-3), ("sgd", 1e-3), ("sgd", 1e-2), ("sgd", 3e-2))),
}
"""Each bench's K and (optimizer, head learning rate) in its transfer rows."""
TASKS = {"lite2": ("digits",)}
"""Benches whose transfer rows cover fewer tasks than ``BENCHES`` names."""
DEFAULT = "ours"
HEADER = [
    "bench",
    "task",
    "K",
    "optimizer",
    "head lr",
    "first release: after / before, per seed",
    "later releases: largest, per seed",
    "epochs: largest against the first batches, per seed",
    "accuracy per seed (retried: warn -> retry)",
    "collapsed",
]


def fit(setting: dict[str, Any]) -> dict[str, Any]:
    """One transfer run of ``setting`` with every batch's loss; each release's :class:`Rise` as a list."""
    from benchmarks.transfer import run_one

    row = run_one(setting, losses=True)
    epochs_batches = len(row["losses"]) // setting["epochs"]
    row["rises"] = [_plain(rise) for rise in release_rises(row["losses"], row["history"], epochs_batches)]
    row["epoch_ratios"] = epoch_ratios(row["losses"], row["history"], epochs_batches)
    return row


def epoch_ratios(
    losses: Sequence[float], history: Sequence[dict[str, Any]], batches_per_epoch: int
) -> list[float | None]:
    """Each epoch's ratio of its last batches' mean loss to the fit's first, as the divergence check judges it
    (:class:`LossDivergence`, an epoch's batches at most); ``None`` for the epochs that ended before the first
    release trained (every release of these benches comes at an epoch's start, and its loss watch ends with it)."""
    watch = LossDivergence(min(batches_per_epoch, LOSS_WINDOW))
    first_release = history[0]["step"] if history else math.inf
    ratios: list[float | None] = []
    for start in range(0, len(losses), batches_per_epoch):
        for loss in losses[start : start + batches_per_epoch]:
            watch.record(loss)
        ended = watch.epoch_ended()
        ratios.append(ended.ratio if ended is not None and first_release < start + batches_per_epoch else None)
    return ratios


def release_rises(
    losses: Sequence[float], history: Sequence[dict[str, Any]], batches_per_epoch: int
) -> list[Rise | None]:
    """Each release's :class:`Rise` in a fit of these batch ``losses`` (one optimizer step per batch), judged by a
    :class:`LossRise` over an epoch's batches at most, every release watched until the next (releases at one step:
    the first's watch covers them, the others get ``None``)."""
    watch = LossRise(min(batches_per_epoch, LOSS_WINDOW))
    by_step: dict[int, int] = {}
    for record in history:
        by_step.setdefault(record["step"], record["index"])
    rises: list[Rise | None] = [None] * len(history)
    watched = None
    for step, loss in enumerate(losses):
        if step in by_step:
            if watched is not None and watch.watching:
                rises[watched] = watch.judge()
            watch.released()
            watched = by_step[step]
        if (rise := watch.record(loss)) is not None and watched is not None:
            rises[watched] = rise
    if watched is not None and watch.watching:
        rises[watched] = watch.judge()
    return rises


def _plain(rise: Rise | None) -> dict[str, Any] | None:
    return None if rise is None else {**asdict(rise), "ratio": rise.ratio}


def warned(recipe: str) -> str:
    """The transfer recipe of ``recipe`` (``ours`` or ``ours:<options>``) with ``on_loss_rise="warn"``."""
    return f"{recipe}{',' if ':' in recipe else ':'}on_loss_rise='warn'"


def settings_of(settings: dict[str, Any], seeds: Sequence[int], recipe: str) -> list[dict[str, Any]]:
    from benchmarks.transfer import EPOCHS, fingerprint

    return [
        {"bench": bench, "task": task, "optimizer": optimizer, "lr": lr, "k": k, "epochs": EPOCHS[bench],
         "seed": seed, "recipe": recipe, "fingerprint": fingerprint(recipe)}
        for bench, (ks, rates) in settings.items() for task in TASKS.get(bench, BENCHES[bench]) for k in ks
        for optimizer, lr in rates for seed in seeds
    ]  # fmt: skip


def measure(settings: dict[str, Any], seeds: Sequence[int], jobs: int, recipe: str = DEFAULT) -> list[dict[str, Any]]:
    """The ``"warn"`` fits of ``recipe`` in every setting and seed; then its ``"retry"`` fits of those whose first
    release's loss rose or that diverged."""
    from benchmarks.transfer import _init_worker, fingerprint

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        rows = list(pool.map(fit, settings_of(settings, seeds, warned(recipe))))
        retried = [
            {**_setting(row), "recipe": recipe, "fingerprint": fingerprint(recipe)}
            for row in rows
            if _first_rose(row) or _diverged(row)
        ]
        rows += list(pool.map(fit, retried))
    for row in rows:
        print(row["bench"], row["task"], row["k"], row["optimizer"], row["lr"], row["seed"], row["recipe"],
              f"{100 * row['test_acc']:.1f}", flush=True)  # fmt: skip
    return rows


def _setting(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("bench", "task", "optimizer", "lr", "k", "epochs", "seed")}


def _first_rose(row: dict[str, Any]) -> bool:
    first = row["rises"][0] if row["rises"] else None
    return first is not None and Rise(**{key: value for key, value in first.items() if key != "ratio"}).rose


def _diverged(row: dict[str, Any]) -> bool:
    return any(ratio is not None and ratio >= DIVERGED for ratio in row["epoch_ratios"])


def probes(benches: set[str]) -> dict[tuple[Any, ...], float]:
    """The linear probe's accuracy per (bench, task, K, optimizer, lr, seed) in the committed transfer rows (the last
    processor's)."""
    from benchmarks.transfer import load

    found = {}
    for bench in benches:
        for row in load(HERE / "raw" / f"transfer_{bench}.jsonl"):
            if row["recipe"] == "probe":
                found[_key(row)] = row["test_acc"]
    return found


def report(env: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int], recipe: str = DEFAULT) -> str:
    probe = probes({row["bench"] for row in rows})
    watched = [row for row in rows if row["recipe"] == warned(recipe)]
    name, command = ("default", "") if recipe == DEFAULT else (f"`{recipe}`", f" --recipe {recipe}")
    retried = {_key(row): row for row in rows if row["recipe"] == recipe}
    # the ratios by whether the run collapsed
    table, firsts, laters, epochs = [], {True: [], False: []}, {True: [], False: []}, {True: [], False: []}
    by_setting: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in watched:
        by_setting.setdefault(_key(row)[:-1], []).append(row)
    for key, runs in by_setting.items():
        runs.sort(key=lambda row: row["seed"])
        first, later, largest, accuracy, collapsed = [], [], [], [], []
        for row in runs:
            ratios = [rise["ratio"] if rise else None for rise in row["rises"]]
            low = probe.get(_key(row))
            down = low is not None and row["test_acc"] <= low
            if low is not None:
                collapsed.append(down)
            first.append(ratios[0] if ratios else None)
            later.append(max((r for r in ratios[1:] if r is not None), default=None))
            if first[-1] is not None:
                firsts[down].append(first[-1])
            if later[-1] is not None:
                laters[down].append(later[-1])
            largest.append(max((r for r in row["epoch_ratios"] if r is not None), default=None))
            if largest[-1] is not None:
                epochs[down].append(largest[-1])
            retry = retried.get(_key(row))
            accuracy.append(
                f"{100 * row['test_acc']:.1f}" + (f" -> {100 * retry['test_acc']:.1f}" if retry is not None else "")
            )
        table.append([*map(str, (key[0], key[1], key[2], key[3])), f"{key[4]:g}", _ratios(first), _ratios(later),
                      _ratios(largest), ", ".join(accuracy),
                      f"{sum(collapsed)} of {len(collapsed)}" if collapsed else "-"])  # fmt: skip
    changes = [
        (100 * (retried[_key(row)]["test_acc"] - row["test_acc"]), row) for row in watched if _key(row) in retried
    ]
    return (
        "# The training loss around every release and at every epoch's end: what `GradualUnfreeze`'s loss checks"
        " judge, and their retries\n\n"
        f"The {name} fit of each setting (`on_loss_rise='warn'`), seeds {', '.join(map(str, seeds))}: for each"
        " release, the mean training loss over its first batches (an epoch's, at most 50) against as many batches"
        f" before it (`python -m benchmarks.release_loss{command}`, method in its docstring). *Collapsed*: on how"
        " many seeds the run ended at or below the linear probe of its setting and seed in the committed transfer"
        " rows (`-`: none there; for the benches other than minilm the probe ran on an Intel Xeon). *Epochs*: from"
        " the first epoch the first release trained in on, the mean loss over each epoch's last batches (an epoch's,"
        " at most 50) against the fit's first as many (the divergence check, `lightning_bnfreeze/divergence.py`)."
        f" Where the first release's ratio reached {LOSS_RISE:g} (`LOSS_RISE`) or an epoch's {DIVERGED:g}"
        " (`DIVERGED`), the fit with `on_loss_rise='retry'` (the default) ran too: its accuracy follows the arrow.\n\n"
        + _summary(firsts, laters, epochs, changes)
        + f"{markdown_table(HEADER, table)}\n\n{common.machine_line(env)}"
    )


def _summary(
    firsts: dict[bool, list[float]],
    laters: dict[bool, list[float]],
    epochs: dict[bool, list[float]],
    changes: list[tuple[float, dict[str, Any]]],
) -> str:
    def span(values: list[float]) -> str:
        return f"{min(values):.2f}x to {max(values):.2f}x" if values else "none"

    caught = [ratio for ratio in firsts[True] if ratio >= LOSS_RISE]
    lines = [
        f"- First release: at most {max(firsts[False], default=float('nan')):.2f}x in the {len(firsts[False])} runs"
        f" that did not collapse; in the {len(firsts[True])} that did, {span(firsts[True])} ({len(caught)} at"
        f" {LOSS_RISE:g}x or more)."
        if firsts[False] or firsts[True]
        else "- First release: in no run (it came at the fit's first step, with no batches before it).",
        f"- Later releases (the largest per run): {span(laters[False])} in the runs that did not collapse,"
        f" {span(laters[True])} in those that did.",
        f"- Epochs (the largest per run): at most {max(epochs[False], default=float('nan')):.2f}x in the"
        f" {len(epochs[False])} runs that did not collapse; in the {len(epochs[True])} that did, {span(epochs[True])}"
        f" ({sum(ratio >= DIVERGED for ratio in epochs[True])} at {DIVERGED:g}x or more).",
    ]
    if changes:
        moved = ", ".join(
            f"{row['bench']} {row['optimizer']} {row['lr']:g} seed {row['seed']} {change:+.1f}"
            for change, row in changes
        )
        lines.append(f"- Retried ({len(changes)} runs): {moved} (points of accuracy, retry minus warn).")
    return "\n".join(lines) + "\n\n"


def _ratios(values: list[float | None]) -> str:
    return " ".join("-" if value is None else f"{value:.2f}" for value in values)


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["bench"], row["task"], row["k"], row["optimizer"], row["lr"], row["seed"])


def main(argv: Sequence[str] | None = None) -> None:
    def add(parser: Any) -> None:
        parser.add_argument(
            "--rows", type=Path, help="report the rows of an earlier run (its --json), measuring nothing"
        )
        parser.add_argument("--jobs", type=int, default=2, help="parallel single-thread processes")
        parser.add_argument("--benches", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
        parser.add_argument("--recipe", default=DEFAULT, help="a transfer recipe, ours:<options> (default: ours)")

    args = common.benchmark_arguments(__doc__, "release_loss", argv, add=add)
    seeds = (0,) if args.quick else (0, 1, 2)
    settings = (
        {"cnn": ((10,), (("adamw", 1e-3),))} if args.quick else {bench: SETTINGS[bench] for bench in args.benches}
    )
    rows = (
        (lambda: json.loads(args.rows.read_text())["rows"])
        if args.rows
        else (lambda: measure(settings, seeds, args.jobs, args.recipe))
    )
    common.measure_and_report(args, "release_loss", rows, lambda env, rows: report(env, rows, seeds, args.recipe))


if __name__ == "__main__":
    main()
