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

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "BackwardOnEveryRank",
    "is_sharded",
    "reduce_unused_gradients",
    "register_sharded_parameters",
    "squared_norm",
]


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


def reduce_unused_gradients(module: nn.Module, params: Sequence[nn.Parameter]) -> list[RemovableHandle]:
    """Under FSDP2, keep every rank's gradient reductions alike for ``params``, released parameters that some
    rank's forward may leave unused (a block only some ranks' data reach, a skipped layer). A no-op without FSDP2.

    The ``fully_shard`` units holding them reduce-scatter zeros for those a backward left without a gradient
    (``set_reduce_scatter_unused_params``), as DDP averages zeros in for such ranks; a parameter no rank used
    gets a zero gradient (DDP leaves it ``None``). Without it, the unit's ranks reduce-scatter different
    tensors, and those without any gradient skip the collective while the others wait: the run hangs. A unit
    that is its own root (no ``fully_shard`` module around it) and takes part in the backward pass of some
    ranks only (no gradient flows through it elsewhere) cannot reduce there at all: :class:`BackwardOnEveryRank`
    raises on every rank instead. Returns the hooks it registered for that.
    """
    if not dist.is_available() or not dist.is_initialized():
        return []
    from torch.distributed.fsdp import FSDPModule

    wanted = {id(param) for param in params}
    names = {id(param): name for name, param in module.named_parameters()}
    hooks = []
    for name, unit, nested in _units(module, FSDPModule):
        held = [names[id(param)] for param in _own_parameters(unit, FSDPModule) if id(param) in wanted]
        if held:
            unit.set_reduce_scatter_unused_params(True, recurse=False)  # type: ignore[operator]
            if not nested:
                hooks.append(unit.register_forward_hook(BackwardOnEveryRank(name, held)))
    return hooks


class BackwardOnEveryRank:
    """Forward hook of a ``fully_shard`` root unit holding released parameters: with grad enabled, raises on every
    rank when its output needs a gradient on some ranks only (one all-reduce of a flag per rank)."""

    def __init__(self, unit: str, released: list[str]) -> None:
        self.unit = unit
        self.released = released

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if not torch.is_grad_enabled():
            return
        device = next(module.parameters()).device
        flags = torch.zeros(dist.get_world_size(), device=device)
        flags[dist.get_rank()] = float(_needs_gradient(output))
        dist.all_reduce(flags)
        without = [rank for rank, flag in enumerate(flags.tolist()) if flag == 0]
        if without and len(without) < len(flags):
            shown = ", ".join(self.released[:3]) + (
                f" and {len(self.released) - 3} more" if len(self.released) > 3 else ""
            )
            raise RuntimeError(
                f"GradualUnfreeze: under FSDP2, the released {shown} in `{self.unit}` get gradients on some ranks only:"
                f" no gradient flows through `{self.unit}` on rank(s) {without}, whose backward would skip its"
                " reduce-scatter while the other ranks wait for it. Use those parameters on every rank, or"
                f" `fully_shard` a module around `{self.unit}` (the model), whose backward reduces every unit inside."
            )


def _needs_gradient(output: object) -> bool:
    if isinstance(output, torch.Tensor):
        return output.requires_grad
    if isinstance(output, dict):
        return any(_needs_gradient(value) for value in output.values())
    if isinstance(output, list | tuple):
        return any(_needs_gradient(value) for value in output)
    return False


def _units(
    module: nn.Module, kind: type, prefix: str = "", nested: bool = False
) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(name, unit, nested)`` of each module of type ``kind`` in ``module``; ``nested``: inside another one."""
    if isinstance(module, kind):
        yield prefix, module, nested
        nested = True
    for name, child in module.named_children():
        yield from _units(child, kind, f"{prefix}.{name}" if prefix else name, nested)


def _own_parameters(unit: nn.Module, kind: type) -> Iterator[nn.Parameter]:
    """The parameters of ``unit`` outside the modules of type ``kind`` inside it (the units nested in a unit)."""
    yield from unit.parameters(recurse=False)
    for child in unit.children():
        if not isinstance(child, kind):
            yield from _own_parameters(child, kind)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a sharded tensor (a ``DTensor``: its ``device_mesh`` and ``placements`` say where its
    shards are)."""
    return getattr(tensor, "device_mesh", None) is not None


def squared_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The sum of squares of ``tensors``' elements, whole: a sharded tensor's (DTensor) over its shards. One tensor
    at a time (a generator of them keeps one in memory), in double precision.

    A collective over the sharded mesh dimensions when some tensors are sharded: call it on every rank alike.
    """
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        if not is_sharded(tensor):
            total += _squares(tensor).cpu()
            continue
        mesh = tensor.device_mesh  # type: ignore[attr-defined]
        local = _squares(tensor.to_local())  # type: ignore[attr-defined]
        for dim, placement in enumerate(tensor.placements):  # type: ignore[attr-defined]
            if placement.is_shard():
                dist.all_reduce(local, group=mesh.get_group(dim))
        total += local.cpu()
    return float(total)


def _squares(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor``'s squared elements in double precision, through one double copy squared in place."""
    return tensor.detach().to(torch.float64, copy=True).pow_(2).sum()
