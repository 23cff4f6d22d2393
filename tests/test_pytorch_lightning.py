"""The callbacks under the standalone ``pytorch_lightning`` package: its Trainer and its LightningCLI."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as ptl
import torch
from pytorch_lightning.cli import LightningCLI
from torch import nn

from lightning_bnfreeze import Schedule
from lightning_bnfreeze import pytorch_lightning as bnfreeze_ptl


class TinyModule(ptl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=generator) * 3 + 2, torch.arange(32) % 2)
        return torch.utils.data.DataLoader(data, batch_size=8)


def test_pytorch_lightning_trainer_keeps_bn_frozen_and_releases() -> None:
    model = TinyModule()
    stats = model.backbone[1].running_mean.clone()
    trainer = ptl.Trainer(
        max_epochs=2,
        callbacks=[bnfreeze_ptl.GradualUnfreeze(what=Schedule({1: "backbone.3"}))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert torch.equal(model.backbone[1].running_mean, stats)
    names = [group.get("name") for group in trainer.optimizers[0].param_groups]
    assert names == ["head", "backbone.3"]


def test_pytorch_lightning_cli_accepts_the_callbacks(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 2\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_bnfreeze.pytorch_lightning.BNFreezeCallback\n"
        "      init_args: {modules: backbone.1}\n"
        "    - class_path: lightning_bnfreeze.pytorch_lightning.GradualUnfreeze\n"
        "      init_args: {what: {class_path: Schedule, init_args: {releases: {1: [backbone.0]}}}, lr_scale: 0.5}\n"
    )
    cli = LightningCLI(TinyModule, args=["fit", "--config", str(config)], save_config_callback=None)
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert bnfreeze_ptl.BNFreezeCallback in kinds and bnfreeze_ptl.GradualUnfreeze in kinds
    groups = cli.trainer.optimizers[0].param_groups
    assert groups[1]["name"] == "backbone.0"
    assert groups[1]["lr"] == 0.5 * groups[0]["lr"]
