"""The errors this library raises about a LightningCLI configuration, as one line naming where they come from.

:func:`configuration_error` gives ``<config key> (<class path>): <the library's message>``: the key
of the object of the configuration that raised (a callback, its ``what``, ``when``), found among the
traceback's frames; or, when a constructor raised before anything was instantiated, found by
building the library's classes of the configuration again, innermost first.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import FrameType, TracebackType

from jsonargparse import Namespace

from lightning_bnfreeze.cli_parse_errors import import_object

__all__ = ["configuration_error"]

LIBRARY = __name__.partition(".")[0]
_CLI_MODULES = (f"{LIBRARY}.cli", f"{LIBRARY}.cli_parse_errors", __name__)
"""The CLI's own modules: an error raised in their frames (a class called with arguments it does not take) is not
the library's word on a configuration."""


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


def _raised_by_library(error: BaseException) -> bool:
    """Whether this library's code raised ``error`` (its innermost frame), not code it called or that called it."""
    frames = list(_frames(error.__traceback__))
    module = frames[0].f_globals.get("__name__", "") if frames else ""
    return isinstance(module, str) and module.startswith(f"{LIBRARY}.") and module not in _CLI_MODULES


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
    for key, entry in entries:
        if any(key.startswith(f"{outer}.") for outer, _ in entries):
            continue  # built inside the outermost, their insides first
        try:
            _build(entry, key)
        except _Rejected as rejected:
            return str(rejected)
        except Exception:  # not the library's word: a user's class that cannot be built
            continue
    return None


def _build(entry: Namespace, key: str) -> object:
    """The object ``entry`` describes, the objects of its arguments built first (any class: a user's ``Trigger`` in
    ``when``); raises :class:`_Rejected` where a library class rejects its arguments, else what was raised."""
    cls = import_object(entry.class_path)
    init_args = entry.get("init_args")
    kwargs = {
        name: _build(value, f"{key}.init_args.{name}") if _is_entry(value) else value
        for name, value in (vars(init_args).items() if isinstance(init_args, Namespace) else ())
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        if _library_class(entry.class_path) is None or not _raised_by_library(error):
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


def _is_entry(value: object) -> bool:
    return isinstance(value, Namespace) and isinstance(value.get("class_path"), str)


def _library_class(path: str) -> type | None:
    cls = import_object(path)
    return cls if isinstance(cls, type) and cls.__module__.startswith(f"{LIBRARY}.") else None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
