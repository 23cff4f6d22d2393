"""AdaBN for the callbacks: re-estimate frozen norm statistics on the training batches, as ``training_step`` gets them;
and the target's shift from those statistics (``GradualUnfreeze(max_step="auto")``).

The pure-PyTorch estimate is :func:`~lightning_bnfreeze.adapt.adapt_norm_statistics`, configured by
:class:`~lightning_bnfreeze.adapt.AdaBN`; this module feeds it the trainer's training data and keeps
the callbacks' "done once per fit" state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_bnfreeze.adapt import AdaBN, adapt_norm_statistics
from lightning_bnfreeze.callbacks.strategies import data_parallel_group
from lightning_bnfreeze.domain_shift import norm_statistics_shift
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.internals import NormBase, training_batches

__all__ = [
    "ADAPT_HOOK",
    "SHIFT_BATCHES",
    "ForwardError",
    "TrainDataAdaptation",
    "adapt_on_train_data",
    "on_training_batches",
    "runs_on_batches",
    "shift_on_train_data",
]

T = TypeVar("T")

SHIFT_BATCHES = 4
"""Training batches ``GradualUnfreeze(max_step="auto")`` measures the target's shift on (at fit start)."""

ADAPT_HOOK = "adapt_norm_step"
"""A LightningModule method ``adapt_norm_step(batch)``, if defined, runs the model on one batch."""


class ForwardError(TypeError):
    """The LightningModule raised on a training batch given as a forward without :data:`ADAPT_HOOK` gives it (a dict
    batch to a ``forward(x)``, say); the message names the hook that fixes it."""


class TrainDataAdaptation:
    """A callback's AdaBN: once per fit (and again on demand), remembered through checkpoints.

    ``config`` is the callback's ``adapt`` argument (``None``: off); ``owner`` names the callback in messages.
    """

    def __init__(self, config: AdaBN | None, owner: str) -> None:
        if config is not None and not isinstance(config, AdaBN):
            raise ValueError(f"`adapt` must be an AdaBN(...) or None, got {config!r}.")
        self.config = config
        self.owner = owner
        self.done = False

    def reset(self) -> None:
        """Forget an earlier adaptation: a new fit adapts again."""
        self.done = False

    def run_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[NormBase]) -> None:
        """Adapt ``layers`` unless this fit (or the run it resumed) did already, or AdaBN is off."""
        if not self.done:
            self.run(trainer, pl_module, layers)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[NormBase]) -> None:
        """Adapt ``layers`` now, unless AdaBN is off."""
        if self.config is None:
            return
        adapt_on_train_data(trainer, pl_module, layers, self.config, self.owner)
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {"adapted": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("adapted", False))


def adapt_on_train_data(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    layers: Sequence[NormBase],
    config: AdaBN,
    owner: str,
    why: str = "",
) -> int:
    """Re-estimate ``layers``' statistics on the first training batches, leaving the data order as it was;
    ``why`` (if any) ends the line that says so.

    Each batch is what ``training_step`` would get (for several training dataloaders, a list or dict
    of their batches), through the precision plugin, the batch-transfer hooks and the strategy's
    device; the model runs in the precision plugin's training-step context. A batch reaches the model
    through ``pl_module.adapt_norm_step(batch)`` if the LightningModule defines it, else, for a single
    training dataloader, as ``pl_module(batch[0])`` for a tuple or list batch and ``pl_module(batch)``
    otherwise. Under DDP the statistics are those of all ranks' batches.

    Returns:
        The number of batches used on this rank.

    Raises:
        TypeError: several training dataloaders and no ``adapt_norm_step``; or a fraction of an
            epoch whose length is unknown.
    """
    count = _batch_count(trainer, config.batches, owner)

    def adapt(batches: Iterable[Any], forward: Callable[[Any], Any], group: Any) -> int:
        return adapt_norm_statistics(pl_module, layers, batches, forward, prior=config.prior, process_group=group)

    used = on_training_batches(trainer, pl_module, count, owner, "AdaBN", adapt)
    rank_zero_info(
        f"{owner}: statistics of {len(layers)} norm layer(s) re-estimated on {used} batch(es)"
        f" (prior: {config.prior:g} source samples){why}."
    )
    return used


def runs_on_batches(pl_module: pl.LightningModule) -> bool:
    """Whether ``pl_module`` can run on a training batch: it defines ``adapt_norm_step(batch)`` or its own
    ``forward`` (not the one of ``LightningModule``, of either package, which raises)."""
    return hasattr(pl_module, ADAPT_HOOK) or type(pl_module).forward.__qualname__ != "LightningModule.forward"


