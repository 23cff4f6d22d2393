"""AdaBN: re-estimating frozen norm statistics on data, in plain PyTorch and through the callbacks."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import AdaBN, BNFreezeCallback, GradualUnfreeze, Schedule
from lightning_bnfreeze.adapt import DEFAULT_PRIOR, adapt_norm_statistics
from lightning_bnfreeze.callbacks.adaptation import TrainDataAdaptation


def population_stats(inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Reference: per-channel mean and unbiased variance over all samples and positions."""
    flat = torch.cat(inputs).double().movedim(1, 0).flatten(1)
    return flat.mean(1), flat.var(1)


Stats = tuple[Tensor, Tensor]


def blended(source: Stats, target: Stats, prior: float, n: int) -> Stats:
    """Reference (Schneider et al. 2020): ``prior`` source pseudo-samples weighed against ``n`` target samples."""
    (source_mean, source_var), (target_mean, target_var) = source, target
    return (prior * source_mean + n * target_mean) / (prior + n), (prior * source_var + n * target_var) / (prior + n)


def shifted_batches(sizes: list[int], channels: int = 3, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, channels, 5, 5, generator=generator) * 3 + 2 for size in sizes]


@pytest.mark.parametrize("sizes", [[4, 4, 4], [1, 1, 1, 1, 1], [7, 1, 3]], ids=["even", "batch-size-1", "ragged"])
def test_statistics_equal_the_reference_over_the_same_batches(sizes: list[int]) -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, nn.ReLU())
    batches = shifted_batches(sizes)
    count_before = bn.num_batches_tracked.clone()

    used = adapt_norm_statistics(model, [bn], batches)

    with torch.no_grad():
        mean, var = population_stats([conv(x) for x in batches])
    assert used == len(sizes)
    torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.num_batches_tracked, count_before)


def test_instance_norm_gets_the_average_of_per_instance_statistics() -> None:
    norm = nn.InstanceNorm1d(3, track_running_stats=True, affine=True)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(size, 3, 9, generator=generator) * 2 - 1 for size in (1, 4, 2)]

    adapt_norm_statistics(norm, [norm], batches)

    every = torch.cat(batches).double()
    torch.testing.assert_close(norm.running_mean, every.mean(-1).mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, every.var(-1).mean(0).float(), rtol=1e-5, atol=1e-5)


def test_downstream_layer_sees_inputs_normalised_by_the_upstream_statistics_so_far() -> None:
    torch.manual_seed(0)
    first, second = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    model = nn.Sequential(first, nn.Conv2d(3, 3, 1), second)
    batches = shifted_batches([2, 3, 2], seed=4)

    adapt_norm_statistics(model, [first, second], batches)

    # Reference: the first layer normalises each batch with the statistics of the batches so far.
    seen, second_inputs = [], []
    for x in batches:
        seen.append(x)
        mean, var = population_stats(seen)
        biased = var * (sum(t.numel() for t in seen) / 3 - 1) / (sum(t.numel() for t in seen) / 3)
        normalised = (x - mean.float().view(1, -1, 1, 1)) / (biased.float().view(1, -1, 1, 1) + first.eps).sqrt()
        with torch.no_grad():
            second_inputs.append(model[1](normalised * first.weight.view(1, -1, 1, 1) + first.bias.view(1, -1, 1, 1)))
    mean, var = population_stats(second_inputs)
    torch.testing.assert_close(second.running_mean, mean.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second.running_var, var.float(), rtol=1e-4, atol=1e-4)


