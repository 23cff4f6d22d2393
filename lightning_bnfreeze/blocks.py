"""The blocks of a backbone: the units ``GradualUnfreeze`` releases, input side first.

Every parameter of the backbone lies in exactly one block (a parameter shared by several modules
counts once, under the first name ``named_parameters()`` gives it). The blocks come from, in order:

1. ``names``: the user's blocks (modules or parameters, relative to the LightningModule): a name
   is one block, a glob one block per module or parameter it matches, a list of names and globs one
   block; or a callable that gets the backbone and returns such a list. A parameter two entries
   hold belongs to the first.
2. The model's own ``group_matcher(coarse)`` (timm models): timm's grouping exactly, ``coarse`` for
   ``granularity="stage"``; its last group (what no rule matches: the classifier) is the last block.
3. Discovery, for any module. The *block list* is the largest family of repeated siblings (same
   class, or numbered names such as ``layer1``..``layer4``, ``Mixed_5b``; composite modules before
   single layers; members outnumbering the other modules between them), found outside modules named
   like a classifier. With ``granularity="block"``, a member that is a stage (a container of one
   family of blocks, or a module whose ``layers``/``blocks`` is one) is split into its blocks. A
   classifier left in the backbone (``fc``, ``head(s)``, ``classifier``, ``lm_head``, aux heads...),
   child of a module around the block list and registered after its first member, is the last block.

What no source claims follows one rule: a parameter joins the block of the parameter registered
just before it; those registered before any claimed one form the *stem*, placed first. As
``named_parameters()`` yields a module's own parameters before its children's, the stem holds the
first conv, the embeddings, and the tokens and position embeddings held by the modules around the
block list (torchvision ViT ``class_token`` and ``encoder.pos_embedding``); a transition or
downsample between blocks joins the block before it; the tail (a final norm, a pooler, a last 1x1
conv) joins the last block.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from lightning_bnfreeze.names import as_name_list, is_glob, match_names, unknown_name_message
from lightning_bnfreeze.tables import format_table

__all__ = ["GRANULARITIES", "Block", "check_block_order", "find_blocks", "format_blocks", "forward_order"]

GRANULARITIES = ("block", "stage")
_CLASSIFIER = re.compile(r"fc|heads?|classifier|last_linear|lm_head|pre_logits|aux\w*", re.IGNORECASE)
_STAGE_LIST = re.compile(r"layers?|blocks")  # the child of a stage that holds its blocks (MaxViT, HF Swin)
_NUMBER = re.compile(r"\d+[a-z]?")  # `layer1`, `Mixed_5b`, `inception3a`: numbered siblings of one family
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_MATCH_PREVIOUS = 99999.0  # timm's MATCH_PREV_GROUP: an ordinal ending with it joins the group before

UserBlocks = Sequence[str | Sequence[str]] | Callable[[nn.Module], Sequence[str | Sequence[str]]]


@dataclass(frozen=True)
class Block:
    """A unit of release: its name, the modules and parameters it is made of, its parameters (all prefixed)."""

    name: str
    members: tuple[str, ...]
    params: tuple[str, ...]
    numel: int


class _Params:
    """The backbone's parameters (deduplicated, in order) and, per module name, the indices of those under it."""

    def __init__(self, backbone: nn.Module) -> None:
        named = list(backbone.named_parameters())
        self.names = [name for name, _ in named]
        self.numels = [param.numel() for _, param in named]
        self.index = {name: i for i, name in enumerate(self.names)}
        under: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(self.names):
            for ancestor in ("", *_ancestors(name)):
                under[ancestor].append(i)
        self.under = dict(under)
        self.numel_under = {name: sum(self.numels[i] for i in indices) for name, indices in under.items()}

    def of(self, name: str) -> list[int]:
        """The parameters under the module ``name``, or the parameter ``name`` itself."""
        return self.under.get(name) or ([self.index[name]] if name in self.index else [])