def shift_on_train_data(
    trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[NormBase], owner: str
) -> float | None:
    """How far the first :data:`SHIFT_BATCHES` training batches are from ``layers``' running statistics
    (:func:`~lightning_bnfreeze.domain_shift.norm_statistics_shift`, over all ranks), read as
    :func:`adapt_on_train_data` reads them; ``None``, with a warning, where they cannot be read or run.

    Raises:
        ForwardError: the model raised on a batch given as without :data:`ADAPT_HOOK`.
    """
    if not any(layer.running_mean is not None for layer in layers):
        return None
    if not runs_on_batches(pl_module):
        rank_zero_warn(
            f"{owner}: max_step='auto' runs the model on the first training batches, but {type(pl_module).__name__}"
            f" defines neither `forward` nor `{ADAPT_HOOK}(batch)`: no cap (max_step=None). Define one of them,"
            " or set `max_step`."
        )
        return None

    def measure(batches: Iterable[Any], forward: Callable[[Any], Any], group: Any) -> float | None:
        return norm_statistics_shift(pl_module, layers, batches, forward, process_group=group)

    try:
        return on_training_batches(trainer, pl_module, SHIFT_BATCHES, owner, "max_step='auto'", measure)
    except ForwardError:
        raise
    except (RuntimeError, TypeError) as error:
        rank_zero_warn(
            f"{owner}: max_step='auto' could not measure the target's shift ({error}): no cap (max_step=None);"
            " set `max_step` to silence this."
        )
        return None


def on_training_batches(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    count: int,
    owner: str,
    purpose: str,
    run: Callable[[Iterable[Any], Callable[[Any], Any], Any], T],
) -> T:
    """``run(batches, forward, process_group)`` over the first ``count`` training batches, each as ``training_step``
    would get it, leaving the data order as it was (see :func:`adapt_on_train_data`); ``purpose`` names the caller's
    feature in errors.

    Raises:
        RuntimeError: no training dataloader to read.
        TypeError: several training dataloaders and no ``adapt_norm_step``.
        ForwardError: without ``adapt_norm_step``, the model raised on a batch.
    """
    try:
        batches, several = training_batches(trainer, pl_module)
    except RuntimeError as error:
        raise RuntimeError(f"{owner}: {purpose} needs the training dataloader: {error}") from None
    forward = getattr(pl_module, ADAPT_HOOK, None)
    if forward is None:
        if several is not None:
            raise TypeError(
                f"{owner}: {purpose} with several training dataloaders (a {several}): define `{ADAPT_HOOK}(batch)` on"
                " the LightningModule to run the model on a batch as `training_step` gets it."
            )
        forward = _default_forward(pl_module, owner, purpose)
    root = trainer.strategy.root_device
    try:
        with (
            torch.random.fork_rng(devices=[root] if root.type == "cuda" else []),  # the training data order stays
            trainer.precision_plugin.train_step_context(),
        ):
            group = data_parallel_group(trainer.strategy)  # the replicas' batches, not a tensor-parallel rank's twice
            return run(islice(batches, count), forward, group)
    finally:
        # FSDP2: forwards without a backward leave the gathered copies registered, which the next backward frees;
        # the parameters read until the next step (first-step weights, a snapshot) must be the sharded ones
        register_sharded_parameters(pl_module)


def _default_forward(pl_module: pl.LightningModule, owner: str, purpose: str) -> Callable[[Any], Any]:
    """``pl_module`` on the batch, or on its first item for a tuple or list; what it raises, as a :class:`ForwardError`
    (not running out of memory)."""

    def forward(batch: Any) -> Any:
        given = batch[0] if isinstance(batch, list | tuple) else batch
        try:
            return pl_module(given)
        except torch.OutOfMemoryError:
            raise
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as error:
            what = "the first item of each training batch" if given is not batch else "each training batch"
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ForwardError(
                f"{owner}: {purpose} runs {type(pl_module).__name__} on {what} (a {type(given).__name__}), and it"
                f" raised {type(error).__name__}: {message}. Define `{ADAPT_HOOK}(self, batch)` on the"
                " LightningModule to run the model on a batch as `training_step` gets it"
            ) from error

    return forward


def _batch_count(trainer: pl.Trainer, batches: int | float, owner: str) -> int:
    if isinstance(batches, int):
        return batches
    epoch = trainer.num_training_batches
    if not math.isfinite(epoch):
        raise TypeError(
            f"{owner}: AdaBN(batches={batches}) is a fraction of an epoch, but the training dataloader has no"
            " length; give a number of batches."
        )
    return max(1, math.ceil(batches * epoch))
