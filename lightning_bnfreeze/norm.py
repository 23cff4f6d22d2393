"""Find norm layers and keep them in inference mode, in plain PyTorch.

A frozen norm layer is the same module object with the same attributes, parameters and buffers;
only its ``train`` method is shadowed by an instance attribute that keeps ``training=False``. As
``nn.Module.train`` recurses by calling ``child.train(mode)``, every ``.train()`` on any ancestor
(Lightning, user hooks, ``LightningModule.unfreeze()``, DDP, ``torch.compile`` wrappers) leaves the
layer in inference mode, at no cost per forward pass; its ``reset_running_stats`` is shadowed too,
so that a reset-and-re-estimate pass (``torch.optim.swa_utils.update_bn``) leaves its statistics
alone. Several holders (for example two callbacks) may freeze the same layer; it is released when
the last one lets go.

A copy of a frozen layer (``copy.deepcopy``, pickle, hence of any model holding one: an EMA copy,
``torch.save(model)``) is a plain layer, in the mode its last ``.train(mode)`` call asked for: an
instance ``__getstate__`` leaves the shadowing attributes, and with them the holders, out of it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any, TypeGuard

from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_bnfreeze.internals import BatchNormBase, InstanceNormBase, NormBase

__all__ = [
    "NormLayer",
    "freeze_norm",
    "frozen_norm_buffers",
    "is_norm_frozen",
    "is_norm_layer",
    "named_norm_layers",
    "unfreeze_norm",
]


NormLayer = NormBase
"""The base class of every covered norm layer (BatchNorm and InstanceNorm variants)."""


def is_norm_layer(module: nn.Module) -> TypeGuard[NormLayer]:
    """Whether ``module`` is a norm layer with running statistics that this library covers.

    Every ``_BatchNorm`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, the Lazy variants, third-party
    subclasses) and InstanceNorm1d/2d/3d with ``track_running_stats=True``.
    """
    if isinstance(module, BatchNormBase):
        return True
    return isinstance(module, InstanceNormBase) and module.track_running_stats


def named_norm_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, NormLayer]]:
    """Yield ``(name, layer)`` for every covered norm layer in ``module``, itself included."""
    for name, child in module.named_modules(prefix=prefix):
        if is_norm_layer(child):
            yield name, child


class _InferenceModeTrain:
    """Stands in for a frozen layer's ``train`` method: whatever the mode asked, inference mode."""

    __slots__ = ("holders", "layer", "mode")

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.holders: set[Hashable] = set()
        self.mode = layer.training  # the mode asked for last: the layer's without this library

    def __call__(self, mode: bool = True) -> nn.Module:
        self.mode = mode
        return type(self.layer).train(self.layer, False)


_SHADOWS = ("train", "reset_running_stats", "__getstate__")


class _KeepStatistics:
    """Stands in for a frozen layer's ``reset_running_stats``: its statistics stay as they are.

    Except while a Lazy layer materialises: its new buffers hold no statistics yet.
    """

    __slots__ = ("layer",)

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self) -> None:
        if isinstance(self.layer, LazyModuleMixin):
            type(self.layer).reset_running_stats(self.layer)  # type: ignore[attr-defined]


class _PlainState:
    """Stands in for a frozen layer's ``__getstate__``: its copies and pickles are those of a plain layer."""

    __slots__ = ("pin",)

    def __init__(self, pin: _InferenceModeTrain) -> None:
        self.pin = pin

    def __call__(self) -> dict[str, Any]:
        layer = self.pin.layer
        state: dict[str, Any] = type(layer).__getstate__(layer)  # type: ignore[no-untyped-call]
        state = {key: value for key, value in state.items() if key not in _SHADOWS}
        state["training"] = self.pin.mode
        return state


def _pin(layer: nn.Module) -> _InferenceModeTrain | None:
    pin = vars(layer).get("train")
    return pin if isinstance(pin, _InferenceModeTrain) else None


def freeze_norm(layer: nn.Module, holder: Hashable = None) -> None:
    """Put ``layer`` in inference mode and keep it there through any ``.train()`` call.

    Parameters are left alone: whether ``weight`` and ``bias`` train is the caller's choice.
    ``holder`` identifies who froze the layer, for :func:`unfreeze_norm`.
    """
    pin = _pin(layer)
    if pin is None:
        pin = _InferenceModeTrain(layer)
        vars(layer).update(train=pin, reset_running_stats=_KeepStatistics(layer), __getstate__=_PlainState(pin))
    pin.holders.add(holder)
    layer.training = False


def unfreeze_norm(layer: nn.Module, training: bool, holder: Hashable = None) -> None:
    """Let go of ``layer`` for ``holder``; once no holder is left it is an ordinary module again.

    ``training`` is the mode it takes then: that of its parent, so that it behaves as it would
    without this library.
    """
    pin = _pin(layer)
    if pin is None or holder not in pin.holders:
        return
    pin.holders.discard(holder)
    if not pin.holders:
        for name in _SHADOWS:
            del vars(layer)[name]
        layer.training = training


def is_norm_frozen(layer: nn.Module) -> bool:
    """Whether some holder keeps ``layer`` in inference mode."""
    return _pin(layer) is not None


def frozen_norm_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers (running statistics) of the norm layers in ``module`` frozen now."""
    return [buffer for _, layer in named_norm_layers(module) if is_norm_frozen(layer) for buffer in layer.buffers()]
