"""BNFreezeCallback with a real Trainer: every guarantee of the contract, on the toy model and torchvision models.

Which statistics a norm layer used is judged from its output on every training batch (see
``tests.helpers.NormForwardRecorder``); the baselines (no callback, or a naive ``.eval()`` at train
start) show that the same checks fail without the library.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, Callback, ModelCheckpoint
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnfreeze import BNFreezeCallback, is_norm_frozen
from tests.helpers import (
    ARCHS,
    ClassifierModule,
    FitRun,
    ImageDataModule,
    NaiveEvalFreeze,
    ToyModule,
    build_module,
    changed,
    classify_output,
    eval_mode_warnings,
    image_batch,
    is_tracking_norm,
    layer_identities,
    make_trainer,
    norm_layers,
    run_fit,
    snapshot_buffers,
    snapshot_params,
    toy_backbone,
)

# Part of each backbone to freeze, as a glob for the callback and as the list of modules it matches.
PARTIAL = {
    "toy": ("backbone.stem", ["backbone.stem"]),
    "resnet18": ("backbone.layer[12]", ["backbone.layer1", "backbone.layer2"]),
    "mobilenet_v2": ("backbone.features.[1-3]", ["backbone.features.1", "backbone.features.2", "backbone.features.3"]),
    "efficientnet_b0": ("backbone.features.[2-3]", ["backbone.features.2", "backbone.features.3"]),
}


def assert_frozen_throughout(run: FitRun, layers: list[str], batches: int, affine_frozen: bool = True) -> None:
    """Every recorded training forward of ``layers`` used running statistics; buffers (and affine) unchanged."""
    assert layers, "nothing to check"
    verdicts = run.verdicts()
    assert {name: verdicts.get(name) for name in layers} == {name: ["running"] * batches for name in layers}
    assert run.buffers_changed(layers) == []
    if affine_frozen:
        assert run.affine_changed(layers) == []
        assert not any(p.requires_grad for name in layers for p in run.model.get_submodule(name).parameters())
    assert eval_mode_warnings(run.warnings) == []


def moved_statistics(before: dict[str, Tensor], after: dict[str, Tensor]) -> set[str]:
    """The layers whose running mean and running variance both changed."""
    moved = changed(before, after)
    return {key.rpartition(".")[0] for key in moved if key.endswith(".running_mean")} & {
        key.rpartition(".")[0] for key in moved if key.endswith(".running_var")
    }


def assert_trained_normally(run: FitRun, layers: list[str], batches: int) -> None:
    """Every recorded training forward of ``layers`` used batch statistics and each layer's statistics moved."""
    assert layers, "nothing to check"
    verdicts = run.verdicts()
    assert {name: verdicts.get(name) for name in layers} == {name: ["batch"] * batches for name in layers}
    assert moved_statistics(run.buffers_before, snapshot_buffers(run.model)) >= set(layers)


# --------------------------------------------------------------------------------------------- plain fit


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def frozen_run(arch: str) -> FitRun:
    return run_fit(build_module(arch), [BNFreezeCallback(modules="backbone")])


@pytest.fixture(scope="module")
def baseline_run(arch: str) -> FitRun:
    """The same fit without the callback."""
    return run_fit(build_module(arch), [])


def test_frozen_buffers_bitwise_unchanged(frozen_run: FitRun) -> None:
    assert frozen_run.buffers_changed() == []


def test_frozen_affine_unchanged_and_not_trainable(frozen_run: FitRun) -> None:
    assert frozen_run.affine_changed() == []
    assert not any(p.requires_grad for layer in norm_layers(frozen_run.model).values() for p in layer.parameters())
    trained = changed(frozen_run.params_before, dict(frozen_run.model.named_parameters()))
    assert {"head.weight", "head.bias"} <= set(trained)  # the model did train


def test_every_training_forward_used_running_statistics(frozen_run: FitRun) -> None:
    assert frozen_run.model.training_batches == [(0, 0), (0, 1)]
    assert_frozen_throughout(frozen_run, list(norm_layers(frozen_run.model)), batches=2)


