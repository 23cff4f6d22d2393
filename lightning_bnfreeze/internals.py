"""Every private (or undocumented) torch and Lightning attribute the library uses, in one place.

Each has a test in ``tests/test_internals.py`` that fails with a message naming it when a torch or
Lightning release changes it. The torch ones are imported here; the Lightning ones only inside the
functions that use them, so that the plain-PyTorch core imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "DISTRIBUTED_CHECKPOINT_METADATA",
    "SCHEDULER_PER_GROUP_STATE",
    "SCHEDULER_SHARED_STATE",
    "BatchNormBase",
    "InstanceNormBase",
    "NormBase",
    "batches_done_in_epoch",
    "before_checkpoint_load",
    "callback_state_key",
    "compile_module_with",
    "compiled_call",
    "compiled_original",
    "ddp_ignored_names",
    "ddp_process_group",
    "ddp_syncs_gradients",
    "dynamo_counters",
    "forget_checkpoint_hook",
    "forget_compiled_call",
    "gradient_scale",
    "lightning_compile_context",
    "lightning_compiled",
    "nested_schedulers",
    "parse_configure_optimizers",
    "recompile_limits",
    "set_recompile_limits",
    "sparse_nnz",
    "training_batches",
]

BatchNormBase = _BatchNorm
"""torch's base class of every BatchNorm layer (BatchNorm1d/2d/3d, SyncBatchNorm, the Lazy variants)."""
NormBase = _NormBase
"""torch's base class of BatchNorm and InstanceNorm layers: ``running_mean``, ``running_var``, ``momentum``."""
InstanceNormBase = _InstanceNorm
"""torch's base class of InstanceNorm1d/2d/3d."""

DISTRIBUTED_CHECKPOINT_METADATA = "meta.pt"
"""The file of a distributed checkpoint (a folder) that holds everything but tensors, as Lightning's
``ModelParallelStrategy`` writes it (``lightning.fabric.strategies.model_parallel._METADATA_FILENAME``)."""


SCHEDULER_PER_GROUP_STATE = {
    # attribute of a torch LR scheduler: whether its entries are learning rates (scaled with a new group) or shared
    "base_lrs": True,
    "_last_lr": True,
    "min_lrs": True,
    "max_lrs": True,
    "lr_lambdas": False,
    "base_momentums": False,
    "max_momentums": False,
}
"""torch LR schedulers' per-param-group lists (``_last_lr`` is private), extended for each added group."""
SCHEDULER_SHARED_STATE = frozenset({"_schedulers", "_milestones", "_schedule_phases", "milestones"})
"""torch LR schedulers' lists that are not per param group (those of SequentialLR, ChainedScheduler, OneCycleLR)."""


def nested_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a ``SequentialLR`` or ``ChainedScheduler`` chains (``_schedulers``), else none."""
    return list(getattr(scheduler, "_schedulers", ()))


def sparse_nnz(tensor: torch.Tensor) -> int:
    """The number of specified elements of a sparse COO tensor."""
    return int(tensor._nnz())


def recompile_limits() -> tuple[int, int]:
    """Dynamo's recompile limits: cache entries per code object (``torch._dynamo.config.recompile_limit``, called
    ``cache_size_limit`` before torch 2.7), and over all regions of one (``accumulated_recompile_limit``)."""
    config = _dynamo_config()
    per_code, accumulated = _recompile_limit_names(config)
    return int(getattr(config, per_code)), int(getattr(config, accumulated))


def set_recompile_limits(per_code: int, accumulated: int) -> None:
    """Set Dynamo's recompile limits (see :func:`recompile_limits`); read at each compile, also by compiled code."""
    config = _dynamo_config()
    names = _recompile_limit_names(config)
    setattr(config, names[0], int(per_code))
    setattr(config, names[1], int(accumulated))


def _dynamo_config() -> Any:
    import torch._dynamo

    return torch._dynamo.config


def _recompile_limit_names(config: Any) -> tuple[str, str]:
    if hasattr(config, "recompile_limit"):
        return "recompile_limit", "accumulated_recompile_limit"
    return "cache_size_limit", "accumulated_cache_size_limit"  # torch < 2.7


