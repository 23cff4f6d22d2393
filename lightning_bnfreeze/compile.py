"""``torch.compile`` for staged fine-tuning: compile the release units as regions, in plain PyTorch.

A release changes the state Dynamo guards on (``requires_grad`` of the released parameters, ``training``
of their norm layers), so a model compiled as a whole recompiles as a whole at each release, twice with
validation (the eval graph guards on ``requires_grad`` too), and after about three releases it reaches
Dynamo's recompile limit (8 cache entries per code object) and runs eagerly for the rest of the fit,
saying so in one warning line.

:func:`compile_blocks` compiles each release unit in place instead (``module.compile()``: the same
module objects, parameter names, ``state_dict`` keys and checkpoints, no ``_orig_mod.``), with
``dynamic=False`` by default. A release then only changes the state of its own block, and blocks of one
class share the compiled code of their ``forward`` (Dynamo caches per code object): the variants of one
block's graph (frozen, released, in training steps and in validation) are compiled once and reused by
every block that reaches that state, so the compile work does not grow with the number of releases.
As those variants pile up on one code object (more so for blocks of one class with different shapes, a
ResNet's stages), :func:`compile_blocks` raises Dynamo's recompile limit to what they can need
(:func:`recompile_budget`) until :meth:`CompiledBlocks.restore`.

The code between the regions (a stem that is no release unit, the head, the loss) runs eagerly.

With ``GradualUnfreeze(compile=True)`` the callback does all of this for its plan after ``configure_model``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_bnfreeze.internals import (
    compile_module_with,
    compiled_call,
    compiled_original,
    dynamo_counters,
    recompile_limits,
    set_recompile_limits,
)
from lightning_bnfreeze.names import match_names, unknown_name_message
from lightning_bnfreeze.plan import ReleasePlan

__all__ = [
    "CompileCounts",
    "CompiledBlocks",
    "RaisedRecompileLimit",
    "compile_blocks",
    "compile_counts",
    "contains_compiled",
    "raise_recompile_limit",
    "recompile_budget",
    "release_units",
    "whole_model_budget",
]

STATES_PER_SHAPE = 10
"""Cache entries one block structure can need over a fit: in training steps frozen, released with frozen norm
layers, released with training norm layers (``bn="auto"`` goes from one to the other), each with an input that
requires grad or not (6); under ``no_grad`` (validation, AdaBN) frozen or released, norm layers in either mode (4)."""
INPUT_SIZES = 2
"""With ``dynamic=False`` each batch size compiles its own entries: the batch size, and a smaller last batch or
another validation batch size."""
MARGIN = 8
"""Entries left over for what no count foresees."""
LIMIT_REASONS = ("recompile limit", "recompile_limit", "cache_size_limit")
"""How Dynamo's counters name a frame run eagerly at the recompile limit (``cache_size_limit`` before torch 2.7)."""


def release_units(root: nn.Module, plan: ReleasePlan) -> list[str]:
    """The names of the modules ``plan`` releases, in release order: a released module, or each module of a
    released block (a parameter released alone, ``backbone.pos_embed``, is no region)."""
    modules = dict(root.named_modules())
    members = {block.name: block.members for block in plan.blocks}
    names: dict[str, None] = {}
    for release in plan.releases:
        for part in release:
            for name in members.get(part.name, (part.name,)):
                if name in modules:
                    names.setdefault(name)
    return list(names)


@dataclass
class RaisedRecompileLimit:
    """Dynamo's recompile limits as they were before :func:`raise_recompile_limit`; :meth:`restore` puts them back."""

    previous: tuple[int, int]
    limit: int
    restored: bool = False

    def restore(self) -> None:
        """Put the limits back as they were (once; a limit raised since by someone else stays)."""
        if not self.restored:
            self.restored = True
            per_code, accumulated = recompile_limits()
            if (per_code, accumulated) == (self.limit, max(self.previous[1], self.limit)):
                set_recompile_limits(*self.previous)

    def __enter__(self) -> RaisedRecompileLimit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def raise_recompile_limit(limit: int) -> RaisedRecompileLimit:
    """Raise Dynamo's recompile limit (per code object, and over all regions) to at least ``limit``, globally,
    until the returned object's ``restore()`` (or the end of its ``with`` block). Never lowers it."""
    previous = recompile_limits()
    raised = max(previous[0], limit)
    set_recompile_limits(raised, max(previous[1], raised))
    return RaisedRecompileLimit(previous, raised)


def recompile_budget(modules: Iterable[nn.Module]) -> int:
    """The recompile limit the regions ``modules`` can need over a fit of any number of releases.

    Dynamo caches per code object: all instances of a class share their ``forward``'s entries (and
    ``torch.nn``'s own modules, compiled alone, one wrapper's). Each distinct structure (classes, parameter
    and buffer shapes) on a code object needs up to ``STATES_PER_SHAPE * INPUT_SIZES`` entries; the budget is
    the largest code object's need, plus ``MARGIN``.
    """
    shapes: dict[Hashable, set[Hashable]] = {}
    for module in modules:
        shapes.setdefault(_code_key(module), set()).add(_structure(module))
    most = max((len(structures) for structures in shapes.values()), default=0)
    return most * STATES_PER_SHAPE * INPUT_SIZES + MARGIN