def test_without_the_callback_the_same_checks_fail(baseline_run: FitRun) -> None:
    """The output judge and the snapshots do see batch statistics and moving buffers."""
    assert_trained_normally(baseline_run, list(norm_layers(baseline_run.model)), batches=2)
    assert baseline_run.affine_changed()


def test_layers_keep_identity_class_and_attributes(frozen_run: FitRun) -> None:
    """Same module objects, classes, momentum, track_running_stats, parameters and state_dict keys."""
    after = layer_identities(frozen_run.model)
    assert after.keys() == frozen_run.identities_before.keys()
    assert all(after[name].same_as(before) for name, before in frozen_run.identities_before.items())


def test_layers_are_released_after_fit(frozen_run: FitRun) -> None:
    model = frozen_run.model
    assert not any(is_norm_frozen(layer) or "train" in vars(layer) for layer in norm_layers(model).values())
    model.train()
    assert all(layer.training for layer in norm_layers(model).values())


# --------------------------------------------------------------------------------------------- paths that call .train()


class RetrainAfterValidation:
    """A LightningModule mixin overriding ``on_validation_model_train`` as the Lightning docs show."""

    def on_validation_model_train(self) -> None:
        self.trainer.model.train()


def _validate_first(trainer: Any, model: ClassifierModule, datamodule: ImageDataModule) -> None:
    trainer.validate(model, datamodule=datamodule, verbose=False)


@dataclass(frozen=True)
class TrainingPath:
    """A way training reaches the frozen layers; ``adversarial`` ones defeat a naive ``.eval()``."""

    name: str
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    train_batches: int = 2
    val_batches: int = 0
    before_fit: Callable[..., None] | None = None
    adversarial: bool = False

    def __str__(self) -> str:
        return self.name


PATHS = [
    TrainingPath(
        "sanity_check_and_mid_epoch_validation",
        trainer_kwargs={"num_sanity_val_steps": 1, "val_check_interval": 0.5},
        train_batches=4,
        val_batches=1,
    ),
    TrainingPath("validate_before_fit", val_batches=1, before_fit=_validate_first),
    TrainingPath(
        "on_validation_model_train_calls_train",
        module_kwargs={"mixins": (RetrainAfterValidation,)},
        trainer_kwargs={"num_sanity_val_steps": 1, "val_check_interval": 0.5},
        train_batches=4,
        val_batches=1,
        adversarial=True,
    ),
    TrainingPath("train_at_epoch_start", module_kwargs={"user_hooks": ["train_at_epoch_start"]}, adversarial=True),
    TrainingPath("train_in_training_step", module_kwargs={"user_hooks": ["train_in_step"]}, adversarial=True),
    TrainingPath(
        "lightning_unfreeze_at_epoch_start", module_kwargs={"user_hooks": ["unfreeze_at_epoch_start"]}, adversarial=True
    ),
]


def _run_path(arch: str, path: TrainingPath, callback: Any) -> FitRun:
    return run_fit(
        build_module(arch, **path.module_kwargs),
        [callback],
        datamodule=ImageDataModule(path.train_batches, path.val_batches),
        before_fit=path.before_fit,
        **path.trainer_kwargs,
    )


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_frozen_through_every_path(arch: str, path: TrainingPath) -> None:
    run = _run_path(arch, path, BNFreezeCallback(modules="backbone"))
    assert len(run.model.training_batches) == path.train_batches
    assert_frozen_throughout(run, list(norm_layers(run.model)), batches=path.train_batches)


@pytest.mark.parametrize("path", [p for p in PATHS if p.adversarial], ids=str)
def test_naive_eval_freeze_is_undone_on_the_same_path(path: TrainingPath) -> None:
    """Baseline: ``.eval()`` at train start does not survive these paths, so the test above can fail."""
    run = _run_path("toy", path, NaiveEvalFreeze("backbone"))
    assert "batch" in run.verdicts()["backbone.stem.1"]
    assert run.buffers_changed()


