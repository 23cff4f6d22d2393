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

import torch.distributed as dist
from torch import nn

__all__ = ["register_sharded_parameters"]


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
