"""The digits transfer task: source digits 0-4, target digits 5-9 (relabelled 0-4), few labels, optional shift.

Images are scikit-learn's bundled UCI digits (``load_digits``: 1,797 grey 8x8 images, no download),
scaled to ``[0, 1]``, shifted (target only), then normalised with the SOURCE images' mean and std:
the statistics the pretrained backbone's BatchNorm layers learned. A shift of the target images thus
shows up as a shift of every BatchNorm layer's input statistics.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "SOURCE_DIGITS",
    "TARGET_DIGITS",
    "DigitsTransfer",
    "Shift",
    "apply_shift",
    "denormalise",
    "normalise",
    "source_split",
]

Shift = Literal["none", "contrast", "invert"]
"""``"contrast"``: ``0.3 * x + 0.5`` (washed out, brighter; mean and std of the input both change),
``"invert"``: ``1 - x`` (white background, dark strokes)."""

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    """All 1,797 images as ``(N, 1, 8, 8)`` floats in ``[0, 1]``, and their labels."""
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def _subset(digits: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Images of the given digits, relabelled ``0..len(digits)-1`` in that order."""
    images, labels = _digits()
    keep = torch.isin(labels, torch.tensor(digits))
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[list(digits)] = torch.arange(len(digits))
    return images[keep], relabel[labels[keep]]


@lru_cache(maxsize=1)
def _source_statistics() -> tuple[float, float]:
    images, _ = _subset(SOURCE_DIGITS)
    return images.mean().item(), images.std().item()


def normalise(images: Tensor) -> Tensor:
    """Standardise ``[0, 1]`` images with the mean and std of the source images (digits 0-4)."""
    mean, std = _source_statistics()
    return (images - mean) / std


def denormalise(images: Tensor) -> Tensor:
    """Undo :func:`normalise`: back to the ``[0, 1]`` scale of the (shifted) images."""
    mean, std = _source_statistics()
    return images * std + mean


def apply_shift(images: Tensor, shift: Shift) -> Tensor:
    """Apply a distribution shift to ``[0, 1]`` images (before normalisation)."""
    if shift == "none":
        return images
    if shift == "contrast":
        return 0.3 * images + 0.5
    if shift == "invert":
        return 1.0 - images
    raise ValueError(f"`shift` must be one of {get_args(Shift)}, got {shift!r}.")


def _per_class_split(labels: Tensor, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """Indices of ``len(sizes) + 1`` disjoint splits: ``sizes[i]`` per class each, the rest in the last one."""
    generator = torch.Generator().manual_seed(seed)
    splits: list[list[Tensor]] = [[] for _ in range(len(sizes) + 1)]
    for label in sorted(set(labels.tolist())):
        index = (labels == label).nonzero().squeeze(1)
        index = index[torch.randperm(len(index), generator=generator)]
        if sum(sizes) >= len(index):
            raise ValueError(f"class {label} has {len(index)} images, too few for splits of {sizes} per class.")
        start = 0
        for split, size in zip(splits, (*sizes, len(index)), strict=True):
            split.append(index[start : start + size])
            start += size
    return [torch.cat(split).sort().values for split in splits]


def source_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets of the source task (digits 0-4), normalised, split per class by ``seed``."""
    images, labels = _subset(SOURCE_DIGITS)
    n_test = int(test_fraction * len(labels) / len(SOURCE_DIGITS))
    test, train = _per_class_split(labels, (n_test,), seed)
    images = normalise(images)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


class DigitsTransfer(pl.LightningDataModule):
    """The target task: digits 5-9 (labels 0-4) from ``k_per_class`` labelled images per class.

    The target images are split per class, deterministically by ``seed``: ``k_per_class`` for
    training, ``val_per_class`` for validation, and all the others (about 150 per class) are the
    held-out test set. All of them get the same ``shift``, then the source normalisation.

    Args:
        k_per_class: labelled training images per class.
        shift: distribution shift of the target images: ``"none"``, ``"contrast"`` or ``"invert"``.
        val_per_class: validation images per class.
        seed: seed of the split (the rest of the run is seeded by LightningCLI's ``seed_everything``).
        batch_size: training batch size.
        eval_batch_size: validation and test batch size.
    """

    def __init__(
        self,
        k_per_class: int = 10,
        shift: Shift = "none",
        val_per_class: int = 20,
        seed: int = 0,
        batch_size: int = 10,
        eval_batch_size: int = 500,
    ) -> None:
        super().__init__()
        if shift not in get_args(Shift):
            raise ValueError(f"`shift` must be one of {get_args(Shift)}, got {shift!r}.")
        for argument, value in (("k_per_class", k_per_class), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"`{argument}` must be >= 1, got {value}.")
        self.save_hyperparameters()
        self.k_per_class = k_per_class
        self.shift: Shift = shift
        self.val_per_class = val_per_class
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        images, labels = _subset(TARGET_DIGITS)
        images = normalise(apply_shift(images, self.shift))
        train, val, test = _per_class_split(labels, (self.k_per_class, self.val_per_class), self.seed)
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.test_set is not None, "call setup() first"
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)
