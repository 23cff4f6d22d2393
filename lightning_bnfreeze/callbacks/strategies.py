"""How the callbacks meet Lightning's distributed strategies: which they support, process groups, late restores.

``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) restores a checkpoint
only after ``on_fit_start``, optimizers included, before the callbacks' state: param groups added
on resume must exist before that, so :func:`saved_state_for_late_restore` reads the callback's
state from the checkpoint in ``on_fit_start`` (whose path ``trainer.ckpt_path`` does not give yet).
Strategies are recognised by class name, so that those of ``pytorch_lightning`` are too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_bnfreeze.internals import DISTRIBUTED_CHECKPOINT_METADATA

__all__ = ["check_strategy", "data_parallel_group", "saved_callback_state"]

_CANNOT_ADD_GROUPS = frozenset({"FSDPStrategy", "DeepSpeedStrategy"})


def _strategy_names(strategy: object) -> set[str]:
    return {cls.__name__ for cls in type(strategy).__mro__}


def check_strategy(strategy: object, owner: str) -> None:
    """Raise before training for a strategy under which released parameters cannot join the optimizer."""
    names = _strategy_names(strategy)
    if names & _CANNOT_ADD_GROUPS:
        raise TypeError(
            f"{owner} does not support {type(strategy).__name__}: its optimizer cannot take new param groups"
            " during training. To shard the model, use `ModelParallelStrategy` with FSDP2 (`fully_shard` in"
            " `configure_model`); or strategy='ddp'."
        )
    if "ModelParallelStrategy" in names:
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()  # type: ignore[attr-defined]
        if tensor_parallel > 1:
            raise TypeError(
                f"{owner} supports `ModelParallelStrategy` for data parallelism only (FSDP2), got"
                f" tensor_parallel_size={tensor_parallel}: use `tensor_parallel_size=1`."
            )


def data_parallel_group(strategy: object) -> dist.ProcessGroup | None:
    """The process group of the ranks that hold replicas of the same data-parallel model (``None``: all ranks)."""
    if "ModelParallelStrategy" in _strategy_names(strategy):
        group = strategy.device_mesh["data_parallel"].get_group()  # type: ignore[attr-defined]
        assert isinstance(group, dist.ProcessGroup)
        return group
    return None


def saved_callback_state(path: Any, state_key: str) -> dict[str, Any] | None:
    """A callback's state in the checkpoint at ``path`` (a file, or a distributed checkpoint's folder)."""
    path = Path(path)
    metadata = path / DISTRIBUTED_CHECKPOINT_METADATA
    checkpoint = torch.load(metadata) if path.is_dir() else torch.load(path, map_location="cpu", mmap=True)
    state: dict[str, Any] | None = checkpoint.get("callbacks", {}).get(state_key)
    return state
