"""LightningCLI configuration errors as one line naming the class, the argument, its value and the fix.

Under a plain ``LightningCLI``, a wrong value (``lr_scale: fast``) prints some 50 lines of usage and
``Does not validate against any of the Union subtypes``, the cause deep inside; a value a callback
rejects (``lr_scale: 0``) or a name that is not in the model (``backbone: backbon``) prints a
traceback of 50 to 80 lines with the message on its last one. :class:`ClearErrorsCLI` is a drop-in
``LightningCLI`` that prints one line instead, and exits with status 2 as argparse does::

    error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a number, got 'fast'.
    error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a positive number, got 0.0.
    error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): no argument `lr_scal` (given 0.5); did you mean
    `lr_scale`?

followed by ``(set JSONARGPARSE_DEBUG=true for the traceback)``. :func:`parse_error` and
:func:`configuration_error` compute those lines, for CLIs that cannot change their base class.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.callbacks.base import overrides_configure_model
from lightning_bnfreeze.names import closest_names

__all__ = ["ClearErrorsCLI", "ClearErrorsParser", "check_against_model", "configuration_error", "parse_error"]

DEBUG_VARIABLE = "JSONARGPARSE_DEBUG"
"""Set to ``true`` for jsonargparse's full message and the traceback instead of the one line."""
DEBUG_HINT = f"(set {DEBUG_VARIABLE}=true for the traceback)"
LIBRARY = __name__.partition(".")[0]

# jsonargparse's parse errors: a tree of `Parser key "k":` and `Problem with given class_path 'c':` lines, alternatives
# (Union subtypes) as `- ` items, around the line that says what is wrong.
_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":')
_CLASS = re.compile(r"Problem with given class_path '(?P<class_path>[\w.]+)':")
_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value( type)?: |tip: |Subclass types"
)
_DEAD_END = re.compile(  # alternatives that were not meant: their lines, and those under them, say nothing
    r"Not a valid subclass of |Expected a <class 'NoneType'>|Import path \S+ does not correspond to a subclass of "
)
_EXPECTED = re.compile(r"Expected a <class '(?P<type>\w+)'>(\. Got value: (?P<value>.*))?")
_GIVEN = re.compile(r"\s*Given value: (?P<value>.*)")
_REQUIRED = re.compile(r"the following arguments are required: (?P<names>.+)")
_NOT_ACCEPTED = re.compile(r"Option '(?P<key>\w+)' is not accepted")
_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


class ClearErrorsParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose errors are one line (see :func:`parse_error`), without the usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        line = parse_error(message) if self.exit_on_error and not _debugging() else None
        if line is not None:
            _exit(line)
        super().error(message, ex)


class ClearErrorsCLI(LightningCLI):
    """A ``LightningCLI`` whose configuration errors are one line naming the class, the argument, its value and the fix.

    - A value of the wrong type, a missing or unknown argument, at any depth of the configuration
      (``trainer.callbacks``, their ``init_args``, objects inside those): the parser's error in one
      line (:func:`parse_error`; :class:`ClearErrorsParser` is the default ``parser_class``).
    - An error this library raises about a configuration, while a class is constructed
      (``lr_scale: 0``), when its callbacks meet the model (``backbone: backbon``, a module name of
      ``Schedule`` or ``modules`` that is not in the model: checked before the Trainer is built,
      unless the model builds layers in ``configure_model``), or during the run (a ``Plateau``
      whose ``monitor`` is never logged): ``<config key> (<class>): <its message>``
      (:func:`configuration_error`). Other errors keep their traceback.

    Each prints ``error: <line>`` and ``(set JSONARGPARSE_DEBUG=true for the traceback)`` on stderr
    and exits with status 2, as argparse does for bad arguments; with ``JSONARGPARSE_DEBUG=true``
    everything is as with ``LightningCLI``. Use it as it is, or subclass it as you would ``LightningCLI``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", ClearErrorsParser)
        try:
            super().__init__(*args, **kwargs)
        except (ValueError, TypeError, RuntimeError) as error:
            line = None if _debugging() else configuration_error(error, *self._configs())
            if line is None:
                raise
            _exit(line)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, once the library's callbacks of the configuration are checked against the model."""
        config = self._configs()[1]
        callbacks = config.get("trainer.callbacks") if isinstance(config, Namespace) else None
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            check_against_model(callback, self.model)
        return super().instantiate_trainer(**kwargs)

    def _configs(self) -> tuple[Namespace | None, Namespace | None]:
        """The parsed configuration and the instantiated one (of the subcommand if any), where they exist yet."""
        subcommand = getattr(self, "subcommand", None)
        configs = [getattr(self, name, None) for name in ("config", "config_init")]
        chosen = [config[subcommand] if subcommand and isinstance(config, Namespace) else config for config in configs]
        return chosen[0], chosen[1]


