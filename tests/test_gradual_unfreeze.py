"""GradualUnfreeze: frozen backbone at fit start, releases into named param groups at scaled learning rates,
norm layers, warm-up, logging, both ways of handing parameters to the optimizer, several optimizers."""

from __future__ import annotations

import csv
import logging
import math
import re
from types import SimpleNamespace
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_bnfreeze.released_groups as released_groups_module
from lightning_bnfreeze import Blocks, BNFreezeCallback, Every, GradualUnfreeze, LayerDecay, Schedule
from lightning_bnfreeze.step_size import NEAR_DECAY
from tests.unfreeze_helpers import (
    FEATURES,
    HEAD_NORM,
    IMAGE_SIZE,
    STEPS_PER_EPOCH,
    BuiltLater,
    EpochProbe,
    LrProbe,
    UnfreezeModel,
    assert_same_nested,
    build_model,
    clone_params,
    clone_state,
    groups_by_name,
    inside,
    make_trainer,
    module_numel,
    param_ids,
)

SCHEDULE = {1: "backbone.3", 2: ["backbone.1", "backbone.0"]}
LR_SCALE, LR_DECAY = 0.3, 0.4
FACTORS = {"backbone.3": 0.3, "backbone.1": 0.12, "backbone.0": 0.12}  # modules of one epoch share k
RELEASE_EPOCH = {"backbone.3": 1, "backbone.1": 2, "backbone.0": 2}
RELEASED_MODULE_OF_NORM = {"backbone.0.1": "backbone.0", "backbone.1.1": "backbone.1", "backbone.3.1": "backbone.3"}


def unfreeze(schedule: dict[int, Any] | None = None, bn: str = "train", **kwargs: Any) -> GradualUnfreeze:
    """``SCHEDULE`` (or ``schedule``) at ``LR_SCALE`` and ``LR_DECAY``, released norm layers training unless told."""
    what = Schedule(SCHEDULE if schedule is None else schedule, decay=LR_DECAY)
    return GradualUnfreeze(what=what, lr_scale=LR_SCALE, bn=bn, **kwargs)


def fit(model: UnfreezeModel, callbacks: list[Callback], max_epochs: int = 3, **trainer_kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(callbacks, max_epochs=max_epochs, **trainer_kwargs)
    trainer.fit(model)
    return trainer


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("first_release", "release_every", "epochs"), [(1, 1, [1, 2, 3]), (2, 3, [2, 5, 8]), (1, 2, [1, 3, 5])]
)
def test_default_schedule_is_children_with_params_output_side_first_on_a_cadence(
    first_release: int, release_every: int, epochs: list[int]
) -> None:
    callback = GradualUnfreeze(what=Blocks(per_release=1), when=Every(epochs=release_every, first=first_release))
    plan = callback.plan(build_model())
    # backbone.2 (MaxPool2d), backbone.4 and backbone.5 hold no parameters: not released
    assert [[part.name for part in release] for release in plan.releases] == [
        ["backbone.3"],
        ["backbone.1"],
        ["backbone.0"],
    ]
    assert callback.when.times(len(plan.releases)) == epochs


def test_default_schedule_trains_head_alone_in_epoch_0_then_releases_one_child_per_epoch() -> None:
    model, probe = build_model(), LrProbe()
    callback = GradualUnfreeze(what=Blocks(per_release=1, decay=LR_DECAY), lr_scale=LR_SCALE, bn="train")
    fit(model, [callback, probe], max_epochs=4)
    by_epoch = {r.epoch: r for r in probe.records}
    assert [by_epoch[e].names[1:] for e in range(4)] == [
        [],
        ["backbone.3"],
        ["backbone.3", "backbone.1"],
        ["backbone.3", "backbone.1", "backbone.0"],
    ]
    last = by_epoch[3]
    assert [lr / last.lrs[0] for lr in last.lrs[1:]] == pytest.approx([0.3, 0.12, 0.048], rel=1e-9)


def test_at_fit_start_the_whole_backbone_is_frozen_and_only_the_head_trains() -> None:
    model, probe = build_model(trainable_only=True), EpochProbe()
    before = clone_params(model)
    trainer = fit(model, [unfreeze(schedule={2: "backbone.3"}), probe], max_epochs=2)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    # configure_optimizers already saw the frozen backbone: only the head was handed over
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == param_ids(model, "head")
    after = clone_params(model)
    assert all(torch.equal(before[n], after[n]) for n in before if inside(n, "backbone"))
    assert all(not torch.equal(before[n], after[n]) for n in before if inside(n, "head"))
    assert probe.requires_grad[0] == {n: inside(n, "head") for n in before}


