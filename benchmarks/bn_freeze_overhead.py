"""What the callbacks cost: host time per training step, and frozen-backbone step time.

Two measurements, printed as Markdown tables (ready to paste into the README):

1. **Hook cost per step** on a torchvision ResNet-50 backbone (53 ``BatchNorm2d``), its parameters at
   ``requires_grad=False``. Each callback runs in a real ``Trainer`` fit of 3 epochs of one small batch;
   at the start of the last epoch (after the callback's own epoch-start hook) its per-step hooks
   (``on_train_batch_start``, ``on_after_backward``, ``on_train_batch_end``) are timed in a tight loop
   with ``time.perf_counter_ns``: median over repeats of the mean over many thousand steps. Callbacks:
   ``BNFreezeCallback`` in the explicit mode (``modules="backbone"``, runs ``NormFreezer.enforce()``)
   and the automatic mode (``modules=None``, runs ``KerasFreezer.update()``), and ``GradualUnfreeze``
   at epoch 2 of ``Schedule({1: "backbone.layer4", 2: "backbone.layer3"})`` (``bn="train"``: it
   re-checks the 24 still-frozen norm layers and ties the two released groups' learning rates to the
   head's). The no-op base ``Callback`` is timed too: the cost of the calls themselves. Cross-check that
   a frozen layer costs nothing per forward pass: the eval-mode ResNet-50 forward on a 1x3x32x32 input,
   its norm layers frozen (``NormFreezer``) vs not (the same model, toggled), interleaved ABBA, median
   of the paired differences.

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

Run from the repository root on an otherwise idle machine (about 1.5 minutes on 2 CPU cores; the load
average at start and end is recorded and a warning printed if the machine was busy)::

    python -m benchmarks.bn_freeze_overhead
    python -m benchmarks.bn_freeze_overhead --only hook           # one of the two; prints, writes no files
    python -m benchmarks.bn_freeze_overhead --quick               # CI smoke test: tiny, to a temp dir

A full run writes the report to ``benchmarks/bn_freeze_overhead.md`` (committed) and the raw results to
``benchmarks/raw/bn_freeze_overhead.json`` (git-ignored); ``--markdown`` / ``--json`` choose other files.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50

from benchmarks import common
from benchmarks.common import Batches, Classifier, markdown_table, median
from lightning_bnfreeze import (
    BNFreezeCallback,
    GradualUnfreeze,
    NormFreezer,
    Schedule,
    named_norm_layers,
    norm_layer_names,
)

# What `BNFreezeCallback` reads of the trainer outside a fit (`setup`, `on_train_start`, its batch hook).
STUB_TRAINER = cast(pl.Trainer, SimpleNamespace(callbacks=[], optimizers=[]))


def norm_layers(module: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in named_norm_layers(module)]


def frozen_resnet50() -> Classifier:
    module = Classifier(resnet50)
    module.backbone.requires_grad_(False)
    return module


# ------------------------------------------------------------------------------- 1. hook cost, ResNet-50


class HookTimer(Callback):
    """At the start of the last epoch, after ``target``'s own hook: time ``target``'s per-step hooks."""

    def __init__(self, target: Callback, iters: int, repeats: int) -> None:
        self.target, self.iters, self.repeats = target, iters, repeats
        self.ns_per_step: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < trainer.max_epochs - 1:  # type: ignore[operator]
            return
        target = self.target
        if isinstance(target, GradualUnfreeze):
            assert len(trainer.optimizers[0].param_groups) == 3, "the head, layer4 and layer3"
        elif isinstance(target, BNFreezeCallback):
            assert not any(layer.training for layer in norm_layers(pl_module.backbone))

        def step(i: int) -> None:
            target.on_train_batch_start(trainer, pl_module, None, i)
            target.on_after_backward(trainer, pl_module)
            target.on_train_batch_end(trainer, pl_module, None, None, i)

        for i in range(max(self.iters // 10, 100)):  # warm-up
            step(i)
        for _ in range(self.repeats):
            start = time.perf_counter_ns()
            for i in range(self.iters):
                step(i)
            self.ns_per_step.append((time.perf_counter_ns() - start) / self.iters)


def bench_hook(iters: int, repeats: int) -> dict[str, Any]:
    cases: dict[str, Callable[[], Callback]] = {
        "no-op `Callback` (call overhead)": Callback,
        'BNFreezeCallback explicit: `modules="backbone"`': lambda: BNFreezeCallback(modules="backbone"),
        "BNFreezeCallback auto: `modules=None`": BNFreezeCallback,
        "GradualUnfreeze, layer4 + layer3 released": lambda: GradualUnfreeze(
            what=Schedule({1: "backbone.layer4", 2: "backbone.layer3"}), bn="train"
        ),
    }
    rows = []
    for name, build in cases.items():
        module = frozen_resnet50()
        timer = HookTimer(build(), iters, repeats)
        trainer = common.quiet_trainer(devices=1, max_epochs=3, callbacks=[timer.target, timer], limit_val_batches=0)
        trainer.fit(module, train_dataloaders=Batches(1, 2, 32))
        layers, ns = len(norm_layers(module.backbone)), timer.ns_per_step
        step_us = median(ns) / 1000
        rows.append({"case": name, "norm_layers": layers, "us_per_step": step_us, "us_per_step_min": min(ns) / 1000,
                     "us_per_step_max": max(ns) / 1000, "us_per_layer": step_us / layers})  # fmt: skip
    return {"iters": iters, "repeats": repeats, "rows": rows}


def bench_forward(pairs: int, rng: random.Random) -> dict[str, Any]:
    """Eval-mode ResNet-50 forward, norm layers frozen vs not, same model toggled, ABBA-interleaved pairs."""
    module = frozen_resnet50().eval()
    freezer = NormFreezer(module)
    names = norm_layer_names(module, ["backbone"])
    x = torch.randn(1, 3, 32, 32)

    def forward_ns(frozen: bool) -> int:
        if frozen and not freezer.frozen:
            freezer.freeze(names)
        elif not frozen and freezer.frozen:
            freezer.unfreeze_all()
        start = time.perf_counter_ns()
        module(x)
        return time.perf_counter_ns() - start

    times: dict[bool, list[int]] = {True: [], False: []}
    with torch.no_grad():
        for frozen in (True, False) * 20:  # warm-up
            forward_ns(frozen)
        for i in range(pairs):
            for frozen in (True, False) if i % 2 == 0 else (False, True):
                times[frozen].append(forward_ns(frozen))
    diffs_us = [(a - b) / 1000 for a, b in zip(times[True], times[False], strict=True)]
    low, high = common.bootstrap_ci(diffs_us, median, rng)
    unfrozen_us = median(times[False]) / 1000
    return {
        "pairs": pairs,
        "frozen_us": median(times[True]) / 1000,
        "unfrozen_us": unfrozen_us,
        "diff_us": median(diffs_us),
        "diff_ci_us": [low, high],
        "diff_pct": 100 * median(diffs_us) / unfrozen_us,
    }


# ------------------------------------------------------------------------------- 2. training step, ResNet-18


@dataclass
class Variant:
    """One way of training the head on a frozen (or not) backbone, and its timings."""

    name: str
    module: Classifier
    params: Any  # what the optimizer trains
    features: Callable[[Tensor], Tensor]
    before_step: Callable[[int], None] = lambda _: None
    steps: list[list[common.Sample]] = field(default_factory=list)  # per round, per step
    features_require_grad: bool | None = None
    graph_nodes: int | None = None

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.SGD(self.params, lr=common.LR, momentum=0.9)

    def step(self, index: int, x: Tensor, y: Tensor) -> common.Sample:
        """A full training step; returns its wall and CPU time."""
        cpu, start = time.process_time_ns(), time.perf_counter_ns()
        self.before_step(index)
        features = self.features(x)
        loss = F.cross_entropy(self.module.head(features), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        elapsed = ((time.perf_counter_ns() - start) / 1e6, (time.process_time_ns() - cpu) / 1e6)
        self.features_require_grad, self.graph_nodes = features.requires_grad, graph_size(loss)
        return elapsed


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


def variants(base: Classifier) -> list[Variant]:
    floor = copy.deepcopy(base)
    floor.backbone.eval()

    def no_grad_features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return floor.backbone(x)

    def with_callback(name: str, callback: BNFreezeCallback) -> Variant:
        module = copy.deepcopy(base)
        module.backbone.requires_grad_(False)
        callback.setup(STUB_TRAINER, module, "fit")
        callback.on_train_start(STUB_TRAINER, module)

        def before_step(index: int) -> None:
            callback.on_train_batch_start(STUB_TRAINER, module, None, index)
            module.train()

        return Variant(name, module, module.head.parameters(), module.backbone, before_step)

    def plain(name: str, freeze_backbone: bool) -> Variant:
        module = copy.deepcopy(base)
        module.backbone.requires_grad_(not freeze_backbone)
        params = module.head.parameters() if freeze_backbone else module.parameters()
        return Variant(name, module, params, module.backbone, lambda _: module.train())

    return [
        Variant("floor: `eval()` + `no_grad()`", floor, floor.head.parameters(), no_grad_features),
        with_callback('ours (explicit): `BNFreezeCallback(modules="backbone")`', BNFreezeCallback("backbone")),
        with_callback("ours (auto): `BNFreezeCallback()`", BNFreezeCallback()),
        plain("`requires_grad=False` only (naive)", freeze_backbone=True),
        plain("full fine-tuning", freeze_backbone=False),
    ]


def bench_step(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    torch.manual_seed(0)
    chosen = variants(Classifier(resnet18))
    batches = Batches(4, args.batch_size, args.image_size).batches
    stats_before = [[layer.running_mean.clone() for layer in norm_layers(v.module.backbone)] for v in chosen]
    index = 0
    for round_index in range(args.warmup_rounds + args.rounds):
        shift = round_index % len(chosen)
        for variant in chosen[shift:] + chosen[:shift]:
            times = [variant.step(index + i, *batches[(index + i) % len(batches)]) for i in range(args.steps_per_round)]
            index += args.steps_per_round
            if round_index >= args.warmup_rounds:
                variant.steps.append(times)
    rows = []
    for variant, before in zip(chosen, stats_before, strict=True):
        layers = norm_layers(variant.module.backbone)
        variant.before_step(index)  # the mode each layer runs its forward in
        row = common.ratio_row(variant.steps, chosen[0].steps, rng)
        rows.append(
            {
                "variant": variant.name,
                **row,
                "iqr_ms": common.quartiles([ms for steps in variant.steps for ms, _ in steps]),
                "bn_train_mode": any(layer.training for layer in layers),
                "bn_stats_changed": any(map(lambda la, m: not torch.equal(la.running_mean, m), layers, before)),
                "backbone_output_requires_grad": variant.features_require_grad,
                "autograd_graph_nodes": variant.graph_nodes,
                "optimized_params": sum(p.numel() for group in variant.optimizer.param_groups for p in group["params"]),
            }
        )
    keys = ("rounds", "steps_per_round", "warmup_rounds", "batch_size", "image_size")
    return {**{key: getattr(args, key) for key in keys}, "rows": rows}


# -------------------------------------------------------------------------------------------------- report


def report(env: dict[str, Any], hook: dict | None, forward: dict | None, step: dict | None) -> str:
    parts = [common.environment_table(env)]
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
            "### Host time of the per-step hooks (`on_train_batch_start`, `on_after_backward`, `on_train_batch_end`)"
            f" per training step, ResNet-50 backbone ({hook['rows'][0]['norm_layers']} BatchNorm2d)",
            "",
            f"Median over {hook['repeats']} repeats of the mean over {hook['iters']:,} steps "
            "(min-max across repeats). Target: at most 20 µs per step.",
            "",
            markdown_table(["hook", "µs / step", "min-max µs", "µs / layer"], [[
                row["case"], f"{row['us_per_step']:.2f}", f"{row['us_per_step_min']:.2f}-{row['us_per_step_max']:.2f}",
                f"{row['us_per_layer']:.3f}"] for row in hook["rows"]]),
        ]  # fmt: skip
    if forward is not None:
        low, high = forward["diff_ci_us"]
        parts += [
            "",
            "### Cross-check: per-forward cost of a frozen layer, eval-mode ResNet-50, 1x3x32x32 input",
            "",
            f"{forward['pairs']} interleaved pairs (ABBA), same model frozen / not frozen; difference = median of "
            "paired differences, with a bootstrap 95% interval.",
            "",
            markdown_table(["frozen µs", "not frozen µs", "difference µs (95% CI)", "difference %"], [[
                f"{forward['frozen_us']:.1f}", f"{forward['unfrozen_us']:.1f}",
                f"{forward['diff_us']:+.1f} ({low:+.1f} to {high:+.1f})", f"{forward['diff_pct']:+.2f}%"]]),
        ]  # fmt: skip
    if step is not None:
        header = ["variant", "median ms (IQR)", "x floor (95% CI)", "BN mode", "BN stats change",
                  "backbone output requires_grad", "autograd nodes", "optimized params"]  # fmt: skip
        parts += [
            "",
            f"### Training step, ResNet-18 backbone + linear head, {step['image_size']}x{step['image_size']} inputs, "
            f"batch {step['batch_size']}, CPU",
            "",
            f"{step['rounds']} round-robin rounds x {step['steps_per_round']} steps per variant after "
            f"{step['warmup_rounds']} warm-up rounds; ratio to the floor with a bootstrap 95% interval over rounds. "
            "Target: ours <= 1.05x the floor.",
            "",
            markdown_table(header, [[
                row["variant"], f"{row['median_ms']:.1f} ({row['iqr_ms'][0]:.1f}-{row['iqr_ms'][1]:.1f})",
                f"{row['ratio']:.3f} ({row['ratio_ci'][0]:.3f}-{row['ratio_ci'][1]:.3f})",
                "train" if row["bn_train_mode"] else "eval", "yes" if row["bn_stats_changed"] else "no",
                str(row["backbone_output_requires_grad"]), str(row["autograd_graph_nodes"]),
                f"{row['optimized_params']:,}"] for row in step["rows"]]),
        ]  # fmt: skip
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=["hook", "step"], help="run only one of the two benchmarks")
    common.size_arguments(parser)
    parser.add_argument("--hook-iters", type=int, default=10_000, help="hook steps per repeat (default: 10000)")
    parser.add_argument("--hook-repeats", type=int, default=15, help="repeats of the hook loop (default: 15)")
    parser.add_argument("--forward-pairs", type=int, default=300, help="frozen/not-frozen forward pairs (default: 300)")
    parser.add_argument("--rounds", type=int, default=40, help="timed round-robin rounds (default: 40)")
    parser.add_argument("--steps-per-round", type=int, default=3, help="steps per variant per round (default: 3)")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="untimed rounds first (default: 2)")
    common.output_arguments(parser, "bn_freeze_overhead")
    args = parser.parse_args(argv)
    if args.quick:
        args.only, args.hook_iters, args.hook_repeats, args.forward_pairs = None, 100, 2, 4
        args.rounds, args.steps_per_round, args.warmup_rounds, args.batch_size, args.image_size = 2, 1, 0, 4, 32
    if args.rounds * args.steps_per_round < 2 or args.hook_repeats < 1 or args.forward_pairs < 2:
        parser.error("need at least 2 timed steps per variant, 1 hook repeat and 2 forward pairs")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet()  # and "N norm layer(s) frozen" on every attach
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rng = random.Random(args.seed)
    env = common.environment()
    start = time.perf_counter()
    hook = forward = step = None
    if args.only in (None, "hook"):
        print("1/2 hook cost (ResNet-50) ...", file=sys.stderr, flush=True)
        hook = bench_hook(args.hook_iters, args.hook_repeats)
        forward = bench_forward(args.forward_pairs, rng)
    if args.only in (None, "step"):
        print("2/2 training step (ResNet-18) ...", file=sys.stderr, flush=True)
        step = bench_step(args, rng)
    common.finish_environment(env, start)
    results = {"environment": env, "hook": hook, "forward": forward, "step": step}
    tables = 1 + 2 * (hook is not None) + (step is not None)
    common.write_report(args, "bn_freeze_overhead", report(env, hook, forward, step), results, tables, not args.only)


if __name__ == "__main__":
    main()
