"""Make torch LR schedulers follow param groups added after they were built, in plain PyTorch.

torch's schedulers keep per-group lists (``base_lrs``, ``min_lrs`` of ReduceLROnPlateau,
``lr_lambdas`` of LambdaLR, ...) and zip them strictly with the optimizer's groups. A new group
gets entries equal to the head group's, with learning rates times the group's ratio, so closed-form
and chainable schedules alike keep its learning rate at a constant ratio to the head's.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LRScheduler

from lightning_bnfreeze.internals import SCHEDULER_PER_GROUP_STATE, SCHEDULER_SHARED_STATE, nested_schedulers

__all__ = ["check_extendable", "extend_for_new_group"]

_PER_GROUP = SCHEDULER_PER_GROUP_STATE
_NOT_PER_GROUP = SCHEDULER_SHARED_STATE


def _nested(scheduler: Any) -> list[Any]:
    return nested_schedulers(scheduler)


def check_extendable(scheduler: Any) -> None:
    """Raise unless :func:`extend_for_new_group` can extend ``scheduler``.

    Raises:
        TypeError: not a ``torch.optim.lr_scheduler.LRScheduler``, or one with per-group state
            this module does not know.
    """
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(
            f"{type(scheduler).__name__} is not a torch.optim.lr_scheduler.LRScheduler: GradualUnfreeze cannot make"
            " it follow the param groups it adds. Use a torch LR scheduler, or leave the scheduler out."
        )
    groups = len(scheduler.optimizer.param_groups)
    for attribute, value in vars(scheduler).items():
        known = attribute in _PER_GROUP or attribute in _NOT_PER_GROUP
        if isinstance(value, list | tuple) and len(value) == groups and not known:
            raise TypeError(
                f"{type(scheduler).__name__}.{attribute} looks like per-param-group state that GradualUnfreeze"
                " does not know how to extend for a released group."
            )
    for nested in _nested(scheduler):
        check_extendable(nested)


def extend_for_new_group(scheduler: LRScheduler, ratio: float, template: int = 0) -> None:
    """Extend ``scheduler``'s per-group state for the group just appended to its optimizer.

    Entries are copied from group ``template`` (the head's); learning rates are multiplied by ``ratio``.
    """
    for nested in _nested(scheduler):
        extend_for_new_group(nested, ratio, template)
    groups = len(scheduler.optimizer.param_groups)
    for attribute, is_lr in _PER_GROUP.items():
        values = getattr(scheduler, attribute, None)
        if isinstance(values, list) and len(values) == groups - 1:
            values.append(values[template] * ratio if is_lr else values[template])
