"""What each release frees: ``GradualUnfreeze(what=...)``, and the release plan it resolves to, in plain PyTorch.

- :class:`Blocks` (the default): the backbone's blocks (found for any model, or named),
  output side first, ``per_release`` at a time, when the trigger (``when=``) says.
- :class:`Schedule`: ``{time: names}``, each release at its own time (epochs, or optimizer steps).
- :class:`LayerDecay`: every block in one release, each at a rate decayed with its depth (LLRD).

Each resolves against a model (:meth:`Blocks.plan`) to a :class:`ReleasePlan`: the releases in
order, each a tuple of :class:`ReleasedPart` (a module, parameter or block that becomes one param
group) with its learning-rate factor relative to the callback's ``lr_scale``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_bnfreeze.blocks import GRANULARITIES, Block, UserBlocks, find_blocks
from lightning_bnfreeze.checks import check_choice, check_integer, check_positive
from lightning_bnfreeze.names import as_name_list, get_module, is_glob, match_names, unknown_name_message
from lightning_bnfreeze.triggers import UNITS, At, Trigger

__all__ = ["Blocks", "LayerDecay", "ReleasePlan", "ReleasedPart", "Schedule", "What"]


@dataclass(frozen=True)
class ReleasedPart:
    """A module, parameter or block released as one param group: its parameters' names and its rate factor."""

    name: str
    params: tuple[str, ...]
    numel: int
    lr_factor: float
    """Relative to ``lr_scale``: ``decay**k`` (``k``: the release, or with :class:`LayerDecay` the depth)."""


@dataclass(frozen=True)
class ReleasePlan:
    """The releases of a backbone, in order; ``blocks``: the blocks found, when the plan is made of them."""

    backbone: str
    releases: tuple[tuple[ReleasedPart, ...], ...]
    frozen_params: int
    """Parameters (elements) of the backbone that no release reaches: they stay frozen."""
    blocks: tuple[Block, ...] = ()


class What:
    """What each release frees: resolved against a model by :meth:`plan`."""

    def plan(self, root: nn.Module, backbone: str) -> ReleasePlan:
        """The releases of ``root``'s module ``backbone``, checked against the model."""
        raise NotImplementedError

    def trigger(self) -> Trigger | None:
        """The trigger the releases come with (an explicit schedule's times), else ``None``: ``when=`` decides."""
        return None


def what_and_when(what: What | None, when: Trigger | None) -> tuple[What, Trigger | None]:
    """``what`` (default: :class:`Blocks`) and the trigger of its releases: its own (an explicit schedule's), or
    ``when`` (``None``: the caller's default).

    Raises:
        ValueError: not a :class:`What` or a :class:`~lightning_bnfreeze.triggers.Trigger`, or a ``when`` that an
            explicit schedule leaves nothing to decide.
    """
    what = Blocks() if what is None else what
    if not isinstance(what, What):
        raise ValueError(f"`what` must be Blocks(...), Schedule(...) or LayerDecay(...), got {what!r}.")
    if when is not None and not isinstance(when, Trigger):
        raise ValueError(f"`when` must be Every(...), Plateau(...) or a Trigger subclass, got {when!r}.")
    if when is not None and what.trigger() is not None:
        raise ValueError(
            f"`what={what!r}` gives each release its own time, so `when={when!r}` has nothing to decide:"
            " leave `when` out, or name the blocks with `what=Blocks(names=[...])` to release them on `when`."
        )
    return what, what.trigger() or when


def _check_names(value: object) -> list[str | list[str]] | None:
    """``Blocks``' ``names``: ``None`` or a non-empty list whose entries are names/globs or lists of them."""
    if value is None or callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(
            f"`names` must be a list of blocks (each a name, a glob or a list of them), got {value!r}:"
            f" for one block, write [{value!r}]."
        )
    return [entry if isinstance(entry, str) else as_name_list(entry, "names") for entry in value]


class _FoundBlocks(What):
    """The shared part of :class:`Blocks` and :class:`LayerDecay`: how the blocks are found."""

    def __init__(self, granularity: str, names: UserBlocks | None) -> None:
        check_choice("granularity", granularity, GRANULARITIES)
        self.granularity = granularity
        self.names = _check_names(names)

    def blocks(self, root: nn.Module, backbone: str) -> list[Block]:
        """The backbone's blocks, input side first."""
        module = get_module(root, backbone, "backbone")
        try:
            return find_blocks(module, backbone, self.granularity, self.names)
        except ValueError as error:  # a name that matches nothing may be a block label, as the dry run shows them
            entries = self.names if isinstance(self.names, list) else []  # (not a callable's names)
            names = [name for entry in entries for name in as_name_list(entry, "names")]
            label = next((_block_label(module, backbone, n) for n in names if repr(n) in str(error)), "")
            if not label:
                raise
            raise ValueError(f"{error}{label}") from error


