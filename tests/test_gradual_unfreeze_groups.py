"""GradualUnfreeze's param groups beyond the basics: the user's hyperparameters per origin group, layer-wise LR
decay, parameters named in a schedule, several optimizers, several instances resumed, a backbone built in
``configure_model``, and configuration errors that name the bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_bnfreeze import Blocks, Every, GradualUnfreeze, LayerDecay, Schedule
from tests.unfreeze_helpers import (
    FEATURES,
    STEPS_PER_EPOCH,
    BuiltLater,
    UnfreezeModel,
    build_model,
    clone_params,
    groups_by_name,
    make_trainer,
    param_ids,
    tiny_backbone,
)


def fit(model: UnfreezeModel, callbacks: list[Any], max_epochs: int = 3, **kwargs: Any) -> Any:
    trainer = make_trainer(callbacks, max_epochs=max_epochs, **kwargs)
    trainer.fit(model)
    return trainer


# --------------------------------------------------------------------------------------------- origin groups


class TwoGroupModel(UnfreezeModel):
    """AdamW with weight decay on weights, none on biases and norm parameters, as timm's and HF's helpers build it."""

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.named_parameters() if p.ndim <= 1]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.01,
        )


def test_released_parameters_keep_the_hyperparameters_of_the_group_they_came_from() -> None:
    torch.manual_seed(0)
    model = TwoGroupModel()
    trainer = fit(model, [GradualUnfreeze(what=Schedule({1: "backbone.3"}), lr_scale=0.5)], max_epochs=2)
    groups = groups_by_name(trainer.optimizers[0])
    assert list(groups) == ["decay", None, "backbone.3/decay", "backbone.3/group1"]
    weights, biases = groups["backbone.3/decay"], groups["backbone.3/group1"]
    assert weights["weight_decay"] == 0.05 and biases["weight_decay"] == 0.0
    assert weights["lr"] == biases["lr"] == pytest.approx(0.5 * 0.01)
    released = param_ids(model, "backbone.3")
    assert {id(p) for p in weights["params"]} | {id(p) for p in biases["params"]} == released
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim <= 1 for p in biases["params"])


class OwnBackboneRate(UnfreezeModel):
    """SGD with the head at 0.01 and the backbone's blocks in groups of their own at ``rates`` (block 3 at the first,
    the others at the last); ``warm_up``: a LambdaLR from 0, which sets every group's lr to 0 before the first step."""

    def __init__(self, *rates: float, warm_up: bool = False) -> None:
        super().__init__()
        self.rates, self.warm_up = rates, warm_up

    def configure_optimizers(self) -> Any:
        rest = [p for name, p in self.backbone.named_parameters() if not name.startswith("3.")]
        optimizer = torch.optim.SGD(
            [
                {"params": self.head.parameters(), "name": "head"},
                {"params": self.backbone[3].parameters(), "name": "backbone", "lr": self.rates[0]},
                {"params": rest, "name": "stem", "lr": self.rates[-1]},
            ],
            lr=0.01,
        )
        if not self.warm_up:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))]


@pytest.mark.parametrize(
    ("rates", "lr_scale", "warm_up", "said"),
    [
        ((1e-4,), 1.0, False, "For the group's rate, set lr_scale=0.01."),
        ((1e-4,), 1.0, True, "For the group's rate, set lr_scale=0.01."),  # read before the warm-up's zero
        ((1e-4, 1e-3), 1.0, False, "For rates that fall block by block, use what=LayerDecay(...)."),
        ((1e-4,), 0.01, False, None),  # the group's rate is what released blocks take
        ((0.01,), 0.5, False, None),  # at the head's rate: no rate of its own
    ],
)
def test_a_rate_of_the_backbone_s_own_group_that_released_blocks_do_not_take_is_named(
    rates: tuple[float, ...], lr_scale: float, warm_up: bool, said: str | None, recwarn: pytest.WarningsRecorder
) -> None:
    callback = GradualUnfreeze(what=Schedule({1: "backbone.3"}), lr_scale=lr_scale)
    trainer = fit(OwnBackboneRate(*rates, warm_up=warm_up), [callback])

    lines = [str(w.message) for w in recwarn if "set a learning rate for backbone parameters" in str(w.message)]
    if said is None:
        assert lines == []
    else:
        (line,) = lines
        assert "your param group(s) 'backbone' (lr 0.0001)" in line
        assert "train at the head's lr (0.01) times lr_scale (1) and the plan's factors" in line
        assert line.endswith(said)
    if not warm_up:
        assert groups_by_name(trainer.optimizers[0])["backbone.3"]["lr"] == pytest.approx(0.01 * lr_scale)


