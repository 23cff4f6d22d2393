"""Training cost per fine-tuning phase: ``GradualUnfreeze`` against its hand-written floor and the peers.

A torchvision ResNet (``weights=None``, ``fc`` removed) as ``backbone`` + a linear ``head`` (10 classes), trained by
a real ``lightning.pytorch.Trainer`` on CPU, 64x64 inputs, batch 16 (fixed synthetic batches, no data loading),
SGD with momentum 0.9. Three phases, one per epoch: phase 0 trains the head alone, phase 1 also ``backbone.layer4``,
phase 2 also ``backbone.layer3``. Variants, each a copy of the same initial weights:

- ``floor``: hand-written, inside the same Trainer: a LightningModule whose ``training_step`` runs the frozen prefix
  of the backbone (everything before the first released block) in eval mode under ``torch.no_grad()``, and the
  released blocks (train mode) and the head with autograd; released blocks join the optimizer at the phase start.
- ``ours``: ``GradualUnfreeze(schedule={1: "backbone.layer4", 2: "backbone.layer3"})``.
- ``BaseFinetuning (layer4, layer3)``: Lightning's ``BaseFinetuning`` subclassed for the same schedule, as its docs
  show: ``freeze(backbone)`` (default ``train_bn=True``), then ``unfreeze_and_add_param_group`` per block.
- ``BackboneFinetuning``: Lightning's ``BackboneFinetuning(unfreeze_backbone_at_epoch=1)``: it releases the WHOLE
  backbone at epoch 1, so only its phase 0 compares like for like.
- ``finetuning-scheduler``: ``FinetuningScheduler`` with an explicit schedule (phase 0: head; 1: layer4; 2: layer3),
  ``epoch_transitions_only=True``, ``max_transition_epoch`` 1, 2, 3, ``restore_best=False`` (no validation).
- ``full fine-tuning``: everything trains from the first step (the same in every phase).

Every ``configure_optimizers`` hands the optimizer ``filter(lambda p: p.requires_grad, self.parameters())``, as
Lightning's fine-tuning docs ask. **Step time** = ``perf_counter`` from the first callback's
``on_train_batch_start`` to its ``on_train_batch_end`` (forward, loss, backward, ``optimizer.step``, ``zero_grad``,
every callback's batch-start hook). Each round runs, for every variant in turn (order rotated every round so that
machine noise hits all alike), one ``Trainer.fit`` of 3 epochs x (warm-up + timed) steps; the warm-up steps of
every epoch are dropped (fresh copy, first step after a release allocates optimizer state). Reported per phase:
median step time over all rounds, its ratio to the same phase's floor (bootstrap 95% interval over rounds), and
the ratio of median process CPU time per step (``time.process_time``: a cross-check on a busy machine).
What each variant really does per phase (parameters the optimizer trains, backbone norm layers in train mode and
with updated statistics, whether the backbone output requires grad) is printed too, and checked for ``ours`` and
the floor (the script fails if frozen norm layers update their statistics or ``ours`` builds a graph in phase 0).

**Peak memory**: each variant once more in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=131072`` so that freed
tensors leave the resident set): ``/proc/self/clear_refs`` resets the resident-set high-water mark at every epoch
start, ``VmHWM`` is read at its end; reported: that peak minus the resident set at ``on_train_start`` (after the
Trainer set up the model and optimizer).

Run from the repository root (both models, defaults: about 15-20 minutes on 2 idle CPU cores)::

    python -m benchmarks.phase_cost
    python -m benchmarks.phase_cost --quick                       # smoke test: a few rounds, no files written
    python -m benchmarks.phase_cost --models resnet18 --rounds 20 --steps 8

The report goes to ``benchmarks/phase_cost.md`` (committed), the raw per-step times to
``benchmarks/raw/phase_cost.json`` (git-ignored); ``--markdown`` / ``--json`` choose other files.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from finetuning_scheduler import FinetuningScheduler
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torchvision.models import resnet18, resnet50

from benchmarks.common import NUM_CLASSES, Classifier, bootstrap_ci, environment, markdown_table, median, write_report
from lightning_bnfreeze import GradualUnfreeze, named_norm_layers

ARCHS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50}
RELEASES: dict[int, str] = {1: "layer4", 2: "layer3"}  # epoch (= phase) -> backbone block released then
PHASES = ("0: head only", "1: + layer4", "2: + layer3")
LR = 0.01
RELEASE_LR_SCALE = 0.1
HERE = Path(__file__).resolve().parent


def released_blocks(phase: int) -> list[str]:
    """Backbone blocks (children names) released at ``phase``."""
    return [block for epoch, block in RELEASES.items() if epoch <= phase]


# --------------------------------------------------------------------------------------------------
# Modules and callbacks
# --------------------------------------------------------------------------------------------------


class PhaseModule(Classifier):
    """The benchmark model; records whether the backbone output requires grad."""

    def __init__(self, arch: Callable[..., nn.Module]) -> None:
        super().__init__(arch, NUM_CLASSES)
        self.features_require_grad = False

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        features = self.features(x)
        self.features_require_grad = features.requires_grad
        return F.cross_entropy(self.head(features), y)

    def configure_optimizers(self) -> Optimizer:
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=LR, momentum=0.9)


class FloorModule(PhaseModule):
    """Hand-written floor: the frozen prefix in eval mode under ``no_grad()``, released blocks and head training."""

    def __init__(self, arch: Callable[..., nn.Module]) -> None:
        super().__init__(arch)
        self._prefix: list[Callable[[Tensor], Tensor]] = []  # run under no_grad, set at each epoch start
        self._suffix: list[Callable[[Tensor], Tensor]] = []

    def setup(self, stage: str) -> None:
        self.backbone.requires_grad_(False)  # before `configure_optimizers`: the optimizer gets the head alone

    def stages(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """The backbone's forward (torchvision ``ResNet._forward_impl``) as named stages."""
        backbone = self.backbone
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
        stages: list[tuple[str, Callable[[Tensor], Tensor]]] = [(name, getattr(backbone, name)) for name in names]
        return [*stages, ("flatten", lambda x: torch.flatten(x, 1)), ("fc", backbone.fc)]

    def on_train_epoch_start(self) -> None:
        stages = self.stages()
        released = released_blocks(self.current_epoch)
        first = min((i for i, (name, _) in enumerate(stages) if name in released), default=len(stages))
        self._prefix = [stage for _, stage in stages[:first]]
        self._suffix = [stage for _, stage in stages[first:]]
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
            for stage in self._prefix:
                x = stage(x)
        for stage in self._suffix:
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


