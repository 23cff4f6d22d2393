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
- ``ddp_rise_rank0``, ``fsdp_rise_rank0``: ``ConvModel`` (releases at epochs 1 and 2, ``bn="train"``, fixed rates)
  whose training loss triples on rank 0 from the first release to the second (``ScaledOnRanks``): the loss check
  (``on_loss_rise="retry"``, the default) sees rank 0's rise, and every rank retries the first release at a tenth of
  its rate (the second one's too) from the weights, buffers and optimizer state it had at its first step.
  ``ddp_rise_rank1``, ``fsdp_rise_rank1``: the loss triples on rank 1 only: rank 0's losses decide, no rank retries.
  The ``_rise_rank0`` runs save a checkpoint (``ModelCheckpoint``) at step 6, inside the first release's watch (its
  epoch runs steps 4 to 7: 2 of its 4 batches done); the training batches are ``RankBatches``, which resume
  mid-epoch. ``ddp_rise_resume``, ``fsdp_rise_resume``: a new fit resumed from that checkpoint, whose loss check
  rebuilds the release's snapshot from it and retries at the watch's end as the uninterrupted run does.
- ``ddp_rise_adabn``, ``fsdp_rise_adabn``: the ``_rise_rank0`` run with ``AdaBN(2, on_release=True)``, whose forwards
  without backward at each release leave FSDP2's gathered parameters registered, until the library registers the
  sharded ones again: the first release's snapshot must hold (and restore) the sharded parameters of the head (a
  root unit), and the first-step measure of the second release (``backbone.0``, in the backbone's root unit) too.
- ``ddp_diverge_rank0``, ``fsdp_diverge_rank0``: the ``_rise_`` runs' model over 4 epochs, whose training loss
  triples on rank 0 from the second release on (epoch 2, at steps 8 to 11), while both released blocks train at more
  than a quarter of the head's rate (half of it, as lr_scale says), and halves on rank 1 in the first release's epoch
  (1), which makes that epoch rank 1's lowest, not rank 0's (the one before): the divergence check judges epoch 2 at
  epoch 3's first batch on rank 0's losses, and every rank goes back to the end of rank 0's lowest epoch (the snapshot
  taken at the next epoch's first batch, as rank 0 decided: every weight and buffer, no optimizer state) with every
  release at a tenth of its rate, under which the loss does not triple. ``ddp_diverge_rank1``, ``fsdp_diverge_rank1``:
  the loss triples on rank 1 only, from the second release on: rank 0's losses decide, no rank goes back. The
  ``_diverge_rank0`` runs save a checkpoint at step 10, 2 batches into the diverged epoch, after that snapshot and
  before the judgement. ``ddp_diverge_resume``, ``fsdp_diverge_resume``: a new fit resumed from it, whose divergence
  check rebuilds the snapshot from the checkpoint's whole tensors (sharded again under FSDP2), judges the epoch with
  the checkpoint's losses and goes back as the uninterrupted fit does.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_bnfreeze.distributed
import lightning_bnfreeze.step_size
from lightning_bnfreeze import AdaBN, BNFreezeCallback, GradualUnfreeze, Schedule
from lightning_bnfreeze.callbacks.strategies import saved_callback_state
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
        enable_checkpointing=any(isinstance(callback, ModelCheckpoint) for callback in callbacks),
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


class ScaledOnRanks(ConvModel):
    """The training loss on each rank of ``rules`` times its rule's ``factor`` while ``parts`` parts of the backbone
    train (children with parameters), a released one at more than ``above`` times the head's rate: a rule is
    ``(parts, above, factor)``."""

    def __init__(self, sharded: bool, rules: Mapping[int, tuple[int, float, float]]) -> None:
        super().__init__(sharded)
        self.rules = dict(rules)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank not in self.rules:
            return loss
        parts, above, factor = self.rules[self.global_rank]
        training = sum(any(param.requires_grad for param in child.parameters()) for child in self.backbone)
        rates = {group.get("name"): group["lr"] for group in self.trainer.optimizers[0].param_groups}
        fast = any(rate > above * rates["head"] for name, rate in rates.items() if name != "head")
        return loss * factor if training == parts and fast else loss


def training_state(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's parameters (full tensors) and buffers, and the optimizer's step count for each parameter it has
    state for."""
    return {
        "params": {name: full(p) for name, p in pl_module.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in pl_module.named_buffers()},
        "steps": {
            name: int(full(optimizer.state[p]["step"]))
            for name, p in pl_module.named_parameters()
            if p in optimizer.state
        },
    }


class RetriedStates(Callback):
    """Behind ``unfreeze``: the training state at the end of the batch before each release, at the release's first
    batch (after ``unfreeze``'s ``on_train_batch_start``, when its loss check takes the snapshot), at the end of the
    batch before the one whose ``on_train_batch_end`` retried it (trained by the release), and right after that retry;
    at each epoch's end and at its first batch (after ``unfreeze``'s ``on_train_batch_start``, when its divergence
    check judged the epoch before, took the snapshot of it or went back); and this rank's losses."""

    def __init__(self, unfreeze: GradualUnfreeze) -> None:
        self.unfreeze = unfreeze
        self.before_release: dict[int, dict[str, Any]] = {}
        self.at_release: dict[int, dict[str, Any]] = {}
        self.before_retry: dict[int, dict[str, Any]] = {}
        self.after_retry: dict[int, dict[str, Any]] = {}
        self.epoch_starts: dict[int, dict[str, Any]] = {}
        self.epoch_ends: dict[int, dict[str, Any]] = {}
        self.losses: list[float] = []  # this rank's training losses, batch by batch
        self._retries: dict[int, int] = {}
        self._last: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        for record in self.unfreeze.history:
            if record.index not in self.at_release:
                self.before_release[record.index] = self._last
                self.at_release[record.index] = training_state(pl_module, trainer.optimizers[0])
        if idx == 0:
            self.epoch_starts[trainer.current_epoch] = training_state(pl_module, trainer.optimizers[0])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        state = training_state(pl_module, trainer.optimizers[0])
        for record in self.unfreeze.history:
            if record.retries > self._retries.get(record.index, 0):
                self.before_retry[record.index], self.after_retry[record.index] = self._last, state
            self._retries[record.index] = record.retries
        self._last = state
        if idx == trainer.num_training_batches - 1:  # before validation, whose forwards leave FSDP2's copies in place
            self.epoch_ends[trainer.current_epoch] = state


class RankBatches:
    """This rank's batches of ``x, y``, in order (as Lightning's ``DistributedSampler`` deals them without shuffling),
    resumable mid-epoch: Lightning keeps :meth:`state_dict` (how many batches the last iterator yielded) in a
    checkpoint and loads it before the resumed fit's first iterator, which skips those. Nothing else may iterate it
    in a fit that saves a checkpoint (``AdaBN`` does: its own iterator would count)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        x, y = x[rank::WORLD], y[rank::WORLD]
        self.batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        self._yielded = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        skip, self._skip = self._skip, 0
        return self._from(skip)

    def _from(self, first: int) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(first, len(self.batches)):
            self._yielded = index + 1
            yield self.batches[index]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["yielded"]


class FirstStepChanges:
    """Within a ``with`` block, how far each released part's first step moved its weights, as the library measures it
    (``FirstStep.change``: a collective under FSDP2, from the weights it kept before that step)."""

    def __enter__(self) -> list[float]:
        found: list[float] = []
        self._change = change = lightning_bnfreeze.step_size.FirstStep.change

        def recorded(probe: lightning_bnfreeze.step_size.FirstStep, momentum: float = 0.0) -> float:
            found.append(change(probe, momentum))
            return found[-1]

        lightning_bnfreeze.step_size.FirstStep.change = recorded  # type: ignore[method-assign]
        return found

    def __exit__(self, *exc: object) -> None:
        lightning_bnfreeze.step_size.FirstStep.change = self._change  # type: ignore[method-assign]


RISE = (1, 0.0, 3.0)
""":class:`ScaledOnRanks`' rule of the ``_rise_`` runs: the loss triples while the first release trains alone (from it
to the second), at any rate."""
DIVERGE = (2, 0.25, 3.0)
"""Of the ``_diverge_`` runs: it triples while both releases train at more than a quarter of the head's rate (from the
second release on, at half of it, until slowed down to a twentieth)."""
FALL = (1, 0.0, 0.5)
"""Of rank 1 in the ``_diverge_rank0`` runs: it halves while the first release trains alone, which makes the epoch of
the first release (1) rank 1's lowest; rank 0's is the one before it."""
SCALED = {
    f"{strategy}_{run}": rules
    for strategy in ("ddp", "fsdp")
    for run, rules in {
        "rise_rank0": {0: RISE}, "rise_adabn": {0: RISE}, "rise_resume": {0: RISE}, "rise_rank1": {1: RISE},
        "diverge_rank0": {0: DIVERGE, 1: FALL}, "diverge_resume": {0: DIVERGE, 1: FALL}, "diverge_rank1": {1: DIVERGE},
    }.items()
}  # fmt: skip
WATCH_STEP = 6
"""The ``_rise_rank0`` runs' checkpoint: 4 batches an epoch on each rank, the first release's epoch (1) runs steps 4
to 7 and its watch ends at step 7's loss: at step 6 it is open, 2 of its batches in."""
DIVERGED_STEP = 10
"""The ``_diverge_rank0`` runs' checkpoint: the diverged epoch (2) runs steps 8 to 11, after the snapshot of the
lowest epoch (taken at step 8's batch), and is judged at step 12's: at step 10, 2 of its batches in."""


