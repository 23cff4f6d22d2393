"""The releases of one fit as the trainer meets them: when to ask the :class:`~lightning_bnfreeze.release.Unfreezer`,
and what follows a release (norm layers, loggers, messages). :class:`~lightning_bnfreeze.GradualUnfreeze`'s hooks
only call this."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_bnfreeze.adapt import AdaBN, restore_norm_statistics, saved_norm_statistics
from lightning_bnfreeze.callbacks.adaptation import (
    ADAPT_HOOK,
    ForwardError,
    TrainDataAdaptation,
    adapt_on_train_data,
    runs_on_batches,
    shift_on_train_data,
)
from lightning_bnfreeze.callbacks.base import announce
from lightning_bnfreeze.callbacks.divergence_check import DivergenceCheck
from lightning_bnfreeze.callbacks.early_stopping import monitored_now
from lightning_bnfreeze.callbacks.first_step_gradients import FirstStepGradients
from lightning_bnfreeze.callbacks.fit_checks import epochs_done
from lightning_bnfreeze.callbacks.release_loss import ReleaseLossCheck
from lightning_bnfreeze.callbacks.training_loss import batch_loss
from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.internals import NormBase
from lightning_bnfreeze.norm import is_norm_frozen
from lightning_bnfreeze.record import ReleaseRecord
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.step_size import AUTO_STEP, SMALLEST_REFERENCE

__all__ = ["FitReleases"]


class FitReleases:
    """Drives ``unfreezer`` through one fit; ``statistics_changed`` runs whenever the frozen norm layers change.

    ``on_training_norms``: the AdaBN run over every norm layer of the backbone when ``bn="auto"`` decides that the
    released ones train (``adapt="auto"``), or before the first step far from the source; or ``None``.
    ``on_loss_rise``: what a release after which the training loss rose does (:class:`ReleaseLossCheck`), and a fit
    that diverged after releases (:class:`DivergenceCheck`).
    """

    def __init__(
        self,
        unfreezer: Unfreezer,
        adaptation: TrainDataAdaptation,
        statistics_changed: Callable[[], None],
        on_training_norms: AdaBN | None = None,
        on_loss_rise: str = "retry",
    ) -> None:
        self.unfreezer = unfreezer
        self._adaptation = adaptation
        self._statistics_changed = statistics_changed
        self.on_training_norms = on_training_norms
        self.source_statistics: list[tuple[Tensor, Tensor]] | None = None  # adapted for the head: the source's
        self._unsettled = False  # a release during validation: norm layers take their modes at the next step
        # adapted for the head under an optimizer whose first step is not bounded: the first release's gradients
        self.first_step_gradients = FirstStepGradients(unfreezer)
        self.loss_check = ReleaseLossCheck(unfreezer, on_loss_rise)
        self.divergence_check = DivergenceCheck(unfreezer, on_loss_rise)

    def resolve_max_step(self, trainer: pl.Trainer, layers: Sequence[NormBase]) -> None:
        """``max_step="auto"`` not resolved yet (a fresh fit): measure the target's shift from ``layers``' statistics
        and say what it chose; far from the source, :meth:`_adapt_for_the_head`."""
        first_steps = self.unfreezer.first_steps
        if not first_steps.unresolved:
            return
        try:
            shift = shift_on_train_data(trainer, trainer.lightning_module, layers, "GradualUnfreeze")
        except ForwardError as error:
            adapt = ", and adapt='auto' re-estimates no norm statistics" if self.on_training_norms is not None else ""
            self._cannot_run(error, f"until then max_step='auto' runs without a cap (max_step=None){adapt}")
            announce(trainer, f"GradualUnfreeze: {first_steps.resolve(None, 'the model could not run on a batch')}.")
            return
        announce(trainer, f"GradualUnfreeze: {first_steps.resolve(shift)}.")
        if shift is None or shift < NEAR_SOURCE:
            return
        self._adapt_for_the_head(trainer)

    def _cannot_run(self, error: ForwardError, consequence: str) -> None:
        """The model raised on a training batch (``error`` names the fix): ``adapt="auto"`` is off for the rest of the
        fit, as it would raise too; one warning says so, with what else it turns off (``consequence``)."""
        self.on_training_norms = None
        rank_zero_warn(f"{error}; {consequence}.")

    def _adapt_for_the_head(self, trainer: pl.Trainer) -> None:
        """``adapt="auto"`` with ``bn="auto"`` far from the source: every norm layer of the backbone takes the target's
        statistics before the first step, so that the head fits features normalised as they will be once released
        norm layers train; the source's are kept (:attr:`source_statistics`) and come back if they stay frozen.

        Not when the released norm layers are known to keep frozen statistics: under Adam or AdamW when no release's
        first step can pass :data:`~lightning_bnfreeze.step_size.AUTO_STEP`
        (:meth:`~lightning_bnfreeze.release.Unfreezer.first_step_bound`), the head then fits the source's; under
        other optimizers the first release's weights get gradients in the first optimizer step, and the source's
        come back after it if the first step they give is that small (:meth:`before_optimizer_step`)."""
        config, layers, pl_module = self.on_training_norms, self._backbone_layers(), trainer.lightning_module
        if config is None or self.unfreezer.bn != "auto" or not layers or not runs_on_batches(pl_module):
            return
        bound = self.unfreezer.first_step_bound()
        if bound is not None and bound <= AUTO_STEP:
            optimizer = type(self.unfreezer.groups.optimizer).__name__
            announce(
                trainer,
                f"GradualUnfreeze: the backbone's norm statistics stay the source's for the head (adapt='auto'): under"
                f" {optimizer} no release's first step can move its weights by more than {bound:.2%} (<="
                f" {AUTO_STEP:.1%}), so the released norm layers will keep frozen statistics (bn='auto').",
            )
            return
        why = (
            ": the backbone's, far from its source, before the first step (adapt='auto'); the source's come back if"
            " the released norm layers keep frozen statistics"
        )
        source = saved_norm_statistics(layers)
        if self._adapt(trainer, layers, config, why):
            self.source_statistics = source
            self.first_step_gradients.due = bound is None

    def before_optimizer_step(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        """The first optimizer step of a fit adapted for the head under an optimizer whose first step is not bounded:
        the first step the first release would take from this step's gradients (:class:`FirstStepGradients`); at
        most :data:`~lightning_bnfreeze.step_size.AUTO_STEP` on every rank, the source's statistics come back now, as
        the released norm layers are then to keep frozen ones (``bn="auto"`` still decides from the release's own
        first step, and adapts again if it is larger). A step that a gradient scaler skips (an overflow) leaves the
        decision to the first one it takes."""
        step = self.first_step_gradients.read(trainer, optimizer)
        if step is None:
            return
        would = f"from the first step's gradients, the first release's first step would move its weights by {step:.2%}"
        if trainer.strategy.reduce_boolean_decision(SMALLEST_REFERENCE < step <= AUTO_STEP, all=True):
            why = f"{would} (<= {AUTO_STEP:.1%}), so the released norm layers will keep frozen statistics (bn='auto')"
            self._restore_source_statistics(trainer, why)
            return
        why = f"{would} (> {AUTO_STEP:.1%})" if step > AUTO_STEP else "the first step's gradients did not say"
        announce(
            trainer,
            f"GradualUnfreeze: the backbone's norm statistics stay the target's (adapt='auto'): {why}; the first"
            " release's own first step decides (bn='auto').",
        )

    def advance(self, trainer: pl.Trainer, checked_at: str) -> None:
        """Release what the trigger says is due at this moment (``"epoch"`` or ``"step"`` checks)."""
        unfreezer = self.unfreezer
        if unfreezer.trigger.checked_at != checked_at or not unfreezer.remaining:
            return
        moment = unfreezer.moment(trainer.current_epoch, trainer.global_step)
        for record in unfreezer.advance(moment, checked_at):
            self._released(trainer, record)

    def before_step(self, trainer: pl.Trainer) -> None:
        """Step-timed releases, norm layers left by a release during validation; at an epoch's first batch, the
        epoch before it judged (:class:`DivergenceCheck`); the first-step measure; at the first step, the first
        release's gradients if :meth:`before_optimizer_step` is to read them; at a release's first step, the
        snapshot its loss check may go back to."""
        self.advance(trainer, "step")
        if self._unsettled:
            self._settle(trainer)
        # not an epoch the first release's loss watch was open in: the watch judges those batches
        watched = self.loss_check.watching and self.unfreezer.released_before(trainer.global_step)
        if self.divergence_check.judge_epoch(trainer, may_judge=not watched):
            self._statistics_changed()
        self.unfreezer.before_step(trainer.global_step)
        self.first_step_gradients.before_step(trainer.global_step)
        self.loss_check.before_step(trainer)

    def after_step(self, trainer: pl.Trainer, loss: Tensor | None = None) -> None:
        """The released blocks' first step (``bn="auto"``, ``max_step``), then the released rates follow the head's;
        the batch's training ``loss``, if known, joins the divergence check and the first release's loss check
        (:meth:`_undone`)."""
        if loss is not None:
            loss = batch_loss(trainer, loss)
            self.divergence_check.record(trainer, loss)
            if undone := self.loss_check.record(trainer, loss):
                self.divergence_check.forget(undone)
                self._undone(trainer)
        self.first_step_gradients.after_step(trainer.global_step)
        undecided = self.unfreezer.first_steps.norms_train is None
        notes = self.unfreezer.after_step(trainer.global_step)
        for note in notes:
            if note.warning:
                rank_zero_warn(f"GradualUnfreeze: {note.text}.")
            else:
                announce(trainer, f"GradualUnfreeze: {note.text}.")
        if undecided and self.unfreezer.first_steps.norms_train is not None:
            self._settle_statistics(trainer, self.unfreezer.first_steps.norms_train)
        if notes:
            self._statistics_changed()
        # After the LR schedulers' step: the released groups follow at once, whatever the callbacks' order.
        self.unfreezer.groups.tie_to_head(trainer.global_step)

    def _undone(self, trainer: pl.Trainer) -> None:
        """The first release was undone (its loss rose): with ``adapt="auto"``, the released norm layers that train
        take the target's statistics again, on the weights put back (their running ones went back with them; the
        frozen ones kept theirs); the norm modes, caps and decay decided from its first step stand."""
        config, pl_module = self.on_training_norms, trainer.lightning_module
        training = [layer for layer in self._backbone_layers() if not is_norm_frozen(layer)]
        if self.unfreezer.first_steps.norms_train and config is not None and training and runs_on_batches(pl_module):
            why = ": the released ones', on the weights put back after the first release's loss rose (adapt='auto')"
            self._adapt(trainer, training, config, why)
        self._statistics_changed()

    def _settle_statistics(self, trainer: pl.Trainer, norms_train: bool) -> None:
        """``bn="auto"`` just decided: with ``adapt="auto"``, the backbone's statistics become the target's as
        released norm layers start training (:meth:`_adapt_as_norms_start_training`; they are already, if adapted
        for the head); if adapted for the head and the released norm layers stay frozen, the source's come back."""
        if self.source_statistics is not None:
            if not norms_train:
                self._restore_source_statistics(trainer, "the released norm layers keep frozen statistics")
            self.source_statistics = None
        elif norms_train:
            self._adapt_as_norms_start_training(trainer)

    def train_ended(self, trainer: pl.Trainer) -> None:
        """A fit that ended normally: the loss checks' last word (the first release's watch, if still open, judges
        the last batches alone)."""
        watching = self.loss_check.watching
        self.loss_check.close(trainer)
        self.divergence_check.close(trainer, may_judge=not watching)

    def close(self) -> None:
        """At the fit's end: the unfreezer's hooks removed, frozen weights without gradients, the loss checks'
        copies dropped."""
        self.first_step_gradients.close()
        self.loss_check.discard()
        self.divergence_check.discard()
        self.unfreezer.close()
        self.unfreezer.norms = None

    def _restore_source_statistics(self, trainer: pl.Trainer, why: str) -> None:
        """The source's statistics, adapted for the head, come back to the backbone; ``why`` says why."""
        assert self.source_statistics is not None
        restore_norm_statistics(self._backbone_layers(), self.source_statistics)
        self.source_statistics = None
        self._statistics_changed()
        announce(
            trainer, f"GradualUnfreeze: the backbone's norm statistics are the source's again (adapt='auto'): {why}."
        )

    def _backbone_layers(self) -> list[NormBase]:
        """Every norm layer of the backbone that keeps running statistics."""
        norms = self.unfreezer.norms
        return norms.with_statistics if norms is not None else []

    def _adapt_as_norms_start_training(self, trainer: pl.Trainer) -> None:
        """``adapt="auto"``, as ``bn="auto"`` decides that released norm layers train: every norm layer of the
        backbone takes the target's statistics (blended with the source's) at once, not over the coming batches."""
        config, layers, pl_module = self.on_training_norms, self._backbone_layers(), trainer.lightning_module
        if config is None or not layers:
            return
        if not runs_on_batches(pl_module):
            rank_zero_warn(
                f"GradualUnfreeze: adapt='auto' runs the model on training batches as released norm layers start"
                f" training, but {type(pl_module).__name__} defines neither `forward` nor `{ADAPT_HOOK}(batch)`: the"
                " statistics stay the source's. Define one of them, or set `adapt=None`."
            )
            return
        why = ": the backbone's, as its released norm layers start training (adapt='auto')"
        self._adapt(trainer, layers, config, why)

    def _adapt(self, trainer: pl.Trainer, layers: Sequence[NormBase], config: AdaBN, why: str) -> bool:
        """``layers`` adapted to the training batches (``why`` ends the line that says so); ``False``, with their
        statistics as they were and :meth:`_cannot_run`'s warning, where the model raised on a batch."""
        try:
            adapt_on_train_data(trainer, trainer.lightning_module, layers, config, "GradualUnfreeze", why)
        except ForwardError as error:
            self._cannot_run(error, "the norm statistics stay as they were; set `adapt=None` to silence this")
            return False
        return True

    def check_metrics(self, trainer: pl.Trainer) -> None:
        """A metric-driven trigger's check (``Plateau``), after validation or at the training epoch's end."""
        unfreezer = self.unfreezer
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if unfreezer.trigger.checked_at != "metrics" or not unfreezer.remaining or self._released_at(trainer):
            return
        moment = unfreezer.moment(epochs_done(trainer), trainer.global_step, monitored_now(trainer))
        reason = unfreezer.trigger.check(moment)
        # every rank releases when any says so: param groups stay identical across ranks
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            metric = getattr(unfreezer.trigger, "monitor", None)
            value = moment.metrics.get(metric) if isinstance(metric, str) else None
            self._released(
                trainer, unfreezer.release(moment, reason or "plateau", value, metric, trainer.current_epoch)
            )

    def release_next(self, trainer: pl.Trainer, reason: str, metric: str | None, value: float | None) -> bool:
        """The next release now, unless a metric check released at this step already; ``False``: nothing left."""
        unfreezer = self.unfreezer
        if not unfreezer.remaining:
            return False
        if not self._released_at(trainer):
            moment = unfreezer.moment(epochs_done(trainer), trainer.global_step, monitored_now(trainer))
            self._released(trainer, unfreezer.release(moment, reason, value, metric, trainer.current_epoch))
        return True

    def _released_at(self, trainer: pl.Trainer) -> bool:
        """Whether a release happened at this optimizer step by a metric check (one release per check)."""
        history = self.unfreezer.history
        return bool(history) and history[-1].reason != "scheduled" and history[-1].step == trainer.global_step

    def _released(self, trainer: pl.Trainer, record: ReleaseRecord) -> None:
        register_sharded_parameters(trainer.lightning_module)  # FSDP2: release those it trains
        # During validation modules are in eval mode, and Lightning restores the modes it found when it ends:
        # released norm layers take their training mode at the next training step instead.
        self._unsettled = True
        if not trainer.validating:
            self._settle(trainer)
        logged = {"gradual_unfreeze/release": float(record.index)}
        if record.value is not None:
            logged["gradual_unfreeze/release_value"] = record.value
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        announce(trainer, f"GradualUnfreeze: {self.unfreezer.describe(record)}")
        self.loss_check.released(trainer, record)

    def _settle(self, trainer: pl.Trainer) -> None:
        """Norm layers as the releases leave them (and re-estimated, with ``AdaBN(on_release=True)``)."""
        self.unfreezer.update_norms()
        config, norms = self._adaptation.config, self.unfreezer.norms
        if config is not None and config.on_release and norms is not None:
            self._adaptation.run(trainer, trainer.lightning_module, norms.freezer.layers)
        self._statistics_changed()
        self._unsettled = False
