"""Keep a set of norm layers frozen through training, in plain PyTorch."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from torch import nn

from lightning_bnfreeze.norm import NormLayer, freeze_norm, is_norm_layer, named_norm_layers, unfreeze_norm

__all__ = ["NormFreezer", "RequiresGradFollower", "deciding_parameters", "norm_layer_names"]


def norm_layer_names(root: nn.Module, module_names: Iterable[str]) -> list[str]:
    """Names of the covered norm layers inside the named modules of ``root`` (each once, in order)."""
    found: dict[str, None] = {}
    for module_name in module_names:
        for name, _ in named_norm_layers(root.get_submodule(module_name), prefix=module_name):
            found[name] = None
    return list(found)


class NormFreezer:
    """The norm layers of ``root`` that one holder keeps frozen, by name.

    A frozen layer runs in inference mode through any ``.train()`` call (see
    :func:`~lightning_bnfreeze.norm.freeze_norm`); with ``freeze_affine`` its ``weight`` and ``bias``
    also keep ``requires_grad=False``. :meth:`enforce` undoes, in a few microseconds, what a direct
    ``layer.training = True`` or ``requires_grad_(True)`` did since: call it before each step.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4))
        >>> freezer = NormFreezer(model)
        >>> freezer.freeze(["1"])
        >>> model.train()[1].training, model[1].weight.requires_grad
        (False, False)
    """

    def __init__(self, root: nn.Module, holder: Hashable = None) -> None:
        self.root = root
        self.holder = holder if holder is not None else self
        self._affine_frozen: dict[str, bool] = {}
        self._layers: tuple[NormLayer, ...] = ()
        self._params: tuple[nn.Parameter, ...] = ()

    @property
    def layers(self) -> tuple[NormLayer, ...]:
        """The frozen layers."""
        return self._layers

    @property
    def frozen(self) -> dict[str, bool]:
        """Name of each frozen layer -> whether its affine parameters are frozen too."""
        return dict(self._affine_frozen)

    def freeze(self, names: Iterable[str], freeze_affine: bool = True) -> None:
        """Freeze the statistics of the named norm layers, and their affine parameters if asked."""
        for name in names:
            layer = self._norm_layer(name)
            freeze_norm(layer, self.holder)
            if freeze_affine:
                for param in layer.parameters():
                    param.requires_grad = False  # not requires_grad_(): a Lazy layer's may be uninitialised
            self._affine_frozen[name] = freeze_affine
        self._refresh()

    def unfreeze(self, names: Iterable[str]) -> None:
        """Let go of the named layers: they take their parent's mode; parameters stay as they are."""
        for name in names:
            if self._affine_frozen.pop(name, None) is not None:
                parent = self.root.get_submodule(name.rpartition(".")[0]) if "." in name else self.root
                unfreeze_norm(self.root.get_submodule(name), parent.training, self.holder)
        self._refresh()

    def unfreeze_all(self) -> None:
        self.unfreeze(list(self._affine_frozen))

    def enforce(self) -> None:
        """Put back inference mode and frozen affine parameters wherever something changed them."""
        for layer in self._layers:
            if layer.training:
                layer.training = False
        for param in self._params:
            if param.requires_grad:
                param.requires_grad = False

    def _norm_layer(self, name: str) -> NormLayer:
        layer = self.root.get_submodule(name)
        if not is_norm_layer(layer):
            raise TypeError(f"{name!r} is a {type(layer).__name__}, not a BatchNorm or tracking InstanceNorm layer.")
        return layer

    def _refresh(self) -> None:
        self._layers = tuple(self._norm_layer(name) for name in self._affine_frozen)
        self._params = tuple(
            param
            for layer, affine_frozen in zip(self._layers, self._affine_frozen.values(), strict=True)
            if affine_frozen
            for param in layer.parameters(recurse=False)
        )


def deciding_parameters(root: nn.Module) -> dict[str, tuple[nn.Parameter, ...]]:
    """For each norm layer of ``root``, by name, the parameters that decide whether it is frozen.

    Keras semantics: a layer is frozen when all its own parameters have ``requires_grad=False``; a
    layer without parameters of its own follows its nearest ancestor that has any. A layer with no
    such ancestor maps to an empty tuple: it is never frozen.
    """
    modules = dict(root.named_modules())
    deciders = {}
    for name, layer in named_norm_layers(root):
        params = tuple(layer.parameters(recurse=False))
        ancestor = name
        while not params and ancestor:
            ancestor = ancestor.rpartition(".")[0]
            params = tuple(modules[ancestor].parameters())
        deciders[name] = params
    return deciders


class RequiresGradFollower:
    """Keras semantics on a :class:`NormFreezer`: frozen exactly the layers whose parameters are.

    :meth:`sync` costs one ``requires_grad`` read per deciding parameter while nothing changed.
    """

    def __init__(self, freezer: NormFreezer) -> None:
        self.freezer = freezer
        self._deciders = deciding_parameters(freezer.root)
        self._params = tuple(param for params in self._deciders.values() for param in params)
        self._snapshot: list[bool] | None = None

    def sync(self) -> tuple[list[str], list[str]]:
        """Freeze and release layers as their parameters now say; return (frozen, released) names."""
        snapshot = [param.requires_grad for param in self._params]
        if snapshot == self._snapshot:
            self.freezer.enforce()
            return [], []
        self._snapshot = snapshot
        was_frozen = self.freezer.frozen
        frozen_now = {
            name for name, params in self._deciders.items() if params and not any(p.requires_grad for p in params)
        }
        to_freeze = [name for name in self._deciders if name in frozen_now and name not in was_frozen]
        to_release = [name for name in was_frozen if name not in frozen_now]
        self.freezer.unfreeze(to_release)
        self.freezer.freeze(to_freeze, freeze_affine=False)
        self.freezer.enforce()
        return to_freeze, to_release
