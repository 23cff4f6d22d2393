"""``GradualUnfreeze(adapt="auto")``: the backbone's norm statistics move to the target's when ``bn="auto"`` decides
that released norm layers train, at that step and only then."""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import AdaBN, BNFreezeCallback, Every, GradualUnfreeze, Schedule
from lightning_bnfreeze.adapt import DEFAULT_PRIOR, adapt_norm_statistics
from lightning_bnfreeze.callbacks.adaptation import ForwardError
from lightning_bnfreeze.step_size import AUTO_STEP, SMALLEST_REFERENCE
from tests.helpers import QUIET_TRAINER_ARGS
from tests.unfreeze_helpers import FirstStepEstimates

RELEASE_EPOCH = 1
BATCHES = 3  # per epoch
DECISION_STEP = RELEASE_EPOCH * BATCHES + 1  # steps done once the release's first one is
FAST, SLOW = 0.02, 1e-4  # Adam: the released conv's first step moves it by several % (> 0.5 %: train), 0.05 %


MOMENTUM_SGD = functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=1e-4)
SGD_FAST, SGD_SLOW = 1e-2, 1e-3  # the released conv's first step: 1.7 % (> 0.5 %: train), 0.17 %


class TwoNorms(pl.LightningModule):
    """A frozen backbone: its first norm layer stays frozen, the conv and norm layer after it are released.

    ``release_lr``: the rate drops from ``lr`` to it as the release comes (a ``StepLR``).
    """

    def __init__(
        self, lr: float, optimizer: Callable[..., Optimizer] = torch.optim.Adam, release_lr: float | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(4, 2)
        self.lr = lr
        self.optimizer = optimizer
        self.release_lr = release_lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).flatten(1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters(), lr=self.lr)  # Adam: a first step of ``lr`` per weight
        if self.release_lr is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, RELEASE_EPOCH, gamma=self.release_lr / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def norms(self) -> list[nn.BatchNorm2d]:
        return [self.backbone[0], self.backbone[2]]


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(4 * BATCHES, 3, 4, 4, generator=generator) * 2 + 3  # far from the source's (0, 1)
    return DataLoader(TensorDataset(images, torch.arange(4 * BATCHES) % 2), batch_size=4)


