"""Keep a set of norm layers frozen through training, in plain PyTorch."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from torch import nn

from lightning_bnfreeze.norm import NormLayer, freeze_norm, is_norm_layer, named_norm_layers, unfreeze_norm

__all__ = [
    "BackboneNorms",
    "KerasFreezer",
    "NormFreezer",
    "governing_parameters",
    "norm_layer_names",
    "set_requires_grad",
]


def set_requires_grad(params: Iterable[nn.Parameter], requires_grad: bool) -> None:
    """Set ``requires_grad`` on ``params``, uninitialised (Lazy) parameters included."""
    for param in params:
        param.requires_grad = requires_grad  # not requires_grad_(): a Lazy layer's may be uninitialised


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
                set_requires_grad(layer.parameters(), False)
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


def governing_parameters(root: nn.Module) -> dict[str, tuple[nn.Parameter, ...]]:
    """For each norm layer of ``root``, by name, the parameters whose ``requires_grad`` governs whether it is frozen.

    Keras semantics: a layer is frozen when all its own parameters have ``requires_grad=False``; a
    layer without parameters of its own follows its nearest ancestor that has any. A layer with no
    such ancestor maps to an empty tuple: it is never frozen.
    """
    modules = dict(root.named_modules())
    governing = {}
    for name, layer in named_norm_layers(root):
        params = tuple(layer.parameters(recurse=False))
        ancestor = name
        while not params and ancestor:
            ancestor = ancestor.rpartition(".")[0]
            params = tuple(modules[ancestor].parameters())
        governing[name] = params
    return governing


class KerasFreezer:
    """Keras semantics on a :class:`NormFreezer`: frozen exactly the layers whose parameters are.

    :meth:`update` costs one ``requires_grad`` read per governing parameter while nothing changed.
    """

    def __init__(self, freezer: NormFreezer) -> None:
        self.freezer = freezer
        self._governing = governing_parameters(freezer.root)
        self._params = tuple(param for params in self._governing.values() for param in params)
        self._snapshot: list[bool] | None = None

    def update(self) -> tuple[list[str], list[str]]:
        """Freeze and release layers as their parameters now say; return (frozen, released) names."""
        snapshot = [param.requires_grad for param in self._params]
        if snapshot == self._snapshot:
            self.freezer.enforce()
            return [], []
        self._snapshot = snapshot
        was_frozen = self.freezer.frozen
        frozen_now = {
            name for name, params in self._governing.items() if params and not any(p.requires_grad for p in params)
        }
        to_freeze = [name for name in self._governing if name in frozen_now and name not in was_frozen]
        to_release = [name for name in was_frozen if name not in frozen_now]
        self.freezer.unfreeze(to_release)
        self.freezer.freeze(to_freeze, freeze_affine=False)
        self.freezer.enforce()
        return to_freeze, to_release


class BackboneNorms:
    """The norm layers of a backbone released part by part: each frozen, affine included, until released.

    Once all its governing parameters (see :func:`governing_parameters`) are released, a layer trains
    normally if its release says so, else keeps inference mode and frozen statistics while its affine
    parameters train (as it does while only some of them are released).
    """

    def __init__(self, root: nn.Module, backbone: str, holder: Hashable = None) -> None:
        self.freezer = NormFreezer(root, holder)
        prefix = f"{backbone}." if backbone else ""
        self._governing = {
            name: params
            for name, params in governing_parameters(root).items()
            if name == backbone or name.startswith(prefix)
        }
        self._governed = {id(param) for params in self._governing.values() for param in params}
        self.layers = tuple(layer for name, layer in named_norm_layers(root) if name in self._governing)
        """Every norm layer of the backbone, frozen or not."""

    @property
    def with_statistics(self) -> list[NormLayer]:
        """Every norm layer of the backbone that keeps running statistics."""
        return [layer for layer in self.layers if layer.running_mean is not None]

    def holds_norms(self, params: Iterable[nn.Parameter]) -> bool:
        """Whether releasing ``params`` releases some norm layer (they govern one)."""
        return any(id(param) in self._governed for param in params)

    def update(self, released: dict[int, bool]) -> None:
        """Put each layer in the state the released parameters give it: ``id(parameter) -> whether its norms train``."""
        frozen, stats_only, let_go = [], [], []
        for name, params in self._governing.items():
            flags = [released[id(param)] for param in params if id(param) in released]
            if params and len(flags) == len(params) and all(flags):
                let_go.append(name)
            elif flags:  # released, or partly: the released parameters must keep training
                stats_only.append(name)
            else:
                frozen.append(name)
        self.freezer.unfreeze(let_go)
        self.freezer.freeze(frozen, freeze_affine=True)
        self.freezer.freeze(stats_only, freeze_affine=False)

    def enforce(self) -> None:
        self.freezer.enforce()
