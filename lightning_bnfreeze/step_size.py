"""How far one optimizer step moved a set of weights, relative to their size: the measure behind ``bn="auto"``
and the warnings about frozen statistics at large rates (plain PyTorch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from torch import nn

from lightning_bnfreeze.fsdp import squared_norm

__all__ = ["AUTO_STEP", "FIRST", "SMALLEST_REFERENCE", "FirstStep", "check_max_step", "momentum_of"]

AUTO_STEP = 0.002
"""The relative step size (momentum included) above which frozen statistics stop holding: on the real-weights
benchmark (``benchmarks/transfer_real.md``) fine-tuning with frozen statistics collapsed at head learning rates
whose first step moved the backbone's weights by more than this, and batch statistics lost to frozen ones below it."""


FIRST: Final = "first"
"""``max_step="first"``: no release's first step goes further (relative to the weights) than the first release's did.
Under AdamW the first steps shrink from the output side to the input side and the cap rarely binds; under momentum
SGD they grow, and it does. What it won and lost on the real-weights benchmark is in ``benchmarks/transfer_real.md``
and the README's "Choosing BN mode and learning rates"."""

SMALLEST_REFERENCE = AUTO_STEP / 10
"""A first release whose first step moved its weights by less than this (0.02%) measured weight decay rather than
the gradient (a head still at zero, say): it neither decides ``bn="auto"``'s mode nor sets ``max_step="first"``'s cap;
the first release that moves further does."""


def check_max_step(value: object) -> None:
    """Raise unless ``value`` is ``None``, ``"first"`` or a number > 0."""
    if value is None or value == FIRST:
        return
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return
    raise ValueError(f"`max_step` must be 'first', a relative step size > 0 or None, got {value!r}.")


def momentum_of(group: Mapping[str, Any]) -> float:
    """The momentum of an SGD-type param group (its steps grow to ``1 / (1 - momentum)`` of the first), else 0
    (Adam-type groups, with ``betas``, normalise their steps)."""
    return 0.0 if "betas" in group else float(group.get("momentum", 0.0) or 0.0)


class FirstStep:
    """The weights (parameters with ``ndim >= 2``) of a set of parameters before a step, to compare after it.

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
        self._before = [(p, p.detach().clone()) for p in params if p.ndim >= 2]

    def change(self, momentum: float = 0.0) -> float:
        """``|w - w_before| / |w_before|`` over all the weights, times ``1 / (1 - momentum)``; 0 for no weights.

        A collective under FSDP2 (sharded weights): call it on every rank alike.
        """
        moved = squared_norm([w - before for w, before in self._before]) ** 0.5
        size = squared_norm([before for _, before in self._before]) ** 0.5
        return moved / size / (1.0 - momentum) if size > 0 else 0.0