class Expected(pl.Callback):
    """Before ``GradualUnfreeze`` in the callbacks: after the release's first step, what ``AdaBN()`` over the
    training batches makes of the statistics and weights the model has then."""

    def __init__(self) -> None:
        self.statistics: list[tuple[Tensor, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == DECISION_STEP:
            model = copy.deepcopy(pl_module)
            batches = [images for images, _ in trainer.train_dataloader]
            adapt_norm_statistics(model, model.norms(), batches, prior=DEFAULT_PRIOR)
            self.statistics = statistics(model)


class Found(pl.Callback):
    """After ``GradualUnfreeze`` in the callbacks: the statistics at the end of the release's first step."""

    def __init__(self) -> None:
        self.statistics: list[tuple[Tensor, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == DECISION_STEP:
            self.statistics = statistics(pl_module)


def unfreeze(adapt: Any = "auto", bn: str = "auto") -> GradualUnfreeze:
    release = Schedule({RELEASE_EPOCH: ["backbone.1", "backbone.2"]})
    return GradualUnfreeze(what=release, bn=bn, max_step=None, adapt=adapt)


def fit(
    model: pl.LightningModule,
    callbacks: list[pl.Callback],
    epochs: int = 2,
    ckpt_path: Path | None = None,
    **trainer_args: Any,
) -> None:
    checkpointing = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    trainer = pl.Trainer(
        callbacks=callbacks,
        **{**QUIET_TRAINER_ARGS, "max_epochs": epochs, "enable_checkpointing": checkpointing, **trainer_args},
    )
    trainer.fit(model, data(), ckpt_path=ckpt_path)


def checkpointed(tmp_path: Path, epochs: int) -> Path:
    """The last checkpoint of a default fit of ``epochs`` epochs."""
    fit(TwoNorms(lr=FAST), [unfreeze(), ModelCheckpoint(dirpath=tmp_path, save_last=True)], epochs=epochs)
    return tmp_path / "last.ckpt"


def statistics(model: TwoNorms) -> list[tuple[Tensor, Tensor]]:
    return [(n.running_mean.clone(), n.running_var.clone()) for n in model.norms()]


def test_every_backbone_norm_layer_takes_the_target_statistics_when_released_ones_start_training() -> None:
    model, expected, found = TwoNorms(lr=FAST), Expected(), Found()
    callback = unfreeze()
    source = statistics(model)

    fit(model, [expected, callback, found])

    assert callback.history[0].train_norms == (True, True)  # bn="auto" decided: the released layers train
    assert len(found.statistics) == 2
    for (mean, var), (expected_mean, expected_var), (source_mean, _) in zip(
        found.statistics, expected.statistics, source, strict=True
    ):
        assert not torch.allclose(expected_mean, source_mean)  # the data is far from the source
        torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("lr", "adapt", "bn"),
    [(SLOW, "auto", "auto"), (FAST, None, "auto"), (FAST, "auto", "train"), (FAST, "auto", "frozen")],
    ids=["frozen-decided", "adapt-None", "bn-train", "bn-frozen"],
)
def test_statistics_stay_the_source_s_unless_bn_auto_decides_norm_layers_train(lr: float, adapt: Any, bn: str) -> None:
    model, found, callback = TwoNorms(lr=lr), Found(), unfreeze(adapt, bn)
    source = statistics(model)

    fit(model, [callback, found])

    assert callback.history[0].train_norms == ((lr == FAST and bn != "frozen"),) * 2

    frozen_mean, frozen_var = found.statistics[0]  # the layer never released: frozen, so untouched unless adapted
    assert torch.equal(frozen_mean, source[0][0]) and torch.equal(frozen_var, source[0][1])


def test_a_fit_resumed_after_the_decision_does_not_adapt_again(tmp_path: Path) -> None:
    uninterrupted = TwoNorms(lr=FAST)
    fit(uninterrupted, [unfreeze()], epochs=3)

    resumed = TwoNorms(lr=FAST)
    fit(resumed, [unfreeze()], epochs=3, ckpt_path=checkpointed(tmp_path, epochs=2))

    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("bad", ["always", 1, True])
def test_a_bad_adapt_value_raises_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match=f"`adapt` must be 'auto', an AdaBN.* got {bad!r}"):
        GradualUnfreeze(adapt=bad)  # type: ignore[arg-type]


def test_adapt_auto_is_the_default_and_an_explicit_adabn_still_adapts_at_fit_start() -> None:
    assert GradualUnfreeze().adapt == "auto" and GradualUnfreeze().first_step is None
    model = TwoNorms(lr=SLOW)
    source = statistics(model)
    fit(model, [unfreeze(AdaBN(BATCHES))], epochs=1)
    assert not torch.equal(model.norms()[0].running_mean, source[0][0])


@pytest.mark.parametrize("saved_by", ["0.8", "0.7"])
def test_a_checkpoint_of_0_7_resumes_without_adapting(tmp_path: Path, saved_by: str) -> None:
    path = checkpointed(tmp_path, epochs=RELEASE_EPOCH)  # before the release
    if saved_by == "0.7":  # whose state had no such key
        saved = torch.load(path, weights_only=False)
        (state,) = (value for key, value in saved["callbacks"].items() if key.startswith("GradualUnfreeze"))
        del state["adapt_auto"]
        torch.save(saved, path)
    resumed, found = TwoNorms(lr=FAST), Found()
    source = statistics(resumed)
    fit(resumed, [unfreeze(), found], epochs=2, ckpt_path=path)

    untouched = torch.equal(found.statistics[0][0], source[0][0])
    assert untouched == (saved_by == "0.7")


def test_a_0_7_state_saved_again_before_any_fit_still_says_it_ran_without() -> None:
    assert unfreeze().state_dict()["adapt_auto"] is True
    callback = unfreeze()
    callback.load_state_dict({"unfreezer": {}, "adapted": False})  # 0.7's layout: no "adapt_auto"
    assert callback.state_dict()["adapt_auto"] is False


class WithoutForward(TwoNorms):
    """Runs its layers in ``training_step`` only: nothing runs the model on a batch."""

    forward = pl.LightningModule.forward  # type: ignore[assignment]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self.head(self.backbone(batch[0]).flatten(1)), batch[1])


def test_a_module_without_forward_keeps_the_source_statistics_and_says_so() -> None:
    model, found = WithoutForward(lr=FAST), Found()
    source = statistics(model)

    with pytest.warns(UserWarning, match="adapt='auto' .* WithoutForward defines neither `forward` nor"):
        fit(model, [unfreeze(), found])

    assert torch.equal(found.statistics[0][0], source[0][0])


class DictBatches(TwoNorms):
    """Trains on ``{"image": ..., "label": ...}`` batches; its ``forward`` takes images only, and it defines no
    ``adapt_norm_step``: nothing can run it on a batch as ``training_step`` gets it."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:  # type: ignore[override]
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])


def dict_data() -> DataLoader:
    return DataLoader([{"image": image, "label": label} for image, label in data().dataset], batch_size=4)


@pytest.mark.parametrize("max_step", ["auto", None], ids=["measured-at-fit-start", "at-the-decision"])
def test_a_model_that_cannot_run_on_a_batch_warns_once_naming_the_hook_and_keeps_its_statistics(
    max_step: str | None,
) -> None:
    """Far from the source, ``max_step="auto"`` runs the model at fit start; with ``max_step`` set, ``adapt="auto"``
    first runs it when ``bn="auto"`` decides that released norm layers train. Either way the fit goes on without
    re-estimated statistics, and one warning names the hook that would run it."""
    model, found = DictBatches(lr=FAST), Found()
    callback = GradualUnfreeze(what=Schedule({RELEASE_EPOCH: ["backbone.1", "backbone.2"]}), max_step=max_step)
    source = statistics(model)
    trainer = pl.Trainer(callbacks=[callback, found], **{**QUIET_TRAINER_ARGS, "max_epochs": 2})

    with pytest.warns(UserWarning) as warned:
        trainer.fit(model, dict_data())

    lines = [str(w.message) for w in warned if "adapt_norm_step(self, batch)" in str(w.message)]
    assert len(lines) == 1, lines
    assert "DictBatches on each training batch (a dict), and it raised" in lines[0]
    assert callback.history[0].train_norms == (True, True)  # the decision that adapts, without raising
    for (mean, var), (source_mean, source_var) in zip(found.statistics, source, strict=True):
        assert torch.equal(mean, source_mean) and torch.equal(var, source_var)


def test_an_adabn_asked_for_raises_before_the_first_step_naming_the_hook() -> None:
    model = DictBatches(lr=FAST)
    weights = [param.detach().clone() for param in model.parameters()]
    trainer = pl.Trainer(callbacks=[BNFreezeCallback(modules="backbone", adapt=AdaBN())], **QUIET_TRAINER_ARGS)

    with pytest.raises(ForwardError, match=r"AdaBN runs DictBatches on each training batch .*`adapt_norm_step"):
        trainer.fit(model, dict_data())

    assert trainer.global_step == 0
    assert all(torch.equal(param, weight) for param, weight in zip(model.parameters(), weights, strict=True))


def test_at_most_auto_batches_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_bnfreeze.callbacks.fit_state as module

    monkeypatch.setattr(module, "AUTO_BATCHES", 2)  # of the epoch's 3
    model, found = TwoNorms(lr=FAST), Found()
    fit(model, [unfreeze(), found])
    reference = TwoNorms(lr=FAST)
    first_two = [images for images, _ in list(data())[:2]]
    adapt_norm_statistics(reference, reference.norms()[:1], first_two, prior=DEFAULT_PRIOR)

    torch.testing.assert_close(found.statistics[0][0], reference.norms()[0].running_mean, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- far from the source: adapted for the head


class AtFirstStep(pl.Callback):
    """After ``GradualUnfreeze`` in the callbacks: the statistics the first training step normalises with."""

    def __init__(self) -> None:
        self.statistics: list[tuple[Tensor, Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == 0:
            self.statistics = statistics(pl_module)


def adapted_for_the_head(model: TwoNorms) -> list[tuple[Tensor, Tensor]]:
    """What ``adapt="auto"`` makes of ``model``'s statistics before the first step: AdaBN over the epoch's batches
    (fewer than ``AUTO_BATCHES``), blended with the source's."""
    model = copy.deepcopy(model)
    adapt_norm_statistics(model, model.norms(), [images for images, _ in data()], prior=DEFAULT_PRIOR)
    return statistics(model)


def far(adapt: Any = "auto", bn: str = "auto") -> GradualUnfreeze:
    """:func:`unfreeze` with ``max_step="auto"``, which measures the shift (the data is far from the source)."""
    release = Schedule({RELEASE_EPOCH: ["backbone.1", "backbone.2"]})
    return GradualUnfreeze(what=release, bn=bn, adapt=adapt)


def assert_statistics_equal(found: list[tuple[Tensor, Tensor]], expected: list[tuple[Tensor, Tensor]]) -> None:
    for (mean, var), (expected_mean, expected_var) in zip(found, expected, strict=True):
        assert torch.equal(mean, expected_mean) and torch.equal(var, expected_var)


def test_far_from_the_source_the_head_s_first_step_sees_the_target_s_statistics_and_they_are_not_adapted_again() -> (
    None
):
    model, at_start, found, callback = TwoNorms(lr=FAST), AtFirstStep(), Found(), far()
    source, expected = statistics(model), adapted_for_the_head(model)

    fit(model, [callback, at_start, found])

    assert callback.source_shift is not None and callback.source_shift >= 0.7
    assert not torch.allclose(expected[0][0], source[0][0])
    for (mean, var), (expected_mean, expected_var) in zip(at_start.statistics, expected, strict=True):
        torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-5)
    assert callback.history[0].train_norms == (True, True)
    assert callback.first_step is not None and callback.first_step > AUTO_STEP
    assert_statistics_equal(found.statistics[:1], at_start.statistics[:1])  # the frozen layer: not adapted again
    assert callback._running().source_statistics is None


def test_far_from_the_source_the_source_statistics_come_back_when_released_norm_layers_keep_frozen_ones() -> None:
    """Adam at a rate that could move the release past the line before the first step, not at the release."""
    model, at_start, found, callback = TwoNorms(FAST, release_lr=SLOW), AtFirstStep(), Found(), far()
    source = statistics(model)

    fit(model, [callback, at_start, found])

    assert not torch.equal(at_start.statistics[0][0], source[0][0])  # adapted for the head
    assert callback.history[0].train_norms == (False, False)
    assert callback.first_step is not None and SMALLEST_REFERENCE < callback.first_step < AUTO_STEP
    assert_statistics_equal(found.statistics, source)  # both layers, bitwise, from the decision on
    assert_statistics_equal(statistics(model), source)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_far_from_the_source_nothing_is_adapted_when_adam_cannot_move_a_release_past_the_line(
    optimizer: type[torch.optim.Adam], caplog: pytest.LogCaptureFixture
) -> None:
    model, at_start, found, callback = TwoNorms(SLOW, optimizer), AtFirstStep(), Found(), far()
    source = statistics(model)

    with caplog.at_level(logging.INFO):
        fit(model, [callback, at_start, found])

    assert callback.source_shift is not None and callback.source_shift >= 0.7
    assert_statistics_equal(at_start.statistics, source)  # the head fits the source's statistics
    assert callback.history[0].train_norms == (False, False)
    assert callback.first_step is not None and SMALLEST_REFERENCE < callback.first_step < AUTO_STEP
    assert_statistics_equal(found.statistics, source)
    (said,) = [r.getMessage() for r in caplog.records if "stay the source's for the head" in r.getMessage()]
    assert f"under {optimizer.__name__} no release's first step can move its weights by more than" in said


def test_far_from_the_source_adam_at_a_small_rate_with_a_large_max_lr_is_adapted() -> None:
    """The bound takes the largest rate the head's group names: a scheduler's ``max_lr`` (``OneCycleLR``)."""
    model, at_start = TwoNorms(SLOW), AtFirstStep()
    model.configure_optimizers = lambda: {  # type: ignore[method-assign]
        "optimizer": (optimizer := torch.optim.Adam(model.parameters(), lr=SLOW)),
        "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=FAST, total_steps=4 * BATCHES),
    }
    source = statistics(model)
    fit(model, [far(), at_start], epochs=1)
    assert not torch.equal(at_start.statistics[0][0], source[0][0])


@pytest.mark.parametrize(
    ("callback", "suggested"),
    [
        (GradualUnfreeze(), "`when=Every(epochs=1, first=0)`"),
        (GradualUnfreeze(when=Every(epochs=2)), "`when=Every(epochs=2, first=0)`"),
        (GradualUnfreeze(when=Every(first=0)), None),  # released from the start already
        (far(), None),  # an explicit schedule: its own times
    ],
)
def test_far_from_the_source_a_fast_first_release_after_the_head_alone_suggests_releasing_from_the_start(
    callback: GradualUnfreeze, suggested: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        fit(TwoNorms(lr=FAST), [callback], epochs=3)

    assert callback.source_shift is not None and callback.source_shift >= 0.7
    assert callback.first_step is not None and callback.first_step > AUTO_STEP
    said = [r.getMessage() for r in caplog.records if "releasing from the first step" in r.getMessage()]
    if suggested is None:
        assert said == []
    else:
        (line,) = said
        assert line.startswith(f"GradualUnfreeze: far from the source ({callback.source_shift:.2f} >= 0.7)")
        assert f"first step moved its weights by {callback.first_step:.2%} (> 0.5%)" in line
        assert suggested in line


def test_a_slow_first_release_far_from_the_source_suggests_nothing(caplog: pytest.LogCaptureFixture) -> None:
    callback = GradualUnfreeze()
    with caplog.at_level(logging.INFO):
        fit(TwoNorms(lr=SLOW), [callback], epochs=2)

    assert callback.first_step is not None and callback.first_step < AUTO_STEP
    assert not [r for r in caplog.records if "releasing from the first step" in r.getMessage()]


@pytest.mark.parametrize(("adapt", "bn"), [(None, "auto"), ("auto", "train"), ("auto", "frozen")])
def test_far_from_the_source_nothing_is_adapted_before_the_first_step_without_adapt_and_bn_auto(
    adapt: Any, bn: str
) -> None:
    model, at_start = TwoNorms(lr=FAST), AtFirstStep()
    source = statistics(model)
    fit(model, [far(adapt, bn), at_start], epochs=1)
    assert_statistics_equal(at_start.statistics, source)


def test_near_the_source_nothing_is_adapted_before_the_first_step() -> None:
    model, at_start, callback = TwoNorms(lr=FAST), AtFirstStep(), far()
    adapt_norm_statistics(model, model.norms(), [images for images, _ in data()])  # the target is the source
    source = statistics(model)
    fit(model, [callback, at_start], epochs=1)
    assert callback.source_shift is not None and callback.source_shift < 0.7
    assert_statistics_equal(at_start.statistics, source)


@pytest.mark.parametrize("keep", [True, False], ids=["resumed", "source-statistics-stripped"])
def test_a_fit_resumed_before_the_decision_brings_the_source_statistics_back_from_the_checkpoint(
    tmp_path: Path, keep: bool
) -> None:
    uninterrupted = TwoNorms(FAST, release_lr=SLOW)
    fit(uninterrupted, [far()], epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(TwoNorms(FAST, release_lr=SLOW), [far(), checkpoint], epochs=RELEASE_EPOCH)
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    (state,) = (value for key, value in saved["callbacks"].items() if key.startswith("GradualUnfreeze"))
    assert state["source_statistics"] is not None
    if not keep:  # contrast: without it the resumed fit cannot put the source's back
        state["source_statistics"] = None
        torch.save(saved, path)

    resumed = TwoNorms(FAST, release_lr=SLOW)
    fit(resumed, [far()], epochs=2, ckpt_path=path)

    same = all(torch.equal(resumed.state_dict()[name], value) for name, value in uninterrupted.state_dict().items())
    assert same == keep


# ------------------------------------------------------ far from the source under SGD: the first step's gradients


class AtSecondStep(pl.Callback):
    """After ``GradualUnfreeze`` in the callbacks, as the second step (or optimizer step ``step``) starts: the
    statistics, and the weight of the conv to be released, whether it requires grad and has a gradient."""

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.statistics: list[tuple[Tensor, Tensor]] = []
        self.weight = torch.empty(0)
        self.requires_grad = self.has_grad = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step and not self.statistics:
            weight = pl_module.backbone[1].weight
            self.statistics = statistics(pl_module)
            self.weight, self.requires_grad = weight.detach().clone(), weight.requires_grad
            self.has_grad = weight.grad is not None


@pytest.fixture
def estimates() -> Iterator[list[float]]:
    with FirstStepEstimates() as found:
        yield found


def test_far_from_the_source_under_sgd_the_source_statistics_come_back_after_the_first_step_if_it_says_frozen(
    estimates: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    model, at_start, second, found, callback = (
        TwoNorms(SGD_SLOW, MOMENTUM_SGD),
        AtFirstStep(),
        AtSecondStep(),
        Found(),
        far(),
    )
    source, weight = statistics(model), model.backbone[1].weight.detach().clone()

    with caplog.at_level(logging.INFO):
        fit(model, [callback, at_start, second, found])

    assert not torch.equal(at_start.statistics[0][0], source[0][0])  # adapted for the head's first step
    (estimate,) = estimates
    assert SMALLEST_REFERENCE < estimate < AUTO_STEP
    assert_statistics_equal(second.statistics, source)  # then the source's, bitwise, both layers
    assert torch.equal(second.weight, weight) and not second.requires_grad and not second.has_grad  # not stepped
    assert callback.history[0].train_norms == (False, False)  # as the release's own first step decides
    assert callback.first_step is not None and callback.first_step < AUTO_STEP
    assert_statistics_equal(found.statistics, source)
    (said,) = [r.getMessage() for r in caplog.records if "source's again" in r.getMessage()]
    assert (
        f"from the first step's gradients, the first release's first step would move its weights by {estimate:.2%}"
        in said
    )


def test_far_from_the_source_under_sgd_the_statistics_stay_the_target_s_if_the_first_step_says_train(
    estimates: list[float],
) -> None:
    model, at_start, second, callback = TwoNorms(SGD_FAST, MOMENTUM_SGD), AtFirstStep(), AtSecondStep(), far()

    fit(model, [callback, at_start, second])

    (estimate,) = estimates
    assert estimate > AUTO_STEP
    assert_statistics_equal(second.statistics, at_start.statistics)
    assert not second.requires_grad and not second.has_grad
    assert callback.history[0].train_norms == (True, True)
    assert callback._running().source_statistics is None


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_first_step_s_estimate_is_the_step_the_first_release_takes_from_the_same_gradients(
    estimates: list[float], accumulate: int
) -> None:
    """The same fit with the release at the first step instead: the step it takes (measured) is the estimate."""
    fit(TwoNorms(SGD_SLOW, MOMENTUM_SGD), [far()], accumulate_grad_batches=accumulate)
    released_first = GradualUnfreeze(what=Schedule({0: ["backbone.1", "backbone.2"]}))
    fit(TwoNorms(SGD_SLOW, MOMENTUM_SGD), [released_first], epochs=1, accumulate_grad_batches=accumulate)

    (estimate,) = estimates  # none when the first release comes first
    assert released_first.first_step == pytest.approx(estimate, rel=2e-4)  # measured: float32 weights' difference


def test_under_a_gradient_scaler_the_first_step_s_estimate_is_from_the_unscaled_gradients(
    estimates: list[float],
) -> None:
    fit(TwoNorms(SGD_SLOW, MOMENTUM_SGD), [far()], epochs=1)
    fit(TwoNorms(SGD_SLOW, MOMENTUM_SGD), [far()], epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    plain, scaled = estimates
    assert scaled == pytest.approx(plain, rel=0.05)  # fp16; the scaler's 65536 is divided out


class SkipsTheFirstBatch(TwoNorms):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | None:
        return None if self.global_step == 0 and batch_idx == 0 else super().training_step(batch, batch_idx)


def test_a_first_step_without_gradients_leaves_the_released_weights_frozen_and_the_statistics_adapted(
    estimates: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    model, at_start, second = SkipsTheFirstBatch(SGD_SLOW, MOMENTUM_SGD), AtFirstStep(), AtSecondStep()
    with caplog.at_level(logging.INFO):
        fit(model, [far(), at_start, second], epochs=1)
    (estimate,) = estimates
    assert estimate < SMALLEST_REFERENCE  # weight decay alone: nothing to decide from
    (said,) = [r.getMessage() for r in caplog.records if "stay the target's" in r.getMessage()]
    assert "the first step's gradients did not say; the first release's own first step decides" in said
    assert not second.requires_grad and not second.has_grad
    assert_statistics_equal(second.statistics, at_start.statistics)


class OverflowsFirst(TwoNorms):
    """Its first step's fp16 gradients overflow: a gradient scaler skips that step."""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e9 if self.global_step == 0 else loss


def test_a_first_step_a_gradient_scaler_skips_leaves_the_decision_to_the_first_one_it_takes(
    estimates: list[float],
) -> None:
    model, at_start, second, third = (
        OverflowsFirst(SGD_SLOW, MOMENTUM_SGD),
        AtFirstStep(),
        AtSecondStep(),
        AtSecondStep(2),
    )
    source, weight = statistics(model), model.backbone[1].weight.detach().clone()
    fit(model, [far(), at_start, second, third], epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])

    skipped, taken = estimates
    assert math.isnan(skipped) and SMALLEST_REFERENCE < taken < AUTO_STEP
    assert_statistics_equal(second.statistics, at_start.statistics)  # undecided after the skipped step
    assert second.requires_grad and not second.has_grad  # waiting for the next step's gradients
    assert_statistics_equal(third.statistics, source)
    assert torch.equal(third.weight, weight) and not third.requires_grad and not third.has_grad


def test_a_fit_resumed_after_a_skipped_first_step_reads_the_next_one_as_the_uninterrupted_fit(tmp_path: Path) -> None:
    """One step per epoch, the release at epoch 2: the checkpoint after the step the scaler skipped (epoch 0) keeps
    that the first release's gradients are still to be read (without it, the resumed fit keeps the adapted
    statistics, and its buffers differ)."""

    def run(callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> OverflowsFirst:
        model, late = OverflowsFirst(SGD_SLOW, MOMENTUM_SGD), Schedule({2: ["backbone.1", "backbone.2"]})
        precision = MixedPrecision("16-mixed", "cpu")
        fit(
            model,
            [GradualUnfreeze(what=late), *callbacks],
            2,
            ckpt_path,
            plugins=[precision],
            accumulate_grad_batches=BATCHES,
        )
        return model

    uninterrupted = run([])
    run([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")])
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    (state,) = (value for key, value in saved["callbacks"].items() if key.startswith("GradualUnfreeze"))
    assert state["first_step_gradients"] is True and saved["global_step"] == 1

    resumed = run([], ckpt_path=tmp_path / "epoch=0.ckpt")

    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