# --------------------------------------------------------------------------------------------- partial freezing


def _freeze_by_hand(model: ClassifierModule, names: list[str]) -> ClassifierModule:
    for name in names:
        model.get_submodule(name).requires_grad_(False)
    return model


@pytest.mark.parametrize("mode", ["explicit_glob", "auto_requires_grad"])
def test_other_norm_layers_behave_exactly_as_without_the_library(arch: str, mode: str) -> None:
    """Compared with the run where only a one-off ``.eval()`` touched the frozen layers, bitwise."""
    glob, names = PARTIAL[arch]
    if mode == "explicit_glob":
        run = run_fit(build_module(arch), [BNFreezeCallback(modules=glob)])
        baseline = run_fit(build_module(arch), [NaiveEvalFreeze(names)])
    else:
        run = run_fit(_freeze_by_hand(build_module(arch), names), [BNFreezeCallback()])
        baseline = run_fit(_freeze_by_hand(build_module(arch), names), [NaiveEvalFreeze(names)])
    frozen = list(norm_layers(run.model, names))
    others = [name for name in norm_layers(run.model) if name not in frozen]
    assert_frozen_throughout(run, frozen, batches=2)
    assert_trained_normally(run, others, batches=2)
    assert changed(snapshot_buffers(run.model), snapshot_buffers(baseline.model)) == []
    assert changed(dict(run.model.named_parameters()), dict(baseline.model.named_parameters())) == []


def test_train_affine_freezes_statistics_and_trains_affine(arch: str) -> None:
    run = run_fit(build_module(arch), [BNFreezeCallback(modules="backbone", train_affine=True)])
    layers = list(norm_layers(run.model))
    assert_frozen_throughout(run, layers, batches=2, affine_frozen=False)
    assert all(p.requires_grad for name in layers for p in run.model.get_submodule(name).parameters())
    # every layer's affine parameters trained (weights may round back to 1.0 after tiny clipped steps)
    assert {key.rpartition(".")[0] for key in run.affine_changed()} == set(layers)


# --------------------------------------------------------------------------------------------- auto mode


class UnfreezeStemAtEpoch1(BaseFinetuning):
    def freeze_before_training(self, pl_module: ClassifierModule) -> None:
        self.freeze(pl_module.backbone.stem, train_bn=False)

    def finetune_function(self, pl_module: ClassifierModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone.stem, optimizer)


class BackboneFinetuningFreezingNorms(BackboneFinetuning):
    """``BackboneFinetuning`` freezes with ``train_bn=True`` (norm parameters stay trainable); this one does not."""

    def freeze_before_training(self, pl_module: ClassifierModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)


def _epoch(epoch: int) -> Callable[[Any], bool]:
    return lambda tag: tag[0] == epoch


class BufferProbe(Callback):
    """Snapshots the norm buffers at the end of each training epoch."""

    def __init__(self) -> None:
        self.buffers: list[dict[str, Tensor]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: ClassifierModule) -> None:
        self.buffers.append(snapshot_buffers(pl_module))


def _fit_two_epochs(model: ClassifierModule, callbacks: list[Any]) -> tuple[FitRun, BufferProbe]:
    probe = BufferProbe()
    return run_fit(model, [*callbacks, probe], max_epochs=2), probe


