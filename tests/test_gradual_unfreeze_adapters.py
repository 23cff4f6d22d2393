"""GradualUnfreeze with parameters that train inside a frozen backbone (adapters such as LoRA, named in
``trainable``, hand-written or from peft), a parameter re-enabled by hand (warned about), and a head that is not
the optimizer's first param group."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import GradualUnfreeze, Schedule
from tests.unfreeze_helpers import (
    FEATURES,
    STEPS_PER_EPOCH,
    EpochProbe,
    LrProbe,
    UnfreezeModel,
    conv_block,
    groups_by_name,
    inside,
    make_trainer,
)


class LoRAConv(nn.Module):
    """A 3x3 conv plus a low-rank update ``lora_up(lora_down(x))`` (``lora_up`` starts at zero, as in LoRA)."""

    def __init__(self, channels: int, rank: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.lora_down = nn.Conv2d(channels, rank, 1, bias=False)
        self.lora_up = nn.Conv2d(rank, channels, 1, bias=False)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.lora_up(self.lora_down(x))


def lora_model(hand_frozen: bool = False) -> UnfreezeModel:
    """The tiny backbone with an adapter in block ``backbone.1``; ``hand_frozen``: the user froze the backbone
    but the adapter's parameters, as with peft, before handing it over."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        conv_block(3, FEATURES),
        nn.Sequential(LoRAConv(FEATURES), nn.BatchNorm2d(FEATURES), nn.ReLU()),
        nn.MaxPool2d(2),
        conv_block(FEATURES, FEATURES),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    if hand_frozen:
        for name, param in backbone.named_parameters():
            param.requires_grad = "lora_" in name
    return UnfreezeModel(backbone=(backbone, FEATURES), optimizer="adam", lr=0.01)


ADAPTER = ("backbone.1.0.lora_down.weight", "backbone.1.0.lora_up.weight")


def test_trainable_parameters_train_from_the_first_step_and_stay_in_the_optimizer() -> None:
    model, probe = lora_model(), EpochProbe()
    callback = GradualUnfreeze(what=Schedule({2: "backbone.1"}), trainable=["*lora_*"], bn="train")
    trainer = make_trainer([callback, probe], max_epochs=3)
    trainer.fit(model)
    for epoch in range(3):
        for name, _ in model.named_parameters():
            if name in ADAPTER or inside(name, "head"):
                assert probe.changed_in_epoch(name, epoch), (name, epoch)  # the adapter trains from the start
            elif inside(name, "backbone.1"):
                assert probe.changed_in_epoch(name, epoch) == (epoch >= 2), (name, epoch)
            else:
                assert not probe.changed_in_epoch(name, epoch), (name, epoch)
    assert all(rg["backbone.1.0.lora_down.weight"] for rg in probe.requires_grad)
    groups = groups_by_name(trainer.optimizers[0])
    adapter = {id(model.get_parameter(name)) for name in ADAPTER}
    assert adapter <= {id(p) for p in groups["head"]["params"]}  # where the user's optimizer put them
    assert not adapter & {id(p) for p in groups["backbone.1"]["params"]}  # never withdrawn, never released again
    assert {id(p) for p in groups["backbone.1"]["params"]} == {
        id(p) for name, p in model.named_parameters() if inside(name, "backbone.1") and name not in ADAPTER
    }