def whole_model_budget(releases: int) -> int:
    """The recompile limit a model compiled as a whole needs over a fit of ``releases`` releases: per phase
    (before the first release, after each) a training graph, a validation graph, one more for norm layers
    that start training after a released block's first step (``bn="auto"``) and one spare, plus ``MARGIN``
    (the first steps: Lightning's own state guarded in a compiled ``training_step``, the sanity check)."""
    return 4 * (releases + 1) + MARGIN


def _code_key(module: nn.Module) -> Hashable:
    forward = type(module).forward
    if type(module).__module__.startswith("torch.nn."):
        return "torch.nn"  # torch compiles its own modules through one shared wrapper frame
    return getattr(forward, "__code__", forward)


def _structure(module: nn.Module) -> Hashable:
    return tuple(
        (
            name,
            type(sub).__qualname__,
            tuple(
                (n, tuple(t.shape))
                for n, t in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False))
            ),
        )
        for name, sub in module.named_modules()
    )


@dataclass
class CompiledBlocks:
    """What :func:`compile_blocks` compiled: the regions by name, and the recompile limit raised for them."""

    names: list[str]
    modules: list[nn.Module] = field(repr=False)
    limit: RaisedRecompileLimit | None = None

    def restore(self) -> None:
        """Put Dynamo's recompile limit back as it was (the regions stay compiled)."""
        if self.limit is not None:
            self.limit.restore()

    def __enter__(self) -> CompiledBlocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def compile_blocks(
    root: nn.Module,
    blocks: ReleasePlan | Sequence[str | nn.Module],
    *,
    compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    raise_limit: bool = True,
    **compile_kwargs: Any,
) -> CompiledBlocks:
    """Compile each of ``blocks`` in place as a region of its own, and raise the recompile limit for them.

    Args:
        root: the model (the LightningModule) that holds the blocks; names are relative to it.
        blocks: a :class:`~lightning_bnfreeze.plan.ReleasePlan` (``GradualUnfreeze(...).plan(model)``: its
            release units), or module names and globs (``"backbone.blocks.*"``), or the modules themselves.
            A listed module that holds another listed one is not compiled (it runs eagerly around its regions).
        compiler: instead of ``torch.compile(**compile_kwargs)``, a function that compiles a function (the
            ``dynamo_ctx`` of an earlier ``torch.compile``, to reuse its options).
        raise_limit: raise Dynamo's recompile limit to :func:`recompile_budget` of the regions (default), until
            the returned object's ``restore()``; with ``False``, leave it as it is.
        compile_kwargs: ``torch.compile``'s keyword arguments for each region; ``dynamic`` defaults to ``False``
            (blocks of one class with different shapes compile faster as static graphs).

    Returns:
        The compiled regions; ``restore()`` (or a ``with`` block) puts the recompile limit back.

    Raises:
        ValueError: a name that matches no module of ``root`` (with the closest names).

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with compile_blocks(model, ["0", "2"]) as compiled:
        ...     compiled.names
        ['0', '2']
    """
    modules = _resolve(root, blocks)
    modules = {name: m for name, m in modules.items() if not any(o is not m and _holds(m, o) for o in modules.values())}
    kwargs = {"dynamic": False, **compile_kwargs}
    for module in modules.values():
        if compiler is not None:
            compile_module_with(module, compiler)
        else:
            module.compile(**kwargs)
    limit = raise_recompile_limit(recompile_budget(modules.values())) if raise_limit else None
    return CompiledBlocks(list(modules), list(modules.values()), limit)


def _resolve(root: nn.Module, blocks: ReleasePlan | Sequence[str | nn.Module]) -> dict[str, nn.Module]:
    named = dict(root.named_modules())
    if isinstance(blocks, ReleasePlan):
        return {name: named[name] for name in release_units(root, blocks)}
    by_id = {id(m): name for name, m in named.items()}
    found: dict[str, nn.Module] = {}
    for entry in blocks:
        if isinstance(entry, nn.Module):
            found[by_id.get(id(entry), f"<{type(entry).__name__} #{len(found)}>")] = entry
            continue
        matches = match_names(entry, named)
        if not matches:
            raise ValueError(unknown_name_message(entry, named, "blocks"))
        found.update((name, named[name]) for name in matches)
    return found


def _holds(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def contains_compiled(root: nn.Module, units: Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The modules of ``root`` (``root`` included) compiled around release ``units`` (holding one that is not the
    module itself), in place (``module.compile()``) or wrapped (``torch.compile(module)``): such a graph recompiles
    as a whole at each release."""
    found = []
    for name, module in root.named_modules():
        if compiled_call(module) is None and compiled_original(module) is None:
            continue
        if any(unit is not module and _holds(module, unit) for unit in units):
            found.append((name, module))
    return found


@dataclass(frozen=True)
class CompileCounts:
    """Dynamo's work so far in this process: graphs compiled, frames it was asked to compile, and frames it ran
    eagerly because a code object reached the recompile limit (``limit_hits``: the eager fall-back)."""

    graphs: int
    frames: int
    limit_hits: int

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(self.graphs - other.graphs, self.frames - other.frames, self.limit_hits - other.limit_hits)


def compile_counts() -> CompileCounts:
    """Dynamo's counters now (for tests and benchmarks: take the difference of two)."""
    counters = dynamo_counters()
    reasons: Counter[str] = Counter(counters.get("unimplemented", {}))
    hits = sum(count for reason, count in reasons.items() if any(k in reason for k in LIMIT_REASONS))
    return CompileCounts(
        counters.get("stats", {}).get("unique_graphs", 0), counters.get("frames", {}).get("total", 0), hits
    )
