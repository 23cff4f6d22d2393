"""The param groups of each released part, by its place in the plan, in plain PyTorch.

A release frees parts (blocks, modules); each part gets one group per user group its parameters came from
(:meth:`~lightning_bnfreeze.released_groups.ReleasedGroups.add`). :class:`PartGroups` keeps them by
``(release index, position in the release)``, so that a part's rate can be measured against the others' and scaled
on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.first_steps import Part
from lightning_bnfreeze.released_groups import ReleasedGroup, ReleasedGroups
from lightning_bnfreeze.step_size import step_now

__all__ = ["PartGroups"]


class PartGroups:
    """The groups each released part got in ``groups``; their parameters' gradients averaged by ``gradients``
    where a DDP reducer leaves them out."""

    def __init__(self, groups: ReleasedGroups, gradients: GradientSync) -> None:
        self.groups = groups
        self.gradients = gradients
        self._of: dict[Part, list[ReleasedGroup]] = {}

    def __contains__(self, key: Part) -> bool:
        return key in self._of

    def add(
        self, key: Part, params: Sequence[nn.Parameter], name: str, lr_factor: float, step: int
    ) -> list[ReleasedGroup]:
        """Make ``params`` the part ``key``: trainable in groups named ``name`` at ``lr_factor`` times the head's
        rate, released at optimizer step ``step``."""
        self._of[key] = self.groups.add(params, name, lr_factor, step)
        self.gradients.track(params)
        return self._of[key]

    def rates(self, key: Part) -> list[tuple[dict[str, Any], float]]:
        """The part's param groups, each with its full rate (no warm-up)."""
        head_lr = float(self.groups.head["lr"])
        return [(group.group, head_lr * group.lr_factor) for group in self._of.get(key, [])]

    def step_now(self, key: Part) -> float:
        """How far the part's weights would move in a first step taken now (:func:`~.step_size.step_now`)."""
        return step_now(self.rates(key))

    def largest_step_before(self, index: int) -> float | None:
        """The largest first step that the parts of the releases before ``index`` would take now (``None``: none)."""
        return max((self.step_now(key) for key in self._of if key[0] < index), default=None)

    def set_lr_factor(self, key: Part, lr_factor: float) -> None:
        """The part's groups at ``lr_factor`` times the head's rate from now on."""
        for group in self._of.get(key, []):
            group.lr_factor = lr_factor
