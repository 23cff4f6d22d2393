"""Discovery of a backbone's blocks from its structure alone, for any module: the rules, then the search.

The rules are data: the names of a classifier (:data:`CLASSIFIER`), of the child of a stage that holds
its blocks (``_STAGE_LIST``), and of numbered siblings of one family (``_NUMBER``). The *block
list* is the largest family of repeated siblings (same class, or numbered names such as
``layer1``..``layer4``, ``Mixed_5b``; composite modules before single layers; members outnumbering
the other modules between them), found outside modules named like a classifier. With
``granularity="block"``, a member that is a stage is split into its blocks. A classifier left in the
backbone, child of a module around the block list and registered after its first member, is the last block.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from torch import nn

from lightning_bnfreeze.block_groups import ParamIndex, ancestors, join

__all__ = ["CLASSIFIER", "discover"]

CLASSIFIER = re.compile(r"fc|heads?|classifier|last_linear|lm_head|pre_logits|aux\w*", re.IGNORECASE)
"""The names of a classifier: left out of the block list, the last block when left in the backbone."""
_STAGE_LIST = re.compile(r"layers?|blocks")  # the child of a stage that holds its blocks (MaxViT, HF Swin)
_NUMBER = re.compile(r"\d+[a-z]?")  # `layer1`, `Mixed_5b`, `inception3a`: numbered siblings of one family
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def discover(backbone: nn.Module, params: ParamIndex, granularity: str) -> list[list[str]]:
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
        for outer in dict.fromkeys(["", *ancestors(container), container])
        for local, _ in modules[outer].named_children()
        if CLASSIFIER.fullmatch(local)
        and (full := join(outer, local)) in params.under
        and params.under[full][0] > first
    ]
    return [*blocks, head]


def _families(params: ParamIndex, name: str, module: nn.Module) -> Iterator[tuple[tuple[bool, int], str, list[str]]]:
    """``(score, container, members)`` of each family of repeated children in ``module``'s subtree, outer first.

    The score prefers composite modules, then more parameters; members must outnumber the other
    children between them; children named like a classifier are left out.
    """
    children = [
        (local, full, child)
        for local, child in module.named_children()
        if (full := join(name, local)) in params.under and not CLASSIFIER.fullmatch(local)
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


def _has_children(params: ParamIndex, name: str, module: nn.Module) -> bool:
    return any(join(name, local) in params.under for local, _ in module.named_children())


def _stage_blocks(params: ParamIndex, name: str, module: nn.Module) -> list[str] | None:
    """The blocks of a stage: the children of a container, or of its ``layers``/``blocks``, when of one family."""
    lists = [(name, module)] if isinstance(module, _CONTAINERS) else []
    lists += [
        (join(name, local), child)
        for local, child in module.named_children()
        if _STAGE_LIST.fullmatch(local) and isinstance(child, _CONTAINERS)
    ]
    for outer, container in lists:
        blocks = [(local, join(outer, local), child) for local, child in container.named_children()]
        blocks = [(local, full, child) for local, full, child in blocks if full in params.under]
        if (
            blocks
            and len({_kind(local, child) for local, _, child in blocks}) == 1
            and _has_children(params, blocks[0][1], blocks[0][2])
        ):
            return [full for _, full, _ in blocks]
    return None
