"""The Lightning callbacks: thin glue over the plain-PyTorch core."""

from lightning_bnfreeze.callbacks.bn_freeze import BNFreezeCallback
from lightning_bnfreeze.callbacks.early_stopping import ReleasingEarlyStopping
from lightning_bnfreeze.callbacks.gradual_unfreeze import GradualUnfreeze

__all__ = ["BNFreezeCallback", "GradualUnfreeze", "ReleasingEarlyStopping"]
