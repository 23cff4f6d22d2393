"""A tensor's values copied to a device of your choice (plain PyTorch), to put back into the tensor or compare with
it: how the loss checks' snapshots (:mod:`~lightning_bnfreeze.snapshot`) and the first-step measure
(:class:`~lightning_bnfreeze.step_size.FirstStep`) keep weights in the CPU's memory, out of an accelerator's.

A sharded tensor (FSDP2's ``DTensor``) is copied as it is, sharded beside it (each rank holds its own shards: a part
of the weights), never moved: laid out again by ``DTensor.from_local``, the shards of a model whose FSDP2 keeps them
on the CPU (``CPUOffloadPolicy``) would land on its mesh's accelerator. A meta tensor, which holds no values, stays a
meta tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_bnfreeze.fsdp import is_sharded

__all__ = ["COPIES_DEVICE", "TensorCopy"]

COPIES_DEVICE = "cpu"
"""Where the library keeps its copies of weights (the loss checks' snapshots, the first-step measure): in the CPU's
memory, as Lightning's ``StochasticWeightAveraging`` keeps its average, so that a model on an accelerator keeps its
memory for training; they move there and back when taken, put back, compared, and saved or loaded with a checkpoint."""


@dataclass(frozen=True)
class TensorCopy:
    """A tensor's values on a device of their own (a sharded tensor's: sharded beside it), and the device to put
    them back on.

    Example::

        >>> weight = torch.ones(2, 2)
        >>> copy = TensorCopy.of(weight, "cpu")
        >>> _ = weight.add_(1.0)
        >>> copy.put_back(weight)
        >>> torch.equal(weight, torch.ones(2, 2)), torch.equal(copy.tensor(), weight)
        (True, True)
    """

    values: Tensor
    device: torch.device  # the copied tensor's

    @classmethod
    def of(cls, tensor: Tensor, device: torch.device | str | None = None) -> TensorCopy:
        """``tensor``'s values copied to ``device`` (``None``, a sharded or a meta tensor: beside the tensor)."""
        values = tensor.detach()
        if device is None or values.is_meta or is_sharded(values):
            return cls(values.clone(), values.device)
        return cls(values.to(device, copy=True), values.device)

    def tensor(self, copy: bool = True) -> Tensor:
        """The values on the copied tensor's device, sharded as it was; with ``copy=False`` the kept values
        themselves where they are there already (to read, not to change)."""
        if is_sharded(self.values):
            return self.values.clone() if copy else self.values
        return self.values.to(self.device, copy=copy)

    def put_back(self, tensor: Tensor) -> None:
        """Copy the values back into ``tensor`` (the copied one, or one laid out as it), in place."""
        with torch.no_grad():
            tensor.copy_(self.values)

    def whole(self) -> Tensor:
        """The values whole (gathered if sharded: a collective under FSDP2, call it on every rank alike), on the CPU."""
        if is_sharded(self.values):
            gathered: Tensor = self.values.full_tensor()  # type: ignore[attr-defined]
            return gathered.cpu().clone()
        return self.values.to("cpu", copy=True)
