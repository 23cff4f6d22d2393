"""Runs of GradualUnfreeze on 2 CPU processes (gloo), for ``tests/test_distributed_runs.py``.

Usage: ``python -m tests.distributed_script OUT_DIR SCENARIO...`` from the repository root, started once per rank
with ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (so that one process pair runs every
scenario in turn). ``GU_TEST_ACCELERATOR=cuda`` runs them on GPUs over NCCL (``tests/test_cuda.py``; with one GPU on
one rank, ``WORLD_SIZE=1``), deterministic cuDNN and no TF32.
Each scenario saves what the test checks to ``OUT_DIR/{scenario}-rank{rank}.pt``:

- ``ddp``, ``fsdp``: the same run (releases at epochs 1 and 2, AdaBN before the first step, ``BNFreezeCallback``
  alongside) under ``strategy="ddp"`` and under ``ModelParallelStrategy`` with FSDP2: ``backbone.3`` and the head are
  ``fully_shard`` units of their own, the rest of the backbone (``backbone.0``, released, and ``backbone.1``, never
  released) is in the backbone's root unit, whose parameters a forward pass without backward leaves unsharded.
- ``fsdp_stop``, ``fsdp_resume``: the ``fsdp`` run stopped after epoch 2 with a distributed checkpoint, then resumed
  (``ModelParallelStrategy`` restores the checkpoint after ``on_fit_start``: the callback reads its state from
  ``trainer.ckpt_path`` there, and the released groups exist when a probe behind it looks, at ``on_fit_start``).
- ``ddp_auto``, ``fsdp_auto``: the ``ddp`` and ``fsdp`` runs with ``bn`` and ``adapt`` at their defaults: the first
  release moves fast, so its norm layers train and every norm layer of the backbone is re-estimated then.
- ``ddp_far``, ``fsdp_far``: the ``_auto`` runs on data far from the source: ``adapt="auto"`` re-estimates every
  norm layer of the backbone before the first step.
- ``ddp_far_sgd``, ``fsdp_far_sgd``: the ``_far`` runs under momentum SGD at a small rate: the first release's weights
  get gradients in the first step (each rank's own batch), which say that its first step will be small, on every
  rank alike (the average of the ranks' gradients): the source's statistics come back after that step.
- ``amp``: fp16 mixed precision with a gradient scaler (``MixedPrecision("16-mixed", "cpu")``): one batch of rank 1
  overflows in the gradient of a released layer only (not in the head's); every rank must skip that step.
- ``ddp_unused``, ``fsdp_unused``: ``backbone.proj`` and ``backbone.extra`` are released at epoch 1; ``extra`` takes
  part in rank 0's forward only, so rank 1's backward leaves it without a gradient: its unit (``backbone``) must
  reduce-scatter the same tensors on every rank, as DDP averages zeros in for it. ``fsdp_unused_control``: the same
  without the library's ``reduce_unused_gradients`` (a 20 s process-group timeout). ``fsdp_unused_alone``: only
  ``extra`` released: no gradient reaches ``backbone`` on rank 1, whose backward cannot reduce it: a clear error.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_bnfreeze.distributed
from lightning_bnfreeze import AdaBN, BNFreezeCallback, GradualUnfreeze, Schedule
from tests.unfreeze_helpers import FirstStepEstimates

RELEASES = {1: "backbone.3", 2: "backbone.0"}  # backbone.1 is never released
ACCELERATOR = os.environ.get("GU_TEST_ACCELERATOR", "cpu")
WORLD = int(os.environ.get("WORLD_SIZE", "2"))


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


class ConvModel(pl.LightningModule):
    def __init__(self, sharded: bool, sgd: bool = False) -> None:
        super().__init__()
        self.sharded = sharded
        self.sgd = sgd
        self.backbone = nn.Sequential(
            conv_block(3, 8), conv_block(8, 8), nn.MaxPool2d(2), conv_block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(8, 4)

    def configure_model(self) -> None:
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.backbone[3], mesh=mesh)
            fully_shard(self.backbone, mesh=mesh)
            fully_shard(self.head, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


class LinearModel(pl.LightningModule):
    """``backbone.1`` starts tiny: large inputs overflow its fp16 weight gradient, not the head's.

    Rank 1's first batch after the release is such a batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.backbone[1].weight.mul_(1e-3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.global_rank == 1 and self.current_epoch == 1 and batch_idx == 0:
            x = x * 100
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LocalGradients(Callback):
    """Records, before GradualUnfreeze averages them, whether this rank's released gradients are finite."""

    def __init__(self) -> None:
        self.finite: list[bool] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grads = [p.grad for p in pl_module.backbone[1].parameters() if p.grad is not None]
        if grads:
            self.finite.append(all(bool(torch.isfinite(grad).all()) for grad in grads))


def full(tensor: Tensor) -> Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().clone()


