"""A copy of what training changes, to put back (plain PyTorch): the weights that train, every buffer, and their
optimizer state.

Taken at a release, it lets a release that made the training loss rise be undone
(:class:`~lightning_bnfreeze.callbacks.release_loss.ReleaseLossCheck`). It costs a copy of the trainable weights and of
their optimizer state (Adam's: twice the weights), kept for an epoch's batches at most; frozen weights are not copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["TrainingSnapshot"]

Saved = dict[str, tuple[Tensor, Tensor]]  # name: (the live tensor, its copy)


class TrainingSnapshot:
    """The parameters of ``root`` that require gradients, all its buffers, and those parameters' state in each of
    ``optimizers``, as they are now (or as ``saved``, a :meth:`state_dict`, holds them: :meth:`from_state_dict`).

    Example::

        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> snapshot = TrainingSnapshot(model, [optimizer])
        >>> before = model.weight.clone()
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> optimizer.step()
        >>> snapshot.restore()
        >>> torch.equal(model.weight, before), model.weight in optimizer.state
        (True, False)
    """

    def __init__(
        self, root: nn.Module, optimizers: Iterable[Optimizer], saved: Mapping[str, Any] | None = None
    ) -> None:
        self._optimizers = list(optimizers)
        if saved is not None:  # :meth:`from_state_dict`
            params, buffers = dict(root.named_parameters()), dict(root.named_buffers())
            self._params, self._buffers = _laid_out(saved["params"], params), _laid_out(saved["buffers"], buffers)
            self._states = [
                {
                    name: {key: _like(value, params[name]) for key, value in state.items()}
                    for name, state in kept.items()
                }
                for kept in saved["optimizers"]
            ]
            return
        self._params = {
            name: (param, param.detach().clone()) for name, param in root.named_parameters() if param.requires_grad
        }
        self._buffers = {name: (buffer, buffer.detach().clone()) for name, buffer in root.named_buffers()}
        self._states = [
            {name: _cloned(optimizer.state[p]) for name, (p, _) in self._params.items() if p in optimizer.state}
            for optimizer in self._optimizers
        ]

    def restore(self) -> None:
        """Put the weights, buffers and optimizer state back as they were (a parameter without state then has none:
        its optimizer starts it afresh, Adam's bias correction included). The snapshot stays, to restore again."""
        with torch.no_grad():
            for tensor, saved in (*self._params.values(), *self._buffers.values()):
                tensor.copy_(saved)
        for optimizer, states in zip(self._optimizers, self._states, strict=True):
            for name, (param, _) in self._params.items():
                if name in states:
                    optimizer.state[param] = _cloned(states[name])
                else:
                    optimizer.state.pop(param, None)

    def state_dict(self) -> dict[str, Any]:
        """The copies by name, whole and on the CPU (a sharded tensor's gathered: a collective under FSDP2, call it
        on every rank alike)."""
        return {
            "params": {name: _whole(saved) for name, (_, saved) in self._params.items()},
            "buffers": {name: _whole(saved) for name, (_, saved) in self._buffers.items()},
            "optimizers": [
                {name: {key: _whole(value) for key, value in state.items()} for name, state in states.items()}
                for states in self._states
            ],
        }

    @classmethod
    def from_state_dict(
        cls, root: nn.Module, optimizers: Iterable[Optimizer], state: Mapping[str, Any]
    ) -> TrainingSnapshot:
        """The snapshot :meth:`state_dict` saved, for ``root``'s tensors of those names (each copy laid out as its
        tensor: sharded as it is under FSDP2, a collective then)."""
        return cls(root, optimizers, state)


def _cloned(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value.detach().clone() if isinstance(value, Tensor) else value for key, value in state.items()}


def _laid_out(copies: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> Saved:
    return {name: (tensors[name], _like(copy, tensors[name])) for name, copy in copies.items()}


def _whole(value: Any) -> Any:
    """A tensor whole (gathered if sharded) on the CPU; anything else as it is."""
    if not isinstance(value, Tensor):
        return value
    full_tensor = getattr(value, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else value).detach().cpu().clone()


def _like(saved: Any, tensor: Tensor) -> Any:
    """``saved`` laid out as ``tensor`` if of its shape: on its device, sharded as it is (a DTensor's mesh and
    placements); anything else (Adam's ``step``) as it is."""
    if not isinstance(saved, Tensor) or saved.shape != tensor.shape:
        return saved
    mesh = getattr(tensor, "device_mesh", None)
    if mesh is None:
        return saved.to(tensor.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(saved.to(mesh.device_type), mesh, tensor.placements)  # type: ignore[attr-defined]
