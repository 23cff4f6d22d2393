"""AdaBN for the callbacks: re-estimate frozen norm statistics on the training batches, as ``training_step`` gets them.

The pure-PyTorch estimate is :func:`~lightning_bnfreeze.adapt.adapt_norm_statistics`; this module
feeds it the trainer's training data and keeps the callbacks' "done once per fit" state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.nn.modules.batchnorm import _NormBase

from lightning_bnfreeze.adapt import adapt_norm_statistics, check_prior
from lightning_bnfreeze.callbacks.parallel import data_parallel_group

__all__ = [
    "ADAPT_HOOK",
    "DEFAULT_ADAPT_PRIOR",
    "TrainDataAdaptation",
    "adapt_on_train_data",
    "check_adapt_batches",
    "check_adapt_prior",
]

ADAPT_HOOK = "adapt_norm_step"
"""A LightningModule method ``adapt_norm_step(batch)``, if defined, runs the model on one batch."""

DEFAULT_ADAPT_PRIOR = 32.0
"""The callbacks' ``adapt_prior``: source pseudo-samples blended with the training data's statistics.

From a sweep on the transfer benchmark (``benchmarks/transfer.md``, "AdaBN with a source prior"):
adapting on 50 target images, 32 kept the source statistics at 0.39 of the weight and was level with
or better than both frozen and training statistics on every shift, where 0 (plain AdaBN) was not.
The weight is ``N / (N + n)``: adapting on many more samples, the prior's share shrinks.
"""


def check_adapt_batches(value: int | float | None) -> None:
    """Raise unless ``value`` is ``None``, an integer >= 1 (batches) or a float in (0, 1] (of an epoch)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    if isinstance(value, float) and 0 < value <= 1:
        return
    raise ValueError(
        f"`adapt_batches` must be None, a number of batches >= 1, or a fraction of an epoch in (0, 1], got {value!r}."
    )


def check_adapt_prior(value: float) -> None:
    """Raise unless ``value`` is a finite number >= 0 (source pseudo-samples)."""
    check_prior(value, "adapt_prior")


