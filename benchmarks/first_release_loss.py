"""The training loss around the first release of the default fit, per setting of every transfer bench: the measure
``GradualUnfreeze``'s loss check warns from (:mod:`lightning_bnfreeze.loss_rise`), beside how the full runs of the
default ended there.

Each setting of ``benchmarks.transfer``'s rows (bench, task, K, optimizer, head learning rate), seeds 0-2: the default
``GradualUnfreeze()`` fits epoch 0 (the head alone) and epoch 1 (the first release, at its start), and the mean training
loss over epoch 1's batches is divided by the mean over as many of epoch 0's (at most
:data:`~lightning_bnfreeze.callbacks.release_loss.LOSS_WINDOW`), as the callback does. Beside it, from the committed
transfer rows (``benchmarks/raw/transfer_<bench>.jsonl``), on how many of those seeds the full run of the default ended
at or below the linear probe.

Run from the repository root (about half an hour; the ``bench`` extra)::

    python -m benchmarks.first_release_loss
    python -m benchmarks.first_release_loss --rows benchmarks/raw/first_release_loss.json  # the report again
    python -m benchmarks.first_release_loss --quick   # CI smoke test: the cnn bench, one rate, one seed

The report goes to ``benchmarks/first_release_loss.md`` (committed).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from benchmarks import common
from benchmarks.common import markdown_table
from benchmarks.recipes import gradual_unfreeze
from benchmarks.tasks import BENCHES, make_data, make_model
from lightning_bnfreeze.callbacks.release_loss import LOSS_WINDOW, training_loss
from lightning_bnfreeze.loss_rise import LOSS_RISE

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
HEADER = [
    "bench",
    "task",
    "K",
    "optimizer",
    "head lr",
    "loss after / before, per seed",
    "warns",
    "ended at or below the probe",
]


class EpochLosses(pl.Callback):
    """Every training batch's loss, by epoch; stops the fit at the end of epoch 1."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = training_loss(outputs)
        assert loss is not None
        self.by_epoch.setdefault(trainer.current_epoch, []).append(float(loss))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.should_stop = trainer.current_epoch >= 1


def loss_ratio(bench: str, task: str, k: int, optimizer: str, lr: float, seed: int) -> float:
    """Mean training loss over the first release's epoch against as many batches of the head's epoch before it, in the
    default fit of this setting and seed (seeded as ``benchmarks.transfer`` seeds it, for its epochs)."""
    from benchmarks.transfer import EPOCHS

    pl.seed_everything(seed, verbose=False)
    data = make_data(bench, task, k, seed)
    model = make_model(bench, optimizer, lr)
    losses = EpochLosses()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            max_epochs=EPOCHS[bench], deterministic=True, default_root_dir=tmp,
            callbacks=[gradual_unfreeze("ours"), losses],
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
    before, after = losses.by_epoch[0], losses.by_epoch[1]
    n = min(len(before), len(after), LOSS_WINDOW)
    return (sum(after[:n]) / n) / (sum(before[-n:]) / n)


def below_probe(bench: str) -> dict[tuple[Any, ...], dict[int, bool]]:
    """Per setting of the committed transfer rows, per seed (run by ours and the probe on one processor, this one's
    where it ran both): whether the default ended at or below the probe."""
    from benchmarks.transfer import load, summarise

    here = common.cpu_model()
    ended: dict[tuple[Any, ...], dict[int, bool]] = {}
    for summary in summarise(load(HERE / "raw" / f"transfer_{bench}.jsonl")):
        s, acc = summary["setting"], summary["accuracy"]
        if "ours" in acc and "probe" in acc:
            units = sorted(acc["ours"].keys() & acc["probe"].keys(), key=lambda unit: unit[1] == here)  # (seed, cpu)
            key = (s["task"], s["k"], s["optimizer"], s["lr"])
            ended[key] = {unit[0]: acc["ours"][unit] <= acc["probe"][unit] for unit in units}  # this processor's last
    return ended


