"""The target's shift from a backbone's norm statistics (``domain_shift``), in plain PyTorch and at fit start
(``GradualUnfreeze(max_step="auto")``)."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import AdaBN, Blocks, GradualUnfreeze
from lightning_bnfreeze.adapt import AUTO_BATCHES, adapt_norm_statistics
from lightning_bnfreeze.callbacks import fit_releases as fit_releases_module
from lightning_bnfreeze.domain_shift import NEAR_SOURCE, norm_statistics_shift
from lightning_bnfreeze.step_size import NEAR_DECAY
from tests.unfreeze_helpers import build_model, dataset, make_trainer


def gaussian_batches(mean: float, std: float, channels: int = 3, count: int = 4, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, channels, 6, 6, generator=generator) * std + mean for _ in range(count)]


def kl(mean: Tensor, var: Tensor, source_mean: Tensor, source_var: Tensor, eps: float) -> float:
    """Reference: KL(N(mean, var + eps) || N(source_mean, source_var + eps)) per channel, averaged."""
    ratio = (var + eps) / (source_var + eps)
    return float((0.5 * (ratio + (mean - source_mean) ** 2 / (source_var + eps) - 1 - ratio.log())).mean())


def test_the_shift_is_the_mean_over_layers_of_the_channels_kl_divergence_from_the_running_statistics() -> None:
    torch.manual_seed(0)
    first, second = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        second.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        second.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    model = nn.Sequential(first, nn.Conv2d(3, 3, 1), second)
    batches = gaussian_batches(2.0, 3.0)

    shift = norm_statistics_shift(model, [first, second], batches)

    data = torch.cat(batches).double()
    model.eval()
    with torch.no_grad():
        hidden = model[1](first(torch.cat(batches))).double()  # `first` in inference mode, as in the pass

    def channels(x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.movedim(1, 0).flatten(1)
        return flat.mean(1), flat.var(1, correction=0)

    expected = [
        kl(*channels(data), first.running_mean.double(), first.running_var.double(), first.eps),
        kl(*channels(hidden), second.running_mean.double(), second.running_var.double(), second.eps),
    ]
    assert shift == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert expected[0] == pytest.approx(0.5 * (9 + 4 - 1 - math.log(9)), rel=0.05)  # N(2, 9) against N(0, 1)


def test_the_shift_is_near_zero_on_the_data_the_statistics_came_from_and_grows_with_the_distance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    layers = [model[1], model[4]]
    adapt_norm_statistics(model, layers, gaussian_batches(0.0, 1.0, seed=1))
    shifts = [norm_statistics_shift(model, layers, gaussian_batches(mean, 1.0, seed=2)) for mean in (0.0, 1.0, 4.0)]
    assert shifts[0] is not None and shifts[0] < 0.01
    assert shifts == sorted(shifts) and shifts[2] > NEAR_SOURCE  # type: ignore[type-var]


def test_measuring_changes_no_statistics_modes_nor_hooks_and_without_running_statistics_says_none() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert norm_statistics_shift(model, [model[1]], gaussian_batches(2.0, 3.0)) is not None
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(module.training for module in model.modules())
    assert not model[1]._forward_pre_hooks
    assert norm_statistics_shift(model, [model[2]], gaussian_batches(2.0, 3.0)) is None
    assert norm_statistics_shift(model, [model[1]], []) is None  # no batch: nothing seen


def fit(model: nn.Module, callback: GradualUnfreeze, max_epochs: int = 1) -> None:
    make_trainer([callback], max_epochs=max_epochs).fit(model)


def near_model() -> Any:
    """The test model with its backbone's statistics set to the training data's: a target at its source."""
    model = build_model()
    layers = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    adapt_norm_statistics(model.backbone, layers, [dataset()[0]])
    return model


@pytest.mark.parametrize(("make", "resolved"), [(near_model, "released"), (build_model, None)], ids=["near", "far"])
def test_gradual_unfreeze_resolves_max_step_auto_at_fit_start_in_one_line(
    make: Any, resolved: str | None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    callback = GradualUnfreeze()
    with caplog.at_level(logging.INFO):
        fit(make(), callback)
    first_steps = callback._running().unfreezer.first_steps
    assert first_steps.max_step == resolved
    assert first_steps.source_shift is not None and (first_steps.source_shift < NEAR_SOURCE) == (resolved is not None)
    lines = [r.getMessage() for r in caplog.records if "norm statistics are" in r.getMessage()]
    assert len(lines) == 1 and f"max_step={resolved!r}" in lines[0] and f"{first_steps.source_shift:.2f}" in lines[0]


def test_the_shift_is_measured_on_the_source_statistics_before_adabn_replaces_them() -> None:
    callback = GradualUnfreeze(adapt=AdaBN(prior=0))
    fit(build_model(), callback)
    assert callback._running().unfreezer.first_steps.max_step is None  # far, as without AdaBN


def test_a_set_max_step_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(fit_releases_module, "shift_on_train_data", lambda *args: calls.append(args))
    for max_step in (None, "released", 0.01):
        callback = GradualUnfreeze(max_step=max_step)
        fit(build_model(), callback)
        assert callback._running().unfreezer.first_steps.max_step == max_step
    assert calls == []


def test_a_forward_that_cannot_take_the_batch_warns_and_runs_without_a_cap() -> None:
    model = build_model()
    model.forward = lambda x, mask: x  # type: ignore[assignment,method-assign]  # not how training_step calls it

    def training_step(batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(model.head(model.backbone(batch[0])), batch[1])

    model.training_step = training_step  # type: ignore[method-assign]
    callback = GradualUnfreeze()
    with pytest.warns(UserWarning, match=r"adapt_norm_step\(self, batch\)` .*until then max_step='auto' runs without"):
        fit(model, callback)
    assert callback._running().unfreezer.first_steps.max_step is None
    assert callback._running().on_training_norms is None  # adapt="auto" would raise: off for this fit


def test_a_lightning_module_without_forward_warns_naming_the_fix_and_runs_without_a_cap() -> None:
    class WithoutForward(type(build_model())):  # type: ignore[misc]
        forward = pl.LightningModule.forward

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

    callback = GradualUnfreeze()
    with pytest.warns(UserWarning, match="defines neither `forward` nor `adapt_norm_step"):
        fit(WithoutForward(), callback)
    assert callback._running().unfreezer.first_steps.max_step is None


@pytest.mark.parametrize(
    ("make", "chosen", "decay", "adapt"),
    [(near_model, "released", NEAR_DECAY, "auto"), (build_model, None, 1.0, AdaBN(AUTO_BATCHES))],
    ids=["near", "far"],
)
def test_a_fit_with_max_step_auto_ends_bitwise_where_one_with_its_choice_set_by_hand_ends(
    make: Any, chosen: str | None, decay: float, adapt: Any
) -> None:
    """Measuring leaves the data order and the random state alone: only the choice differs from a set value (near
    the source: the cap, and each later release decayed, here as ``Blocks(decay=...)`` sets it; their first steps
    stay within the decayed step cap here, which ``test_release_objects`` tests; far from it, with released norm
    layers training here: the statistics adapted before the first step, as ``AdaBN(AUTO_BATCHES)`` adapts them). The
    batches are shuffled and every block is released, so a draw taken, a cap missed or a decay missed would show."""

    def fitted(max_step: Any, decay: float = 1.0, adapt: Any = "auto") -> tuple[dict[str, Tensor], GradualUnfreeze]:
        model = make()
        model.train_dataloader = lambda: DataLoader(TensorDataset(model.x, model.y), batch_size=8, shuffle=True)
        torch.manual_seed(1)
        callback = GradualUnfreeze(max_step=max_step, what=Blocks(per_release=1, decay=decay), adapt=adapt)
        fit(model, callback, max_epochs=4)
        return {name: value.clone() for name, value in model.state_dict().items()}, callback

    (auto, callback), (by_hand, _) = fitted("auto"), fitted(chosen, decay, adapt)
    assert callback._running().unfreezer.first_steps.norms_train
    other, _ = fitted("released" if chosen is None else None)
    assert all(torch.equal(auto[name], by_hand[name]) for name in auto)
    assert not all(torch.equal(auto[name], other[name]) for name in auto)  # the choice matters in this fit
    factors = [record.lr_factors[0] for record in callback._running().unfreezer.history]
    assert len(factors) == 3 and factors == pytest.approx([decay**k for k in range(3)])