def find_blocks(
    backbone: nn.Module, prefix: str = "", granularity: str = "block", blocks: UserBlocks | None = None
) -> list[Block]:
    """The blocks of ``backbone``, input side first; ``prefix`` is its name in the LightningModule.

    Raises:
        ValueError: an unknown ``granularity``; in ``blocks``, a name matching nothing (with the
            closest names) or an entry holding no parameter that an earlier one does not hold.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
    params = _Params(backbone)
    matcher = getattr(backbone, "group_matcher", None)
    if blocks is not None:
        groups = _user_groups(backbone, params, prefix, blocks)
    elif callable(matcher):
        groups = _matcher_groups(params.names, matcher(coarse=granularity == "stage"))
    else:
        groups = [group for group in _claim(params, _discover(backbone, params, granularity)) if group]
    return [_block(params, prefix, group, first=i == 0) for i, group in enumerate(_with_leftovers(params, groups))]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _ancestors(name: str) -> list[str]:
    """The dotted prefixes of ``name``, outermost first: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def _claim(params: _Params, member_groups: Iterable[Iterable[str]]) -> list[list[int]]:
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


def _with_leftovers(params: _Params, groups: list[list[int]]) -> list[list[int]]:
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


def _user_groups(backbone: nn.Module, params: _Params, prefix: str, blocks: UserBlocks) -> list[list[int]]:
    """The parameters of the user's blocks: a name is one block, a glob one block per match, a list one block."""
    argument = "names(backbone)" if callable(blocks) else "names"
    listed = blocks(backbone) if callable(blocks) else blocks
    if isinstance(listed, str) or not isinstance(listed, Sequence) or not listed:
        raise ValueError(f"`{argument}` = {listed!r}: expected a non-empty list of names or lists of names.")
    local = {_join(prefix, name): name for name in [n for n, _ in backbone.named_modules() if n] + params.names}
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
    groups = _claim(params, [members for _, members in entries])
    for i, entry in enumerate(listed):
        if not any(group for (index, _), group in zip(entries, groups, strict=True) if index == i):
            raise ValueError(
                f"`{argument}` holds {entry!r}, which has no parameters that an earlier entry does not hold."
            )
    # a glob's matches without parameters of their own (a pooling layer) are no blocks
    return [group for group in groups if group]


def _matcher_groups(names: list[str], matcher: Mapping[str, Any] | Callable[[str], Any]) -> list[list[int]]:
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


def _discover(backbone: nn.Module, params: _Params, granularity: str) -> list[list[str]]:
    """Member names of the blocks found in ``backbone``: those of its block list, then the classifier."""
    families = list(_families(params, "", backbone))
    if not families:  # nothing repeated: each child holding parameters is a block
        return [[name] for name, _ in backbone.named_children() if name in params.under]
    _, container, members = max(families, key=lambda family: family[0])
    modules = dict(backbone.named_modules())
    split = granularity == "block"
    blocks = [
        [block]
        for member in members
        for block in (split and _stage_blocks(params, member, modules[member])) or [member]
    ]
    first = params.under[members[0]][0]
    head = [
        full
        for outer in dict.fromkeys(["", *_ancestors(container), container])
        for local, _ in modules[outer].named_children()
        if _CLASSIFIER.fullmatch(local)
        and (full := _join(outer, local)) in params.under
        and params.under[full][0] > first
    ]
    return [*blocks, head]


def _families(params: _Params, name: str, module: nn.Module) -> Iterator[tuple[tuple[bool, int], str, list[str]]]:
    """``(score, container, members)`` of each family of repeated children in ``module``'s subtree, outer first.

    The score prefers composite modules, then more parameters; members must outnumber the other
    children between them; children named like a classifier are left out.
    """
    children = [
        (local, full, child)
        for local, child in module.named_children()
        if (full := _join(name, local)) in params.under and not _CLASSIFIER.fullmatch(local)
    ]
    by_key: dict[tuple[type[nn.Module] | str, bool], list[int]] = defaultdict(list)
    for position, (local, full, child) in enumerate(children):
        by_key[_kind(local, child), _stage_blocks(params, full, child) is not None].append(position)
    for positions in by_key.values():
        if len(positions) >= 2 and 2 * len(positions) > positions[-1] - positions[0] + 1:
            members = [children[p][1] for p in positions]
            composite = any(_has_children(params, children[p][1], children[p][2]) for p in positions)
            yield (composite, sum(params.numel_under[member] for member in members)), name, members
    for _, full, child in children:
        yield from _families(params, full, child)


