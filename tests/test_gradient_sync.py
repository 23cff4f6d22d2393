"""``GradientSync`` reduces released parameters' gradients exactly as DDP does (2 CPU processes, gloo, plain PyTorch).

The reference is DDP itself (``find_unused_parameters=True``) with everything trainable from the start. The model is
hostile: a branch taken on one rank only, a parameter no rank uses at some steps, a sparse embedding that one rank
does not reach, micro-batches accumulated under ``no_sync()``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_bnfreeze.distributed import GradientSync

STEPS = 4


class Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6, sparse=True)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor, route: str) -> Tensor:
        h = self.embedding(tokens).mean(1) if route != "dense only" else torch.ones(len(tokens), 6)
        return self.head(self.a(h) if route == "a" else self.b(h))


def route(rank: int, step: int, micro: int) -> str:
    if rank == 1 and micro == 1 and step % 2 == 0:
        return "dense only"  # no embedding gradient on rank 1, at the synced micro-batch only
    return "a" if rank == 0 or step % 2 else "b"  # `b`: rank 1 at even steps only; at odd ones no rank uses it


def train(rank: int, model: Routed, ddp: DistributedDataParallel, sync: GradientSync | None) -> None:
    dense = [p for name, p in model.named_parameters() if not name.startswith("embedding")]
    optimizers = [torch.optim.SGD(dense, lr=0.1, momentum=0.9), torch.optim.SparseAdam([model.embedding.weight])]
    generator = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        with ddp.no_sync():
            ddp(torch.randint(0, 20, (4, 3), generator=generator), route(rank, step, 0)).sum().backward()
        loss = ddp(torch.randint(0, 20, (4, 3), generator=generator), route(rank, step, 1)).sum()
        loss.backward()
        if sync is not None:
            sync.finish_backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def worker(rank: int, port: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    initial = Routed()
    reference = copy.deepcopy(initial)
    train(rank, reference, DistributedDataParallel(reference, find_unused_parameters=True), None)

    model = copy.deepcopy(initial)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")  # DDP wraps the head only
    ddp = DistributedDataParallel(model)
    sync = GradientSync(ddp)
    released = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    for param in released:
        param.requires_grad = True
    sync.track(released)
    seen: dict[str, list[bool]] = {}
    for name, param in model.named_parameters():  # before the reduction: does this rank have a gradient?
        param.register_post_accumulate_grad_hook(
            lambda p, name=name: seen.setdefault(name, []).append(p.grad.is_sparse)
        )
    train(rank, model, ddp, sync)
    torch.save(
        {
            "initial": dict(initial.named_parameters()),
            "reference": dict(reference.named_parameters()),
            "released": dict(model.named_parameters()),
            "seen": seen,
        },
        out_dir / f"rank{rank}.pt",
    )
    dist.barrier()  # neither rank tears gloo down while the other still uses it (a SIGABRT once in CI)
    dist.destroy_process_group()


def test_released_gradients_are_reduced_as_ddp_reduces_them(tmp_path: Path, free_port: int) -> None:
    mp.spawn(worker, args=(free_port, tmp_path), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2))
    # the hostile cases happened: gradients that one rank has and the other not, a sparse one among them
    assert len(rank1["seen"]["a.weight"]) < len(rank0["seen"]["a.weight"])
    assert "b.weight" not in rank0["seen"] and rank1["seen"]["b.weight"]
    assert all(rank0["seen"]["embedding.weight"]) and len(rank1["seen"]["embedding.weight"]) < 2 * STEPS
    for name, value in rank0["released"].items():
        assert not torch.equal(value, rank0["initial"][name]), name
        assert torch.equal(value, rank0["reference"][name]), name  # bitwise as DDP itself
        assert torch.equal(value, rank1["released"][name]), name
