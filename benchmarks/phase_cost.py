"""Training cost per fine-tuning phase: ``GradualUnfreeze`` against its hand-written floor and the peers.

A torchvision ResNet (``weights=None``, ``fc`` removed) as ``backbone`` + a linear ``head`` (10 classes), trained by
a real ``lightning.pytorch.Trainer`` on CPU, 64x64 inputs, batch 16 (fixed synthetic batches, no data loading),
SGD with momentum 0.9. Three phases, one per epoch: phase 0 trains the head alone, phase 1 also ``backbone.layer4``,
phase 2 also ``backbone.layer3``. Variants, each a copy of the same initial weights:

- ``floor``: hand-written, inside the same Trainer: a LightningModule whose ``training_step`` runs the frozen prefix
  of the backbone (everything before the first released block) in eval mode under ``torch.no_grad()``, and the
  released blocks (train mode) and the head with autograd; released blocks join the optimizer at the phase start.
- ``ours``: ``GradualUnfreeze(what=Schedule({1: "backbone.layer4", 2: "backbone.layer3"}), lr_scale=0.1,
  bn="train")`` (released norm layers train, as the floor's).
- ``ours, on_loss_rise="warn"``: the same without the copies the default keeps to undo a release whose loss rose (for
  the first release's epoch) and to go back after a divergence (the lowest epoch's weights, from epoch 1 on).
- ``BaseFinetuning (layer4, layer3)``: Lightning's ``BaseFinetuning`` subclassed for the same schedule, as its docs
  show: ``freeze(backbone)`` (default ``train_bn=True``), then ``unfreeze_and_add_param_group`` per block.
- ``BackboneFinetuning``: Lightning's ``BackboneFinetuning(unfreeze_backbone_at_epoch=1)``: it releases the WHOLE
  backbone at epoch 1, so only its phase 0 compares like for like.
- ``finetuning-scheduler``: ``FinetuningScheduler`` with the same schedule (``benchmarks.recipes.fts_schedule``).
- ``full fine-tuning``: everything trains from the first step (the same in every phase).

Every ``configure_optimizers`` hands the optimizer the parameters that require grad, as Lightning's fine-tuning docs
ask. **Step time** = from the first callback's ``on_train_batch_start`` to its ``on_train_batch_end`` (forward, loss,
backward, ``optimizer.step``, ``zero_grad``, every callback's batch-start hook). Each round runs, for every variant
in turn (order rotated every round so that machine noise hits all alike), one ``Trainer.fit`` of 3 epochs x
(warm-up + timed) steps; the warm-up steps of every epoch are dropped. Reported per phase: median step time over all
rounds, its ratio to the same phase's floor (bootstrap 95% interval over rounds), and the ratio of median process
CPU time per step (a cross-check on a busy machine). What each variant really does per phase (parameters the
optimizer trains, backbone norm layers in train mode and with updated statistics, whether the backbone output
requires grad) is printed too, and checked for ``ours`` and the floor.

**Peak memory**: each variant once more in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=131072`` so that freed
tensors leave the resident set): ``/proc/self/clear_refs`` resets the resident-set high-water mark at every epoch
start, ``VmHWM`` is read at its end; reported: that peak minus the resident set at ``on_train_start``.

Run from the repository root (both models, defaults: about 15-20 minutes on 2 idle CPU cores)::

    python -m benchmarks.phase_cost
    python -m benchmarks.phase_cost --quick                       # CI smoke test: ResNet-18, tiny, a temp dir
    python -m benchmarks.phase_cost --models resnet18 --rounds 20 --steps 8

The report goes to ``benchmarks/phase_cost.md`` (committed), the raw per-step times to
``benchmarks/raw/phase_cost.json`` (git-ignored); ``--markdown`` / ``--json`` choose other files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torchvision.models import resnet18, resnet50

from benchmarks import common
from benchmarks.common import LR, Batches, Classifier, markdown_table
from benchmarks.recipes import finetuning_scheduler, fts_schedule
from lightning_bnfreeze import GradualUnfreeze, Schedule, named_norm_layers

ARCHS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50}
RELEASES: dict[int, str] = {1: "layer4", 2: "layer3"}  # epoch (= phase) -> backbone block released then
PHASES = ("0: head only", "1: + layer4", "2: + layer3")
RELEASE_LR_SCALE = 0.1


def released_blocks(phase: int) -> list[str]:
    return [block for epoch, block in RELEASES.items() if epoch <= phase]


class PhaseModule(Classifier):
    """The benchmark model; records whether the backbone output requires grad."""

    features_require_grad = False

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features = self.features(batch[0])
        self.features_require_grad = features.requires_grad
        return F.cross_entropy(self.head(features), batch[1])


class FloorModule(PhaseModule):
    """Hand-written floor: the frozen prefix in eval mode under ``no_grad()``, released blocks and head training."""

    prefix: list[Callable[[Tensor], Tensor]]  # run under no_grad; set at each epoch start
    suffix: list[Callable[[Tensor], Tensor]]

    def setup(self, stage: str) -> None:
        self.backbone.requires_grad_(False)  # before `configure_optimizers`: the optimizer gets the head alone

    def on_train_epoch_start(self) -> None:
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
        stages = [getattr(self.backbone, name) for name in names] + [lambda x: torch.flatten(x, 1), self.backbone.fc]
        released = released_blocks(self.current_epoch)
        first = min((i for i, name in enumerate(names) if name in released), default=len(stages))
        self.prefix, self.suffix = stages[:first], stages[first:]
        self.backbone.eval()
        optimizer = self.trainer.optimizers[0]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name in released:
            block = self.backbone.get_submodule(name)
            block.train()
            if not any(id(p) in held for p in block.parameters()):
                block.requires_grad_(True)
                optimizer.add_param_group({"params": list(block.parameters()), "lr": LR * RELEASE_LR_SCALE})

    def features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            for stage in self.prefix:
                x = stage(x)
        for stage in self.suffix:
            x = stage(x)
        return x


class BlockwiseFinetuning(BaseFinetuning):
    """Lightning's ``BaseFinetuning`` for the benchmark's schedule, written as its docs show."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.backbone)  # `train_bn=True`: its default

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch in RELEASES:
            block = pl_module.backbone.get_submodule(RELEASES[epoch])
            self.unfreeze_and_add_param_group(block, optimizer, lr=LR * RELEASE_LR_SCALE)


