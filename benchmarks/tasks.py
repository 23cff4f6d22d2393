"""The transfer benchmarks' backbones, tasks and model, from data and weights that ship inside packages.

Benches (``--bench``):

- ``real``: EfficientNet-Lite0 with its real ImageNet weights (:func:`examples.digits.imagenet.efficientnet_lite`),
  on two tasks: ``digits`` (scikit-learn's UCI digits, all ten classes, 8x8 grey images upsampled: far
  from ImageNet) and ``textures`` (32x32 crops of ten grey photographs bundled with scikit-image: which
  photograph a crop comes from; near ImageNet). Images are resized to 64x64 and normalised with the
  ImageNet statistics.
- ``lite2``: the same with EfficientNet-Lite2 (a second backbone, to which digits are even further: its shift
  measures 1.29 against Lite0's 0.89, ``benchmarks/domain_shift.md``).
- ``cnn``: the digits example's small ResNet, pretrained on digits 0-4 (cached), on digits 5-9.
- ``vit``: a small timm ``VisionTransformer`` over 2x2 patches (6 blocks, width 64), pretrained the same way.
- ``minilm``: a real pretrained transformer, all-MiniLM-L6-v2, on ``fortunes``: which of five BSD fortune files a
  text comes from (:mod:`benchmarks.text`).

The cnn and vit tasks are :class:`examples.digits.DigitsTransfer` under a shift (``none``, ``contrast``,
``invert``). Every split is per class and deterministic by seed; the training images are ``k`` per class.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["BENCHES", "TextTransferModel", "TransferModel", "make_data", "make_model"]

BENCHES = {
    "real": ("digits", "textures"),
    "lite2": ("digits", "textures"),
    "cnn": ("none", "contrast", "invert"),
    "vit": ("none", "contrast", "invert"),
    "minilm": ("fortunes",),
}
"""Each bench's tasks (for ``cnn`` and ``vit``: the shifts of the digits 5-9 task)."""
IMAGENET_BENCHES = {"real": 0, "lite2": 2}
"""The benches of ImageNet weights, and which EfficientNet-Lite each loads."""
TEXTURE_PHOTOS = ("brick", "grass", "gravel", "moon", "coins", "cell", "camera", "astronaut", "coffee", "chelsea")
TILE, CROP, IMAGE_SIZE = 64, 32, 64
VIT_CONFIG: dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=6, num_heads=4, class_token=True, global_pool="token"
)
VIT_PRETRAINING: dict[str, Any] = dict(epochs=60, lr=3e-3, batch_size=64, seed=0)

# ---------------------------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    bunch = load_digits()
    return torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.as_tensor(bunch.target)


@lru_cache(maxsize=1)
def _texture_tiles() -> tuple[Tensor, Tensor]:
    """Every 64x64 tile of the ten photographs, ``(N, 1, 64, 64)`` in ``[0, 1]``, and the photograph's index."""
    import skimage.data  # type: ignore[import-untyped]
    from skimage.color import rgb2gray  # type: ignore[import-untyped]

    tiles, labels = [], []
    for label, name in enumerate(TEXTURE_PHOTOS):
        image = getattr(skimage.data, name)()
        grey = torch.as_tensor(rgb2gray(image[..., :3]) if image.ndim == 3 else image / 255.0, dtype=torch.float32)
        rows, cols = grey.shape[0] // TILE, grey.shape[1] // TILE
        grid = grey[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE).permute(0, 2, 1, 3)
        tiles.append(grid.reshape(-1, 1, TILE, TILE))
        labels.append(torch.full((rows * cols,), label))
    return torch.cat(tiles), torch.cat(labels)


def _per_class(labels: Tensor, sizes: tuple[int, ...], generator: torch.Generator) -> list[Tensor]:
    """Indices of disjoint splits of ``sizes[i]`` per class (the last ``-1``: the rest)."""
    splits: list[list[Tensor]] = [[] for _ in sizes]
    for label in labels.unique().tolist():
        index = (labels == label).nonzero().squeeze(1)
        index = index[torch.randperm(len(index), generator=generator)]
        start = 0
        for split, size in zip(splits, sizes, strict=True):
            end = len(index) if size < 0 else start + size
            if end > len(index):
                raise ValueError(f"class {label} has {len(index)} images, too few for {sizes} per class.")
            split.append(index[start:end])
            start = end
    return [torch.cat(split) for split in splits]


