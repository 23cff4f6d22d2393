"""Frozen norm layers through Lightning's ``StochasticWeightAveraging`` and ``EMAWeightAveraging``, and copies of a
model with frozen layers.

SWA resets every BatchNorm layer's statistics after its last averaging epoch and re-estimates them in a
train-mode pass: frozen layers must come out with their own statistics, trained ones re-estimated. EMA averages
buffers too (``decay * a + (1 - decay) * a`` is not always ``a`` in floating point) and puts the average in the model
for validation and at the end: frozen layers must keep their statistics bitwise there too. A copy (an EMA made with
``copy.deepcopy``, a pickle) taken during training must be a plain model.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze, Schedule, freeze_norm, is_norm_frozen
from tests.helpers import changed, randomize_norm_stats, snapshot_buffers
from tests.unfreeze_helpers import ValidatedModel, build_model, make_trainer

FROZEN = ["backbone.0.1", "backbone.1.1"]  # never released
TRAINED = ["backbone.3.1", "head.1"]


@pytest.mark.parametrize(
    "callback",
    [
        lambda: GradualUnfreeze(what=Schedule({1: "backbone.3", 3: "backbone.1.0"}), bn="train"),
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


class ValidationProbe(ValidatedModel):
    """Records the frozen layers' statistics as each validation run sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.in_validation: list[dict[str, Tensor]] = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.in_validation.append(snapshot_buffers(self, FROZEN))
        super().validation_step(batch, batch_idx)


def frozen_by_hand(model: nn.Module) -> list[Callback]:
    """The control: the layers frozen with the library's core (inference mode, parameters frozen), no callback."""
    for name in FROZEN:
        freeze_norm(model.get_submodule(name))
        model.get_submodule(name).requires_grad_(False)
    return []


@pytest.mark.parametrize(
    ("callbacks", "kept"),
    [
        (lambda model: [GradualUnfreeze(what=Schedule({1: "backbone.3", 3: "backbone.1.0"}), bn="train")], True),
        (lambda model: [BNFreezeCallback(modules=["backbone.0", "backbone.1"])], True),
        (frozen_by_hand, False),
    ],
    ids=["GradualUnfreeze", "BNFreezeCallback", "control-no-callback"],
)
@pytest.mark.filterwarnings("ignore:Found 2 module\\(s\\) in eval mode")  # the control's frozen layers
@pytest.mark.filterwarnings("ignore:GradualUnfreeze. release epoch")
def test_frozen_layers_keep_their_statistics_through_ema(callbacks: Any, kept: bool) -> None:
    """In the live model, bitwise: during each validation (the average swapped in) and at the end (the average
    copied in). Without a callback, EMA moves them."""
    model = ValidationProbe()
    before = snapshot_buffers(model, FROZEN)
    make_trainer([*callbacks(model), EMAWeightAveraging(decay=0.9)], max_epochs=3).fit(model)
    assert len(model.in_validation) == 3
    drift = [changed(before, seen) for seen in [*model.in_validation, snapshot_buffers(model, FROZEN)]]
    if kept:
        assert drift == [[], [], [], []]
    else:
        assert drift[-1], "the control: EMA alone changes the frozen layers' statistics"


def test_released_groups_follow_the_heads_swa_learning_rate() -> None:
    model = build_model()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
    trainer = make_trainer([GradualUnfreeze(what=Schedule({1: "backbone.3", 2: "backbone.0"}), lr_scale=0.3), swa])
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
    make_trainer([GradualUnfreeze(what=Schedule({1: "backbone.3"})), ema], max_epochs=2).fit(model)
    assert ema.copy is not None
    assert not any(is_norm_frozen(module) for module in ema.copy.modules())
    ema.copy.eval()
    assert all(module.training for module in ema.copy.train().modules())
    # nothing of the callback (its trainer, optimizer, the LightningModule) travels with a copy
    assert len(ema.pickled) == len(pickle.dumps(model.backbone))
    unpickled = pickle.loads(ema.pickled)
    assert not any(is_norm_frozen(module) for module in unpickled.modules())
