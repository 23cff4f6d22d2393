"""Carry out a release plan on a model, in plain PyTorch: param groups, gradient averaging and the history.

:class:`Releaser` turns "release number ``i`` of the plan, now" into trainable parameters in named
groups (:class:`~lightning_bnfreeze.released_groups.ReleasedGroups`), tracked for gradient averaging
(:class:`~lightning_bnfreeze.distributed.GradientSync`), and a :class:`~lightning_bnfreeze.triggers.ReleaseRecord`
in the history; from a checkpoint's history it rebuilds the same groups in the same order.
"""

from __future__ import annotations

from torch import nn

from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.released_groups import ReleasedGroup, ReleasedGroups
from lightning_bnfreeze.schedule import Release, ReleasePlan
from lightning_bnfreeze.triggers import ReleaseRecord, describe_release

__all__ = ["Releaser"]


class Releaser:
    """The releases of ``plan`` done on ``root`` so far (``history``, shared with its owner), and the next ones.

    Args:
        root: the model whose parameters the plan names.
        plan: what each release frees, at which learning-rate factor.
        groups: the optimizer's released groups.
        gradients: averages released gradients that a DDP reducer leaves out.
        history: the releases done, in order (a list the owner checkpoints; restored by :meth:`restore`).
    """

    def __init__(
        self,
        root: nn.Module,
        plan: ReleasePlan,
        groups: ReleasedGroups,
        gradients: GradientSync,
        history: list[ReleaseRecord],
    ) -> None:
        self.root = root
        self.plan = plan
        self.groups = groups
        self.gradients = gradients
        self.history = history

    def release(
        self, index: int, epoch: int, step: int, reason: str = "scheduled", value: float | None = None
    ) -> ReleaseRecord:
        """Release ``plan.releases[index]`` now; its groups take the head's learning rate times their factor."""
        added = self._add(index, step)
        record = ReleaseRecord(index, epoch, step, reason, self.groups.positions(added), value)
        self.history.append(record)
        self.groups.tie_to_head(step)
        return record

    def restore(self) -> None:
        """Rebuild the groups of the releases in ``history`` (from a checkpoint), in their saved order."""
        for record in self.history:
            self.groups.restore_order(self._add(record.index, record.step), record.positions)

    def remaining(self) -> list[int]:
        """Indices of the plan's releases not done yet, in plan order."""
        done = {record.index for record in self.history}
        return [index for index in range(len(self.plan.releases)) if index not in done]

    def released_ids(self) -> set[int]:
        """``id`` of every parameter released so far."""
        params = dict(self.root.named_parameters())
        return {
            id(params[name]) for record in self.history for part in self._at(record.index).parts for name in part.params
        }

    def describe(self, record: ReleaseRecord, metric: str | None = None) -> str:
        """One line for the log: when and why, what, how many parameters, at which learning rates."""
        release = self._at(record.index)
        head_lr = self.groups.optimizer.param_groups[0]["lr"]
        factors = sorted({part.lr_factor for part in release.parts})
        return (
            f"{describe_release(record, self.plan.unit, metric)}: released"
            f" {', '.join(part.name for part in release.parts)}"
            f" ({sum(part.numel for part in release.parts):,} parameters)"
            f" at lr {', '.join(f'{head_lr * f:.3g}' for f in factors)}"
            f" ({', '.join(f'{f:.3g}' for f in factors)} x head)."
        )

    def _at(self, index: int) -> Release:
        if index >= len(self.plan.releases):
            raise ValueError(
                f"GradualUnfreeze: the checkpoint holds release {index} (0-based), but the schedule has"
                f" {len(self.plan.releases)}: resume with the configuration the checkpoint was saved with."
            )
        return self.plan.releases[index]

    def _add(self, index: int, step: int) -> list[ReleasedGroup]:
        params = dict(self.root.named_parameters())
        added = []
        for part in self._at(index).parts:
            group = [params[name] for name in part.params]
            added += self.groups.add(group, part.name, part.lr_factor, step)
            self.gradients.track(group)
        return added