@pytest.mark.parametrize(
    ("arch", "unfreezer"), [*((arch, "module_hook") for arch in ARCHS), ("toy", "base_finetuning")]
)
def test_auto_mode_releases_a_layer_once_its_parameters_are_unfrozen(arch: str, unfreezer: str) -> None:
    """Frozen by hand, unfrozen at epoch 1's start: running statistics in epoch 0, trains from epoch 1."""
    names = PARTIAL[arch][1]
    if unfreezer == "module_hook":
        model = _freeze_by_hand(build_module(arch, release_at_epoch={1: names[0]}), [names[0]])
        callbacks: list[Any] = [BNFreezeCallback()]
    else:
        model = build_module(arch, optimize_trainable_only=True)
        callbacks = [UnfreezeStemAtEpoch1(), BNFreezeCallback()]
    run, probe = _fit_two_epochs(model, callbacks)
    layers = list(norm_layers(run.model, names[0]))
    epoch0, epoch1 = run.verdicts(_epoch(0)), run.verdicts(_epoch(1))
    assert {name: epoch0[name] for name in layers} == {name: ["running"] * 2 for name in layers}
    assert {name: epoch1[name] for name in layers} == {name: ["batch"] * 2 for name in layers}
    initial = {k: v for k, v in run.buffers_before.items() if k.rpartition(".")[0] in layers}
    assert changed(initial, {k: probe.buffers[0][k] for k in initial}) == []
    assert moved_statistics(probe.buffers[0], probe.buffers[1]) >= set(layers)
    assert eval_mode_warnings(run.warnings) == []


@pytest.mark.parametrize(
    ("finetuning", "modules", "epoch0", "epoch1"),
    [
        (BackboneFinetuning, "backbone", "running", "running"),
        (BackboneFinetuningFreezingNorms, None, "running", "batch"),
        # BackboneFinetuning's freeze leaves norm parameters trainable: with Keras semantics those layers train
        (BackboneFinetuning, None, "batch", "batch"),
    ],
    ids=["explicit", "auto_norms_frozen", "auto_norms_trainable"],
)
def test_composes_with_backbone_finetuning(finetuning: type, modules: str | None, epoch0: str, epoch1: str) -> None:
    """``unfreeze_backbone_at_epoch=1``: the backbone's norm layers in epoch 0 and once it is released."""
    model = build_module("toy", optimize_trainable_only=True)
    run, probe = _fit_two_epochs(model, [finetuning(unfreeze_backbone_at_epoch=1), BNFreezeCallback(modules)])
    layers = list(norm_layers(run.model))
    for epoch, expected, before, after in [
        (0, epoch0, run.buffers_before, probe.buffers[0]),
        (1, epoch1, probe.buffers[0], probe.buffers[1]),
    ]:
        verdicts = run.verdicts(_epoch(epoch))
        assert {name: verdicts[name] for name in layers} == {name: [expected] * 2 for name in layers}
        if expected == "running":
            assert changed(before, after) == []
        else:
            assert moved_statistics(before, after) == set(layers)
    if modules is not None:
        assert run.affine_changed() == []
    assert all(p.requires_grad for p in run.model.backbone.stem[0].parameters())  # the backbone was released
    assert eval_mode_warnings(run.warnings) == []


# --------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def checkpoints(arch: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[FitRun, dict[str, Path]]:
    """A 1-epoch run of 4 batches saving an epoch-end checkpoint and one after each step."""
    root = tmp_path_factory.mktemp(f"ckpt-{arch}")
    callbacks = [
        BNFreezeCallback(modules="backbone"),
        ModelCheckpoint(dirpath=root / "epoch", save_top_k=-1),
        ModelCheckpoint(dirpath=root / "step", filename="{step}", every_n_train_steps=1, save_top_k=-1),
    ]
    run = run_fit(build_module(arch), callbacks, ImageDataModule(train_batches=4), enable_checkpointing=True)
    return run, {"epoch_end": root / "epoch" / "epoch=0-step=4.ckpt", "mid_epoch": root / "step" / "step=2.ckpt"}


