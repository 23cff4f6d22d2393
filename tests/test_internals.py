"""Every private torch and Lightning attribute the library uses lives in ``lightning_bnfreeze/internals.py``, and
each entry there still does what the library relies on: a torch or Lightning release that changes one fails its test
here with a message naming the entry and the private attribute behind it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import internals
from lightning_bnfreeze.callbacks.compiling import REGIONS_NEED
from lightning_bnfreeze.compile import LIMIT_REASONS

needs_regional_compile = pytest.mark.skipif(
    not RequirementCache(REGIONS_NEED),
    reason=f"regional compilation (GradualUnfreeze(compile=True)) needs {REGIONS_NEED}",
)

LIBRARY = Path(internals.__file__).parent
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


@contextmanager
def relies_on(entry: str, private: str) -> Iterator[None]:
    """Any failure inside names the entry of internals.py and the private torch/Lightning attribute it relies on."""
    try:
        yield
    except Exception as error:
        pytest.fail(
            f"lightning_bnfreeze.internals.{entry} relies on {private}, which this torch/Lightning release changed:"
            f" {type(error).__name__}: {error}"
        )


def test_every_entry_has_a_test() -> None:
    tested = {
        "BatchNormBase",
        "InstanceNormBase",
        "NormBase",
        "DISTRIBUTED_CHECKPOINT_METADATA",
        "sparse_nnz",
        "ddp_ignored_names",
        "ddp_syncs_gradients",
        "ddp_process_group",
        "parse_configure_optimizers",
        "training_batches",
        "batches_done_in_epoch",
        "gradient_scale",
        "callback_state_key",
        "before_checkpoint_load",
        "forget_checkpoint_hook",
        "SCHEDULER_PER_GROUP_STATE",
        "SCHEDULER_SHARED_STATE",
        "nested_schedulers",
        "recompile_limits",
        "set_recompile_limits",
        "dynamo_counters",
        "compiled_call",
        "forget_compiled_call",
        "compiled_original",
        "compile_module_with",
        "lightning_compiled",
        "lightning_compile_context",
    }
    assert set(internals.__all__) == tested, "a new entry of internals.py needs its test here"


# --------------------------------------------------------------------------------------------- torch


def _schedulers(optimizer: torch.optim.Optimizer) -> list[Any]:
    lr = torch.optim.lr_scheduler
    return [
        lr.StepLR(optimizer, 2),
        lr.CosineAnnealingLR(optimizer, 10),
        lr.OneCycleLR(optimizer, max_lr=1.0, total_steps=10),
        lr.CyclicLR(optimizer, 0.1, 1.0),
        lr.LambdaLR(optimizer, lambda step: 1.0),
        lr.ReduceLROnPlateau(optimizer),
        lr.SequentialLR(optimizer, [lr.ConstantLR(optimizer), lr.ExponentialLR(optimizer, 0.9)], milestones=[2]),
    ]


def test_schedulers_per_group_state_is_what_torch_keeps_per_group() -> None:
    """Every list a scheduler keeps with one entry per param group is known to the library, as per-group or shared."""
    known = set(internals.SCHEDULER_PER_GROUP_STATE) | internals.SCHEDULER_SHARED_STATE
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, momentum=0.9)
    with relies_on("SCHEDULER_PER_GROUP_STATE", "torch LR schedulers' per-group lists (`_last_lr`, ...)"):
        for scheduler in _schedulers(optimizer):
            lists = {
                name for name, value in vars(scheduler).items() if isinstance(value, list | tuple) and len(value) == 2
            }
            assert lists <= known, f"{type(scheduler).__name__}: {sorted(lists - known)}"
            assert "_last_lr" in vars(scheduler) or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_nested_schedulers_are_those_sequential_lr_chains() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    lr = torch.optim.lr_scheduler
    inner = [lr.ConstantLR(optimizer), lr.ExponentialLR(optimizer, 0.9)]
    with relies_on("nested_schedulers", "`SequentialLR._schedulers` / `ChainedScheduler._schedulers`"):
        assert internals.nested_schedulers(lr.SequentialLR(optimizer, inner, milestones=[2])) == inner
        assert internals.nested_schedulers(lr.ChainedScheduler(inner)) == inner
    assert internals.nested_schedulers(lr.StepLR(optimizer, 2)) == []
    assert "_schedulers" in internals.SCHEDULER_SHARED_STATE


BATCH_NORMS = (
    nn.BatchNorm1d(2),
    nn.BatchNorm2d(2),
    nn.BatchNorm3d(2),
    nn.SyncBatchNorm(2),
    nn.LazyBatchNorm1d(),
    nn.LazyBatchNorm2d(),
    nn.LazyBatchNorm3d(),
)
INSTANCE_NORMS = (
    nn.InstanceNorm1d(2, track_running_stats=True),
    nn.InstanceNorm2d(2, track_running_stats=True),
    nn.InstanceNorm3d(2, track_running_stats=True),
    nn.LazyInstanceNorm2d(track_running_stats=True),
)
OTHER_NORMS = (nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.LocalResponseNorm(2), nn.RMSNorm(2))


@pytest.mark.parametrize("layer", BATCH_NORMS, ids=lambda layer: type(layer).__name__)
def test_batch_norm_base_covers_every_batch_norm(layer: nn.Module) -> None:
    with relies_on("BatchNormBase", "torch.nn.modules.batchnorm._BatchNorm"):
        assert isinstance(layer, internals.BatchNormBase)
        assert isinstance(layer, internals.NormBase)
        assert not isinstance(layer, internals.InstanceNormBase)


@pytest.mark.parametrize("layer", INSTANCE_NORMS, ids=lambda layer: type(layer).__name__)
def test_instance_norm_base_covers_every_instance_norm(layer: nn.Module) -> None:
    with relies_on("InstanceNormBase", "torch.nn.modules.instancenorm._InstanceNorm"):
        assert isinstance(layer, internals.InstanceNormBase)
        assert isinstance(layer, internals.NormBase)
        assert not isinstance(layer, internals.BatchNormBase)


@pytest.mark.parametrize("layer", OTHER_NORMS, ids=lambda layer: type(layer).__name__)
def test_norms_without_running_statistics_are_not_covered(layer: nn.Module) -> None:
    with relies_on("NormBase", "torch.nn.modules.batchnorm._NormBase"):
        assert not isinstance(layer, internals.NormBase)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(3), nn.InstanceNorm2d(3, track_running_stats=True)])
def test_norm_base_has_the_attributes_the_library_reads(layer: nn.Module) -> None:
    with relies_on("NormBase", "torch.nn.modules.batchnorm._NormBase"):
        assert isinstance(layer, internals.NormBase)
        assert layer.num_features == 3 and layer.track_running_stats and isinstance(layer.momentum, float)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert name in dict(layer.named_buffers()), name
        statistics = layer.running_mean
        type(layer).reset_running_stats(layer)  # the method the library shadows on frozen layers
        assert layer.running_mean is statistics


def test_sparse_nnz_counts_the_specified_elements() -> None:
    indices, values = torch.tensor([[0, 2, 2]]), torch.tensor([1.0, 2.0, 3.0])
    gradient = torch.sparse_coo_tensor(indices, values, (4,), check_invariants=True)
    empty = torch.sparse_coo_tensor(indices[:, :0], values[:0], (4,), check_invariants=True)
    with relies_on("sparse_nnz", "torch.Tensor._nnz"):
        assert internals.sparse_nnz(gradient) == 3
        assert internals.sparse_nnz(gradient.coalesce()) == 2
        assert internals.sparse_nnz(empty) == 0


def test_recompile_limits_are_the_ones_dynamo_falls_back_to_eager_at_and_dynamo_counters_count_it() -> None:
    torch.compiler.reset()
    linear = nn.Linear(3, 3)
    compiled = torch.compile(linear.forward, backend="eager", dynamic=False)
    previous = internals.recompile_limits()
    with relies_on("recompile_limits", "torch._dynamo.config.recompile_limit (cache_size_limit before torch 2.7)"):
        assert previous[0] >= 1 and previous[1] >= 1  # (another library may have raised one of them alone)
    try:
        internals.set_recompile_limits(2, previous[1])
        with relies_on("set_recompile_limits", "torch._dynamo.config.recompile_limit, read at each compile"):
            assert internals.recompile_limits() == (2, previous[1])
        before = internals.dynamo_counters()
        for rows in (1, 2, 3, 4):  # each batch size one static graph: the third is past the limit
            compiled(torch.randn(rows, 3))
        after = internals.dynamo_counters()
    finally:
        internals.set_recompile_limits(*previous)
    assert internals.recompile_limits() == previous
    with relies_on("dynamo_counters", "torch._dynamo.utils.counters: stats/unique_graphs, frames, unimplemented"):
        assert after["stats"]["unique_graphs"] - before.get("stats", {}).get("unique_graphs", 0) == 2
        assert after["frames"]["total"] > after["frames"]["ok"]
        reasons = after["unimplemented"]
        assert [reason for reason in reasons if any(name in reason for name in LIMIT_REASONS)], reasons


@needs_regional_compile
def test_a_module_compiled_in_place_has_a_compiled_call_that_forgetting_removes() -> None:
    from lightning_bnfreeze.compile import compile_counts

    torch.compiler.reset()
    linear = nn.Linear(3, 3)
    assert internals.compiled_call(linear) is None
    linear.compile(backend="eager")
    with relies_on("compiled_call", "torch.nn.Module._compiled_call_impl (set by Module.compile)"):
        assert callable(internals.compiled_call(linear))
    internals.forget_compiled_call(linear)
    before = compile_counts()
    with relies_on("forget_compiled_call", "torch.nn.Module._compiled_call_impl = None: the module runs eagerly"):
        assert internals.compiled_call(linear) is None
        linear(torch.randn(2, 3))
        assert (compile_counts() - before).graphs == 0
    wrapped = torch.compile(linear, backend="eager")
    with relies_on("compiled_original", "torch._dynamo.eval_frame.OptimizedModule._orig_mod"):
        assert internals.compiled_original(wrapped) is linear
        assert internals.compiled_original(linear) is None
        assert [name for name, _ in wrapped.named_parameters()] == ["_orig_mod.weight", "_orig_mod.bias"]
    with relies_on("compile_module_with", "torch.nn.Module._compiled_call_impl and _call_impl"):
        internals.compile_module_with(linear, wrapped.dynamo_ctx)
        assert [name for name, _ in linear.named_parameters()] == ["weight", "bias"]
        linear(torch.randn(2, 3))
        assert (compile_counts() - before).graphs == 1


def test_ddp_attributes_exist_on_a_distributed_data_parallel(process_group: dist.ProcessGroup) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["1.weight"])  # how users ignore them
    ddp = DistributedDataParallel(model, process_group=process_group)
    with relies_on("ddp_ignored_names", "DistributedDataParallel.parameters_to_ignore"):
        assert hasattr(ddp, "parameters_to_ignore")  # the function falls back to none ignored without it
        assert internals.ddp_ignored_names(ddp) == {"1.weight"}
    with relies_on("ddp_syncs_gradients", "DistributedDataParallel.require_backward_grad_sync"):
        assert internals.ddp_syncs_gradients(ddp)
        with ddp.no_sync():
            assert not internals.ddp_syncs_gradients(ddp)
        assert internals.ddp_syncs_gradients(ddp)
    with relies_on("ddp_process_group", "DistributedDataParallel.process_group"):
        assert internals.ddp_process_group(ddp) is process_group


# --------------------------------------------------------------------------------------------- Lightning


def test_distributed_checkpoint_metadata_is_lightnings_file_name() -> None:
    with relies_on("DISTRIBUTED_CHECKPOINT_METADATA", "lightning.fabric.strategies.model_parallel._METADATA_FILENAME"):
        from lightning.fabric.strategies import model_parallel

        assert internals.DISTRIBUTED_CHECKPOINT_METADATA == model_parallel._METADATA_FILENAME


class Configured(pl.LightningModule):
    """Returns ``configure_optimizers`` in one of the forms Lightning accepts."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.form = form

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> Any:
        sgd = torch.optim.SGD(self.parameters(), lr=0.1)
        step = torch.optim.lr_scheduler.StepLR(sgd, step_size=1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(sgd)
        return {
            "optimizer": sgd,
            "list": [sgd],
            "lists": ([sgd], [step]),
            "dict": {"optimizer": sgd, "lr_scheduler": step},
            "dict_config": {"optimizer": sgd, "lr_scheduler": {"scheduler": step, "interval": "step", "frequency": 2}},
            "plateau": {"optimizer": sgd, "lr_scheduler": {"scheduler": plateau, "monitor": "loss"}},
            "list_of_dicts": [{"optimizer": sgd, "lr_scheduler": {"scheduler": step, "interval": "step"}}],
        }[self.form]


def described(optimizers: list[torch.optim.Optimizer], configs: list[Any]) -> tuple[list[Any], list[Any]]:
    return [(type(o).__name__, [g["lr"] for g in o.param_groups]) for o in optimizers], [
        (
            type(c.scheduler).__name__,
            c.interval,
            c.frequency,
            c.reduce_on_plateau,
            c.monitor,
            next(i for i, o in enumerate(optimizers) if c.scheduler.optimizer is o),
        )
        for c in configs
    ]


class Parsed(Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = described(trainer.optimizers, trainer.lr_scheduler_configs)


@pytest.mark.parametrize("form", ["optimizer", "list", "lists", "dict", "dict_config", "plateau", "list_of_dicts"])
def test_parse_configure_optimizers_parses_every_form_as_a_fit_does(form: str) -> None:
    model = Configured(form)
    probe = Parsed()
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    pl.Trainer(max_steps=1, callbacks=[probe], **QUIET).fit(model, data)  # type: ignore[arg-type]
    with relies_on(
        "parse_configure_optimizers",
        "lightning.pytorch.core.optimizer._configure_optimizers and _configure_schedulers_automatic_opt",
    ):
        assert described(*internals.parse_configure_optimizers(model.configure_optimizers())) == probe.seen


def map_inputs(batch: Any, fn: Any) -> Any:
    """``fn`` applied to the inputs of a batch ``[x, y]``, or of each batch of a list of them (several loaders)."""
    if isinstance(batch[0], list):
        return [map_inputs(each, fn) for each in batch]
    return [fn(batch[0]), batch[1]]


class Transferred(pl.LightningModule):
    """Its batch-transfer hooks change the batch; records what ``training_step`` gets."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.stepped: list[Any] = []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return map_inputs(batch, lambda x: x + 1)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return map_inputs(batch, lambda x: x * 2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.stepped.append(batch)
        first = batch[0][0] if isinstance(batch[0], list) else batch[0]
        return self.layer(first.to(self.layer.weight.dtype)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Fetch(Callback):
    """Takes every batch of ``training_batches`` at ``setup`` (too early: an error) and at training start."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            internals.training_batches(trainer, pl_module)
        except RuntimeError as error:
            self.early: RuntimeError | None = error
        else:
            self.early = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches, self.several = internals.training_batches(trainer, pl_module)
        self.batches = list(batches)


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(6, 2, generator=generator), torch.arange(6)), batch_size=2)


