"""Small models, data, trainers and probes for the GradualUnfreeze tests.

Everything is judged independently of the library under test: parameter groups are read straight
from the torch optimizer, norm-layer behaviour from outputs and bitwise snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import GradualUnfreeze, Moment, Trigger
from lightning_bnfreeze.first_step_estimates import GradientProbe
from tests import helpers
from tests.helpers import NormForwardRecorder, randomize_norm_stats

NUM_SAMPLES = 32
BATCH_SIZE = 8
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH_SIZE
IMAGE_SIZE = 12
NUM_CLASSES = 4
FEATURES = 8
HEAD_NORM = "head.1"
"""The BatchNorm1d of the head (the backbone's are ``backbone.{0,1,3}.1``)."""

SchedulerFactory = Callable[[Optimizer], dict[str, Any]]


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


def tiny_backbone() -> nn.Sequential:
    """Children ``0``, ``1``, ``3`` hold a conv+BN each (``1``, ``3`` of the same shapes); ``2``, ``4``, ``5`` none."""
    return nn.Sequential(
        conv_block(3, FEATURES),
        conv_block(FEATURES, FEATURES),
        nn.MaxPool2d(2),
        conv_block(FEATURES, FEATURES),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def dataset(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images with statistics far from any running statistics (mean 2, std 3), and labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 3 + 2
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    return x, y


class UnfreezeModel(pl.LightningModule):
    """``backbone`` (:func:`tiny_backbone`) and a ``head`` with a BatchNorm1d; brings its own data.

    Args:
        lr: learning rate of the (single) optimizer.
        optimizer: ``"sgd"``, ``"sgd_momentum"`` or ``"adam"``.
        trainable_only: ``configure_optimizers`` hands over only parameters with ``requires_grad``.
        scheduler: builds the ``lr_scheduler`` config (``{"scheduler": ..., "interval": ...}``).
        record: judge every norm layer's training forward from its output (see ``tests.helpers``).
        batches_by_index: take batch ``batch_idx`` of the fixed data whatever the loader yields, so
            that a mid-epoch resume sees the same data as the uninterrupted run.
        backbone: another backbone (with its feature size) instead of :func:`tiny_backbone`.
    """

    def __init__(
        self,
        lr: float = 0.1,
        optimizer: str = "sgd",
        trainable_only: bool = False,
        scheduler: SchedulerFactory | None = None,
        record: bool = False,
        batches_by_index: bool = False,
        backbone: tuple[nn.Module, int] | None = None,
    ) -> None:
        super().__init__()
        module, features = backbone if backbone is not None else (tiny_backbone(), FEATURES)
        self.backbone = module
        self.head = nn.Sequential(nn.Linear(features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))
        self.lr = lr
        self.optimizer_kind = optimizer
        self.trainable_only = trainable_only
        self.scheduler_factory = scheduler
        self.batches_by_index = batches_by_index
        self.x, self.y = dataset()
        randomize_norm_stats(self)
        self.recorder = NormForwardRecorder(self) if record else None
        self.steps_run = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.steps_run += 1
        x, y = batch
        if self.batches_by_index:
            x, y = (t[batch_idx * BATCH_SIZE : (batch_idx + 1) * BATCH_SIZE] for t in (self.x, self.y))
        self.log("constant", 1.0, on_step=False, on_epoch=True)
        if self.recorder is None:
            return F.cross_entropy(self(x), y)
        with self.recorder.recording((self.current_epoch, batch_idx)):
            logits = self(x)
        return F.cross_entropy(logits, y)

    def optimized_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad or not self.trainable_only]

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> Optimizer:
        if self.optimizer_kind == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        momentum = 0.9 if self.optimizer_kind == "sgd_momentum" else 0.0
        return torch.optim.SGD(params, lr=self.lr, momentum=momentum)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.optimized_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH_SIZE, shuffle=False)


class ValidatedModel(UnfreezeModel):
    """:class:`UnfreezeModel` with validation data of its own, logging ``val_loss``."""

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*dataset(seed=1)), batch_size=BATCH_SIZE)


