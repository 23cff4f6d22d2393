"""The callbacks for the standalone ``pytorch_lightning`` package.

``pytorch_lightning.Trainer`` runs the callbacks of ``lightning_bnfreeze`` as they are; its
LightningCLI, though, only accepts ``pytorch_lightning.Callback`` subclasses in
``trainer.callbacks``. These are the same callbacks, with that base class too::

    trainer:
      callbacks:
        - class_path: lightning_bnfreeze.pytorch_lightning.GradualUnfreeze
"""

from __future__ import annotations

import pytorch_lightning

from lightning_bnfreeze.callbacks import bn_freeze, early_stopping, gradual_unfreeze

__all__ = ["BNFreezeCallback", "GradualUnfreeze", "ReleasingEarlyStopping"]

# The hooks are annotated with `lightning.pytorch` types, hence mypy's [misc]: the two packages ship the same code.


class BNFreezeCallback(bn_freeze.BNFreezeCallback, pytorch_lightning.Callback):  # type: ignore[misc]
    __doc__ = bn_freeze.BNFreezeCallback.__doc__


class GradualUnfreeze(gradual_unfreeze.GradualUnfreeze, pytorch_lightning.Callback):  # type: ignore[misc]
    __doc__ = gradual_unfreeze.GradualUnfreeze.__doc__


class ReleasingEarlyStopping(early_stopping.ReleasingEarlyStopping, pytorch_lightning.callbacks.EarlyStopping):  # type: ignore[misc]
    __doc__ = early_stopping.ReleasingEarlyStopping.__doc__
