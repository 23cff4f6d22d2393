"""The param groups of released parameters, kept in step with the head's learning rate, in plain PyTorch.

:class:`ReleasedGroups` owns the bookkeeping of one optimizer: it takes the backbone's parameters
out of it (remembering which of the user's groups each came from), adds a named group per released
part and origin, extends the LR schedulers for each new group, and ties every released group's
learning rate to the head's times its factor, with an optional linear warm-up. The head is the
first group that holds parameters outside the backbone. A released parameter that the optimizer
never held goes to the group the user's own rule would have put it in (:func:`origin_rule`).
Groups are tracked by object identity, never by index, and parameters by identity, never by value.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_bnfreeze.lr_schedulers import extend_for_new_group
from lightning_bnfreeze.param_groups import add_group_like, remove_parameters

__all__ = ["ReleasedGroup", "ReleasedGroups", "initial_lr", "origin_rule", "pick_optimizer"]

# Saved position of each restored group, per optimizer, shared by every ReleasedGroups on it: several
# callbacks restoring groups into one optimizer together put them back in the order they were saved.
_SAVED_POSITIONS: weakref.WeakKeyDictionary[Optimizer, dict[int, int]] = weakref.WeakKeyDictionary()

OriginRule = Callable[[str, nn.Parameter], int]
"""``rule(name, parameter)``: the index of the user's param group a parameter belongs in."""


@dataclass
class ReleasedGroup:
    """One param group added for a released part: its learning rate is ``head_lr * lr_factor * warm-up``."""

    group: dict[str, Any]
    lr_factor: float
    release_step: int

    @property
    def name(self) -> str:
        return str(self.group["name"])


def origin_rule(
    optimizer: Optimizer, named: Iterable[tuple[str, nn.Parameter]], no_decay: Iterable[str] = ()
) -> OriginRule | None:
    """The no-weight-decay rule of timm and Hugging Face, if ``optimizer``'s groups follow it, else ``None``.

    timm's ``param_groups_weight_decay`` (and ``create_optimizer_v2``), and Hugging Face's Trainer,
    put parameters with ``ndim <= 1`` (biases, norm weights) and those named in the model's
    ``no_weight_decay()`` in a group with weight decay 0, the others in a group with weight decay.
    When every group with weight decay holds only ``ndim >= 2`` parameters and some group without
    holds only ``ndim <= 1`` or ``no_decay`` ones, the rule returns the first of each kind.
    """
    skip = set(no_decay)
    names = {id(param): name for name, param in named}
    decay, plain = None, None
    for index, group in enumerate(optimizer.param_groups):
        if not group["params"]:
            continue
        exempt = [
            p.ndim <= 1 or names.get(id(p), "").rpartition(".")[2] in skip or names.get(id(p)) in skip
            for p in group["params"]
        ]
        if group.get("weight_decay", 0.0) > 0 and not any(exempt):
            decay = index if decay is None else decay
        elif group.get("weight_decay", 0.0) == 0 and all(exempt):
            plain = index if plain is None else plain
    if decay is None or plain is None:
        return None
    first_decay, first_plain = decay, plain

    def rule(name: str, param: nn.Parameter) -> int:
        exempt = param.ndim <= 1 or name in skip or name.rpartition(".")[2] in skip
        return first_plain if exempt else first_decay

    return rule


