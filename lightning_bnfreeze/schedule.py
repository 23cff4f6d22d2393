"""The release plan of a frozen backbone: what is released, in which order, at which learning rate.

Pure PyTorch. :func:`plan_releases` checks a user's schedule against a model and resolves its module
and parameter names and globs; :func:`plan_blocks` lays the backbone's blocks (see
:mod:`lightning_bnfreeze.blocks`) on a regular cadence, output side first, or all at once with
layer-wise learning-rate decay; :func:`format_plan` renders a plan as the table of a dry run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_bnfreeze.blocks import Block
from lightning_bnfreeze.names import as_name_list, is_glob, match_names, unknown_name_message
from lightning_bnfreeze.tables import format_table

__all__ = ["Release", "ReleasePlan", "ReleasedPart", "Schedule", "format_plan", "plan_blocks", "plan_releases"]

Schedule = Mapping[int, str | Sequence[str]]


@dataclass(frozen=True)
class ReleasedPart:
    """A module, parameter or block released as one param group: the names of its parameters."""

    name: str
    params: tuple[str, ...]
    numel: int
    lr_factor: float


@dataclass(frozen=True)
class Release:
    """What is released at time ``at`` (an epoch or an optimizer step); ``depth`` counts the earlier releases."""

    at: int
    depth: int
    parts: tuple[ReleasedPart, ...]


@dataclass(frozen=True)
class ReleasePlan:
    backbone: str
    releases: tuple[Release, ...]
    frozen_params: int
    """Parameters (elements) of the backbone that no release reaches: they stay frozen."""
    unit: str = "epoch"


def plan_releases(root: nn.Module, backbone: str, schedule: Schedule, lr_scale: float, lr_decay: float) -> ReleasePlan:
    """Check ``schedule`` (``{time: names}``) against ``root`` and resolve it, in time order.

    Names are module or parameter names, or globs over both. A glob releases what it matches that
    holds parameters not released earlier; an explicit name must hold such parameters, appear once,
    and neither contain nor lie inside another explicit name. Release ``k`` (in time order) is at
    ``lr_scale * lr_decay**k``.

    Raises:
        ValueError: a negative or non-integer time, a name matching nothing, a name outside the
            backbone, a name listed twice or overlapping another, or a release of nothing.
    """
    modules = dict(root.named_modules())
    params = dict(root.named_parameters())
    names = [*modules, *(name for name in params if name not in modules)]
    prefix = f"{backbone}." if backbone else ""
    released: set[int] = set()  # ids: parameters are tracked by identity, never by value
    explicit: dict[str, int] = {}
    releases: list[Release] = []
    for at in sorted(_check_times(schedule)):
        lr_factor = lr_scale * lr_decay ** len(releases)
        parts: list[ReleasedPart] = []
        for pattern in as_name_list(schedule[at], f"schedule[{at}]"):
            matches = match_names(pattern, names)
            if not matches:
                raise ValueError(unknown_name_message(pattern, names, f"schedule[{at}]"))
            for name in matches:
                if not (name == backbone or name.startswith(prefix)):
                    raise ValueError(
                        f"`schedule[{at}]` holds {name!r}, which is outside the backbone {backbone!r}:"
                        f" only modules and parameters inside it are frozen and released."
                    )
                if not is_glob(pattern):
                    _check_no_overlap(name, at, explicit)
                    explicit[name] = at
                members = modules[name].named_parameters(prefix=name) if name in modules else [(name, params[name])]
                fresh = [(param_name, p) for param_name, p in members if id(p) not in released]
                if not fresh:
                    if is_glob(pattern):
                        continue
                    raise ValueError(f"`schedule[{at}]` holds {name!r}, which has no parameters left to release.")
                released.update(id(p) for _, p in fresh)
                numel = sum(p.numel() for _, p in fresh)
                parts.append(ReleasedPart(name, tuple(param_name for param_name, _ in fresh), numel, lr_factor))
        if not parts:
            raise ValueError(f"`schedule[{at}]` = {schedule[at]!r} matches nothing with parameters to release.")
        releases.append(Release(at, len(releases), tuple(parts)))
    frozen = sum(p.numel() for p in modules[backbone].parameters() if id(p) not in released)
    return ReleasePlan(backbone, tuple(releases), frozen)


def plan_blocks(
    backbone: str,
    blocks: Sequence[Block],
    first: int,
    every: int,
    blocks_per_release: int,
    lr_scale: float,
    lr_decay: float,
    layer_decay: float | None = None,
) -> ReleasePlan:
    """Release ``blocks`` (given input side first) output side first.

    ``blocks_per_release`` blocks at ``first``, ``first + every``, ...; release ``k`` at
    ``lr_scale * lr_decay**k``. With ``layer_decay``, every block is released at ``first`` instead,
    the block at depth ``d`` from the output side at ``lr_scale * layer_decay**d`` (BEiT/MAE/ELECTRA).
    """
    output_first = list(reversed(blocks))
    if layer_decay is not None:
        parts = tuple(_part(block, lr_scale * layer_decay**depth) for depth, block in enumerate(output_first))
        return ReleasePlan(backbone, (Release(first, 0, parts),) if parts else (), 0)
    chunks = [output_first[i : i + blocks_per_release] for i in range(0, len(output_first), blocks_per_release)]
    releases = tuple(
        Release(first + k * every, k, tuple(_part(block, lr_scale * lr_decay**k) for block in chunk))
        for k, chunk in enumerate(chunks)
    )
    return ReleasePlan(backbone, releases, 0)


def _part(block: Block, lr_factor: float) -> ReleasedPart:
    return ReleasedPart(block.name, block.params, block.numel, lr_factor)


def _check_times(schedule: Schedule) -> list[int]:
    if not isinstance(schedule, Mapping):
        raise ValueError(f"`schedule` must map epochs (or steps) to names, got {schedule!r}.")
    for at in schedule:
        if isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise ValueError(f"`schedule` has the key {at!r}: epochs and steps are integers >= 0.")
    return list(schedule)


def _check_no_overlap(name: str, at: int, explicit: dict[str, int]) -> None:
    for other, other_at in explicit.items():
        if name == other:
            raise ValueError(f"`schedule` lists {name!r} twice (at {other_at} and {at}).")
        inner, outer = (name, other) if name.startswith(f"{other}.") else (other, name)
        if inner.startswith(f"{outer}."):
            raise ValueError(
                f"`schedule[{at}]` holds {name!r}, which overlaps {other!r} of `schedule[{other_at}]`:"
                f" {inner!r} lies inside {outer!r}. List each name once, or use a glob."
            )


def format_plan(plan: ReleasePlan, last: int = -1) -> str:
    """The plan as a text table: time, released parts, parameters, learning-rate factor.

    With ``last >= 0`` (``max_epochs`` or ``max_steps``), releases at or past it are marked as never happening.
    """
    rows = [(plan.unit, "released", "parameters", "lr factor")]
    for release in plan.releases:
        at = f"{release.at} (>= max_{plan.unit}s: never)" if 0 <= last <= release.at else str(release.at)
        for i, part in enumerate(release.parts):
            rows.append((at if i == 0 else "", part.name, f"{part.numel:,}", f"{part.lr_factor:.4g}"))
    rows.append(("never", f"(rest of {plan.backbone})", f"{plan.frozen_params:,}", "frozen"))
    return format_table(rows)
