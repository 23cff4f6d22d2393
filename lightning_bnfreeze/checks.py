"""Argument checks shared by the callbacks and the core: each error names the argument and its value."""

from __future__ import annotations

from collections.abc import Collection
from math import isfinite

__all__ = ["check_bool", "check_choice", "check_integer", "check_positive"]


def check_integer(argument: str, value: object, least: int) -> None:
    """Raise unless ``value`` is an integer (not a bool) ``>= least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"`{argument}` must be an integer >= {least}, got {value!r}.")


def check_positive(argument: str, value: object) -> None:
    """Raise unless ``value`` is a finite number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not isfinite(value) or value <= 0:
        raise ValueError(f"`{argument}` must be a positive number, got {value!r}.")


def check_choice(argument: str, value: object, choices: Collection[object]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{argument}` must be one of {tuple(choices)}, got {value!r}.")


def check_bool(argument: str, value: object, none: bool = False) -> None:
    """Raise unless ``value`` is ``True`` or ``False`` (or, with ``none``, ``None``)."""
    if not isinstance(value, bool) and not (none and value is None):
        allowed = "True, False or None" if none else "True or False"
        raise ValueError(f"`{argument}` must be {allowed}, got {value!r}.")
