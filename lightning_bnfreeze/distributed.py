"""Average gradients that DistributedDataParallel does not, in plain PyTorch.

DDP builds its reducer from the parameters that require grad when it wraps the model; parameters
frozen then and released later are left out, so without this their gradients stay per-rank and
the replicas drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_gradients", "ddp_reduced_parameters"]


def ddp_reduced_parameters(model: nn.Module) -> set[int] | None:
    """Ids of the parameters whose gradients ``model``'s DDP reducer averages; ``None`` if not DDP."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    ignored: set[str] = getattr(model, "parameters_to_ignore", set())
    return {id(param) for name, param in model.module.named_parameters() if param.requires_grad and name not in ignored}


def average_gradients(params: Sequence[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of ``params`` over all ranks, in one all-reduce, as DDP does.

    Every rank must hold gradients for the same parameters (the same model and code do).
    """
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
