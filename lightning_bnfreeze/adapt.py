"""Re-estimate the running statistics of norm layers on data (AdaBN), in plain PyTorch.

After :func:`adapt_norm_statistics` with ``prior=0``, each chosen layer's ``running_mean`` and
``running_var`` are the exact statistics of the inputs it saw over the given batches: for BatchNorm
the mean and unbiased variance per channel over all samples and positions; for InstanceNorm the
average of the per-instance means and unbiased variances (what it tracks in training). With
``prior=N`` they are blended with the statistics the layer had before (the source's), weighing
``N`` source pseudo-samples against the ``n`` target samples seen (Schneider et al. 2020,
"Improving robustness against common corruptions by covariate shift adaptation"): with
``w = N / (N + n)``,

    mean = w * mean_source + (1 - w) * mean_target
    var = w * var_source + (1 - w) * var_target

``n`` counts samples (images, sequences: the inputs' first dimension), not positions: the positions
of one image are not independent draws, and counting them would let a single batch outweigh any
prior. The variance of the pooled data would add ``w * (1 - w) * (mean_target - mean_source) ** 2``;
as in the paper it is left out: on the transfer benchmark it cost up to half a point
(``benchmarks/transfer.md``).

During the pass, each chosen layer normalises with the statistics accumulated so far (blended, with
the biased variance), so later layers see inputs close to what they will see in inference, and
batches of any size work, even 1. Nothing else changes: no gradients, no other layer's state, the
same modes and grad mode afterwards; if the pass fails, the statistics are left as they were. The pass
runs eagerly also where the model is compiled: it compiles no graph.

The sums (:class:`~lightning_bnfreeze.norm_moments.NormMoments`) live on the inputs' device, in float64, except on
MPS, which has no float64: there they are float32, so a channel whose mean is large against its spread gets a less
accurate variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_bnfreeze.internals import NormBase
from lightning_bnfreeze.norm_moments import NormMoments, all_reduce, observe, running_statistics

__all__ = [
    "AUTO_BATCHES",
    "DEFAULT_PRIOR",
    "AdaBN",
    "adapt_norm_statistics",
    "check_prior",
    "restore_norm_statistics",
    "saved_norm_statistics",
]

DEFAULT_PRIOR = 32.0
"""Source pseudo-samples blended with the target statistics by default.

From a sweep on the digits transfer benchmark (``benchmarks/transfer.md``): adapting on 50 target images,
32 kept the source statistics at 0.39 of the weight and was level with or better than both frozen and
training statistics on every shift, where 0 (plain AdaBN) was not. The weight is ``N / (N + n)``.
"""

AUTO_BATCHES = 50
"""The training batches ``GradualUnfreeze(adapt="auto")`` re-estimates on (the epoch's, if it has fewer): per-channel
means and variances settle long before that, and on a large data set the pass costs 50 forward passes, not an epoch.
The benchmarks' epochs are shorter (5 to 10 batches): there it is the whole epoch."""


def check_prior(value: object, argument: str = "prior") -> None:
    """Raise unless ``value`` is a finite number >= 0: a count of source pseudo-samples."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return
    raise ValueError(f"`{argument}` must be a number of source pseudo-samples >= 0, got {value!r}.")


class AdaBN:
    """Re-estimate the frozen norm layers' statistics on the training data before the first step (AdaBN).

    The statistics are exact averages over the batches, blended with the source statistics, which
    count as ``prior`` samples against the ``n`` target samples (Schneider et al. 2020): ``N/(N+n)`` of
    each statistic is the source's; ``prior=0`` is plain AdaBN (Li et al. 2016). A resumed fit keeps
    the statistics of its checkpoint.

    Args:
        batches: training batches to adapt on, or a fraction of the training epoch in (0, 1].
        prior: source pseudo-samples (default: the best of a sweep, see :data:`DEFAULT_PRIOR`).
        on_release: with ``GradualUnfreeze``, adapt again after each release the layers still frozen then.

    Raises:
        ValueError: a bad argument, naming it and its value.
    """

    def __init__(self, batches: int | float = 1.0, prior: float = DEFAULT_PRIOR, on_release: bool = False) -> None:
        if not (isinstance(batches, int) and not isinstance(batches, bool) and batches >= 1) and not (
            isinstance(batches, float) and 0 < batches <= 1
        ):
            raise ValueError(
                f"`batches` must be a number of batches >= 1 or a fraction of an epoch in (0, 1], got {batches!r}."
            )
        check_prior(prior, "prior")
        self.batches = batches
        self.prior = float(prior)
        self.on_release = on_release

    def __repr__(self) -> str:
        return f"AdaBN(batches={self.batches}, prior={self.prior:g}, on_release={self.on_release})"


def adapt_norm_statistics(
    model: nn.Module,
    layers: Sequence[NormBase],
    batches: Iterable[Any],
    forward: Callable[[Any], object] | None = None,
    process_group: dist.ProcessGroup | None = None,
    prior: float = 0.0,
) -> int:
    """Set the running statistics of ``layers`` to those of their inputs over ``batches``.

    Args:
        model: the module that holds ``layers``; run in eval mode for the pass, modes restored.
        layers: the norm layers to re-estimate (layers without running statistics normalise with
            each batch's own and are left alone).
        batches: what ``forward`` takes, one item per batch.
        forward: runs the model on one batch; ``model(batch)`` by default.
        process_group: under ``torch.distributed``, the statistics are those of all ranks' batches
            (one all-reduce); ``None`` means the default group when one is initialised.
        prior: ``N``, the number of source pseudo-samples the layers' current statistics count for
            against the ``n`` samples of ``batches`` (over all ranks): ``0`` (default) keeps only the
            batches' statistics, a large value keeps the current ones (see the module's docstring).

    Returns:
        The number of batches used on this rank.
    """
    check_prior(prior)
    moments = [NormMoments(layer, prior) for layer in dict.fromkeys(layers) if layer.running_mean is not None]
    try:
        hooks = [(m.layer, m.normalise_with_statistics_so_far) for m in moments]
        used = observe(model, hooks, batches, forward if forward is not None else model)
        all_reduce(moments, process_group)
    except BaseException:
        for m in moments:
            if m.sums is not None:
                m.write(*m.source)
        raise
    for m in moments:
        if m.sums is not None:
            mean, unbiased, _ = m.statistics()
            seen = m.sums[-1] > 0  # on no rank otherwise: keep the statistics (no host sync on this device)
            m.write(torch.where(seen, mean, m.source[0]), torch.where(seen, unbiased, m.source[1]))
    return used


def saved_norm_statistics(layers: Sequence[NormBase]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of each layer's ``(running_mean, running_var)`` (layers with running statistics only)."""
    return [tuple(stat.detach().clone() for stat in running_statistics(layer)) for layer in layers]  # type: ignore[misc]


def restore_norm_statistics(layers: Sequence[NormBase], saved: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the statistics of :func:`saved_norm_statistics` back into ``layers`` (the same layers, in the same order)."""
    if len(saved) != len(layers):
        raise ValueError(f"{len(saved)} saved statistics for {len(layers)} norm layers.")
    with torch.no_grad():
        for layer, values in zip(layers, saved, strict=True):
            for stat, value in zip(running_statistics(layer), values, strict=True):
                stat.copy_(value)