def check_against_model(callback: object, model: LightningModule) -> None:
    """Raise now the configuration errors one of the library's callbacks would raise at ``setup`` for ``model``.

    Nothing for other callbacks, or a model that builds layers in ``configure_model``.
    """
    if overrides_configure_model(model):
        return
    if isinstance(callback, GradualUnfreeze):
        callback.plan(model)
    elif isinstance(callback, BNFreezeCallback):
        callback.resolve(model)


def parse_error(message: str) -> str | None:
    """jsonargparse's error ``message`` as one line: where (config key and class), the argument, what is wrong.

    ``None`` for an empty message. Examples::

        >>> parse_error('Parser key "trainer.max_epochs":\\n  Expected a <class \\'int\\'>. Got value: ten')
        "`trainer.max_epochs` must be an integer, got 'ten'."
    """
    found = _first_cause(message)
    if found is None:
        return None
    path, leaf, types, value = found
    where: list[str] = []
    argument = None
    for kind, name in path:
        if kind == "class":
            where.append(f"{argument} ({name})" if argument else name)
            argument = None
        else:
            argument = name if argument is None else f"{argument}.{name}"
    if _EXPECTED.fullmatch(leaf) and argument:
        kinds = " or ".join(_TYPES.get(name, f"a {name}") for name in types)
        what = f"`{argument}` must be {kinds}, got {value!r}."
    elif required := _REQUIRED.fullmatch(leaf):
        names = ", ".join(f"`{name.strip()}`" for name in required["names"].split(","))
        what = f"{names} is required (no default): give it."
    elif (unknown := _NOT_ACCEPTED.fullmatch(leaf)) and path and path[-1][0] == "class":
        what = _unknown_argument(unknown["key"], path[-1][1], message)
    else:
        what = f"`{argument}`: {leaf}" if argument else leaf
    return f"{', '.join(where)}: {what}" if where else what


def configuration_error(
    error: BaseException, config: Namespace | None = None, instantiated: Namespace | None = None
) -> str | None:
    """One line for an error this library raised about a LightningCLI configuration, else ``None``.

    The line is ``<config key> (<class path>): <the library's message>``. ``config`` is the parsed
    configuration (of the subcommand, if any) and ``instantiated`` the classes built from it, if they
    were: the key is that of the object of the configuration that raised (a callback, its ``what``,
    ``when``), found among the traceback's frames; without ``instantiated`` (a constructor raised),
    the library's classes of ``config`` are built again, innermost first, to find the one that raises.
    """
    if instantiated is None and config is not None:
        return _construction_error(config)
    if not _raised_by_library(error):
        return None
    objects = {id(obj): (key, class_path) for key, class_path, obj in _configured(config, instantiated)}
    for frame in _frames(error.__traceback__):
        culprit = frame.f_locals.get("self")
        if id(culprit) in objects:
            key, class_path = objects[id(culprit)]
            return f"{key} ({class_path}): {_one_line(error)}"
    return _one_line(error)


# --------------------------------------------------------------------------------------------- parse errors


def _first_cause(message: str) -> tuple[list[tuple[str, str]], str, list[str], str] | None:
    """The path (``("key", k)``, ``("class", c)``) to the first line of ``message`` that says what is wrong, that
    line, the types its sibling ``Expected a <class 'T'>`` lines name (a value matching none of a Union's), and the
    value given there."""
    stack: list[tuple[int, str, str]] = []
    dead_end: int | None = None
    leaf: tuple[list[tuple[str, str]], str, int] | None = None
    types: list[str] = []
    value = ""
    for raw in message.splitlines():
        text = raw.strip().removeprefix("- ")
        indent = len(raw) - len(raw.lstrip())
        if leaf is not None and not value and (given := _GIVEN.fullmatch(raw)) and indent < leaf[2]:
            value = given["value"]  # a Union's alternatives leave the value out
        if not text or (dead_end is not None and indent > dead_end):
            continue
        dead_end = None
        if _DEAD_END.match(text):
            dead_end = indent
            continue
        if _NOISE.match(text):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [(kind, name) for _, kind, name in stack]
        if leaf is not None:
            if (expected := _EXPECTED.fullmatch(text)) and path == leaf[0] and indent == leaf[2]:
                types.append(expected["type"])
        elif key := _KEY.fullmatch(text):
            stack.append((indent, "key", key["key"]))
        elif class_path := _CLASS.fullmatch(text):
            stack.append((indent, "class", class_path["class_path"]))
        else:
            leaf = (path, text, indent)
            expected = _EXPECTED.fullmatch(text)
            types, value = ([expected["type"]], expected["value"] or "") if expected else ([], "")
    return None if leaf is None else (leaf[0], leaf[1], types, value)


