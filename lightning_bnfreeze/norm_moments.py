"""What norm layers see: per-channel sums of their inputs over a pass of the model (plain PyTorch).

The shared core of :mod:`~lightning_bnfreeze.adapt` (which writes the statistics into the layers) and
:mod:`~lightning_bnfreeze.domain_shift` (which compares them with the layers' own). The sums live on the inputs'
device, in float64, except on MPS, which has no float64 (float32 there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_bnfreeze.internals import InstanceNormBase, NormBase

__all__ = ["NormMoments", "all_reduce", "observe", "running_statistics"]


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def running_statistics(layer: NormBase) -> tuple[Tensor, Tensor]:
    """A norm layer's ``(running_mean, running_var)``."""
    running_mean, running_var = layer.running_mean, layer.running_var
    assert isinstance(running_mean, Tensor) and isinstance(running_var, Tensor)
    return running_mean, running_var


class NormMoments:
    """What one norm layer saw, ``sums = [first (C), second (C), count, samples]``, and its statistics before.

    BatchNorm: per-channel sums of values and of squares over samples and positions, ``count``
    positions. InstanceNorm: sums of per-instance means and unbiased variances, ``count`` instances.
    ``samples`` counts the inputs' first dimension: the ``n`` a prior is weighed against.
    """

    def __init__(self, layer: NormBase, prior: float = 0.0) -> None:
        self.layer = layer
        self.prior = prior
        self.per_instance = isinstance(layer, InstanceNormBase)
        self.sums: Tensor | None = None  # made at the first input: a Lazy layer has no size before
        self.source: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))

    def start(self, device: torch.device) -> Tensor:
        """The sums, made (zero) on ``device`` the first time, when the source statistics are saved."""
        if self.sums is None:
            self.sums = torch.zeros(2 * self.layer.num_features + 2, dtype=_accumulation_dtype(device), device=device)
            running_mean, running_var = running_statistics(self.layer)
            self.source = (running_mean.clone(), running_var.clone())
        return self.sums

    def add(self, x: Tensor) -> None:
        sums = self.start(x.device)
        flat = x.detach().to(sums.dtype).movedim(1, 0).flatten(2 if self.per_instance else 1)
        if self.per_instance:
            first, second = flat.mean(-1).sum(1), flat.var(-1, correction=1).sum(1)
        else:
            first, second = flat.sum(1), flat.square().sum(1)
        sums += torch.cat([first, second, first.new_tensor([flat.shape[1], x.shape[0]])])

    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, unbiased variance, biased variance) of what was added, blended with the source's by the prior."""
        assert self.sums is not None
        (first, second), (count, samples) = self.sums[:-2].chunk(2), self.sums[-2:]
        mean = first / count
        if self.per_instance:
            unbiased = biased = second / count
        else:
            biased = (second / count - mean.square()).clamp_min(0)
            unbiased = biased * count / (count - 1).clamp_min(1)
        if not self.prior:
            return mean, unbiased, biased
        weight = self.prior / (self.prior + samples)  # the source's
        source_mean, source_var = (stat.to(mean) for stat in self.source)
        return (
            torch.lerp(mean, source_mean, weight),
            torch.lerp(unbiased, source_var, weight),
            torch.lerp(biased, source_var, weight),
        )

    def write(self, mean: Tensor, var: Tensor) -> None:
        running_mean, running_var = running_statistics(self.layer)
        running_mean.copy_(mean)
        running_var.copy_(var)

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: add the input."""
        self.add(args[0])

    def normalise_with_statistics_so_far(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: add the input; the layer (in inference mode) normalises it with the statistics so far."""
        self.add(args[0])
        mean, _, biased = self.statistics()
        self.write(mean, biased)


def observe(
    model: nn.Module,
    hooks: Sequence[tuple[nn.Module, Callable[[nn.Module, tuple[Any, ...]], None]]],
    batches: Iterable[Any],
    forward: Callable[[Any], object],
) -> int:
    """Run ``forward`` over ``batches`` with ``model`` in eval mode, without gradients, eagerly also where it is
    compiled (the hooks run in Python), each ``(module, pre_hook)`` of ``hooks`` registered; hooks and modes are
    restored afterwards. Returns the number of batches."""
    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    used = 0
    try:
        model.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for batch in batches:
                forward(batch)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return used


def all_reduce(moments: Sequence[NormMoments], process_group: dist.ProcessGroup | None) -> None:
    """Sum each layer's sums over the ranks (one collective), when ``torch.distributed`` is initialised."""
    if not (dist.is_available() and dist.is_initialized()) or not moments:
        return
    sums = [m.start(running_statistics(m.layer)[0].device) for m in moments]  # zeros where no batch reached it
    flat = torch.cat(sums)
    dist.all_reduce(flat, group=process_group)
    for m, reduced in zip(moments, torch.split(flat, [s.numel() for s in sums]), strict=True):
        m.sums = reduced