# --------------------------------------------------------------------------------------------- releases


def test_each_released_module_gets_its_own_named_group_at_the_scaled_lr() -> None:
    model, probe = build_model(), LrProbe()
    trainer = fit(model, [unfreeze(), probe])
    groups = groups_by_name(trainer.optimizers[0])
    assert list(groups)[1:] == ["backbone.3", "backbone.1", "backbone.0"]
    for name, factor in FACTORS.items():
        assert {id(p) for p in groups[name]["params"]} == param_ids(model, name)
        assert all(p.requires_grad for p in model.get_submodule(name).parameters())
        ratios = probe.ratios(name)
        assert [step for step, _ in ratios] == list(range(RELEASE_EPOCH[name] * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH))
        assert all(close(ratio, factor) for _, ratio in ratios), (name, ratios)
    assert all(len(r.names) == 1 for r in probe.records if r.epoch == 0)


def test_a_glob_releases_only_what_is_still_frozen() -> None:
    model, probe = build_model(), LrProbe()
    trainer = fit(model, [unfreeze(schedule={1: "backbone.3", 2: "backbone.*"}), probe])
    groups = trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups[1:]] == ["backbone.3", "backbone.0", "backbone.1"]
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    assert probe.records[-1].lrs[1:] == pytest.approx([0.1 * 0.3, 0.1 * 0.12, 0.1 * 0.12], rel=1e-9)


def test_a_release_epoch_at_or_past_max_epochs_warns_and_never_happens() -> None:
    model = build_model()
    with pytest.warns(UserWarning, match=r"release epoch\(s\) \[3\].*max_epochs=3"):
        trainer = fit(model, [unfreeze(schedule={1: "backbone.3", 3: "backbone.1"})], max_epochs=3)
    assert [g.get("name") for g in trainer.optimizers[0].param_groups[1:]] == ["backbone.3"]
    assert not any(p.requires_grad for p in model.backbone[1].parameters())


@pytest.mark.parametrize("warmup_steps", [3, 6])
def test_warmup_ramps_a_released_group_linearly_over_optimizer_steps(warmup_steps: int) -> None:
    def scheduler(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9), "interval": "step"}

    model, probe = build_model(scheduler=scheduler), LrProbe()
    fit(model, [unfreeze(warmup_steps=warmup_steps), probe], max_epochs=4)
    for name, factor in FACTORS.items():
        release_step = RELEASE_EPOCH[name] * STEPS_PER_EPOCH
        ratios = probe.ratios(name)
        assert len(ratios) == 4 * STEPS_PER_EPOCH - release_step
        for step, ratio in ratios:
            expected = factor * min(1.0, (step - release_step + 1) / warmup_steps)
            assert close(ratio, expected), (name, step, ratio, expected)
    assert len(set(probe.head_lrs())) == len(probe.records)  # the head's lr moved at every step


# --------------------------------------------------------------------------------------------- norm layers


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_backbone_norm_layers_frozen_until_released_then_as_bn_says(bn: str) -> None:
    train_bn = bn == "train"
    model, probe = build_model(record=True), EpochProbe()
    modules = dict(model.named_modules())
    fit(model, [unfreeze(bn=bn), probe])
    assert dict(model.named_modules()) == modules  # the same module objects: nothing swapped or converted
    assert model.recorder is not None
    assert model.recorder.tags() == [(e, b) for e in range(3) for b in range(STEPS_PER_EPOCH)]
    for layer, module in RELEASED_MODULE_OF_NORM.items():
        released_at = RELEASE_EPOCH[module]
        verdicts = model.recorder.verdicts()[layer]
        expected = [
            "batch" if train_bn and epoch >= released_at else "running"
            for epoch in range(3)
            for _ in range(STEPS_PER_EPOCH)
        ]
        assert verdicts == expected, layer
        for epoch in range(3):
            trains_stats = train_bn and epoch >= released_at
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                assert probe.changed_in_epoch(f"{layer}.{buffer}", epoch) == trains_stats, (layer, buffer, epoch)
            for affine in ("weight", "bias"):
                assert probe.changed_in_epoch(f"{layer}.{affine}", epoch) == (epoch >= released_at), (layer, epoch)
    # the head's norm layer is not the library's business: it trains normally from the first step
    assert model.recorder.verdicts()[HEAD_NORM] == ["batch"] * 3 * STEPS_PER_EPOCH
    assert all(probe.changed_in_epoch(f"{HEAD_NORM}.running_mean", epoch) for epoch in range(3))


