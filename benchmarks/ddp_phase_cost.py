"""Per-phase step time of ``GradualUnfreeze`` under DDP and FSDP2 (2 CPU processes, gloo), against the floor.

A torchvision ResNet-18 (``weights=None``, ``fc`` removed) as ``backbone`` + a linear ``head`` (10 classes),
64x64 inputs, batch 16 per rank, SGD with momentum 0.9, ``configure_optimizers`` handing over the trainable
parameters; a real ``lightning.pytorch.Trainer`` with ``devices=2``, ``accelerator="cpu"``, one torch thread per
rank. Three phases: 0 trains the head alone, 1 also ``backbone.layer4``, 2 also ``backbone.layer3``.

- ``ours``: ``GradualUnfreeze(schedule={1: "backbone.layer4", 2: "backbone.layer3"})``, one fit of 3 epochs: the
  strategy sets up the model with the backbone frozen; released blocks join later (under DDP their gradients
  are reduced by ``GradientSync``, bucketed and launched during backward; under FSDP2 by FSDP2 itself).
- ``floor``: per phase, a fit of 1 epoch where that phase's blocks are trainable from the start, so that DDP's
  own reducer (bucketed, overlapped with backward) or FSDP2 reduces them; the frozen rest as in ``ours``
  (``requires_grad=False``, its norm layers frozen by ``BNFreezeCallback()``).

Strategies: ``ddp`` and ``fsdp2`` (``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
``fully_shard`` on each ``layerN``, the backbone and the head in ``configure_model``). **Step time**: rank 0's
``perf_counter`` from ``on_train_batch_start`` to ``on_train_batch_end``, the first steps of every epoch dropped;
each round runs every variant (order rotated per round). Reported: median step time per phase, the ratio
``ours / floor`` with a bootstrap 95% interval over rounds, and the ratio of median process CPU time per step.

On a shared machine, whole fits minutes apart see different loads: ``benchmarks/ddp_steps.py`` also times the
same two configurations of phases 1 and 2 without Lightning, one step each in turn in the same processes, which
measures the reductions' cost far more tightly (bootstrap interval over steps).

Run from the repository root, on an otherwise idle machine if possible (about 10 minutes on 2 CPU cores)::

    nice -n 10 python -m benchmarks.ddp_phase_cost
    python -m benchmarks.ddp_phase_cost --quick      # smoke test, no files written
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from benchmarks.common import Classifier, bootstrap_ci, environment, markdown_table, median, write_report
from benchmarks.ddp_steps import interleaved
from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze

HERE = Path(__file__).parent
PHASES = ("0: head only", "1: + layer4", "2: + layer3")
BLOCKS = ("backbone.layer4", "backbone.layer3")  # released at epochs 1 and 2
STRATEGIES = ("ddp", "fsdp2")


class Model(Classifier):
    def __init__(self, sharded: bool, trainable: Sequence[str] = ()) -> None:
        torch.manual_seed(0)
        super().__init__(resnet18)
        self.sharded = sharded
        self.backbone.requires_grad_(False)
        for name in trainable:
            self.get_submodule(name).requires_grad_(True)

    def configure_model(self) -> None:
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for name in ("layer1", "layer2", "layer3", "layer4"):
                fully_shard(self.backbone.get_submodule(name), mesh=mesh)
            fully_shard(self.backbone, mesh=mesh)
            fully_shard(self.head, mesh=mesh)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: dict[int, list[tuple[float, float]]] = {}  # epoch -> (wall ms, process CPU ms)
        self._start = self._cpu_start = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start, self._cpu_start = time.perf_counter_ns(), time.process_time_ns()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        wall, cpu = (time.perf_counter_ns() - self._start) / 1e6, (time.process_time_ns() - self._cpu_start) / 1e6
        if idx >= self.warmup:
            self.steps.setdefault(trainer.current_epoch, []).append((wall, cpu))


def fit(strategy_name: str, variant: str, args: argparse.Namespace) -> dict[int, list[tuple[float, float]]]:
    """One fit; ``variant`` is ``"ours"`` or ``"floor:<phase>"``; returns the timed steps per phase."""
    sharded = strategy_name == "fsdp2"
    phase = int(variant.partition(":")[2] or 0)
    trainable = BLOCKS[:phase] if variant != "ours" else ()
    callbacks: list[Callback] = [StepTimer(args.warmup_steps)]
    callbacks.append(GradualUnfreeze(schedule=dict(enumerate(BLOCKS, 1))) if variant == "ours" else BNFreezeCallback())
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    steps = args.warmup_steps + args.steps
    generator = torch.Generator().manual_seed(1)
    size = (2 * steps * args.batch_size, 3, args.image_size, args.image_size)
    data = TensorDataset(torch.randn(size, generator=generator), torch.randint(0, 10, (size[0],), generator=generator))
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=3 if variant == "ours" else 1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Model(sharded, trainable), DataLoader(data, batch_size=args.batch_size))
    timer = callbacks[0]
    assert isinstance(timer, StepTimer)
    return timer.steps if variant == "ours" else {phase: timer.steps[0]}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    variants = ["ours", *(f"floor:{phase}" for phase in range(len(PHASES)))]
    results: dict[str, dict[str, list[Any]]] = {s: {v: [] for v in variants} for s in args.strategies}
    for round_index in range(args.warmup_rounds + args.rounds):
        for strategy_name in args.strategies:
            rotated = variants[round_index % len(variants) :] + variants[: round_index % len(variants)]
            for variant in rotated:
                steps = fit(strategy_name, variant, args)
                if round_index >= args.warmup_rounds:
                    results[strategy_name][variant].append(steps)
        print(f"round {round_index + 1} done", file=sys.stderr, flush=True)
    steps = {
        strategy_name: interleaved(strategy_name, args.interleaved_steps, 3, args.batch_size, args.image_size)
        for strategy_name in args.strategies
    }
    if torch.distributed.get_rank() == 0:
        Path(args.worker).write_text(json.dumps({"fits": results, "steps": steps}))


def launch(args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0"}
        argv = [sys.executable, "-m", "benchmarks.ddp_phase_cost", "--worker", str(out), *sys.argv[1:]]
        ranks = [subprocess.Popen(argv, env={**env, "LOCAL_RANK": str(rank)}) for rank in range(2)]
        if any(rank.wait() != 0 for rank in ranks):
            raise SystemExit("a worker failed")
        return dict(json.loads(out.read_text()))


Sample = tuple[float, float]  # (wall ms, process CPU ms)


def ratio_row(ours: list[Sample], floor: list[Sample], rng: random.Random) -> dict[str, float]:
    """Medians, the ratio ``ours / floor`` of median wall times with its 95% bootstrap interval over the paired
    samples, and the ratio of median CPU times."""
    pairs = list(zip(ours, floor, strict=True))

    def ratio(sample: Sequence[tuple[Sample, Sample]], i: int = 0) -> float:
        return median([o[i] for o, _ in sample]) / median([f[i] for _, f in sample])

    low, high = bootstrap_ci(pairs, ratio, rng)
    floor_ms, ours_ms = median([f[0] for f in floor]), median([o[0] for o in ours])
    return {
        "floor_ms": floor_ms,
        "ours_ms": ours_ms,
        "ratio": ratio(pairs),
        "ratio_low": low,
        "ratio_high": high,
        "cpu_ratio": ratio(pairs, 1),
    }


def summarize(results: dict[str, Any], seed: int) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{"fits" | "steps": {strategy: {phase: row}}}``: fits paired by round, interleaved steps by step."""
    rng = random.Random(seed)

    def round_medians(steps: list[Sample]) -> Sample:
        return median([wall for wall, _ in steps]), median([cpu for _, cpu in steps])

    fits = {
        strategy_name: {
            str(phase): ratio_row(
                [round_medians(steps[str(phase)]) for steps in by_variant["ours"]],
                [round_medians(steps[str(phase)]) for steps in by_variant[f"floor:{phase}"]],
                rng,
            )
            for phase in range(len(PHASES))
        }
        for strategy_name, by_variant in results["fits"].items()
    }
    steps = {
        strategy_name: {phase: ratio_row(times["ours"], times["floor"], rng) for phase, times in by_phase.items()}
        for strategy_name, by_phase in results["steps"].items()
    }
    return {"fits": fits, "steps": steps}