class TrainDataAdaptation:
    """A callback's AdaBN: once per fit (and again on demand), remembered through checkpoints.

    Args:
        batches: ``adapt_batches``: ``None`` (off), a number of training batches, or a fraction of
            the training epoch in (0, 1] (of ``trainer.num_training_batches``); checked here.
        prior: ``adapt_prior``: source pseudo-samples blended with the target statistics (see
            :func:`~lightning_bnfreeze.adapt.adapt_norm_statistics`); checked here.
        owner: the callback's name, for messages.

    Usage in a callback that keeps norm layers frozen with a ``NormFreezer``::

        def __init__(self, ..., adapt_batches=None, adapt_prior=DEFAULT_ADAPT_PRIOR):
            self._adaptation = TrainDataAdaptation(adapt_batches, adapt_prior, "BNFreezeCallback")

        def setup(self, trainer, pl_module, stage):
            self._adaptation.reset()  # before a checkpoint's state is loaded

        def on_train_start(self, trainer, pl_module):
            ...  # freeze first
            self._adaptation.run_once(trainer, pl_module, self._freezer.layers)

        def state_dict(self):
            return {..., **self._adaptation.state_dict()}

        def load_state_dict(self, state_dict):
            self._adaptation.load_state_dict(state_dict)

    ``run`` adapts again whatever was done before (``GradualUnfreeze(adapt_on_release=True)``).
    """

    def __init__(self, batches: int | float | None, prior: float = DEFAULT_ADAPT_PRIOR, owner: str = "AdaBN") -> None:
        check_adapt_batches(batches)
        check_adapt_prior(prior)
        self.batches = batches
        self.prior = prior
        self.owner = owner
        self.done = False

    def reset(self) -> None:
        """Forget an earlier adaptation: a new fit adapts again."""
        self.done = False

    def run_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[_NormBase]) -> None:
        """Adapt ``layers`` unless this fit (or the run it resumed) did already, or ``batches`` is ``None``."""
        if not self.done:
            self.run(trainer, pl_module, layers)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Sequence[_NormBase]) -> None:
        """Adapt ``layers`` now, unless ``batches`` is ``None``."""
        if self.batches is None:
            return
        adapt_on_train_data(trainer, pl_module, layers, self.batches, self.owner, self.prior)
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {"adapted": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read ``"adapted"`` from the callback's state (absent in older checkpoints: not adapted)."""
        self.done = bool(state_dict.get("adapted", False))


def adapt_on_train_data(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    layers: Sequence[_NormBase],
    batches: int | float,
    owner: str,
    prior: float = DEFAULT_ADAPT_PRIOR,
) -> int:
    """Re-estimate ``layers``' statistics on the first training batches, leaving the data order as it was.

    Each batch is what ``training_step`` would get (for a list or dict of training dataloaders, a
    list or dict of their batches), through the precision plugin, the batch-transfer hooks and the
    strategy's device; the model runs in the precision plugin's training-step context (autocast,
    ``bf16-true``, ...). A batch reaches the model through ``pl_module.adapt_norm_step(batch)`` if
    the LightningModule defines it, else, for a single training dataloader, as ``pl_module(batch[0])``
    for a tuple or list batch and ``pl_module(batch)`` otherwise. Under DDP the statistics are those
    of all ranks' batches.

    Returns:
        The number of batches used on this rank.

    Raises:
        TypeError: several training dataloaders and no ``adapt_norm_step``; or a fraction of an
            epoch whose length is unknown.
    """
    source = trainer.fit_loop._combined_loader
    if source is None:
        raise RuntimeError(f"{owner}: `adapt_batches` needs the training dataloader, which is not set up yet.")
    forward = getattr(pl_module, ADAPT_HOOK, None)
    if forward is None:
        if not _is_single_loader(source):
            raise TypeError(
                f"{owner}: `adapt_batches` with several training dataloaders (a {type(source.iterables).__name__}):"
                f" define `{ADAPT_HOOK}(batch)` on the LightningModule to run the model on a batch as"
                " `training_step` gets it."
            )
        forward = _default_forward(pl_module)
    count = _batch_count(trainer, batches, owner)
    loader = type(source)(source.iterables, source._mode)  # a fresh iterator: the fit loop's stays untouched
    loader.limits = source.limits
    precision = trainer.precision_plugin

    def prepared() -> Iterator[Any]:
        for batch, _, _ in islice(loader, count):
            batch = precision.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    root = trainer.strategy.root_device
    with (
        torch.random.fork_rng(devices=[root] if root.type == "cuda" else []),  # the training data order stays
        precision.train_step_context(),
    ):
        group = data_parallel_group(trainer.strategy)  # the replicas' batches, not a tensor-parallel rank's twice
        used = adapt_norm_statistics(pl_module, layers, prepared(), forward, prior=prior, process_group=group)
    rank_zero_info(
        f"{owner}: statistics of {len(layers)} frozen norm layer(s) re-estimated on {used} batch(es)"
        f" (prior: {prior:g} source samples)."
    )
    return used


def _is_single_loader(source: CombinedLoader) -> bool:
    """Whether ``training_step`` gets one dataloader's batch, not a list or dict of several."""
    return len(source.flattened) == 1 and source.iterables is source.flattened[0]


def _default_forward(pl_module: pl.LightningModule) -> Callable[[Any], Any]:
    def forward(batch: Any) -> Any:
        return pl_module(batch[0] if isinstance(batch, list | tuple) else batch)

    return forward


def _batch_count(trainer: pl.Trainer, batches: int | float, owner: str) -> int:
    if isinstance(batches, int):
        return batches
    epoch = trainer.num_training_batches
    if not math.isfinite(epoch):
        raise TypeError(
            f"{owner}: `adapt_batches={batches}` is a fraction of an epoch, but the training dataloader has no"
            " length; give a number of batches."
        )
    return max(1, math.ceil(batches * epoch))