def test_contrast_lightning_backbone_finetuning_lets_frozen_backbone_statistics_drift() -> None:
    """What the norm-layer test guards against: Lightning's own callback trains the statistics while frozen."""
    model, probe = build_model(record=True), EpochProbe()
    fit(model, [BackboneFinetuning(unfreeze_backbone_at_epoch=5), probe], max_epochs=1)
    assert model.recorder is not None
    assert set(model.recorder.verdicts()["backbone.3.1"]) == {"batch"}
    assert probe.changed_in_epoch("backbone.3.1.running_mean", 0)


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_adding_bn_freeze_callback_changes_nothing(bn: str) -> None:
    def run(callbacks: list[Callback]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        model = build_model(record=True)
        fit(model, callbacks)
        assert model.recorder is not None
        return clone_state(model), model.recorder.verdicts()

    alone = run([unfreeze(bn=bn)])
    for callbacks in (
        [unfreeze(bn=bn), BNFreezeCallback()],
        [BNFreezeCallback(), unfreeze(bn=bn)],
    ):
        state, verdicts = run(callbacks)
        assert verdicts == alone[1]
        assert_same_nested(state, alone[0])


@pytest.mark.parametrize(("bn", "held"), [("frozen", " (1 of them still frozen by another callback"), ("train", ";")])
def test_bn_freeze_callback_says_which_layers_it_lets_go_another_still_freezes(
    bn: str, held: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO):
        fit(build_model(), [unfreeze(bn=bn), BNFreezeCallback()], max_epochs=2)
    (line,) = {r.getMessage() for r in caplog.records if "BNFreezeCallback: 0 norm layer(s) frozen" in r.getMessage()}
    assert line.startswith(f"BNFreezeCallback: 0 norm layer(s) frozen, 1 released{held}")


# --------------------------------------------------------------------------------------------- logging


def test_one_info_line_per_release(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO):
        fit(build_model(), [unfreeze()])
    lines = [r.getMessage() for r in caplog.records if "GradualUnfreeze" in r.getMessage()]
    assert len(lines) == 3, lines
    assert all(r.levelno == logging.INFO for r in caplog.records if "GradualUnfreeze" in r.getMessage())
    assert "norm statistics are" in lines[0] and "max_step=" in lines[0]  # max_step="auto", at fit start
    assert "epoch 1" in lines[1] and "backbone.3" in lines[1] and "600" in lines[1]
    assert "epoch 2" in lines[2] and "backbone.1" in lines[2] and "backbone.0" in lines[2]


def layer_norm_model() -> UnfreezeModel:
    """A backbone of Linear + LayerNorm blocks (as a transformer's): no norm layer keeps running statistics."""
    torch.manual_seed(0)
    size = 3 * IMAGE_SIZE * IMAGE_SIZE
    blocks = [nn.Sequential(nn.Linear(n, FEATURES), nn.LayerNorm(FEATURES), nn.ReLU()) for n in (size, FEATURES)]
    return UnfreezeModel(backbone=(nn.Sequential(nn.Flatten(), *blocks), FEATURES), optimizer="adam", lr=0.05)


def test_without_running_statistics_nothing_is_said_of_norm_modes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    callback = GradualUnfreeze(what=Blocks(per_release=1))
    with caplog.at_level(logging.INFO):
        fit(layer_norm_model(), [callback])
    lines = [r.getMessage() for r in caplog.records if "GradualUnfreeze" in r.getMessage()]
    assert callback.first_step is not None and callback.first_step > 0.005  # bn="auto" had a fast step to decide on
    assert not [line for line in lines if "norm layers" in line or "statistics in" in line], lines
    assert "released backbone.2" in "".join(lines)

    table = callback.dry_run(layer_norm_model())
    assert "No norm layer of 'backbone' keeps running statistics: `bn` changes nothing, max_step='auto'" in table
    assert "train while the releases move fast" not in table and "adapt='auto'" not in table


def test_a_second_fit_on_a_trainer_that_trained_warns_that_the_callback_starts_over(
    recwarn: pytest.WarningsRecorder,
) -> None:
    model = build_model()
    trainer = make_trainer([unfreeze()], max_epochs=1)
    trainer.fit(model)
    assert not [w for w in recwarn if "took" in str(w.message)]  # a first fit: nothing to say
    trainer.fit_loop.max_epochs = 2
    with pytest.warns(
        UserWarning, match=rf"this Trainer took {STEPS_PER_EPOCH} optimizer steps before this fit.*ckpt_path"
    ):
        trainer.fit(model)


def test_a_second_fit_on_the_same_trainer_that_resumes_a_checkpoint_says_nothing_of_starting_over(
    tmp_path: Any, recwarn: pytest.WarningsRecorder
) -> None:
    model = build_model()
    trainer = make_trainer([unfreeze()], max_epochs=1)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, ckpt_path=tmp_path / "last.ckpt")
    assert not [w for w in recwarn if "took" in str(w.message)]


