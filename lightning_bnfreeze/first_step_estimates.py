"""The releases' first steps, known before they are taken (plain PyTorch): bounded from the weights alone under Adam
and AdamW, computed from one training step's gradient under other optimizers (:class:`GradientProbe`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_bnfreeze.fsdp import is_sharded
from lightning_bnfreeze.step_size import adam_step_bound, momentum_of, normalises_first_step, step_now

__all__ = ["GradientProbe", "RatedPart", "first_step_bound", "largest_lr"]

RatedPart = tuple[Sequence[nn.Parameter], float]
"""A released part's parameters and the rate its first step is taken at."""


def largest_lr(group: Mapping[str, Any]) -> float:
    """The largest rate a param group names: its ``lr``, or the ``initial_lr``/``max_lr`` its schedulers start from
    or rise to."""
    return max(float(group.get(key) or 0.0) for key in ("lr", "initial_lr", "max_lr"))


def first_step_bound(optimizer: Optimizer, parts: Sequence[RatedPart]) -> float | None:
    """Under Adam or AdamW, before any step: the most the first step of any of ``parts``, each at its rate, can move
    its weights (:func:`~lightning_bnfreeze.step_size.adam_step_bound`, with the optimizer's largest weight decay);
    ``None`` under other optimizers, whose first step depends on the gradient.

    A collective under FSDP2 (sharded weights): call it on every rank alike.
    """
    if not normalises_first_step(optimizer):
        return None
    decay = max(float(group.get("weight_decay") or 0.0) for group in optimizer.param_groups)
    return max((adam_step_bound(params, lr, decay) for params, lr in parts), default=0.0)


class GradientProbe:
    """Gradients for frozen weights in the backward passes of one optimizer step: the first step their parts would
    take from them, known before they are released.

    Construction sets ``requires_grad`` on the weights (``ndim >= 2``) of ``parts`` that are frozen; :meth:`step`
    reads the gradients the backward passes left; :meth:`close` drops them and freezes the weights again (call it
    before the optimizer steps, whatever happened), or :meth:`drop_gradients` to read another step's.

    Example::

        >>> import torch
        >>> layer = torch.nn.Linear(4, 2).requires_grad_(False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(0.5)  # |w| = sqrt(2)
        >>> probe = GradientProbe([(list(layer.parameters()), 0.1)])
        >>> layer(torch.ones(1, 4)).sum().backward()  # the weight's gradient: ones, |g| = sqrt(8)
        >>> round(probe.step({"momentum": 0.0}), 4)  # 0.1 * sqrt(8) / sqrt(2)
        0.2
        >>> probe.close()
        >>> layer.weight.requires_grad, layer.weight.grad
        (False, None)
    """

    def __init__(self, parts: Sequence[RatedPart]) -> None:
        self._parts = [([p for p in params if p.ndim >= 2 and not p.requires_grad], lr) for params, lr in parts]
        for weights, _ in self._parts:
            for weight in weights:
                weight.requires_grad_(True)

    def step(
        self, options: Mapping[str, Any], reduce: Callable[[Tensor], Tensor] = lambda grad: grad, scale: float = 1.0
    ) -> float:
        """The largest first step of the parts (relative, momentum included) from the gradients in ``.grad`` (none:
        zero), for a param group with ``options`` (``momentum``, ``weight_decay``; ``betas``, ``eps``); ``reduce``
        averages a local gradient over the replicas (DDP; sharded ones, FSDP2's, are reduced already), ``scale``
        is a gradient scaler's. ``nan`` when a gradient is not finite.

        A collective under DDP (``reduce``) and FSDP2 (sharded weights): call it on every rank alike.
        """
        for weights, _ in self._parts:
            for weight in weights:
                grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
                weight.grad = (grad if is_sharded(grad) else reduce(grad)) / scale
        steps = [step_now([({**options, "params": weights}, lr)]) for weights, lr in self._parts]
        return max(steps, default=0.0) / (1.0 - momentum_of(options)) if all(map(math.isfinite, steps)) else math.nan

    def drop_gradients(self) -> None:
        """Drop the gradients (the weights keep ``requires_grad``: another step's backward passes may be read)."""
        for weights, _ in self._parts:
            for weight in weights:
                weight.grad = None

    def close(self) -> None:
        """Drop the gradients and freeze the weights again."""
        self.drop_gradients()
        for weights, _ in self._parts:
            for weight in weights:
                weight.requires_grad_(False)
