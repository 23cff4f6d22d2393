r"""
Gradual Unfreeze
================

Releases a frozen backbone block by block, each block in its own param group at a rate relative to the head's.

"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bnfreeze.adapt import AdaBN
from lightning_bnfreeze.backbone_parameters import BackboneParameters, ReleaseSettings
from lightning_bnfreeze.blocks import format_blocks
from lightning_bnfreeze.callbacks.adaptation import TrainDataAdaptation
from lightning_bnfreeze.callbacks.base import NormFreezingCallback, after_configure_model, overrides_configure_model
from lightning_bnfreeze.callbacks.compiling import FitCompilation, check_compile_option
from lightning_bnfreeze.callbacks.fit_checks import (
    check_something_trains,
    checks_on_train_epoch_end,
    warn_about_a_trained_trainer,
    warn_about_adapters,
    warn_about_early_stopping,
    warn_about_forward_order,
    warn_about_group_rates,
    warn_about_late_releases,
)
from lightning_bnfreeze.callbacks.fit_releases import FitReleases
from lightning_bnfreeze.callbacks.fit_state import FitState
from lightning_bnfreeze.callbacks.preview import groups_preview, unfreezer_on_copy
from lightning_bnfreeze.callbacks.strategies import check_strategy, saved_callback_state
from lightning_bnfreeze.callbacks.training_loss import training_loss
from lightning_bnfreeze.checks import check_choice, check_integer
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.freezer import BackboneNorms
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.internals import (
    before_checkpoint_load,
    callback_state_key,
    forget_checkpoint_hook,
)
from lightning_bnfreeze.loss_rise import ON_LOSS_RISE
from lightning_bnfreeze.lr_preview import Budget, LrPreview, SchedulerStep, simulate
from lightning_bnfreeze.names import get_module
from lightning_bnfreeze.norm import named_norm_layers
from lightning_bnfreeze.plan import Blocks, LayerDecay, ReleasePlan, Schedule, What, what_and_when
from lightning_bnfreeze.plan_table import format_plan
from lightning_bnfreeze.record import ReleaseRecord
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.released_groups import ReleasedGroups, initial_lr
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
        lr_scale: learning rate of a released block relative to the head's (times ``decay**k``). Default
            1.0: on the real-weights CNN benchmarks no reduced rate held at every head learning rate; a pretrained
            transformer takes the head's rate badly at large rates: ``on_loss_rise`` catches it where the loss rises
            after the first release (AdamW 3e-3) and where the fit diverges later (SGD 3e-2; README).
        bn: what a released block's norm layers do: ``"auto"`` (default): frozen statistics until the first release's
            first step; batch statistics from then on if that step moved its weights by more than 0.5 %, in that
            release and each later one until a release's first step moves less than 0.2 % (it and every later
            release keep frozen statistics), else frozen statistics throughout; ``"train"``: batch statistics, as
            without freezing; ``"frozen"``: inference mode and frozen statistics, affine parameters training (Keras
            after unfreezing).
        warmup_steps: optimizer steps over which a released group's learning rate ramps up linearly (its first step
            is judged as if taken at the full rate).
        trainable: parameters inside the backbone that train from the first step and are never frozen
            (adapters such as LoRA): shell-style patterns over the full parameter names, ``*`` matching
            across dots (``["*lora_*"]``); a pattern that matches no parameter of the backbone raises at setup.
        adapt: re-estimate norm statistics on the training data (:class:`~lightning_bnfreeze.AdaBN`). ``"auto"``
            (default): when ``bn="auto"`` decides that the released norm layers train, every norm layer of the
            backbone first takes the target's statistics (``AdaBN(AUTO_BATCHES)``: 50 training batches, blended with
            the source's), at that step; nothing while they stay frozen. On a target far from the source (as
            ``max_step="auto"`` measures it), before the first step instead, so that the head trains on features
            normalised as they will be; the source's come back if ``bn="auto"`` decides that released norm layers
            keep frozen statistics; not under ``Adam`` or ``AdamW`` when no release's first step can move its weights
            by more than :data:`~lightning_bnfreeze.step_size.AUTO_STEP` (known before it is taken: at most ``lr``
            per element), as ``bn="auto"`` will then keep frozen statistics; under other optimizers (SGD) the first
            release's weights get gradients in the first optimizer step (not a step), and the source's statistics
            come back right after it if the first step they give is that small. ``AdaBN(...)``: the frozen norm
            layers', before the first step. ``None``: never.
        optimizer_index: which of ``trainer.optimizers`` receives the released groups. ``None``: the only
            optimizer, or the one that holds backbone parameters. Backbone parameters leave every other one.
        max_step: a cap on a released block's first optimizer step (relative to its weights), kept by scaling its
            rate from then on, as a trust ratio would. ``"released"``: no block's first step goes further than the
            blocks released before it would move in a first step taken at the same moment (under momentum SGD the
            input-side blocks move faster, and it binds; under AdamW they move slower, and it rarely does).
            ``None``: no cap, every rate as ``lr_scale`` and ``what`` set it. ``"auto"`` (default): at fit start,
            the backbone's frozen norm layers compare the first training batches with their running statistics
            (:mod:`~lightning_bnfreeze.domain_shift`): for a target near the backbone's source (shift below 0.7),
            ``"released"``, and once the first release's first step moves fast (as for ``bn="auto"``) each later
            release ``k`` at ``0.3**k`` of its rate, its first step at most ``0.3**k`` as far as the first
            release's (:data:`~lightning_bnfreeze.step_size.NEAR_DECAY`); ``None``
            for one far from it or without such layers; one line says which. A
            number: that cap (momentum included, as for ``bn="auto"``) for every release. See the README's
            "Choosing BN mode and learning rates".
        compile: compile the release units for ``torch.compile`` (regional compilation). ``True``: each
            release unit becomes a region of its own after ``configure_model`` (``dynamic=False``; blocks of one
            class share their compiled code), so that no release recompiles the whole model and the fit never
            falls back to eager; a model given as ``torch.compile(model, ...)`` gets its regions compiled with
            that call's options, a ``torch.compile`` around the backbone in ``configure_model`` is replaced by
            them. A dict: ``torch.compile``'s keyword arguments for the regions. ``False`` (default): nothing is
            compiled; a model compiled as a whole gets the recompile limit its releases need, and one warning
            line on what each release costs. See :mod:`lightning_bnfreeze.compile`.
        on_loss_rise: what happens when the mean training loss over the first release's first batches (an epoch's, at
            most 50) is 1.1 times the mean over as many batches before it or more. ``"retry"`` (default): the weights,
            buffers and optimizer state go back to what they were at the release (the statistics of the norm layers
            frozen then stay as the library's own decisions left them, and with ``adapt="auto"`` released norm layers
            that train are re-estimated), and it and every later release train at a tenth of their rates from then on
            (at most twice; one warning line each time). The norm modes, caps and decay decided from its first step
            stand, and a warm-up is not restarted. It keeps a copy of the trainable weights, the buffers and the
            weights' optimizer state for those batches (and a checkpoint saved among them, the copy). ``"warn"``: one
            warning line, suggesting a smaller ``lr_scale``. A release at a later step before those batches are over,
            and the fit's end, only warn; a ``training_step`` that returns no loss (manual optimization) is not
            watched, nor a first release at the fit's first step (no loss before it: one warning says so). Later
            releases are not judged so: after them the loss also rose in runs that ended well (README;
            the line is :data:`~lightning_bnfreeze.loss_rise.LOSS_RISE`). The fit is, at every epoch's end once a
            release trained: when the mean loss over the epoch's last batches (at most 50) is 1.1 times the mean over
            the fit's first as many or more (:data:`~lightning_bnfreeze.divergence.DIVERGED`), it diverged:
            ``"retry"`` puts every weight and buffer back as they were at the end of the lowest epoch (but the
            statistics of the norm layers frozen now), restarts the optimizer state, and trains every release on at
            a tenth of its rate (the two retries are shared with the first release's); ``"warn"``, the fit's end and
            no retry left warn once. ``"retry"`` keeps that epoch's copy of every weight and buffer (in the CPU's
            memory), and a checkpoint holds it too. A loss whose scale changes on purpose (a term annealed in, a
            curriculum), or a head that comes trained (a low loss from the start): ``"warn"``.

    Raises:
        ValueError: a bad argument (at construction), or at ``setup``, before training: a missing
            ``backbone``, names that match nothing (with the closest names), names outside the backbone.
        TypeError: an LR scheduler that cannot follow added groups (at fit start); ``FSDPStrategy`` or
            DeepSpeed, or ``ModelParallelStrategy`` with tensor parallelism (at ``setup``).

    To make the next release when an early stop would end the fit, use
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
        adapt: AdaBN | Literal["auto"] | None = "auto",
        optimizer_index: int | None = None,
        max_step: float | Literal["auto", "released"] | None = "auto",
        compile: bool | dict[str, Any] = False,
        on_loss_rise: Literal["retry", "warn"] = "retry",
    ) -> None:
        resolved, own_when = what_and_when(what, when)
        self._params = BackboneParameters(backbone, () if trainable is None else trainable)
        self._settings = ReleaseSettings(lr_scale, bn, warmup_steps, max_step)
        if optimizer_index is not None:
            check_integer("optimizer_index", optimizer_index, 0)
        self.backbone = backbone
        self.what: What = resolved
        self.when = own_when or Every()
        self.lr_scale = lr_scale
        self.bn = bn
        self.warmup_steps = warmup_steps
        self.trainable = list(self._params.trainable)
        self.optimizer_index = optimizer_index
        self.max_step = max_step
        if not (adapt is None or adapt == "auto" or isinstance(adapt, AdaBN)):
            raise ValueError(f"`adapt` must be 'auto', an AdaBN(...) or None, got {adapt!r}.")
        self.adapt = adapt
        self._adaptation = TrainDataAdaptation(None if adapt == "auto" else adapt, "GradualUnfreeze")
        self.compile = compile
        self._compilation = FitCompilation(check_compile_option(compile))
        self._plan: ReleasePlan | None = None
        check_choice("on_loss_rise", on_loss_rise, ON_LOSS_RISE)
        self.on_loss_rise = on_loss_rise
        self._state = FitState(adapt == "auto", self._adaptation, on_loss_rise)
        self._check_at_epoch_end = False

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, backbone=self.backbone)

    @property
    def history(self) -> tuple[ReleaseRecord, ...]:
        """The releases done in the current (or last) fit, in order."""
        return self._fit.unfreezer.history if self._fit is not None else ()

    @property
    def source_shift(self) -> float | None:
        """With ``max_step="auto"``: how far the target's norm statistics were from the backbone's at fit start
        (:mod:`~lightning_bnfreeze.domain_shift`); ``None`` before, without such layers, or with another
        ``max_step``."""
        return self._fit.unfreezer.first_steps.source_shift if self._fit is not None else None

    @property
    def first_step(self) -> float | None:
        """How far the first release's first optimizer step moved its weights (relative; times ``1 / (1 - momentum)``
        for momentum SGD), what ``bn="auto"`` decides from; ``None`` before."""
        return self._fit.unfreezer.first_steps.first_step if self._fit is not None else None

    def plan(self, pl_module: nn.Module) -> ReleasePlan:
        """The resolved release plan for ``pl_module``, without training (checked against the model).

        Raises:
            ValueError: a missing ``backbone``, or names that match nothing (with the closest names).
        """
        get_module(pl_module, self.backbone, "backbone")
        return self.what.plan(pl_module, self.backbone)

    def frozen_at_start(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """The parameters this callback freezes at fit start: the backbone's, but those named in ``trainable``."""
        return self._params.to_freeze(pl_module)

    def dry_run(self, pl_module: nn.Module, max_epochs: int = -1) -> str:
        """The plan as text: the blocks found, each release (time, parts, parameters, learning-rate factor, group).

        Raises:
            ValueError: what a fit would refuse at setup: an unknown name, nothing to train until the first release.
        """
        plan = self.plan(pl_module)
        if not overrides_configure_model(pl_module):  # else the head may come from there: the fit checks after it
            check_something_trains(pl_module, self.backbone, self.frozen_at_start(pl_module), self.when)
        groups = None  # the groups each part joins, if `configure_optimizers` runs on a copy without a trainer
        if isinstance(pl_module, pl.LightningModule):
            with suppress(AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError):
                groups = groups_preview(self._on_copy(pl_module, Budget(1, 1))[0])
        backbone = get_module(pl_module, self.backbone, "backbone")
        statistics = any(layer.running_mean is not None for _, layer in named_norm_layers(backbone))
        table = format_plan(
            plan, self.when, self.lr_scale, self.bn, max_epochs, groups, self.max_step, self.adapt == "auto",
            statistics, self.on_loss_rise,
        )  # fmt: skip
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
        return simulate(*self._on_copy(pl_module, budget), budget)

    def _on_copy(self, pl_module: pl.LightningModule, budget: Budget) -> tuple[Unfreezer, list[SchedulerStep]]:
        return unfreezer_on_copy(
            pl_module, self._params, self.what, self.when, self._settings, self.optimizer_index, budget
        )

    # ------------------------------------------------------------------------------------------ the fit

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)
        check_strategy(trainer.strategy, "GradualUnfreeze")
        self._state.reset()
        self._adaptation.reset()
        self.when.reset()
        self._check_at_epoch_end = checks_on_train_epoch_end(trainer, self.when)
        warn_about_early_stopping(trainer)
        after_configure_model(pl_module, lambda: self._plan_and_freeze(trainer, pl_module))

    def _plan_and_freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = self._compilation.prepare(pl_module, self.backbone, self.plan)  # compiled as `compile` says
        if getattr(self.what, "names", None) is None:
            warn_about_forward_order(self._plan, pl_module)
        warn_about_late_releases(self.when, self._plan, trainer)
        self._params.check_trainable(pl_module)
        warn_about_adapters(self._params.named(pl_module), self._params.is_trainable)
        frozen = self.frozen_at_start(pl_module)
        check_something_trains(pl_module, self.backbone, frozen, self.when)
        for param in frozen:
            param.requires_grad = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning restores the optimizers from a checkpoint: the groups built here must be those saved.
        assert self._plan is not None
        optimizer = self._params.optimizer(trainer.optimizers, pl_module, self.optimizer_index)
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        agree = lambda decision: trainer.strategy.reduce_boolean_decision(decision, all=False)  # noqa: E731
        unfreezer = self._params.unfreezer(
            pl_module, self._plan, self.when, optimizer, schedulers, self._settings,
            GradientSync(trainer.strategy.model), agree,
        )  # fmt: skip
        warn_about_group_rates(unfreezer.groups.own_rates(), initial_lr(unfreezer.groups.head), self.lr_scale)
        backbone = [(name, p) for name, p in self._params.named(pl_module) if id(p) in unfreezer.frozen_ids]
        for other in trainer.optimizers:
            if other is not optimizer:
                ReleasedGroups(other).withdraw(backbone)
        self._state.start(unfreezer, self.remember_statistics)
        if trainer.strategy.restore_checkpoint_after_setup:  # ModelParallelStrategy: it restores after this hook
            before_checkpoint_load(
                trainer.strategy, lambda path: self._state.restore_late(saved_callback_state(path, self.state_key))
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Norm layers are frozen here, after the strategy's SyncBatchNorm conversion and after Lightning's
        # check for modules in eval mode.
        forget_checkpoint_hook(trainer.strategy)  # the checkpoint, if any, is restored by now
        fit = self._running()
        assert self._plan is not None
        warn_about_a_trained_trainer(trainer)  # here, where the trainer knows whether the fit resumes a checkpoint
        warn_about_late_releases(self.when, self._plan, trainer, started=True)
        register_sharded_parameters(pl_module)  # FSDP2: those it trains, whatever the sanity check left registered
        fit.unfreezer.start_norms(BackboneNorms(pl_module, self.backbone, holder=self))
        self._freezer = fit.unfreezer.norms.freezer if fit.unfreezer.norms is not None else None
        layers = self._freezer.layers if self._freezer else ()
        fit.resolve_max_step(trainer, layers)  # from the source statistics, before any AdaBN replaces them
        self._adaptation.run_once(trainer, pl_module, layers)
        self.remember_statistics()
        fit.advance(trainer, "epoch")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._running().advance(trainer, "epoch")
        trainable = sum(param.numel() for param in pl_module.parameters() if param.requires_grad)
        for logger in trainer.loggers:
            logger.log_metrics({"gradual_unfreeze/trainable_params": float(trainable)}, step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._running().before_step(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._running().after_step(trainer, training_loss(outputs))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_at_epoch_end and self._fit is not None:
            self._fit.check_metrics(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_at_epoch_end and self._fit is not None:
            self._fit.check_metrics(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._running().before_optimizer_step(trainer, optimizer)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before a gradient scaler checks for infs: every rank then skips the same steps.
        self._running().unfreezer.after_backward()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._state.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state.load_state_dict(state_dict)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._fit is not None:
            self._fit.train_ended(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        forget_checkpoint_hook(trainer.strategy)  # a fit that failed before training started
        self._compilation.close()
        if self._fit is not None:
            self._fit.close()

    # ------------------------------------------------------------------------------- for other callbacks

    @property
    def releases_left(self) -> int:
        """Releases of the plan not done yet in the fit in progress (0 outside a fit)."""
        return len(self._fit.unfreezer.remaining) if self._fit is not None else 0

    def release_next(
        self, trainer: pl.Trainer, reason: str, metric: str | None = None, value: float | None = None
    ) -> bool:
        """Release the plan's next release now (one per check: ``True`` too if one happened at this step already).

        For callbacks that decide releases themselves, such as :class:`~lightning_bnfreeze.ReleasingEarlyStopping`;
        call it on every rank alike. ``False`` when nothing is left to release.
        """
        return self._fit is not None and self._fit.release_next(trainer, reason, metric, value)

    @property
    def _fit(self) -> FitReleases | None:
        return self._state.fit

    def _running(self) -> FitReleases:
        assert self._fit is not None, "GradualUnfreeze: no fit in progress"
        return self._fit