def test_nothing_to_train_until_the_first_release_is_refused_before_anything_is_frozen() -> None:
    model = build_model()
    model.head.requires_grad_(False)  # every trainable parameter is in the backbone
    with pytest.raises(ValueError, match=r"nothing would train until the first release: .* `backbone` \('backbone'\)"):
        fit(model, [GradualUnfreeze()])
    with pytest.raises(ValueError, match=r"nothing would train until the first release"):
        GradualUnfreeze().dry_run(model)  # the dry run says what the fit would
    head_later = BuiltLater("head", lambda: nn.Linear(FEATURES, 2))
    assert "Releases:" in GradualUnfreeze().dry_run(head_later)  # unless the head may come later
    assert all(param.requires_grad for param in model.backbone.parameters())  # nothing was frozen

    fit(model, [GradualUnfreeze(when=Every(first=0))], max_epochs=1)  # released before the first step: it trains
    model = build_model()
    model.head.requires_grad_(False)
    fit(model, [unfreeze({0: "backbone.3"})], max_epochs=1)  # so does an explicit schedule's at epoch 0


def test_trainable_parameter_count_is_logged_each_epoch_and_groups_show_in_lr_monitor(tmp_path: Any) -> None:
    model = build_model()
    logger = CSVLogger(tmp_path, name="", version=0)
    fit(model, [unfreeze(), LearningRateMonitor("step")], logger=logger, max_epochs=4)
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    counts = [row for row in rows if row["gradual_unfreeze/trainable_params"]]
    head = module_numel(model, "head")
    expected = [head, head + 600, head + 600 + 600 + 240, head + 1440]
    assert [float(row["gradual_unfreeze/trainable_params"]) for row in counts] == expected
    assert [int(row["step"]) for row in counts] == [e * STEPS_PER_EPOCH for e in range(4)]
    # each released group under its module's name in LearningRateMonitor, from the step of its release
    for name, factor in FACTORS.items():
        logged = [(int(row["step"]), float(row[f"lr-SGD/{name}"])) for row in rows if row.get(f"lr-SGD/{name}")]
        first = RELEASE_EPOCH[name] * STEPS_PER_EPOCH
        assert logged == [(step, pytest.approx(0.1 * factor)) for step in range(first, 4 * STEPS_PER_EPOCH)]


# --------------------------------------------------------------------------------------------- optimizer


WATCHED = ("head.0.weight", "backbone.3.0.weight", "backbone.1.1.weight", "backbone.0.1.bias")


def run_sgd(trainable_only: bool) -> tuple[UnfreezeModel, LrProbe]:
    model, probe = build_model(trainable_only=trainable_only), LrProbe(params=WATCHED)
    fit(model, [unfreeze(), probe])
    return model, probe


def test_all_or_trainable_parameters_in_configure_optimizers_give_the_same_training() -> None:
    results = {trainable_only: run_sgd(trainable_only) for trainable_only in (False, True)}
    for _, probe in results.values():
        for index, record in enumerate(probe.records):
            for name in WATCHED:
                before, grad = probe.before[index][name]
                after = probe.after[index][name]
                module = next((m for m in FACTORS if inside(name, m)), None)
                if module is not None and record.epoch < RELEASE_EPOCH[module]:
                    assert grad is None and torch.equal(before, after), (name, record.step)  # frozen: untouched
                    continue
                lr = 0.1 * (FACTORS[module] if module is not None else 1.0)
                assert grad is not None and grad.abs().max() > 0
                torch.testing.assert_close(after, before - lr * grad, rtol=1e-5, atol=1e-8)  # plain SGD at its rate
    assert_same_nested(clone_state(results[False][0]), clone_state(results[True][0]))


