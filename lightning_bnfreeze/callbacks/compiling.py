"""``GradualUnfreeze`` and ``torch.compile``: regional compilation of the release units, or a whole-model compile
that never falls back to eager (see :mod:`lightning_bnfreeze.compile`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.compile import to_uncompiled
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_bnfreeze.compile import (
    CompiledBlocks,
    RaisedRecompileLimit,
    compile_blocks,
    contains_compiled,
    raise_recompile_limit,
    release_units,
    whole_model_budget,
)
from lightning_bnfreeze.internals import (
    compiled_original,
    forget_compiled_call,
    lightning_compile_context,
    lightning_compiled,
)
from lightning_bnfreeze.plan import ReleasePlan

__all__ = ["FitCompilation", "check_compile_option"]


REGIONS_NEED = "torch>=2.7"
"""On torch 2.6 a fit with compiled regions ended 1e-2 away from the eager fit's parameters (tests/test_compile.py)."""


def check_compile_option(value: object) -> dict[str, Any] | None:
    """``GradualUnfreeze(compile=...)``: ``None`` when off, else ``torch.compile``'s keyword arguments for regions."""
    if value is False or value is None:
        return None
    if not RequirementCache(REGIONS_NEED):
        raise ValueError(
            f"`compile={value!r}` needs {REGIONS_NEED} (this is torch {torch.__version__}, whose compiled regions do"
            " not train as the eager model does): leave `compile` out, or upgrade torch."
        )
    if value is True:
        return {}
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return dict(value)
    raise ValueError(
        f"`compile` must be True, False or a dict of torch.compile keyword arguments (e.g. {{'mode': 'max-autotune'}}),"
        f" got {value!r}."
    )


class FitCompilation:
    """For one fit: compile the plan's release units as regions (``compile`` on), or, for a model the user compiled
    as a whole, raise the recompile limit so that no release makes it fall back to eager, and say what it costs."""

    def __init__(self, compile_kwargs: dict[str, Any] | None) -> None:
        self.compile_kwargs = compile_kwargs
        self.compiled: CompiledBlocks | None = None
        self._limit: RaisedRecompileLimit | None = None

    def prepare(
        self, pl_module: pl.LightningModule, backbone: str, plan_of: Callable[[nn.Module], ReleasePlan]
    ) -> ReleasePlan:
        """The plan of the model once ready for the fit (``plan_of(pl_module)``); compiled as this fit wants."""
        self.close()
        from_fit = lightning_compiled(pl_module)  # trainer.fit(torch.compile(model)): its steps compiled as a whole
        if self.compile_kwargs is None:
            plan = plan_of(pl_module)
            self._keep_compiled(pl_module, plan, from_fit)
            return plan
        compiler = lightning_compile_context(pl_module) if not self.compile_kwargs else None
        if from_fit:
            to_uncompiled(pl_module)
        _unwrap(pl_module, backbone)
        plan = plan_of(pl_module)
        units = [pl_module.get_submodule(name) for name in release_units(pl_module, plan)]
        for _, module in contains_compiled(pl_module, units):
            forget_compiled_call(module)  # `module.compile()` around the units: the regions replace it
        self.compiled = compile_blocks(pl_module, plan, compiler=compiler, **self.compile_kwargs)
        rank_zero_info(
            f"GradualUnfreeze: compiled {len(self.compiled.names)} release units as regions"
            f" ({_shown(self.compiled.names)}){' with the options of your torch.compile' if compiler else ''};"
            f" Dynamo's recompile limit is {self.compiled.limit.limit if self.compiled.limit else '-'} for this fit."
        )
        return plan

    def _keep_compiled(self, pl_module: pl.LightningModule, plan: ReleasePlan, from_fit: bool) -> None:
        units = [pl_module.get_submodule(name) for name in release_units(pl_module, plan)]
        around = [name or "the LightningModule" for name, _ in contains_compiled(pl_module, units)]
        if not (from_fit or around):
            return
        releases = len(plan.releases)
        self._limit = raise_recompile_limit(whole_model_budget(releases))
        how = "trainer.fit(torch.compile(model))" if from_fit else f"torch.compile of {_shown(around)}"
        rank_zero_warn(
            f"GradualUnfreeze: the model is compiled as a whole ({how}), so each of the {releases} releases recompiles"
            " it (about one full compile, twice with validation); Dynamo's recompile limit is raised to"
            f" {self._limit.limit} for this fit so that it never falls back to eager. GradualUnfreeze(compile=True)"
            " compiles the released blocks as regions instead: no recompile per release."
        )

    def close(self) -> None:
        """The fit is over: Dynamo's recompile limit back as it was (compiled regions stay compiled)."""
        if self.compiled is not None:
            self.compiled.restore()
        if self._limit is not None:
            self._limit.restore()
        self.compiled = self._limit = None


def _unwrap(pl_module: nn.Module, backbone: str) -> None:
    """Put back the modules ``torch.compile(module)`` wrapped in or around the backbone (their parameters' names
    gained ``_orig_mod.``), so that the plan, names and checkpoints are those of the plain model."""

    def related(name: str) -> bool:
        return bool(name) and (name == backbone or backbone.startswith(f"{name}.") or name.startswith(f"{backbone}."))

    while True:  # names change with each module put back: look again
        wrapped = [(name, m) for name, m in pl_module.named_modules() if related(name) and compiled_original(m)]
        if not wrapped:
            return
        name, module = wrapped[0]
        parent, _, child = name.rpartition(".")
        setattr(pl_module.get_submodule(parent), child, compiled_original(module))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
