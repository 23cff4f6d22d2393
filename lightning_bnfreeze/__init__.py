"""Freezing that means frozen for PyTorch Lightning fine-tuning.

``BNFreezeCallback`` keeps frozen norm layers in inference mode with untouched statistics;
``GradualUnfreeze`` releases a frozen backbone block by block at discriminative learning rates.
The plain-PyTorch core (``norm``, ``freezer``, ``names``) works on any ``nn.Module``.
"""

from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.freezer import NormFreezer, deciding_parameters, norm_layer_names
from lightning_bnfreeze.norm import freeze_norm, is_norm_frozen, is_norm_layer, named_norm_layers, unfreeze_norm

__version__ = "0.1.0"

__all__ = [
    "BNFreezeCallback",
    "GradualUnfreeze",
    "NormFreezer",
    "deciding_parameters",
    "freeze_norm",
    "is_norm_frozen",
    "is_norm_layer",
    "named_norm_layers",
    "norm_layer_names",
    "unfreeze_norm",
]