def test_contrast_without_removal_all_parameters_cannot_be_regrouped(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the all-parameters case relies on: the backbone leaves the head's group before any release."""
    monkeypatch.setattr(released_groups_module, "remove_parameters", lambda optimizer, params: 0)
    model = build_model(trainable_only=False)
    with pytest.raises(ValueError, match="more than one parameter group"):
        fit(model, [unfreeze()])
    assert model.steps_run == STEPS_PER_EPOCH  # epoch 0 trained, the first release failed


@pytest.mark.parametrize("trainable_only", [False, True])
def test_a_release_keeps_the_optimizer_state_of_existing_groups(trainable_only: bool) -> None:
    class AdamStateProbe(Callback):
        def __init__(self) -> None:
            self.at_epoch_end: dict[int, Any] = {}
            self.at_epoch_start: dict[int, Any] = {}

        def state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
            optimizer_state = trainer.optimizers[0].state
            return {
                n: {k: v.clone() for k, v in optimizer_state[p].items()}
                for n, p in pl_module.named_parameters()
                if p in optimizer_state
            }

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.at_epoch_end[trainer.current_epoch] = self.state(trainer, pl_module)

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.at_epoch_start[trainer.current_epoch] = self.state(trainer, pl_module)

    model, probe = build_model(optimizer="adam", trainable_only=trainable_only, lr=0.01), AdamStateProbe()
    trainer = fit(model, [unfreeze(), probe])
    assert len(trainer.optimizers[0].param_groups) == 4
    for epoch in (1, 2):  # release epochs: the state seen after the release is the one before it
        before, after = probe.at_epoch_end[epoch - 1], probe.at_epoch_start[epoch]
        assert set(before) == {n for n, _ in model.named_parameters() if inside(n, "head")} | {
            n for n, _ in model.named_parameters() if epoch == 2 and inside(n, "backbone.3")
        }
        assert_same_nested(after, before)
        assert all(int(s["step"]) == epoch * STEPS_PER_EPOCH for n, s in after.items() if inside(n, "head"))


@pytest.mark.parametrize(("trainable_only", "tied"), [(False, False), (True, False), (False, True)])
def test_parameters_are_tracked_by_identity_not_value(trainable_only: bool, tied: bool) -> None:
    model = build_model(trainable_only=trainable_only)
    model.backbone[3][0].load_state_dict(model.backbone[1][0].state_dict())  # two identical convs
    named = dict(model.named_parameters())
    # fresh BatchNorm weights (ones) and biases (zeros): many parameters equal in value
    assert torch.equal(named["backbone.0.1.weight"], named["backbone.3.1.weight"])
    assert torch.equal(named["backbone.1.1.bias"], named["head.1.bias"][: named["backbone.1.1.bias"].numel()])
    assert torch.equal(named["backbone.1.0.weight"], named["backbone.3.0.weight"])
    if tied:  # and even one weight shared by both convs: it must land in one group only
        model.backbone[3][0].weight = model.backbone[1][0].weight
    before = clone_params(model)
    # bn="frozen": the conv biases before the (inference-mode) norm layers get real gradients
    trainer = fit(model, [unfreeze(schedule={1: "backbone.*"}, bn="frozen")], max_epochs=2)
    groups = trainer.optimizers[0].param_groups
    for name, param in model.named_parameters():
        holders = [g.get("name") for g in groups for p in g["params"] if p is param]
        expected_group = next((m for m in ("backbone.0", "backbone.1", "backbone.3") if inside(name, m)), "head")
        assert holders == [expected_group], name
        assert not torch.equal(before[name], param.detach()), f"{name} did not train"


# --------------------------------------------------------------------------------------------- several optimizers


class ManualModel(UnfreezeModel):
    """Manual optimization; ``layout`` says which parameters each optimizer gets."""

    LAYOUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "all": ("all",),
        "head|backbone": ("head", "backbone"),
        "all|aux": ("all", "aux"),
        "all|backbone": ("all", "backbone"),
        "head|aux": ("head", "aux"),
    }

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.aux = nn.Linear(2, 2)
        self.layout = layout

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.steps_run += 1
        x, y = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss = F.cross_entropy(self(x), y) + self.aux(torch.ones(1, 2)).square().mean()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        parts = {
            "all": [p for n, p in self.named_parameters() if not n.startswith("aux.")],
            "head": list(self.head.parameters()),
            "backbone": list(self.backbone.parameters()),
            "aux": list(self.aux.parameters()),
        }
        return [torch.optim.SGD(parts[part], lr=0.1) for part in self.LAYOUTS[self.layout]]