def _crops(tiles: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` random ``CROP x CROP`` crops, each inside a random one of ``tiles``."""
    chosen = torch.randint(0, len(tiles), (count,), generator=generator).tolist()
    offsets = torch.randint(0, TILE - CROP + 1, (count, 2), generator=generator).tolist()
    return torch.stack([tiles[i, :, y : y + CROP, x : x + CROP] for i, (y, x) in zip(chosen, offsets, strict=True)])


def real_splits(task: str, k: int, seed: int, val: int = 10, test: int = 100) -> list[TensorDataset]:
    """Train (``k`` per class), validation and test sets of a ``real`` task; images in ``[0, 1]``.

    ``digits``: the test set is every other image (about 150 per class). ``textures``: each photograph's
    tiles are split 40/10/50 % into training, validation and test tiles, the crops (``k``, ``val`` and
    ``test`` per class) taken from those.
    """
    generator = torch.Generator().manual_seed(seed)
    if task == "digits":
        images, labels = _digits()
        return [TensorDataset(images[i], labels[i]) for i in _per_class(labels, (k, val, -1), generator)]
    tiles, labels = _texture_tiles()
    sets: list[tuple[list[Tensor], list[Tensor]]] = [([], []), ([], []), ([], [])]
    for label in range(len(TEXTURE_PHOTOS)):
        own = tiles[labels == label]
        own = own[torch.randperm(len(own), generator=generator)]
        cuts = (0, round(0.4 * len(own)), round(0.5 * len(own)), len(own))
        for (images, targets), count, start, end in zip(sets, (k, val, test), cuts[:-1], cuts[1:], strict=True):
            images.append(_crops(own[start:end], count, generator))
            targets.append(torch.full((count,), label))
    return [TensorDataset(torch.cat(images), torch.cat(targets)) for images, targets in sets]


class _Splits(pl.LightningDataModule):
    def __init__(self, splits: list[TensorDataset], batch_size: int = 10) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = splits
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.val_set, batch_size=500)

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.test_set, batch_size=500)


def text_splits(k: int, seed: int, val: int = 10, test: int = 100) -> list[TensorDataset]:
    """Train (``k`` per class), validation and test sets of the ``fortunes`` task: token ids and masks."""
    from benchmarks.text import fortunes

    tokens, labels = fortunes()
    generator = torch.Generator().manual_seed(seed)
    return [TensorDataset(tokens[i], labels[i]) for i in _per_class(labels, (k, val, test), generator)]


def make_data(bench: str, task: str, k: int, seed: int) -> pl.LightningDataModule:
    """The data module of one run."""
    if bench in IMAGENET_BENCHES:
        return _Splits(real_splits(task, k, seed))
    if bench == "minilm":
        return _Splits(text_splits(k, seed))
    from examples.digits import DigitsTransfer

    return DigitsTransfer(k_per_class=k, shift=task, seed=seed)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- backbones


def pretrained_vit() -> nn.Module:
    """The digits ViT pretrained on digits 0-4 (as the digits ResNet), cached as ``digits_vit_<hash>.pt``."""
    from timm.models.vision_transformer import VisionTransformer

    from examples.digits.backbone import default_cache_dir, pretrain

    recipe = {"format": 1, "vit": VIT_CONFIG, **VIT_PRETRAINING}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = default_cache_dir() / f"digits_vit_{digest}.pt"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                VIT_PRETRAINING["seed"]
            )  # the initialisation too: the cache must not depend on the caller
            trained = VisionTransformer(num_classes=0, **VIT_CONFIG)
            trained.out_features = trained.num_features  # what `pretrain` sizes its temporary head with
            pretrain(trained, **VIT_PRETRAINING)  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
            torch.save(trained.state_dict(), file)
        os.replace(file.name, path)
    # Built from the caller's random numbers whether the weights were cached or not: a run's stream is the same.
    vit = VisionTransformer(num_classes=0, **VIT_CONFIG)
    vit.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return vit


def make_model(
    bench: str,
    optimizer: str,
    lr: float,
    freeze: bool = False,
    layer_decay: float | None = None,
    variant: int | None = None,
) -> TransferModel:
    """The model of one run: the bench's pretrained backbone and a new linear head (an ImageNet bench: its
    EfficientNet-Lite, or Lite ``variant``)."""
    if bench in IMAGENET_BENCHES:
        from examples.digits.imagenet import efficientnet_lite

        backbone = efficientnet_lite(IMAGENET_BENCHES[bench] if variant is None else variant)
        return TransferModel(backbone, backbone.num_features, 10, optimizer, lr, freeze, layer_decay, imagenet=True)
    if bench == "minilm":
        from benchmarks.text import FORTUNE_FILES, minilm

        bert = minilm()
        return TextTransferModel(bert, bert.config.hidden_size, len(FORTUNE_FILES), optimizer, lr, freeze, layer_decay)
    if bench == "cnn":
        from examples.digits import pretrained_backbone

        backbone = pretrained_backbone()
        return TransferModel(backbone, backbone.out_features, 5, optimizer, lr, freeze, layer_decay)
    vit = pretrained_vit()
    return TransferModel(vit, vit.num_features, 5, optimizer, lr, freeze, layer_decay)


# ---------------------------------------------------------------------------------------------- model


class TransferModel(pl.LightningModule):
    """A pretrained ``backbone`` and a new linear ``head``; AdamW (weight decay 1e-4) or SGD (momentum 0.9,
    weight decay 1e-4) over the trainable parameters, cosine schedule over the epochs.

    The optimizer gets group ``"head"`` and, for the backbone's parameters trainable then, group
    ``"backbone"`` at the same rate; with ``layer_decay``, one group per block of the backbone
    (``lightning_bnfreeze.find_blocks``, a timm model's own grouping) at ``lr * layer_decay**(depth + 1)``,
    parameters with ``ndim <= 1`` without weight decay, as timm's ``param_groups_layer_decay`` does.
    With ``imagenet``, grey images are resized to 64x64, repeated to RGB and normalised with ImageNet's statistics.
    """

    def __init__(
        self,
        backbone: nn.Module,
        features: int,
        num_classes: int,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        freeze: bool = False,
        layer_decay: float | None = None,
        imagenet: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)
        self.optimizer_name, self.lr, self.layer_decay, self.imagenet = optimizer, lr, layer_decay, imagenet
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)
        if freeze:
            backbone.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        if self.imagenet:
            images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
            images = (images.expand(-1, 3, -1, -1) - self.mean) / self.std
        logits: Tensor = self.head(self.backbone(images))
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        logits = self(batch[0])
        self.log(f"{stage}_loss", F.cross_entropy(logits, batch[1]))
        self.log(f"{stage}_acc", (logits.argmax(1) == batch[1]).float().mean())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> OptimizerLRScheduler:
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self.head.parameters() if p.requires_grad], "name": "head"}
        ]
        if self.layer_decay is not None:
            groups += self._layer_decay_groups(self.layer_decay)
        elif backbone := [p for p in self.backbone.parameters() if p.requires_grad]:
            groups.append({"params": backbone, "name": "backbone"})
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=0.9, weight_decay=1e-4)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=1e-4)
        epochs = max(1, self.trainer.max_epochs or 1)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)]

    def _layer_decay_groups(self, decay: float) -> list[dict[str, Any]]:
        from lightning_bnfreeze import find_blocks

        params = dict(self.backbone.named_parameters())
        blocks = find_blocks(self.backbone)
        groups = []
        for depth, block in enumerate(reversed(blocks)):
            lr = self.lr * decay ** (depth + 1)
            for no_decay in (False, True):
                chosen = [params[name] for name in block.params if (params[name].ndim <= 1) == no_decay]
                if chosen:
                    groups.append({"params": chosen, "lr": lr, "weight_decay": 0.0 if no_decay else 1e-4})
        return groups


class TextTransferModel(TransferModel):
    """:class:`TransferModel` over text: a ``transformers`` encoder as ``backbone``, its inputs token ids and
    attention masks stacked as ``(N, 2, tokens)``, the head on the mean of the tokens' last hidden states."""

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        ids, mask = tokens.unbind(1)
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        logits: Tensor = self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
        return logits