VARIANTS: dict[str, tuple[str, Callable[[], list[Callback]]]] = {
    "floor": ("floor: prefix `eval()` + `no_grad()` (hand-written)", list),
    "ours": (
        "ours: `GradualUnfreeze` (layer4, layer3)",
        lambda: [
            GradualUnfreeze(
                what=Schedule({e: f"backbone.{b}" for e, b in RELEASES.items()}), lr_scale=RELEASE_LR_SCALE, bn="train"
            )
        ],
    ),
    "ours_warn": (
        'ours, `on_loss_rise="warn"`: no copies for undoing a release or going back',
        lambda: [
            GradualUnfreeze(
                what=Schedule({e: f"backbone.{b}" for e, b in RELEASES.items()}),
                lr_scale=RELEASE_LR_SCALE,
                bn="train",
                on_loss_rise="warn",
            )
        ],
    ),
    "base_finetuning": ("Lightning `BaseFinetuning` subclass (layer4, layer3)", lambda: [BlockwiseFinetuning()]),
    "backbone_finetuning": (
        "Lightning `BackboneFinetuning(unfreeze_backbone_at_epoch=1)` (whole backbone at 1)",
        lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
    ),
    "fts": (
        "finetuning-scheduler (head; layer4; layer3)",
        lambda: [finetuning_scheduler(fts_schedule([[rf"backbone\.{b}\..*"] for b in RELEASES.values()], LR, 3, 0.1))],
    ),
    "full": ("full fine-tuning", list),
}


@dataclass
class PhaseProbe:
    """What a variant really does in one phase (recorded at its first timed step)."""

    trained_params: int = 0  # requires_grad and held by the optimizer
    bn_train_mode: int = 0  # backbone norm layers in train mode during the forward
    bn_updated: list[str] = field(default_factory=list)  # backbone norm layers whose buffers changed in the phase
    features_require_grad: bool = False


