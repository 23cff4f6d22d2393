"""What the callbacks cost: host time per training step, and frozen-backbone step time.

Two measurements, printed as Markdown tables (ready to paste into the README):

1. **Hook cost per step** on a torchvision ResNet-50 backbone (53 ``BatchNorm2d``). The callback is
   set up as Lightning would (``setup(trainer, module, "fit")`` then ``on_train_start``, with a stub
   trainer: the callback does not use it in these hooks), then ``on_train_batch_start`` is timed in a
   tight loop with ``time.perf_counter_ns``: median over repeats of the mean over many thousand calls,
   for the explicit mode (``modules="backbone"``, runs ``NormFreezer.enforce()``) and the automatic
   mode (``modules=None`` with the backbone's parameters at ``requires_grad=False``, runs
   ``KerasFreezer.update()``), and ``GradualUnfreeze`` at epoch 2 of
   ``{1: "backbone.layer4", 2: "backbone.layer3"}`` (re-checks the 24 still-frozen norm layers and ties
   the two released groups' learning rates to the head's; a stub trainer with one Adam optimizer).
   The no-op base ``Callback.on_train_batch_start`` is timed too:
   the cost of the call itself. Cross-check that a frozen layer costs nothing per forward pass: the
   eval-mode ResNet-50 forward on a 1x3x32x32 input, frozen vs not frozen (the same model, toggled
   with ``on_train_start``/``teardown``), interleaved ABBA, median of the paired differences.

2. **Training step time** of a torchvision ResNet-18 backbone + linear head (10 classes), 64x64
   inputs, batch 16, CPU, a full step each (forward, cross-entropy, backward, ``optimizer.step()``,
   ``zero_grad()``) written by hand in plain PyTorch, no Trainer. Variants, each its own copy of the
   same initial weights, run round-robin (order rotated every round) so machine noise hits all alike:

   - ``floor``: hand-written frozen backbone: backbone in eval mode under ``torch.no_grad()``.
   - ``ours (explicit)`` / ``ours (auto)``: backbone parameters at ``requires_grad=False`` plus
     ``BNFreezeCallback(modules="backbone")`` / ``BNFreezeCallback()``; before each step
     ``on_train_batch_start`` then ``module.train()`` (both inside the timed step: Lightning calls
     ``.train()`` once per epoch, so this is the pessimistic case), then a plain forward.
   - ``requires_grad=False only``: what naive PyTorch does: BN layers in train mode, batch
     statistics, running statistics updated.
   - ``full fine-tuning``: everything trains.

   Only the head's parameters go to the optimizer (SGD, momentum 0.9), except for full fine-tuning.
   Reported: median step time, its ratio to the floor (with a bootstrap 95% interval over rounds),
   and checks of what each variant really does: BN mode, running statistics, whether the backbone output
   requires grad and how many nodes autograd recorded for the loss (a frozen backbone should add none).

Run from the repository root on an otherwise idle machine (about 1.5 minutes on 2 CPU cores with the
defaults; many times that, with meaningless step times, when other processes compete for the cores: the
load average at start and end is recorded and a warning printed if the machine was busy)::

    python -m benchmarks.bn_freeze_overhead
    python -m benchmarks.bn_freeze_overhead --only hook           # one of the two; prints, writes no files

A full run writes the report to ``benchmarks/bn_freeze_overhead.md`` (committed) and the raw results to
``benchmarks/raw/bn_freeze_overhead.json`` (git-ignored); ``--markdown`` / ``--json`` choose other files.

``--help`` lists the knobs (iterations, repeats, rounds, threads, output files).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50

from benchmarks.common import (
    NUM_CLASSES,
    Classifier,
    bootstrap_ci,
    environment,
    markdown_table,
    median,
    quartiles,
    write_report,
)
from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze, named_norm_layers

HERE = Path(__file__).resolve().parent

# The callback does not touch the trainer in setup / on_train_start / on_train_batch_start / teardown.
STUB_TRAINER = cast(pl.Trainer, SimpleNamespace())


# --------------------------------------------------------------------------------------------------
# Model and helpers
# --------------------------------------------------------------------------------------------------


def norm_layers(module: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in named_norm_layers(module)]


def attach(callback: Callback, module: pl.LightningModule) -> None:
    """Set the callback up as ``Trainer.fit`` does before the first batch."""
    callback.setup(STUB_TRAINER, module, "fit")
    callback.on_train_start(STUB_TRAINER, module)


# --------------------------------------------------------------------------------------------------
# 1. Hook cost per step, ResNet-50
# --------------------------------------------------------------------------------------------------


def released_gradual_unfreeze(module: pl.LightningModule) -> tuple[GradualUnfreeze, pl.Trainer]:
    """``GradualUnfreeze`` set up as ``Trainer.fit`` does, at epoch 2 with layer4 and layer3 released.

    The stub trainer holds what the callback reads: one Adam optimizer over all parameters, no LR
    scheduler, no DDP, no logger. Per step the callback then re-checks the frozen norm layers and
    ties the two released groups' learning rates to the head's.
    """
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    trainer = cast(
        pl.Trainer,
        SimpleNamespace(
            optimizers=[optimizer],
            lr_scheduler_configs=[],
            strategy=SimpleNamespace(model=module),
            max_epochs=10,
            current_epoch=0,
            global_step=0,
            loggers=[],
        ),
    )
    callback = GradualUnfreeze(schedule={1: "backbone.layer4", 2: "backbone.layer3"})
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    callback.on_train_start(trainer, module)
    trainer.current_epoch = 2
    callback.on_train_epoch_start(trainer, module)
    assert [group["name"] for group in optimizer.param_groups] == ["head", "backbone.layer4", "backbone.layer3"]
    return callback, trainer


def time_hook(
    callback: Callback, module: pl.LightningModule, iters: int, repeats: int, trainer: pl.Trainer = STUB_TRAINER
) -> list[float]:
    """Nanoseconds per ``on_train_batch_start`` call: the mean over ``iters`` calls, per repeat."""
    hook = callback.on_train_batch_start
    batch = None
    for i in range(max(iters // 10, 100)):  # warm-up
        hook(trainer, module, batch, i)
    results = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for i in range(iters):
            hook(trainer, module, batch, i)
        results.append((time.perf_counter_ns() - start) / iters)
    return results


def frozen_resnet50() -> Classifier:
    module = Classifier(resnet50)
    module.backbone.requires_grad_(False)
    return module


def bench_hook(iters: int, repeats: int) -> dict[str, Any]:
    cases: list[tuple[str, Callback | None]] = [
        ("no-op `Callback` (call overhead)", Callback()),
        ('BNFreezeCallback explicit: `modules="backbone"`', BNFreezeCallback(modules="backbone")),
        ("BNFreezeCallback auto: `modules=None`", BNFreezeCallback()),
        ("GradualUnfreeze, layer4 + layer3 released", None),
    ]
    rows = []
    for name, case in cases:
        module = frozen_resnet50()
        module.train()
        layers = norm_layers(module.backbone)
        trainer = STUB_TRAINER
        if case is None:
            callback, trainer = released_gradual_unfreeze(module)
        else:
            callback = case
            attach(callback, module)
        if isinstance(callback, BNFreezeCallback):
            assert len(callback.frozen_layers) == len(layers), (name, callback.frozen_layers)
            assert not any(layer.training for layer in layers)
        per_call_ns = time_hook(callback, module, iters, repeats, trainer)
        step_us = median(per_call_ns) / 1000
        rows.append(
            {
                "case": name,
                "norm_layers": len(layers),
                "us_per_step": step_us,
                "us_per_step_min": min(per_call_ns) / 1000,
                "us_per_step_max": max(per_call_ns) / 1000,
                "us_per_layer": step_us / len(layers),
            }
        )
    return {"iters": iters, "repeats": repeats, "rows": rows}


def bench_forward(pairs: int, rng: random.Random) -> dict[str, Any]:
    """Eval-mode ResNet-50 forward, frozen vs not, same model toggled, ABBA-interleaved pairs."""
    module = frozen_resnet50()
    callback = BNFreezeCallback(modules="backbone")
    attach(callback, module)
    module.eval()
    layers = norm_layers(module.backbone)
    x = torch.randn(1, 3, 32, 32)

    def set_frozen(frozen: bool) -> None:
        if frozen and not callback.frozen_layers:
            callback.on_train_start(STUB_TRAINER, module)
        elif not frozen and callback.frozen_layers:
            callback.teardown(STUB_TRAINER, module, "fit")
        assert bool(callback.frozen_layers) == frozen and not any(layer.training for layer in layers)

    def forward_ns() -> int:
        start = time.perf_counter_ns()
        module(x)
        return time.perf_counter_ns() - start

    times: dict[bool, list[int]] = {True: [], False: []}
    with torch.no_grad():
        for frozen in (True, False) * 20:  # warm-up
            set_frozen(frozen)
            forward_ns()
        for i in range(pairs):
            for frozen in (True, False) if i % 2 == 0 else (False, True):
                set_frozen(frozen)
                times[frozen].append(forward_ns())
    set_frozen(False)

    diffs_us = [(a - b) / 1000 for a, b in zip(times[True], times[False], strict=True)]
    low, high = bootstrap_ci(diffs_us, median, rng)
    unfrozen_us = median(times[False]) / 1000
    return {
        "pairs": pairs,
        "frozen_us": median(times[True]) / 1000,
        "unfrozen_us": unfrozen_us,
        "diff_us": median(diffs_us),
        "diff_ci_us": [low, high],
        "diff_pct": 100 * median(diffs_us) / unfrozen_us,
    }


# --------------------------------------------------------------------------------------------------
# 2. Frozen-backbone training step, ResNet-18
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of training the head on a frozen (or not) backbone, and its timings."""

    name: str
    module: Classifier
    optimizer: torch.optim.Optimizer
    features: Callable[[Tensor], Tensor]
    before_step: Callable[[int], None] = lambda _: None
    step_ms: list[list[float]] = field(default_factory=list)  # per round, per step
    features_require_grad: bool | None = None
    graph_nodes: int | None = None

    def step(self, index: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A full training step; returns the backbone output and the loss."""
        self.before_step(index)
        features = self.features(x)
        loss = F.cross_entropy(self.module.head(features), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return features, loss

    def all_ms(self) -> list[float]:
        return [ms for round_ms in self.step_ms for ms in round_ms]


def graph_size(loss: Tensor) -> int:
    """How many nodes autograd recorded to compute ``loss`` (``AccumulateGrad`` nodes included)."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def floor_variant(base: Classifier) -> Variant:
    module = copy.deepcopy(base)
    module.backbone.eval()
    module.head.train()

    def features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module.backbone(x)

    return Variant("floor: `eval()` + `no_grad()`", module, sgd(module.head.parameters()), features)


def callback_variant(base: Classifier, name: str, callback: BNFreezeCallback) -> Variant:
    module = copy.deepcopy(base)
    module.backbone.requires_grad_(False)
    attach(callback, module)

    def before_step(index: int) -> None:
        callback.on_train_batch_start(STUB_TRAINER, module, None, index)
        module.train()

    return Variant(name, module, sgd(module.head.parameters()), module.backbone, before_step)


def train_mode_variant(base: Classifier, name: str, freeze_backbone: bool) -> Variant:
    module = copy.deepcopy(base)
    module.backbone.requires_grad_(not freeze_backbone)
    params = module.head.parameters() if freeze_backbone else module.parameters()
    return Variant(name, module, sgd(params), module.backbone, lambda _: module.train())


def bench_step(
    rounds: int, steps_per_round: int, warmup_rounds: int, batch_size: int, image_size: int, rng: random.Random
) -> dict[str, Any]:
    torch.manual_seed(0)
    base = Classifier(resnet18)
    variants = [
        floor_variant(base),
        callback_variant(base, 'ours (explicit): `BNFreezeCallback(modules="backbone")`', BNFreezeCallback("backbone")),
        callback_variant(base, "ours (auto): `BNFreezeCallback()`", BNFreezeCallback()),
        train_mode_variant(base, "`requires_grad=False` only (naive)", freeze_backbone=True),
        train_mode_variant(base, "full fine-tuning", freeze_backbone=False),
    ]
    batches = [
        (torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, NUM_CLASSES, (batch_size,)))
        for _ in range(4)
    ]
    stats_before = [[layer.running_mean.clone() for layer in norm_layers(v.module.backbone)] for v in variants]

    index = 0
    for round_index in range(warmup_rounds + rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            times = []
            for _ in range(steps_per_round):
                x, y = batches[index % len(batches)]
                start = time.perf_counter_ns()
                features, loss = variant.step(index, x, y)
                times.append((time.perf_counter_ns() - start) / 1e6)
                index += 1
            variant.features_require_grad = features.requires_grad
            variant.graph_nodes = graph_size(loss)
            if round_index >= warmup_rounds:
                variant.step_ms.append(times)

    floor = variants[0]
    floor_median = median(floor.all_ms())
    rows = []
    for variant, before in zip(variants, stats_before, strict=True):
        layers = norm_layers(variant.module.backbone)
        variant.before_step(index)  # the mode each layer runs its forward in
        ms = variant.all_ms()
        q1, q3 = quartiles(ms)
        paired = list(zip(variant.step_ms, floor.step_ms, strict=True))
        low, high = bootstrap_ci(
            paired,
            lambda sample: median([t for v, _ in sample for t in v]) / median([t for _, f in sample for t in f]),
            rng,
        )
        rows.append(
            {
                "variant": variant.name,
                "median_ms": median(ms),
                "q1_ms": q1,
                "q3_ms": q3,
                "ratio": median(ms) / floor_median,
                "ratio_ci": [low, high],
                "bn_train_mode": any(layer.training for layer in layers),
                "bn_stats_changed": any(
                    not torch.equal(layer.running_mean, mean) for layer, mean in zip(layers, before, strict=True)
                ),
                "backbone_output_requires_grad": variant.features_require_grad,
                "autograd_graph_nodes": variant.graph_nodes,
                "optimized_params": sum(p.numel() for group in variant.optimizer.param_groups for p in group["params"]),
            }
        )
    return {
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "warmup_rounds": warmup_rounds,
        "batch_size": batch_size,
        "image_size": image_size,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def report(
    env: dict[str, Any], hook: dict[str, Any] | None, forward: dict[str, Any] | None, step: dict[str, Any] | None
) -> str:
    parts = [
        "### Environment",
        "",
        markdown_table(
            ["", ""],
            [[f"`{key}`", f"{value:.2f}" if isinstance(value, float) else str(value)] for key, value in env.items()],
        ),
    ]
    other_load = max(env["load_average_1min_at_start"], env["load_average_1min_at_end"] - env["torch_threads"])
    if other_load > (env["cpu_count"] or 1) / 2:
        parts += [
            "",
            f"> **Warning**: the machine was busy (1-min load average {env['load_average_1min_at_start']:.1f} at start,"
            f" {env['load_average_1min_at_end']:.1f} at end, on {env['cpu_count']} CPUs): step times are inflated and"
            " noisy. Rerun on an idle machine before quoting them.",
        ]
    if hook is not None:
        parts += [
            "",
            f"### Host time of `on_train_batch_start` per training step, ResNet-50 backbone "
            f"({hook['rows'][0]['norm_layers']} BatchNorm2d)",
            "",
            f"Median over {hook['repeats']} repeats of the mean over {hook['iters']:,} calls "
            "(min-max across repeats). Target: at most 20 µs per step.",
            "",
            markdown_table(
                ["hook", "µs / step", "min-max µs", "µs / layer"],
                [
                    [
                        row["case"],
                        f"{row['us_per_step']:.2f}",
                        f"{row['us_per_step_min']:.2f}-{row['us_per_step_max']:.2f}",
                        f"{row['us_per_layer']:.3f}",
                    ]
                    for row in hook["rows"]
                ],
            ),
        ]
    if forward is not None:
        low, high = forward["diff_ci_us"]
        parts += [
            "",
            "### Cross-check: per-forward cost of a frozen layer, eval-mode ResNet-50, 1x3x32x32 input",
            "",
            f"{forward['pairs']} interleaved pairs (ABBA), same model frozen / not frozen; difference = median of "
            "paired differences, with a bootstrap 95% interval.",
            "",
            markdown_table(
                ["frozen µs", "not frozen µs", "difference µs (95% CI)", "difference %"],
                [
                    [
                        f"{forward['frozen_us']:.1f}",
                        f"{forward['unfrozen_us']:.1f}",
                        f"{forward['diff_us']:+.1f} ({low:+.1f} to {high:+.1f})",
                        f"{forward['diff_pct']:+.2f}%",
                    ]
                ],
            ),
        ]
    if step is not None:
        parts += [
            "",
            f"### Training step, ResNet-18 backbone + linear head, {step['image_size']}x{step['image_size']} inputs, "
            f"batch {step['batch_size']}, CPU",
            "",
            f"{step['rounds']} round-robin rounds x {step['steps_per_round']} steps per variant after "
            f"{step['warmup_rounds']} warm-up rounds; ratio to the floor with a bootstrap 95% interval over rounds. "
            "Target: ours <= 1.05x the floor.",
            "",
            markdown_table(
                [
                    "variant",
                    "median ms (IQR)",
                    "x floor (95% CI)",
                    "BN mode",
                    "BN stats change",
                    "backbone output requires_grad",
                    "autograd nodes",
                    "optimized params",
                ],
                [
                    [
                        row["variant"],
                        f"{row['median_ms']:.1f} ({row['q1_ms']:.1f}-{row['q3_ms']:.1f})",
                        f"{row['ratio']:.3f} ({row['ratio_ci'][0]:.3f}-{row['ratio_ci'][1]:.3f})",
                        "train" if row["bn_train_mode"] else "eval",
                        "yes" if row["bn_stats_changed"] else "no",
                        str(row["backbone_output_requires_grad"]),
                        str(row["autograd_graph_nodes"]),
                        f"{row['optimized_params']:,}",
                    ]
                    for row in step["rows"]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=["hook", "step"], help="run only one of the two benchmarks")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--hook-iters", type=int, default=10_000, help="hook calls per repeat (default: 10000)")
    parser.add_argument("--hook-repeats", type=int, default=15, help="repeats of the hook loop (default: 15)")
    parser.add_argument("--forward-pairs", type=int, default=300, help="frozen/not-frozen forward pairs (default: 300)")
    parser.add_argument("--rounds", type=int, default=40, help="timed round-robin rounds (default: 40)")
    parser.add_argument("--steps-per-round", type=int, default=3, help="steps per variant per round (default: 3)")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default: 16)")
    parser.add_argument("--image-size", type=int, default=64, help="training image side (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    parser.add_argument("--json", type=Path, help="raw results file (default: benchmarks/raw/bn_freeze_overhead.json)")
    parser.add_argument("--markdown", type=Path, help="Markdown report (default: benchmarks/bn_freeze_overhead.md)")
    args = parser.parse_args(argv)
    if args.only is None and args.json is None and args.markdown is None:
        args.json, args.markdown = HERE / "raw" / "bn_freeze_overhead.json", HERE / "bn_freeze_overhead.md"
    if args.rounds * args.steps_per_round < 2 or args.hook_repeats < 1 or args.forward_pairs < 2:
        parser.error("need at least 2 timed steps per variant, 1 hook repeat and 2 forward pairs")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "N norm layer(s) frozen" on every attach
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rng = random.Random(args.seed)
    env = environment()
    start = time.perf_counter()

    hook = forward = step = None
    if args.only in (None, "hook"):
        print("1/2 hook cost (ResNet-50) ...", file=sys.stderr, flush=True)
        hook = bench_hook(args.hook_iters, args.hook_repeats)
        forward = bench_forward(args.forward_pairs, rng)
    if args.only in (None, "step"):
        print("2/2 training step (ResNet-18) ...", file=sys.stderr, flush=True)
        step = bench_step(args.rounds, args.steps_per_round, args.warmup_rounds, args.batch_size, args.image_size, rng)
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    env["runtime_s"] = round(time.perf_counter() - start, 1)

    results = {"environment": env, "hook": hook, "forward": forward, "step": step}
    write_report(report(env, hook, forward, step), results, args.markdown, args.json)


if __name__ == "__main__":
    main()
