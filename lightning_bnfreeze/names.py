"""Resolve dotted module names and shell-style globs against a model.

Names are those of ``root.named_modules()`` (``"backbone.layer4"``). In a glob, ``*``, ``?`` and
``[...]`` match within one dotted part, so ``"backbone.layer*"`` matches ``backbone.layer1`` but not
``backbone.layer1.0``; ``"backbone.*"`` matches the direct children of ``backbone``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = [
    "as_name_list",
    "closest_names",
    "get_module",
    "is_glob",
    "match_names",
    "resolve_names",
    "unknown_name_message",
]

_GLOB_CHARS = frozenset("*?[")
_BUILT_IN_SETUP = (  # no name close to the one missing: the module may not exist yet when callbacks set up
    " (Built in the LightningModule's `setup`? Callbacks set up before it: build it in `__init__` or"
    " `configure_model`.)"
)


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` holds a glob character."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def as_name_list(value: str | Sequence[str], argument: str) -> list[str]:
    """``value`` as a list of non-empty names; a single string is one name."""
    if not isinstance(value, str | Sequence):
        raise ValueError(f"`{argument}` is {value!r}: expected a name, a glob or a list of them.")
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"`{argument}` holds {name!r}: expected a non-empty name or glob.")
    return names


def match_names(pattern: str, names: Iterable[str]) -> list[str]:
    """The names ``pattern`` matches, in the given order (a plain name matches only itself)."""
    if not is_glob(pattern):
        return [name for name in names if name == pattern]
    parts = pattern.split(".")
    return [
        name
        for name in names
        if name  # the root has no name: `*` matches its children, as `backbone.*` does those of `backbone`
        and len(name.split(".")) == len(parts)
        and all(fnmatchcase(part, glob) for part, glob in zip(name.split("."), parts, strict=True))
    ]


def closest_names(pattern: str, names: Iterable[str], count: int = 3) -> list[str]:
    """Up to ``count`` names that look most like ``pattern``."""
    return difflib.get_close_matches(pattern, [name for name in names if name], n=count, cutoff=0.5)


def resolve_names(root: nn.Module, patterns: Sequence[str], argument: str) -> dict[str, list[str]]:
    """Map each pattern to the module names of ``root`` it matches.

    Raises:
        ValueError: a pattern matches no module; the message names ``argument``, the pattern and
            the closest existing names.
    """
    names = [name for name, _ in root.named_modules()]
    resolved = {}
    for pattern in patterns:
        matches = match_names(pattern, names)
        if not matches:
            raise ValueError(unknown_name_message(pattern, names, argument))
        resolved[pattern] = matches
    return resolved


def unknown_name_message(pattern: str, names: Iterable[str], argument: str) -> str:
    """The error message for a name or glob that matches no module (or parameter)."""
    kind = "glob" if is_glob(pattern) else "name"
    close = closest_names(pattern, names)
    hint = f" Closest existing names: {', '.join(repr(n) for n in close)}." if close else ""
    return (
        f"`{argument}` holds the {kind} {pattern!r}, which matches nothing in the LightningModule."
        f"{hint} Names are relative to the LightningModule, as `named_modules()` and `named_parameters()` yield them."
    )


def get_module(root: nn.Module, name: str, argument: str) -> nn.Module:
    """``root.get_submodule(name)``, or an error naming ``argument``, the closest names and ``root``'s children.

    Raises:
        ValueError: ``root`` has no module ``name``.
    """
    try:
        return root.get_submodule(name)
    except AttributeError:
        children = [child_name for child_name, child in root.named_children() if any(True for _ in child.parameters())]
        close = closest_names(name, [module_name for module_name, _ in root.named_modules()])
        hint = f" Closest names: {', '.join(map(repr, close))}." if close else ""
        later = "" if close else _BUILT_IN_SETUP
        raise ValueError(
            f"`{argument}` is {name!r}, which is no module of the LightningModule.{hint}"
            f" Its top-level modules with parameters: {', '.join(map(repr, children)) or '(none)'}.{later}"
        ) from None