def trainer(strategy: Any, max_epochs: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy,
        accelerator=ACCELERATOR,
        devices=WORLD,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class GroupsAtFitStart(Callback):
    """The optimizer's param groups as the callbacks before it left them at ``on_fit_start``."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.names = [group.get("name") for group in trainer.optimizers[0].param_groups]


class BuffersAtFirstSteps(Callback):
    """The model's buffers as the first and the second training step find them (behind ``GradualUnfreeze``)."""

    def __init__(self) -> None:
        self.buffers: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step < 2 and trainer.global_step not in self.buffers:
            self.buffers[trainer.global_step] = {name: b.detach().clone() for name, b in pl_module.named_buffers()}


class Backbone(nn.Module):
    """A frozen conv block, ``proj``, and ``extra``, used only when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_block(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(8, 8)
        self.extra = nn.Linear(8, 8)

    def forward(self, x: Tensor, use_extra: bool) -> Tensor:
        features = self.proj(self.convs(x))
        return features + self.extra(features) if use_extra else features


class UnusedOnRank1(ConvModel):
    """``backbone.extra`` is in rank 0's forward only; ``backbone`` and ``head`` are two ``fully_shard`` roots."""

    def __init__(self, sharded: bool) -> None:
        super().__init__(sharded)
        self.backbone = Backbone()  # type: ignore[assignment]

    def configure_model(self) -> None:
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.backbone, mesh=mesh)
            fully_shard(self.head, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x, use_extra=self.global_rank == 0))


UNUSED_RELEASES = {
    "ddp_unused": ["backbone.proj", "backbone.extra"],
    "fsdp_unused": ["backbone.proj", "backbone.extra"],
    "fsdp_unused_control": ["backbone.proj", "backbone.extra"],
    "fsdp_unused_alone": ["backbone.extra"],  # rank 1's backward does not reach `backbone` at all
}


def unused_run(scenario: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=generator) * 3 + 2
    y = torch.randint(0, 4, (32,), generator=generator)
    torch.manual_seed(0)
    sharded = scenario != "ddp_unused"
    if scenario == "fsdp_unused_control":
        lightning_bnfreeze.distributed.reduce_unused_gradients = lambda module, params: []
    model = UnusedOnRank1(sharded)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    timeout = timedelta(seconds=20)
    strategy = ModelParallelStrategy(2, 1, timeout=timeout) if sharded else "ddp"
    callbacks = [GradualUnfreeze(what=Schedule({1: UNUSED_RELEASES[scenario]}), bn="train")]
    fit = trainer(strategy, 3, callbacks)
    fit.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    return {
        "initial": initial,
        "final": {name: full(p) for name, p in model.named_parameters()},
        "groups": [(group.get("name"), group["lr"]) for group in fit.optimizers[0].param_groups],
    }


def conv_run(out_dir: Path, scenario: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=generator) * 3  # near the source (shift 0.58): later releases decay
    if scenario.endswith(("_far", "_far_sgd")):
        x = x + 3  # far from it: adapt="auto" adapts the statistics before the first step
    y = torch.randint(0, 4, (32,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    torch.manual_seed(0)
    sharded = not scenario.startswith("ddp")
    model = ConvModel(sharded, sgd=scenario.endswith("_sgd"))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    initial_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1) if sharded else "ddp"
    probe, at_first_steps = GroupsAtFitStart(), BuffersAtFirstSteps()
    if scenario.endswith(("_auto", "_far", "_far_sgd")):  # the defaults: bn="auto" decides, adapt="auto" re-estimates
        unfreeze = GradualUnfreeze(what=Schedule(RELEASES), lr_scale=0.5)
    else:
        unfreeze = GradualUnfreeze(what=Schedule(RELEASES), lr_scale=0.5, bn="train", adapt=AdaBN(2))
    callbacks = [unfreeze, BNFreezeCallback(), probe, at_first_steps]
    fit = trainer(strategy, 2 if scenario == "fsdp_stop" else 3, callbacks, limit_val_batches=1)
    checkpoint = out_dir / "fsdp_checkpoint"
    with FirstStepEstimates() as estimates:
        fit.fit(model, loader, loader, ckpt_path=checkpoint if scenario == "fsdp_resume" else None)
    if scenario == "fsdp_stop":
        fit.save_checkpoint(checkpoint)
    return {
        "initial": initial,
        "final": {name: full(p) for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "initial_buffers": initial_buffers,
        "buffers_at_first_step": at_first_steps.buffers.get(0, {}),
        "buffers_at_second_step": at_first_steps.buffers.get(1, {}),
        "estimates": estimates,
        "train_norms": [list(record.train_norms) for record in unfreeze.history],
        "groups": [(group.get("name"), group["lr"]) for group in fit.optimizers[0].param_groups],
        "groups_at_fit_start": probe.names,
        "source_shift": unfreeze.source_shift,  # max_step="auto"'s, measured at fit start or kept in the checkpoint
    }


def amp_run() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=generator)
    y = torch.randint(0, 4, (16,), generator=generator)
    torch.manual_seed(0)
    model = LinearModel()
    probe = LocalGradients()
    precision = MixedPrecision("16-mixed", ACCELERATOR)
    fit = trainer("ddp", 3, [probe, GradualUnfreeze(what=Schedule({1: "backbone.1"}), bn="train")], plugins=[precision])
    fit.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert precision.scaler is not None
    return {
        "final": {name: p.detach().clone() for name, p in model.named_parameters()},
        "scale": precision.scaler.get_scale(),
        "local_finite": probe.finite,
        "steps": fit.global_step,
    }


def main(out_dir: Path, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    if ACCELERATOR == "cuda":  # as exact as on the CPU: a resumed run ends where the uninterrupted one does
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for scenario in scenarios:
        if scenario == "amp":
            result = amp_run()
        elif scenario in UNUSED_RELEASES:
            result = unused_run(scenario)
        else:
            result = conv_run(out_dir, scenario)
        rank = torch.distributed.get_rank()
        torch.save(_to_cpu(result), out_dir / f"{scenario}-rank{rank}.pt")
    if torch.distributed.is_initialized():  # gloo's threads must not outlive the group (a SIGABRT at exit in CI)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
