"""A standalone 2-process CPU DDP run of GradualUnfreeze, for ``tests/test_gradual_unfreeze_ddp.py``.

Usage: ``python tests/ddp_script.py OUT_DIR`` (Lightning re-launches it for rank 1 with the same arguments); it
imports the package of the checkout it is in, whatever is installed.
Each rank trains on its own shard of the data (Lightning's DistributedSampler), so gradients that are not
averaged make the replicas drift apart, and saves its final parameters to ``OUT_DIR/rank{rank}.pt``.

With ``GU_TEST_NO_AVERAGE=1`` in the environment, ``GradientSync.track`` is replaced by a no-op: the run
the test expects to diverge.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

SCHEDULE = {1: "backbone.3", 2: "backbone.0"}  # backbone.1 is never released


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            conv_block(3, 8), conv_block(8, 8), nn.MaxPool2d(2), conv_block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(8, 4)
        self.data_sum = 0.0  # of this rank's samples: tells the ranks' data apart

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.data_sum += x.sum().item()
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "GradualUnfreeze" in record.getMessage():
            self.lines.append(record.getMessage())


def main(out_dir: Path) -> None:
    import lightning_bnfreeze.distributed as distributed_module
    from lightning_bnfreeze import GradualUnfreeze, Schedule, norm_statistics_shift

    if os.environ.get("GU_TEST_NO_AVERAGE") == "1":
        distributed_module.GradientSync.track = lambda self, params: None  # type: ignore[method-assign]
    torch.set_num_threads(1)
    lines = Lines()
    logging.getLogger("lightning.pytorch").addHandler(lines)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=generator) * 3 + 2
    y = torch.randint(0, 4, (32,), generator=generator)
    torch.manual_seed(0)
    model = Model()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    shift_of_all_data = norm_statistics_shift(model, [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)], [x])
    callback = GradualUnfreeze(what=Schedule(SCHEDULE), lr_scale=0.5, bn="train")
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator=os.environ.get("GU_TEST_ACCELERATOR", "cpu"),  # "cuda": over NCCL (tests/test_cuda.py)
        devices=2,
        max_epochs=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
    torch.save(
        {
            "initial": initial,
            "final": {name: p.detach().cpu().clone() for name, p in model.named_parameters()},
            "groups": [group.get("name") for group in trainer.optimizers[0].param_groups],
            "data_sum": model.data_sum,
            "lines": lines.lines,
            "source_shift": (callback.source_shift, shift_of_all_data),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    if torch.distributed.is_initialized():  # gloo's threads must not outlive the group (a SIGABRT at exit)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not this script's folder
    main(Path(sys.argv[1]))
