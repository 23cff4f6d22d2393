"""Shared test utilities: output-based judging of norm forwards, snapshots, data, small LightningModules.

Everything here is independent of the library under test (norm layers are detected without
``lightning_bnfreeze``), so that a helper cannot hide a library bug.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4
IMAGE_SIZE = 32
BATCH_SIZE = 4
ARCHS = ("toy", "resnet18", "mobilenet_v2", "efficientnet_b0")
EVAL_MODE_WARNING = "module(s) in eval mode at the start of training"
STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
AFFINE_PARAMS = ("weight", "bias")

# --------------------------------------------------------------------------------------------- norm layers


def is_tracking_norm(module: nn.Module) -> bool:
    """A norm layer with running statistics (detected here, not by the library under test)."""
    if isinstance(module, _BatchNorm):
        return True
    return isinstance(module, _InstanceNorm) and module.track_running_stats


def norm_layers(model: nn.Module, under: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The tracking norm layers of ``model`` by name, optionally only those inside the named modules."""
    prefixes = [under] if isinstance(under, str) else under
    return {
        name: module
        for name, module in model.named_modules()
        if is_tracking_norm(module) and (prefixes is None or any(_is_inside(name, p) for p in prefixes))
    }


def _is_inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> None:
    """Give every norm layer distinctive running statistics, far from any batch's, and a non-zero count.

    With them, a forward with batch statistics is far from one with running statistics in every layer,
    whatever the other layers did (fresh statistics, 0 and 1, are what a normalised input has).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in norm_layers(model).values():
            if is_lazy(layer.running_mean):  # a Lazy layer before its first forward
                continue
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.5)
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
            layer.num_batches_tracked.fill_(3)


# --------------------------------------------------------------------------------------------- output judge


def reference_outputs(layer: nn.Module, x: Tensor, running_mean: Tensor, running_var: Tensor) -> dict[str, Tensor]:
    """What ``layer`` outputs for ``x`` when it normalises with the given running statistics / the batch's."""
    weight, bias, eps = layer.weight, layer.bias, layer.eps
    with torch.no_grad():
        if isinstance(layer, _InstanceNorm):
            running = F.instance_norm(x, running_mean.clone(), running_var.clone(), weight, bias, False, 0.0, eps)
            batch = F.instance_norm(x, None, None, weight, bias, True, 0.0, eps)
        else:
            running = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
            batch = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return {"running": running, "batch": batch}


def classify_output(output: Tensor, references: dict[str, Tensor], what: str = "output") -> str:
    """The key of the single reference ``output`` equals (up to float error), the others being clearly apart."""
    errors = {
        key: ((output.detach() - ref).abs().max() / (ref.abs().max() + 1)).item() for key, ref in references.items()
    }
    matches = [key for key, error in errors.items() if error < 1e-4]
    if len(matches) != 1 or min(e for k, e in errors.items() if k != matches[0]) < 1e-2:
        raise AssertionError(f"cannot tell which statistics {what} used; relative errors: {errors}")
    return matches[0]


def judge_norm_forward(layer: nn.Module, x: Tensor, output: Tensor, running_mean: Tensor, running_var: Tensor) -> str:
    """From its output, which statistics a forward of ``layer`` used: ``"running"`` or ``"batch"``.

    ``running_mean`` / ``running_var`` are the statistics before that forward (a batch-statistics
    forward updates them).
    """
    return classify_output(output, reference_outputs(layer, x, running_mean, running_var), type(layer).__name__)


@dataclass
class NormForward:
    tag: Any
    layer: str
    verdict: str