def dynamo_counters() -> dict[str, dict[str, int]]:
    """A copy of Dynamo's event counters (``torch._dynamo.utils.counters``): ``["stats"]["unique_graphs"]``,
    ``["frames"]["total"]``/``["ok"]``, and per reason the frames it ran uncompiled (``["unimplemented"]``, a
    recompile-limit hit among them)."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items()}


def compiled_call(module: nn.Module) -> Callable[..., Any] | None:
    """What a module compiled in place (``module.compile()``) runs instead of its ``__call__``, else ``None``."""
    return getattr(module, "_compiled_call_impl", None)


def forget_compiled_call(module: nn.Module) -> None:
    """Undo ``module.compile()``: the module runs eagerly again."""
    module._compiled_call_impl = None


def compiled_original(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile(module)`` wraps (an ``OptimizedModule``'s ``_orig_mod``), else ``None``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return module._orig_mod if isinstance(module, OptimizedModule) else None


def lightning_compiled(pl_module: nn.Module) -> bool:
    """Whether the LightningModule came to the fit as ``torch.compile(model)`` (Lightning's ``from_compiled``
    leaves its ``_compiler_ctx`` set, and its ``*_step`` and ``forward`` methods compiled)."""
    return getattr(pl_module, "_compiler_ctx", None) is not None


def lightning_compile_context(pl_module: nn.Module) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
    """For a LightningModule that came as ``torch.compile(model, **options)``: the function that compiles a function
    with those options (the ``OptimizedModule``'s ``dynamo_ctx``, kept in ``_compiler_ctx``), else ``None``."""
    context = getattr(pl_module, "_compiler_ctx", None)
    return None if context is None else context["dynamo_ctx"]


def compile_module_with(module: nn.Module, compiler: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``module.compile()`` with ``compiler`` (a ``dynamo_ctx``) in place of ``torch.compile``: the module's calls run
    ``compiler(module._call_impl)``, its names, parameters and state dict unchanged."""
    module._compiled_call_impl = compiler(module._call_impl)


def ddp_ignored_names(model: nn.Module) -> set[str]:
    """Names of the parameters a ``DistributedDataParallel`` ignores (set by its
    ``_set_params_and_buffers_to_ignore_for_model``)."""
    return set(getattr(model, "parameters_to_ignore", ()))


def ddp_syncs_gradients(model: nn.Module) -> bool:
    """Whether the next backward of a ``DistributedDataParallel`` reduces gradients (``False`` under ``no_sync()``)."""
    return bool(model.require_backward_grad_sync)


def ddp_process_group(model: nn.Module) -> Any:
    """The process group a ``DistributedDataParallel`` reduces over."""
    return model.process_group


def parse_configure_optimizers(configured: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """What ``configure_optimizers`` returned, as Lightning parses it in a fit: the optimizers, and each
    LR scheduler's config (``scheduler``, ``interval``, ``frequency``, ``reduce_on_plateau``)."""
    from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt

    optimizers, schedulers, monitor = _configure_optimizers(configured)
    return optimizers, _configure_schedulers_automatic_opt(schedulers, monitor)


def training_batches(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Iterator[Any], str | None]:
    """A fresh iterator over the training batches as ``training_step`` gets them, and for several training
    dataloaders the kind of container their batches come in (``"list"``, ``"dict"``; ``None``: one loader).

    The fit loop's own iterator and the data order stay untouched. Each batch went through the
    precision plugin, the batch-transfer hooks and the strategy's device.

    Raises:
        RuntimeError: the training dataloader is not set up yet.
    """
    source = trainer.fit_loop._combined_loader
    if source is None:
        raise RuntimeError("the training dataloader is not set up yet.")
    loader = type(source)(source.iterables, source._mode)
    loader.limits = source.limits
    single = len(source.flattened) == 1 and source.iterables is source.flattened[0]
    several = None if single else type(source.iterables).__name__

    def prepared() -> Iterator[Any]:
        for batch, _, _ in loader:
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    return prepared(), several


def batches_done_in_epoch(trainer: pl.Trainer) -> int:
    """Training batches completed in the current epoch."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)


def gradient_scale(trainer: pl.Trainer) -> float | None:
    """The loss scale of the fit's gradient scaler (fp16 mixed precision); ``None`` without one. Lightning's
    ``MixedPrecision`` plugin keeps the scaler as ``scaler`` (its constructor's argument, not a documented
    attribute)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None


def callback_state_key(callback: pl.Callback, **identity: Any) -> str:
    """A callback's checkpoint key from its class and ``identity`` (Lightning's ``Callback._generate_state_key``)."""
    return str(callback._generate_state_key(**identity))


def before_checkpoint_load(strategy: pl.strategies.Strategy, hook: Callable[[Any], None]) -> None:
    """Have the strategy's next ``load_checkpoint(path, ...)`` call ``hook(path)`` first, once.

    A strategy that restores after ``setup`` (``ModelParallelStrategy``) loads the optimizers' state in
    ``load_checkpoint``, after ``on_fit_start`` and before the callbacks get their state: param groups
    added on resume must exist by then. Lightning offers no hook there, so the strategy's (public) method
    is wrapped on the instance; :func:`forget_checkpoint_hook` removes the wrapper.
    """
    load = strategy.load_checkpoint

    def load_after_hook(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        forget_checkpoint_hook(strategy)
        hook(checkpoint_path)
        return load(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = load_after_hook  # type: ignore[method-assign]


def forget_checkpoint_hook(strategy: pl.strategies.Strategy) -> None:
    """Remove :func:`before_checkpoint_load`'s wrapper (a fit that restored no checkpoint)."""
    vars(strategy).pop("load_checkpoint", None)
