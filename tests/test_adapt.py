"""AdaBN: re-estimating frozen norm statistics on data, in plain PyTorch and through the callbacks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.adapt import adapt_norm_statistics


def population_stats(inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Reference: per-channel mean and unbiased variance over all samples and positions."""
    flat = torch.cat(inputs).double().movedim(1, 0).flatten(1)
    return flat.mean(1), flat.var(1)


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
    bn = nn.BatchNorm2d(3)
    batches = shifted_batches([2 + rank, 1], seed=10 + rank)  # different data and batch counts per rank
    adapt_norm_statistics(bn, [bn], batches)
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "inputs": batches}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ddp_statistics_are_those_of_all_ranks_batches(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    mean, var = population_stats(ranks[0]["inputs"] + ranks[1]["inputs"])
    for state in ranks:
        torch.testing.assert_close(state["mean"], mean.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["var"], var.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0]["mean"], ranks[1]["mean"]) and torch.equal(ranks[0]["var"], ranks[1]["var"])


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


def fit(model: pl.LightningModule, callback: pl.Callback, data: DataLoader, **trainer_args: object) -> pl.Trainer:
    trainer = pl.Trainer(
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"max_epochs": 2, **trainer_args},  # type: ignore[arg-type]
    )
    trainer.fit(model, data)
    return trainer


def adapted_reference(model: Probe, batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return population_stats([model.backbone[0](x) for x in batches])


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
        BNFreezeCallback("backbone", adapt_batches=adapt_batches)
        if callback_type is BNFreezeCallback
        else GradualUnfreeze(schedule={2: "backbone.0"}, adapt_batches=adapt_batches)
    )
    batches = [batch[0] for batch in list(data)[:expected]]
    mean, var = adapted_reference(model, batches)

    fit(model, callback, data)

    bn = model.backbone[1]
    torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-5, atol=1e-5)
    assert bn.num_batches_tracked.item() == 0  # frozen afterwards: training never updated them


def test_a_module_hook_decides_how_a_batch_reaches_the_model() -> None:
    model = CustomStepProbe()
    images = torch.randn(8, 3, 4, 4) + 5
    data = DataLoader([{"image": image, "label": torch.tensor(i % 2)} for i, image in enumerate(images)], batch_size=4)

    fit(model, BNFreezeCallback("backbone", adapt_batches=2), data, max_epochs=1)

    assert len(model.seen_by_adapt) == 2
    mean, _ = adapted_reference(model, [images[:4], images[4:]])
    torch.testing.assert_close(model.backbone[1].running_mean, mean.float(), rtol=1e-5, atol=1e-5)


def test_adaptation_leaves_the_training_data_order_and_parameters_as_without_it() -> None:
    def run(adapt: int | None) -> nn.Module:
        model = Probe()
        generator = torch.Generator().manual_seed(0)
        data = DataLoader(loader(24, 4).dataset, batch_size=4, shuffle=True, generator=generator)
        pl.seed_everything(0)
        fit(model, BNFreezeCallback("backbone", adapt_batches=adapt), data, max_epochs=1)
        return model

    plain, adapted = run(None), run(3)
    assert not torch.equal(plain.backbone[1].running_mean, adapted.backbone[1].running_mean)
    assert torch.equal(plain.backbone[0].weight, adapted.backbone[0].weight)


@pytest.mark.parametrize("callback_type", [BNFreezeCallback, GradualUnfreeze])
def test_a_resumed_run_keeps_the_checkpoint_statistics(tmp_path: Path, callback_type: type) -> None:
    def callback() -> pl.Callback:
        if callback_type is BNFreezeCallback:
            return BNFreezeCallback("backbone", adapt_batches=2)
        return GradualUnfreeze(schedule={2: "backbone.0"}, adapt_batches=2)

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
def test_bad_adapt_batches_raise_at_construction(bad: object) -> None:
    for make in (lambda: BNFreezeCallback("backbone", adapt_batches=bad), lambda: GradualUnfreeze(adapt_batches=bad)):
        with pytest.raises(ValueError, match=f"`adapt_batches` .* got {bad!r}"):
            make()