def _unknown_argument(key: str, class_path: str, message: str) -> str:
    """``no argument `key` (given value); did you mean `closest`?`` for ``class_path``'s arguments."""
    cls = _import(class_path)
    try:
        parameters = inspect.signature(cls).parameters.values() if callable(cls) else ()
    except (TypeError, ValueError):
        parameters = ()
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    given = re.search(rf"(?:{key}=|'{key}': )'?([^',)}}]*)", message)
    value = f" (given {given[1]})" if given else ""
    close = closest_names(key, names, count=1)
    if close:
        return f"no argument `{key}`{value}; did you mean `{close[0]}`?"
    return f"no argument `{key}`{value}; its arguments are {', '.join(f'`{name}`' for name in names)}."


# --------------------------------------------------------------------------------------------- library errors


def _raised_by_library(error: BaseException) -> bool:
    """Whether this library's code raised ``error`` (its innermost frame), not code it called or that called it."""
    frames = list(_frames(error.__traceback__))
    module = frames[0].f_globals.get("__name__", "") if frames else ""
    return isinstance(module, str) and module.startswith(f"{LIBRARY}.") and module != __name__


def _frames(traceback: TracebackType | None) -> Iterator[FrameType]:
    """The frames of ``traceback``, innermost first."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    return reversed(frames)


def _configured(config: Namespace | None, built: object, key: str = "") -> Iterator[tuple[str, str, object]]:
    """``(key, class_path, object)`` of each ``class_path`` entry of ``config`` and the object built from it: those
    of the instantiated configuration, and inside them the objects kept under their arguments' names."""
    if isinstance(config, Namespace) and isinstance(config.get("class_path"), str):
        yield key, config.class_path, built
        init_args = config.get("init_args")
        for name, value in vars(init_args).items() if isinstance(init_args, Namespace) else ():
            yield from _configured(value, getattr(built, name, None), f"{key}.init_args.{name}")
    elif isinstance(config, Namespace):
        for name, value in vars(config).items():
            child = built.get(name) if isinstance(built, Namespace) else None
            yield from _configured(value, child, f"{key}.{name}" if key else name)
    elif isinstance(config, list):
        for index, value in enumerate(config):
            child = built[index] if isinstance(built, list) and index < len(built) else None
            yield from _configured(value, child, f"{key}[{index}]")


class _Rejected(Exception):
    """A class of the configuration rejected its arguments: where, and the error."""

    def __init__(self, key: str, class_path: str, error: BaseException) -> None:
        super().__init__(f"{key} ({class_path}): {_one_line(error)}")


def _construction_error(config: Namespace) -> str | None:
    """Build the library's classes of ``config`` again, innermost first: the one that raises, and its message."""
    entries = [(key, entry) for key, entry in _class_entries(config) if _library_class(entry.class_path)]
    try:
        for key, entry in entries:
            if not any(key.startswith(f"{outer}.") for outer, _ in entries):  # the outermost: their insides first
                _build(entry, key)
    except _Rejected as rejected:
        return str(rejected)
    return None


def _build(entry: Namespace, key: str) -> object:
    """The object ``entry`` describes, its library-made arguments built first (raising :class:`_Rejected`)."""
    cls = _library_class(entry.class_path)
    init_args = entry.get("init_args")
    kwargs = {
        name: _build(value, f"{key}.init_args.{name}") if _is_library_entry(value) else value
        for name, value in (vars(init_args).items() if isinstance(init_args, Namespace) else ())
    }
    try:
        return cls(**kwargs)  # type: ignore[misc]
    except (ValueError, TypeError) as error:
        if not _raised_by_library(error):
            raise
        raise _Rejected(key, entry.class_path, error) from error


def _class_entries(value: object, key: str = "") -> Iterator[tuple[str, Namespace]]:
    """``(key, entry)`` of every ``class_path`` entry of a parsed configuration (``"trainer.callbacks[0]"``, ...)."""
    if isinstance(value, Namespace):
        if isinstance(value.get("class_path"), str):
            yield key, value
        for name, child in vars(value).items():
            yield from _class_entries(child, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _class_entries(child, f"{key}[{index}]")


def _is_library_entry(value: object) -> bool:
    return isinstance(value, Namespace) and _library_class(str(value.get("class_path"))) is not None


def _library_class(path: str) -> type | None:
    cls = _import(path)
    return cls if isinstance(cls, type) and cls.__module__.startswith(f"{LIBRARY}.") else None


def _import(path: str) -> Any:
    """The object a dotted ``module.name`` path names, or ``None``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):
        return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").lower() in ("true", "1", "yes")


def _exit(line: str) -> NoReturn:
    print(f"error: {line}\n{DEBUG_HINT}", file=sys.stderr)
    raise SystemExit(2)