def measure(settings: dict[str, Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for bench, (ks, rates) in settings.items():
        for task in TASKS.get(bench, BENCHES[bench]):
            for k in ks:
                for optimizer, lr in rates:
                    ratios = [loss_ratio(bench, task, k, optimizer, lr, seed) for seed in seeds]
                    row = {"bench": bench, "task": task, "k": k, "optimizer": optimizer, "lr": lr, "ratios": ratios}
                    rows.append(row)
                    print(row, flush=True)
    return rows


def report(env: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    ended = {bench: below_probe(bench) for bench in {row["bench"] for row in rows}}
    for row in rows:
        outcome = ended[row["bench"]].get((row["task"], row["k"], row["optimizer"], row["lr"]), {})
        row["below_probe"] = [outcome.get(seed) for seed in seeds]  # None: not in the transfer rows
    table = [
        [row["bench"], row["task"], str(row["k"]), row["optimizer"], f"{row['lr']:g}",
         " ".join(f"{ratio:.2f}" for ratio in row["ratios"]), str(sum(ratio >= LOSS_RISE for ratio in row["ratios"])),
         _count(row["below_probe"])]
        for row in rows
    ]  # fmt: skip
    pairs = [pair for row in rows for pair in zip(row["ratios"], row["below_probe"], strict=True)]
    held = [ratio for ratio, below in pairs if below is False]
    failed = [ratio for ratio, below in pairs if below is True]
    warned, quiet = [ratio for ratio in failed if ratio >= LOSS_RISE], [ratio for ratio in failed if ratio < LOSS_RISE]
    summary = (
        f"Where the default's full run ended above the probe, the loss after the first release was at most"
        f" {max(held):.2f}x the loss before it. Where it ended at or below the probe, the check warns on"
        f" {len(warned)} of {len(failed)} seeds"
        + (f" ({min(warned):.2f}x to {max(warned):.2f}x)" if warned else "")
        + (
            f"; on the others the loss did not rise after the first release ({min(quiet):.2f}x to {max(quiet):.2f}x):"
            " they failed later, or without a rise"
            if quiet
            else ""
        )
        + f". The loss check warns from {LOSS_RISE:g}x (`LOSS_RISE`).\n\n"
        if held and failed
        else ""
    )
    return (
        "# The training loss around the first release: what `GradualUnfreeze`'s loss check warns from\n\n"
        f"The default fit of each setting, seeds {', '.join(map(str, seeds))}: the mean training loss over the first"
        " release's epoch (epoch 1) against as many batches of the head's epoch before it"
        " (`python -m benchmarks.first_release_loss`, method in its docstring); *warns*: on how many seeds the loss"
        " check warns; *ended at or below the probe*: on how many of these seeds the full run of the default did, in"
        " the committed transfer rows (`-`: none there), on the processor they ran on: for the benches other than"
        " minilm an Intel Xeon, whose fits differ from this machine's past their first steps.\n\n"
        f"{summary}"
        f"{markdown_table(HEADER, table)}"
        f"\n\n{common.machine_line(env)}"
    )


def _count(below: list[bool | None]) -> str:
    known = [value for value in below if value is not None]
    return f"{sum(known)} of {len(known)}" if known else "-"


def main(argv: Sequence[str] | None = None) -> None:
    args = common.benchmark_arguments(
        __doc__,
        "first_release_loss",
        argv,
        add=lambda parser: parser.add_argument(
            "--rows", type=Path, help="report the rows of an earlier run (its --json), measuring nothing"
        ),
    )
    seeds = (0,) if args.quick else (0, 1, 2)
    settings = {"cnn": ((10,), (("adamw", 1e-3),))} if args.quick else SETTINGS
    rows = (lambda: json.loads(args.rows.read_text())["rows"]) if args.rows else (lambda: measure(settings, seeds))
    common.measure_and_report(args, "first_release_loss", rows, lambda env, rows: report(env, rows, seeds))


if __name__ == "__main__":
    main()
