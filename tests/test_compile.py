"""GradualUnfreeze under ``torch.compile``: the release units compiled as regions (``compile=True``) go through a full
default schedule without a whole-model recompile per release, within the recompile limit (no eager fall-back), and end
with the eager run's parameters; a compiled run resumes exactly; frozen norm statistics stay bitwise unchanged. A model
compiled as a whole without the flag never falls back to eager either. Dynamo's counters tell graphs and fall-backs.

The Inductor runs share one module-scoped fixture per device (about 30 s on one CPU core, most of it compiling the
Inductor graphs once); the rest compiles with the ``"eager"`` backend (Dynamo's guards, no code generation).
``python -m pytest -m cuda -q -rs`` runs the CUDA case (see ``tests/test_cuda.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import Blocks, GradualUnfreeze
from lightning_bnfreeze.adapt import adapt_norm_statistics
from lightning_bnfreeze.blocks import forward_order
from lightning_bnfreeze.callbacks import compiling
from lightning_bnfreeze.compile import (
    MARGIN,
    compile_blocks,
    compile_counts,
    recompile_budget,
    release_units,
    whole_model_budget,
)
from lightning_bnfreeze.internals import compiled_call, compiled_original, recompile_limits, set_recompile_limits
from lightning_bnfreeze.step_size import AUTO_STEP, SMALLEST_REFERENCE
from tests.unfreeze_helpers import FirstStepEstimates

pytestmark = pytest.mark.skipif(
    not RequirementCache(compiling.REGIONS_NEED), reason=f"regional compilation needs {compiling.REGIONS_NEED}"
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EPOCHS = 4  # the default schedule of 5 blocks: blocks.3+2 at epoch 1, blocks.1+0 at 2, the stem at 3
STOP = 2

pytestmark = [
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"),
    pytest.mark.filterwarnings("ignore:.*is compiled as a whole.*"),
    pytest.mark.filterwarnings("ignore:GradualUnfreeze. release epoch.* are at or past `max_epochs"),
]


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Block(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))


class Model(pl.LightningModule):
    def __init__(self, wrap: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = Backbone()
        self.head = nn.Linear(8, 4)
        self.wrap = wrap

    def configure_model(self) -> None:  # the user's torch.compile inside configure_model
        if self.wrap == "torch.compile":
            self.backbone = torch.compile(self.backbone, backend="eager")  # type: ignore[assignment]
        elif self.wrap == "in place":
            self.backbone.compile(backend="eager")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (16,), generator=generator)), batch_size=8)


def quiet_trainer(max_epochs: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        **kwargs,
    )


class Probe(Callback):
    """Per training epoch, the graphs compiled and the norm layers frozen at its end (their parameters do not require
    grad); whether any layer frozen during a training step changed its statistics in that step's forward and
    backward (``adapt="auto"`` re-estimates them once, after a step)."""

    def __init__(self) -> None:
        self.graphs: list[int] = []
        self.frozen_checked: list[set[str]] = []
        self.changed: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.counts = compile_counts()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.before = {name: b.clone() for name, b in pl_module.named_buffers()}

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for buffer in self.frozen_buffers(pl_module):
            if not torch.equal(pl_module.get_buffer(buffer), self.before[buffer]):
                self.changed.append(f"step {trainer.global_step}: {buffer}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = compile_counts()
        self.graphs.append((counts - self.counts).graphs)
        self.counts = counts
        self.frozen_checked.append({buffer.rpartition(".")[0] for buffer in self.frozen_buffers(pl_module)})

    @staticmethod
    def frozen_buffers(pl_module: pl.LightningModule) -> list[str]:
        return [
            buffer
            for name, layer in pl_module.named_modules()
            if isinstance(layer, nn.BatchNorm2d) and not layer.weight.requires_grad
            for buffer, _ in layer.named_buffers(prefix=name)
        ]


def fit(
    device: str,
    compiled: bool,
    epochs: int = EPOCHS,
    ckpt_path: Path | None = None,
    save: Path | None = None,
    **callback_kwargs: Any,
) -> dict[str, Any]:
    model = Model().to(device)
    callback = GradualUnfreeze(compile=compiled, **callback_kwargs)
    probe = Probe()
    trainer = quiet_trainer(epochs, [callback, probe], accelerator=device, devices=1)
    before = compile_counts()
    trainer.fit(torch.compile(model) if compiled else model, loader(), loader(), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return {
        "model": model,
        "callback": callback,
        "probe": probe,
        "counts": compile_counts() - before,
        "final": {name: p.detach().cpu().clone() for name, p in model.named_parameters()},
    }


@pytest.fixture(scope="module", params=DEVICES)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    device = request.param  # "cuda" without a GPU: skipped before this fixture (tests/conftest.py)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # CUDA: eager convolutions as exact as the compiled ones
    checkpoint = tmp_path_factory.mktemp("compile") / "stopped.ckpt"
    limits = recompile_limits()
    try:
        yield {
            "eager": fit(device, compiled=False),
            "compiled": fit(device, compiled=True),
            "limits_after": recompile_limits(),
            "limits_before": limits,
            "stopped": fit(device, compiled=True, epochs=STOP, save=checkpoint),
            "resumed": fit(device, compiled=True, ckpt_path=checkpoint),
        }
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_a_compiled_fit_releases_every_block_within_the_recompile_limit_and_ends_as_the_eager_run(
    runs: dict[str, Any],
) -> None:
    eager, compiled = runs["eager"], runs["compiled"]
    model, history = compiled["model"], compiled["callback"].history
    assert [record.epoch for record in history] == [1, 2, 3] == [record.epoch for record in eager["callback"].history]
    assert all(p.requires_grad for p in model.parameters())  # every block released
    # the regions, compiled in place: the LightningModule's steps are eager again, names unchanged
    assert model._compiler_ctx is None
    assert all(compiled_call(module) is not None for module in (model.backbone.stem, *model.backbone.blocks))
    assert compiled_call(model.backbone) is None and compiled_call(model) is None
    assert set(compiled["final"]) == set(eager["final"])
    # no eager fall-back; no whole-model recompile per release: the second release reuses the first one's graphs
    counts, graphs = compiled["counts"], compiled["probe"].graphs
    assert counts.limit_hits == 0 and counts.graphs > 0
    assert graphs[2] == 0, graphs  # blocks.1 and blocks.0 take the states blocks.3 and blocks.2 took at epoch 1
    assert counts.graphs <= recompile_budget([model.backbone.stem, *model.backbone.blocks]) - MARGIN
    # Dynamo's limit raised for the fit only
    assert runs["limits_after"] == runs["limits_before"]
    assert max_difference(compiled["final"], eager["final"]) < 1e-4


def test_a_compiled_run_resumes_exactly(runs: dict[str, Any]) -> None:
    stopped, resumed, uninterrupted = runs["stopped"], runs["resumed"], runs["compiled"]
    assert [record.epoch for record in stopped["callback"].history] == [1]
    assert resumed["callback"].history == uninterrupted["callback"].history
    assert resumed["counts"].limit_hits == 0
    assert max_difference(resumed["final"], uninterrupted["final"]) == 0.0


def test_frozen_norm_statistics_stay_bitwise_unchanged_under_compile(runs: dict[str, Any]) -> None:
    for run in ("compiled", "stopped", "resumed"):
        probe = runs[run]["probe"]
        assert probe.changed == [], run
    checked = runs["compiled"]["probe"].frozen_checked
    assert checked[0] == {"backbone.stem.bn", *(f"backbone.blocks.{i}.bn" for i in range(4))}
    assert checked[2] == {"backbone.stem.bn"}  # frozen for three epochs of compiled steps and validations


# ------------------------------------------------------------------------------- whole-model compile, no flag


def whole_model_fit(budget_off: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str], tuple[int, int]]:
    """A fit of 5 releases of a model compiled as a whole, under a recompile limit of 3 per code object (below what
    its releases need; Dynamo's default, 8, is not, on a model this small): its compile counts, its warnings about
    the whole-model compile, and the recompile limits it left."""
    torch.compiler.reset()  # fresh caches: the count of entries per code object starts at zero
    limits = recompile_limits()
    set_recompile_limits(3, limits[1])
    if budget_off:
        monkeypatch.setattr(compiling, "whole_model_budget", lambda releases: 0)
    model = Model()
    callback = GradualUnfreeze(what=Blocks(per_release=1, granularity="block"))
    trainer = quiet_trainer(7, [callback])
    before = compile_counts()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(torch.compile(model, backend="eager"), loader(), loader())
        left = recompile_limits()
    finally:
        set_recompile_limits(*limits)
    messages = [str(w.message) for w in caught if "compiled as a whole" in str(w.message)]
    return compile_counts() - before, messages, left


def test_a_model_compiled_as_a_whole_gets_the_recompile_limit_its_releases_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts, messages, left = whole_model_fit(budget_off=False, monkeypatch=monkeypatch)
    assert counts.limit_hits == 0 and counts.graphs > 2 * 5  # a train and a validation graph per release at least
    assert len(messages) == 1
    assert "(trainer.fit(torch.compile(model))), so each of the 5 releases recompiles it" in messages[0]
    assert f"raised to {whole_model_budget(5)} for this fit" in messages[0]
    assert "GradualUnfreeze(compile=True)" in messages[0]
    assert left == (3, recompile_limits()[1])  # the fit's limit put back at its end
    # contrast: at the limit it started with, the same fit falls back to eager
    counts, _, _ = whole_model_fit(budget_off=True, monkeypatch=monkeypatch)
    assert counts.limit_hits > 0


@pytest.mark.parametrize("wrap", ["torch.compile", "in place"])
def test_a_compile_around_the_backbone_in_configure_model_is_replaced_by_regions(wrap: str) -> None:
    model = Model(wrap)
    names = [name for name, _ in model.named_parameters()]
    callback = GradualUnfreeze(what=Blocks(per_release=1, granularity="block"), compile={"backend": "eager"})
    trainer = quiet_trainer(2, [callback])
    before = compile_counts()
    trainer.fit(model, loader(), loader())
    assert (compile_counts() - before).limit_hits == 0
    assert [name for name, _ in model.named_parameters()] == names  # no `_orig_mod.`
    assert compiled_original(model.backbone) is None and compiled_call(model.backbone) is None
    assert all(compiled_call(block) is not None for block in model.backbone.blocks)
    assert [record.epoch for record in callback.history] == [1]


def test_the_forward_order_check_and_adabn_compile_no_graph() -> None:
    model = Model()
    model.forward = torch.compile(model.forward, backend="eager")  # type: ignore[method-assign]  # as from_compiled
    compile_blocks(model, ["backbone.blocks.*"], backend="eager").restore()
    x = torch.randn(2, 3, 8, 8)
    before = compile_counts()
    order = forward_order(model, x)
    adapt_norm_statistics(model, [model.backbone.blocks[0].bn], [x])
    assert (compile_counts() - before).graphs == 0
    assert order.index("backbone.stem") < order.index("backbone.blocks.0") < order.index("head")
    model(x)  # control: the model itself is compiled
    assert (compile_counts() - before).graphs > 0


# ------------------------------------------------------------ far from the source under SGD: the first step's probe


class SlowSGD(Model):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=2e-4, momentum=0.9)


def far_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=generator) * 4 + 6  # far from the source: adapted for the head
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (16,), generator=generator)), batch_size=8)


@pytest.mark.parametrize("how", ["regions", "whole model"])
def test_the_first_step_s_gradients_for_the_first_release_are_read_as_in_the_eager_run_when_compiled(how: str) -> None:
    """Far from the source under SGD, the first release's weights get gradients in the first step only: the
    compiled fit reads the eager one's estimate, puts the source's statistics back, never falls back to eager."""
    finals, counts = [], []
    with FirstStepEstimates() as estimates:
        for compiled in (False, True):
            model, source = SlowSGD(), SlowSGD().backbone.stem.bn.running_mean.clone()
            callback = GradualUnfreeze(compile={"backend": "eager"} if compiled and how == "regions" else False)
            torch.compiler.reset()  # fresh caches: this fit's graphs are compiled, not found
            before = compile_counts()
            wrapped = torch.compile(model, backend="eager") if compiled and how == "whole model" else model
            quiet_trainer(2, [callback]).fit(wrapped, far_loader(), far_loader())
            counts.append(compile_counts() - before)
            finals.append({name: p.detach().clone() for name, p in model.named_parameters()})
            assert torch.equal(model.backbone.stem.bn.running_mean, source)  # never released: the source's again
    eager, compiled_estimate = estimates
    assert SMALLEST_REFERENCE < eager < AUTO_STEP
    assert compiled_estimate == pytest.approx(eager, rel=1e-6)
    assert counts[1].graphs > 0 and counts[1].limit_hits == 0
    assert max_difference(finals[1], finals[0]) < 1e-5


# ----------------------------------------------------------------------------------------- compile_blocks


def test_compile_blocks_compiles_in_place_and_raises_the_limit_until_restored() -> None:
    model = Model()
    names = [name for name, _ in model.named_parameters()]
    limits = recompile_limits()
    with compile_blocks(model, ["backbone.blocks.*", "backbone.stem"], mode="default") as compiled:
        assert compiled.names == [*(f"backbone.blocks.{i}" for i in range(4)), "backbone.stem"]
        assert recompile_limits()[0] == max(limits[0], recompile_budget(compiled.modules))
    assert recompile_limits() == limits
    assert [name for name, _ in model.named_parameters()] == names
    assert all(compiled_call(m) is not None for m in compiled.modules)
    # a listed module that holds another listed one runs eagerly around its regions
    other = Model()
    assert compile_blocks(other, [other.backbone, "backbone.blocks.0"], raise_limit=False).names == [
        "backbone.blocks.0"
    ]
    assert compiled_call(other.backbone) is None
    with pytest.raises(ValueError, match=r"`blocks` holds the name 'backbone.block', .* 'backbone.blocks'"):
        compile_blocks(model, ["backbone.block"])


def test_the_recompile_budget_grows_with_the_shapes_sharing_a_forward_not_with_the_blocks() -> None:
    identical = recompile_budget([Block() for _ in range(12)])
    assert identical == recompile_budget([Block()]) > 8  # Dynamo's default limit: too low for one block's states
    stages = recompile_budget([Block(channels) for channels in (16, 32, 64) for _ in range(4)])
    assert stages - MARGIN == 3 * (identical - MARGIN)
    assert recompile_budget([Block(), Stem()]) == identical  # two classes, two code objects


def test_release_units_are_the_modules_of_the_plan_in_release_order() -> None:
    model = Model()
    plan = GradualUnfreeze().plan(model)
    assert release_units(model, plan) == [*(f"backbone.blocks.{i}" for i in (3, 2, 1, 0)), "backbone.stem"]


@pytest.mark.parametrize("bad", ["yes", 1, ["mode"], {1: 2}])
def test_a_bad_compile_option_raises(bad: object) -> None:
    with pytest.raises(ValueError, match=r"`compile` must be True, False or a dict"):
        GradualUnfreeze(compile=bad)  # type: ignore[arg-type]