class Blocks(_FoundBlocks):
    """Release the backbone's blocks output side first, ``per_release`` at a time (the default).

    Args:
        per_release: blocks freed by each release.
        granularity: ``"stage"`` (ResNet ``layer1``..``layer4``, ConvNeXt ``stages.N``; a flat stack of
            transformer blocks gives one block per layer) or ``"block"`` (every repeated block). The
            stem (embeddings, tokens, first conv) is the input-side block; a final norm joins the last
            block; a timm model's own ``group_matcher`` is used when it has one.
        names: the blocks by name instead, input side first, relative to the LightningModule: each entry
            a name (one block), a glob (one block per module it matches: ``"backbone.layer*"``), or a list
            of names and globs (one block); or, in Python, a callable that gets the backbone and returns
            such a list. A parameter in no entry joins the block registered before it.
        decay: rate factor of each later release: release ``k`` at ``lr_scale * decay**k``.
    """

    def __init__(
        self,
        per_release: int = 2,
        granularity: str = "stage",
        names: list[str | list[str]] | None = None,
        decay: float = 1.0,
    ) -> None:
        super().__init__(granularity, names)
        check_integer("per_release", per_release, 1)
        check_positive("decay", decay)
        self.per_release = per_release
        self.decay = decay

    def plan(self, root: nn.Module, backbone: str) -> ReleasePlan:
        blocks = self.blocks(root, backbone)
        output_first = list(reversed(blocks))
        chunks = [output_first[i : i + self.per_release] for i in range(0, len(output_first), self.per_release)]
        releases = tuple(tuple(_part(block, self.decay**k) for block in chunk) for k, chunk in enumerate(chunks))
        return ReleasePlan(backbone, releases, 0, tuple(blocks))

    def __repr__(self) -> str:
        return (
            f"Blocks(per_release={self.per_release}, granularity={self.granularity!r}, names={self.names!r},"
            f" decay={self.decay:g})"
        )


class LayerDecay(_FoundBlocks):
    """Layer-wise learning-rate decay (BEiT, MAE, ELECTRA): every block in one release, decayed with depth.

    The block at depth ``d`` from the output side trains at ``lr_scale * decay**d``. With the default
    trigger the release is at epoch 1, after an epoch of the head alone: a linear probe, then
    fine-tuning with LLRD (LP-FT); ``when=Every(first=0)`` gives plain LLRD from the first step.

    Args:
        decay: the factor per block of depth (MAE ViT-B 0.65, ViT-L 0.75; ELECTRA 0.8).
        granularity: as for :class:`Blocks`.
        names: as for :class:`Blocks`.
    """

    def __init__(self, decay: float = 0.75, granularity: str = "stage", names: list[str | list[str]] | None = None):
        super().__init__(granularity, names)
        check_positive("decay", decay)
        self.decay = decay

    def plan(self, root: nn.Module, backbone: str) -> ReleasePlan:
        blocks = self.blocks(root, backbone)
        parts = tuple(_part(block, self.decay**depth) for depth, block in enumerate(reversed(blocks)))
        return ReleasePlan(backbone, (parts,), 0, tuple(blocks))

    def __repr__(self) -> str:
        return f"LayerDecay({self.decay:g}, granularity={self.granularity!r}, names={self.names!r})"


