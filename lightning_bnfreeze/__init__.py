"""Freezing that means frozen for PyTorch Lightning fine-tuning.

``BNFreezeCallback`` keeps frozen norm layers in inference mode with untouched statistics;
``GradualUnfreeze`` releases a frozen backbone block by block: what is released is ``Blocks``,
``Schedule`` or ``LayerDecay``, when is ``Every``, ``Plateau`` or your own ``Trigger``. The
plain-PyTorch core (``norm``, ``freezer``, ``blocks``, ``plan``, ``release``, ...) works on any
``nn.Module`` and imports no Lightning: the callbacks are imported (with Lightning) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_bnfreeze.adapt import AdaBN
from lightning_bnfreeze.blocks import Block, find_blocks
from lightning_bnfreeze.domain_shift import norm_statistics_shift
from lightning_bnfreeze.freezer import NormFreezer, governing_parameters, norm_layer_names
from lightning_bnfreeze.norm import freeze_norm, is_norm_frozen, is_norm_layer, named_norm_layers, unfreeze_norm
from lightning_bnfreeze.plan import Blocks, LayerDecay, Schedule
from lightning_bnfreeze.record import ReleaseRecord
from lightning_bnfreeze.triggers import At, Every, Moment, Plateau, Trigger

if TYPE_CHECKING:
    from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze, ReleasingEarlyStopping

__version__ = "0.15.0"

__all__ = [
    "AdaBN",
    "At",
    "BNFreezeCallback",
    "Block",
    "Blocks",
    "Every",
    "GradualUnfreeze",
    "LayerDecay",
    "Moment",
    "NormFreezer",
    "Plateau",
    "ReleaseRecord",
    "ReleasingEarlyStopping",
    "Schedule",
    "Trigger",
    "find_blocks",
    "freeze_norm",
    "governing_parameters",
    "is_norm_frozen",
    "is_norm_layer",
    "named_norm_layers",
    "norm_layer_names",
    "norm_statistics_shift",
    "unfreeze_norm",
]

_CALLBACKS = ("BNFreezeCallback", "GradualUnfreeze", "ReleasingEarlyStopping")


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        from lightning_bnfreeze import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