class ScriptedScore(ValidatedModel):
    """Logs ``score`` in validation: ``scores[i]`` at the ``i``-th validation run of the fit (sanity checks aside)."""

    def __init__(self, scores: list[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scores = scores
        self.validations = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("score", self.scores[self.validations])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validations += 1


class BelowLoss(Trigger):
    """A user's own trigger: the next release once the monitored loss is below ``threshold``."""

    checked_at = "metrics"

    def __init__(self, threshold: float, monitor: str = "val_loss") -> None:
        self.threshold = threshold
        self.monitor = monitor

    def check(self, moment: Moment) -> str | None:
        return "below threshold" if moment.metric(self.monitor) < self.threshold else None


class BuiltLater(UnfreezeModel):
    """An :class:`UnfreezeModel` whose module ``name`` is built by ``build`` in ``configure_model`` (as FSDP2 models
    build theirs), which a dry run does not call."""

    def __init__(self, name: str, build: Callable[[], nn.Module]) -> None:
        super().__init__()
        delattr(self, name)
        self.late = (name, build)

    def configure_model(self) -> None:
        name, build = self.late
        if not hasattr(self, name):
            setattr(self, name, build())


class CLIModel(UnfreezeModel):
    """:class:`UnfreezeModel` with a LightningCLI-friendly signature."""

    def __init__(self, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__(lr=lr, optimizer=optimizer)


def build_model(seed: int = 0, **kwargs: Any) -> UnfreezeModel:
    torch.manual_seed(seed)
    return UnfreezeModel(**kwargs)


def cosine(optimizer: Optimizer) -> dict[str, Any]:
    """A per-step cosine schedule that does not reach zero (``SchedulerFactory``)."""
    return {
        "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-3),
        "interval": "step",
    }


RESUME_WARNINGS = [
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"),
]
"""Lightning's warnings on resuming a mid-epoch checkpoint with callbacks: expected in the resume tests."""

make_trainer = partial(helpers.make_trainer, max_epochs=3, gradient_clip_val=None)
"""A quiet Trainer for 3 epochs, without gradient clipping (the tests check plain optimizer updates)."""


def module_numel(model: nn.Module, name: str) -> int:
    return sum(p.numel() for p in model.get_submodule(name).parameters())


def param_ids(model: nn.Module, name: str) -> set[int]:
    return {id(p) for p in model.get_submodule(name).parameters()}


def clone_params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def inside(name: str, module: str) -> bool:
    return name == module or name.startswith(f"{module}.")


@dataclass
class StepRecord:
    epoch: int
    step: int
    names: list[str | None]
    lrs: list[float]
    sizes: list[int]


@dataclass
class LrProbe(Callback):
    """Records, at every optimizer step (place it after GradualUnfreeze), each group's name, lr and size.

    With ``params``, it also records, for every step, the named parameters before the step with their
    gradients (``before``) and after it (``after``).
    """

    params: Sequence[str] = ()
    records: list[StepRecord] = field(default_factory=list)
    before: list[dict[str, tuple[Tensor, Tensor | None]]] = field(default_factory=list)
    after: list[dict[str, Tensor]] = field(default_factory=list)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        groups = optimizer.param_groups
        self.records.append(
            StepRecord(
                trainer.current_epoch,
                trainer.global_step,
                [g.get("name") for g in groups],
                [float(g["lr"]) for g in groups],
                [len(g["params"]) for g in groups],
            )
        )
        if self.params:
            named = dict(pl_module.named_parameters())
            self.before.append(
                {
                    n: (named[n].detach().clone(), None if named[n].grad is None else named[n].grad.clone())
                    for n in self.params
                }
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.params:
            named = dict(pl_module.named_parameters())
            self.after.append({n: named[n].detach().clone() for n in self.params})

    def ratios(self, name: str) -> list[tuple[int, float]]:
        """(global step, lr of group ``name`` / lr of group 0) at each step where the group exists."""
        return [(r.step, r.lrs[r.names.index(name)] / r.lrs[0]) for r in self.records if name in r.names]

    def head_lrs(self) -> list[float]:
        return [r.lrs[0] for r in self.records]


def groups_by_name(optimizer: Optimizer) -> dict[str | None, dict[str, Any]]:
    return {group.get("name"): group for group in optimizer.param_groups}


def assert_same_nested(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same_nested(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@dataclass
class Run:
    """What a fit ended with: the model's state, the optimizer's and scheduler's, which parameters train, and the
    recorder's verdict on each norm layer's training forward, by (epoch, batch)."""

    model: UnfreezeModel
    callback: GradualUnfreeze
    state: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    requires_grad: dict[str, bool]
    verdicts: dict[tuple[int, int], dict[str, str]]


def fit_run(trainer: pl.Trainer, model: UnfreezeModel, callback: GradualUnfreeze, ckpt_path: Path | None = None) -> Run:
    """Fits ``model`` (built with ``record=True``) and returns what the fit ended with."""
    trainer.fit(model, ckpt_path=ckpt_path)
    assert model.recorder is not None
    verdicts: dict[tuple[int, int], dict[str, str]] = {}
    for record in model.recorder.records:
        verdicts.setdefault(record.tag, {})[record.layer] = record.verdict
    return Run(
        model,
        callback,
        clone_state(model),
        trainer.optimizers[0].state_dict(),
        trainer.lr_scheduler_configs[0].scheduler.state_dict() if trainer.lr_scheduler_configs else {},
        {name: p.requires_grad for name, p in model.named_parameters()},
        verdicts,
    )


def fit_checkpointed(
    model: UnfreezeModel,
    callback: GradualUnfreeze,
    max_epochs: int,
    ckpt_path: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> Run:
    """:func:`fit_run` for ``max_epochs``; with ``checkpoint_dir``, a checkpoint there at every epoch's end
    (``epoch=<e>.ckpt``) and every 3 steps (``step=<s>.ckpt``)."""
    callbacks: list[Callback] = [callback]
    if checkpoint_dir is not None:
        callbacks += [
            ModelCheckpoint(checkpoint_dir, "{epoch}", save_top_k=-1, every_n_epochs=1),
            ModelCheckpoint(checkpoint_dir, "{step}", save_top_k=-1, every_n_train_steps=3),
        ]
    trainer = make_trainer(callbacks, max_epochs=max_epochs, enable_checkpointing=checkpoint_dir is not None)
    return fit_run(trainer, model, callback, ckpt_path)


def assert_resumed_like(resumed: Run, reference: Run, resumed_at_step: int) -> None:
    """The fit resumed at global step ``resumed_at_step`` ends bitwise where the uninterrupted one ends, and every
    training forward after the resume used the statistics the uninterrupted run's did."""
    assert_same_nested(resumed.state, reference.state, "state_dict")
    assert_same_nested(resumed.optimizer, reference.optimizer, "optimizer")
    assert_same_nested(resumed.scheduler, reference.scheduler, "scheduler")
    assert resumed.requires_grad == reference.requires_grad
    assert resumed.callback.state_dict() == reference.callback.state_dict()
    assert resumed.verdicts, "no training step ran after the resume"
    assert resumed.verdicts == {tag: reference.verdicts[tag] for tag in resumed.verdicts}
    assert min(resumed.verdicts) == divmod(resumed_at_step, STEPS_PER_EPOCH)


@dataclass
class EpochProbe(Callback):
    """Clones the model's state (parameters and buffers) at every epoch start (place it after
    GradualUnfreeze, so after that epoch's releases) and at the end of training.

    ``states[e]`` is the state at the start of epoch ``e``; the last entry the state at the end.
    """

    states: list[dict[str, Tensor]] = field(default_factory=list)
    requires_grad: list[dict[str, bool]] = field(default_factory=list)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append(clone_state(pl_module))
        self.requires_grad.append({name: p.requires_grad for name, p in pl_module.named_parameters()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append(clone_state(pl_module))

    def changed_in_epoch(self, key: str, epoch: int) -> bool:
        return not torch.equal(self.states[epoch][key], self.states[epoch + 1][key])


class FirstStepEstimates:
    """Within a ``with`` block, each first step a :class:`~lightning_bnfreeze.first_step_estimates.GradientProbe`
    computes (the list it returns)."""

    def __enter__(self) -> list[float]:
        found: list[float] = []
        self._step = step = GradientProbe.step

        def recorded(probe: GradientProbe, *args: Any, **kwargs: Any) -> float:
            found.append(step(probe, *args, **kwargs))
            return found[-1]

        GradientProbe.step = recorded  # type: ignore[method-assign]
        return found

    def __exit__(self, *exc: object) -> None:
        GradientProbe.step = self._step  # type: ignore[method-assign]