def fts_schedule() -> dict[int, dict[str, Any]]:
    schedule: dict[int, dict[str, Any]] = {0: {"params": ["head.weight", "head.bias"], "max_transition_epoch": 1}}
    for epoch, block in RELEASES.items():
        schedule[epoch] = {
            "params": [rf"backbone\.{block}\..*"],
            "max_transition_epoch": epoch + 1,  # phase k runs in epoch k; the final one up to max_epochs
            "lr": LR * RELEASE_LR_SCALE,
        }
    return schedule


@dataclass
class PhaseProbe:
    """What a variant really does in one phase (recorded at its first timed step)."""

    trained_params: int = 0  # requires_grad and held by the optimizer
    bn_train_mode: int = 0  # backbone norm layers in train mode during the forward
    bn_updated: list[str] = field(default_factory=list)  # backbone norm layers whose buffers changed in the phase
    features_require_grad: bool = False


class Recorder(Callback):
    """Times every training step and records, per epoch, what trains (and, optionally, peak memory)."""

    def __init__(self, warmup: int, memory: bool = False) -> None:
        self.warmup = warmup
        self.memory = memory
        self.step_ms: dict[int, list[float]] = {}
        self.cpu_ms: dict[int, list[float]] = {}  # process CPU time: less sensitive to other jobs than wall time
        self.probes: dict[int, PhaseProbe] = {}
        self.peak_rss_mb: dict[int, float] = {}
        self.baseline_rss_mb = 0.0
        self._start = self._cpu_start = 0
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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._cpu_start = time.process_time_ns()
        self._start = time.perf_counter_ns()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        elapsed_ms = (time.perf_counter_ns() - self._start) / 1e6
        cpu_ms = (time.process_time_ns() - self._cpu_start) / 1e6
        epoch = trainer.current_epoch
        if idx < self.warmup:
            return
        self.step_ms.setdefault(epoch, []).append(elapsed_ms)
        self.cpu_ms.setdefault(epoch, []).append(cpu_ms)
        if epoch not in self.probes:
            optimizer_params = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            self.probes[epoch] = PhaseProbe(
                trained_params=sum(
                    p.numel() for p in pl_module.parameters() if p.requires_grad and id(p) in optimizer_params
                ),
                bn_train_mode=sum(layer.training for _, layer in named_norm_layers(pl_module.backbone)),
                features_require_grad=bool(getattr(pl_module, "features_require_grad", True)),
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.probes:
            self.probes[epoch].bn_updated = [
                name
                for name, layer in named_norm_layers(pl_module.backbone, prefix="backbone")
                if any(
                    not torch.equal(now, before)
                    for now, before in zip(layer.buffers(recurse=False), self._buffers[name], strict=True)
                )
            ]
        if self.memory:
            self.peak_rss_mb[epoch] = proc_status_mb("VmHWM")


def proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    floor: bool  # FloorModule rather than PhaseModule
    callbacks: Callable[[], list[Callback]]


VARIANTS = (
    Variant("floor", "floor: prefix `eval()` + `no_grad()` (hand-written)", True, list),
    Variant(
        "ours",
        "ours: `GradualUnfreeze` (layer4, layer3)",
        False,
        lambda: [GradualUnfreeze(schedule={e: f"backbone.{b}" for e, b in RELEASES.items()}, lr_scale=0.1)],
    ),
    Variant(
        "base_finetuning",
        "Lightning `BaseFinetuning` subclass (layer4, layer3)",
        False,
        lambda: [BlockwiseFinetuning()],
    ),
    Variant(
        "backbone_finetuning",
        "Lightning `BackboneFinetuning(unfreeze_backbone_at_epoch=1)` (whole backbone at 1)",
        False,
        lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
    ),
    Variant(
        "fts",
        "finetuning-scheduler (head; layer4; layer3)",
        False,
        lambda: [
            FinetuningScheduler(
                ft_schedule=fts_schedule(),
                epoch_transitions_only=True,
                restore_best=False,
                logging_level=logging.WARNING,
            )
        ],
    ),
    Variant("full", "full fine-tuning", False, list),
)
VARIANTS_BY_KEY = {variant.key: variant for variant in VARIANTS}


def templates(arch: Callable[..., nn.Module]) -> tuple[PhaseModule, FloorModule]:
    """The same initial weights as a plain module and as the floor module."""
    torch.manual_seed(0)
    plain = PhaseModule(arch)
    floor = FloorModule(arch)
    floor.load_state_dict(plain.state_dict())
    return plain, floor


class FixedBatches:
    """Ready-made batches as the training "dataloader": no loading or collation cost."""

    def __init__(self, count: int, batch_size: int, image_size: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.batches = [
            (
                torch.randn(batch_size, 3, image_size, image_size, generator=generator),
                torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
            )
            for _ in range(count)
        ]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def fit(
    variant: Variant,
    template: PhaseModule,
    batches: FixedBatches,
    warmup: int,
    root_dir: str,
    memory: bool = False,
) -> Recorder:
    """One ``Trainer.fit`` of the variant over all phases (one epoch each), on a fresh copy of ``template``."""
    module = copy.deepcopy(template)
    recorder = Recorder(warmup, memory)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=len(PHASES),
        callbacks=[recorder, *variant.callbacks()],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    trainer.fit(module, train_dataloaders=batches)
    assert sorted(recorder.step_ms) == list(range(len(PHASES))), (variant.key, sorted(recorder.step_ms))
    return recorder


def check_semantics(key: str, probes: dict[int, PhaseProbe]) -> None:
    """``ours`` and the floor: frozen norm layers never update, nothing backpropagates into the frozen backbone."""
    if key not in ("ours", "floor"):
        return
    assert not probes[0].features_require_grad, f"{key}: the backbone output requires grad in phase 0"
    for phase, probe in probes.items():
        released = tuple(f"backbone.{block}." for block in released_blocks(phase))
        wrong = [name for name in probe.bn_updated if not name.startswith(released)]
        assert not wrong, f"{key}: frozen norm layers updated their statistics in phase {phase}: {wrong}"
        assert probe.bn_train_mode == 0 or released, f"{key}: norm layers in train mode in phase {phase}"


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def bench_model(
    model: str, variants: Sequence[Variant], rounds: int, steps: int, warmup: int, args: argparse.Namespace
) -> dict[str, Any]:
    plain, floor = templates(ARCHS[model])
    batches = FixedBatches(warmup + steps, args.batch_size, args.image_size)
    times: dict[str, list[dict[int, list[float]]]] = {v.key: [] for v in variants}  # per round, per phase
    cpu_times: dict[str, list[dict[int, list[float]]]] = {v.key: [] for v in variants}
    probes: dict[str, dict[int, PhaseProbe]] = {}
    with tempfile.TemporaryDirectory() as root_dir:
        for round_index in range(args.warmup_rounds + rounds):
            shift = round_index % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                recorder = fit(variant, floor if variant.floor else plain, batches, warmup, root_dir)
                check_semantics(variant.key, recorder.probes)
                probes[variant.key] = recorder.probes
                if round_index >= args.warmup_rounds:
                    times[variant.key].append(recorder.step_ms)
                    cpu_times[variant.key].append(recorder.cpu_ms)
            print(f"  {model}: round {round_index + 1}/{args.warmup_rounds + rounds}", file=sys.stderr, flush=True)

    rng = random.Random(args.seed)
    rows = []
    for variant in variants:
        per_phase = []
        for phase in range(len(PHASES)):
            ms = [t for r in times[variant.key] for t in r[phase]]
            floor_ms = [t for r in times["floor"] for t in r[phase]]
            cpu_ms = [t for r in cpu_times[variant.key] for t in r[phase]]
            floor_cpu_ms = [t for r in cpu_times["floor"] for t in r[phase]]
            pairs = [(r[phase], f[phase]) for r, f in zip(times[variant.key], times["floor"], strict=True)]
            low, high = bootstrap_ci(
                pairs,
                lambda sample: median([t for v, _ in sample for t in v]) / median([t for _, f in sample for t in f]),
                rng,
            )
            probe = probes[variant.key][phase]
            per_phase.append(
                {
                    "median_ms": median(ms),
                    "ratio": median(ms) / median(floor_ms),
                    "ratio_ci": [low, high],
                    "steps": len(ms),
                    "median_cpu_ms": median(cpu_ms),
                    "cpu_ratio": median(cpu_ms) / median(floor_cpu_ms),
                    "trained_params": probe.trained_params,
                    "bn_train_mode": probe.bn_train_mode,
                    "bn_updated": len(probe.bn_updated),
                    "features_require_grad": probe.features_require_grad,
                }
            )
        rows.append({"key": variant.key, "variant": variant.label, "phases": per_phase})
    norm_layers = sum(1 for _ in named_norm_layers(plain.backbone))
    return {"model": model, "norm_layers": norm_layers, "rows": rows, "raw_ms": times, "raw_cpu_ms": cpu_times}


# --------------------------------------------------------------------------------------------------
# Peak memory, one subprocess per variant
# --------------------------------------------------------------------------------------------------


def memory_worker(model: str, key: str, steps: int, warmup: int, batch_size: int, image_size: int) -> dict[str, Any]:
    """Runs in its own process: one fit of one variant, per-phase resident-set peak above the start."""
    plain, floor = templates(ARCHS[model])
    variant = VARIANTS_BY_KEY[key]
    template = floor if variant.floor else plain
    batches = FixedBatches(warmup + steps, batch_size, image_size)
    with tempfile.TemporaryDirectory() as root_dir:
        recorder = fit(variant, template, batches, warmup, root_dir, memory=True)
    baseline = recorder.baseline_rss_mb
    return {"baseline_mb": baseline, "peak_mb": {phase: recorder.peak_rss_mb[phase] - baseline for phase in range(3)}}


def bench_memory(model: str, variants: Sequence[Variant], steps: int, warmup: int, args: argparse.Namespace) -> dict:
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for variant in variants:
        command = [
            sys.executable,
            "-m",
            "benchmarks.phase_cost",
            "--memory-worker",
            f"{model}:{variant.key}",
            f"--threads={args.threads}",
            f"--steps={steps}",
            f"--warmup-steps={warmup}",
            f"--batch-size={args.batch_size}",
            f"--image-size={args.image_size}",
        ]
        output = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            raise RuntimeError(f"memory worker {model}:{variant.key} failed:\n{output.stderr[-3000:]}")
        results[variant.key] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"  {model}: memory {variant.key} done", file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def report(env: dict[str, Any], args: argparse.Namespace, timing: list[dict], memory: dict[str, dict]) -> str:
    parts = [
        "### Environment",
        "",
        markdown_table(["", ""], [[f"`{key}`", str(value)] for key, value in env.items()]),
    ]
    labels = {variant.key: variant.label for variant in VARIANTS}
    for result in timing:
        model = result["model"]
        rows = result["rows"]
        parts += [
            "",
            f"### Step time per phase, {model} backbone + linear head, {args.image_size}x{args.image_size} inputs, "
            f"batch {args.batch_size}, CPU, Lightning Trainer",
            "",
            f"{args.rounds} interleaved rounds x {args.steps} timed steps per phase per variant (after "
            f"{args.warmup_steps} warm-up steps per phase, {args.warmup_rounds} warm-up round(s)): median ms, ratio to "
            "the phase's floor (bootstrap 95% interval over rounds); CPU: ratio of median process CPU time per step "
            "(less sensitive to other jobs). Target: ours <= 1.05x the floor in every phase.",
            "",
            markdown_table(
                ["variant", *(f"phase {phase}" for phase in PHASES)],
                [
                    [
                        row["variant"],
                        *(
                            f"{p['median_ms']:.1f} ms, **{p['ratio']:.2f}x** ({low:.2f}-{high:.2f}); "
                            f"CPU {p['cpu_ratio']:.2f}x"
                            for p in row["phases"]
                            for low, high in [p["ratio_ci"]]
                        ),
                    ]
                    for row in rows
                ],
            ),
            "",
            f"What trains, per phase: parameters the optimizer updates / backbone norm layers in train mode and with "
            f"updated statistics (of {result['norm_layers']}) / whether the backbone output requires grad "
            "(autograd through the backbone).",
            "",
            markdown_table(
                ["variant", *(f"phase {phase}" for phase in PHASES)],
                [
                    [
                        row["variant"],
                        *(
                            f"{p['trained_params']:,} params; BN train {p['bn_train_mode']}, updated {p['bn_updated']};"
                            f" grad {'yes' if p['features_require_grad'] else 'no'}"
                            for p in row["phases"]
                        ),
                    ]
                    for row in rows
                ],
            ),
        ]
    for model, per_variant in memory.items():
        parts += [
            "",
            f"### Peak resident memory per phase, {model} (MB above the resident set at `on_train_start`; one fresh "
            f"process per variant, {args.memory_steps} steps per phase)",
            "",
            markdown_table(
                ["variant", *(f"phase {phase}" for phase in PHASES)],
                [
                    [labels[key], *(f"{mb:.0f}" for mb in result["peak_mb"].values())]
                    for key, result in per_variant.items()
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", choices=sorted(ARCHS), default=["resnet18", "resnet50"])
    parser.add_argument(
        "--variants", nargs="+", choices=[v.key for v in VARIANTS], help="subset of variants (the floor always runs)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="timed interleaved rounds (default: 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per phase per round (default: 8)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at each phase start (default: 2)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps per phase in the memory runs (default: 4)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--only-memory", action="store_true", help="skip the timing rounds")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds x 3 steps, 1 warm-up step, no files")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default: 16)")
    parser.add_argument("--image-size", type=int, default=64, help="training image side (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    parser.add_argument("--json", type=Path, help="raw results file (default: benchmarks/raw/phase_cost.json)")
    parser.add_argument("--markdown", type=Path, help="Markdown report file (default: benchmarks/phase_cost.md)")
    parser.add_argument("--memory-worker", metavar="MODEL:VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_steps, args.warmup_rounds, args.memory_steps = 2, 3, 1, 0, 2
    elif args.json is None and args.markdown is None:
        args.json, args.markdown = HERE / "raw" / "phase_cost.json", HERE / "phase_cost.md"
    return args


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "finetuning_scheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*|finetuning_scheduler\..*")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|max_transition_epoch).*")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.memory_worker is not None:
        model, key = args.memory_worker.split(":")
        result = memory_worker(model, key, args.steps, args.warmup_steps, args.batch_size, args.image_size)
        print(json.dumps(result))
        return

    variants = [v for v in VARIANTS if v.key == "floor" or args.variants is None or v.key in args.variants]
    env = environment()
    env["finetuning_scheduler"] = version("finetuning-scheduler")
    start = time.perf_counter()
    timing: list[dict] = []
    memory: dict[str, dict] = {}
    for model in args.models:
        if not args.only_memory:
            print(f"{model}: timing ...", file=sys.stderr, flush=True)
            timing.append(bench_model(model, variants, args.rounds, args.steps, args.warmup_steps, args))
        if not args.no_memory:
            print(f"{model}: peak memory ...", file=sys.stderr, flush=True)
            memory[model] = bench_memory(model, variants, args.memory_steps, args.warmup_steps, args)
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    env["runtime_s"] = round(time.perf_counter() - start, 1)

    results = {"environment": env, "timing": timing, "memory": memory}
    write_report(report(env, args, timing, memory), results, args.markdown, args.json)


if __name__ == "__main__":
    main()
