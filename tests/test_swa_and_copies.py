"""Frozen norm layers through Lightning's ``StochasticWeightAveraging``, and copies of a model with frozen layers.

SWA resets every BatchNorm layer's statistics after its last averaging epoch and re-estimates them in a
train-mode pass: frozen layers must come out with their own statistics, trained ones re-estimated. A copy
(an EMA made with ``copy.deepcopy``, a pickle) taken during training must be a plain model.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze, freeze_norm, is_norm_frozen
from tests.helpers import changed, randomize_norm_stats, snapshot_buffers
from tests.unfreeze_helpers import build_model, make_trainer

FROZEN = ["backbone.0.1", "backbone.1.1"]  # never released
TRAINED = ["backbone.3.1", "head.1"]


@pytest.mark.parametrize(
    "callback",
    [
        lambda: GradualUnfreeze(schedule={1: "backbone.3", 3: "backbone.1.0"}, train_bn=True),
        lambda: BNFreezeCallback(modules=["backbone.0", "backbone.1"]),
    ],
    ids=["GradualUnfreeze", "BNFreezeCallback"],
)
def test_frozen_layers_keep_their_statistics_through_swa(callback: Any) -> None:
    model = build_model()
    if "BNFreeze" in type(callback()).__name__:
        model.backbone[0].requires_grad_(False)
    before = snapshot_buffers(model, FROZEN)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    trainer = make_trainer([callback(), swa], max_epochs=4)
    trainer.fit(model)
    assert changed(before, snapshot_buffers(model, FROZEN)) == []
    # the trained layers were re-estimated by SWA's pass: their cumulative averages, no longer zeros and ones
    for name in TRAINED:
        layer = model.get_submodule(name)
        assert not torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean)), name
        assert int(layer.num_batches_tracked) == 4, name  # SWA's single pass over the 4 training batches


def test_released_groups_follow_the_heads_swa_learning_rate() -> None:
    model = build_model()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
    trainer = make_trainer([GradualUnfreeze(schedule={1: "backbone.3", 2: "backbone.0"}, lr_scale=0.3), swa])
    trainer.fit(model)
    lrs = {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups}
    assert lrs == pytest.approx({"head": 0.05, "backbone.3": 0.015, "backbone.0": 0.015})


def test_update_bn_leaves_frozen_layers_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    randomize_norm_stats(model)
    freeze_norm(model[1])
    before = snapshot_buffers(model)
    update_bn([torch.randn(8, 3) * 3 + 2 for _ in range(2)], model)
    assert changed(before, snapshot_buffers(model)) == ["2.num_batches_tracked", "2.running_mean", "2.running_var"]


class Ema(Callback):
    """A hand-written EMA: a deep copy of the backbone, taken while its norm layers are frozen, and its pickle."""

    def __init__(self) -> None:
        self.copy: nn.Module | None = None
        self.pickled = b""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.copy is None:
            assert is_norm_frozen(pl_module.backbone[1][1])
            self.copy = copy.deepcopy(pl_module.backbone)
            self.pickled = pickle.dumps(pl_module.backbone)


def test_a_copy_taken_during_training_is_a_plain_model() -> None:
    model = build_model()
    ema = Ema()
    make_trainer([GradualUnfreeze(schedule={1: "backbone.3"}), ema], max_epochs=2).fit(model)
    assert ema.copy is not None
    assert not any(is_norm_frozen(module) for module in ema.copy.modules())
    ema.copy.eval()
    assert all(module.training for module in ema.copy.train().modules())
    # nothing of the callback (its trainer, optimizer, the LightningModule) travels with a copy
    assert len(ema.pickled) == len(pickle.dumps(model.backbone))
    unpickled = pickle.loads(ema.pickled)
    assert not any(is_norm_frozen(module) for module in unpickled.modules())
