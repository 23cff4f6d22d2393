"""How far one optimizer step moved a set of weights, relative to their size: the measure behind ``bn="auto"``
and the warnings about frozen statistics at large rates (plain PyTorch)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_bnfreeze.fsdp import squared_norm
from lightning_bnfreeze.tensor_copy import COPIES_DEVICE, TensorCopy

__all__ = [
    "AUTO",
    "AUTO_STEP",
    "NEAR_DECAY",
    "RELEASED",
    "SMALLEST_REFERENCE",
    "STOP_STEP",
    "FirstStep",
    "MaxStep",
    "adam_step_bound",
    "check_max_step",
    "momentum_of",
    "normalises_first_step",
    "step_now",
]

AUTO_STEP = 0.005
"""The relative step size (momentum included) of a release's first optimizer step above which frozen statistics stop
holding: the line of ``bn="auto"``'s first decision and of the warnings about frozen statistics at large rates and
batch statistics at small ones. On the real-weights benchmarks (EfficientNet-Lite0 and -Lite2, ``digits`` and
``textures``, K=5 and 10) fine-tuning with frozen statistics collapsed at the head learning rates whose first release's
first step measured 0.86% or more, and batch statistics lost to frozen ones at those where it measured 0.21% or less
(0.89% and 0.35% computed at fit start, from the first batch; ``benchmarks/first_steps.md``, from the rows of
``benchmarks/transfer_real.md`` and ``transfer_lite2.md``); the line sits in that gap."""

STOP_STEP = 0.002
"""``bn="auto"``, once released norm layers train: a later release whose first step moves its weights by less than
this keeps frozen statistics, and so does every release after it (below :data:`AUTO_STEP`, as a thermostat's two
lines: mode changes need a clear signal either way). Near the source the later releases are slowed on purpose
(:data:`NEAR_DECAY`): the output side's next release still trains its statistics there."""


RELEASED: Final = "released"
"""``max_step="released"``: no released part's first step goes further (relative to its weights) than the parts
released before it would move in a first step taken at the same moment, from the same batch (:func:`step_now`).
Under AdamW the steps shrink from the output side to the input side and the cap rarely binds; under momentum SGD
they grow, and it does. What it won and lost on the real-weights benchmark is in ``benchmarks/transfer_real.md``
and the README's "Choosing BN mode and learning rates"."""

AUTO: Final = "auto"
"""``max_step="auto"`` (the default): ``"released"`` when the target is near the backbone's source (its frozen norm
statistics shifted by less than :data:`~lightning_bnfreeze.domain_shift.NEAR_SOURCE`), with later releases decayed
by :data:`NEAR_DECAY` (in rate and in first step) once the first one moves fast; else no cap."""

NEAR_DECAY = 0.3
"""``max_step="auto"`` on a target near the source, once the first release's first step moved more than
:data:`AUTO_STEP`: release ``k`` after it trains at ``NEAR_DECAY ** k`` of its rate, and its first step moves at
most ``NEAR_DECAY ** k`` as far as the first release's (a faster one is scaled down to that, as ``max_step`` caps:
under momentum SGD the input side's steps grow, so the decayed rate alone does not keep them small). On the
real-weights benchmark's near task (``textures``) the input-side blocks had to move far less than the output side's
at large rates, as layer-wise decay makes them (``benchmarks/transfer_real.md``); below the line (small rates,
frozen statistics) the decay lost, and it does not apply."""

MaxStep = float | Literal["auto", "released"] | None
"""What ``max_step`` takes."""

SMALLEST_REFERENCE = STOP_STEP / 10
"""A first release whose first step moved its weights by less than this (0.02%) measured weight decay rather than
the gradient (a head still at zero, say): it does not decide ``bn="auto"``'s mode: the first release
that moves further does."""


def check_max_step(value: object) -> None:
    """Raise unless ``value`` is ``None``, ``"auto"``, ``"released"`` or a number > 0."""
    if value is None or value in (AUTO, RELEASED):
        return
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return
    raise ValueError(f"`max_step` must be 'auto', 'released', a relative step size > 0 or None, got {value!r}.")


