"""A tensor's values copied to a device of your choice (plain PyTorch), to put back into the tensor or lay out as it
was: how the loss checks' snapshots (:mod:`~lightning_bnfreeze.snapshot`) and the first-step measure
(:class:`~lightning_bnfreeze.step_size.FirstStep`) keep weights in the CPU's memory, out of an accelerator's. A
sharded tensor (FSDP2's ``DTensor``) is copied as its local shard, with its mesh and placements."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["TensorCopy", "local_tensor"]


class TensorCopy(NamedTuple):
    """A tensor's values (a sharded tensor's local shard) on a device of their own, and how to lay them out again.

    Example::

        >>> weight = torch.ones(2, 2)
        >>> copy = TensorCopy.of(weight, "cpu")
        >>> _ = weight.add_(1.0)
        >>> copy.put_back(weight)
        >>> torch.equal(weight, torch.ones(2, 2)), torch.equal(copy.tensor(), weight)
        (True, True)
    """

    values: Tensor
    device: torch.device  # the tensor's (its local shard's)
    mesh: Any  # a DTensor's device mesh, placements, shape and stride; None for a plain tensor
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: Tensor, device: torch.device | str | None = None) -> TensorCopy:
        """``tensor``'s values copied to ``device`` (``None``, or a meta tensor, which holds none: beside the
        tensor)."""
        local = local_tensor(tensor).detach()
        values = local.to(local.device if device is None or local.is_meta else device, copy=True)
        mesh = getattr(tensor, "device_mesh", None)
        return cls(values, local.device, mesh, tuple(getattr(tensor, "placements", ())), tensor.shape, tensor.stride())

    def tensor(self) -> Tensor:
        """A new tensor of these values laid out as the copied one: on its device, sharded as it was."""
        local = self.values.to(self.device, copy=True)
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def put_back(self, tensor: Tensor) -> None:
        """Copy the values back into ``tensor`` (the copied one, or one laid out as it), in place."""
        with torch.no_grad():
            local_tensor(tensor).copy_(self.values)

    def whole(self) -> Tensor:
        """The values whole (gathered if sharded: a collective under FSDP2, call it on every rank alike), on the CPU."""
        if self.mesh is None:
            return self.values.cpu().clone()
        gathered: Tensor = self.tensor().full_tensor()  # type: ignore[attr-defined]
        return gathered.cpu()


def local_tensor(tensor: Tensor) -> Tensor:
    """A sharded tensor's local shard; a plain tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
