"""Optimizer param-group bookkeeping for released modules, in plain PyTorch.

Parameters are tracked by identity (``id``), never by value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn
from torch.optim import Optimizer

__all__ = ["LR_KEYS", "add_group_like", "remove_parameters"]

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
"""Per-group keys that are learning rates (set by torch's LR schedulers): scaled with the group."""


def remove_parameters(optimizer: Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Take ``params`` out of every param group of ``optimizer`` (with their state); return how many.

    Groups are kept, even when emptied, so that LR schedulers' per-group lists stay aligned.
    """
    ids = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in ids]
        for param in group["params"]:
            if id(param) in ids:
                optimizer.state.pop(param, None)
                removed += 1
        group["params"] = kept
    return removed


def add_group_like(
    optimizer: Optimizer,
    params: Sequence[nn.Parameter],
    name: str,
    ratio: float,
    template: int = 0,
    lr_template: int = 0,
) -> int:
    """Append a param group named ``name`` with the hyperparameters of group ``template``.

    Its learning-rate keys (:data:`LR_KEYS`) are those of group ``lr_template`` times ``ratio``.
    Returns the new group's index.
    """
    group = {key: value for key, value in optimizer.param_groups[template].items() if key not in ("params", "name")}
    lr_group = optimizer.param_groups[lr_template]
    for key in LR_KEYS:
        if key in lr_group:
            group[key] = lr_group[key] * ratio
    optimizer.add_param_group({**group, "params": list(params), "name": name})
    return len(optimizer.param_groups) - 1
