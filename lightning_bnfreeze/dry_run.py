"""What the callbacks would do, without training: GradualUnfreeze's release plan, BNFreezeCallback's frozen layers.

Two ways in::

    python -m lightning_bnfreeze.dry_run --model timm:convnext_tiny --lr-scale 0.5      # a torchvision or timm model
    python -m lightning_bnfreeze.dry_run --config config.yaml                          # a LightningCLI config

``--batches-per-epoch N`` adds the learning rate of every param group at each epoch start and
release; ``--preview lr.png`` also draws them, step by step. ``--help`` describes it all.
:func:`main` returns the text it prints. This module reads the command line; the plans and previews are
built in :mod:`lightning_bnfreeze.dry_run_plans`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import yaml  # type: ignore[import-untyped]
from lightning_utilities.core.imports import RequirementCache

from lightning_bnfreeze.adapt import AdaBN
from lightning_bnfreeze.callbacks import GradualUnfreeze
from lightning_bnfreeze.dry_run_plans import build_model, config_plan, model_plan
from lightning_bnfreeze.names import closest_names
from lightning_bnfreeze.plan import Blocks, LayerDecay, Schedule, What
from lightning_bnfreeze.release import NORM_MODES
from lightning_bnfreeze.triggers import Every, Plateau, Trigger

__all__ = ["build_model", "main", "model_plan", "release_object"]

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
AdamW at --lr, no LR scheduler), and takes GradualUnfreeze's arguments as options. A timm model comes
without its classifier (num_classes=0), a torchvision model with it (its first release frees it).
--config CONFIG builds the model and the trainer's callbacks of a LightningCLI config (with neither
callback in it: what BNFreezeCallback() would freeze); `--config CONFIG --help` lists LightningCLI's
arguments, which may follow it. A config written for LightningCLI(MyModel, MyDataModule) names no
classes: name them first, --model my_project.MyModel --data my_project.MyDataModule --config CONFIG."""
EPILOG = f"""\
Values are YAML, as in a config; an object is a class name or {{class_path: NAME, init_args: {{...}}}}.
Examples:
  {PROG} --model torchvision:resnet18 --what '{{class_path: Schedule, init_args:
      {{releases: {{1: backbone.layer4, 2: backbone.layer3}}, decay: 0.5}}}}' --lr-scale 0.1 --max-epochs 3
  {PROG} --model timm:convnext_tiny --what '{{class_path: Blocks, init_args: {{per_release: 1}}}}'
  {PROG} --model timm:vit_tiny_patch16_224 --when '{{class_path: Every, init_args: {{steps: 50}}}}' \\
      --warmup-steps 20 --batches-per-epoch 100 --preview lr.png
  {PROG} --config examples/configs/gradual_unfreeze.yaml --batches-per-epoch 5"""


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


def release_object(argument: str, text: str) -> object:
    """The object a command-line value of ``what``, ``when`` or ``adapt`` describes, in YAML: a class name, or
    ``{class_path: NAME, init_args: {...}}``; a name is one of :data:`OBJECTS` or a dotted path to a subclass.

    Raises:
        ValueError: not such a value, an unknown class, or an argument the class does not take.
    """
    value = yaml.safe_load(text)
    if argument == "adapt" and value in ("auto", None):
        return value
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
    """Errors in one line, without the usage; an option spelled with underscores gets its spelling with dashes."""

    def error(self, message: str) -> NoReturn:
        known = {*MODEL_ONLY, "--batches-per-epoch", "--preview"}
        given = message.partition("unrecognized arguments: ")[2].split()
        dashed = [option.replace("_", "-") for option in given if option.startswith("--")]
        hint = [option for option in dashed if option.partition("=")[0] in known and option not in given]
        message += f"; did you mean {', '.join(hint)}?" if hint else ""
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


# --------------------------------------------------------------------------------------------- --config


def _config_plan(argv: list[str], parser: argparse.ArgumentParser) -> str:
    if not CLI_AVAILABLE:
        raise SystemExit(NEEDS_CLI)
    options, args = _preview_options(argv)
    if options.preview is not None and options.batches_per_epoch is None:
        parser.error("--preview needs --batches-per-epoch N (training batches per epoch).")
    return config_plan(args, options, PROG)


def _preview_options(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--batches-per-epoch`` and ``--preview``, and the arguments left for LightningCLI."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--batches-per-epoch", type=int, default=None)
    parser.add_argument("--preview", default=None)
    options, rest = parser.parse_known_args(args)
    return options, rest


if __name__ == "__main__":
    try:
        print(main())
    except (ValueError, TypeError, ImportError) as error:  # a bad argument, or a missing extra: the message says
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
