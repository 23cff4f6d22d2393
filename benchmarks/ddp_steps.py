"""Step-interleaved timing of released blocks' reductions, in plain PyTorch, for ``benchmarks/ddp_phase_cost.py``.

Per strategy and phase k (1: ``layer4`` released, 2: also ``layer3``), two replicas of the same model train side by
side in the same processes, one step each in turn (the order alternating every step), so that the machine's load
hits both alike:

- ``floor``: the phase's blocks trainable when DDP wraps the model (or when ``fully_shard`` shards it);
- ``ours``: the model wrapped (sharded, and stepped once) with the backbone frozen, then the blocks released the way
  ``GradualUnfreeze`` releases them: ``requires_grad`` on, ``GradientSync.track`` (DDP) or the sharded parameters
  re-registered first (FSDP2), an SGD optimizer over head and released parameters.

The frozen rest of the backbone runs with its norm layers frozen (``KerasFreezer``), in both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import resnet18

from benchmarks.common import Classifier
from lightning_bnfreeze.distributed import GradientSync
from lightning_bnfreeze.freezer import KerasFreezer, NormFreezer
from lightning_bnfreeze.fsdp import register_sharded_parameters

BLOCKS = ("layer4", "layer3")  # released at phases 1 and 2

Step = Callable[[], None]


def _model(released: tuple[str, ...]) -> Classifier:
    torch.manual_seed(0)
    model = Classifier(resnet18)
    model.backbone.requires_grad_(False)
    for name in released:
        model.backbone.get_submodule(name).requires_grad_(True)
    return model


def _shard(model: Classifier) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        fully_shard(model.backbone.get_submodule(name), mesh=mesh)
    fully_shard(model.backbone, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    return model


def _variant(strategy: str, phase: int, ours: bool, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
    released = BLOCKS[:phase]
    model = _model(() if ours else released)
    wrapped = _shard(model) if strategy == "fsdp2" else DistributedDataParallel(model)
    sync = GradientSync(wrapped)
    freezer = KerasFreezer(NormFreezer(model))
    x, y = batch

    def step(optimizer: torch.optim.Optimizer | None) -> None:
        freezer.update()
        F.cross_entropy(wrapped(x), y).backward()
        sync.finish_backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()

    if ours:
        step(None)  # wrapped (and FSDP2's lazy initialisation done) with the backbone frozen
        model.zero_grad()
        register_sharded_parameters(model)
        params = [p for name in released for p in model.backbone.get_submodule(name).parameters()]
        for param in params:
            param.requires_grad = True
        sync.track(params)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    return lambda: step(optimizer)


def interleaved(strategy: str, steps: int, warmup: int, batch_size: int, image_size: int) -> dict[str, Any]:
    """Per phase, ``{"floor": [(wall ms, CPU ms), ...], "ours": [...]}`` (warm-up steps dropped)."""
    generator = torch.Generator().manual_seed(dist.get_rank())
    batch = (
        torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        torch.randint(0, 10, (batch_size,)),
    )
    results: dict[str, Any] = {}
    for phase in range(1, len(BLOCKS) + 1):
        variants = {"floor": _variant(strategy, phase, False, batch), "ours": _variant(strategy, phase, True, batch)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for index in range(warmup + steps):
            for name in sorted(variants, reverse=index % 2 == 1):
                dist.barrier()
                start, cpu_start = time.perf_counter_ns(), time.process_time_ns()
                variants[name]()
                if index >= warmup:
                    times[name].append(
                        ((time.perf_counter_ns() - start) / 1e6, (time.process_time_ns() - cpu_start) / 1e6)
                    )
        results[str(phase)] = times
    return results
