"""A copy of what training changes, to put back (plain PyTorch): the weights that train, every buffer, and their
optimizer state.

Taken at a release, it lets a release that made the training loss rise be undone
(:class:`~lightning_bnfreeze.callbacks.release_loss.ReleaseLossCheck`): a copy of the trainable weights, of every
buffer and of the weights' optimizer state (Adam's: twice the weights), kept for an epoch's batches at most; frozen
weights are not copied. Taken at the end of the lowest epoch, every weight and buffer without optimizer state, it lets
a fit that diverged go back there (:class:`~lightning_bnfreeze.callbacks.divergence_check.DivergenceCheck`). Both
keep their copies in the CPU's memory (:data:`~lightning_bnfreeze.tensor_copy.COPIES_DEVICE`): a model on an
accelerator keeps its memory for training. Under FSDP2 each rank copies its shards, beside them, and
:meth:`~TrainingSnapshot.state_dict` gathers the whole tensors on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_bnfreeze.fsdp import is_sharded
from lightning_bnfreeze.tensor_copy import TensorCopy

__all__ = ["TrainingSnapshot"]

Saved = dict[str, tuple[Tensor, TensorCopy]]  # name: (the live tensor, its copy)


class TrainingSnapshot:
    """The parameters of ``root`` that require gradients (with ``frozen``, every one), all its buffers, and (unless
    ``optimizer_state=False``) those parameters' state in each of ``optimizers``, as they are now (or as ``saved``, a
    :meth:`state_dict`, holds them: :meth:`from_state_dict`). A parameter copied without state restarts its state at
    :meth:`restore`. The copies live on ``device`` (``None``: each beside its tensor, as a sharded tensor's always
    is: :class:`~lightning_bnfreeze.tensor_copy.TensorCopy`); ``"cpu"`` keeps them out of an accelerator's memory.

    Example::

        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> snapshot = TrainingSnapshot(model, [optimizer], device="cpu")
        >>> before = model.weight.clone()
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> optimizer.step()
        >>> snapshot.restore()
        >>> torch.equal(model.weight, before), model.weight in optimizer.state
        (True, False)
    """

    def __init__(
        self,
        root: nn.Module,
        optimizers: Iterable[Optimizer],
        saved: Mapping[str, Any] | None = None,
        *,
        frozen: bool = False,
        optimizer_state: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self._optimizers = list(optimizers)
        self._device = None if device is None else torch.device(device)
        if saved is not None:  # :meth:`from_state_dict`
            params, buffers = dict(root.named_parameters()), dict(root.named_buffers())
            self._params, self._buffers = (
                self._laid_out(saved["params"], params),
                self._laid_out(saved["buffers"], buffers),
            )
            self._states = [
                {name: self._copied(_state_like(state, params[name], optimizer)) for name, state in kept.items()}
                for optimizer, kept in zip(self._optimizers, saved["optimizers"], strict=True)
            ]
            return
        self._params = {
            name: (param, TensorCopy.of(param, self._device))
            for name, param in root.named_parameters()
            if frozen or param.requires_grad
        }
        self._buffers = {name: (buffer, TensorCopy.of(buffer, self._device)) for name, buffer in root.named_buffers()}
        self._states = [
            {
                name: self._copied(optimizer.state[p])
                for name, (p, _) in self._params.items()
                if optimizer_state and p in optimizer.state
            }
            for optimizer in self._optimizers
        ]

    def restore(self, keep: Iterable[Tensor] = ()) -> None:
        """Put the weights, buffers and optimizer state back as they were (a parameter without state then has none:
        its optimizer starts it afresh, Adam's bias correction included), but the buffers in ``keep``; gradients are
        dropped (those of an accumulation in progress were taken at the weights undone). The snapshot stays, to
        restore again."""
        kept = {id(tensor) for tensor in keep}
        for tensor, copy in (*self._params.values(), *self._buffers.values()):
            if id(tensor) not in kept:
                copy.put_back(tensor)
        for optimizer, states in zip(self._optimizers, self._states, strict=True):
            optimizer.zero_grad(set_to_none=True)
            for name, (param, _) in self._params.items():
                if name in states:
                    optimizer.state[param] = {key: _laid_back(value) for key, value in states[name].items()}
                else:
                    optimizer.state.pop(param, None)

    def state_dict(self) -> dict[str, Any]:
        """The copies by name, whole and on the CPU (a sharded tensor's gathered: a collective under FSDP2, call it
        on every rank alike)."""
        return {
            "params": {name: _whole(copy) for name, (_, copy) in self._params.items()},
            "buffers": {name: _whole(copy) for name, (_, copy) in self._buffers.items()},
            "optimizers": [
                {name: {key: _whole(value) for key, value in state.items()} for name, state in states.items()}
                for states in self._states
            ],
        }

    @classmethod
    def from_state_dict(
        cls,
        root: nn.Module,
        optimizers: Iterable[Optimizer],
        state: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
    ) -> TrainingSnapshot:
        """The snapshot :meth:`state_dict` saved, for ``root``'s tensors of those names (each copy laid out as its
        tensor: sharded as it is under FSDP2, a collective then), its copies on ``device``."""
        return cls(root, optimizers, state, device=device)

    def _copied(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """An optimizer state with its tensors copied."""
        return {
            key: TensorCopy.of(value, self._device) if isinstance(value, Tensor) else value
            for key, value in state.items()
        }

    def _laid_out(self, copies: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> Saved:
        """Whole saved copies, each laid out as its tensor and copied."""
        return {
            name: (tensors[name], TensorCopy.of(_like(copy, tensors[name]), self._device))
            for name, copy in copies.items()
        }


def _laid_back(value: Any) -> Any:
    """An optimizer state's value as it was, a new tensor for the optimizer to change."""
    return value.tensor() if isinstance(value, TensorCopy) else value


def _whole(value: Any) -> Any:
    """A copy whole (gathered if sharded) on the CPU; anything else as it is."""
    return value.whole() if isinstance(value, TensorCopy) else value


def _state_like(state: Mapping[str, Any], param: Tensor, optimizer: Optimizer) -> dict[str, Any]:
    """A parameter's saved optimizer state placed as ``Optimizer.load_state_dict`` places it: tensors of the
    parameter's shape laid out as the parameter (sharded as it is), other tensors on its device, but ``step``, which
    stays where it was saved (the CPU) unless its group is ``fused`` or ``capturable``."""
    group = next(group for group in optimizer.param_groups if any(p is param for p in group["params"]))
    on_device = bool(group.get("fused") or group.get("capturable"))
    return {
        key: value if not isinstance(value, Tensor) or (key == "step" and not on_device)
        else _like(value, param) if value.shape == param.shape
        else value.to(_device_of(param))
        for key, value in state.items()
    }  # fmt: skip


def _device_of(tensor: Tensor) -> torch.device:
    return torch.device(tensor.device_mesh.device_type) if is_sharded(tensor) else tensor.device  # type: ignore[attr-defined]


def _like(saved: Tensor, tensor: Tensor) -> Tensor:
    """``saved`` (of ``tensor``'s shape) laid out as ``tensor``: on its device, sharded as it is (a DTensor's mesh and
    placements)."""
    if not is_sharded(tensor):
        return saved.to(tensor.device)
    from torch.distributed.tensor import distribute_tensor

    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return distribute_tensor(saved.to(mesh.device_type), mesh, tensor.placements)  # type: ignore[attr-defined]