class Recorder(common.StepTimer):
    """Times every training step and records, per epoch, what trains (and, optionally, peak memory)."""

    def __init__(self, warmup: int, memory: bool = False) -> None:
        super().__init__(warmup)
        self.memory = memory
        self.probes: dict[int, PhaseProbe] = {}
        self.peak_rss_mb: dict[int, float] = {}
        self.baseline_rss_mb = 0.0
        self._buffers: dict[str, list[Tensor]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert trainer.callbacks[0] is self, [type(c).__name__ for c in trainer.callbacks]  # type: ignore[attr-defined]
        if self.memory:
            self.baseline_rss_mb = proc_status_mb("VmRSS")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers = {
            name: [buffer.clone() for buffer in layer.buffers(recurse=False)]
            for name, layer in named_norm_layers(pl_module.backbone, prefix="backbone")
        }
        if self.memory:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        epoch = trainer.current_epoch
        if idx >= self.warmup and epoch not in self.probes:
            held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            self.probes[epoch] = PhaseProbe(
                trained_params=sum(p.numel() for p in pl_module.parameters() if p.requires_grad and id(p) in held),
                bn_train_mode=sum(layer.training for _, layer in named_norm_layers(pl_module.backbone)),
                features_require_grad=bool(getattr(pl_module, "features_require_grad", True)),
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.probes:
            self.probes[epoch].bn_updated = [
                name
                for name, layer in named_norm_layers(pl_module.backbone, prefix="backbone")
                if any(map(lambda a, b: not torch.equal(a, b), layer.buffers(recurse=False), self._buffers[name]))
            ]
        if self.memory:
            self.peak_rss_mb[epoch] = proc_status_mb("VmHWM")


def proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def fit(key: str, model: str, args: argparse.Namespace, steps: int, memory: bool = False) -> Recorder:
    """One ``Trainer.fit`` of the variant over all phases (one epoch each), from the model's initial weights."""
    torch.manual_seed(0)
    module = (FloorModule if key == "floor" else PhaseModule)(ARCHS[model])
    recorder = Recorder(args.warmup_steps, memory)
    with tempfile.TemporaryDirectory() as root_dir:
        trainer = common.quiet_trainer(
            devices=1, max_epochs=len(PHASES), callbacks=[recorder, *VARIANTS[key][1]()], limit_val_batches=0,
            default_root_dir=root_dir,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=Batches(args.warmup_steps + steps, args.batch_size, args.image_size))
    assert sorted(recorder.steps) == list(range(len(PHASES))), (key, sorted(recorder.steps))
    if key in ("ours", "floor"):  # frozen norm layers never update, nothing backpropagates into the frozen backbone
        assert not recorder.probes[0].features_require_grad, f"{key}: the backbone output requires grad in phase 0"
        for phase, probe in recorder.probes.items():
            released = tuple(f"backbone.{block}." for block in released_blocks(phase))
            wrong = [name for name in probe.bn_updated if not name.startswith(released)]
            assert not wrong, f"{key}: frozen norm layers updated their statistics in phase {phase}: {wrong}"
            assert probe.bn_train_mode == 0 or released, f"{key}: norm layers in train mode in phase {phase}"
    return recorder


def bench_model(model: str, keys: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    times: dict[str, list[dict[int, list[common.Sample]]]] = {key: [] for key in keys}  # per round, per phase
    probes: dict[str, dict[int, PhaseProbe]] = {}
    for round_index in range(args.warmup_rounds + args.rounds):
        shift = round_index % len(keys)
        for key in [*keys[shift:], *keys[:shift]]:
            recorder = fit(key, model, args, args.steps)
            probes[key] = recorder.probes
            if round_index >= args.warmup_rounds:
                times[key].append(recorder.steps)
        print(f"  {model}: round {round_index + 1}/{args.warmup_rounds + args.rounds}", file=sys.stderr, flush=True)
    rng = random.Random(args.seed)
    rows = []
    for key in keys:
        phases = []
        for phase, probe in sorted(probes[key].items()):
            row = common.ratio_row([r[phase] for r in times[key]], [r[phase] for r in times["floor"]], rng)
            phases.append({**row, **vars(probe), "bn_updated": len(probe.bn_updated)})
        rows.append({"key": key, "variant": VARIANTS[key][0], "phases": phases})
    norm_layers = sum(1 for _ in named_norm_layers(ARCHS[model](weights=None)))
    return {"model": model, "norm_layers": norm_layers, "rows": rows, "raw": times}


def bench_memory(model: str, keys: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Each variant's fit in a fresh process: the per-phase resident-set peak above the start of training."""
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for key in keys:
        options = [f"--threads={args.threads}", f"--steps={args.memory_steps}", f"--warmup-steps={args.warmup_steps}"]
        options += [f"--batch-size={args.batch_size}", f"--image-size={args.image_size}"]
        command = [sys.executable, "-m", "benchmarks.phase_cost", "--memory-worker", f"{model}:{key}", *options]
        output = subprocess.run(command, cwd=common.HERE.parent, env=env, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            raise RuntimeError(f"memory worker {model}:{key} failed:\n{output.stderr[-3000:]}")
        results[key] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"  {model}: memory {key} done", file=sys.stderr, flush=True)
    return results


def report(env: dict[str, Any], args: argparse.Namespace, timing: list[dict], memory: dict[str, dict]) -> str:
    parts = [common.environment_table(env)]
    header = ["variant", *(f"phase {phase}" for phase in PHASES)]
    for result in timing:
        parts += [
            "",
            f"### Step time per phase, {result['model']} backbone + linear head, {args.image_size}x{args.image_size}"
            f" inputs, batch {args.batch_size}, CPU, Lightning Trainer",
            "",
            f"{args.rounds} interleaved rounds x {args.steps} timed steps per phase per variant (after "
            f"{args.warmup_steps} warm-up steps per phase, {args.warmup_rounds} warm-up round(s)): median ms, ratio to "
            "the phase's floor (bootstrap 95% interval over rounds); CPU: ratio of median process CPU time per step "
            "(less sensitive to other jobs). Target: ours <= 1.05x the floor in every phase.",
            "",
            markdown_table(header, [[row["variant"], *(
                f"{p['median_ms']:.1f} ms, **{p['ratio']:.2f}x** ({p['ratio_ci'][0]:.2f}-{p['ratio_ci'][1]:.2f}); "
                f"CPU {p['cpu_ratio']:.2f}x" for p in row["phases"])] for row in result["rows"]]),
            "",
            f"What trains, per phase: parameters the optimizer updates / backbone norm layers in train mode and with "
            f"updated statistics (of {result['norm_layers']}) / whether the backbone output requires grad "
            "(autograd through the backbone).",
            "",
            markdown_table(header, [[row["variant"], *(
                f"{p['trained_params']:,} params; BN train {p['bn_train_mode']}, updated {p['bn_updated']};"
                f" grad {'yes' if p['features_require_grad'] else 'no'}" for p in row["phases"])]
                for row in result["rows"]]),
        ]  # fmt: skip
    for model, per_variant in memory.items():
        parts += [
            "",
            f"### Peak resident memory per phase, {model} (MB above the resident set at `on_train_start`; one fresh "
            f"process per variant, {args.memory_steps} steps per phase)",
            "",
            markdown_table(header, [[VARIANTS[key][0], *(f"{mb:.0f}" for mb in result["peak_mb"].values())]
                                    for key, result in per_variant.items()]),
        ]  # fmt: skip
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", choices=sorted(ARCHS), default=["resnet18", "resnet50"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset (the floor always runs)")
    parser.add_argument("--rounds", type=int, default=8, help="timed interleaved rounds (default: 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per phase per round (default: 8)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at each phase start (default: 2)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps per phase in the memory runs (default: 4)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--only-memory", action="store_true", help="skip the timing rounds")
    common.size_arguments(parser)
    parser.add_argument("--memory-worker", metavar="MODEL:VARIANT", help=argparse.SUPPRESS)
    common.output_arguments(parser, "phase_cost")
    args = parser.parse_args(argv)
    if args.quick:  # ResNet-18, 32x32, batch 4; one round of 2 steps; the memory of the floor and ours only
        args.models, args.rounds, args.steps, args.warmup_rounds, args.memory_steps = ["resnet18"], 1, 2, 0, 1
        args.warmup_steps, args.batch_size, args.image_size = 1, 4, 32
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.memory_worker is not None:
        model, key = args.memory_worker.split(":")
        recorder = fit(key, model, args, args.steps, memory=True)
        base = recorder.baseline_rss_mb
        print(json.dumps({"baseline_mb": base, "peak_mb": {p: mb - base for p, mb in recorder.peak_rss_mb.items()}}))
        return
    keys = [key for key in VARIANTS if key == "floor" or args.variants is None or key in args.variants]
    env = {**common.environment(), "finetuning_scheduler": version("finetuning-scheduler")}
    start = time.perf_counter()
    timing: list[dict] = []
    memory: dict[str, dict] = {}
    for model in args.models:
        if not args.only_memory:
            print(f"{model}: timing ...", file=sys.stderr, flush=True)
            timing.append(bench_model(model, keys, args))
        if not args.no_memory:
            print(f"{model}: peak memory ...", file=sys.stderr, flush=True)
            memory[model] = bench_memory(model, keys[:2] if args.quick else keys, args)
    common.finish_environment(env, start)
    tables = 1 + 2 * len(timing) + len(memory)
    common.write_report(args, "phase_cost", report(env, args, timing, memory), {"environment": env, "timing": timing,
                        "memory": memory}, tables)  # fmt: skip


if __name__ == "__main__":
    main()