class ReleasedGroups:
    """The released param groups of ``optimizer`` (stepped by ``schedulers``).

    Args:
        optimizer: the optimizer that receives released parameters.
        schedulers: the LR schedulers of ``optimizer``; each is extended for every added group.
        warmup_steps: optimizer steps over which a new group's learning rate ramps up linearly.
    """

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[LRScheduler] = (), warmup_steps: int = 0) -> None:
        self.optimizer = optimizer
        self.schedulers = list(schedulers)
        self.warmup_steps = warmup_steps
        self.records: list[ReleasedGroup] = []
        self.rule: OriginRule | None = None
        self._origin: dict[int, int] = {}  # id(parameter) -> index of the user's group it was in
        self._withdrawn_from: list[int] = []  # the user's groups other than the head's that held withdrawn ones
        self._head: dict[str, Any] = optimizer.param_groups[0]

    @property
    def head(self) -> dict[str, Any]:
        """The head's param group: released groups follow its learning rate."""
        self._follow_reload()
        return self._head

    def withdraw(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Take the (named) backbone parameters out of the optimizer, remembering each one's group.

        The head is then the first group left with parameters, named ``"head"`` unless it has a name.
        A parameter the optimizer did not hold goes, when released, to the group :attr:`rule` gives it
        (set it, or :func:`origin_rule` finds it), else to the head's.
        """
        named = list(named)
        for index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                self._origin.setdefault(id(param), index)
        for name, param in named:
            if id(param) not in self._origin and self.rule is not None:
                self._origin[id(param)] = self.rule(name, param)
        remove_parameters(self.optimizer, [param for _, param in named])
        held = [group for group in self.optimizer.param_groups if group["params"]]
        self._head = held[0] if held else self.optimizer.param_groups[0]
        self._head.setdefault("name", "head")
        origins = {self._origin[id(param)] for _, param in named if id(param) in self._origin}
        self._withdrawn_from = sorted(i for i in origins if self.optimizer.param_groups[i] is not self._head)

    def own_rates(self) -> dict[str, float]:
        """The learning rate of each user group other than the head's that held backbone parameters (or that the
        rule puts them in), by its label, before any LR scheduler changed it: the rate the user gave them, which
        released groups do not take."""
        return {self._origin_label(i): initial_lr(self.optimizer.param_groups[i]) for i in self._withdrawn_from}

    @property
    def head_index(self) -> int:
        head = self.head
        return next(i for i, group in enumerate(self.optimizer.param_groups) if group is head)

    def origin_label(self, param: nn.Parameter) -> str:
        """The name (or ``group<index>``) of the user's group whose hyperparameters a released ``param`` gets."""
        return self._origin_label(self._origin.get(id(param), self.head_index))

    def add(self, params: Sequence[nn.Parameter], name: str, lr_factor: float, step: int) -> list[ReleasedGroup]:
        """Make ``params`` trainable in new groups at ``lr_factor`` times the head's learning rate.

        One group per user group the parameters came from, each with that group's hyperparameters
        (weight decay, betas, ...): named ``name`` when there is one origin, else ``name/<origin>``,
        where ``<origin>`` is the user's group name or ``group<index>``.
        """
        head = self.head_index
        by_origin: dict[int, list[nn.Parameter]] = {}
        for param in params:
            by_origin.setdefault(self._origin.get(id(param), head), []).append(param)
        added = []
        for origin, group_params in by_origin.items():
            for param in group_params:
                param.requires_grad = True
            label = name if len(by_origin) == 1 else f"{name}/{self._origin_label(origin)}"
            add_group_like(self.optimizer, group_params, label, lr_factor, template=origin, lr_template=head)
            for scheduler in self.schedulers:
                extend_for_new_group(scheduler, lr_factor, head)
            added.append(ReleasedGroup(self.optimizer.param_groups[-1], lr_factor, step))
        self.records.extend(added)
        return added

    def restore_order(self, added: Iterable[ReleasedGroup], positions: Iterable[int]) -> None:
        """Move restored groups to the positions they had when saved.

        Call after adding, on resume, with the positions :meth:`positions` gave when they were added; several holders of
        the same optimizer may each restore theirs, in any order: once all have, the groups are in
        the saved order, as ``optimizer.load_state_dict`` expects.
        """
        saved = _SAVED_POSITIONS.setdefault(self.optimizer, {})
        for record, position in zip(added, positions, strict=True):
            saved[id(record.group)] = position
        groups = self.optimizer.param_groups
        placed = sorted((group for group in groups if id(group) in saved), key=lambda group: saved[id(group)])
        slots = iter(placed)
        groups[:] = [next(slots) if id(group) in saved else group for group in groups]

    def positions(self, records: Iterable[ReleasedGroup]) -> tuple[int, ...]:
        """The index of each record's group in the optimizer."""
        self._follow_reload()
        index = {id(group): i for i, group in enumerate(self.optimizer.param_groups)}
        return tuple(index[id(record.group)] for record in records)

    def tie_to_head(self, step: int) -> None:
        """Set each released group's learning rate to the head's times its factor and warm-up at ``step``."""
        head_lr = self.head["lr"]
        for record in self.records:
            record.group["lr"] = head_lr * record.lr_factor * self.warmup(step - record.release_step)

    def _follow_reload(self) -> None:
        """``optimizer.load_state_dict`` (a resumed fit) replaces the group dicts but keeps each group's
        ``params`` list: the head and the records follow their group through it."""
        current = {id(group["params"]): group for group in self.optimizer.param_groups}
        self._head = current.get(id(self._head["params"]), self._head)
        for record in self.records:
            record.group = current.get(id(record.group["params"]), record.group)

    def warmup(self, steps_since_release: int) -> float:
        """The warm-up's factor on a released group's rate at its ``steps_since_release``-th step (0: its first)."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (steps_since_release + 1) / self.warmup_steps)

    def _origin_label(self, origin: int) -> str:
        return str(self.optimizer.param_groups[origin].get("name", f"group{origin}"))


def pick_optimizer(optimizers: Sequence[Optimizer], backbone: Iterable[nn.Parameter], index: int | None) -> Optimizer:
    """The optimizer that receives released parameters: ``optimizers[index]``, else the only one or the one
    holding backbone parameters.

    Raises:
        ValueError: no optimizer, ``index`` out of range, or no single optimizer holding backbone parameters.
    """
    if not optimizers:
        raise ValueError("GradualUnfreeze needs an optimizer: `configure_optimizers` returned none.")
    if index is not None:
        if index >= len(optimizers):
            raise ValueError(
                f"`optimizer_index={index}` but `configure_optimizers` returned {len(optimizers)} optimizer(s)."
            )
        return optimizers[index]
    if len(optimizers) == 1:
        return optimizers[0]
    ids = {id(param) for param in backbone}
    holders = [
        optimizer
        for optimizer in optimizers
        if any(id(param) in ids for group in optimizer.param_groups for param in group["params"])
    ]
    if len(holders) != 1:
        raise ValueError(
            f"GradualUnfreeze: {len(optimizers)} optimizers and {len(holders)} of them hold backbone parameters:"
            " set `optimizer_index` to choose the one that receives released parameters."
        )
    return holders[0]


def initial_lr(group: dict[str, Any]) -> float:
    """A param group's learning rate before any LR scheduler changed it (``initial_lr``, which they set)."""
    return float(group.get("initial_lr", group["lr"]))