def test_nothing_else_changes_and_modes_and_grad_mode_are_restored() -> None:
    torch.manual_seed(0)
    adapted, other = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    model = nn.Sequential(adapted, nn.Conv2d(3, 3, 1), other, nn.Dropout(0.5))
    model.train()
    model[3].eval()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    other_state = {k: v.clone() for k, v in other.state_dict().items()}
    modes = [m.training for m in model.modules()]

    adapt_norm_statistics(model, [adapted], shifted_batches([4, 4]))

    assert all(torch.equal(p, params[name]) and p.grad is None for name, p in model.named_parameters())
    assert all(torch.equal(v, other_state[k]) for k, v in other.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert torch.is_grad_enabled()
    assert not torch.equal(adapted.running_mean, torch.zeros(3))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn, with_prior = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    batches = shifted_batches([2 + rank, 1], seed=10 + rank)  # different data and batch counts per rank
    adapt_norm_statistics(bn, [bn], batches)
    adapt_norm_statistics(with_prior, [with_prior], batches, prior=4.0)
    state = {"mean": bn.running_mean, "var": bn.running_var, "prior_mean": with_prior.running_mean}
    torch.save({**state, "prior_var": with_prior.running_var, "inputs": batches}, f"{out}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def test_ddp_statistics_are_those_of_all_ranks_batches(tmp_path: Path, free_port: int) -> None:
    mp.spawn(_ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    mean, var = population_stats(ranks[0]["inputs"] + ranks[1]["inputs"])
    # The prior weighs against the samples of all ranks: 2 + 1 on rank 0, 3 + 1 on rank 1.
    prior_mean, prior_var = blended((torch.zeros(3).double(), torch.ones(3).double()), (mean, var), 4.0, 7)
    for state in ranks:
        torch.testing.assert_close(state["mean"], mean.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["var"], var.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["prior_mean"], prior_mean.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["prior_var"], prior_var.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0]["mean"], ranks[1]["mean"]) and torch.equal(ranks[0]["var"], ranks[1]["var"])


def with_source_statistics(layer: nn.Module, mean: list[float], var: list[float]) -> Stats:
    layer.running_mean.copy_(torch.tensor(mean))
    layer.running_var.copy_(torch.tensor(var))
    return layer.running_mean.clone().double(), layer.running_var.clone().double()


def test_prior_weighs_source_pseudo_samples_against_the_target_samples_not_positions() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    source = with_source_statistics(bn, [1.0, -2.0, 0.5], [2.0, 0.5, 1.0])
    batches = shifted_batches([3, 2])  # n = 5 samples (of 25 positions each)

    adapt_norm_statistics(bn, [bn], batches, prior=7.5)

    mean, var = blended(source, population_stats(batches), 7.5, 5)
    torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-5, atol=1e-5)


def test_prior_weighs_instances_for_instance_norm() -> None:
    norm = nn.InstanceNorm1d(2, track_running_stats=True)
    source = with_source_statistics(norm, [0.5, -1.0], [3.0, 0.25])
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(size, 2, 7, generator=generator) + 2 for size in (2, 4)]

    adapt_norm_statistics(norm, [norm], batches, prior=3.0)

    every = torch.cat(batches).double()
    mean, var = blended(source, (every.mean(-1).mean(0), every.var(-1).mean(0)), 3.0, 6)
    torch.testing.assert_close(norm.running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, var.float(), rtol=1e-5, atol=1e-5)


def test_prior_zero_gives_the_target_statistics_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    twin = copy.deepcopy(model)
    for layer in (model[0], model[2]):
        with_source_statistics(layer, [5.0, 5.0, 5.0], [9.0, 9.0, 9.0])
    batches = shifted_batches([4, 1, 2], seed=3)

    adapt_norm_statistics(model, [model[0], model[2]], batches, prior=0)
    adapt_norm_statistics(twin, [twin[0], twin[2]], batches)  # from other source statistics: they play no part

    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
    mean, var = population_stats(batches)
    torch.testing.assert_close(model[0].running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].running_var, var.float(), rtol=1e-5, atol=1e-5)


def test_a_large_prior_keeps_the_source_statistics() -> None:
    bn = nn.BatchNorm2d(3)
    source = with_source_statistics(bn, [1.0, -2.0, 0.5], [2.0, 0.5, 1.0])

    adapt_norm_statistics(bn, [bn], shifted_batches([8, 8]), prior=1e9)

    torch.testing.assert_close(bn.running_mean, source[0].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, source[1].float(), rtol=1e-6, atol=1e-6)