class Schedule(What):
    """An explicit schedule: ``{time: name or [names]}``, each release at its own time.

    Names are module or parameter names or globs relative to the LightningModule; a glob releases
    what it matches that is still frozen. Release ``k`` (in time order) trains at ``lr_scale * decay**k``.

    Args:
        releases: ``{epoch: names}`` (``{1: "backbone.layer4", 3: ["backbone.layer3", "backbone.pos_embed"]}``).
        unit: what the keys count: ``"epoch"`` (releases at the epoch's start) or ``"step"`` (optimizer steps).
        decay: rate factor of each later release.

    Raises:
        ValueError: an empty schedule, a key that is not an integer >= 0, a value that is not a name or
            a list of names; at ``plan``: unknown names (with the closest ones), names outside the
            backbone, a name listed twice or inside another listed one, a release of nothing.
    """

    def __init__(self, releases: Mapping[int | str, str | list[str]], unit: str = "epoch", decay: float = 1.0) -> None:
        if not isinstance(releases, Mapping) or not releases:
            raise ValueError(
                f"`releases` must map epochs (or steps) to the names released then, got {releases!r}: an empty"
                " schedule would keep the backbone frozen for good (use BNFreezeCallback for a linear probe)."
            )
        check_choice("unit", unit, UNITS)
        check_positive("decay", decay)
        self.releases = {
            at: releases[key] for key, at in sorted(((key, _time(key)) for key in releases), key=lambda kv: kv[1])
        }
        for at, names in self.releases.items():
            as_name_list(names, f"releases[{at}]")
        self.unit = unit
        self.decay = decay

    def trigger(self) -> Trigger:
        return At(list(self.releases), self.unit)

    def plan(self, root: nn.Module, backbone: str) -> ReleasePlan:
        get_module(root, backbone, "backbone")
        modules = dict(root.named_modules())
        params = dict(root.named_parameters())
        names = [*modules, *(name for name in params if name not in modules)]
        prefix = f"{backbone}."
        released: set[int] = set()  # ids: parameters are tracked by identity, never by value
        explicit: dict[str, int] = {}
        releases: list[tuple[ReleasedPart, ...]] = []
        for at, entry in self.releases.items():
            where = f"releases[{at}]"
            parts: list[ReleasedPart] = []
            for pattern in as_name_list(entry, where):
                matches = match_names(pattern, names)
                if not matches:
                    label = _block_label(get_module(root, backbone, "backbone"), backbone, pattern)
                    raise ValueError(unknown_name_message(pattern, names, where) + label)
                for name in matches:
                    if not (name == backbone or name.startswith(prefix)):
                        raise ValueError(
                            f"`{where}` holds {name!r}, which is outside the backbone {backbone!r}:"
                            " only modules and parameters inside it are frozen and released."
                        )
                    if not is_glob(pattern):
                        _check_no_overlap(name, at, explicit)
                        explicit[name] = at
                    members = modules[name].named_parameters(prefix=name) if name in modules else [(name, params[name])]
                    fresh = [(param_name, p) for param_name, p in members if id(p) not in released]
                    if not fresh:
                        if is_glob(pattern):
                            continue
                        raise ValueError(f"`{where}` holds {name!r}, which has no parameters left to release.")
                    released.update(id(p) for _, p in fresh)
                    numel = sum(p.numel() for _, p in fresh)
                    names_ = tuple(param_name for param_name, _ in fresh)
                    parts.append(ReleasedPart(name, names_, numel, self.decay ** len(releases)))
            if not parts:
                raise ValueError(f"`{where}` = {entry!r} matches nothing with parameters to release.")
            releases.append(tuple(parts))
        frozen = sum(p.numel() for p in modules[backbone].parameters() if id(p) not in released)
        return ReleasePlan(backbone, tuple(releases), frozen)

    def __repr__(self) -> str:
        return f"Schedule({self.releases!r}, unit={self.unit!r}, decay={self.decay:g})"


def _time(key: object) -> int:
    """A schedule key as an epoch or step: an integer >= 0, or its decimal string (JSON keys are strings)."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise ValueError(f"`releases` has the key {key!r}: epochs and steps are integers >= 0.")
    return key


def _part(block: Block, lr_factor: float) -> ReleasedPart:
    return ReleasedPart(block.name, block.params, block.numel, lr_factor)


def _check_no_overlap(name: str, at: int, explicit: dict[str, int]) -> None:
    for other, other_at in explicit.items():
        if name == other:
            raise ValueError(f"`releases` lists {name!r} twice (at {other_at} and {at}).")
        inner, outer = (name, other) if name.startswith(f"{other}.") else (other, name)
        if inner.startswith(f"{outer}."):
            raise ValueError(
                f"`releases[{at}]` holds {name!r}, which overlaps {other!r} of `releases[{other_at}]`:"
                f" {inner!r} lies inside {outer!r}. List each name once, or use a glob."
            )


def _block_label(module: nn.Module, backbone: str, name: str) -> str:
    """If ``name`` is the label of a block found automatically (as the dry run and the release lines show it, e.g.
    ``"backbone.stem"``), a sentence naming the modules it stands for; else ``""``."""
    for granularity in GRANULARITIES:
        block = next((b for b in find_blocks(module, backbone, granularity) if b.name == name), None)
        if block is not None:
            members = ", ".join(map(repr, block.members))
            return f" {name!r} is the label of a block found automatically, made of {members}: name those."
    return ""