@pytest.mark.parametrize(
    ("layout", "optimizer_index", "target"),
    [("all", None, 0), ("head|backbone", 1, 1), ("head|backbone", None, 1), ("all|aux", 0, 0), ("all|aux", None, 0)],
)
def test_manual_optimization_releases_into_the_chosen_optimizer(
    layout: str, optimizer_index: int | None, target: int
) -> None:
    torch.manual_seed(0)
    model, probe = ManualModel(layout), EpochProbe()
    before = clone_params(model)
    trainer = fit(model, [unfreeze(optimizer_index=optimizer_index, bn="frozen"), probe])
    optimizers = trainer.optimizers
    assert [g.get("name") for g in optimizers[target].param_groups[1:]] == ["backbone.3", "backbone.1", "backbone.0"]
    for index, optimizer in enumerate(optimizers):
        if index != target:
            assert len(optimizer.param_groups) == 1
        backbone_ids = {id(p) for p in model.backbone.parameters()}
        in_first_group = {id(p) for p in optimizer.param_groups[0]["params"]}
        assert not in_first_group & backbone_ids
    groups = groups_by_name(optimizers[target])
    head_lr = optimizers[target].param_groups[0]["lr"]
    for name, factor in FACTORS.items():
        assert groups[name]["lr"] == pytest.approx(head_lr * factor, rel=1e-9)
    for name, param in model.named_parameters():
        module = next((m for m in FACTORS if inside(name, m)), None)
        if module is None:
            continue
        for epoch in range(3):
            assert probe.changed_in_epoch(name, epoch) == (epoch >= RELEASE_EPOCH[module]), (name, epoch)
        assert not torch.equal(before[name], param.detach())


@pytest.mark.parametrize(
    ("layout", "optimizer_index", "match"),
    [
        ("all|backbone", None, r"2 optimizers and 2 of them hold backbone parameters.*optimizer_index"),
        ("head|aux", None, r"2 optimizers and 0 of them hold backbone parameters.*optimizer_index"),
        ("head|backbone", 2, r"optimizer_index=2.*2 optimizer"),
    ],
)
def test_ambiguous_or_wrong_optimizer_choice_raises_before_training(
    layout: str, optimizer_index: int | None, match: str
) -> None:
    torch.manual_seed(0)
    model = ManualModel(layout)
    with pytest.raises(ValueError, match=match):
        fit(model, [unfreeze(optimizer_index=optimizer_index)])
    assert model.steps_run == 0


# --------------------------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({1: "bakbone.3"}, ["'bakbone.3'", "releases[1]", "'backbone.3'"]),
        ({1: "backbone.3", 2: ["backbone.9"]}, ["'backbone.9'", "releases[2]", "'backbone.3'"]),
        ({1: "backbone.lay*"}, ["'backbone.lay*'", "releases[1]"]),
        ({1: "head"}, ["'head'", "releases[1]", "outside the backbone"]),
        ({1: ["backbone.3", "head.0"]}, ["'head.0'", "outside the backbone"]),
        ({1: "backbone.3", 2: "backbone.3"}, ["'backbone.3'", "twice"]),
        ({1: ["backbone.1", "backbone.1"]}, ["'backbone.1'", "twice"]),
        ({1: "backbone.3", 2: "backbone.3.0"}, ["'backbone.3.0'", "'backbone.3'", "inside"]),
        ({1: "backbone.3.0", 2: "backbone.3"}, ["'backbone.3.0'", "'backbone.3'", "inside"]),
        ({1: ["backbone.1", "backbone.1.1"]}, ["'backbone.1.1'", "'backbone.1'", "inside"]),
        ({1: ["backbone.1.1", "backbone.1"]}, ["'backbone.1.1'", "'backbone.1'", "inside"]),
        ({1: "backbone.*", 2: "backbone.[13]"}, ["releases[2]", "'backbone.[13]'"]),
        ({1: "backbone.2"}, ["releases[1]", "'backbone.2'", "no parameters"]),
        ({-1: "backbone.3"}, ["releases", "-1"]),
        ({1: "backbone.3", -2: "backbone.1"}, ["releases", "-2"]),
        ({1.5: "backbone.3"}, ["releases", "1.5"]),
        (["backbone.3"], ["releases", "['backbone.3']"]),
        ({}, ["releases", "empty schedule"]),
        ({1: ""}, ["releases[1]", "''"]),
    ],
)
def test_schedule_errors_raise_before_the_first_training_step(schedule: Any, expected: list[str]) -> None:
    model = build_model()
    with pytest.raises(ValueError) as error:
        fit(model, [GradualUnfreeze(what=Schedule(schedule))])
    message = str(error.value)
    assert all(part in message for part in expected), message
    assert model.steps_run == 0


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("bakbone", ["backbone", "'bakbone'", "'backbone'"]), ("backbone.7", ["backbone", "'backbone.7'"])],
)
def test_a_missing_backbone_raises_before_the_first_training_step(backbone: str, expected: list[str]) -> None:
    model = build_model()
    with pytest.raises(ValueError) as error:
        fit(model, [GradualUnfreeze(backbone=backbone)])
    message = str(error.value)
    assert all(part in message for part in expected), message
    assert model.steps_run == 0


