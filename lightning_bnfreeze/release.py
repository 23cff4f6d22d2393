"""One object that owns a backbone's releases, from the decision to the record, in plain PyTorch.

:class:`Unfreezer` freezes a backbone, asks its trigger when the next release of its plan is due,
and carries the release out: the parameters train in named param groups at their learning rate
(:class:`~lightning_bnfreeze.released_groups.ReleasedGroups`), their gradients are averaged where a
DDP reducer leaves them out (:class:`~lightning_bnfreeze.distributed.GradientSync`), their norm layers
take the mode the norm policy gives them (:class:`~lightning_bnfreeze.freezer.BackboneNorms`), and a
:class:`ReleaseRecord` joins the history, the state a checkpoint keeps. The Lightning callback only
tells it where the fit stands; :mod:`lightning_bnfreeze.lr_preview` drives the same object without training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from torch import nn

from lightning_bnfreeze.checks import check_choice
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.freezer import BackboneNorms, set_requires_grad
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.plan import ReleasePlan
from lightning_bnfreeze.record import FirstStepNote, ReleaseRecord
from lightning_bnfreeze.released_groups import ReleasedGroup, ReleasedGroups
from lightning_bnfreeze.step_size import AUTO_STEP, FIRST, SMALLEST_REFERENCE, FirstStep, momentum_of
from lightning_bnfreeze.triggers import Moment, Trigger

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
        bn: what a released part's norm layers do: ``"train"`` (batch statistics, as without freezing),
            ``"frozen"`` (inference mode, frozen statistics, affine parameters training), or ``"auto"``:
            frozen until the part's first optimizer step, then training if that step moved its weights
            by more than :data:`AUTO_STEP` (relative; times ``1 / (1 - momentum)`` for momentum SGD).
        trainable: parameters inside the backbone that train from the first step (never frozen).
        agree: turns a local decision into the decision of every rank (``any``; default: as it is).
        max_step: a cap on a released part's first step (relative, momentum included), kept by scaling its rate:
            ``None`` (default): no cap; ``"first"``: the largest first step of the parts of the first release that
            moved by more than :data:`~lightning_bnfreeze.step_size.SMALLEST_REFERENCE`, for every later release; a
            number: that cap for every release.

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
        max_step: float | Literal["first"] | None = None,
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
        self._agree = agree
        self._trainable = {id(param) for param in trainable}
        self._history: list[ReleaseRecord] = []
        self._last_release: tuple[float, int] | None = None
        self._undecided: list[tuple[int, int]] = []  # bn="auto": (release, part) whose first step is still to come
        self._before: dict[tuple[int, int], FirstStep] = {}
        self.max_step = max_step
        self._first_index: int | None = None  # max_step="first": the first release whose weights moved,
        self._first_step = 0.0  # and the largest first step of its parts
        self._groups_of: dict[tuple[int, int], list[ReleasedGroup]] = {}

    @property
    def history(self) -> tuple[ReleaseRecord, ...]:
        """The releases done, in order."""
        return tuple(self._history)

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
            if (index, 0) not in self._groups_of:
                added = self._add(index, record.step, record.lr_factors)
                self.groups.restore_order(added, record.positions)

    def start_norms(self, norms: BackboneNorms) -> None:
        """From now on keep the backbone's norm layers as the releases say."""
        self.norms = norms
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
        factors = tuple(self.lr_scale * part.lr_factor for part in parts)
        added = self._add(index, moment.step, factors)
        trains = (self.bn == "train",) * len(parts)
        self._undecided += [(index, position) for position in range(len(parts))]
        epoch = int(moment.epoch) if epoch is None else epoch
        record = ReleaseRecord(
            index, epoch, moment.step, reason, self.groups.positions(added), value, metric, trains, factors
        )
        self._history.append(record)
        self._last_release = (float(moment.epoch), moment.step)
        self.groups.tie_to_head(moment.step)
        self.trigger.released(self.moment(moment.epoch, moment.step, moment.metrics))
        return record

    def before_step(self, step: int) -> None:
        """Before an optimizer step (each batch it accumulates): released groups at their rate, frozen norm layers
        as they must be, and with ``bn="auto"`` the weights of the parts this step is the first of."""
        self.groups.tie_to_head(step)
        if self.norms is not None:
            self.norms.enforce()
        params = dict(self.root.named_parameters())
        for index, position in self._undecided:
            if (index, position) not in self._before:
                part = self.plan.releases[index][position]
                self._before[index, position] = FirstStep(params[name] for name in part.params)

    def after_step(self, step: int) -> list[FirstStepNote]:
        """After a batch, with ``step`` optimizer steps done: measure the first step of the parts released last
        (:class:`~lightning_bnfreeze.step_size.FirstStep`), cap it (``max_step``), and with ``bn="auto"`` decide their
        norm mode.

        Returns a note for each part whose norm layers start training or whose rate the cap scaled, and a warning
        for each part whose fixed ``bn`` mode is one the real-weights benchmark saw fail at such a step size.
        """
        done = [key for key in self._undecided if key in self._before and self._history[key[0]].step < step]
        notes = []
        for index, position in done:
            self._undecided.remove((index, position))
            # as at the full rate: the warm-up's factor on the first step divided out
            ramp = self.groups.warmup(0)
            change = self._before.pop((index, position)).change(momentum_of(self.groups.head)) / ramp
            cap = self._step_cap(index)
            part = self.plan.releases[index][position].name
            moved = f"{part}: its first step {'at the full rate ' if ramp < 1 else ''}moved its weights by {change:.2%}"
            scale = 1.0 if cap is None or change <= cap else cap / change
            if scale < 1:
                self._scale_part(index, position, scale)
                change *= scale
                moved += f", above the cap: its rate is scaled by {scale:.2f}, to steps of {change:.2%}"
            if self._first_index in (None, index) and change > SMALLEST_REFERENCE:  # the first release that moved
                self._first_index, self._first_step = index, max(self._first_step, change)
            large = self._agree(change > AUTO_STEP)
            if self.bn == "auto" and large:
                record = self._history[index]
                trains = tuple(train or i == position for i, train in enumerate(record.train_norms))
                self._history[index] = replace(record, train_norms=trains)
            note = FirstStepNote.judge(moved, self.bn, large, scale < 1)
            notes += [note] if note is not None else []
        if done:
            self.update_norms()
        return notes

    def after_backward(self) -> None:
        """After a backward: reduce the released gradients a DDP reducer leaves out."""
        self.gradients.finish_backward()

    def describe(self, record: ReleaseRecord) -> str:
        """One line for the log: when and why, each part with its parameters, learning rate and norm mode."""
        head_lr = self.groups.head["lr"]
        parts = self.plan.releases[record.index]
        modes = {True: ", norm layers train", False: ", norm layers frozen", None: ""}
        if self.bn == "auto":
            modes[False] = ", norm layers frozen until its first step says"
        described = [
            f"{part.name} ({part.numel:,} params, lr {head_lr * factor:.3g} = {factor:.3g} x head{modes[train]})"
            for part, factor, train in zip(parts, record.lr_factors, self._norm_modes(record), strict=True)
        ]
        return f"{record.when(self.trigger.unit)}: released {'; '.join(described)}."

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [record.to_dict() for record in self._history],
            "last_release": None if self._last_release is None else list(self._last_release),
            "undecided": [list(key) for key in self._undecided],
            "trigger": self.trigger.state_dict(),
            "first_step": [self._first_index, self._first_step],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back a checkpoint's history and trigger state (call :meth:`freeze` after, to rebuild the groups).

        Raises:
            ValueError: the checkpoint holds more releases than the plan has.
        """
        history = [ReleaseRecord.from_dict(record) for record in state.get("history", ())]
        if len(history) > len(self.plan.releases):
            raise ValueError(
                f"GradualUnfreeze: the checkpoint holds {len(history)} releases, but the plan has"
                f" {len(self.plan.releases)}: resume with the configuration the checkpoint was saved with."
            )
        self._history = history
        last = state.get("last_release")
        self._last_release = None if last is None else (float(last[0]), int(last[1]))
        self._undecided = [(int(index), int(position)) for index, position in state.get("undecided", ())]
        self._before = {}
        first_index, self._first_step = state.get("first_step", (None, 0.0))
        self._first_index = None if first_index is None else int(first_index)
        self.trigger.load_state_dict(dict(state.get("trigger", {})))

    def close(self) -> None:
        self.gradients.close()

    def _add(self, index: int, step: int, factors: Sequence[float]) -> list[ReleasedGroup]:
        params = dict(self.root.named_parameters())
        added = []
        for position, (part, factor) in enumerate(zip(self.plan.releases[index], factors, strict=True)):
            group = [params[name] for name in part.params if id(params[name]) not in self._trainable]
            self._groups_of[index, position] = self.groups.add(group, part.name, factor, step)
            added += self._groups_of[index, position]
            self.gradients.track(group)
        return added

    def _step_cap(self, index: int) -> float | None:
        """The cap on the first step of release ``index``'s parts (``None``: none; the first release measures)."""
        if self.max_step != FIRST:
            return None if self.max_step is None else float(self.max_step)
        return self._first_step if self._first_index is not None and index > self._first_index else None

    def _scale_part(self, index: int, position: int, scale: float) -> None:
        """Scale a released part's learning-rate factor (its record and its groups) by ``scale``."""
        record = self._history[index]
        factors = tuple(f * scale if i == position else f for i, f in enumerate(record.lr_factors))
        self._history[index] = replace(record, lr_factors=factors)
        for group in self._groups_of.get((index, position), []):
            group.lr_factor = factors[position]

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