def rise_run(out_dir: Path, scenario: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=generator) * 3
    y = torch.randint(0, 4, (32,), generator=generator)
    torch.manual_seed(0)
    strategy_name, run = scenario.split("_")[:2]  # run: "rise" or "diverge"
    sharded = strategy_name == "fsdp"
    model = ScaledOnRanks(sharded, SCALED[scenario])
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1) if sharded else "ddp"
    # on_loss_rise="retry" (the default); the rates as lr_scale says (max_step=None), whatever the first steps
    adapt = AdaBN(2, on_release=True) if scenario.endswith("_adabn") else None
    unfreeze = GradualUnfreeze(what=Schedule(RELEASES), lr_scale=0.5, bn="train", adapt=adapt, max_step=None)
    states = RetriedStates(unfreeze)
    callbacks: list[Callback] = [unfreeze, states]
    checkpoints = out_dir / f"{strategy_name}_{run}_checkpoints"
    every = DIVERGED_STEP if run == "diverge" else WATCH_STEP
    checkpoint = checkpoints / f"step={every}.ckpt"  # a folder under FSDP2 (a distributed checkpoint)
    if scenario.endswith("_rank0"):  # every `every` steps: inside the watch, and at the rise runs' end
        callbacks.append(ModelCheckpoint(checkpoints, "{step}", every_n_train_steps=every, save_top_k=-1))
    resume = scenario.endswith("_resume")
    # the diverged epoch (2) judged at epoch 3; a validation batch after each epoch of the _diverge_ runs: forwards
    # without backward, whose gathered FSDP2 parameters must not be what the divergence check copies and restores
    fit = trainer(strategy, 4 if run == "diverge" else 3, callbacks, limit_val_batches=1)
    validation = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4) if run == "diverge" else None
    with FirstStepChanges() as first_steps, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(model, RankBatches(x, y, batch_size=4), validation, ckpt_path=checkpoint if resume else None)
    result = {
        "final": {name: full(p) for name, p in model.named_parameters()},
        "history": [(record.retries, list(record.lr_factors)) for record in unfreeze.history],
        "groups": [(group.get("name"), group["lr"]) for group in fit.optimizers[0].param_groups],
        "before_release": states.before_release,
        "at_release": states.at_release,
        "before_retry": states.before_retry,
        "after_retry": states.after_retry,
        "epoch_starts": states.epoch_starts,
        "epoch_ends": states.epoch_ends,
        "losses": states.losses,
        "global_step": fit.global_step,
        "first_steps": first_steps,
        "warnings": [str(warning.message) for warning in caught if "GradualUnfreeze:" in str(warning.message)],
    }
    if resume and run == "diverge":  # the divergence check's state in the checkpoint (a distributed one's: metadata)
        saved = saved_callback_state(checkpoint, unfreeze.state_key)
        result["saved_in_diverged"] = None if saved is None else saved["divergence_check"]
    elif resume:  # the loss check's state in the checkpoints
        for key, path in (("in_watch", checkpoint), ("at_end", checkpoints / f"step={2 * WATCH_STEP}.ckpt")):
            saved = saved_callback_state(path, unfreeze.state_key)
            result[f"saved_{key}"] = None if saved is None else saved["loss_check"]
    return result


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
        elif scenario in SCALED:
            result = rise_run(out_dir, scenario)
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
