r"""
Gradual Unfreeze
================

Releases a frozen backbone block by block, each block in its own param group at a multiple of the head's learning rate.

"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bnfreeze.blocks import GRANULARITIES, check_block_order, find_blocks, format_blocks, forward_order
from lightning_bnfreeze.callbacks.freezing_callback import NormFreezingCallback, after_configure_model, announce
from lightning_bnfreeze.callbacks.parallel import check_strategy, forget_restore_hook, restore_before_optimizers
from lightning_bnfreeze.callbacks.plateau import (
    EarlyStoppingGuard,
    checks_on_train_epoch_end,
    epoch_clock,
    monitored_value,
)
from lightning_bnfreeze.callbacks.preview import configure_on_copy
from lightning_bnfreeze.callbacks.swa import keep_frozen_statistics_through_swa
from lightning_bnfreeze.callbacks.train_data_adaptation import DEFAULT_ADAPT_PRIOR, TrainDataAdaptation
from lightning_bnfreeze.checks import check_choice, check_integer, check_positive
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.freezer import BackboneNorms, set_requires_grad
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.lr_preview import Budget, LrPreview, simulate
from lightning_bnfreeze.lr_schedulers import check_extendable
from lightning_bnfreeze.names import get_module
from lightning_bnfreeze.released_groups import ReleasedGroups, pick_optimizer
from lightning_bnfreeze.releaser import Releaser
from lightning_bnfreeze.schedule import ReleasePlan, format_plan, plan_blocks, plan_releases
from lightning_bnfreeze.triggers import UNITS, PlateauTrigger, ReleaseRecord, ScheduleTrigger

__all__ = ["GradualUnfreeze"]


class GradualUnfreeze(NormFreezingCallback):
    r"""Fine-tune a frozen backbone by releasing it block by block, on a schedule or when a metric plateaus.

    At fit start every parameter under ``backbone`` is frozen and its norm layers run in inference
    mode with untouched statistics (as with :class:`~lightning_bnfreeze.BNFreezeCallback`); the rest
    of the model (the head) trains from the first step. At each scheduled epoch (or optimizer step,
    with ``unit="step"``; or when ``monitor`` stops improving) the next blocks are released: their
    parameters train, each block in its own param group named after it (``LearningRateMonitor``
    shows ``lr-Adam/backbone.layer4``), at ``head_lr * lr_scale * lr_decay**k``, where ``head_lr``
    is the learning rate of the optimizer's first param group and ``k`` counts the earlier
    releases. The group keeps that ratio to the head's learning rate under any torch LR
    scheduler, and the hyperparameters (weight decay, ...) of the group its parameters came from.
    The first group is named ``"head"`` unless it has a name.

    Args:
        backbone: name of the module to freeze and release, relative to the LightningModule.
        schedule: ``{time: name or [names]}`` (times in ``unit``), module or parameter names and globs relative to the
            LightningModule (``{1: "backbone.layer4", 3: ["backbone.layer*", "backbone.pos_embed"]}``;
            a glob releases what it matches that is still frozen). ``None``: the backbone's blocks
            (see ``granularity``), output side first, ``blocks_per_release`` at a time, at
            ``first_release``, ``first_release + release_every``, and so on.
        lr_scale: learning-rate factor of the first release, relative to the head's. The default (2.0,
            with ``blocks_per_release=2``) won the transfer benchmarks (see the README): on a ViT the
            pretrained blocks had to move a lot, and at the head's rate or below they did not, while
            a ResNet was level with full fine-tuning from 0.3 to 2.0.
        lr_decay: further factor for each later release (``k`` counts the releases before);
            ``1.0`` (default) gives every release ``lr_scale``.
        layer_decay: layer-wise learning-rate decay (BEiT, MAE, ELECTRA) instead of a gradual
            release: every block is released at ``first_release``, the block at depth ``d``
            from the output side at ``lr_scale * layer_decay**d``. With ``first_release >= 1``
            that is a linear probe, then fine-tuning with LLRD (LP-FT). Only without ``schedule``.
        granularity: with ``schedule=None``, the blocks found in the backbone: ``"stage"`` (ResNet
            ``layer1``..``layer4``, ConvNeXt ``stages.N``; a flat stack of transformer blocks gives
            one block per layer) or ``"block"`` (every repeated block: ``layer1.0``, ``stages.0.blocks.2``).
            The stem (embeddings, tokens, first conv) is the input-side block; a final norm joins
            the last block. A timm model's own ``group_matcher`` is used when it has one.
        blocks: with ``schedule=None``, name the blocks instead of finding them: a list of names or
            globs (each one block, input side first).
        blocks_per_release: with ``schedule=None``, how many blocks each release frees (default 2).
        train_bn: whether released norm layers train normally (``True``) or keep inference mode and
            frozen statistics while their affine parameters train (``False``).
        first_release: with ``schedule=None``, the time (in ``unit``) of the first release (``0``: no
            head-only phase).
        release_every: with ``schedule=None``, the time (in ``unit``) between two releases.
        warmup_steps: optimizer steps over which a released group's learning rate ramps up linearly
            to its target (``0``: none).
        optimizer_index: which of ``trainer.optimizers`` receives the released groups. ``None``:
            the only optimizer, or among several the one that holds backbone parameters; an error
            if that is ambiguous. Backbone parameters are taken out of every other optimizer.
        adapt_batches: re-estimate the statistics of the frozen norm layers on the training data
            before the first step (AdaBN), as :class:`~lightning_bnfreeze.BNFreezeCallback` does:
            a number of batches or a fraction of an epoch in (0, 1]; ``None`` (default): off.
        adapt_prior: with ``adapt_batches``, the source statistics count as this many samples against
            the target's, as in :class:`~lightning_bnfreeze.BNFreezeCallback`.
        adapt_on_release: with ``adapt_batches``, re-estimate again after each release the
            statistics of the norm layers still frozen then.
        unit: what the times of ``schedule``, ``first_release``, ``release_every``, ``min_phase`` and
            ``max_phase`` count: ``"epoch"`` (releases at the epoch's start) or ``"step"``: optimizer
            steps (``trainer.global_step``, which counts accumulated batches as one step); the release
            at step ``s`` happens before step ``s``, which trains it.
        monitor: release on a plateau: the next release of the plan (its order and groups; its times
            are ignored) happens when this logged metric stops improving, as Lightning's
            ``EarlyStopping`` would stop: ``mode``, ``patience``, ``min_delta`` mean what they mean there.
            The best value is kept across releases; each release starts a new count of ``patience``.
        mode: ``"min"`` or ``"max"``: whether ``monitor`` improves downwards or upwards.
        patience: checks without improvement after which the next release happens.
        min_delta: the least change of ``monitor`` that counts as an improvement.
        min_phase: with ``monitor``, the least time (in ``unit``) between two releases (and before the first).
        max_phase: with ``monitor``, the most time (in ``unit``) between two releases: the next release
            happens at the first check past it, plateau or not. ``None``: no limit.
        check_on_train_epoch_end: with ``monitor``, check at the end of each training epoch (``True``)
            or after each validation (``False``); ``None``: ``EarlyStopping``'s rule (at the epoch
            end when validation runs once per epoch, else after each validation).

    Raises:
        ValueError: a bad argument (at construction), or (at ``setup``, before training) a missing
            ``backbone``, a schedule naming unknown modules or parameters (with the closest names),
            names outside the backbone, a name listed twice or inside another listed one.
        TypeError: an LR scheduler that cannot follow added groups (at fit start); ``FSDPStrategy``
            or DeepSpeed, or ``ModelParallelStrategy`` with tensor parallelism (at ``setup``).
        RuntimeError: ``monitor`` is not logged when it is checked (with the closest logged names).

    While releases remain, an ``EarlyStopping`` callback that runs out of patience does not stop the
    fit: the next release happens instead, and it stops only once everything is released (as
    finetuning-scheduler's ``FTSEarlyStopping`` moves to the next phase). Every release gives each
    ``EarlyStopping`` its full patience again.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bnfreeze import GradualUnfreeze
        >>> unfreeze = GradualUnfreeze(schedule={1: "backbone.layer4", 2: "backbone.layer3"}, lr_scale=0.1)
        >>> trainer = Trainer(callbacks=[unfreeze], max_epochs=4)

    Resuming with ``trainer.fit(model, ckpt_path=...)`` restores the released parts, their groups
    and norm layers exactly, also from ``ModelParallelStrategy``'s distributed checkpoints. Under DDP,
    gradients of parameters released after the model was wrapped are averaged across ranks as DDP
    averages the others (see :class:`~lightning_bnfreeze.distributed.GradientSync`); under
    ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) FSDP2 reduces them itself.
    """

    def __init__(
        self,
        backbone: str = "backbone",
        schedule: dict[int, str | list[str]] | None = None,
        lr_scale: float = 2.0,
        lr_decay: float = 1.0,
        layer_decay: float | None = None,
        granularity: str = "stage",
        blocks: list[str] | None = None,
        blocks_per_release: int = 2,
        train_bn: bool = True,
        first_release: int = 1,
        release_every: int = 1,
        warmup_steps: int = 0,
        optimizer_index: int | None = None,
        adapt_batches: int | float | None = None,
        adapt_prior: float = DEFAULT_ADAPT_PRIOR,
        adapt_on_release: bool = False,
        unit: str = "epoch",
        monitor: str | None = None,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        min_phase: int = 0,
        max_phase: int | None = None,
        check_on_train_epoch_end: bool | None = None,
    ) -> None:
        check_positive("lr_scale", lr_scale)
        check_positive("lr_decay", lr_decay)
        if layer_decay is not None:
            check_positive("layer_decay", layer_decay)
        for argument, value, least in (
            ("first_release", first_release, 0),
            ("release_every", release_every, 1),
            ("blocks_per_release", blocks_per_release, 1),
            ("warmup_steps", warmup_steps, 0),
            ("optimizer_index", 0 if optimizer_index is None else optimizer_index, 0),
        ):
            check_integer(argument, value, least)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("unit", unit, UNITS)
        if schedule is not None and (layer_decay is not None or blocks is not None):
            raise ValueError(
                f"`schedule` names what each release frees, so it cannot be combined with"
                f" {'`layer_decay`' if layer_decay is not None else '`blocks`'}: give one or the other."
            )
        if not isinstance(backbone, str) or not backbone.strip():
            raise ValueError(f"`backbone` must be the name of a module of the LightningModule, got {backbone!r}.")
        self.backbone = backbone
        self.schedule = schedule
        self.lr_scale = lr_scale
        self.lr_decay = lr_decay
        self.layer_decay = layer_decay
        self.granularity = granularity
        self.blocks = blocks
        self.blocks_per_release = blocks_per_release
        self.train_bn = train_bn
        self.first_release = first_release
        self.release_every = release_every
        self.warmup_steps = warmup_steps
        self.optimizer_index = optimizer_index
        self.adapt_on_release = adapt_on_release
        self._adaptation = TrainDataAdaptation(adapt_batches, adapt_prior, "GradualUnfreeze")
        self.unit = unit
        self.monitor = monitor
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self._plateau = (
            None if monitor is None else PlateauTrigger(monitor, mode, patience, min_delta, min_phase, max_phase, unit)
        )
        self._check_at_epoch_end = False
        self._early_stopping: EarlyStoppingGuard | None = None
        self._unsettled = False  # releases done whose norm layers are not updated yet (see `_release_now`)
        self._plan: ReleasePlan | None = None
        self._trigger: ScheduleTrigger | None = None
        self._history: list[ReleaseRecord] = []
        self._releaser: Releaser | None = None
        self._norms: BackboneNorms | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone)

    def plan(self, pl_module: nn.Module) -> ReleasePlan:
        """Check the configuration against ``pl_module`` and resolve the schedule, without training."""
        backbone = self._backbone(pl_module)
        if self.schedule is not None:
            plan = plan_releases(pl_module, self.backbone, self.schedule, self.lr_scale, self.lr_decay)
            return replace(plan, unit=self.unit)
        blocks = find_blocks(backbone, self.backbone, self.granularity, self.blocks)
        plan = plan_blocks(
            self.backbone,
            blocks,
            self.first_release,
            self.release_every,
            self.blocks_per_release,
            self.lr_scale,
            self.lr_decay,
            self.layer_decay,
        )
        return replace(plan, unit=self.unit)

    def dry_run(self, pl_module: nn.Module, max_epochs: int = -1) -> str:
        """The resolved schedule as a table (epoch, released parts, parameters, learning-rate factor).

        Without ``schedule``, the blocks found come first. Releases at or past ``max_epochs`` (if
        ``>= 0``) are marked: they never happen.
        """
        table = format_plan(self.plan(pl_module), max_epochs if self._plateau is None else -1)
        if self._plateau is not None:
            table += (
                f"\nOn plateaus of {self.monitor!r}: these releases happen in this order, each when it stops"
                " improving; the times above are not used (`preview` gives the earliest steps)."
            )
        if self.schedule is not None:
            return table
        blocks = find_blocks(self._backbone(pl_module), self.backbone, self.granularity, self.blocks)
        return f"Blocks of {self.backbone!r}, input side first:\n{format_blocks(blocks)}\n\nReleases:\n{table}"

    def preview(
        self,
        pl_module: pl.LightningModule,
        batches_per_epoch: int,
        max_epochs: int | None = None,
        max_steps: int = -1,
        accumulate_grad_batches: int = 1,
    ) -> LrPreview:
        """Every param group's learning rate at every optimizer step of a fit, without training.

        The model's ``configure_optimizers`` runs on a copy; its real LR schedulers are stepped as
        Lightning steps them, and the releases applied as in a fit (plateau releases at their earliest
        possible step). ``preview(...).lrs`` holds the rates, ``.table()`` renders them, ``.plot(path)``
        draws them (matplotlib).
        """
        budget = Budget(batches_per_epoch, max_epochs, max_steps, accumulate_grad_batches)
        plan = self.plan(pl_module)
        model, optimizers, schedulers = configure_on_copy(pl_module, self.backbone, budget)
        optimizer = self._pick_optimizer(optimizers, model)
        mine = [item for item in schedulers if item.scheduler.optimizer is optimizer]
        return simulate(model, plan, optimizer, mine, budget, self.warmup_steps, self._plateau)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, "GradualUnfreeze")
        self._history.clear()  # a checkpoint's state, loaded after `setup`, may say otherwise
        self._unsettled = False
        self._adaptation.reset()
        if self._plateau is not None:
            self._plateau.reset()
        self._check_at_epoch_end = checks_on_train_epoch_end(trainer, self.check_on_train_epoch_end)
        self._early_stopping = EarlyStoppingGuard(
            trainer, lambda metric, value: self._release_next(trainer, pl_module, "early_stopping", value, metric)
        )
        after_configure_model(pl_module, lambda: self._plan_and_freeze(trainer, pl_module))

    def _plan_and_freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = self.plan(pl_module)
        self._check_forward_order(pl_module)
        self._trigger = ScheduleTrigger(self._plan) if self._plateau is None else None
        last = trainer.max_steps if self.unit == "step" else -1 if trainer.max_epochs is None else trainer.max_epochs
        late = [release.at for release in self._plan.releases if release.at >= last >= 0 and self._plateau is None]
        if late:
            rank_zero_warn(
                f"GradualUnfreeze: release {self.unit}(s) {late} are at or past `max_{self.unit}s={last}`:"
                " those blocks will never train."
            )
        set_requires_grad(self._backbone(pl_module).parameters(), False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning restores the optimizer and schedulers from a checkpoint: the groups built
        # here must be those saved, in the same order.
        optimizer = self._pick_optimizer(trainer.optimizers, pl_module)
        schedulers = [
            config.scheduler for config in trainer.lr_scheduler_configs if config.scheduler.optimizer is optimizer
        ]
        for scheduler in schedulers:
            check_extendable(scheduler)
        groups = ReleasedGroups(optimizer, schedulers, self.warmup_steps)
        backbone_params = list(self._backbone(pl_module).parameters())
        groups.withdraw(backbone_params)
        for other in trainer.optimizers:
            if other is not optimizer:
                ReleasedGroups(other).withdraw(backbone_params)
        # Named from the start, so that LearningRateMonitor's key for it does not change at the first release.
        optimizer.param_groups[0].setdefault("name", "head")
        assert self._plan is not None
        gradients = GradientSync(trainer.strategy.model)
        self._releaser = Releaser(pl_module, self._plan, groups, gradients, self._history)
        self._releaser.restore()
        restore_before_optimizers(trainer.strategy, self.state_key, self._restore_late)

    def _restore_late(self, state: dict[str, Any]) -> None:
        assert self._releaser is not None
        self.load_state_dict(state)
        self._releaser.restore()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Norm layers are frozen here, after the strategy's SyncBatchNorm conversion and after
        # Lightning's check for modules in eval mode.
        forget_restore_hook(trainer.strategy)
        keep_frozen_statistics_through_swa(trainer)
        register_sharded_parameters(pl_module)  # FSDP2: those it trains, whatever the sanity check left registered
        self._norms = BackboneNorms(pl_module, self.backbone, self.train_bn, holder=self)
        self._freezer = self._norms.freezer
        self._norms.update(self._releaser_now().released_ids())
        self._adaptation.run_once(trainer, pl_module, self._freezer.layers)
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
        if self.unit == "step":
            self._release_due(trainer, pl_module)
        if self._unsettled:
            self._settle(trainer, pl_module)
        if self._freezer is not None:
            self._freezer.enforce()
        if self._releaser is not None:
            self._releaser.groups.tie_to_head(trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the LR schedulers' step: the released groups follow at once, whatever the callbacks' order.
        if self._releaser is not None:
            self._releaser.groups.tie_to_head(trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_at_epoch_end:
            self._check_plateau(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_at_epoch_end:
            self._check_plateau(trainer, pl_module)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before a gradient scaler checks for infs: every rank then skips the same steps.
        if self._releaser is not None:
            self._releaser.gradients.finish_backward()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"history": [record.to_dict() for record in self._history], **self._adaptation.state_dict()}
        return state if self._plateau is None else {**state, "plateau": self._plateau.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            raise ValueError(
                "GradualUnfreeze: the checkpoint's state has no release history (it was saved by lightning_bnfreeze"
                " 0.1, whose groups were laid out otherwise): resume it with that version, or start the fit anew."
            )
        self._history[:] = [ReleaseRecord.from_dict(record) for record in state_dict["history"]]
        self._adaptation.load_state_dict(state_dict)
        if self._plateau is not None and "plateau" in state_dict:
            self._plateau.load_state_dict(state_dict["plateau"])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        forget_restore_hook(trainer.strategy)  # a fit that failed before training started
        if self._releaser is not None:
            self._releaser.gradients.close()
        self._releaser = self._norms = None
        if self._early_stopping is not None:
            self._early_stopping.restore()

    def _check_forward_order(self, pl_module: pl.LightningModule) -> None:
        """With found blocks and an ``example_input_array``, warn if the forward pass runs them in another order."""
        example = pl_module.example_input_array
        if self.schedule is not None or self.blocks is not None or example is None or isinstance(example, dict):
            return
        inputs = example if isinstance(example, tuple) else (example,)
        blocks = find_blocks(self._backbone(pl_module), self.backbone, self.granularity)
        message = check_block_order(blocks, forward_order(pl_module, *inputs))
        if message is not None:
            rank_zero_warn(f"GradualUnfreeze: {message} Name the blocks with `blocks=[...]` (input side first).")

    def _backbone(self, pl_module: nn.Module) -> nn.Module:
        return get_module(pl_module, self.backbone, "backbone")

    def _release_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trigger is None:
            return
        done = {record.index for record in self._history}
        for index in self._trigger.due(trainer.current_epoch, trainer.global_step, done):
            self._release_now(trainer, pl_module, index, "scheduled")

    def _check_plateau(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plateau = self._plateau
        if plateau is None or self._releaser is None or trainer.sanity_checking:
            return
        if trainer.state.fn != "fit" or not self._releaser.remaining():
            return
        value = monitored_value(trainer, plateau.monitor)
        reason = plateau.update(value, epoch_clock(trainer), trainer.global_step)
        if self._released_at_this_check(trainer):  # by an EarlyStopping: its phase starts with this check
            plateau.start_phase(epoch_clock(trainer), trainer.global_step)
        # every rank releases when any sees a plateau: param groups stay identical across ranks
        elif trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            self._release_next(trainer, pl_module, reason or "plateau", value, plateau.monitor)

    def _release_next(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str, value: float, metric: str
    ) -> bool:
        """Release the plan's next release now (a plateau, an early stop); ``False`` when none is left."""
        if self._released_at_this_check(trainer):
            return True  # one release per check, whichever trigger saw the plateau first
        left = self._releaser_now().remaining()
        if left:
            self._release_now(trainer, pl_module, left[0], reason, value, metric)
        return bool(left)

    def _release_now(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        index: int,
        reason: str,
        value: float | None = None,
        metric: str | None = None,
    ) -> None:
        register_sharded_parameters(pl_module)  # FSDP2: release those it trains
        record = self._releaser_now().release(index, trainer.current_epoch, trainer.global_step, reason, value)
        if self._plateau is not None:
            self._plateau.start_phase(epoch_clock(trainer), trainer.global_step)
        if self._early_stopping is not None:
            self._early_stopping.reset_patience(trainer.global_step)
        # During validation modules are in eval mode, and Lightning restores the modes it found when it ends:
        # released norm layers take their training mode at the next training step instead.
        self._unsettled = True
        if not trainer.validating:
            self._settle(trainer, pl_module)
        logged = {"gradual_unfreeze/release": float(index)}
        if value is not None:
            logged["gradual_unfreeze/release_value"] = value
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        announce(trainer, f"GradualUnfreeze: {self._releaser_now().describe(record, metric)}")

    def _settle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Norm layers as the releases done leave them (and re-estimated, with ``adapt_on_release``)."""
        assert self._norms is not None
        self._norms.update(self._releaser_now().released_ids())
        if self.adapt_on_release:
            self._adaptation.run(trainer, pl_module, self._norms.freezer.layers)
        self._unsettled = False

    def _released_at_this_check(self, trainer: pl.Trainer) -> bool:
        last = self._history[-1] if self._history else None
        return last is not None and last.reason != "scheduled" and last.step == trainer.global_step

    def _releaser_now(self) -> Releaser:
        assert self._releaser is not None, "GradualUnfreeze: no fit in progress"
        return self._releaser

    def _pick_optimizer(self, optimizers: list[Optimizer], pl_module: nn.Module) -> Optimizer:
        return pick_optimizer(optimizers, self._backbone(pl_module).parameters(), self.optimizer_index)