def test_contrast_a_single_origin_gives_one_group_named_after_the_part() -> None:
    model = build_model(optimizer="adam")
    trainer = fit(model, [GradualUnfreeze(what=Schedule({1: "backbone.3"}))], max_epochs=2)
    assert [g.get("name") for g in trainer.optimizers[0].param_groups] == ["head", "backbone.3"]


# --------------------------------------------------------------------------------------------- layer-wise decay


def test_layer_decay_releases_every_block_at_once_at_decaying_rates() -> None:
    model = build_model()
    unfreeze = GradualUnfreeze(what=LayerDecay(0.5, granularity="block"), when=Every(first=1), lr_scale=0.8)
    plan = unfreeze.plan(model)
    assert len(plan.releases) == 1 and unfreeze.when.times(1) == [1]
    [parts] = plan.releases
    assert [part.name for part in parts] == ["backbone.3", "backbone.1", "backbone.0"]
    assert [part.lr_factor for part in parts] == pytest.approx([1.0, 0.5, 0.25])
    trainer = fit(model, [unfreeze], max_epochs=2)
    groups = trainer.optimizers[0].param_groups
    head_lr = groups[0]["lr"]
    assert [(g["name"], g["lr"] / head_lr) for g in groups[1:]] == [
        ("backbone.3", pytest.approx(0.8)),
        ("backbone.1", pytest.approx(0.4)),
        ("backbone.0", pytest.approx(0.2)),
    ]
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_layer_decay_from_step_0_trains_everything_from_the_first_step() -> None:
    model = build_model()
    before = clone_params(model)
    fit(model, [GradualUnfreeze(what=LayerDecay(0.5), when=Every(first=0))], max_epochs=1)
    after = clone_params(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "a parameter did not train in epoch 0"


# --------------------------------------------------------------------------------------------- names


def test_a_schedule_may_name_a_parameter() -> None:
    model = build_model()
    trainer = fit(
        model, [GradualUnfreeze(what=Schedule({1: ["backbone.3.0.weight"], 2: "backbone.[3]"}))], max_epochs=3
    )
    groups = groups_by_name(trainer.optimizers[0])
    assert [id(p) for p in groups["backbone.3.0.weight"]["params"]] == [id(model.backbone[3][0].weight)]
    # a glob then releases what is left of the module
    assert {id(p) for p in groups["backbone.3"]["params"]} == param_ids(model, "backbone.3") - {
        id(model.backbone[3][0].weight)
    }


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Schedule({1: 42}), r"`releases\[1\]` is 42"),
        (lambda: Schedule({}), r"`releases` must map epochs.*got \{\}.*empty schedule"),
        (lambda: Schedule({"1.5": "backbone.3"}), r"`releases` has the key '1.5'.*integers >= 0"),
        (lambda: Schedule({1.5: "backbone.3"}), r"`releases` has the key 1.5.*integers >= 0"),
        (lambda: GradualUnfreeze(backbone=""), r"`backbone` must be the name of a module.*got ''"),
        (lambda: Blocks(granularity="layers"), r"`granularity` must be one of.*'layers'"),
        (lambda: LayerDecay(granularity="layers"), r"`granularity` must be one of.*'layers'"),
        (lambda: Blocks(per_release=0), r"`per_release` must be an integer >= 1, got 0"),
        (lambda: Blocks(names="backbone.3"), r"`names` must be a list of blocks.*'backbone.3'.*\['backbone.3'\]"),
        (lambda: Schedule({1: "backbone.3"}, unit="steps"), r"`unit` must be one of.*'steps'"),
        (lambda: GradualUnfreeze(bn="auto_train"), r"`bn` must be one of.*'auto_train'"),
        (lambda: GradualUnfreeze(trainable="*lora_*"), r"`trainable` must be a list.*'\*lora_\*'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("when", "match"),
    [
        (Every(epochs=2), r"what=Schedule\(.*when=Every\(epochs=2"),
        (Every(steps=3), r"what=Schedule\(.*when=Every\(steps=3"),
    ],
)
def test_a_schedule_with_a_trigger_raises_at_construction_naming_both(when: Every, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradualUnfreeze(what=Schedule({1: "backbone.3"}), when=when)


def test_contrast_a_schedule_alone_or_blocks_with_a_trigger_are_accepted() -> None:
    assert GradualUnfreeze(what=Schedule({1: "backbone.3"})).when.times(1) == [1]
    assert GradualUnfreeze(what=Blocks(names=["backbone.3"]), when=Every(epochs=2)).when.times(1) == [2]


def test_an_unknown_backbone_lists_the_top_level_modules_with_parameters() -> None:
    with pytest.raises(
        ValueError, match=r"`backbone` is 'encoder'.*top-level modules with parameters: 'backbone', 'head'"
    ):
        fit(build_model(), [GradualUnfreeze(backbone="encoder")])


class BuiltInSetup(UnfreezeModel):
    """Its backbone is built in ``setup``, which Lightning calls after the callbacks' ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        self.built = self.backbone
        del self.backbone

    def setup(self, stage: str) -> None:
        self.backbone = self.built


def test_a_backbone_built_in_the_module_s_setup_is_named_as_the_cause() -> None:
    with pytest.raises(ValueError, match=r"Built in the LightningModule's `setup`\? Callbacks set up before it"):
        fit(BuiltInSetup(), [GradualUnfreeze()])
    with pytest.raises(ValueError, match="Closest names: 'backbone'") as error:  # contrast: a typo
        fit(build_model(), [GradualUnfreeze(backbone="backbon")])
    assert "setup" not in str(error.value)


# --------------------------------------------------------------------------------------------- several optimizers


class TwoOptimizerModel(UnfreezeModel):
    """Optimizer 0 holds everything; optimizer 1 holds the backbone (manual optimization steps both)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.backbone.parameters(), lr=0.1)