@pytest.mark.parametrize(("checkpoint", "batches_after_resume"), [("epoch_end", 4), ("mid_epoch", 2 + 4)])
def test_resume_keeps_layers_frozen(arch: str, checkpoints: tuple, checkpoint: str, batches_after_resume: int) -> None:
    first, paths = checkpoints
    assert_frozen_throughout(first, list(norm_layers(first.model)), batches=4)
    saved = torch.load(paths[checkpoint], weights_only=True)["state_dict"]
    assert changed(first.buffers_before, {k: saved[k] for k in first.buffers_before}) == []

    resumed = run_fit(
        build_module(arch),
        [BNFreezeCallback(modules="backbone")],
        ImageDataModule(train_batches=4),
        ckpt_path=str(paths[checkpoint]),
        max_epochs=2,
    )
    assert changed(first.buffers_before, resumed.buffers_before) == []  # same initial statistics
    assert len(resumed.model.training_batches) == batches_after_resume
    assert_frozen_throughout(resumed, list(norm_layers(resumed.model)), batches=batches_after_resume)


def test_resume_from_epoch_end_continues_as_the_uninterrupted_run(arch: str, checkpoints: tuple) -> None:
    _, paths = checkpoints
    datamodule = ImageDataModule(train_batches=4)
    uninterrupted = run_fit(build_module(arch), [BNFreezeCallback(modules="backbone")], datamodule, max_epochs=2)
    resumed = run_fit(
        build_module(arch),
        [BNFreezeCallback(modules="backbone")],
        datamodule,
        ckpt_path=str(paths["epoch_end"]),
        max_epochs=2,
    )
    assert changed(uninterrupted.model.state_dict(), resumed.model.state_dict()) == []
    assert resumed.verdicts() == uninterrupted.verdicts(_epoch(1))


# --------------------------------------------------------------------------------------------- special layers


class ThirdPartyBatchNorm(_BatchNorm):
    """A ``_BatchNorm`` subclass as other libraries define them."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SpecialNormBackbone(nn.Module):
    """SyncBatchNorm, a Lazy BN, a tracking InstanceNorm2d without affine and a third-party subclass,
    each behind its own conv of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.sync = nn.SyncBatchNorm(8)
        self.lazy = nn.LazyBatchNorm2d()
        self.instance = nn.InstanceNorm2d(8, track_running_stats=True)
        self.third_party = ThirdPartyBatchNorm(8)
        self.convs = nn.ModuleList(nn.Conv2d(3, 8, 3, padding=1) for _ in range(4))
        with torch.no_grad():
            self(image_batch())  # materialise the lazy layer, as torch recommends

    def forward(self, x: Tensor) -> Tensor:
        norms = (self.sync, self.lazy, self.instance, self.third_party)
        out = sum(norm(conv(x)) for norm, conv in zip(norms, self.convs, strict=True))
        return F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1)


def special_norm_module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(SpecialNormBackbone(), 8)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_special_norm_layers_are_frozen(mode: str) -> None:
    model = special_norm_module()
    if mode == "auto":
        model.backbone.requires_grad_(False)  # the affine-less InstanceNorm follows `backbone`
    run = run_fit(model, [BNFreezeCallback(modules="backbone" if mode == "explicit" else None)])
    layers = list(norm_layers(run.model))
    assert layers == [f"backbone.{name}" for name in ("sync", "lazy", "instance", "third_party")]
    assert_frozen_throughout(run, layers, batches=2)
    after = layer_identities(run.model)
    assert all(after[name].same_as(before) for name, before in run.identities_before.items())


def test_special_norm_layers_without_the_callback_use_batch_statistics() -> None:
    run = run_fit(special_norm_module(), [])
    assert_trained_normally(run, list(norm_layers(run.model)), batches=2)


