"""Parameters of a model sharded with FSDP2 (``fully_shard``), in plain PyTorch.

A ``fully_shard`` module registers its sharded parameters (DTensors) between passes and unsharded
ones (gathered from every rank) during forward and backward. The sharded ones are those FSDP2
trains: the optimizer holds them, gradients are reduce-scattered onto them, and each forward pass
copies their ``requires_grad`` onto the unsharded ones. But a root module keeps its unsharded
parameters registered after a forward pass that no backward follows (its parameters all frozen, a
validation step): code that finds parameters by name between steps must put the sharded ones back
first, or it would release, track and freeze copies that FSDP2 discards at the next forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["register_sharded_parameters", "squared_norm"]


def register_sharded_parameters(module: nn.Module) -> None:
    """Register the sharded parameters of every ``fully_shard`` module in ``module`` (nothing else changes).

    No collective: each rank frees its own unsharded copies, which the next forward gathers again.
    A no-op without FSDP2.
    """
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def squared_norm(tensors: list[torch.Tensor]) -> float:
    """The sum of squares of ``tensors``' elements, whole: a sharded tensor's (DTensor) over its shards.

    A collective over the sharded mesh dimensions when some tensors are sharded: call it on every rank alike.
    """
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        placements = getattr(tensor, "placements", None)
        if placements is None:
            total += tensor.detach().double().pow(2).sum().cpu()
            continue
        mesh = tensor.device_mesh  # type: ignore[attr-defined]
        local = tensor.to_local().detach().double().pow(2).sum()  # type: ignore[attr-defined]
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                dist.all_reduce(local, group=mesh.get_group(dim))
        total += local.cpu()
    return float(total)
