"""How the callbacks meet Lightning's distributed strategies: which they support, process groups, late restores.

``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) restores a checkpoint
only after ``on_fit_start``, optimizers included, in ``strategy.load_checkpoint``: param groups
added on resume must exist before that, so :func:`restore_before_optimizers` hands the callback its
saved state just before. Strategies are recognised by class name, so that those of
``pytorch_lightning`` are too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

__all__ = ["check_strategy", "data_parallel_group", "forget_restore_hook", "restore_before_optimizers"]

_CANNOT_ADD_GROUPS = frozenset({"FSDPStrategy", "DeepSpeedStrategy"})
_METADATA_FILE = "meta.pt"  # the non-tensor part of a distributed checkpoint (a folder), as Lightning writes it


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


def restore_before_optimizers(
    strategy: pl.strategies.Strategy, state_key: str, restore: Callable[[dict[str, Any]], None]
) -> None:
    """On resume under a strategy that restores the checkpoint after ``on_fit_start``, call ``restore(state)``
    with the callback's saved state just before the strategy loads the optimizers.

    Call from ``on_fit_start``; :func:`forget_restore_hook` once training starts (no resume happened then).
    """
    if not strategy.restore_checkpoint_after_setup:
        return
    load_checkpoint = strategy.load_checkpoint

    def restore_then_load(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        forget_restore_hook(strategy)
        state = _saved_callback_state(Path(checkpoint_path), state_key)
        if state is not None:
            restore(state)
        return load_checkpoint(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = restore_then_load  # type: ignore[method-assign]


def forget_restore_hook(strategy: pl.strategies.Strategy) -> None:
    """Undo :func:`restore_before_optimizers` (every callback's), if the checkpoint was not loaded."""
    vars(strategy).pop("load_checkpoint", None)


def _saved_callback_state(path: Path, state_key: str) -> dict[str, Any] | None:
    # Read as Lightning reads it: a distributed checkpoint keeps everything but tensors in its metadata file.
    checkpoint = torch.load(path / _METADATA_FILE) if path.is_dir() else torch.load(path, map_location="cpu", mmap=True)
    state: dict[str, Any] | None = checkpoint.get("callbacks", {}).get(state_key)
    return state