def test_lazy_layer_frozen_before_its_first_forward() -> None:
    """Not materialised when the fit starts: frozen all the same, with the statistics it starts with."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LazyBatchNorm2d(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ClassifierModule(backbone, 8)
    run = run_fit(model, [BNFreezeCallback(modules="backbone")])
    layer = model.backbone[1]
    assert run.verdicts() == {"backbone.1": ["running", "running"]}
    assert torch.equal(layer.running_mean, torch.zeros(8)) and torch.equal(layer.running_var, torch.ones(8))
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert eval_mode_warnings(run.warnings) == []


# --------------------------------------------------------------------------------------------- torch.compile


def _reference_forward(module: nn.Module, x: Tensor, statistics: str) -> Tensor:
    """The toy backbone computed by hand, every norm layer with running or with batch statistics."""
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _reference_forward(child, x, statistics)
        return x
    if is_tracking_norm(module):
        running = statistics == "running"
        mean, var = (module.running_mean, module.running_var) if running else (None, None)
        return F.batch_norm(x, mean, var, module.weight, module.bias, not running, 0.0, module.eps)
    return module(x)


class CompiledToyModule(ClassifierModule):
    """The toy backbone wrapped in ``torch.compile`` (the ``aot_eager`` backend: dynamo and AOTAutograd
    capture the graph, and with it the norm layers' mode, without inductor's slow C++ build)."""

    def __init__(self) -> None:
        super().__init__(toy_backbone(), 8, record=False)
        self.backbone = torch.compile(self.backbone, backend="aot_eager")
        self.verdicts: list[str] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        eager = self.backbone._orig_mod
        with torch.no_grad():
            references = {stats: _reference_forward(eager, x, stats) for stats in ("running", "batch")}
        features = self.backbone(x)
        self.verdicts.append(classify_output(features, references, "the compiled backbone"))
        return F.cross_entropy(self.head(features), y)


@pytest.mark.parametrize(("with_callback", "expected"), [(True, "running"), (False, "batch")])
def test_compiled_backbone(with_callback: bool, expected: str) -> None:
    torch.manual_seed(0)
    model = CompiledToyModule()
    assert list(norm_layers(model)) == ["backbone._orig_mod.stem.1", "backbone._orig_mod.block.1"]
    callbacks = [BNFreezeCallback(modules="backbone")] if with_callback else []
    run = run_fit(model, callbacks, ImageDataModule(train_batches=2, val_batches=1), num_sanity_val_steps=1)
    assert model.verdicts == [expected] * 2
    assert bool(run.buffers_changed()) == (expected == "batch")
    assert eval_mode_warnings(run.warnings) == []


# --------------------------------------------------------------------------------------------- Lightning's warning


@pytest.mark.skipif(
    not RequirementCache("lightning>=2.5.5"), reason="Lightning warns about modules in eval mode from 2.5.5 on"
)
def test_eval_mode_warning_is_detected_when_a_layer_starts_in_eval() -> None:
    """Baseline for the warning checks above: a norm layer left in eval before fit does trip it."""
    run = run_fit(build_module("toy"), [], before_fit=lambda trainer, model, dm: model.backbone.stem[1].eval())
    assert len(eval_mode_warnings(run.warnings)) == 1


def test_no_eval_mode_warning_on_a_second_fit_of_the_same_model() -> None:
    model = build_module("toy")
    run_fit(model, [BNFreezeCallback(modules="backbone")])
    run = run_fit(model, [BNFreezeCallback(modules="backbone")])
    assert eval_mode_warnings(run.warnings) == []
    assert run.verdicts(_epoch(0))["backbone.stem.1"] == ["running"] * 4  # 2 batches from each fit


class FailsAtSecondBatch:
    fail = True

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.fail and batch_idx == 1:
            raise RuntimeError("user error in training_step")
        return super().training_step(batch, batch_idx)  # type: ignore[misc]


def test_layers_are_released_when_fit_fails() -> None:
    """Lightning calls no ``teardown`` hook after an exception: the layers must not stay frozen for good."""
    model = build_module("toy", mixins=(FailsAtSecondBatch,))
    with pytest.raises(RuntimeError, match="user error"):
        run_fit(model, [BNFreezeCallback(modules="backbone")])
    assert not any(is_norm_frozen(layer) for layer in norm_layers(model).values())
    # the next fit, without the callback, is an ordinary one
    model.fail = False
    model.recorder.records.clear()
    run = run_fit(model, [])
    assert_trained_normally(run, list(norm_layers(model)), batches=2)
    assert eval_mode_warnings(run.warnings) == []


# --------------------------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("arch", "modules", "closest"),
    [
        ("toy", "backbone.stm", "backbone.stem"),
        ("toy", ["backbone", "backbone.blocks*"], "backbone.block"),
        ("resnet18", "backbone.layer5", "backbone.layer4"),
        ("mobilenet_v2", "backbone.featurs", "backbone.features"),
        ("efficientnet_b0", "backbone.features.9", "backbone.features.8"),
    ],
)
def test_unknown_module_raises_before_training(arch: str, modules: Any, closest: str) -> None:
    model = build_module(arch)
    bad = modules if isinstance(modules, str) else modules[-1]
    with pytest.raises(ValueError, match="`modules`") as error:
        run_fit(model, [BNFreezeCallback(modules=modules)])
    assert repr(bad) in str(error.value)
    assert f"Closest existing names: {closest!r}" in str(error.value)
    assert model.training_batches == []
    assert not any(is_norm_frozen(layer) for layer in norm_layers(model).values())


def test_train_affine_without_modules_raises_at_construction() -> None:
    with pytest.raises(ValueError, match="train_affine"):
        BNFreezeCallback(train_affine=True)


def test_train_affine_that_is_no_bool_raises_at_construction() -> None:
    with pytest.raises(ValueError, match=r"`train_affine` must be True or False, got 'false'"):
        BNFreezeCallback(modules="backbone", train_affine="false")  # type: ignore[arg-type]


@pytest.mark.parametrize("modules", [None, "backbone"])
def test_model_without_norm_layers_warns_once_and_trains(modules: str | None) -> None:
    torch.manual_seed(0)
    model = ToyModule(norm=False)
    params_before = snapshot_params(model)
    with pytest.warns(UserWarning, match="no BatchNorm") as caught:
        make_trainer([BNFreezeCallback(modules=modules)]).fit(model, datamodule=ImageDataModule())
    assert len([w for w in caught if "BNFreezeCallback" in str(w.message)]) == 1
    assert model.training_batches == [(0, 0), (0, 1)]
    assert set(changed(params_before, snapshot_params(model))) == set(params_before)


# --------------------------------------------------------------------------------------------- LightningCLI


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")  # Lightning's use of jsonargparse
def test_lightning_cli_yaml_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["train.py"])  # not pytest's arguments
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  devices: 1
  callbacks:
    - class_path: lightning_bnfreeze.BNFreezeCallback
      init_args:
        modules: backbone
"""
    )
    cli = LightningCLI(ToyModule, ImageDataModule, args=["--config", str(config)], run=False, save_config_callback=None)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, BNFreezeCallback)]
    assert len(callbacks) == 1
    assert callbacks[0].modules == ["backbone"]
    assert callbacks[0].train_affine is False
    run = run_fit(cli.model, trainer=cli.trainer, datamodule=cli.datamodule)
    assert_frozen_throughout(run, list(norm_layers(cli.model)), batches=2)


@pytest.mark.parametrize(("lr", "warns"), [(1.0, True), (1e-7, False)])
def test_frozen_statistics_under_a_large_first_step_are_warned_about_in_one_line(lr: float, warns: bool) -> None:
    """Frozen statistics with trainable weights around them: the run says when the first step is one the
    real-weights benchmark saw collapse (relative change above AUTO_STEP), and nothing at a small step."""
    from lightning_bnfreeze.step_size import AUTO_STEP

    model = build_module("toy", lr=lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([BNFreezeCallback(modules="backbone", train_affine=True)], max_steps=3).fit(
            model, datamodule=ImageDataModule()
        )
    lines = [str(w.message) for w in caught if "collapsed to chance" in str(w.message)]
    assert len(lines) == (1 if warns else 0)
    if warns:
        assert lines[0].startswith("BNFreezeCallback: the first step moved the trainable weights of ['backbone'] by")
        assert f"(> {AUTO_STEP:.1%})" in lines[0] and "Lower their learning rate" in lines[0]