@pytest.mark.parametrize(
    ("argument", "value", "build"),
    [
        ("lr_scale", 0, lambda v: GradualUnfreeze(lr_scale=v)),
        ("lr_scale", -0.1, lambda v: GradualUnfreeze(lr_scale=v)),
        ("lr_scale", float("nan"), lambda v: GradualUnfreeze(lr_scale=v)),
        ("lr_scale", float("inf"), lambda v: GradualUnfreeze(lr_scale=v)),
        ("decay", 0.0, lambda v: Blocks(decay=v)),
        ("decay", -2, lambda v: Schedule({1: "backbone.3"}, decay=v)),
        ("decay", float("nan"), lambda v: Blocks(decay=v)),
        ("first", -1, lambda v: Every(first=v)),
        ("epochs", 0, lambda v: Every(epochs=v)),
        ("steps", 0, lambda v: Every(steps=v)),
        ("decay", 0.0, lambda v: LayerDecay(v)),
        ("decay", float("inf"), lambda v: LayerDecay(v)),
        ("per_release", 0, lambda v: Blocks(per_release=v)),
        ("warmup_steps", -1, lambda v: GradualUnfreeze(warmup_steps=v)),
        ("max_step", 0.0, lambda v: GradualUnfreeze(max_step=v)),
        ("max_step", -0.01, lambda v: GradualUnfreeze(max_step=v)),
        ("max_step", "last", lambda v: GradualUnfreeze(max_step=v)),
        ("max_step", True, lambda v: GradualUnfreeze(max_step=v)),
    ],
)
def test_bad_numbers_raise_at_construction(argument: str, value: float, build: Any) -> None:
    with pytest.raises(ValueError, match=rf"`{argument}`.*{re.escape(repr(value))}"):
        build(value)


def fake_trainer(strategy_name: str, tensor_parallel_size: int = 1) -> Any:
    import lightning.pytorch.strategies as strategies

    strategy = object.__new__(getattr(strategies, strategy_name))  # not set up: no processes needed
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel_size)}
    return type("FakeTrainer", (), {"strategy": strategy, "max_epochs": 3, "callbacks": []})()


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_strategies_that_cannot_add_param_groups_are_refused_naming_the_way(strategy_name: str) -> None:
    model = build_model()
    with pytest.raises(TypeError, match=rf"{strategy_name}.*`ModelParallelStrategy` with FSDP2"):
        GradualUnfreeze().setup(fake_trainer(strategy_name), model, "fit")
    assert all(p.requires_grad for p in model.parameters())  # refused before touching anything


def test_tensor_parallelism_is_refused() -> None:
    with pytest.raises(TypeError, match=r"data parallelism only.*tensor_parallel_size=2"):
        GradualUnfreeze().setup(fake_trainer("ModelParallelStrategy", tensor_parallel_size=2), build_model(), "fit")


# --------------------------------------------------------------------------------------------- dry run


