r"""
Gradual Unfreeze
================

Releases a frozen backbone block by block, each block in its own param group at a reduced learning rate.

"""

from __future__ import annotations

from math import isfinite
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bnfreeze.callbacks.adaptation import adapt_on_train_data, check_adapt_batches
from lightning_bnfreeze.distributed import average_gradients, ddp_reduced_parameters
from lightning_bnfreeze.freezer import NormFreezer, norm_layer_names
from lightning_bnfreeze.lr_schedulers import check_can_follow, extend_for_new_group
from lightning_bnfreeze.names import unknown_name_message
from lightning_bnfreeze.param_groups import add_group_like, follow_head, remove_parameters
from lightning_bnfreeze.schedule import Release, ReleasePlan, Schedule, default_schedule, format_plan, plan_releases

__all__ = ["GradualUnfreeze"]


class GradualUnfreeze(Callback):
    r"""Fine-tune a frozen backbone by releasing it block by block on an epoch schedule.

    At fit start every parameter under ``backbone`` is frozen and its norm layers run in inference
    mode with untouched statistics (as with :class:`~lightning_bnfreeze.BNFreezeCallback`); the rest
    of the model (the head) trains from the first step. At the start of each scheduled epoch the
    listed modules are released: their parameters train, each module in its own param group named
    after it (``LearningRateMonitor`` shows ``lr-Adam/backbone.layer4``), at
    ``head_lr * lr_scale * lr_decay**k``, where ``head_lr`` is the learning rate of the optimizer's
    first param group and ``k`` counts the earlier releases. The group then keeps that ratio to the
    head's learning rate under any torch LR scheduler. The first group is named ``"head"`` unless it
    has a name.

    Args:
        backbone: name of the module to freeze and release, relative to the LightningModule.
        schedule: ``{epoch: name or [names]}``, names and globs relative to the LightningModule
            (``{1: "backbone.layer4", 3: "backbone.layer*"}``; a glob releases what it matches that is
            still frozen). ``None``: the backbone's direct children that hold parameters, one at a
            time, output side (last registered) first, at ``first_release_epoch``,
            ``first_release_epoch + release_every``, and so on.
        lr_scale: learning-rate factor of the first release, relative to the head's.
        lr_decay: further factor for each later release (``k`` counts the releases before);
            ``1.0`` (default) gives every release ``lr_scale``. The defaults are the best of a
            sweep in ``benchmarks/transfer.py`` (see the README): smaller factors left the
            released blocks nearly untrained.
        train_bn: whether released norm layers train normally (``True``) or keep inference mode and
            frozen statistics while their affine parameters train (``False``).
        first_release_epoch: with ``schedule=None``, the epoch of the first release (epoch 0 always
            trains the head alone, so at least 1).
        release_every: with ``schedule=None``, the epochs between two releases.
        warmup_steps: optimizer steps over which a released group's learning rate ramps up linearly
            to its target (``0``: none).
        optimizer_index: which of ``trainer.optimizers`` receives the released groups. ``None``:
            the only optimizer, or among several the one that holds backbone parameters; an error
            if that is ambiguous.
        adapt_batches: re-estimate the statistics of the frozen norm layers on the training data
            before the first step (AdaBN), as :class:`~lightning_bnfreeze.BNFreezeCallback` does:
            a number of batches or a fraction of an epoch in (0, 1]; ``None`` (default): off.
        adapt_on_release: with ``adapt_batches``, re-estimate again after each release the
            statistics of the norm layers still frozen then.

    Raises:
        ValueError: a bad argument (at construction), or (at ``setup``, before training) a missing
            ``backbone``, a schedule naming unknown modules (with the closest names), modules outside
            the backbone, a module listed twice or inside another listed one.
        TypeError: an LR scheduler that cannot follow added groups, or an FSDP, DeepSpeed or
            model-parallel strategy (at fit start).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bnfreeze import GradualUnfreeze
        >>> unfreeze = GradualUnfreeze(schedule={1: "backbone.layer4", 2: "backbone.layer3"}, lr_scale=0.1)
        >>> trainer = Trainer(callbacks=[unfreeze], max_epochs=4)

    Resuming with ``trainer.fit(model, ckpt_path=...)`` restores the released modules, their groups
    and norm layers exactly. Under DDP, gradients of parameters released after the model was wrapped
    are averaged across ranks like the others.
    """

    def __init__(
        self,
        backbone: str = "backbone",
        schedule: dict[int, str | list[str]] | None = None,
        lr_scale: float = 0.3,
        lr_decay: float = 1.0,
        train_bn: bool = True,
        first_release_epoch: int = 1,
        release_every: int = 1,
        warmup_steps: int = 0,
        optimizer_index: int | None = None,
        adapt_batches: int | float | None = None,
        adapt_on_release: bool = False,
    ) -> None:
        for argument, value in (("lr_scale", lr_scale), ("lr_decay", lr_decay)):
            if not isinstance(value, int | float) or not isfinite(value) or value <= 0:
                raise ValueError(f"`{argument}` must be a positive number, got {value!r}.")
        for argument, value, least in (
            ("first_release_epoch", first_release_epoch, 1),
            ("release_every", release_every, 1),
            ("warmup_steps", warmup_steps, 0),
            ("optimizer_index", 0 if optimizer_index is None else optimizer_index, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{argument}` must be an integer >= {least}, got {value!r}.")
        check_adapt_batches(adapt_batches)
        if not isinstance(backbone, str):
            raise ValueError(f"`backbone` must be a module name, got {backbone!r}.")
        self.backbone = backbone
        self.schedule = schedule
        self.lr_scale = lr_scale
        self.lr_decay = lr_decay
        self.train_bn = train_bn
        self.first_release_epoch = first_release_epoch
        self.release_every = release_every
        self.warmup_steps = warmup_steps
        self.optimizer_index = optimizer_index
        self.adapt_batches = adapt_batches
        self.adapt_on_release = adapt_on_release
        self._adapted = False
        self._plan: ReleasePlan | None = None
        self._released: list[dict[str, int]] = []  # {"epoch", "step"} of each release done: the state
        self._groups: list[tuple[int, float, int]] = []  # (group index, lr factor, release step)
        self._optimizer: Optimizer | None = None
        self._freezer: NormFreezer | None = None
        self._ddp_params: list[nn.Parameter] | None = None  # released parameters DDP does not average
        self._ddp_reduced: set[int] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone)

    def plan(self, pl_module: nn.Module) -> ReleasePlan:
        """Check the configuration against ``pl_module`` and resolve the schedule, without training."""
        try:
            backbone = pl_module.get_submodule(self.backbone)
        except AttributeError:
            names = [name for name, _ in pl_module.named_modules()]
            raise ValueError(unknown_name_message(self.backbone, names, "backbone")) from None
        schedule: Schedule = (
            default_schedule(backbone, self.backbone, self.first_release_epoch, self.release_every)
            if self.schedule is None
            else self.schedule
        )
        return plan_releases(pl_module, self.backbone, schedule, self.lr_scale, self.lr_decay)

    def dry_run(self, pl_module: nn.Module, max_epochs: int = -1) -> str:
        """The resolved schedule as a table (epoch, modules, parameters, learning-rate factor).

        Releases at or past ``max_epochs`` (if ``>= 0``) are marked: they never happen.
        """
        return format_plan(self.plan(pl_module), max_epochs)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_unsupported(trainer.strategy)
        self._plan = self.plan(pl_module)
        self._released = []  # a checkpoint's state, loaded after `setup`, may say otherwise
        self._adapted = False
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        late = [release.epoch for release in self._plan.releases if release.epoch >= max_epochs >= 0]
        if late:
            rank_zero_warn(
                f"GradualUnfreeze: release epoch(s) {late} are at or past `max_epochs={trainer.max_epochs}`:"
                " those modules will never train."
            )
        for param in pl_module.get_submodule(self.backbone).parameters():
            param.requires_grad = False  # not requires_grad_(): a Lazy layer's may be uninitialised

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning restores the optimizer and schedulers from a checkpoint: the structure
        # built here must match the one saved.
        optimizer = self._optimizer = self._pick_optimizer(trainer, pl_module)
        for scheduler in self._schedulers(trainer):
            check_can_follow(scheduler)
        remove_parameters(optimizer, pl_module.get_submodule(self.backbone).parameters())
        # Named from the start, so that LearningRateMonitor's key for it does not change at the first release.
        optimizer.param_groups[0].setdefault("name", "head")
        reduced = ddp_reduced_parameters(trainer.strategy.model) if trainer.strategy.model is not None else None
        self._ddp_params = None if reduced is None else []
        self._ddp_reduced = reduced or set()
        self._groups = []
        for done in self._released:
            self._add_groups(trainer, pl_module, self._release_at(done["epoch"]), done["step"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Norm layers are frozen here, after the strategy's SyncBatchNorm conversion and after
        # Lightning's check for modules in eval mode.
        assert self._plan is not None
        self._freezer = NormFreezer(pl_module, holder=self)
        released = [module.name for done in self._released for module in self._release_at(done["epoch"]).modules]
        released_layers = set(norm_layer_names(pl_module, released))
        backbone_layers = norm_layer_names(pl_module, [self.backbone])
        self._freezer.freeze([name for name in backbone_layers if name not in released_layers], freeze_affine=True)
        if not self.train_bn:
            self._freezer.freeze([name for name in backbone_layers if name in released_layers], freeze_affine=False)
        if self.adapt_batches is not None and not self._adapted:
            self._adapt(trainer, pl_module)
            self._adapted = True
        self._release_due(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_due(trainer, pl_module)
        trainable = sum(param.numel() for param in pl_module.parameters() if param.requires_grad)
        for logger in trainer.loggers:
            logger.log_metrics({"gradual_unfreeze/trainable_params": float(trainable)}, step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._freezer is not None:
            self._freezer.enforce()
        self._follow_head(trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._ddp_params and optimizer is self._optimizer:
            average_gradients(self._ddp_params)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"released": [dict(done) for done in self._released], "adapted": self._adapted}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._released = [dict(done) for done in state_dict["released"]]
        self._adapted = bool(state_dict.get("adapted", False))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._freezer is not None:
            self._freezer.unfreeze_all()
        self._freezer = self._optimizer = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` hook when a fit fails: let go here, or the layers stay frozen for good.
        self.teardown(trainer, pl_module, "fit")

    def _release_at(self, epoch: int) -> Release:
        assert self._plan is not None
        for release in self._plan.releases:
            if release.epoch == epoch:
                return release
        raise ValueError(
            f"GradualUnfreeze: the checkpoint holds a release at epoch {epoch}, which the schedule no longer has"
            f" (it has {[release.epoch for release in self._plan.releases]})."
        )

    def _release_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._plan is not None
        done = {entry["epoch"] for entry in self._released}
        for release in self._plan.due(trainer.current_epoch):
            if release.epoch in done:
                continue
            self._released.append({"epoch": release.epoch, "step": trainer.global_step})
            self._add_groups(trainer, pl_module, release, trainer.global_step)
            self._release_norm_layers(pl_module, release)
            self._follow_head(trainer.global_step)
            if self.adapt_batches is not None and self.adapt_on_release:
                self._adapt(trainer, pl_module)
            head_lr = self._optimizer.param_groups[0]["lr"] if self._optimizer is not None else float("nan")
            rank_zero_info(
                f"GradualUnfreeze: epoch {trainer.current_epoch}: released"
                f" {', '.join(module.name for module in release.modules)}"
                f" ({sum(module.numel for module in release.modules):,} parameters)"
                f" at lr {head_lr * release.lr_factor:.3g} ({release.lr_factor:.3g} x head)."
            )

    def _add_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule, release: Release, step: int) -> None:
        assert self._optimizer is not None
        params = dict(pl_module.named_parameters())
        for module in release.modules:
            group = [params[name] for name in module.params]
            for param in group:
                param.requires_grad_(True)
            index = add_group_like(self._optimizer, group, module.name, release.lr_factor)
            for scheduler in self._schedulers(trainer):
                extend_for_new_group(scheduler, release.lr_factor)
            self._groups.append((index, release.lr_factor, step))
            if self._ddp_params is not None:
                self._ddp_params.extend(p for p in group if id(p) not in self._ddp_reduced)

    def _schedulers(self, trainer: pl.Trainer) -> list[Any]:
        """The LR schedulers of the optimizer that receives the releases."""
        configs = trainer.lr_scheduler_configs
        return [config.scheduler for config in configs if config.scheduler.optimizer is self._optimizer]

    def _release_norm_layers(self, pl_module: pl.LightningModule, release: Release) -> None:
        if self._freezer is None:
            return
        names = norm_layer_names(pl_module, [module.name for module in release.modules])
        if self.train_bn:
            self._freezer.unfreeze(names)
        else:
            self._freezer.freeze(names, freeze_affine=False)

    def _adapt(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._freezer is not None and self.adapt_batches is not None
        adapt_on_train_data(trainer, pl_module, self._freezer.layers, self.adapt_batches, "GradualUnfreeze")

    def _follow_head(self, step: int) -> None:
        if self._optimizer is None or not self._groups:
            return
        follow_head(
            self._optimizer,
            [(index, factor * self._warmup(step - start)) for index, factor, start in self._groups],
        )

    def _warmup(self, steps_since_release: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (steps_since_release + 1) / self.warmup_steps)

    def _pick_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optimizer:
        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("GradualUnfreeze needs an optimizer: `configure_optimizers` returned none.")
        if self.optimizer_index is not None:
            if self.optimizer_index >= len(optimizers):
                raise ValueError(
                    f"`optimizer_index={self.optimizer_index}` but `configure_optimizers` returned"
                    f" {len(optimizers)} optimizer(s)."
                )
            return optimizers[self.optimizer_index]
        if len(optimizers) == 1:
            return optimizers[0]
        backbone = {id(param) for param in pl_module.get_submodule(self.backbone).parameters()}
        holders = [
            index
            for index, optimizer in enumerate(optimizers)
            if any(id(param) in backbone for group in optimizer.param_groups for param in group["params"])
        ]
        if len(holders) != 1:
            raise ValueError(
                f"GradualUnfreeze: {len(optimizers)} optimizers and {len(holders)} of them hold backbone parameters:"
                " set `optimizer_index` to choose the one that receives released modules."
            )
        return optimizers[holders[0]]


_UNSUPPORTED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


def _refuse_unsupported(strategy: object) -> None:
    # By class name, so that both `lightning.pytorch` and `pytorch_lightning` strategies are recognised.
    if any(cls.__name__ in _UNSUPPORTED_STRATEGIES for cls in type(strategy).__mro__):
        raise TypeError(
            f"GradualUnfreeze does not support {type(strategy).__name__}: sharded parameters cannot join an"
            " optimizer's param groups during training here. Use strategy='ddp' (or a single device)."
        )