@pytest.mark.parametrize(
    ("precision", "loaders"), [("32-true", 1), ("bf16-true", 1), ("32-true", 2)], ids=["fp32", "bf16", "two-loaders"]
)
def test_training_batches_yields_what_training_step_gets(precision: str, loaders: int) -> None:
    model, fetch = Transferred(), Fetch()
    data = loader(0) if loaders == 1 else [loader(0), loader(1)]
    pl.Trainer(max_epochs=1, precision=precision, callbacks=[fetch], **QUIET).fit(model, data)  # type: ignore[arg-type]
    with relies_on(
        "training_batches",
        "Trainer.fit_loop._combined_loader (its ._mode), LightningModule._on_before_batch_transfer",
    ):
        assert isinstance(fetch.early, RuntimeError) and "not set up yet" in str(fetch.early)
        assert fetch.several == (None if loaders == 1 else "list")
        assert len(fetch.batches) == len(model.stepped) == 3
        for fetched, stepped in zip(fetch.batches, model.stepped, strict=True):
            torch.testing.assert_close(fetched, stepped, rtol=0, atol=0)
        if precision == "bf16-true":
            assert fetch.batches[0][0].dtype == torch.bfloat16  # through the precision plugin
        first = fetch.batches[0][0][0] if loaders == 2 else fetch.batches[0][0]
        raw = loader(0).dataset.tensors[0][:2]
        torch.testing.assert_close(first, (raw.to(first.dtype) + 1) * 2, rtol=0, atol=0)  # through the hooks


