"""A small ResNet-style CNN with BatchNorm, and its pretraining on the source task (digits 0-4), cached on disk.

The network's direct children are ``stem, stage1, stage2, stage3, pool``, so
``GradualUnfreeze(backbone="backbone")`` (its blocks, found automatically) releases ``stage3``,
``stage2``, ``stage1`` and ``stem``, in that order (``pool`` has no parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from examples.digits.data import SOURCE_DIGITS, source_split

__all__ = ["DigitsResNet", "ResidualBlock", "default_cache_dir", "pretrain", "pretrained_backbone"]

_CACHE_FORMAT = 1  # bump when the architecture or the pretraining recipe changes


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with a skip connection (a 1x1 conv-BN projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Sequential):
    """``(N, 1, 8, 8)`` images to ``(N, 4 * width)`` features: a stem and three residual stages (8x8, 4x4, 2x2)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(
            OrderedDict(
                stem=nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
                stage1=ResidualBlock(width, width),
                stage2=ResidualBlock(width, 2 * width, stride=2),
                stage3=ResidualBlock(2 * width, 4 * width, stride=2),
                pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            )
        )
        self.out_features = 4 * width


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_bnfreeze`` (``~/.cache/lightning_bnfreeze`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_bnfreeze"


def pretrained_backbone(
    cache_dir: str | Path | None = None,
    width: int = 16,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> DigitsResNet:
    """A :class:`DigitsResNet` trained on the source task (digits 0-4), loaded from the cache or trained now.

    The state_dict is cached as ``digits_backbone_<hash>.pt`` in ``cache_dir`` (default:
    :func:`default_cache_dir`), the hash covering every argument but ``cache_dir``; a missing file is
    rebuilt, in a few seconds on a CPU. Training runs in a forked RNG state, so the caller's random
    numbers are the same whether the weights came from the cache or not.
    """
    recipe = dict(format=_CACHE_FORMAT, width=width, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"digits_backbone_{digest}.pt"
    backbone = DigitsResNet(width)
    if path.is_file():
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"Pretrained backbone: loaded {path}")
        return backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = time.perf_counter()
        accuracy = pretrain(backbone, epochs, lr, batch_size, seed)
    print(
        f"Pretrained backbone: trained on source digits {SOURCE_DIGITS[0]}-{SOURCE_DIGITS[-1]} in"
        f" {time.perf_counter() - start:.1f}s, source test accuracy {accuracy:.1%}; cached at {path}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
        torch.save(backbone.state_dict(), file)
    os.replace(file.name, path)  # atomic: concurrent runs never read a partial file
    return backbone


def pretrain(backbone: DigitsResNet, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """Train ``backbone`` with a temporary linear head on the source task; return the source test accuracy."""
    train_set, test_set = source_split(seed)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_features, len(SOURCE_DIGITS)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            torch.autograd.backward(F.cross_entropy(model(images), labels))
            optimizer.step()
            scheduler.step()
    model.eval()
    images, labels = test_set.tensors
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    model.train()  # as a freshly built module: Lightning keeps the modes modules are in at fit start
    return accuracy
