"""The Lightning callbacks: thin glue over the plain-PyTorch core."""

from lightning_bnfreeze.callbacks.bn_freeze import BNFreezeCallback

__all__ = ["BNFreezeCallback"]
