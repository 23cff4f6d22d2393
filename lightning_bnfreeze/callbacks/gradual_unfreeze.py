r"""
Gradual Unfreeze
================

Releases a frozen backbone block by block, each block in its own param group at a rate relative to the head's.

"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bnfreeze.adapt import AdaBN
from lightning_bnfreeze.blocks import check_block_order, format_blocks, forward_order
from lightning_bnfreeze.callbacks.adaptation import TrainDataAdaptation
from lightning_bnfreeze.callbacks.base import NormFreezingCallback, after_configure_model, announce
from lightning_bnfreeze.callbacks.early_stopping import is_early_stopping, monitored_now
from lightning_bnfreeze.callbacks.preview import configure_on_copy
from lightning_bnfreeze.callbacks.strategies import check_strategy, saved_callback_state
from lightning_bnfreeze.checks import check_positive
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.freezer import BackboneNorms
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.internals import (
    batches_done_in_epoch,
    before_checkpoint_load,
    callback_state_key,
    forget_checkpoint_hook,
)
from lightning_bnfreeze.lr_preview import Budget, LrPreview, simulate
from lightning_bnfreeze.lr_schedulers import check_extendable
from lightning_bnfreeze.names import get_module
from lightning_bnfreeze.plan import Blocks, LayerDecay, ReleasePlan, Schedule, What
from lightning_bnfreeze.plan_table import format_plan
from lightning_bnfreeze.release import NORM_MODES, ReleaseRecord, Unfreezer
from lightning_bnfreeze.released_groups import ReleasedGroups, origin_rule, pick_optimizer
from lightning_bnfreeze.triggers import Every, Trigger

__all__ = ["GradualUnfreeze"]


class GradualUnfreeze(NormFreezingCallback):
    r"""Fine-tune a frozen backbone by releasing it block by block: what is released is ``what``, when is ``when``.

    At fit start every parameter under ``backbone`` is frozen and its norm layers run in inference
    mode with untouched statistics (as with :class:`~lightning_bnfreeze.BNFreezeCallback`); the rest
    of the model (the head) trains from the first step. Each release makes the next parts of the
    plan train, each part in its own param group named after it (``LearningRateMonitor`` shows
    ``lr-AdamW/backbone.blocks.6``), at ``head_lr * lr_scale * decay**k`` (``head_lr``: the learning rate
    of the optimizer's head group; ``decay`` and ``k`` as ``what`` says), a ratio it keeps under any
    torch LR scheduler, with the hyperparameters (weight decay, ...) the user's param groups give it.

    Args:
        backbone: name of the module to freeze and release, relative to the LightningModule.
        what: what each release frees: :class:`~lightning_bnfreeze.Blocks` (default: the backbone's
            blocks, found for any model, output side first, two per release),
            :class:`~lightning_bnfreeze.Schedule` (``{epoch: names}``), or :class:`~lightning_bnfreeze.LayerDecay`.
        when: when the next release happens: :class:`~lightning_bnfreeze.Every` (default: every epoch
            from epoch 1, the head training alone first), :class:`~lightning_bnfreeze.Plateau`, or your
            own :class:`~lightning_bnfreeze.Trigger`. Not with ``what=Schedule(...)``, which has its times.
        lr_scale: learning rate of a released block relative to the head's (times ``decay**k``). The
            default, 1.0, is the best of the benchmarks on real pretrained weights (see the README).
        bn: what a released block's norm layers do: ``"auto"`` (default): frozen statistics while the
            block moves slowly, batch statistics from its first step if that step moved its weights by
            more than 0.2 %; ``"train"``: batch statistics, as without freezing; ``"frozen"``: inference
            mode and frozen statistics, affine parameters training (Keras after unfreezing).
        warmup_steps: optimizer steps over which a released group's learning rate ramps up linearly.
        trainable: parameters inside the backbone that train from the first step and are never frozen
            (adapters such as LoRA): shell-style patterns over the full parameter names, ``*`` matching
            across dots (``["*lora_*"]``).
        adapt: re-estimate the frozen norm layers' statistics on the training data before the first
            step (:class:`~lightning_bnfreeze.AdaBN`); ``None`` (default): off.
        optimizer_index: which of ``trainer.optimizers`` receives the released groups. ``None``: the only
            optimizer, or the one that holds backbone parameters. Backbone parameters leave every other one.

    Raises:
        ValueError: a bad argument (at construction), or at ``setup``, before training: a missing
            ``backbone``, names that match nothing (with the closest names), names outside the backbone.
        TypeError: an LR scheduler that cannot follow added groups (at fit start); ``FSDPStrategy`` or
            DeepSpeed, or ``ModelParallelStrategy`` with tensor parallelism (at ``setup``).

    To release the next block when an early stop would end the fit, use
    :class:`~lightning_bnfreeze.ReleasingEarlyStopping` instead of Lightning's ``EarlyStopping``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bnfreeze import Every, GradualUnfreeze, Schedule
        >>> unfreeze = GradualUnfreeze()  # two blocks per epoch from epoch 1, output side first
        >>> unfreeze = GradualUnfreeze(what=Schedule({1: "backbone.layer4", 3: "backbone.layer3"}), lr_scale=0.5)
        >>> trainer = Trainer(callbacks=[unfreeze], max_epochs=5)
    """

    def __init__(
        self,
        backbone: str = "backbone",
        what: Blocks | Schedule | LayerDecay | None = None,
        when: Trigger | None = None,
        lr_scale: float = 1.0,
        bn: str = "auto",
        warmup_steps: int = 0,
        trainable: list[str] | None = None,
        adapt: AdaBN | None = None,
        optimizer_index: int | None = None,
        max_step: float | None = None,
    ) -> None:
        if not isinstance(backbone, str) or not backbone.strip():
            raise ValueError(f"`backbone` must be the name of a module of the LightningModule, got {backbone!r}.")
        what = Blocks() if what is None else what
        if not isinstance(what, What):
            raise ValueError(f"`what` must be Blocks(...), Schedule(...) or LayerDecay(...), got {what!r}.")
        if when is not None and not isinstance(when, Trigger):
            raise ValueError(f"`when` must be Every(...), Plateau(...) or a Trigger subclass, got {when!r}.")
        if when is not None and what.trigger() is not None:
            raise ValueError(
                f"`what={what!r}` gives each release its own time, so `when={when!r}` has nothing to decide:"
                " leave `when` out, or name the blocks with `what=Blocks(names=[...])` to release them on `when`."
            )
        check_positive("lr_scale", lr_scale)
        if bn not in NORM_MODES:
            raise ValueError(f"`bn` must be one of {NORM_MODES}, got {bn!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")
        if trainable is not None and (isinstance(trainable, str) or not all(isinstance(p, str) for p in trainable)):
            raise ValueError(f"`trainable` must be a list of parameter-name patterns, got {trainable!r}.")
        if optimizer_index is not None and (
            isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0
        ):
            raise ValueError(f"`optimizer_index` must be None or an integer >= 0, got {optimizer_index!r}.")
        self.backbone = backbone
        self.what = what
        self.when = what.trigger() or when or Every()
        self.lr_scale = lr_scale
        self.bn = bn
        self.warmup_steps = warmup_steps
        self.trainable = list(trainable or [])
        self.optimizer_index = optimizer_index
        self.max_step = max_step
        self._adaptation = TrainDataAdaptation(adapt, "GradualUnfreeze")
        self._plan: ReleasePlan | None = None
        self._unfreezer: Unfreezer | None = None
        self._saved: dict[str, Any] | None = None
        self._unsettled = False
        self._check_at_epoch_end = False

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, backbone=self.backbone)

    @property
    def history(self) -> tuple[ReleaseRecord, ...]:
        """The releases done in the current (or last) fit, in order."""
        return self._unfreezer.history if self._unfreezer is not None else ()

    def plan(self, pl_module: nn.Module) -> ReleasePlan:
        """The resolved release plan for ``pl_module``, without training (checked against the model).

        Raises:
            ValueError: a missing ``backbone``, or names that match nothing (with the closest names).
        """
        get_module(pl_module, self.backbone, "backbone")
        return self.what.plan(pl_module, self.backbone)

    def dry_run(self, pl_module: nn.Module, max_epochs: int = -1) -> str:
        """The plan as text: the blocks found, each release (time, parts, parameters, learning-rate factor, group)."""
        plan = self.plan(pl_module)
        table = format_plan(plan, self.when, self.lr_scale, self.bn, max_epochs, self._groups_preview(pl_module))
        if not plan.blocks:
            return table
        return f"Blocks of {self.backbone!r}, input side first:\n{format_blocks(plan.blocks)}\n\nReleases:\n{table}"

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
        Lightning steps them, and the same release objects as in a fit release the copy (plateau
        releases at their earliest possible step). ``.lrs`` holds the rates, ``.table()`` renders
        them, ``.plot(path)`` draws them (matplotlib: the ``plot`` extra).
        """
        budget = Budget(batches_per_epoch, max_epochs, max_steps, accumulate_grad_batches)
        model, optimizers, schedulers = configure_on_copy(pl_module, self.backbone, budget)
        optimizer = self._pick_optimizer(optimizers, model)
        mine = [item for item in schedulers if item.scheduler.optimizer is optimizer]
        unfreezer = self._make_unfreezer(model, self.plan(model), optimizer, [s.scheduler for s in mine], None)
        return simulate(unfreezer, mine, budget)

    # ------------------------------------------------------------------------------------------ the fit

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)
        check_strategy(trainer.strategy, "GradualUnfreeze")
        self._unsettled = False
        self._saved = None
        self._adaptation.reset()
        self.when.reset()
        self._check_at_epoch_end = _checks_on_train_epoch_end(trainer, self.when)
        plain = [cb for cb in trainer.callbacks if is_early_stopping(cb) and not hasattr(cb, "releases_instead")]  # type: ignore[attr-defined]
        if plain:
            rank_zero_warn(
                "GradualUnfreeze: Lightning's EarlyStopping stops the fit as usual, also while blocks are still frozen;"
                " to release the next block instead, use lightning_bnfreeze.ReleasingEarlyStopping (same arguments)."
            )
        after_configure_model(pl_module, lambda: self._plan_and_freeze(trainer, pl_module))

    def _plan_and_freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = self.plan(pl_module)
        self._check_forward_order(pl_module)
        self._warn_about_late_releases(trainer)
        self._warn_about_adapters(pl_module)
        for param in self._frozen_parameters(pl_module):
            param.requires_grad = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning restores the optimizers from a checkpoint: the groups built here must be those saved.
        assert self._plan is not None
        optimizer = self._pick_optimizer(trainer.optimizers, pl_module)
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        unfreezer = self._make_unfreezer(pl_module, self._plan, optimizer, schedulers, trainer)
        backbone = [(name, p) for name, p in self._named_backbone(pl_module) if id(p) in unfreezer.frozen_ids]
        for other in trainer.optimizers:
            if other is not optimizer:
                ReleasedGroups(other).withdraw(backbone)
        if self._saved is not None:
            unfreezer.load_state_dict(self._saved["unfreezer"])
        unfreezer.freeze()
        unfreezer.restore()
        self._unfreezer = unfreezer
        if trainer.strategy.restore_checkpoint_after_setup:  # ModelParallelStrategy: it restores after this hook
            before_checkpoint_load(trainer.strategy, self._restore_late)

    def _restore_late(self, path: Any) -> None:
        state = saved_callback_state(path, self.state_key)
        if state is not None and self._unfreezer is not None:
            self._unfreezer.load_state_dict(state["unfreezer"])
            self._unfreezer.restore()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Norm layers are frozen here, after the strategy's SyncBatchNorm conversion and after Lightning's
        # check for modules in eval mode.
        forget_checkpoint_hook(trainer.strategy)  # the checkpoint, if any, is restored by now
        unfreezer = self._running()
        register_sharded_parameters(pl_module)  # FSDP2: those it trains, whatever the sanity check left registered
        unfreezer.start_norms(BackboneNorms(pl_module, self.backbone, holder=self))
        self._freezer = unfreezer.norms.freezer if unfreezer.norms is not None else None
        self._adaptation.run_once(trainer, pl_module, self._freezer.layers if self._freezer else ())
        self.remember_statistics()
        self._advance(trainer, pl_module, "epoch")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._advance(trainer, pl_module, "epoch")
        trainable = sum(param.numel() for param in pl_module.parameters() if param.requires_grad)
        for logger in trainer.loggers:
            logger.log_metrics({"gradual_unfreeze/trainable_params": float(trainable)}, step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._advance(trainer, pl_module, "step")
        if self._unsettled:
            self._settle(trainer, pl_module)
        if self._unfreezer is not None:
            self._unfreezer.before_step(trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._unfreezer is None:
            return
        for line in self._unfreezer.after_step(trainer.global_step):
            announce(trainer, f"GradualUnfreeze: {line}.")
            self.remember_statistics()
        # After the LR schedulers' step: the released groups follow at once, whatever the callbacks' order.
        self._unfreezer.groups.tie_to_head(trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_at_epoch_end:
            self._check_metrics(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_at_epoch_end:
            self._check_metrics(trainer, pl_module)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before a gradient scaler checks for infs: every rank then skips the same steps.
        if self._unfreezer is not None:
            self._unfreezer.after_backward()

    @override
    def state_dict(self) -> dict[str, Any]:
        unfreezer = (
            self._unfreezer.state_dict() if self._unfreezer is not None else (self._saved or {}).get("unfreezer", {})
        )
        return {"unfreezer": unfreezer, **self._adaptation.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "unfreezer" not in state_dict:
            raise ValueError(
                "GradualUnfreeze: the checkpoint was saved by lightning_bnfreeze 0.2 or older, whose state is laid out"
                " otherwise: resume it with that version, or start the fit anew."
            )
        self._adaptation.load_state_dict(state_dict)
        if self._unfreezer is None:  # before `on_fit_start`: it rebuilds the groups from this
            self._saved = state_dict

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        forget_checkpoint_hook(trainer.strategy)  # a fit that failed before training started
        if self._unfreezer is not None:
            self._unfreezer.close()
            self._unfreezer.norms = None

    # --------------------------------------------------------------------------------------- helpers

    def _make_unfreezer(
        self,
        pl_module: nn.Module,
        plan: ReleasePlan,
        optimizer: Optimizer,
        schedulers: list[Any],
        trainer: pl.Trainer | None,
    ) -> Unfreezer:
        for scheduler in schedulers:
            check_extendable(scheduler)
        groups = ReleasedGroups(optimizer, schedulers, self.warmup_steps)
        named = list(pl_module.named_parameters())
        no_decay = getattr(get_module(pl_module, self.backbone, "backbone"), "no_weight_decay", lambda: ())()
        groups.rule = origin_rule(optimizer, named, [f"{self.backbone}.{name}" for name in no_decay])
        trainable = [p for name, p in self._named_backbone(pl_module) if self._is_trainable(name)]
        agree = (lambda decision: trainer.strategy.reduce_boolean_decision(decision, all=False)) if trainer else bool
        gradients = GradientSync(trainer.strategy.model) if trainer is not None else None
        unfreezer = Unfreezer(
            pl_module, plan, self.when, groups, gradients, self.lr_scale, self.bn, trainable, agree, self.max_step
        )
        groups.withdraw((name, p) for name, p in self._named_backbone(pl_module) if id(p) in unfreezer.frozen_ids)
        return unfreezer

    def _named_backbone(self, pl_module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return list(get_module(pl_module, self.backbone, "backbone").named_parameters(prefix=self.backbone))

    def _is_trainable(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.trainable)

    def _frozen_parameters(self, pl_module: nn.Module) -> list[nn.Parameter]:
        return [p for name, p in self._named_backbone(pl_module) if not self._is_trainable(name)]

    def _pick_optimizer(self, optimizers: list[Optimizer], pl_module: nn.Module) -> Optimizer:
        params = [p for _, p in self._named_backbone(pl_module)]
        return pick_optimizer(optimizers, params, self.optimizer_index)

    def _running(self) -> Unfreezer:
        assert self._unfreezer is not None, "GradualUnfreeze: no fit in progress"
        return self._unfreezer

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checked_at: str) -> None:
        unfreezer = self._unfreezer
        if unfreezer is None or unfreezer.trigger.checked_at != checked_at or not unfreezer.remaining:
            return
        moment = unfreezer.moment(trainer.current_epoch, trainer.global_step)
        for record in unfreezer.advance(moment, checked_at):
            self._released(trainer, pl_module, record)

    @property
    def releases_left(self) -> int:
        """Releases of the plan not done yet in the fit in progress (0 outside a fit)."""
        return len(self._unfreezer.remaining) if self._unfreezer is not None else 0

    def release_next(self, trainer: pl.Trainer, reason: str, metric: str | None = None, value: float | None = None) -> bool:
        """Release the plan's next release now (one per check: ``True`` too if one happened at this step already).

        For callbacks that decide releases themselves, such as :class:`~lightning_bnfreeze.ReleasingEarlyStopping`;
        call it on every rank alike. ``False`` when nothing is left to release.
        """
        unfreezer = self._unfreezer
        if unfreezer is None or not unfreezer.remaining:
            return False
        if not self._released_at(trainer):
            moment = unfreezer.moment(_epochs_done(trainer), trainer.global_step, monitored_now(trainer))
            record = unfreezer.release(moment, reason, value, metric, trainer.current_epoch)
            self._released(trainer, trainer.lightning_module, record)
        return True

    def _check_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unfreezer = self._unfreezer
        if unfreezer is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if unfreezer.trigger.checked_at != "metrics" or not unfreezer.remaining or self._released_at(trainer):
            return
        moment = unfreezer.moment(_epochs_done(trainer), trainer.global_step, monitored_now(trainer))
        reason = unfreezer.trigger.check(moment)
        # every rank releases when any says so: param groups stay identical across ranks
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            metric = getattr(unfreezer.trigger, "monitor", None)
            value = moment.metrics.get(metric) if isinstance(metric, str) else None
            record = unfreezer.release(moment, reason or "plateau", value, metric, trainer.current_epoch)
            self._released(trainer, pl_module, record)

    def _released_at(self, trainer: pl.Trainer) -> bool:
        """Whether a release happened at this optimizer step by a metric check (one release per check)."""
        history = self.history
        return bool(history) and history[-1].reason != "scheduled" and history[-1].step == trainer.global_step

    def _released(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: ReleaseRecord) -> None:
        register_sharded_parameters(pl_module)  # FSDP2: release those it trains
        # During validation modules are in eval mode, and Lightning restores the modes it found when it ends:
        # released norm layers take their training mode at the next training step instead.
        self._unsettled = True
        if not trainer.validating:
            self._settle(trainer, pl_module)
        logged = {"gradual_unfreeze/release": float(record.index)}
        if record.value is not None:
            logged["gradual_unfreeze/release_value"] = record.value
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        announce(trainer, f"GradualUnfreeze: {self._running().describe(record)}")

    def _settle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Norm layers as the releases leave them (and re-estimated, with ``AdaBN(on_release=True)``)."""
        self._running().update_norms()
        config = self._adaptation.config
        if config is not None and config.on_release and self._freezer is not None:
            self._adaptation.run(trainer, pl_module, self._freezer.layers)
        self.remember_statistics()
        self._unsettled = False

    def _check_forward_order(self, pl_module: pl.LightningModule) -> None:
        """With found blocks and an ``example_input_array``, warn if the forward pass runs them in another order."""
        example = pl_module.example_input_array
        plan = self._plan
        if plan is None or not plan.blocks or example is None or isinstance(example, dict):
            return
        if getattr(self.what, "names", None) is not None:
            return
        inputs = example if isinstance(example, tuple) else (example,)
        message = check_block_order(plan.blocks, forward_order(pl_module, *inputs))
        if message is not None:
            rank_zero_warn(f"GradualUnfreeze: {message} Name them with `what=Blocks(names=[...])` (input side first).")

    def _warn_about_late_releases(self, trainer: pl.Trainer) -> None:
        assert self._plan is not None
        unit = self.when.unit
        last = trainer.max_steps if unit == "step" else -1 if trainer.max_epochs is None else trainer.max_epochs
        times = self.when.times(len(self._plan.releases)) or []
        late = [time for time in times if time >= last >= 0]
        if late:
            rank_zero_warn(
                f"GradualUnfreeze: release {unit}(s) {late} are at or past `max_{unit}s={last}`:"
                " those blocks will never train."
            )

    def _warn_about_adapters(self, pl_module: nn.Module) -> None:
        """A few backbone parameters that require grad among many that do not: an adapter (LoRA) set up by hand."""
        named = self._named_backbone(pl_module)
        wanted = [(name, p) for name, p in named if p.requires_grad and not self._is_trainable(name)]
        if wanted and 2 * sum(p.numel() for _, p in wanted) < sum(p.numel() for _, p in named):
            names = [name for name, _ in wanted]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            rank_zero_warn(
                f"GradualUnfreeze: {len(names)} backbone parameter(s) require grad while most do not ({shown}):"
                " an adapter? They are frozen until their block is released; to train them from the first step,"
                f" name them in `trainable` (e.g. trainable={names[:1]!r})."
            )

    def _groups_preview(self, pl_module: nn.Module) -> dict[str, list[str]] | None:
        """Part name -> the user's param groups its parameters take their hyperparameters from, if
        ``configure_optimizers`` runs on a copy of the model without a trainer; else ``None``."""
        if not isinstance(pl_module, pl.LightningModule):
            return None
        try:
            model, optimizers, _ = configure_on_copy(pl_module, self.backbone, Budget(1, 1))
        except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError):
            return None
        plan = self.plan(model)
        groups = self._make_unfreezer(model, plan, self._pick_optimizer(optimizers, model), [], None).groups
        params = dict(model.named_parameters())
        return {
            part.name: sorted({groups.origin_label(params[name]) for name in part.params})
            for parts in plan.releases
            for part in parts
        }


def _checks_on_train_epoch_end(trainer: pl.Trainer, trigger: Trigger) -> bool:
    """``EarlyStopping``'s rule: at the training epoch end when validation runs once per epoch (or never),
    else after each validation; a trigger's ``check_on_train_epoch_end`` (``True``/``False``) overrides it."""
    setting = getattr(trigger, "check_on_train_epoch_end", None)
    if setting is not None:
        return bool(setting)
    return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1


def _epochs_done(trainer: pl.Trainer) -> float:
    """Epochs trained so far: the current epoch plus the fraction of its batches done."""
    total = trainer.num_training_batches
    fraction = batches_done_in_epoch(trainer) / total if 0 < total < float("inf") else 0.0
    return trainer.current_epoch + min(fraction, 1.0)