def test_a_part_that_trains_from_the_first_step_is_not_measured_as_a_release(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A classifier left in the backbone and named in ``trainable`` (here ``backbone.3``): its steps since the first
    are the head's, not a release's first step, and decide no norm mode; the next part released does."""
    model = lora_model()
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3", 2: "backbone.1"}), trainable=["backbone.3.*"])
    with caplog.at_level(logging.INFO):
        make_trainer([callback], max_epochs=3).fit(model)

    said = [r.getMessage() for r in caplog.records if "its first step" in r.getMessage()]
    assert [line.split(":")[1].strip() for line in said] == ["backbone.1"]  # measured, and decided
    (released,) = {r.getMessage() for r in caplog.records if "epoch 1: released" in r.getMessage()}
    assert released.endswith("released backbone.3 (600 params, training from the first step: `trainable`).")


def test_a_parameter_enabled_by_hand_inside_the_frozen_backbone_is_warned_about_at_setup() -> None:
    model = lora_model(hand_frozen=True)
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3"}), bn="train")
    with pytest.warns(UserWarning, match=r"2 backbone parameter\(s\) require grad.*lora_down.*`trainable`"):
        make_trainer([callback], max_epochs=1).fit(model)
    assert not model.get_parameter(ADAPTER[0]).requires_grad  # frozen until its block is released, as said


def test_a_trainable_pattern_that_matches_no_backbone_parameter_raises_at_setup_naming_it() -> None:
    model = lora_model()
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3"}), trainable=["*lroa_*"])
    trainer = make_trainer([callback], max_epochs=1)
    with pytest.raises(ValueError, match=r"`trainable` holds the pattern '\*lroa_\*', which matches no parameter of"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(param, weights[name]) for name, param in model.named_parameters())


def test_contrast_an_adapter_named_in_trainable_raises_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    model = lora_model(hand_frozen=True)
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3"}), trainable=["*lora_*"], bn="train")
    make_trainer([callback], max_epochs=1).fit(model)
    assert not [w for w in recwarn if "require grad" in str(w.message)]
    assert model.get_parameter(ADAPTER[0]).requires_grad


# --------------------------------------------------------------------------------------------- peft


class TokenClassifier(pl.LightningModule):
    """A tiny BERT with peft's LoRA on its attention as ``backbone``, and a linear head on the first token."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        peft = pytest.importorskip("peft")
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
        lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
        self.backbone = peft.get_peft_model(transformers.BertModel(config), lora)
        self.head = nn.Linear(16, 2)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 50, (16, 6), generator=generator)
        self.y = torch.randint(0, 2, (16,), generator=generator)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(input_ids=x).last_hidden_state[:, 0]), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=4)


def test_peft_lora_parameters_named_trainable_train_from_the_first_step(recwarn: pytest.WarningsRecorder) -> None:
    model, probe = TokenClassifier(), EpochProbe()
    lora = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora and all(model.get_parameter(name).requires_grad for name in lora)
    layer = "backbone.base_model.model.encoder.layer.1"
    callback = GradualUnfreeze(what=Schedule({1: layer}), trainable=["*lora_*"], bn="train")
    trainer = make_trainer([callback, probe], max_epochs=2)
    trainer.fit(model)
    assert not [w for w in recwarn if "require grad" in str(w.message)]
    released = f"{layer}."
    for name, _ in model.named_parameters():
        if "lora_B" in name:  # (lora_A gets no gradient at the first step, lora_B starting at zero)
            assert probe.changed_in_epoch(name, 0), name
        elif name.startswith(released) and "lora_" not in name:
            assert not probe.changed_in_epoch(name, 0), name
            assert probe.changed_in_epoch(name, 1) or not name.endswith("weight"), name
        elif name.startswith("backbone.") and "lora_" not in name:
            assert not probe.changed_in_epoch(name, 0) and not probe.changed_in_epoch(name, 1), name
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(model.get_parameter(name)) for name in lora} <= held
    [group] = [g for g in trainer.optimizers[0].param_groups if g["name"] == layer]
    assert not any("lora_" in name for name, p in model.named_parameters() if any(p is q for q in group["params"]))


# --------------------------------------------------------------------------------------------- the head's group


class BackboneGroupFirst(UnfreezeModel):
    """The user lists a group of backbone parameters first (its own lr and weight decay), then the head's."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            [
                {"params": list(self.backbone.parameters()), "lr": 0.5, "weight_decay": 0.01},
                {"params": list(self.head.parameters()), "lr": 0.1},
            ],
            lr=0.1,
        )
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_releases_follow_the_head_group_when_it_is_not_group_0() -> None:
    torch.manual_seed(0)
    model, probe = BackboneGroupFirst(), LrProbe()
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3"}), lr_scale=0.5, bn="train")
    make_trainer([callback, probe], max_epochs=2).fit(model)
    names = probe.records[-1].names
    assert names == [None, "head", "backbone.3"]  # the emptied backbone group is never named "head"
    assert probe.records[-1].sizes == [0, len(list(model.head.parameters())), 4]
    ratios = [(r.step, r.lrs[2] / r.lrs[1]) for r in probe.records if len(r.names) == 3]
    assert [step for step, _ in ratios] == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    assert all(ratio == pytest.approx(0.5, rel=1e-9) for _, ratio in ratios)
    assert len({r.lrs[1] for r in probe.records}) == len(probe.records)  # the head's lr moved at every step
    group = model.trainer.optimizers[0].param_groups[2]
    assert group["weight_decay"] == 0.01  # the hyperparameters of the group it came from
