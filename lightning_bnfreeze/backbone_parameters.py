"""The backbone's parameters as a release plan sees them, and the :class:`~lightning_bnfreeze.release.Unfreezer`
built over them and the user's optimizer (plain PyTorch: a trainer only supplies the optimizer and its schedulers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_bnfreeze.checks import check_choice, check_integer, check_positive
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.lr_schedulers import check_extendable
from lightning_bnfreeze.names import closest_names, get_module
from lightning_bnfreeze.plan import ReleasePlan
from lightning_bnfreeze.release import NORM_MODES, Unfreezer
from lightning_bnfreeze.released_groups import ReleasedGroups, origin_rule, pick_optimizer
from lightning_bnfreeze.step_size import MaxStep, check_max_step
from lightning_bnfreeze.triggers import Trigger

__all__ = ["BackboneParameters", "ReleaseSettings"]


@dataclass(frozen=True)
class ReleaseSettings:
    """How released parts train: their rate relative to the head's, their norm layers, their warm-up and step cap."""

    lr_scale: float = 1.0
    bn: str = "auto"
    warmup_steps: int = 0
    max_step: MaxStep = "auto"

    def __post_init__(self) -> None:
        check_positive("lr_scale", self.lr_scale)
        check_choice("bn", self.bn, NORM_MODES)
        check_integer("warmup_steps", self.warmup_steps, 0)
        check_max_step(self.max_step)


@dataclass(frozen=True)
class BackboneParameters:
    """The parameters of the module ``name`` of a model, those matching a ``trainable`` glob kept trainable."""

    name: str
    trainable: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"`backbone` must be the name of a module of the LightningModule, got {self.name!r}.")
        trainable = self.trainable
        if isinstance(trainable, str) or not all(isinstance(pattern, str) for pattern in trainable):
            raise ValueError(f"`trainable` must be a list of parameter-name patterns, got {trainable!r}.")
        object.__setattr__(self, "trainable", tuple(trainable))

    def named(self, root: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` of the backbone's parameters."""
        return list(get_module(root, self.name, "backbone").named_parameters(prefix=self.name))

    def is_trainable(self, name: str) -> bool:
        """Whether the parameter ``name`` (full name) trains from the first step."""
        return any(fnmatchcase(name, pattern) for pattern in self.trainable)

    def check_trainable(self, root: nn.Module) -> None:
        """Raise unless each ``trainable`` pattern matches a parameter of the backbone (a typo would leave the
        adapters it meant frozen).

        Raises:
            ValueError: a pattern that matches nothing, with the closest names.
        """
        names = [name for name, _ in self.named(root)]
        for pattern in self.trainable:
            if not any(fnmatchcase(name, pattern) for name in names):
                close = closest_names(pattern, names) or names[:1]
                hint = f" Its parameters' names are like {', '.join(map(repr, close))}." if close else ""
                raise ValueError(
                    f"`trainable` holds the pattern {pattern!r}, which matches no parameter of `{self.name}`"
                    f" (patterns match full parameter names, `*` crossing dots).{hint}"
                )

    def to_freeze(self, root: nn.Module) -> list[nn.Parameter]:
        """The parameters frozen until their release."""
        return [p for name, p in self.named(root) if not self.is_trainable(name)]

    def optimizer(self, optimizers: Sequence[Optimizer], root: nn.Module, index: int | None = None) -> Optimizer:
        """The optimizer that trains the backbone (``index``, or the one holding its parameters)."""
        return pick_optimizer(list(optimizers), [p for _, p in self.named(root)], index)

    def unfreezer(
        self,
        root: nn.Module,
        plan: ReleasePlan,
        trigger: Trigger,
        optimizer: Optimizer,
        schedulers: Sequence[Any] = (),
        settings: ReleaseSettings = ReleaseSettings(),
        gradients: GradientSync | None = None,
        agree: Callable[[bool], bool] = bool,
    ) -> Unfreezer:
        """An :class:`~lightning_bnfreeze.release.Unfreezer` of ``plan`` over ``optimizer``, with the frozen
        parameters taken out of its groups (released parameters then get the hyperparameters the optimizer's own
        rule gives them: timm's and Hugging Face's no-decay rule, with the backbone's ``no_weight_decay()``)."""
        for scheduler in schedulers:
            check_extendable(scheduler)
        groups = ReleasedGroups(optimizer, list(schedulers), settings.warmup_steps)
        no_decay = getattr(get_module(root, self.name, "backbone"), "no_weight_decay", lambda: ())()
        groups.rule = origin_rule(optimizer, list(root.named_parameters()), [f"{self.name}.{n}" for n in no_decay])
        named = self.named(root)
        trainable = [p for name, p in named if self.is_trainable(name)]
        unfreezer = Unfreezer(
            root, plan, trigger, groups, gradients, settings.lr_scale, settings.bn, trainable, agree, settings.max_step
        )
        groups.withdraw((name, p) for name, p in named if id(p) in unfreezer.frozen_ids)
        return unfreezer
