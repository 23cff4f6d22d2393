"""One object that owns a backbone's releases, from the decision to the record, in plain PyTorch.

:class:`Unfreezer` freezes a backbone, asks its trigger when the next release of its plan is due,
and carries the release out: the parameters train in named param groups at their learning rate
(:class:`~lightning_bnfreeze.released_groups.ReleasedGroups`), their gradients are averaged where a
DDP reducer leaves them out (:class:`~lightning_bnfreeze.distributed.GradientSync`), their norm layers
take the mode the norm policy gives them (:class:`~lightning_bnfreeze.freezer.BackboneNorms`), their first
steps are measured, capped and decide that mode (:class:`~lightning_bnfreeze.first_steps.FirstSteps`), and a
:class:`ReleaseRecord` joins the history, the state a checkpoint keeps. The Lightning callback only
tells it where the fit stands; :mod:`lightning_bnfreeze.lr_preview` drives the same object without training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from lightning_bnfreeze.checks import check_choice
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.first_step_estimates import RatedPart, first_step_bound, largest_lr
from lightning_bnfreeze.first_steps import FirstSteps
from lightning_bnfreeze.freezer import BackboneNorms, set_requires_grad
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.loss_rise import RETRY_SCALE
from lightning_bnfreeze.part_groups import PartGroups
from lightning_bnfreeze.plan import ReleasedPart, ReleasePlan
from lightning_bnfreeze.record import FirstStepNote, ReleaseRecord
from lightning_bnfreeze.released_groups import ReleasedGroup, ReleasedGroups
from lightning_bnfreeze.saved_releases import check_saved_releases
from lightning_bnfreeze.step_size import AUTO_STEP, RELEASED, MaxStep, momentum_of
from lightning_bnfreeze.triggers import Every, Moment, Trigger

__all__ = ["NORM_MODES", "Unfreezer"]

NORM_MODES = ("auto", "train", "frozen")


class Unfreezer:
    """The releases of ``plan`` on ``root``: when ``trigger`` says, at ``lr_scale`` times each part's factor.

    Args:
        root: the model whose parameters the plan names (the LightningModule).
        plan: what each release frees.
        trigger: when the next release is due.
        groups: the optimizer's released groups (it holds the head's group, the schedulers, the warm-up).
        gradients: averages released gradients that a DDP reducer leaves out (``None``: no DDP).
        lr_scale: the learning rate of a released part relative to the head's, times the part's factor.
        bn: what a released part's norm layers do: ``"train"``, ``"frozen"`` or ``"auto"``
            (:class:`~lightning_bnfreeze.first_steps.FirstSteps`, which measures each part's first step).
        trainable: parameters inside the backbone that train from the first step (never frozen).
        agree: turns a local decision into the decision of every rank (``any``; default: as it is).
        max_step: the cap on a released part's first step, kept by scaling its rate, and with ``"auto"`` near the
            source the decay of later releases (``FirstSteps.rate_factor``).

    The norm layers are left alone until :meth:`start_norms` (Lightning: at ``on_train_start``).
    """

    def __init__(
        self,
        root: nn.Module,
        plan: ReleasePlan,
        trigger: Trigger,
        groups: ReleasedGroups,
        gradients: GradientSync | None = None,
        lr_scale: float = 1.0,
        bn: str = "auto",
        trainable: Iterable[nn.Parameter] = (),
        agree: Callable[[bool], bool] = bool,
        max_step: MaxStep = None,
    ) -> None:
        check_choice("bn", bn, NORM_MODES)
        self.root = root
        self.plan = plan
        self.trigger = trigger
        self.groups = groups
        self.gradients = gradients if gradients is not None else GradientSync(None)
        self.lr_scale = lr_scale
        self.bn = bn
        self.norms: BackboneNorms | None = None
        self._trainable = {id(param) for param in trainable}
        self._history: list[ReleaseRecord] = []
        self._last_release: tuple[float, int] | None = None
        self.first_steps = FirstSteps(bn, max_step, agree)
        self._parts = PartGroups(groups, self.gradients)

    @property
    def history(self) -> tuple[ReleaseRecord, ...]:
        """The releases done, in order."""
        return tuple(self._history)

    def released_before(self, step: int) -> bool:
        """Whether the first release came before optimizer step ``step``: released blocks have trained."""
        return bool(self._history) and self._history[0].step < step

    @property
    def retry_scale(self) -> float:
        """What the retries after a loss rise or a divergence (:meth:`slow_down`) left every later release's rate
        at."""
        return RETRY_SCALE ** sum(record.retries for record in self._history)

    @property
    def remaining(self) -> list[int]:
        """Indices of the plan's releases not done yet, in order."""
        return list(range(len(self._history), len(self.plan.releases)))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters that the plan freezes and releases (not those named always trainable)."""
        backbone = self.root.get_submodule(self.plan.backbone)
        return [param for param in backbone.parameters() if id(param) not in self._trainable]

    @property
    def frozen_ids(self) -> set[int]:
        """``id`` of each parameter :meth:`freeze` freezes."""
        return {id(param) for param in self.backbone_parameters()}

    def freeze(self) -> None:
        """The state at fit start: the backbone frozen."""
        set_requires_grad(self.backbone_parameters(), False)

    def restore(self) -> None:
        """Rebuild the releases of the history (a resumed fit, after :meth:`load_state_dict`) that are not yet,
        in their saved order."""
        register_sharded_parameters(self.root)  # FSDP2: the parameters it trains
        for index, record in enumerate(self._history):
            if (index, 0) not in self._parts:
                added = self._add(index, record.step, record.lr_factors)
                self.groups.restore_order(added, record.positions)

    def start_norms(self, norms: BackboneNorms) -> None:
        """From now on keep the backbone's norm layers as the releases say (without one that keeps running statistics,
        the first steps' notes say nothing of norm modes)."""
        self.norms = norms
        self.first_steps.modes_matter = bool(norms.with_statistics)
        self.update_norms()

    def moment(self, epoch: float, step: int, metrics: Mapping[str, float] | None = None) -> Moment:
        """Where the fit stands, as the trigger sees it."""
        return Moment(epoch, step, len(self._history), self._last_release, dict(metrics or {}))

    def advance(self, moment: Moment, checked_at: str) -> list[ReleaseRecord]:
        """Ask the trigger at a check point of kind ``checked_at`` and carry out what is due; the new records."""
        done: list[ReleaseRecord] = []
        while self.remaining and self.trigger.checked_at == checked_at:
            reason = self.trigger.check(moment)
            if reason is None:
                break
            value = None
            metric = getattr(self.trigger, "monitor", None)
            if checked_at == "metrics" and isinstance(metric, str) and metric in moment.metrics:
                value = moment.metrics[metric]
            done.append(self.release(moment, reason, value, metric))
            moment = self.moment(moment.epoch, moment.step, moment.metrics)
            if checked_at == "metrics":
                break  # one release per check
        return done

    def release(
        self,
        moment: Moment,
        reason: str,
        value: float | None = None,
        metric: str | None = None,
        epoch: int | None = None,
    ) -> ReleaseRecord:
        """Carry out the next release of the plan now, in ``epoch`` (default: ``int(moment.epoch)``; a check at
        an epoch's end has ``moment.epoch`` at the next epoch's start).

        Its norm layers take their mode at the next :meth:`update_norms`: call it while the model is in
        training mode (a released layer takes its parent's mode; during validation, at the next training step).

        Raises:
            IndexError: every release is done.
        """
        if not self.remaining:
            raise IndexError("every release of the plan is done")
        register_sharded_parameters(self.root)  # FSDP2: release the parameters it trains, not unsharded copies
        index = len(self._history)
        parts = self.plan.releases[index]
        decay = self.first_steps.rate_factor(index)
        factors = tuple(self.lr_scale * part.lr_factor * decay * self.retry_scale for part in parts)
        added = self._add(index, moment.step, factors)
        trains = (self.bn == "train" or (self.bn == "auto" and self.first_steps.norms_train is True),) * len(parts)
        self.first_steps.expect(index, len(parts))
        epoch = int(moment.epoch) if epoch is None else epoch
        record = ReleaseRecord(
            index, epoch, moment.step, reason, self.groups.positions(added), value, metric, trains, factors,
            tuple(part.name for part in parts),
        )  # fmt: skip
        self._history.append(record)
        self._last_release = (float(moment.epoch), moment.step)
        self.groups.tie_to_head(moment.step)
        self.trigger.released(self.moment(moment.epoch, moment.step, moment.metrics))
        return record

    def slow_down(self, index: int) -> None:
        """Release ``index`` retried after a loss rise (or, from the first, the fit gone back after it diverged): it
        and every release after it at :data:`~lightning_bnfreeze.loss_rise.RETRY_SCALE` times their rates, now and
        for the releases to come (:attr:`retry_scale`)."""
        self._history[index] = replace(self._history[index], retries=self._history[index].retries + 1)
        for later in self._history[index:]:
            for position in range(len(later.lr_factors)):
                self._scale_part(later.index, position, RETRY_SCALE)

    def before_step(self, step: int) -> None:
        """Before an optimizer step (each batch it accumulates): released groups at their rate, frozen norm layers
        as they must be, and the weights of the parts this step is the first of."""
        self.groups.tie_to_head(step)
        if self.norms is not None:
            self.norms.enforce()
        params = dict(self.root.named_parameters())
        self.first_steps.snapshot(lambda part: self._released_params(self.plan.releases[part[0]][part[1]], params))

    def after_step(self, step: int) -> list[FirstStepNote]:
        """After a batch, with ``step`` optimizer steps done: measure the first step of the parts released last, cap
        it (``max_step``), and with ``bn="auto"`` decide every release's norm mode
        (:class:`~lightning_bnfreeze.first_steps.FirstSteps`).

        Returns a note for each part whose rate the cap scaled, one for the norm mode decided, a warning for each
        part whose norm mode is one the real-weights benchmark saw fail at such a step size, and, far from the source
        after a fast first step, what did better there (:meth:`_earlier_start`).
        """
        measured = self.first_steps.first_step is not None
        done = self.first_steps.taken(lambda index: self._history[index].step, step)
        reference = None
        if done and self.first_steps.max_step == RELEASED:
            reference = self._parts.largest_step_before(min(index for index, _ in done))
        notes = []
        for index, position in done:
            name = self.plan.releases[index][position].name
            faster = self._parts.step_now((index, position)) / reference if reference else None
            scale, note = self.first_steps.judge(
                (index, position), name, momentum_of(self.groups.head), self.groups.warmup(0), faster
            )
            if scale < 1:
                self._scale_part(index, position, scale)
            notes += [note] if note is not None else []
        for since, train, note in self.first_steps.decide():  # bn="auto": the mode from release `since` on
            notes += [note] if note is not None else []
            self._history[since:] = [
                replace(r, train_norms=(train,) * len(r.train_norms)) for r in self._history[since:]
            ]
        if done:
            self.update_norms()
        if not measured and (note := self._earlier_start()) is not None:
            notes.append(note)
        return notes

    def _earlier_start(self) -> FirstStepNote | None:
        """Just measured: far from the source (``max_step="auto"``'s measure), a first release whose first step was
        above :data:`AUTO_STEP` after the head trained alone (an :class:`Every` that waits): what did better there."""
        step, shift, trigger = self.first_steps.first_step, self.first_steps.source_shift, self.trigger
        if step is None or step <= AUTO_STEP or shift is None or shift < NEAR_SOURCE:
            return None
        if not isinstance(trigger, Every) or trigger.first == 0:
            return None
        return FirstStepNote.earlier_start(shift, step, trigger.unit, trigger.every)

    def after_backward(self) -> None:
        """After a backward: reduce the released gradients a DDP reducer leaves out."""
        self.gradients.finish_backward()

    def first_step_bound(self) -> float | None:
        """Under Adam or AdamW, before any step: the most the first step of any release of the plan can move its
        part's weights (:func:`~lightning_bnfreeze.first_step_estimates.first_step_bound`, each part at its
        :meth:`largest_rates`); ``None`` under other optimizers, whose first step depends on the gradient.

        A collective under FSDP2 (sharded weights): call it on every rank alike.
        """
        return first_step_bound(self.groups.optimizer, self.largest_rates(range(len(self.plan.releases))))

    def largest_rates(self, releases: Iterable[int]) -> list[RatedPart]:
        """Each part of ``releases``: its parameters and the largest rate it can start at, the head's
        :func:`~lightning_bnfreeze.first_step_estimates.largest_lr` times ``lr_scale`` and the part's factor."""
        head_lr = largest_lr(self.groups.head) * self.lr_scale
        params = dict(self.root.named_parameters())
        return [
            (self._released_params(part, params), head_lr * part.lr_factor)
            for index in releases
            for part in self.plan.releases[index]
        ]

    def describe(self, record: ReleaseRecord) -> str:
        """One line for the log: when and why, each part with its parameters, learning rate and norm mode."""
        head_lr = self.groups.head["lr"]
        parts = self.plan.releases[record.index]
        modes = {True: ", norm layers train", False: ", norm layers frozen", None: ""}
        if self.bn == "auto" and self.first_steps.norms_train is None:
            modes[False] = ", norm layers frozen until the first release's first step says"
        params = dict(self.root.named_parameters())
        described = [
            f"{part.name} ({part.numel:,} params, lr {head_lr * factor:.3g} = {factor:.3g} x head{modes[train]})"
            if self._released_params(part, params)
            else f"{part.name} ({part.numel:,} params, training from the first step: `trainable`)"
            for part, factor, train in zip(parts, record.lr_factors, self._norm_modes(record), strict=True)
        ]
        return f"{record.when(self.trigger.unit)}: released {'; '.join(described)}."

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [record.to_dict() for record in self._history],
            "last_release": None if self._last_release is None else list(self._last_release),
            "trigger": self.trigger.state_dict(),
            "settings": {"lr_scale": self.lr_scale, "bn": self.bn},
            **self.first_steps.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back a checkpoint's history and trigger state (call :meth:`freeze` after, to rebuild the groups).

        Raises:
            ValueError: releases this plan under this ``bn`` would not have made
                (:func:`~lightning_bnfreeze.saved_releases.check_saved_releases`).
        """
        history = [ReleaseRecord.from_dict(record) for record in state.get("history", ())]
        check_saved_releases(history, self.plan, self.bn, state.get("settings", {}).get("bn", self.bn))
        self._history = history
        last = state.get("last_release")
        self._last_release = None if last is None else (float(last[0]), int(last[1]))
        self.first_steps.load_state_dict(state)
        self.trigger.load_state_dict(dict(state.get("trigger", {})))

    def close(self) -> None:
        self.gradients.close()

    def _add(self, index: int, step: int, factors: Sequence[float]) -> list[ReleasedGroup]:
        params = dict(self.root.named_parameters())
        added = []
        for position, (part, factor) in enumerate(zip(self.plan.releases[index], factors, strict=True)):
            added += self._parts.add((index, position), self._released_params(part, params), part.name, factor, step)
        return added

    def _released_params(self, part: ReleasedPart, params: Mapping[str, nn.Parameter]) -> list[nn.Parameter]:
        """The parameters of ``part`` that its release frees: not those named always trainable, which train in their
        own group from the first step (their steps are neither a release's nor measured as one)."""
        return [params[name] for name in part.params if id(params[name]) not in self._trainable]

    def _scale_part(self, index: int, position: int, scale: float) -> None:
        """Scale a released part's learning-rate factor (its record and its groups) by ``scale``."""
        record = self._history[index]
        factors = tuple(f * scale if i == position else f for i, f in enumerate(record.lr_factors))
        self._history[index] = replace(record, lr_factors=factors)
        self._parts.set_lr_factor((index, position), factors[position])

    def update_norms(self) -> None:
        """Put the norm layers in the modes the releases give them (call when modules may have changed modes)."""
        if self.norms is None:
            return
        params = dict(self.root.named_parameters())
        released: dict[int, bool] = {}
        for record in self._history:
            for part, train in zip(self.plan.releases[record.index], record.train_norms, strict=True):
                released.update((id(params[name]), train) for name in part.params)
        self.norms.update(released)

    def _norm_modes(self, record: ReleaseRecord) -> list[bool | None]:
        params = dict(self.root.named_parameters())
        parts = self.plan.releases[record.index]
        return [
            train if self.norms is None or self.norms.holds_norms(params[n] for n in part.params) else None
            for part, train in zip(parts, record.train_norms, strict=True)
        ]