def table(rows: dict[str, dict[str, float]]) -> str:
    header = ["phase", "floor ms/step", "ours ms/step", "ratio [95% CI]", "CPU ratio"]
    return markdown_table(
        header,
        [
            [
                PHASES[int(phase)],
                f"{row['floor_ms']:.0f}",
                f"{row['ours_ms']:.0f}",
                f"{row['ratio']:.3f} [{row['ratio_low']:.3f}, {row['ratio_high']:.3f}]",
                f"{row['cpu_ratio']:.3f}",
            ]
            for phase, row in rows.items()
        ],
    )


def report(env: dict[str, Any], args: argparse.Namespace, summary: dict[str, Any]) -> str:
    parts = [
        "# Per-phase step time under DDP and FSDP2: GradualUnfreeze against the floor\n",
        "Generated by `benchmarks/ddp_phase_cost.py` (its docstring describes the method). 2 processes (gloo),"
        f" ResNet-18, {args.image_size}x{args.image_size}, batch {args.batch_size} per rank, 1 torch thread per rank."
        " Floor: the released blocks trainable when the strategy set up the model (DDP's own bucketed, overlapped"
        " reduction; FSDP2's). Ratio: median step time of `ours` over the floor's, with its 95% bootstrap interval;"
        " CPU ratio: the same for process CPU time.\n",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, shared; torch {env['torch']}, Lightning {env['lightning']};"
        f" 1-minute load average {env['load_average_1min_at_start']:.1f} at start,"
        f" {env['load_average_1min_at_end']:.1f} at end; {env['runtime_s']:.0f} s.\n",
        f"## Released blocks' reductions, steps interleaved (plain PyTorch, {args.interleaved_steps} steps each)\n",
    ]
    for strategy_name, rows in summary["steps"].items():
        parts += [f"### {strategy_name}\n", table(rows), ""]
    parts.append(
        f"## Whole fits with the Trainer ({args.rounds} rounds x {args.steps} timed steps per phase,"
        f" {args.warmup_steps} warm-up steps dropped per phase)\n"
    )
    for strategy_name, rows in summary["fits"].items():
        parts += [f"### {strategy_name}\n", table(rows), ""]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=6, help="timed interleaved rounds (default: 6)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per phase per round (default: 6)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at each phase start (default: 2)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--interleaved-steps", type=int, default=40, help="timed steps per variant (default: 40)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size per rank (default: 16)")
    parser.add_argument("--image-size", type=int, default=64, help="training image side (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round x 2 steps, no files")
    parser.add_argument("--json", type=Path, help="raw results (default: benchmarks/raw/ddp_phase_cost.json)")
    parser.add_argument("--markdown", type=Path, help="report (default: benchmarks/ddp_phase_cost.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_steps, args.warmup_rounds, args.interleaved_steps = 1, 2, 1, 0, 4
    elif args.json is None and args.markdown is None:
        args.json, args.markdown = HERE / "raw" / "ddp_phase_cost.json", HERE / "ddp_phase_cost.md"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_bnfreeze"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.worker is not None:
        worker(args)
        return
    env = environment()
    start = time.perf_counter()
    results = launch(args)
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    env["runtime_s"] = round(time.perf_counter() - start, 1)
    summary = summarize(results, args.seed)
    write_report(
        report(env, args, summary), {"environment": env, "summary": summary, "raw": results}, args.markdown, args.json
    )


if __name__ == "__main__":
    main()