def table_rows(table: str) -> list[list[str]]:
    """The rows of a plan table, without the notes under it."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:]]
    return [row for row in rows if len(row) >= 3]


def test_dry_run_shows_the_plan_without_training() -> None:
    model = build_model()
    before = clone_state(model)
    modes = {n: m.training for n, m in model.named_modules()}
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3", 4: "backbone.1.*"}, decay=0.4), lr_scale=0.3, bn="train")
    table = callback.dry_run(model, max_epochs=3)
    assert table.splitlines()[0].split()[:5] == ["epoch", "released", "parameters", "lr", "x"]
    assert [row[:4] for row in table_rows(table)[:3]] == [
        ["1", "backbone.3", f"{module_numel(model, 'backbone.3'):,}", "0.3"],
        ["4 (>= max_epochs: never)", "backbone.1.0", f"{module_numel(model, 'backbone.1.0'):,}", "0.12"],
        ["backbone.1.1", f"{module_numel(model, 'backbone.1.1'):,}", "0.12", "train"],  # released at the same epoch
    ]
    rest = module_numel(model, "backbone.0")
    assert f"Never released (stays frozen): {rest:,} parameters of 'backbone'." in table
    assert_same_nested(clone_state(model), before)
    assert all(p.requires_grad for p in model.parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.steps_run == 0


@pytest.mark.parametrize(
    ("max_step", "note"),
    [
        ("auto", f"release k (from 0) trains at {NEAR_DECAY:g}**k x the lr above, less if its first step moves more"),
        ("released", "max_step='released': a release's rate may be scaled down after its first step"),
        (None, None),
    ],
)
def test_dry_run_says_what_max_step_may_change_in_the_planned_rates(max_step: str | None, note: str | None) -> None:
    table = GradualUnfreeze(what=Blocks(per_release=1), max_step=max_step).dry_run(build_model(), max_epochs=5)
    if note is None:
        assert "max_step" not in table
    else:
        assert any(line.startswith("max_step=") and note in line for line in table.splitlines())


@pytest.mark.parametrize(
    ("adapt", "bn", "max_step", "said"),
    [
        ("auto", "auto", "auto", " (far from the source: before the first step, unless Adam or AdamW cannot"),
        ("auto", "auto", None, "."),
        (None, "auto", "auto", None),
        ("auto", "train", "auto", None),
    ],
)
def test_dry_run_says_when_adapt_auto_re_estimates_the_statistics(
    adapt: str | None, bn: str, max_step: str | None, said: str | None
) -> None:
    table = GradualUnfreeze(adapt=adapt, bn=bn, max_step=max_step).dry_run(build_model(), max_epochs=5)
    note = "adapt='auto': as norm layers start training, the backbone's take the training data's statistics"
    lines = [line for line in table.splitlines() if line.startswith(note)]
    assert lines == ([] if said is None else [lines[0]])
    assert said is None or lines[0].startswith(note + said)


@pytest.mark.parametrize("on_loss_rise", ["retry", "warn"])
@pytest.mark.parametrize("first", [1, 0])
def test_dry_run_says_what_a_loss_rise_after_the_first_release_or_a_divergence_changes(
    on_loss_rise: str, first: int
) -> None:
    callback = GradualUnfreeze(when=Every(first=first), on_loss_rise=on_loss_rise)  # type: ignore[arg-type]
    lines = [line for line in callback.dry_run(build_model(), max_epochs=5).splitlines() if line.startswith("on_loss_")]
    unjudged = (
        " The first release comes at the first step, with no loss before it: the first check cannot judge it, and"
        " the fit's first batches, which the second measures against, follow it."
    )
    assert lines == (
        [
            "on_loss_rise='retry': if the training loss rises after the first release (1.1x over its first epoch, at"
            " most 50 batches), it is undone and retried at 0.1 x the lr above, as every later release; if, after a"
            " release, the loss over an epoch's last batches ends 1.1x above the fit's first, the fit goes back to"
            " its lowest epoch and every release trains on at 0.1 x." + (unjudged if first == 0 else "")
        ]
        if on_loss_rise == "retry"
        else []
    )


def test_resnet18_default_schedule_releases_from_layer4_down_and_keeps_frozen_statistics() -> None:
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    model = UnfreezeModel(backbone=(resnet, 512), record=False)

    def callback() -> GradualUnfreeze:
        return GradualUnfreeze(what=Blocks(granularity="stage", per_release=1), bn="train")

    releases = callback().dry_run(model).partition("Releases:\n")[2]
    assert [row[:2] for row in table_rows(releases)] == [
        ["1", "backbone.layer4"],
        ["2", "backbone.layer3"],
        ["3", "backbone.layer2"],
        ["4", "backbone.layer1"],
        ["5", "backbone.stem"],  # conv1 and bn1, as one block
    ]
    assert "Never released" not in releases
    probe = EpochProbe()
    with pytest.warns(UserWarning, match="max_epochs"):
        trainer = fit(model, [callback(), probe], max_epochs=2, limit_train_batches=2)
    assert [g.get("name") for g in trainer.optimizers[0].param_groups[1:]] == ["backbone.layer4"]
    stats = [k for k in probe.states[0] if k.startswith("backbone.") and k.endswith("running_mean")]
    assert len(stats) == 20
    for key in stats:
        assert not probe.changed_in_epoch(key, 0), key
        assert probe.changed_in_epoch(key, 1) == key.startswith("backbone.layer4."), key