class NormForwardRecorder:
    """Forward hooks on norm layers that judge, while recording, every forward from its output."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        layers = norm_layers(model)
        self.records: list[NormForward] = []
        self._tag: Any = None
        self._active = False
        self._handles = []
        for name in layers if names is None else names:
            layer = layers[name]
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        self._stats_before: dict[str, tuple[Tensor, Tensor]] = {}

    @contextmanager
    def recording(self, tag: Any = None) -> Iterator[None]:
        self._active, self._tag = True, tag
        try:
            yield
        finally:
            self._active, self._tag = False, None

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(layer: nn.Module, args: tuple[Tensor, ...]) -> None:
            if self._active:
                self._stats_before[name] = (layer.running_mean.clone(), layer.running_var.clone())

        return hook

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if self._active:
                verdict = judge_norm_forward(layer, args[0], output, *self._stats_before.pop(name))
                self.records.append(NormForward(self._tag, name, verdict))

        return hook

    def verdicts(self, tag_filter: Callable[[Any], bool] | None = None) -> dict[str, list[str]]:
        """Layer name -> the verdict of each recorded forward, in order."""
        result: dict[str, list[str]] = {}
        for record in self.records:
            if tag_filter is None or tag_filter(record.tag):
                result.setdefault(record.layer, []).append(record.verdict)
        return result

    def tags(self) -> list[Any]:
        """The distinct tags recorded, in order."""
        return list(dict.fromkeys(record.tag for record in self.records))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# --------------------------------------------------------------------------------------------- snapshots


def snapshot(model: nn.Module, layers: Iterable[str] | None = None, attrs: Sequence[str] = STAT_BUFFERS) -> dict:
    """Clones of the given buffers/parameters of the named norm layers (all of them by default).

    A Lazy layer's uninitialised tensors are left out.
    """
    all_layers = norm_layers(model)
    result = {}
    for name in all_layers if layers is None else layers:
        for attr in attrs:
            value = getattr(all_layers[name], attr)
            if value is not None and not is_lazy(value):
                result[f"{name}.{attr}"] = value.detach().clone()
    return result


def snapshot_buffers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    return snapshot(model, layers, STAT_BUFFERS)


def snapshot_affine(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    return snapshot(model, layers, AFFINE_PARAMS)


def snapshot_params(model: nn.Module) -> dict[str, Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if not is_lazy(param)}


def changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    """Names whose tensors are not bitwise equal (or present on one side only)."""
    return sorted(
        name
        for name in before.keys() | after.keys()
        if name not in before or name not in after or not torch.equal(before[name], after[name])
    )


@dataclass(frozen=True)
class LayerIdentity:
    module: nn.Module
    cls: type
    momentum: float | None
    track_running_stats: bool
    params: tuple[nn.Parameter, ...]
    buffers: tuple[Tensor, ...]
    state_keys: tuple[str, ...]

    def same_as(self, other: LayerIdentity) -> bool:
        return (
            self.module is other.module
            and self.cls is other.cls
            and self.momentum == other.momentum
            and self.track_running_stats == other.track_running_stats
            and len(self.params) == len(other.params)
            and all(a is b for a, b in zip(self.params, other.params, strict=True))
            and all(a is b for a, b in zip(self.buffers, other.buffers, strict=True))
            and self.state_keys == other.state_keys
        )


def layer_identities(model: nn.Module) -> dict[str, LayerIdentity]:
    return {
        name: LayerIdentity(
            layer,
            type(layer),
            layer.momentum,
            layer.track_running_stats,
            tuple(layer.parameters()),
            tuple(layer.buffers()),
            tuple(layer.state_dict()),
        )
        for name, layer in norm_layers(model).items()
    }


# --------------------------------------------------------------------------------------------- data


def image_batch(n: int = BATCH_SIZE, seed: int = 0, size: int = IMAGE_SIZE) -> Tensor:
    """Images whose statistics are far from any running statistics (mean 2, std 3)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator) * 3 + 2


def image_loader(num_batches: int = 2, batch_size: int = BATCH_SIZE, seed: int = 0) -> DataLoader:
    n = num_batches * batch_size
    labels = torch.arange(n) % NUM_CLASSES
    return DataLoader(TensorDataset(image_batch(n, seed), labels), batch_size=batch_size, shuffle=False)


