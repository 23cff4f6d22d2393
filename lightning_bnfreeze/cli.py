"""LightningCLI configuration errors as one clear line, with the closest names for an unknown argument.

When a class of a LightningCLI configuration rejects its arguments (``lr_scale: 0``), jsonargparse
wraps the constructor's message in some 80 lines of traceback ending in ``Does not validate against
any of the Union subtypes``; an unknown ``init_args`` key (``lr_scal``) is reported after 50 lines of
usage, without the name that was meant. :class:`ClearErrorsCLI` is a drop-in ``LightningCLI`` whose
first line of error output says what went wrong::

    error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a positive number, got 0.0.
    error: trainer.callbacks: lightning_bnfreeze.GradualUnfreeze has no argument `lr_scal` (given 0.5); did you mean
    `lr_scale`?

The functions :func:`construction_error` and :func:`unknown_argument_hint` compute those lines, for
CLIs that cannot change their base class.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_bnfreeze.names import closest_names

__all__ = ["ClearErrorsCLI", "HintingArgumentParser", "construction_error", "unknown_argument_hint"]

DEBUG_VARIABLE = "JSONARGPARSE_DEBUG"
"""Set to ``true`` for the full traceback instead of the one-line error (jsonargparse's debug mode too)."""

_UNKNOWN_OPTION = re.compile(
    r"Problem with given class_path '(?P<class_path>[\w.]+)':\s*Option '(?P<key>\w+)' is not accepted"
)
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')


class HintingArgumentParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose error for an unknown ``init_args`` key starts with the closest names."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = unknown_argument_hint(message)
        if hint is not None and hint not in message:  # a subcommand's error may reach here twice
            if self.exit_on_error:
                print(f"error: {hint}", file=sys.stderr)  # first, before jsonargparse's usage
            message = f"{hint}\n{message}"
        super().error(message, ex)


class ClearErrorsCLI(LightningCLI):
    """A ``LightningCLI`` whose configuration errors start with one line naming the class, argument and value.

    - A class of the configuration that rejects its arguments while being constructed (a
      ``ValueError`` or ``TypeError``: ``lr_scale: 0``, ``train_affine: true`` without ``modules``)
      prints ``error: <config key> (<class>): <its message>`` and exits with status 2, as argparse
      does for bad arguments, instead of the traceback. Set ``JSONARGPARSE_DEBUG=true`` for the traceback.
    - An unknown ``init_args`` key is reported with the closest argument names of the class, on the
      first line (see :class:`HintingArgumentParser`, the default ``parser_class``).

    Everything else is ``LightningCLI``'s: use it as it is, or subclass it as you would ``LightningCLI``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", HintingArgumentParser)
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            config = self.config[self.subcommand] if self.subcommand else self.config
            message = construction_error(error, config)
            if message is None or os.environ.get(DEBUG_VARIABLE, "").lower() == "true":
                raise
            print(f"error: {message}\n(set {DEBUG_VARIABLE}=true for the traceback)", file=sys.stderr)
            raise SystemExit(2) from None


def construction_error(error: BaseException, config: argparse.Namespace | None = None) -> str | None:
    """One line for an error raised by a class's constructor during a LightningCLI instantiation, else ``None``.

    The line is ``<config key> (<class path>): <the constructor's message>``, the key being the
    entry of ``config`` (the parsed configuration, of the subcommand if any) whose ``class_path``
    imports the class and whose plain ``init_args`` are the constructor's arguments, when exactly
    one entry is; else the class alone names the culprit.
    """
    root = error
    while root.__cause__ is not None:  # jsonargparse raises its own errors `from` the constructor's
        root = root.__cause__
    arguments = _constructor_locals(root.__traceback__)
    if arguments is None:
        return None
    cls = type(arguments["self"])
    entries = [
        (key, entry.class_path)
        for key, entry in _class_entries(config)
        if _import(entry.class_path) is cls and _given_to(entry, arguments)
    ]
    where = f"{entries[0][0]} ({entries[0][1]})" if len(entries) == 1 else f"{cls.__module__}.{cls.__qualname__}"
    return f"{where}: {root}"


def unknown_argument_hint(message: str) -> str | None:
    """For jsonargparse's error about an unknown ``init_args`` key, one line with the closest argument names.

    ``None`` for any other message.
    """
    match = _UNKNOWN_OPTION.search(message)
    cls = _import(match["class_path"]) if match else None
    if match is None or not callable(cls):
        return None
    key, class_path = match["key"], match["class_path"]
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    close = closest_names(key, names, count=1)
    given = re.search(rf"(?:key='{key}', val=|'{key}': )'?([^',)}}]*)", message)
    value = f" (given {given[1]})" if given else ""
    parser_key = _PARSER_KEY.search(message)
    where = f"{parser_key['key']}: " if parser_key else ""
    if close:
        suggestion = f"did you mean `{close[0]}`?"
    else:
        suggestion = "its arguments are " + ", ".join(f"`{name}`" for name in names) + "."
    return f"{where}{class_path} has no argument `{key}`{value}; {suggestion}"


def _constructor_locals(traceback: TracebackType | None) -> dict[str, Any] | None:
    """The local variables of the constructor that raised: the outermost ``__init__`` frame of ``traceback``
    outside jsonargparse and the CLI classes (``None`` if that frame is not an ``__init__``)."""
    while traceback is not None:
        frame = traceback.tb_frame
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("jsonargparse") and module not in (__name__, "lightning.pytorch.cli"):
            found = frame.f_code.co_name == "__init__" and "self" in frame.f_locals
            return dict(frame.f_locals) if found else None
        traceback = traceback.tb_next
    return None


def _class_entries(value: object, key: str = "") -> Iterator[tuple[str, argparse.Namespace]]:
    """``(key, entry)`` of every ``class_path`` entry of a parsed configuration (``"trainer.callbacks[0]"``, ...)."""
    if isinstance(value, argparse.Namespace):
        entries = vars(value)
        if isinstance(entries.get("class_path"), str):
            yield key, value
        for name, child in entries.items():
            yield from _class_entries(child, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _class_entries(child, f"{key}[{index}]")


def _given_to(entry: argparse.Namespace, arguments: dict[str, Any]) -> bool:
    """Whether the plain values (numbers, strings, ...) among ``entry``'s ``init_args`` are ``arguments``'s."""
    init_args = getattr(entry, "init_args", None)
    given = vars(init_args) if isinstance(init_args, argparse.Namespace) else {}
    plain = (bool, int, float, str, type(None))
    return all(arguments.get(name) == value for name, value in given.items() if isinstance(value, plain))


def _import(path: str) -> Any:
    """The object a dotted ``module.name`` path names, or ``None``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