class Progress(Callback):
    def __init__(self) -> None:
        self.at_batch_start: list[int] = []
        self.at_validation_end: list[int] = []
        self.at_epoch_end: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.at_batch_start.append(internals.batches_done_in_epoch(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.at_validation_end.append(internals.batches_done_in_epoch(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_epoch_end.append(internals.batches_done_in_epoch(trainer))


class Validated(Transferred):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def test_batches_done_in_epoch_counts_the_completed_training_batches() -> None:
    progress = Progress()
    trainer = pl.Trainer(max_epochs=2, val_check_interval=2, callbacks=[progress], **QUIET)  # type: ignore[arg-type]
    trainer.fit(Validated(), DataLoader(TensorDataset(torch.randn(12, 2), torch.arange(12)), batch_size=2), loader(0))
    with relies_on("batches_done_in_epoch", "Trainer.fit_loop.epoch_loop.batch_progress.current.completed"):
        assert progress.at_batch_start == [0, 1, 2, 3, 4, 5] * 2
        assert progress.at_validation_end == [2, 4, 6] * 2
        assert progress.at_epoch_end == [6, 6]


class Scales(Callback):
    def __init__(self) -> None:
        self.scales: list[float | None] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.scales.append(internals.gradient_scale(trainer))


@pytest.mark.parametrize("precision", ["16-mixed", "32-true"])
def test_gradient_scale_is_the_loss_scale_of_the_fits_gradient_scaler(precision: str) -> None:
    scales = Scales()
    plugins = [MixedPrecision(precision, "cpu")] if precision == "16-mixed" else []
    trainer = pl.Trainer(max_steps=2, callbacks=[scales], plugins=plugins, **QUIET)  # type: ignore[arg-type]
    trainer.fit(Transferred(), loader(0))
    with relies_on("gradient_scale", "MixedPrecision.scaler"):
        if precision == "32-true":
            assert scales.scales == [None, None]
        else:  # the bias's fp16 gradient (the batch size times the initial scale) overflows: the scaler halves it
            initial = float(torch.amp.GradScaler("cpu").get_scale())
            assert scales.scales == [initial, initial / 2]


class Keyed(Callback):
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def state_key(self) -> str:
        return internals.callback_state_key(self, name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}


def test_callback_state_key_is_the_key_of_the_callbacks_state_in_a_checkpoint(tmp_path: Path) -> None:
    callbacks = [Keyed("a"), Keyed("b")]
    trainer = pl.Trainer(max_steps=1, callbacks=callbacks, **QUIET)  # type: ignore[arg-type]
    trainer.fit(Transferred(), loader(0))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    with relies_on("callback_state_key", "lightning.pytorch.Callback._generate_state_key"):
        assert callbacks[0].state_key != callbacks[1].state_key
        assert callbacks[0].state_key.startswith("Keyed")
        assert {key: saved[key] for key in (c.state_key for c in callbacks)} == {
            callbacks[0].state_key: {"name": "a"},
            callbacks[1].state_key: {"name": "b"},
        }


class RestoresAfterSetup(pl.strategies.SingleDeviceStrategy):
    """A single-device strategy that restores checkpoints after ``setup``, as ``ModelParallelStrategy`` does."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


class HookAtFitStart(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append("on_fit_start")
        internals.before_checkpoint_load(trainer.strategy, lambda path: self.events.append(f"hook {Path(path).name}"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        internals.forget_checkpoint_hook(trainer.strategy)
        self.events.append("on_train_start")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events.append("load_state_dict")

    def state_dict(self) -> dict[str, Any]:
        return {"saved": True}


def test_before_checkpoint_load_runs_after_fit_start_and_before_the_callbacks_get_their_state(tmp_path: Path) -> None:
    model = Transferred()
    trainer = pl.Trainer(max_steps=1, callbacks=[HookAtFitStart()], **QUIET)  # type: ignore[arg-type]
    trainer.fit(model, loader(0))
    saved = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(saved)  # with the callback's state
    probe = HookAtFitStart()
    strategy = RestoresAfterSetup(device=torch.device("cpu"))
    trainer = pl.Trainer(max_steps=2, callbacks=[probe], strategy=strategy, **QUIET)  # type: ignore[arg-type]
    trainer.fit(model, loader(0), ckpt_path=saved)
    with relies_on(
        "before_checkpoint_load", "a strategy restoring after setup loads the checkpoint after on_fit_start"
    ):
        assert probe.events == ["on_fit_start", "hook step1.ckpt", "load_state_dict", "on_train_start"]
    assert "load_checkpoint" not in vars(strategy)  # the wrapper is gone once it ran


def test_contrast_without_a_checkpoint_the_hook_never_runs_and_is_forgotten() -> None:
    probe = HookAtFitStart()
    strategy = RestoresAfterSetup(device=torch.device("cpu"))
    pl.Trainer(max_steps=1, callbacks=[probe], strategy=strategy, **QUIET).fit(Transferred(), loader(0))  # type: ignore[arg-type]
    assert probe.events == ["on_fit_start", "on_train_start"] and "load_checkpoint" not in vars(strategy)


@needs_regional_compile
def test_a_lightning_module_given_to_the_fit_compiled_keeps_its_compile_context() -> None:
    from lightning.pytorch.utilities.compile import from_compiled, to_uncompiled

    from lightning_bnfreeze.compile import compile_counts

    model = Transferred()
    assert not internals.lightning_compiled(model) and internals.lightning_compile_context(model) is None
    compiled = torch.compile(model, backend="eager")
    assert from_compiled(compiled) is model  # what `trainer.fit(torch.compile(model))` does first
    with relies_on("lightning_compiled", "LightningModule._compiler_ctx, set by lightning's from_compiled"):
        assert internals.lightning_compiled(model)
    with relies_on("lightning_compile_context", "LightningModule._compiler_ctx['dynamo_ctx']"):
        assert internals.lightning_compile_context(model) is compiled.dynamo_ctx
        block = nn.Linear(2, 2)
        before = compile_counts()
        internals.compile_module_with(block, internals.lightning_compile_context(model))  # type: ignore[arg-type]
        block(torch.randn(2, 2))
        assert (compile_counts() - before).graphs == 1
    to_uncompiled(model)
    assert not internals.lightning_compiled(model)


# --------------------------------------------------------------------------------------------- the seam


def _own_private_names() -> set[str]:
    """Private names the library defines itself: functions, classes, module/class attributes, ``self._x = ...``."""
    names: set[str] = set()
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            else:
                targets = []
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    names.add(target.attr)
    return {name for name in names if _is_private(name)}


def _is_private(name: str) -> bool:
    return name.startswith("_") and name.strip("_") != "" and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, own: set[str]) -> list[str]:
    """Where the module reads a private attribute of an object that is not the library's, or imports a private name.

    ``x._name`` with ``x`` other than ``self``/``cls``; ``self._name`` for a name the library does not define (an
    inherited torch/Lightning one); a string ``"_name"`` (``getattr``, ``vars()``); ``from m import _name`` or
    ``import m._private`` outside the library.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        line = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self or node.attr not in own:
                found.append(f"{line}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            if _is_private(node.value):
                found.append(f"{line}: {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("lightning_bnfreeze"):
            module = node.module or ""
            if any(_is_private(part) for part in module.split(".")) or any(_is_private(a.name) for a in node.names):
                found.append(f"{line}: from {module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if any(map(_is_private, a.name.split(".")))]
    return found


SEAM_EXCEPTIONS: dict[str, str] = {}
MODULES = sorted(str(path.relative_to(LIBRARY)) for path in LIBRARY.rglob("*.py") if path.name != "internals.py")


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=SEAM_EXCEPTIONS[name]))
        if name in SEAM_EXCEPTIONS
        else name
        for name in MODULES
    ],
)
def test_only_internals_reads_private_torch_and_lightning_attributes(module: str) -> None:
    assert private_uses(LIBRARY / module, _own_private_names()) == []


def test_the_scan_finds_private_uses(tmp_path: Path) -> None:
    """Control: each form the scan looks for, in a module written for the purpose."""
    module = tmp_path / "probe.py"
    module.write_text(
        "from torch.nn.modules.batchnorm import _BatchNorm\n"
        "import torch._dynamo\n"
        "def f(trainer, tensor, scheduler):\n"
        "    tensor._nnz()\n"
        "    getattr(scheduler, '_last_lr')\n"
        "    return trainer.fit_loop._combined_loader\n"
        "class C:\n"
        "    def g(self):\n"
        "        self._own = 1\n"
        "        return self._own, self._generate_state_key(), self.__class__\n"
    )
    found = sorted(use.partition(": ")[2] for use in private_uses(module, {"_own"}))
    assert found == sorted(
        [
            "from torch.nn.modules.batchnorm import _BatchNorm",
            "import torch._dynamo",
            "tensor._nnz",
            "'_last_lr'",
            "trainer.fit_loop._combined_loader",
            "self._generate_state_key",
        ]
    )


@pytest.mark.skipif(bool(RequirementCache(REGIONS_NEED)), reason=f"torch is new enough ({REGIONS_NEED})")
def test_regional_compile_is_refused_with_one_clear_error_before_torch_2_7() -> None:
    from lightning_bnfreeze import GradualUnfreeze

    with pytest.raises(ValueError, match=r"`compile=True` needs torch>=2.7 \(this is torch 2\.6"):
        GradualUnfreeze(compile=True)
