"""What the callbacks would do, without training: GradualUnfreeze's release plan, BNFreezeCallback's frozen layers.

Two ways in::

    python -m lightning_bnfreeze.dry_run --model timm:convnext_tiny --lr-scale 0.5      # a torchvision or timm model
    python -m lightning_bnfreeze.dry_run --config config.yaml                          # a LightningCLI config

``--batches-per-epoch N`` adds the learning rate of every param group at each epoch start and
release; ``--preview lr.png`` also draws them, step by step. ``--help`` describes it all.
:func:`main` returns the text it prints.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
import yaml  # type: ignore[import-untyped]
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_bnfreeze.adapt import AdaBN
from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.cli import ClearErrorsCLI
from lightning_bnfreeze.names import closest_names
from lightning_bnfreeze.norm_plan import norm_freeze_plan
from lightning_bnfreeze.plan import Blocks, LayerDecay, Schedule, What
from lightning_bnfreeze.release import NORM_MODES
from lightning_bnfreeze.triggers import Every, Plateau, Trigger

__all__ = ["StandIn", "build_model", "main", "model_plan", "release_object"]

PROG = "python -m lightning_bnfreeze.dry_run"
CLI_AVAILABLE = RequirementCache("jsonargparse[signatures]")
"""LightningCLI's parser, in the ``[cli]`` extra: needed for ``--config``, not for ``--model SOURCE:NAME``."""
NEEDS_CLI = "dry_run: --config needs LightningCLI's jsonargparse: pip install 'lightning-bnfreeze[cli]'"
MODEL_SOURCES = ("torchvision", "timm")
OBJECTS: dict[str, tuple[type, dict[str, type]]] = {
    "what": (What, {"Blocks": Blocks, "Schedule": Schedule, "LayerDecay": LayerDecay}),
    "when": (Trigger, {"Every": Every, "Plateau": Plateau}),
    "adapt": (AdaBN, {"AdaBN": AdaBN}),
}
"""The GradualUnfreeze arguments that take an object: the base class (of a dotted path's class) and the short names."""
_ARGUMENTS = inspect.signature(GradualUnfreeze).parameters
MODEL_ONLY = ("--max-epochs", "--lr", *(f"--{name.replace('_', '-')}" for name in _ARGUMENTS))
"""The options that go with ``--model SOURCE:NAME`` only."""
METAVARS = {
    "backbone": "NAME",
    "what": "OBJECT",
    "when": "OBJECT",
    "adapt": "OBJECT",
    "lr_scale": "X",
    "bn": "MODE",
    "warmup_steps": "N",
    "trainable": "[GLOB,...]",
    "optimizer_index": "N",
}

USAGE = f"""\
{PROG} --model SOURCE:NAME [--max-epochs N] [--GRADUAL-UNFREEZE-ARGUMENT VALUE ...]
       {PROG} --config CONFIG [LightningCLI arguments]
       ... [--batches-per-epoch N [--preview PNG]]"""
DESCRIPTION = """\
Show what the callbacks would do, without weights or training: GradualUnfreeze's blocks and releases
(time, parts, parameters, learning rate relative to the head's, norm layers), BNFreezeCallback's frozen
norm layers and why.

--model SOURCE:NAME builds a torchvision or timm model (torchvision:vit_b_16, timm:convnext_tiny) on
the meta device (no weights, no download) as the `backbone` of a stand-in LightningModule (a head and
AdamW at --lr, no LR scheduler), and takes GradualUnfreeze's arguments as options.
--config CONFIG builds the model and the trainer's callbacks of a LightningCLI config (with neither
callback in it: what BNFreezeCallback() would freeze); `--config CONFIG --help` lists LightningCLI's
arguments, which may follow it."""
EPILOG = f"""\
Values are YAML, as in a config; an object is a class name or {{class_path: NAME, init_args: {{...}}}}.
Examples:
  {PROG} --model torchvision:resnet18 --what '{{class_path: Schedule, init_args:
      {{releases: {{1: backbone.layer4, 2: backbone.layer3}}, decay: 0.5}}}}' --lr-scale 0.1 --max-epochs 3
  {PROG} --model timm:convnext_tiny --what '{{class_path: Blocks, init_args: {{per_release: 1}}}}'
  {PROG} --model timm:vit_tiny_patch16_224 --when '{{class_path: Every, init_args: {{steps: 50}}}}' \\
      --warmup-steps 20 --batches-per-epoch 100 --preview lr.png
  {PROG} --config examples/configs/gradual_unfreeze.yaml --batches-per-epoch 5"""


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


def main(args: Sequence[str] | None = None) -> str:
    """The dry run of ``args`` (default: the command line), as printed by ``python -m lightning_bnfreeze.dry_run``."""
    argv = list(sys.argv[1:] if args is None else args)
    parser = _parser()
    if _model_source(argv) in MODEL_SOURCES:
        options = parser.parse_args(argv)
        if options.preview is not None and options.batches_per_epoch is None:
            parser.error("--preview needs --batches-per-epoch N (training batches per epoch).")
        return model_plan(options)
    if not any(arg.partition("=")[0] == "--config" for arg in argv):
        parser.parse_args(argv)  # --help prints the page
        parser.error("give --model SOURCE:NAME (torchvision or timm) or --config CONFIG.")
    given = [arg for arg in argv if arg.partition("=")[0] in MODEL_ONLY]
    if given:
        parser.error(f"{', '.join(given)}: with --model SOURCE:NAME only; with --config, set it in the config.")
    return _config_plan(argv, parser)


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


