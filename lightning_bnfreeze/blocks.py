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

The sources and the leftover rule live in :mod:`lightning_bnfreeze.block_groups` (names, timm's
``group_matcher``) and :mod:`lightning_bnfreeze.block_discovery` (discovery); this module makes the
:class:`Block` objects and checks them against a forward pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from lightning_bnfreeze.block_discovery import discover
from lightning_bnfreeze.block_groups import (
    ParamIndex,
    UserBlocks,
    ancestors,
    claim,
    join,
    matcher_groups,
    user_groups,
    with_leftovers,
)
from lightning_bnfreeze.tables import format_table

__all__ = ["GRANULARITIES", "Block", "UserBlocks", "check_block_order", "find_blocks", "format_blocks", "forward_order"]

GRANULARITIES = ("block", "stage")


@dataclass(frozen=True)
class Block:
    """A unit of release: its name, the modules and parameters it is made of, its parameters (all prefixed)."""

    name: str
    members: tuple[str, ...]
    params: tuple[str, ...]
    numel: int


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
    params = ParamIndex(backbone)
    matcher = getattr(backbone, "group_matcher", None)
    if blocks is not None:
        groups = user_groups(backbone, params, prefix, blocks)
    elif callable(matcher):
        groups = matcher_groups(params.names, matcher(coarse=granularity == "stage"))
    else:
        groups = [group for group in claim(params, discover(backbone, params, granularity)) if group]
    return [_block(params, prefix, group, first=i == 0) for i, group in enumerate(with_leftovers(params, groups))]


def _block(params: ParamIndex, prefix: str, group: list[int], first: bool) -> Block:
    """The block of the parameters ``group``; its members are the outermost modules it holds whole."""
    held = Counter(ancestor for i in group for ancestor in ancestors(params.names[i]))
    members: dict[str, None] = {}
    for i in group:
        name = params.names[i]
        whole = (ancestor for ancestor in ancestors(name) if held[ancestor] == len(params.under[ancestor]))
        members[next(whole, name)] = None
    local = list(members)
    if len(local) == 1:
        label = local[0]
    elif first:
        label = "stem"
    else:
        label = "+".join(local[:3]) + (f"+{len(local) - 3} more" if len(local) > 3 else "")
    return Block(
        join(prefix, label),
        tuple(join(prefix, member) for member in local),
        tuple(join(prefix, params.names[i]) for i in group),
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

    One pass in eval mode under ``torch.no_grad()`` (no statistics change), eagerly also where the model is
    compiled (no graph is compiled for it); the hooks are removed and every module's mode restored
    afterwards, also when the forward fails.
    """
    order: dict[str, None] = {}
    modes = [(child, child.training) for child in module.modules()]

    def record(name: str) -> Callable[[nn.Module, Any], None]:
        return lambda _module, _args: order.setdefault(name)

    handles = [child.register_forward_pre_hook(record(name)) for name, child in module.named_modules() if name]
    try:
        module.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
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
        owner = next((block_of[a] for a in (name, *reversed(ancestors(name))) if a in block_of), None)
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
