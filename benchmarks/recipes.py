"""The fine-tuning recipes the transfer benchmarks compare: the peers and ours, as callbacks and model options.

A recipe is a name, optionally with ``key=value`` options (``ours:lr_scale=0.5,bn='train'``):

- ``full``: everything trains from the first step, BatchNorm statistics included (plain PyTorch).
- ``full_bn_frozen``: everything trains, BatchNorm statistics frozen
  (``BNFreezeCallback(modules="backbone", train_affine=True)``, Keras' recipe after unfreezing).
- ``probe``: a linear probe, the backbone and its statistics frozen (``BNFreezeCallback(modules="backbone")``).
- ``backbone_finetuning``: Lightning's ``BackboneFinetuning()`` with its defaults (release at epoch 10).
- ``finetuning_scheduler``: finetuning-scheduler, the head then one block per epoch from epoch 1,
  output side first, each phase at 0.1 x the head's learning rate (``lr_factor=...`` to change it);
  the blocks left at the last epoch (more blocks than epochs - 1) are released together then.
- ``llrd``: timm-style layer-wise learning-rate decay 0.75 from the first step (``decay=...``).
- ``ours``: ``GradualUnfreeze()`` with the library's defaults; options are its arguments, with
  ``per_release``, ``granularity``, ``decay`` given to ``Blocks`` (``layer_decay=0.75``: ``LayerDecay(0.75)``
  instead, with ``granularity``) and ``every``, ``first`` to ``Every``; ``adapt=32``: ``adapt=AdaBN(prior=32)``
  (``adapt=None``: no adaptation).
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = [
    "PEERS",
    "REFERENCES",
    "callbacks_of",
    "finetuning_scheduler",
    "fts_schedule",
    "model_options",
    "options",
    "validate",
]

PEERS = ("full", "full_bn_frozen", "backbone_finetuning", "finetuning_scheduler", "llrd")
"""The recipes ours is compared with (the best of them at each setting)."""
REFERENCES = ("probe",)
"""Recipes reported, not competed with: ours must stay above the probe on every seed."""
KNOWN = (*PEERS, *REFERENCES, "ours")


def options(recipe: str) -> dict[str, Any]:
    """``{key: value}`` of ``name:key=value,...`` (values are Python literals)."""
    pairs = (item.partition("=") for item in recipe.partition(":")[2].split(",") if item)
    return {key.strip(): ast.literal_eval(value.strip()) for key, _, value in pairs}


def validate(recipe: str) -> None:
    """Raise ``ValueError`` for an unknown recipe or unparsable options."""
    if recipe.partition(":")[0] not in KNOWN:
        raise ValueError(f"unknown recipe {recipe!r}; known: {KNOWN} (with ':key=value,...' options)")
    options(recipe)


def model_options(recipe: str) -> dict[str, Any]:
    """What the recipe changes in the model: a frozen backbone (probe) or layer-wise decay groups."""
    name = recipe.partition(":")[0]
    if name == "probe":
        return {"freeze": True}
    if name == "llrd":
        return {"layer_decay": float(options(recipe).get("decay", 0.75))}
    return {}


def gradual_unfreeze(recipe: str) -> Any:
    """``GradualUnfreeze`` with the recipe's options (``per_release``, ``granularity``, ``decay`` to ``Blocks``,
    ``layer_decay`` and ``granularity`` to ``LayerDecay``, ``every``, ``first`` to ``Every``, a prior or ``None``
    to ``adapt``)."""
    from lightning_bnfreeze import AdaBN, Blocks, Every, GradualUnfreeze, LayerDecay

    kwargs = options(recipe)
    if "adapt" in kwargs:
        kwargs["adapt"] = None if kwargs["adapt"] is None else AdaBN(prior=kwargs["adapt"])
    blocks = {key: kwargs.pop(key) for key in ("per_release", "granularity", "decay") if key in kwargs}
    cadence = {key: kwargs.pop(key) for key in ("every", "first") if key in kwargs}
    if "layer_decay" in kwargs:
        kwargs["what"] = LayerDecay(kwargs.pop("layer_decay"), **blocks)
    elif blocks:
        kwargs["what"] = Blocks(**blocks)
    if cadence:
        kwargs["when"] = Every(epochs=cadence.get("every", 1), first=cadence.get("first"))
    return GradualUnfreeze(**kwargs)


def fts_schedule(phases: Sequence[Sequence[str]], lr: float, epochs: int, lr_factor: float = 0.1) -> dict[int, Any]:
    """A finetuning-scheduler schedule: phase 0 trains the ``head``, then phase ``k`` adds ``phases[k - 1]``
    (parameter name patterns, output side first) at epoch ``k``, at ``lr_factor * lr``, until the last epoch.

    finetuning-scheduler moves one phase per epoch, and lengthens the fit to reach the last phase's
    epoch: with more phases than ``epochs - 1``, those left at the last epoch join into one.
    """
    phases = [list(phase) for phase in phases]
    last = max(1, epochs - 1)
    if len(phases) > last:
        phases = [*phases[: last - 1], [pattern for phase in phases[last - 1 :] for pattern in phase]]
    schedule: dict[int, dict[str, Any]] = {0: {"params": [r"head\..*"], "max_transition_epoch": 1}}
    for depth, patterns in enumerate(phases, start=1):
        end = depth + 1 if depth < len(phases) else epochs
        schedule[depth] = {"params": patterns, "lr": lr_factor * lr, "max_transition_epoch": end}
    return schedule


def finetuning_scheduler(schedule: dict[int, dict[str, Any]], log_dir: str | None = None) -> Any:
    """``FinetuningScheduler`` on ``schedule``: epoch-driven transitions only, no restore of the best checkpoint."""
    from finetuning_scheduler import FinetuningScheduler

    return FinetuningScheduler(
        ft_schedule=schedule,
        epoch_transitions_only=True,
        restore_best=False,
        log_dir=log_dir,
        logging_level=logging.ERROR,
    )


def callbacks_of(recipe: str, model: nn.Module, lr: float, epochs: int, log_dir: str) -> list[Any]:
    """The callbacks of a recipe for ``model`` (finetuning-scheduler's checkpoints go to ``log_dir``)."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    from lightning_bnfreeze import BNFreezeCallback

    name = recipe.partition(":")[0]
    if name in ("full", "llrd"):
        return []
    if name == "full_bn_frozen":
        return [BNFreezeCallback(modules="backbone", train_affine=True)]
    if name == "probe":
        return [BNFreezeCallback(modules="backbone")]
    if name == "backbone_finetuning":
        return [BackboneFinetuning()]
    if name == "ours":
        return [gradual_unfreeze(recipe)]
    from finetuning_scheduler.fts_supporters import FTSCheckpoint

    from lightning_bnfreeze import find_blocks

    blocks = reversed(find_blocks(model.get_submodule("backbone"), "backbone"))
    phases = [[re.escape(name) for name in block.params] for block in blocks]
    return [
        finetuning_scheduler(fts_schedule(phases, lr, epochs, **options(recipe)), log_dir),
        FTSCheckpoint(dirpath=log_dir, monitor="val_loss", save_top_k=1),
    ]