class ImageDataModule(pl.LightningDataModule):
    """Tiny deterministic image data; ``val_batches=0`` means no validation."""

    def __init__(self, train_batches: int = 2, val_batches: int = 0, batch_size: int = BATCH_SIZE) -> None:
        super().__init__()
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return image_loader(self.train_batches, self.batch_size, seed=0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return image_loader(self.val_batches, self.batch_size, seed=1) if self.val_batches else []


# --------------------------------------------------------------------------------------------- models


def toy_backbone(norm: bool = True, channels: int = 8) -> nn.Sequential:
    """conv+BN+ReLU twice, then pooling: norm layers ``stem.1`` and ``block.1``."""

    def conv_block(in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        if norm:
            layers.append(nn.BatchNorm2d(channels))
        layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return nn.Sequential(
        OrderedDict(stem=conv_block(3), block=conv_block(channels), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
    )


def torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    """A torchvision classifier without weights and with its classifier removed, and its feature size."""
    model = getattr(torchvision.models, arch)(weights=None)
    if arch.startswith("resnet"):
        features, model.fc = model.fc.in_features, nn.Identity()
    else:
        features, model.classifier = model.classifier[-1].in_features, nn.Identity()
    return model, features


class ClassifierModule(pl.LightningModule):
    """``backbone`` + linear ``head``; records, per training batch, which statistics each norm forward used.

    ``user_hooks`` adds user code that fights frozen layers: ``"train_at_epoch_start"`` and
    ``"train_in_step"`` call ``self.train()`` (in ``on_train_epoch_start`` / in ``training_step`` before
    the forward), ``"unfreeze_at_epoch_start"`` calls ``LightningModule.unfreeze()``. ``release_at_epoch``
    maps an epoch to a module name whose parameters get ``requires_grad=True`` at that epoch's start.
    """

    def __init__(
        self,
        backbone: nn.Module,
        features: int,
        num_classes: int = NUM_CLASSES,
        lr: float = 0.01,
        user_hooks: Iterable[str] = (),
        release_at_epoch: dict[int, str] | None = None,
        optimize_trainable_only: bool = False,
        record: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)
        self.lr = lr
        self.user_hooks = frozenset(user_hooks)
        self.release_at_epoch = release_at_epoch or {}
        self.optimize_trainable_only = optimize_trainable_only
        randomize_norm_stats(backbone)
        self.recorder = NormForwardRecorder(self) if record else None
        self.training_batches: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def on_train_epoch_start(self) -> None:
        module_name = self.release_at_epoch.get(self.current_epoch)
        if module_name is not None:
            self.get_submodule(module_name).requires_grad_(True)
        if "unfreeze_at_epoch_start" in self.user_hooks:
            self.unfreeze()
        if "train_at_epoch_start" in self.user_hooks:
            self.train()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        # the randomness of each step (stochastic depth) follows from (epoch, batch): resumed runs can match
        torch.manual_seed(self.current_epoch * 1000 + batch_idx)
        if "train_in_step" in self.user_hooks:
            self.train()
        tag = (self.current_epoch, batch_idx)
        self.training_batches.append(tag)
        with self.recorder.recording(tag) if self.recorder is not None else nullcontext():
            logits = self(x)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad or not self.optimize_trainable_only]
        return torch.optim.SGD(params, lr=self.lr)


class ToyModule(ClassifierModule):
    """The toy classifier: ``backbone`` (conv+BN+ReLU twice, pooled) and a linear ``head``."""

    def __init__(self, num_classes: int = NUM_CLASSES, lr: float = 0.01, norm: bool = True, **kwargs: Any) -> None:
        super().__init__(toy_backbone(norm), 8, num_classes=num_classes, lr=lr, **kwargs)


class TorchvisionModule(ClassifierModule):
    """A torchvision architecture (``weights=None``) as ``backbone`` with a linear ``head``."""

    def __init__(self, arch: str = "resnet18", num_classes: int = NUM_CLASSES, lr: float = 0.01, **kwargs: Any) -> None:
        backbone, features = torchvision_backbone(arch)
        super().__init__(backbone, features, num_classes=num_classes, lr=lr, **kwargs)


def build_module(arch: str, seed: int = 0, mixins: tuple[type, ...] = (), **kwargs: Any) -> ClassifierModule:
    """The toy module or a torchvision one, initialised from ``seed``; ``mixins`` override LightningModule hooks."""
    cls: type[ClassifierModule] = ToyModule if arch == "toy" else TorchvisionModule
    if mixins:
        cls = type(cls.__name__, (*mixins, cls), {})
    torch.manual_seed(seed)
    return cls(**kwargs) if arch == "toy" else cls(arch, **kwargs)


# --------------------------------------------------------------------------------------------- training


class NaiveEvalFreeze(Callback):
    """What users do without the library: ``.eval()`` and ``requires_grad_(False)`` once, at train start.

    Used as the baseline: layers it does not touch are "as without the library".
    """

    def __init__(self, modules: str | Sequence[str]) -> None:
        self.modules = [modules] if isinstance(modules, str) else list(modules)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in norm_layers(pl_module, self.modules).values():
            layer.eval()
            layer.requires_grad_(False)


QUIET_TRAINER_ARGS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
    "devices": 1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}
"""A small, silent CPU Trainer: no logger, checkpoints, progress bar, summary or sanity check."""


def make_trainer(callbacks: Sequence[Callback] = (), **overrides: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = {
        **QUIET_TRAINER_ARGS,
        "max_epochs": 1,
        "gradient_clip_val": 1.0,  # frozen norm layers on shifted data make large gradients: keep steps small
        **overrides,
    }
    return pl.Trainer(callbacks=list(callbacks), **kwargs)


@dataclass
class FitRun:
    """A finished fit and what was captured around it."""

    model: ClassifierModule
    trainer: pl.Trainer
    buffers_before: dict[str, Tensor]
    affine_before: dict[str, Tensor]
    params_before: dict[str, Tensor]
    identities_before: dict[str, LayerIdentity]
    warnings: list[str] = field(default_factory=list)

    def buffers_changed(self, layers: Iterable[str] | None = None) -> list[str]:
        """Statistics buffers of the given norm layers (all by default) that are not bitwise as before."""
        return changed(_subset(self.buffers_before, layers), snapshot_buffers(self.model, layers))

    def affine_changed(self, layers: Iterable[str] | None = None) -> list[str]:
        """Affine parameters of the given norm layers (all by default) that are not bitwise as before."""
        return changed(_subset(self.affine_before, layers), snapshot_affine(self.model, layers))

    def verdicts(self, tag_filter: Callable[[Any], bool] | None = None) -> dict[str, list[str]]:
        assert self.model.recorder is not None
        return self.model.recorder.verdicts(tag_filter)


def run_fit(
    model: ClassifierModule,
    callbacks: Sequence[Callback] = (),
    datamodule: pl.LightningDataModule | None = None,
    trainer: pl.Trainer | None = None,
    ckpt_path: str | None = None,
    before_fit: Callable[[pl.Trainer, ClassifierModule, pl.LightningDataModule], None] | None = None,
    **trainer_kwargs: Any,
) -> FitRun:
    """Fit ``model`` on tiny data, capturing snapshots before and every warning raised during the fit."""
    trainer = trainer or make_trainer(callbacks, **trainer_kwargs)
    datamodule = datamodule or ImageDataModule()
    run = FitRun(
        model, trainer, snapshot_buffers(model), snapshot_affine(model), snapshot_params(model), layer_identities(model)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if before_fit is not None:
            before_fit(trainer, model, datamodule)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    run.warnings = [str(w.message) for w in caught]
    return run


def _subset(snap: dict[str, Tensor], layers: Iterable[str] | None) -> dict[str, Tensor]:
    if layers is None:
        return snap
    layers = set(layers)
    return {key: value for key, value in snap.items() if key.rpartition(".")[0] in layers}


def eval_mode_warnings(messages: Iterable[str]) -> list[str]:
    return [message for message in messages if EVAL_MODE_WARNING in message]