def test_released_parameters_leave_every_other_optimizer() -> None:
    torch.manual_seed(0)
    model = TwoOptimizerModel()
    trainer = fit(model, [GradualUnfreeze(what=Schedule({1: "backbone.3"}), optimizer_index=1)], max_epochs=2)
    backbone = param_ids(model, "backbone")
    first, second = trainer.optimizers
    assert not any(id(p) in backbone for g in first.param_groups for p in g["params"])
    assert {id(p) for p in groups_by_name(second)["backbone.3"]["params"]} == param_ids(model, "backbone.3")


# --------------------------------------------------------------------------------------------- two instances


class TwoBackboneModel(UnfreezeModel):
    """Two backbones side by side, summed: ``backbone`` and ``backbone2``, each with its own GradualUnfreeze."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", batches_by_index=True)
        self.backbone2 = tiny_backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x) + self.backbone2(x))


def two_instances() -> list[GradualUnfreeze]:
    # interleaved releases: backbone.3, backbone2.3 (epoch 1), then backbone.1 (epoch 2)
    return [
        GradualUnfreeze(what=Schedule({1: "backbone.3", 2: "backbone.1"}), bn="train"),
        GradualUnfreeze(
            backbone="backbone2", what=Schedule({1: "backbone2.3", 2: ["backbone2.1", "backbone2.0"]}), bn="auto"
        ),
    ]


def test_two_instances_resume_their_groups_in_the_saved_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = TwoBackboneModel()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = fit(reference, [*two_instances(), checkpoint], max_epochs=4, enable_checkpointing=True)
    saved = [g["name"] for g in trainer.optimizers[0].param_groups]
    # the second instance's groups sit between the first's: resumed per instance, they would not
    assert saved == ["head", "backbone.3", "backbone2.3", "backbone.1", "backbone2.1", "backbone2.0"]

    torch.manual_seed(0)
    resumed = TwoBackboneModel()
    trainer2 = make_trainer([*two_instances()], max_epochs=4)
    trainer2.fit(resumed, ckpt_path=tmp_path / "epoch=2.ckpt")
    assert [g["name"] for g in trainer2.optimizers[0].param_groups] == saved
    for name, param in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], param, rtol=0, atol=0, msg=name)
    assert resumed.steps_run == STEPS_PER_EPOCH  # only the last epoch ran again


# --------------------------------------------------------------------------------------------- configure_model


def test_a_backbone_built_in_configure_model_is_planned_frozen_and_released() -> None:
    torch.manual_seed(0)
    model = BuiltLater("backbone", tiny_backbone)
    trainer = fit(model, [GradualUnfreeze(what=Schedule({1: "backbone.3"}))], max_epochs=2)
    groups = groups_by_name(trainer.optimizers[0])
    assert {id(p) for p in groups["backbone.3"]["params"]} == param_ids(model, "backbone.3")
    assert not any(p.requires_grad for p in model.backbone[0].parameters())
    assert isinstance(model.backbone[3][1], nn.BatchNorm2d) and model.backbone[3][1].num_features == FEATURES


# --------------------------------------------------------------------------------------------- what a user sees


RELEASE_RUN = """
import sys
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from tests.unfreeze_helpers import build_model, make_trainer
from lightning_bnfreeze import GradualUnfreeze, Schedule
bar = RichProgressBar() if sys.argv[1] == "rich" else TQDMProgressBar()
trainer = make_trainer([GradualUnfreeze(what=Schedule({1: "backbone.3"})), bar], max_epochs=2, enable_progress_bar=True)
trainer.fit(build_model())
"""


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_a_release_line_starts_a_line_of_its_own_under_the_progress_bar(bar: str) -> None:
    """Output redirected to a file (stdout and stderr together), as a batch job's log: the release line is
    printed through the bar, never glued to the bar's last state."""
    result = subprocess.run(
        [sys.executable, "-c", RELEASE_RUN, bar],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=True,
    )
    lines = result.stdout.replace("\r", "\n").splitlines()
    released = [line for line in lines if "GradualUnfreeze: epoch 1: released backbone.3" in line]
    assert len(released) == 1 and released[0].startswith("GradualUnfreeze:"), released


class ReorderedModel(UnfreezeModel):
    """Its backbone's children are registered in the reverse of the order its forward runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*reversed([nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)]))
        self.backbone_forward_order = [self.backbone[2], self.backbone[1], self.backbone[0]]
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
        self.example_input_array = torch.zeros(1, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.backbone_forward_order:
            x = layer(x)
        return self.head(x)


def test_blocks_in_another_order_than_the_forward_pass_are_reported() -> None:
    with pytest.warns(UserWarning, match=r"GradualUnfreeze: .*what=Blocks\(names=\["):
        fit(ReorderedModel(), [GradualUnfreeze(what=Blocks(granularity="block"))], max_epochs=1)


def test_contrast_blocks_in_forward_order_raise_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    model = build_model()
    model.example_input_array = model.x[:1]
    fit(model, [GradualUnfreeze(what=Blocks(granularity="block"))], max_epochs=1)
    assert not [w for w in recwarn if "names=[" in str(w.message)]


def test_a_checkpoint_of_the_previous_state_format_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"saved by lightning_bnfreeze 0\.2 or older"):
        GradualUnfreeze().load_state_dict({"released": [{"epoch": 1, "step": 4}], "adapted": False})
