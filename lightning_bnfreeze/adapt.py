"""Re-estimate the running statistics of norm layers on data (AdaBN), in plain PyTorch.

After :func:`adapt_norm_statistics`, each chosen layer's ``running_mean`` and ``running_var`` are the
exact statistics of the inputs it saw over the given batches: for BatchNorm the mean and unbiased
variance per channel over all samples and positions; for InstanceNorm the average of the
per-instance means and unbiased variances (what it tracks in training). During the pass, each
chosen layer normalises with the statistics accumulated so far, so later layers see inputs close
to what they will see in inference, and batches of any size work, even 1. Nothing else changes:
no gradients, no other layer's state, the same modes and grad mode afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["adapt_norm_statistics"]


class _Moments:
    """Per-channel sums of a norm layer's inputs, in float64: ``[first (C), second (C), count]``.

    BatchNorm: sums of values and of squares over samples and positions, counting positions.
    InstanceNorm: sums of per-instance means and unbiased variances, counting instances.
    """

    def __init__(self, layer: _NormBase) -> None:
        self.layer = layer
        self.per_instance = isinstance(layer, _InstanceNorm)
        self.sums = torch.zeros(2 * layer.num_features + 1, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        flat = x.detach().double().movedim(1, 0).flatten(2 if self.per_instance else 1)
        if self.per_instance:
            first, second = flat.mean(-1).sum(1), flat.var(-1, correction=1).sum(1)
        else:
            first, second = flat.sum(1), flat.square().sum(1)
        self.sums += torch.cat([first, second, first.new_tensor([flat.shape[1]])])

    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, unbiased variance, biased variance) of what was added."""
        (first, second), count = self.sums[:-1].chunk(2), self.sums[-1]
        mean = first / count
        if self.per_instance:
            var = second / count
            return mean, var, var
        biased = (second / count - mean.square()).clamp_min(0)
        return mean, biased * count / (count - 1).clamp_min(1), biased

    def normalise(self, module: _NormBase, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """Forward hook: add the input, then normalise it with the statistics so far."""
        x = args[0]
        self.add(x)
        mean, _, biased = self.statistics()
        return F.batch_norm(x, mean.to(x.dtype), biased.to(x.dtype), module.weight, module.bias, False, 0.0, module.eps)


def adapt_norm_statistics(
    model: nn.Module,
    layers: Sequence[_NormBase],
    batches: Iterable[Any],
    forward: Callable[[Any], object] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> int:
    """Set the running statistics of ``layers`` to those of their inputs over ``batches``.

    Args:
        model: the module that holds ``layers``; run in eval mode for the pass, modes restored.
        layers: the norm layers to re-estimate.
        batches: what ``forward`` takes, one item per batch.
        forward: runs the model on one batch; ``model(batch)`` by default.
        process_group: under ``torch.distributed``, the statistics are those of all ranks' batches
            (one all-reduce); ``None`` means the default group when one is initialised.

    Returns:
        The number of batches used on this rank.
    """
    run = forward if forward is not None else model
    moments = [_Moments(layer) for layer in layers]
    modes = {module: module.training for module in model.modules()}
    hooks = [m.layer.register_forward_hook(m.normalise) for m in moments]
    used = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                run(batch)
                used += 1
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    if dist.is_available() and dist.is_initialized() and moments:
        flat = torch.cat([m.sums for m in moments])
        dist.all_reduce(flat, group=process_group)
        for m, sums in zip(moments, torch.split(flat, [m.sums.numel() for m in moments]), strict=True):
            m.sums = sums
    for m in moments:
        if m.sums[-1] == 0:
            continue
        mean, unbiased, _ = m.statistics()
        running_mean, running_var = m.layer.running_mean, m.layer.running_var
        assert isinstance(running_mean, Tensor) and isinstance(running_var, Tensor)
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(unbiased.to(running_var.dtype))
    return used