def test_downstream_layer_sees_inputs_normalised_with_the_blended_statistics() -> None:
    torch.manual_seed(0)
    first, second = nn.BatchNorm2d(3, affine=False), nn.BatchNorm2d(3)
    model = nn.Sequential(first, nn.Conv2d(3, 3, 1), second)
    source = with_source_statistics(first, [0.0, 1.0, -1.0], [1.0, 4.0, 0.25])
    (x,) = shifted_batches([4], seed=6)  # one batch: the first layer's statistics during the pass are its final ones

    adapt_norm_statistics(model, [first, second], [x], prior=10.0)

    positions = x.numel() // 3
    target_mean, target_var = population_stats([x])
    biased = (target_mean, target_var * (positions - 1) / positions)  # what a layer normalises a batch with
    mean, var = blended(source, biased, 10.0, 4)
    normalised = (x - mean.float().view(1, -1, 1, 1)) / (var.float().view(1, -1, 1, 1) + first.eps).sqrt()
    with torch.no_grad():
        seen = population_stats([model[1](normalised)])
    expected = blended((torch.zeros(3).double(), torch.ones(3).double()), seen, 10.0, 4)  # its own prior, too
    torch.testing.assert_close(second.running_mean, expected[0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second.running_var, expected[1].float(), rtol=1e-4, atol=1e-4)


def test_a_failing_pass_leaves_the_statistics_and_modes_as_they_were() -> None:
    bn = nn.BatchNorm2d(3)
    with_source_statistics(bn, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    calls = []

    def forward(x: Tensor) -> None:
        bn(x)
        calls.append(x)
        if len(calls) == 2:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        adapt_norm_statistics(bn, [bn], shifted_batches([2, 2, 2]), forward)

    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    assert bn.training


def test_statistics_are_accumulated_on_the_inputs_device() -> None:
    # On the meta device nothing is computed, yet sums kept on the CPU could not take the inputs.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(2), nn.InstanceNorm1d(4, track_running_stats=True)
    ).to("meta")
    layers = [model[1], model[3]]

    adapt_norm_statistics(model, layers, [torch.randn(2, 3, 5, 5, device="meta")])

    assert all(layer.running_mean.is_meta and layer.running_var.is_meta for layer in layers)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: skipped AdaBN on CUDA")
def test_a_cuda_model_is_adapted_on_its_device() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).cuda()
    batches = shifted_batches([4, 3])

    adapt_norm_statistics(model, [model[1]], [x.cuda() for x in batches], prior=2.0)

    with torch.no_grad():
        target = population_stats([model[0](x.cuda()).cpu() for x in batches])
    mean, var = blended((torch.zeros(3).double(), torch.ones(3).double()), target, 2.0, 7)
    assert model[1].running_mean.is_cuda
    torch.testing.assert_close(model[1].running_mean.cpu(), mean.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var.cpu(), var.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "16"])
