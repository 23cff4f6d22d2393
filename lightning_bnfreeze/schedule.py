"""The release schedule of a frozen backbone: which modules are released at which epoch.

Pure PyTorch: :func:`plan_releases` checks a schedule against a model and resolves its names and
globs; :func:`format_plan` renders it as the table of a dry run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_bnfreeze.names import as_name_list, is_glob, match_names, unknown_name_message

__all__ = ["Release", "ReleasePlan", "ReleasedModule", "Schedule", "default_schedule", "format_plan", "plan_releases"]

Schedule = Mapping[int, str | Sequence[str]]


@dataclass(frozen=True)
class ReleasedModule:
    """One released module: its name and the names of the parameters it releases (not released before)."""

    name: str
    params: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class Release:
    """What is released at ``epoch``; ``depth`` counts the earlier releases (the ``k`` of ``lr_decay**k``)."""

    epoch: int
    depth: int
    lr_factor: float
    modules: tuple[ReleasedModule, ...]


@dataclass(frozen=True)
class ReleasePlan:
    backbone: str
    releases: tuple[Release, ...]
    frozen_params: int
    """Parameters (elements) of the backbone that no release reaches: they stay frozen."""

    def due(self, epoch: int) -> list[Release]:
        """The releases at or before ``epoch``."""
        return [release for release in self.releases if release.epoch <= epoch]


def default_schedule(backbone: nn.Module, backbone_name: str, first_epoch: int, every: int) -> dict[int, list[str]]:
    """The backbone's direct children that hold parameters, one per release, output side first.

    "Output side" is the reverse of registration order, which for ``nn.Sequential`` and torchvision
    models is the order of the forward pass.
    """
    children = [name for name, child in backbone.named_children() if any(True for _ in child.parameters())]
    return {
        first_epoch + i * every: [f"{backbone_name}.{name}" if backbone_name else name]
        for i, name in enumerate(reversed(children))
    }


def plan_releases(root: nn.Module, backbone: str, schedule: Schedule, lr_scale: float, lr_decay: float) -> ReleasePlan:
    """Check ``schedule`` against ``root`` and resolve it, in epoch order.

    A glob releases the modules it matches that hold parameters not released earlier; an explicit
    name must hold such parameters, appear once, and neither contain nor lie inside another
    explicit name.

    Raises:
        ValueError: a negative or non-integer epoch, a name matching no module, a module outside
            the backbone, a name listed twice or overlapping another, or a release of nothing.
    """
    modules = dict(root.named_modules())
    names = list(modules)
    param_names = {id(param): name for name, param in root.named_parameters()}
    prefix = f"{backbone}." if backbone else ""
    released: set[int] = set()  # ids: parameters are tracked by identity, never by value
    explicit: dict[str, int] = {}
    releases: list[Release] = []
    for epoch in sorted(_check_epochs(schedule)):
        chosen: list[ReleasedModule] = []
        for pattern in as_name_list(schedule[epoch], f"schedule[{epoch}]"):
            matches = match_names(pattern, names)
            if not matches:
                raise ValueError(unknown_name_message(pattern, names, f"schedule[{epoch}]"))
            for name in matches:
                if not (name == backbone or name.startswith(prefix)):
                    raise ValueError(
                        f"`schedule[{epoch}]` holds {name!r}, which is outside the backbone {backbone!r}:"
                        f" only modules inside it are frozen and released."
                    )
                if not is_glob(pattern):
                    _check_no_overlap(name, epoch, explicit)
                    explicit[name] = epoch
                params = [p for p in modules[name].parameters() if id(p) not in released]
                if not params:
                    if is_glob(pattern):
                        continue
                    raise ValueError(f"`schedule[{epoch}]` holds {name!r}, which has no parameters left to release.")
                released.update(id(p) for p in params)
                numel = sum(p.numel() for p in params)
                chosen.append(ReleasedModule(name, tuple(param_names[id(p)] for p in params), numel))
        if not chosen:
            raise ValueError(f"`schedule[{epoch}]` = {schedule[epoch]!r} matches no module with parameters to release.")
        depth = len(releases)
        releases.append(Release(epoch, depth, lr_scale * lr_decay**depth, tuple(chosen)))
    frozen = sum(p.numel() for p in modules[backbone].parameters() if id(p) not in released)
    return ReleasePlan(backbone, tuple(releases), frozen)


def _check_epochs(schedule: Schedule) -> list[int]:
    if not isinstance(schedule, Mapping):
        raise ValueError(f"`schedule` must map epochs to module names, got {schedule!r}.")
    for epoch in schedule:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`schedule` has the epoch {epoch!r}: epochs are integers >= 0.")
    return list(schedule)


def _check_no_overlap(name: str, epoch: int, explicit: dict[str, int]) -> None:
    for other, other_epoch in explicit.items():
        if name == other:
            raise ValueError(f"`schedule` lists {name!r} twice (epochs {other_epoch} and {epoch}).")
        inner, outer = (name, other) if name.startswith(f"{other}.") else (other, name)
        if inner.startswith(f"{outer}."):
            raise ValueError(
                f"`schedule[{epoch}]` holds {name!r}, which overlaps {other!r} of epoch {other_epoch}:"
                f" {inner!r} lies inside {outer!r}. List each module once, or use a glob."
            )


def format_plan(plan: ReleasePlan, max_epochs: int = -1) -> str:
    """The plan as a text table: epoch, modules, parameters released, learning-rate factor.

    With ``max_epochs >= 0``, releases at or past it are marked as never happening.
    """
    rows = [("epoch", "modules", "parameters", "lr factor")]
    for release in plan.releases:
        epoch = f"{release.epoch} (>= max_epochs: never)" if 0 <= max_epochs <= release.epoch else str(release.epoch)
        names = ", ".join(module.name for module in release.modules)
        numel = sum(module.numel for module in release.modules)
        rows.append((epoch, names, f"{numel:,}", f"{release.lr_factor:.4g}"))
    rows.append(("never", f"(rest of {plan.backbone})", f"{plan.frozen_params:,}", "frozen"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