def release_object(argument: str, text: str) -> object:
    """The object a command-line value of ``what``, ``when`` or ``adapt`` describes, in YAML: a class name, or
    ``{class_path: NAME, init_args: {...}}``; a name is one of :data:`OBJECTS` or a dotted path to a subclass.

    Raises:
        ValueError: not such a value, an unknown class, or an argument the class does not take.
    """
    value = yaml.safe_load(text)
    if isinstance(value, str):
        value = {"class_path": value}
    base, known = OBJECTS[argument]
    if not isinstance(value, dict) or "class_path" not in value or set(value) - {"class_path", "init_args"}:
        raise ValueError(
            f"`--{argument}` takes a class name or {{class_path: NAME, init_args: {{...}}}} in YAML, got {text!r}."
        )
    name, init_args = str(value["class_path"]), value.get("init_args") or {}
    cls = known.get(name) or _import_subclass(name, base)
    if cls is None:
        close = closest_names(name, list(known), count=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"`--{argument}` names the class {name!r}: {hint}It takes {', '.join(known)} or a dotted path."
        )
    parameters = inspect.signature(cls).parameters
    if not isinstance(init_args, dict):
        raise ValueError(f"`--{argument}`: `init_args` of {name} must be a mapping, got {init_args!r}.")
    for key in init_args:
        if key not in parameters:
            close = closest_names(str(key), list(parameters), count=1)
            hint = f"did you mean `{close[0]}`?" if close else f"it takes {', '.join(f'`{p}`' for p in parameters)}."
            raise ValueError(f"`--{argument}`: {name} has no argument `{key}`; {hint}")
    return cls(**init_args)


# --------------------------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """Errors in one line, without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (--help: the options)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--model", metavar="SOURCE:NAME", help="torchvision:NAME or timm:NAME")
    parser.add_argument("--config", metavar="CONFIG", help="a LightningCLI config (LightningCLI arguments may follow)")
    parser.add_argument(
        "--max-epochs", type=int, default=-1, metavar="N", help="the fit's epochs: releases from then on never happen"
    )
    parser.add_argument(
        "--batches-per-epoch", type=int, metavar="N", help="add each group's learning rate at each epoch and release"
    )
    parser.add_argument("--preview", metavar="PNG", help="draw them, step by step (matplotlib: the `plot` extra)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the stand-in's learning rate (--model; default: 1e-3)")
    group = parser.add_argument_group("GradualUnfreeze arguments (--model)")
    meanings = _argument_meanings(GradualUnfreeze.__doc__ or "")
    for name, parameter in _ARGUMENTS.items():
        choices = list(OBJECTS[name][1]) if name in OBJECTS else NORM_MODES if name == "bn" else []
        meaning = meanings.get(name, name) + (f": {', '.join(choices)}" if len(choices) > 1 else "")
        default = "" if parameter.default in (None, inspect.Parameter.empty) else f" (default: {parameter.default})"
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_converter(name),
            default=argparse.SUPPRESS,
            metavar=METAVARS.get(name, "VALUE"),
            help=meaning + default,
        )
    return parser


def _converter(name: str) -> Callable[[str], Any]:
    """The YAML value of the argument ``name`` (an object for those of :data:`OBJECTS`), errors as argparse's."""

    def converted(text: str) -> Any:
        try:
            return release_object(name, text) if name in OBJECTS else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return converted


def _argument_meanings(docstring: str) -> dict[str, str]:
    """Each argument of a Google-style ``Args:`` section, by name: its first clause, without reST markup."""
    section = docstring.partition("Args:\n")[2].split("\n\n")[0]
    meanings: dict[str, str] = {}
    for match in re.finditer(r"^ {8}(\w+): (.*(?:\n {12}.*)*)", section, re.MULTILINE):
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", " ".join(match[2].split())).replace("``", "")
        depth, end = 0, len(text)
        for i, char in enumerate(text):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0 and text[i : i + 2] in (". ", ": ", "; "):
                end = i
                break
        meanings[match[1]] = text[:end].rstrip(".")
    return meanings


def _model_source(argv: Sequence[str]) -> str:
    """The ``SOURCE`` of ``--model SOURCE:NAME`` in ``argv`` (``""`` for a dotted path or no ``--model``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default="")
    model: str = parser.parse_known_args(argv)[0].model
    return model.partition(":")[0] if ":" in model else ""


def _import_subclass(path: str, base: type) -> type | None:
    """The class a dotted path names if it subclasses ``base`` (``lightning_bnfreeze.Blocks``, your own Trigger)."""
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


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


# --------------------------------------------------------------------------------------------- --config


def _config_plan(argv: list[str], parser: argparse.ArgumentParser) -> str:
    if not CLI_AVAILABLE:
        raise SystemExit(NEEDS_CLI)
    options, args = _preview_options(argv)
    if options.preview is not None and options.batches_per_epoch is None:
        parser.error("--preview needs --batches-per-epoch N (training batches per epoch).")
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


def _preview_options(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--batches-per-epoch`` and ``--preview``, and the arguments left for LightningCLI."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--batches-per-epoch", type=int, default=None)
    parser.add_argument("--preview", default=None)
    options, rest = parser.parse_known_args(args)
    return options, rest


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
    except (ValueError, TypeError, ImportError) as error:  # a bad argument, or a missing extra: the message says
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
