"""What ``BNFreezeCallback`` would freeze in a model, and by which rule, without training (plain PyTorch)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_bnfreeze.freezer import governing_parameters, norm_layer_names
from lightning_bnfreeze.names import as_name_list, resolve_names
from lightning_bnfreeze.norm import named_norm_layers
from lightning_bnfreeze.tables import format_table

__all__ = ["norm_freeze_plan"]

Row = tuple[str, str, str, str]  # layer, type, state, why


def norm_freeze_plan(root: nn.Module, modules: str | Sequence[str] | None = None, train_affine: bool = False) -> str:
    """The norm layers of ``root`` that ``BNFreezeCallback(modules, train_affine)`` would freeze, and why, as text.

    With ``modules=None`` (Keras semantics) the answer reads ``requires_grad`` as ``root`` has it
    now, i.e. what the callback would freeze at the start of training if nothing changes it before
    (the callback re-checks before every step).

    Raises:
        ValueError: a name or glob in ``modules`` that matches no module (with the closest names).

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)).requires_grad_(False)
        >>> print(norm_freeze_plan(model).splitlines()[-1])
        1 of 1 norm layer(s) frozen.
    """
    layers = list(named_norm_layers(root))
    if not layers:
        return "No BatchNorm or tracking InstanceNorm layer: nothing to freeze."
    if modules is None:
        header, rows = _by_requires_grad(root, layers)
    else:
        header, rows = _by_name(root, layers, as_name_list(modules, "modules"), train_affine)
    frozen = sum(row[2] == "frozen" for row in rows)
    table = format_table([("norm layer", "type", "state", "why"), *rows])
    return f"{header}\n{table}\n{frozen} of {len(rows)} norm layer(s) frozen."


def _by_requires_grad(root: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> tuple[str, list[Row]]:
    governing = governing_parameters(root)
    rows: list[Row] = []
    for name, layer in layers:
        params = governing[name]
        trainable = sum(param.requires_grad for param in params)
        whose = "own parameters" if next(layer.parameters(recurse=False), None) is not None else "parent's"
        if not params:
            state, why = "not frozen", "no parameters in it or any parent: never frozen"
        elif trainable:
            state, why = "not frozen", f"{trainable} of its {len(params)} {whose} require grad"
        else:
            state, why = "frozen", f"all {len(params)} of its {whose} have requires_grad=False"
        rows.append((name, type(layer).__name__, state, why))
    header = (
        "BNFreezeCallback(modules=None), Keras semantics: a norm layer is frozen while all its own parameters\n"
        "have requires_grad=False (one without parameters follows its nearest parent that has some), re-checked\n"
        "before every training step. With requires_grad as the model has it now:"
    )
    return header, rows


def _by_name(
    root: nn.Module, layers: Sequence[tuple[str, nn.Module]], patterns: list[str], train_affine: bool
) -> tuple[str, list[Row]]:
    inside: dict[str, str] = {}
    for pattern, names in resolve_names(root, patterns, "modules").items():
        for layer_name in norm_layer_names(root, names):
            inside.setdefault(layer_name, pattern)
    rows: list[Row] = [
        (
            name,
            type(layer).__name__,
            "frozen" if name in inside else "not frozen",
            f"inside {inside[name]!r}" if name in inside else "outside `modules`: left alone",
        )
        for name, layer in layers
    ]
    affine = "weight and bias train (train_affine=True)" if train_affine else "weight and bias frozen too"
    header = (
        f"BNFreezeCallback(modules={patterns!r}): every norm layer inside the named modules runs in inference\n"
        f"mode with unchanged statistics for the whole fit; {affine}:"
    )
    return header, rows
