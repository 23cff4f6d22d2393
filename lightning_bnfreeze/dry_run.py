"""What the callbacks would do, without training: GradualUnfreeze's release plan, BNFreezeCallback's frozen layers.

Two ways in::

    python -m lightning_bnfreeze.dry_run --config config.yaml                        # a LightningCLI config
    python -m lightning_bnfreeze.dry_run --model torchvision:vit_b_16 --lr_scale 0.1  # a torchvision or timm model

With ``--config``, ``--batches-per-epoch N`` adds the learning rate of every param group at each
epoch start and release (the trainer's ``max_epochs``, ``max_steps`` and ``accumulate_grad_batches``
from the config); ``--preview lr.png`` also draws them, step by step. ``--help`` describes it all.
:func:`main` returns the text it prints.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml  # type: ignore[import-untyped]
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.cli import ClearErrorsCLI
from lightning_bnfreeze.names import closest_names
from lightning_bnfreeze.norm_plan import norm_freeze_plan

__all__ = ["build_model", "main", "model_plan"]

PROG = "python -m lightning_bnfreeze.dry_run"
CLI_AVAILABLE = RequirementCache("jsonargparse[signatures]")
"""LightningCLI's parser, in the ``[cli]`` extra: needed for ``--config``, not for ``--model SOURCE:NAME``."""
NEEDS_CLI = "dry_run: --config needs LightningCLI's jsonargparse: pip install 'lightning-bnfreeze[cli]'"
MODEL_SOURCES = ("torchvision", "timm")

DESCRIPTION = f"""\
Show what the callbacks would do, without weights or training.

  {PROG} --config config.yaml [LightningCLI arguments]
      Builds the model and the trainer's callbacks of a LightningCLI config (the model from
      `model.class_path`, or --model path.to.LightningModule) and prints each GradualUnfreeze's
      release plan (epochs, blocks, parameters, learning-rate factors) and which norm layers each
      BNFreezeCallback freezes, and why; with neither callback, what BNFreezeCallback() would freeze.
      --batches-per-epoch N adds the learning rate of every param group at each epoch start and
      release; --preview lr.png also draws them, step by step.

  {PROG} --model SOURCE:NAME [GradualUnfreeze arguments]
      Builds a torchvision or timm model on the meta device (no memory, no download), as the
      `backbone` of a stand-in LightningModule, and prints GradualUnfreeze(...).dry_run(...).
      Examples: --model torchvision:vit_b_16, --model timm:convnext_tiny --lr_scale 0.1"""


class BackboneHolder(nn.Module):
    """A stand-in for a LightningModule whose ``backbone`` is ``model`` (as ``GradualUnfreeze`` expects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model


def main(args: Sequence[str] | None = None) -> str:
    """The dry run of ``args`` (default: the command line), as printed by ``python -m lightning_bnfreeze.dry_run``."""
    argv = list(sys.argv[1:] if args is None else args)
    parser = _model_parser()
    if "-h" in argv or "--help" in argv:
        _print_help(parser)
    if _model_source(argv) in MODEL_SOURCES:
        return model_plan(parser.parse_args(argv))
    return _config_plan(argv)


def model_plan(options: argparse.Namespace) -> str:
    """``GradualUnfreeze(**arguments).dry_run(...)`` on the model of ``options.model`` (see :func:`build_model`)."""
    arguments = {key: value for key, value in vars(options).items() if key not in ("model", "max_epochs", "help")}
    callback = GradualUnfreeze(**arguments)
    model = build_model(options.model)
    parameters = sum(param.numel() for param in model.parameters())
    given = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return (
        f"GradualUnfreeze({given}) on {options.model} as `backbone` ({parameters:,} parameters; built on the meta"
        f" device: no weights, no training):\n\n{callback.dry_run(BackboneHolder(model), options.max_epochs)}"
    )


def build_model(spec: str) -> nn.Module:
    """The torchvision or timm model named ``torchvision:NAME`` or ``timm:NAME``, built on the meta device.

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
        factory = lambda: timm.create_model(name, pretrained=False)  # noqa: E731
    else:
        raise ValueError(f"`--model` must be torchvision:NAME or timm:NAME here, got {spec!r}.")
    if name.partition(".")[0] not in names:  # timm accepts a pretrained tag: `vit_base_patch16_224.augreg_in21k`
        close = closest_names(name, names)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ValueError(f"`--model` names the {source} model {name!r}, which {source} does not know.{hint}")
    with torch.device("meta"):
        return factory()