def test_bad_priors_raise(bad: object) -> None:
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=f"`prior` must be .* got {bad!r}"):
        adapt_norm_statistics(bn, [bn], shifted_batches([2]), prior=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`prior` must be .* got {bad!r}"):
        AdaBN(1, prior=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- callbacks


class Probe(pl.LightningModule):
    """Frozen conv+BN backbone and a linear head; records each training step's input."""

    def __init__(self, custom_step: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4, 2)
        self.backbone.requires_grad_(False)
        self.custom_step = custom_step
        self.seen_by_adapt: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).flatten(1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


class CustomStepProbe(Probe):
    def adapt_norm_step(self, batch: dict[str, Tensor]) -> None:
        self.seen_by_adapt.append(batch["image"])
        self(batch["image"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:  # type: ignore[override]
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])


def loader(size: int, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(size, 3, 4, 4, generator=generator) * 2 + 3
    return DataLoader(TensorDataset(images, torch.arange(size) % 2), batch_size=batch_size)


def fit(
    model: pl.LightningModule, callback: pl.Callback | list[pl.Callback], data: Any, **trainer_args: object
) -> pl.Trainer:
    trainer = pl.Trainer(
        callbacks=callback if isinstance(callback, list) else [callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"max_epochs": 2, **trainer_args},  # type: ignore[arg-type]
    )
    trainer.fit(model, data)
    return trainer


def adapted_reference(model: Probe, batches: list[Tensor], prior: float = DEFAULT_PRIOR) -> Stats:
    """The backbone BN's statistics after adapting on ``batches``: theirs blended with the model's now."""
    bn = model.backbone[1]
    with torch.no_grad():
        target = population_stats([model.backbone[0](x) for x in batches])
    source = (bn.running_mean.double(), bn.running_var.double())
    return blended(source, target, prior, sum(len(x) for x in batches))


@pytest.mark.parametrize(
    ("adapt_batches", "batch_size", "expected"),
    [(3, 4, 3), (100, 4, 5), (0.5, 4, 3), (1.0, 1, 20), (2, 1, 2)],
    ids=["3-batches", "more-than-the-epoch", "half-epoch", "whole-epoch-batch-size-1", "batch-size-1"],
)
@pytest.mark.parametrize("callback_type", [BNFreezeCallback, GradualUnfreeze])
def test_callbacks_adapt_on_the_first_training_batches_then_keep_statistics_frozen(
    callback_type: type, adapt_batches: int | float, batch_size: int, expected: int
) -> None:
    model = Probe()
    data = loader(20, batch_size)
    callback = (
        BNFreezeCallback("backbone", adapt=AdaBN(adapt_batches))
        if callback_type is BNFreezeCallback
        else GradualUnfreeze(what=Schedule({2: "backbone.0"}), adapt=AdaBN(adapt_batches))
    )
    batches = [batch[0] for batch in list(data)[:expected]]
    mean, var = adapted_reference(model, batches)

    fit(model, callback, data)

    bn = model.backbone[1]
    torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-5, atol=1e-5)
    assert bn.num_batches_tracked.item() == 0  # frozen afterwards: training never updated them


@pytest.mark.parametrize("prior", [0.0, 5.0])
@pytest.mark.parametrize("callback_type", [BNFreezeCallback, GradualUnfreeze])
def test_callbacks_blend_with_their_adapt_prior(callback_type: type, prior: float) -> None:
    model, data = Probe(), loader(20, 4)
    callback = (
        BNFreezeCallback("backbone", adapt=AdaBN(2, prior=prior))
        if callback_type is BNFreezeCallback
        else GradualUnfreeze(what=Schedule({2: "backbone.0"}), adapt=AdaBN(2, prior=prior))
    )
    mean, var = adapted_reference(model, [batch[0] for batch in list(data)[:2]], prior)
    default_mean, _ = adapted_reference(model, [batch[0] for batch in list(data)[:2]])
    assert not torch.allclose(mean, default_mean)  # the prior given, not the default, decides

    fit(model, callback, data)

    torch.testing.assert_close(model.backbone[1].running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.backbone[1].running_var, var.float(), rtol=1e-5, atol=1e-5)


def test_a_module_hook_decides_how_a_batch_reaches_the_model() -> None:
    model = CustomStepProbe()
    images = torch.randn(8, 3, 4, 4) + 5
    data = DataLoader([{"image": image, "label": torch.tensor(i % 2)} for i, image in enumerate(images)], batch_size=4)
    mean, _ = adapted_reference(model, [images[:4], images[4:]])

    fit(model, BNFreezeCallback("backbone", adapt=AdaBN(2)), data, max_epochs=1)

    assert len(model.seen_by_adapt) == 2
    torch.testing.assert_close(model.backbone[1].running_mean, mean.float(), rtol=1e-5, atol=1e-5)


def test_adaptation_leaves_the_training_data_order_and_parameters_as_without_it() -> None:
    def run(adapt: int | None) -> nn.Module:
        model = Probe()
        generator = torch.Generator().manual_seed(0)
        data = DataLoader(loader(24, 4).dataset, batch_size=4, shuffle=True, generator=generator)
        pl.seed_everything(0)
        fit(model, BNFreezeCallback("backbone", adapt=None if adapt is None else AdaBN(adapt)), data, max_epochs=1)
        return model

    plain, adapted = run(None), run(3)
    assert not torch.equal(plain.backbone[1].running_mean, adapted.backbone[1].running_mean)
    assert torch.equal(plain.backbone[0].weight, adapted.backbone[0].weight)


@pytest.mark.parametrize("callback_type", [BNFreezeCallback, GradualUnfreeze])
def test_a_resumed_run_keeps_the_checkpoint_statistics(tmp_path: Path, callback_type: type) -> None:
    def callback() -> pl.Callback:
        if callback_type is BNFreezeCallback:
            return BNFreezeCallback("backbone", adapt=AdaBN(2))
        return GradualUnfreeze(what=Schedule({2: "backbone.0"}), adapt=AdaBN(2))

    first = Probe()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback(), checkpoint], logger=False, enable_progress_bar=False)
    trainer.fit(first, loader(12, 4))
    saved = first.backbone[1].running_mean.clone()

    resumed = Probe()
    resumed.backbone[1].running_mean.fill_(100.0)  # would show if the resumed run re-estimated
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback()], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    other_data = loader(12, 4)
    other_data.dataset.tensors[0].mul_(-1)  # different data: re-estimation would change the statistics
    trainer.fit(resumed, other_data, ckpt_path=str(tmp_path / "last.ckpt"))

    assert torch.equal(resumed.backbone[1].running_mean, saved)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0, True, "all"])
