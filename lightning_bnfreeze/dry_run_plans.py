"""The texts ``python -m lightning_bnfreeze.dry_run`` prints: plans and previews, without weights or training.

:func:`model_plan` puts a torchvision or timm model (:func:`build_model`, on the meta device) as the
``backbone`` of a :class:`StandIn` LightningModule and asks ``GradualUnfreeze`` for its dry run and,
given batches per epoch, the preview of its learning rates. :func:`config_plan` builds the model and
the trainer's callbacks of a LightningCLI config and does the same for each ``GradualUnfreeze``,
adding the norm layers each ``BNFreezeCallback`` freezes. The command line is in
:mod:`lightning_bnfreeze.dry_run`.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.freezer import set_requires_grad
from lightning_bnfreeze.names import closest_names
from lightning_bnfreeze.norm_plan import norm_freeze_plan

if TYPE_CHECKING:
    from lightning_bnfreeze.cli import ClearErrorsCLI

__all__ = ["StandIn", "build_model", "config_plan", "model_plan"]


class StandIn(pl.LightningModule):
    """A LightningModule with ``model`` as its ``backbone``, a one-parameter ``head`` and AdamW at ``lr``."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.backbone = model
        device = next(model.parameters(), torch.empty(0)).device
        self.head = nn.Linear(1, 1, device=device)
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def model_plan(options: argparse.Namespace) -> str:
    """``GradualUnfreeze(**arguments).dry_run(...)`` on the model of ``options.model`` (see :func:`build_model`),
    and with ``options.batches_per_epoch``, the learning rates of its preview."""
    own = ("model", "config", "max_epochs", "lr", "batches_per_epoch", "preview")
    arguments = {key: value for key, value in vars(options).items() if key not in own}
    callback = GradualUnfreeze(**arguments)
    model = StandIn(build_model(options.model), options.lr)
    parameters = sum(param.numel() for param in model.backbone.parameters())
    given = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    text = (
        f"GradualUnfreeze({given}) on {options.model} as `backbone` ({parameters:,} parameters; built on the meta"
        f" device: no weights, no training):\n\n{callback.dry_run(model, options.max_epochs)}"
    )
    if options.batches_per_epoch is None:
        return text
    max_epochs, max_steps = _preview_end(callback, model, options.max_epochs, options.batches_per_epoch)
    preview = callback.preview(model, options.batches_per_epoch, max_epochs, max_steps)
    text += f"\n\nLearning rates ({options.batches_per_epoch} batches per epoch, AdamW at lr {options.lr:g}):"
    text += f"\n{preview.table()}"
    if options.preview is not None:
        text += f"\nPlot: {preview.plot(options.preview)}"
    return text


def build_model(spec: str) -> nn.Module:
    """The torchvision or timm model named ``torchvision:NAME`` or ``timm:NAME``, built on the meta device; a timm
    model without its classifier (``num_classes=0``), as one fine-tunes it under a head of one's own.

    Raises:
        ValueError: another source, or a name the library does not know (with the closest names).
    """
    source, _, name = spec.partition(":")
    factory: Callable[[], nn.Module]
    if source == "torchvision":
        import torchvision  # type: ignore[import-untyped]

        names = torchvision.models.list_models()
        factory = lambda: torchvision.models.get_model(name, weights=None)  # noqa: E731
    elif source == "timm":
        import timm

        names = timm.list_models()
        factory = lambda: timm.create_model(name, pretrained=False, num_classes=0)  # noqa: E731
    else:
        raise ValueError(f"`--model` must be torchvision:NAME or timm:NAME here, got {spec!r}.")
    if name.partition(".")[0] not in names:  # timm accepts a pretrained tag: `vit_base_patch16_224.augreg_in21k`
        close = closest_names(name, names)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ValueError(f"`--model` names the {source} model {name!r}, which {source} does not know.{hint}")
    with torch.device("meta"):
        return factory()


def _preview_end(callback: GradualUnfreeze, model: nn.Module, max_epochs: int, batches: int) -> tuple[int, int]:
    """``max_epochs``, or else one epoch past the plan's last release, as ``(max_epochs, max_steps)``.

    Raises:
        ValueError: no ``max_epochs`` and release times that depend on the run (a metric).
    """
    if max_epochs >= 0:
        return max_epochs, -1
    times = callback.when.times(len(callback.plan(model).releases))
    if not times:
        raise ValueError(f"the preview of `when={callback.when!r}` needs an end: give --max-epochs N.")
    if callback.when.unit == "step":
        return -1, times[-1] + batches
    return times[-1] + 1, -1


def config_plan(args: list[str], options: argparse.Namespace, prog: str) -> str:
    """The dry run of each ``GradualUnfreeze`` and ``BNFreezeCallback`` of the LightningCLI command line ``args``
    (``prog``: the command LightningCLI's messages name) and with ``options.batches_per_epoch``, the learning rates
    of each preview (plotted to ``options.preview``, if given)."""
    cli = _lightning_cli(args, prog)
    configured = cli.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    callbacks = [callback for callback in configured if isinstance(callback, GradualUnfreeze)]
    max_epochs = cli.trainer.max_epochs if cli.trainer.max_epochs is not None else -1
    tables = []
    for callback in callbacks:
        last = cli.trainer.max_steps if callback.when.unit == "step" else max_epochs
        table = f"GradualUnfreeze(backbone={callback.backbone!r}):\n{callback.dry_run(cli.model, last)}"
        if options.batches_per_epoch is not None:
            trainer = cli.trainer
            preview = callback.preview(
                cli.model, options.batches_per_epoch, max_epochs, trainer.max_steps, trainer.accumulate_grad_batches
            )
            table += f"\n\nLearning rates ({options.batches_per_epoch} batches per epoch):\n{preview.table()}"
            if options.preview is not None:
                path = Path(options.preview)
                path = path if len(callbacks) == 1 else path.with_stem(f"{path.stem}-{callback.backbone}")
                table += f"\nPlot: {preview.plot(path)}"
        tables.append(table)
    # BNFreezeCallback() reads requires_grad: as at fit start, once each GradualUnfreeze froze its backbone.
    set_requires_grad([param for callback in callbacks for param in callback.frozen_at_start(cli.model)], False)
    frozen = ", ".join(repr(callback.backbone) for callback in callbacks)
    at_start = f"At fit start, after GradualUnfreeze froze {frozen} (its releases let them go as above):\n"
    tables += [
        (at_start if callbacks and callback.modules is None else "")
        + norm_freeze_plan(cli.model, callback.modules, callback.train_affine)
        for callback in configured
        if isinstance(callback, BNFreezeCallback)
    ]
    if not tables:
        none = "No GradualUnfreeze or BNFreezeCallback in `trainer.callbacks`; BNFreezeCallback() would do this."
        return f"{none}\n\n{norm_freeze_plan(cli.model)}"
    return "\n\n".join(tables)


def _lightning_cli(argv: list[str], prog: str) -> ClearErrorsCLI:
    """LightningCLI's model and trainer of ``argv``, without Lightning's banners (GPU/TPU available, tips)."""
    from lightning_bnfreeze.cli import ClearErrorsCLI  # jsonargparse: the `cli` extra, needed for configs only

    with _quiet("lightning.pytorch", "lightning.fabric"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LightningCLI's args parameter")  # `argv` is the command line, parsed
        return ClearErrorsCLI(
            args=argv,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": prog, "description": "LightningCLI arguments"},
        )


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only warnings and errors from these loggers meanwhile."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