def _preview_options(args: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``--batches-per-epoch`` and ``--preview``, and the arguments left for LightningCLI."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--batches-per-epoch", type=int, default=None)
    parser.add_argument("--preview", default=None, metavar="PNG")
    options, rest = parser.parse_known_args(sys.argv[1:] if args is None else args)
    if options.preview is not None and options.batches_per_epoch is None:
        raise SystemExit("dry_run: `--preview` needs `--batches-per-epoch N` (training batches per epoch).")
    return options, rest


def _model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s --config CONFIG [...]\n       %(prog)s --model SOURCE:NAME [--max_epochs N] [--ARG VALUE ...]",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="this page, then the LightningCLI arguments")
    parser.add_argument("--model", metavar="SOURCE:NAME", help="torchvision:NAME or timm:NAME (else: LightningCLI's)")
    parser.add_argument("--max_epochs", type=int, default=-1, help="mark the releases at or past it (default: none)")
    group = parser.add_argument_group(
        "GradualUnfreeze arguments, with --model SOURCE:NAME",
        "Values are YAML, as in a config: --lr_scale 0.1, --schedule '{1: backbone.heads, 2: backbone.encoder}'.",
    )
    for name, parameter in inspect.signature(GradualUnfreeze.__init__).parameters.items():
        if name != "self":
            default = f"default: {parameter.default!r}"
            group.add_argument(f"--{name}", type=yaml.safe_load, default=argparse.SUPPRESS, metavar="V", help=default)
    return parser


def _model_source(argv: Sequence[str]) -> str:
    """The ``SOURCE`` of ``--model SOURCE:NAME`` in ``argv`` (``""`` for a dotted path or no ``--model``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default="")
    model: str = parser.parse_known_args(argv)[0].model
    return model.partition(":")[0] if ":" in model else ""


def _print_help(parser: argparse.ArgumentParser) -> None:
    print(parser.format_help())
    if not CLI_AVAILABLE:
        print(NEEDS_CLI)
        raise SystemExit(0)
    print("LightningCLI arguments, for --config (and --model path.to.LightningModule):\n", flush=True)
    _lightning_cli(["--help"])  # prints them and exits


def _config_plan(argv: list[str]) -> str:
    if not CLI_AVAILABLE:
        raise SystemExit(NEEDS_CLI)
    options, args = _preview_options(argv)
    cli = _lightning_cli(args)
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
    tables += [
        norm_freeze_plan(cli.model, callback.modules, callback.train_affine)
        for callback in configured
        if isinstance(callback, BNFreezeCallback)
    ]
    if not tables:
        none = "No GradualUnfreeze or BNFreezeCallback in `trainer.callbacks`; BNFreezeCallback() would do this."
        return f"{none}\n\n{norm_freeze_plan(cli.model)}"
    return "\n\n".join(tables)


def _lightning_cli(argv: list[str]) -> ClearErrorsCLI:
    """LightningCLI's model and trainer of ``argv``, without Lightning's banners (GPU/TPU available, tips)."""
    with _quiet("lightning.pytorch", "lightning.fabric"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LightningCLI's args parameter")  # `argv` is the command line, parsed
        return ClearErrorsCLI(
            args=argv,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": PROG, "description": "LightningCLI arguments"},
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


if __name__ == "__main__":
    try:
        print(main())
    except ValueError as error:  # a bad argument: the message names it
        raise SystemExit(f"error: {error}") from None