def test_bad_adapt_arguments_raise_at_construction(bad: object) -> None:
    with pytest.raises(ValueError, match=f"`batches` .* got {bad!r}"):
        AdaBN(bad)  # type: ignore[arg-type]
    for make in (lambda: BNFreezeCallback("backbone", adapt=bad), lambda: GradualUnfreeze(adapt=bad)):
        with pytest.raises(ValueError, match=f"`adapt` must be .*AdaBN.* got {bad!r}"):
            make()  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_batches_pass_through_the_precision_plugin(precision: str) -> None:
    model = Probe()
    data = loader(16, 4)
    mean, var = adapted_reference(model, [batch[0] for batch in list(data)[:2]])  # in float32

    fit(model, BNFreezeCallback("backbone", adapt=AdaBN(2)), data, max_epochs=1, precision=precision)

    bn = model.backbone[1]
    torch.testing.assert_close(bn.running_mean.float(), mean.float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(bn.running_var.float(), var.float(), rtol=0.05, atol=0.05)


class TwoLoaderProbe(Probe):
    """Trains on the batches of a list or dict of dataloaders."""

    @staticmethod
    def pairs(batch: Any) -> list[list[Tensor]]:
        return list(batch.values() if isinstance(batch, dict) else batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return sum(nn.functional.cross_entropy(self(x), y) for x, y in self.pairs(batch))  # type: ignore[return-value]


class TwoLoaderProbeWithHook(TwoLoaderProbe):
    def adapt_norm_step(self, batch: Any) -> None:
        for x, _ in self.pairs(batch):
            self.seen_by_adapt.append(x)
            self(x)


def two_loaders(container: str) -> tuple[Any, list[Tensor]]:
    """Loaders of 3 and 2 batches, and the images ``training_step`` gets over one epoch."""
    negative = TensorDataset(-torch.arange(384.0).view(8, 3, 4, 4) / 99, torch.arange(8) % 2)
    first, second = loader(12, 4), DataLoader(negative, batch_size=4)
    a, b = ([batch[0] for batch in data] for data in (first, second))
    if container == "list":
        return [first, second], a + b + b[:1]  # Lightning's default mode, "max_size_cycle", cycles the shorter one
    if container == "dict":
        return {"a": first, "b": second}, a + b + b[:1]
    return CombinedLoader({"a": first, "b": second}, mode="min_size"), a[:2] + b


@pytest.mark.parametrize("container", ["list", "dict", "combined-min-size"])
def test_several_training_dataloaders_reach_the_model_through_the_hook(container: str) -> None:
    model = TwoLoaderProbeWithHook()
    data, images = two_loaders(container)
    mean, var = adapted_reference(model, images)

    fit(model, BNFreezeCallback("backbone", adapt=AdaBN(1.0)), data, max_epochs=1)

    assert len(model.seen_by_adapt) == len(images)
    torch.testing.assert_close(model.backbone[1].running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.backbone[1].running_var, var.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("container", "name"), [("list", "list"), ("dict", "dict"), ("combined-min-size", "dict")])
def test_several_training_dataloaders_without_the_hook_raise_before_training(container: str, name: str) -> None:
    model = TwoLoaderProbe()
    head = model.head.weight.detach().clone()

    with pytest.raises(TypeError, match=rf"several training dataloaders \(a {name}\).*`adapt_norm_step\(batch\)`"):
        fit(model, BNFreezeCallback("backbone", adapt=AdaBN(1)), two_loaders(container)[0], max_epochs=1)

    assert torch.equal(model.head.weight, head)


class CountingProbe(Probe):
    def adapt_norm_step(self, batch: list[Tensor]) -> None:
        self.seen_by_adapt.append(batch[0])
        self(batch[0])


class Adapting(pl.Callback):
    """Adapts the backbone's BN through `TrainDataAdaptation`, as the library's callbacks do."""

    def __init__(self, batches: int | float | None, prior: float, again_at_epoch: int | None = None) -> None:
        self.adaptation = TrainDataAdaptation(None if batches is None else AdaBN(batches, prior), "Adapting")
        self.again_at_epoch = again_at_epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.adaptation.reset()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _ in range(2):
            self.adaptation.run_once(trainer, pl_module, [pl_module.backbone[1]])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.again_at_epoch:
            self.adaptation.run(trainer, pl_module, [pl_module.backbone[1]])


def test_train_data_adaptation_runs_once_per_fit_with_its_prior() -> None:
    model, data = CountingProbe(), loader(20, 4)
    mean, var = adapted_reference(model, [batch[0] for batch in list(data)[:2]], prior=6.0)
    adapting = Adapting(2, prior=6.0)

    fit(model, [BNFreezeCallback("backbone"), adapting], data)

    assert len(model.seen_by_adapt) == 2 and adapting.adaptation.done
    torch.testing.assert_close(model.backbone[1].running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.backbone[1].running_var, var.float(), rtol=1e-5, atol=1e-5)


def test_train_data_adaptation_run_adapts_again_and_does_nothing_without_batches() -> None:
    model = CountingProbe()
    fit(model, [BNFreezeCallback("backbone"), Adapting(2, prior=0.0, again_at_epoch=1)], loader(20, 4))
    assert len(model.seen_by_adapt) == 4

    model, off = CountingProbe(), Adapting(None, prior=0.0, again_at_epoch=1)
    fit(model, [BNFreezeCallback("backbone"), off], loader(20, 4))
    assert model.seen_by_adapt == [] and not off.adaptation.done


def test_train_data_adaptation_state_round_trips() -> None:
    done, fresh = TrainDataAdaptation(AdaBN(1), "a"), TrainDataAdaptation(AdaBN(1), "b")
    done.done = True
    fresh.load_state_dict({"released": [], **done.state_dict()})
    assert fresh.done
    fresh.load_state_dict({})  # a checkpoint from before adaptation existed
    assert not fresh.done
    fresh.done = True
    fresh.reset()
    assert not fresh.done
