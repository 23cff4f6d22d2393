"""A backbone's parameters grouped into blocks: the index they are grouped in, and the groups given by names.

A group is a list of indices into :class:`ParamIndex` (the backbone's parameters, deduplicated, in
registration order). :func:`claim` gives each parameter to the first group that holds it;
:func:`with_leftovers` gives each unclaimed one to the group of the parameter registered before
it, those before any claimed one forming the stem. The groups given by names come from the user's
names and globs (:func:`user_groups`) or from a timm model's ``group_matcher``
(:func:`matcher_groups`); :mod:`lightning_bnfreeze.block_discovery` finds them in any model.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_bnfreeze.names import as_name_list, is_glob, match_names, unknown_name_message

__all__ = ["ParamIndex", "UserBlocks", "ancestors", "claim", "join", "matcher_groups", "user_groups", "with_leftovers"]

_MATCH_PREVIOUS = 99999.0  # timm's MATCH_PREV_GROUP: an ordinal ending with it joins the group before

UserBlocks = Sequence[str | Sequence[str]] | Callable[[nn.Module], Sequence[str | Sequence[str]]]


class ParamIndex:
    """The backbone's parameters (deduplicated, in order) and, per module name, the indices of those under it."""

    def __init__(self, backbone: nn.Module) -> None:
        named = list(backbone.named_parameters())
        self.names = [name for name, _ in named]
        self.numels = [param.numel() for _, param in named]
        self.index = {name: i for i, name in enumerate(self.names)}
        under: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(self.names):
            for ancestor in ("", *ancestors(name)):
                under[ancestor].append(i)
        self.under = dict(under)
        self.numel_under = {name: sum(self.numels[i] for i in indices) for name, indices in under.items()}

    def of(self, name: str) -> list[int]:
        """The parameters under the module ``name``, or the parameter ``name`` itself."""
        return self.under.get(name) or ([self.index[name]] if name in self.index else [])


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def ancestors(name: str) -> list[str]:
    """The dotted prefixes of ``name``, outermost first: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def claim(params: ParamIndex, member_groups: Iterable[Iterable[str]]) -> list[list[int]]:
    """The parameters of each group of member names; a parameter goes to the first group that holds it."""
    claimed = [False] * len(params.names)
    groups: list[list[int]] = []
    for members in member_groups:
        groups.append([])
        for i in (i for member in members for i in params.of(member)):
            if not claimed[i]:
                claimed[i] = True
                groups[-1].append(i)
    return groups


def with_leftovers(params: ParamIndex, groups: list[list[int]]) -> list[list[int]]:
    """Each unclaimed parameter joins the group of the one registered before it; the first ones form the stem."""
    owner = [-1] * len(params.names)
    for g, group in enumerate(groups):
        for i in group:
            owner[i] = g
    stem: list[int] = []
    previous = -1
    for i, g in enumerate(owner):
        if g >= 0:
            previous = g
        else:
            (groups[previous] if previous >= 0 else stem).append(i)
    return [sorted(group) for group in ([stem] if stem else []) + groups]


def user_groups(backbone: nn.Module, params: ParamIndex, prefix: str, blocks: UserBlocks) -> list[list[int]]:
    """The parameters of the user's blocks: a name is one block, a glob one block per match, a list one block."""
    argument = "names(backbone)" if callable(blocks) else "names"
    listed = blocks(backbone) if callable(blocks) else blocks
    if isinstance(listed, str) or not isinstance(listed, Sequence) or not listed:
        raise ValueError(f"`{argument}` = {listed!r}: expected a non-empty list of names or lists of names.")
    local = {join(prefix, name): name for name in [n for n, _ in backbone.named_modules() if n] + params.names}
    entries: list[tuple[int, list[str]]] = []  # (the entry's index, the backbone's member names of one block)
    for i, entry in enumerate(listed):
        patterns = as_name_list(entry, f"{argument}[{i}]")
        matched = []
        for pattern in patterns:
            matches = match_names(pattern, local)
            if not matches:
                raise ValueError(unknown_name_message(pattern, local, argument))
            matched.append(matches)
        if isinstance(entry, str) and is_glob(entry):
            entries += [(i, [local[name]]) for name in matched[0]]
        else:
            entries.append((i, [local[name] for matches in matched for name in matches]))
    groups = claim(params, [members for _, members in entries])
    for i, entry in enumerate(listed):
        if not any(group for (index, _), group in zip(entries, groups, strict=True) if index == i):
            raise ValueError(
                f"`{argument}` holds {entry!r}, which has no parameters that an earlier entry does not hold."
            )
    # a glob's matches without parameters of their own (a pooling layer) are no blocks
    return [group for group in groups if group]


def matcher_groups(names: list[str], matcher: Mapping[str, Any] | Callable[[str], Any]) -> list[list[int]]:
    """timm's ``group_with_matcher``: parameters grouped by the ordinal their name maps to, in ordinal order.

    A dict matcher maps group names (in order) to a regex or a list of ``(regex, suffix)``; the
    ordinal is (group position, the regex's numbered groups, suffix); unmatched names sort last.
    """
    if isinstance(matcher, Mapping):
        rules = [
            (re.compile(regex), float(position), suffix)
            for position, spec in enumerate(matcher.values())
            if spec is not None
            for regex, suffix in (spec if isinstance(spec, list | tuple) else [(spec, None)])
        ]

        def ordinal(name: str) -> tuple[float, ...]:
            for regex, position, suffix in rules:
                if found := regex.match(name):
                    return (position, *map(float, found.groups()), *map(float, suffix or ()))
            return (math.inf,)

    else:

        def ordinal(name: str) -> tuple[float, ...]:
            value = matcher(name)
            return tuple(map(float, value)) if isinstance(value, Iterable) else (float(value),)

    by_ordinal: dict[tuple[float, ...], list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        by_ordinal[ordinal(name)].append(i)
    groups: list[list[int]] = []
    for key in sorted(by_ordinal):
        if groups and key[-1] == _MATCH_PREVIOUS:
            groups[-1] += by_ordinal[key]
        else:
            groups.append(by_ordinal[key])
    return groups