def _kind(local: str, module: nn.Module) -> type[nn.Module] | str:
    """What siblings of one family share: the pattern of numbered names (``layer1``, ``Mixed_5b``), else the class."""
    return type(module) if local.isdigit() else _NUMBER.sub("#", local)


def _has_children(params: _Params, name: str, module: nn.Module) -> bool:
    return any(_join(name, local) in params.under for local, _ in module.named_children())


def _stage_blocks(params: _Params, name: str, module: nn.Module) -> list[str] | None:
    """The blocks of a stage: the children of a container, or of its ``layers``/``blocks``, when of one family."""
    lists = [(name, module)] if isinstance(module, _CONTAINERS) else []
    lists += [
        (_join(name, local), child)
        for local, child in module.named_children()
        if _STAGE_LIST.fullmatch(local) and isinstance(child, _CONTAINERS)
    ]
    for outer, container in lists:
        blocks = [(local, _join(outer, local), child) for local, child in container.named_children()]
        blocks = [(local, full, child) for local, full, child in blocks if full in params.under]
        if (
            blocks
            and len({_kind(local, child) for local, _, child in blocks}) == 1
            and _has_children(params, blocks[0][1], blocks[0][2])
        ):
            return [full for _, full, _ in blocks]
    return None


def _block(params: _Params, prefix: str, group: list[int], first: bool) -> Block:
    """The block of the parameters ``group``; its members are the outermost modules it holds whole."""
    held = Counter(ancestor for i in group for ancestor in _ancestors(params.names[i]))
    members: dict[str, None] = {}
    for i in group:
        name = params.names[i]
        whole = (ancestor for ancestor in _ancestors(name) if held[ancestor] == len(params.under[ancestor]))
        members[next(whole, name)] = None
    local = list(members)
    if len(local) == 1:
        label = local[0]
    elif first:
        label = "stem"
    else:
        label = "+".join(local[:3]) + (f"+{len(local) - 3} more" if len(local) > 3 else "")
    return Block(
        _join(prefix, label),
        tuple(_join(prefix, member) for member in local),
        tuple(_join(prefix, params.names[i]) for i in group),
        sum(params.numels[i] for i in group),
    )


def format_blocks(blocks: Sequence[Block]) -> str:
    """The blocks as a text table: index, name, members, parameters."""
    rows = [("block", "name", "members", "parameters")]
    for i, block in enumerate(blocks):
        members = ", ".join(block.members[:4]) + (f", ... ({len(block.members)})" if len(block.members) > 4 else "")
        rows.append((str(i), block.name, members, f"{block.numel:,}"))
    return format_table(rows)


def forward_order(module: nn.Module, *example_inputs: Any) -> list[str]:
    """The names of ``module``'s submodules in the order their forward first runs.

    One pass in eval mode under ``torch.no_grad()`` (no statistics change); the hooks are removed
    and every module's mode restored afterwards, also when the forward fails.
    """
    order: dict[str, None] = {}
    modes = [(child, child.training) for child in module.modules()]

    def record(name: str) -> Callable[[nn.Module, Any], None]:
        return lambda _module, _args: order.setdefault(name)

    handles = [child.register_forward_pre_hook(record(name)) for name, child in module.named_modules() if name]
    try:
        module.eval()
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for child, training in modes:
            child.training = training
    return list(order)


def check_block_order(blocks: Sequence[Block], order: Sequence[str]) -> str | None:
    """A message when ``blocks`` (input side first) disagree with the forward ``order`` of the modules, else None.

    A block runs where its first module runs; blocks none of whose modules run are left out.
    """
    block_of = {member: i for i, block in enumerate(blocks) for member in block.members}
    first_run: dict[int, int] = {}
    for position, name in enumerate(order):
        owner = next((block_of[a] for a in (name, *reversed(_ancestors(name))) if a in block_of), None)
        if owner is not None:
            first_run.setdefault(owner, position)
    for earlier, later in pairwise(sorted(first_run)):
        if first_run[later] < first_run[earlier]:
            return (
                f"The blocks are not in forward order: block {later} {blocks[later].name!r} runs before block"
                f" {earlier} {blocks[earlier].name!r} in a forward pass of the example input. Blocks follow the"
                " registration order of the modules: name them input side first with `blocks=`."
            )
    return None