def momentum_of(group: Mapping[str, Any]) -> float:
    """The momentum of an SGD-type param group (its steps grow to ``1 / (1 - momentum)`` of the first), else 0
    (Adam-type groups, with ``betas``, normalise their steps)."""
    return 0.0 if "betas" in group else float(group.get("momentum", 0.0) or 0.0)


class FirstStep:
    """The weights (parameters with ``ndim >= 2``) of a set of parameters before a step, to compare after it; kept in
    the CPU's memory (a model on an accelerator keeps its memory for the step: each weight comes back for the
    comparison, one at a time).

    Example::

        >>> import torch
        >>> layer = torch.nn.Linear(4, 4)
        >>> probe = FirstStep(layer.parameters())
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(1.01)
        >>> round(probe.change(), 4)
        0.01
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._before = [(p, TensorCopy.of(p, COPIES_DEVICE)) for p in params if p.ndim >= 2]

    @property
    def has_weights(self) -> bool:
        """Whether there is anything to measure (norm layers alone have no parameter with ``ndim >= 2``)."""
        return bool(self._before)

    def change(self, momentum: float = 0.0) -> float:
        """``|w - w_before| / |w_before|`` over all the weights, times ``1 / (1 - momentum)``; 0 for no weights.

        A collective under FSDP2 (sharded weights): call it on every rank alike.
        """
        # one difference at a time, each weight before the step back on its device only for it; the sizes from the
        # copies where they are kept
        moved = squared_norm(w - before.tensor(copy=False) for w, before in self._before) ** 0.5
        size = squared_norm(before.values for _, before in self._before) ** 0.5
        return moved / size / (1.0 - momentum) if size > 0 else 0.0


def normalises_first_step(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is :class:`torch.optim.Adam` or :class:`~torch.optim.AdamW` (not a subclass): their
    first step moves each element by ``lr * g / (|g| + eps)``, at most ``lr``, whatever the gradient."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)


def adam_step_bound(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> float:
    """The most a first Adam or AdamW step at ``lr`` can move the weights (``ndim >= 2``) of ``params``, relative
    to their size, before any gradient exists: each element by at most ``lr``, plus AdamW's decay of
    ``lr * weight_decay`` of the weights; 0 for no weights.

    Example::

        >>> import torch
        >>> layer = torch.nn.Linear(100, 100, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(0.01)  # |w| = 1, 10,000 elements
        >>> round(adam_step_bound(layer.parameters(), lr=1e-4), 4)  # 1e-4 * sqrt(10,000) / 1
        0.01

    A collective under FSDP2 (sharded weights): call it on every rank alike.
    """
    weights = [param.detach() for param in params if param.ndim >= 2]
    size = squared_norm(weights) ** 0.5
    elements = sum(weight.numel() for weight in weights)
    return lr * (math.sqrt(elements) / size + weight_decay) if size > 0 else 0.0


def step_now(groups: Iterable[tuple[Mapping[str, Any], float]]) -> float:
    """How far a first optimizer step taken now, from the gradients in ``.grad``, would move the weights
    (``ndim >= 2``) of ``(param_group, lr)`` pairs, relative to their size, momentum left out: ``lr * (g + wd * w)``
    for SGD-type groups, ``lr * g / (|g| + eps)`` for Adam-type ones (with ``betas``); 0 without gradients.

    A collective under FSDP2 (sharded weights): call it on every rank alike.
    """
    stepped = [
        (param, group, lr)
        for group, lr in groups
        for param in group["params"]
        if param.ndim >= 2 and param.grad is not None
    ]
    size = squared_norm(param.detach() for param, _, _ in stepped) ** 0.5
    moves = (lr * _direction(param, group) for param, group, lr in stepped)  # one at a time
    return squared_norm(moves) ** 0.5 / size if size > 0 else 0.0


def _direction(param: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
    """The first step's direction for ``param`` in ``group``, before the rate: Adam's ``g / (|g| + eps)``, else
    ``g + wd * w``."""
    assert param.grad is not None
    grad = param.grad.detach()
    if "betas" in group:
        return grad / (grad.abs() + float(group.get("eps", 1e-8)))
    return grad + float(group.get("weight_decay", 0.0) or 0.0) * param.detach()
