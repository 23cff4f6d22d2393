"""Per-phase step time of ``GradualUnfreeze`` under DDP and FSDP2 (2 CPU processes, gloo), against the floor.

A torchvision ResNet-18 (``weights=None``, ``fc`` removed) as ``backbone`` + a linear ``head`` (10 classes),
64x64 inputs, batch 16 per rank, SGD with momentum 0.9, ``configure_optimizers`` handing over the trainable
parameters; a real ``lightning.pytorch.Trainer`` with ``devices=2``, ``accelerator="cpu"``, one torch thread per
rank. Three phases: 0 trains the head alone, 1 also ``backbone.layer4``, 2 also ``backbone.layer3``.

- ``ours``: ``GradualUnfreeze(what=Schedule({1: "backbone.layer4", 2: "backbone.layer3"}), bn="train")``, one fit
  of 3 epochs: the strategy sets up the model with the backbone frozen; released blocks join later (under DDP
  their gradients are reduced by ``GradientSync``, bucketed and launched during backward; under FSDP2 by FSDP2).
- ``floor``: per phase, a fit of 1 epoch where that phase's blocks are trainable from the start, so that DDP's
  own reducer (bucketed, overlapped with backward) or FSDP2 reduces them; the frozen rest as in ``ours``
  (``requires_grad=False``, its norm layers frozen by ``BNFreezeCallback()``).

Strategies: ``ddp`` and ``fsdp2`` (``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
``fully_shard`` on each ``layerN``, the backbone and the head in ``configure_model``). **Step time**: rank 0's
time from ``on_train_batch_start`` to ``on_train_batch_end``, the first steps of every epoch dropped; each round
runs every variant (order rotated per round). Reported: median step time per phase, the ratio ``ours / floor``
with a bootstrap 95% interval over rounds, and the ratio of median process CPU time per step.

On a shared machine, whole fits minutes apart see different loads, so the same two configurations of phases 1
and 2 are also timed without Lightning, one step each in turn in the same processes (the order alternating every
step), which measures the reductions' cost far more tightly (bootstrap interval over steps): ``floor`` with the
phase's blocks trainable when DDP wraps (or ``fully_shard`` shards) the model; ``ours`` wrapped (sharded, and
stepped once) with the backbone frozen, then the blocks released the way ``GradualUnfreeze`` releases them
(``requires_grad`` on, ``GradientSync.track`` under DDP, the sharded parameters re-registered first under FSDP2).
The frozen rest runs with its norm layers frozen (``KerasFreezer``), in both.

Run from the repository root, on an otherwise idle machine if possible (about 10 minutes on 2 CPU cores)::

    nice -n 10 python -m benchmarks.ddp_phase_cost
    python -m benchmarks.ddp_phase_cost --quick      # CI smoke test: tiny, to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks import common
from benchmarks.common import Batches, Classifier, Sample, StepTimer, markdown_table, median
from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze, NormFreezer, Schedule
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.freezer import KerasFreezer
from lightning_bnfreeze.fsdp import register_sharded_parameters

PHASES = ("0: head only", "1: + layer4", "2: + layer3")
BLOCKS = ("backbone.layer4", "backbone.layer3")  # released at epochs (phases) 1 and 2
STRATEGIES = ("ddp", "fsdp2")


class Model(Classifier):
    """ResNet-18 + head, the backbone frozen but for ``trainable``; with ``sharded``, FSDP2 in ``configure_model``."""

    def __init__(self, sharded: bool = False, trainable: Sequence[str] = ()) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.sharded = sharded
        self.backbone.requires_grad_(False)
        for name in trainable:
            self.get_submodule(name).requires_grad_(True)

    def configure_model(self) -> None:
        if self.sharded:
            shard(self, self.device_mesh["data_parallel"])


def shard(model: Classifier, mesh: Any) -> Classifier:
    from torch.distributed.fsdp import fully_shard

    for name in ("layer1", "layer2", "layer3", "layer4"):
        fully_shard(model.backbone.get_submodule(name), mesh=mesh)
    fully_shard(model.backbone, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    return model


def fit(strategy_name: str, variant: str, args: argparse.Namespace) -> dict[int, list[Sample]]:
    """One fit; ``variant`` is ``"ours"`` or ``"floor:<phase>"``; returns the timed steps per phase."""
    sharded = strategy_name == "fsdp2"
    phase = int(variant.partition(":")[2] or 0)
    timer = StepTimer(args.warmup_steps)
    callbacks: list[Callback] = [timer]
    if variant == "ours":
        callbacks.append(GradualUnfreeze(what=Schedule(dict(enumerate(BLOCKS, 1))), bn="train"))
    else:
        callbacks.append(BNFreezeCallback())
    trainer = common.quiet_trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp",
        devices=2,
        max_epochs=3 if variant == "ours" else 1,
        callbacks=callbacks,
    )
    data = Batches(args.warmup_steps + args.steps, args.batch_size, args.image_size)
    trainer.fit(Model(sharded, BLOCKS[:phase] if variant != "ours" else ()), data)
    return timer.steps if variant == "ours" else {phase: timer.steps[0]}


def replica(strategy: str, phase: int, ours: bool, batch: tuple[Tensor, Tensor]) -> Callable[[], None]:
    """One training step of phase ``phase``'s floor or of ours, in plain PyTorch (see the module docstring)."""
    released = BLOCKS[:phase]
    model = Model(trainable=() if ours else released)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        wrapped: nn.Module = shard(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    else:
        wrapped = DistributedDataParallel(model)
    sync = GradientSync(wrapped)
    freezer = KerasFreezer(NormFreezer(model))

    def step(optimizer: torch.optim.Optimizer | None) -> None:
        freezer.update()
        F.cross_entropy(wrapped(batch[0]), batch[1]).backward()
        sync.finish_backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()

    if ours:
        step(None)  # wrapped (and FSDP2's lazy initialisation done) with the backbone frozen
        model.zero_grad()
        register_sharded_parameters(model)
        params = [p for name in released for p in model.get_submodule(name).parameters()]
        for param in params:
            param.requires_grad = True
        sync.track(params)
    optimizer = model.configure_optimizers()
    return lambda: step(optimizer)


def interleaved(strategy: str, args: argparse.Namespace, warmup: int = 3) -> dict[str, dict[str, list[Sample]]]:
    """Per phase (1, 2): ``{"floor": [(wall ms, CPU ms), ...], "ours": [...]}``, one step of each in turn."""
    batch = Batches(1, args.batch_size, args.image_size, seed=dist.get_rank()).batches[0]
    results = {}
    for phase in range(1, len(BLOCKS) + 1):
        steps = {"floor": replica(strategy, phase, False, batch), "ours": replica(strategy, phase, True, batch)}
        times: dict[str, list[Sample]] = {name: [] for name in steps}
        for index in range(warmup + args.interleaved_steps):
            for name in sorted(steps, reverse=index % 2 == 1):
                dist.barrier()
                start, cpu_start = time.perf_counter_ns(), time.process_time_ns()
                steps[name]()
                if index >= warmup:
                    times[name].append(
                        ((time.perf_counter_ns() - start) / 1e6, (time.process_time_ns() - cpu_start) / 1e6)
                    )
        results[str(phase)] = times
    return results


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    variants = ["ours", *(f"floor:{phase}" for phase in range(len(PHASES)))]
    results: dict[str, dict[str, list[Any]]] = {s: {v: [] for v in variants} for s in args.strategies}
    for round_index in range(args.warmup_rounds + args.rounds):
        for strategy_name in args.strategies:
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                steps = fit(strategy_name, variant, args)
                if round_index >= args.warmup_rounds:
                    results[strategy_name][variant].append(steps)
        print(f"round {round_index + 1} done", file=sys.stderr, flush=True)
    steps = {strategy_name: interleaved(strategy_name, args) for strategy_name in args.strategies}
    if dist.get_rank() == 0:
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


def summarize(results: dict[str, Any], seed: int) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{"fits" | "steps": {strategy: {phase: row}}}``: fits paired by round (each round's medians), interleaved
    steps by step."""
    rng = random.Random(seed)

    def round_medians(steps: list[Sample]) -> list[Sample]:
        return [(median([wall for wall, _ in steps]), median([cpu for _, cpu in steps]))]

    fits = {
        strategy_name: {
            str(phase): common.ratio_row(
                [round_medians(steps[str(phase)]) for steps in by_variant["ours"]],
                [round_medians(steps[str(phase)]) for steps in by_variant[f"floor:{phase}"]],
                rng,
            )
            for phase in range(len(PHASES))
        }
        for strategy_name, by_variant in results["fits"].items()
    }
    steps = {
        strategy_name: {
            phase: common.ratio_row([[s] for s in times["ours"]], [[s] for s in times["floor"]], rng)
            for phase, times in by_phase.items()
        }
        for strategy_name, by_phase in results["steps"].items()
    }
    return {"fits": fits, "steps": steps}


def table(rows: dict[str, dict[str, Any]]) -> str:
    header = ["phase", "floor ms/step", "ours ms/step", "ratio [95% CI]", "CPU ratio"]
    return markdown_table(header, [[
        PHASES[int(phase)], f"{row['floor_ms']:.0f}", f"{row['median_ms']:.0f}",
        f"{row['ratio']:.3f} [{row['ratio_ci'][0]:.3f}, {row['ratio_ci'][1]:.3f}]", f"{row['cpu_ratio']:.3f}",
    ] for phase, row in rows.items()])  # fmt: skip


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
    common.size_arguments(parser, threads=False, per=" per rank")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    common.output_arguments(parser, "ddp_phase_cost")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_steps, args.warmup_rounds, args.interleaved_steps = 1, 2, 1, 0, 4
        args.batch_size, args.image_size = 4, 32
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet()
    if args.worker is not None:
        worker(args)
        return
    env = common.environment()
    start = time.perf_counter()
    results = launch(args)
    common.finish_environment(env, start)
    summary = summarize(results, args.seed)
    text = report(env, args, summary)
    common.write_report(args, "ddp_phase_cost", text, {"environment": env, "summary": summary, "raw": results},
                        2 * len(args.strategies))  # fmt: skip


if __name__ == "__main__":
    main()
