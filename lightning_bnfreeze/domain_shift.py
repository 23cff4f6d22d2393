"""How far the target data sits from a pretrained backbone's source: its frozen norm layers' statistics on
target batches against their own running statistics (plain PyTorch).

For each channel of a layer the two statistics are two Gaussians; the shift is the KL divergence of the target's
from the source's, ``0.5 * (v_t / v_s + (m_t - m_s) ** 2 / v_s - 1 - log(v_t / v_s))`` (each variance plus the
layer's ``eps``), averaged over the channels, then over the layers. It is measured in one eager pass, the layers
in inference mode (each normalising with its source statistics, as the frozen backbone does), and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_bnfreeze.internals import NormBase
from lightning_bnfreeze.norm_moments import NormMoments, all_reduce, observe

__all__ = ["NEAR_SOURCE", "norm_statistics_shift"]

NEAR_SOURCE = 0.7
"""The shift below which ``GradualUnfreeze(max_step="auto")`` treats the target as near the source. On the
benchmarks' tasks the shift is stable to a few hundredths over seeds and K: EfficientNet-Lite0's ImageNet weights
measure 0.44 to 0.46 on photograph crops (``textures``) and 0.88 to 0.91 on upsampled digits; the digits CNN 0.04
to 0.56 on its shifts (``benchmarks/domain_shift.md`` has Lite1 and Lite2 too). On ``textures`` a cap on the
input-side blocks' steps won at every SGD rate, on ``digits`` it lost at 1e-2 (``benchmarks/transfer_real.md``):
the line sits between the two tasks, not at a measured optimum."""


def norm_statistics_shift(
    model: nn.Module,
    layers: Sequence[NormBase],
    batches: Iterable[Any],
    forward: Callable[[Any], object] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> float | None:
    """The shift (see the module's docstring) of ``layers``' inputs over ``batches`` from their running statistics.

    Args:
        model: the module that holds ``layers``; run in eval mode for the pass, modes restored.
        layers: the norm layers to compare (layers without running statistics are left out).
        batches: what ``forward`` takes, one item per batch.
        forward: runs the model on one batch; ``model(batch)`` by default.
        process_group: under ``torch.distributed``, over all ranks' batches (one all-reduce; every rank gets the
            same value); ``None`` means the default group when one is initialised.

    Returns:
        The shift, or ``None`` when no layer with running statistics saw an input.
    """
    moments = [NormMoments(layer) for layer in dict.fromkeys(layers) if layer.running_mean is not None]
    observe(model, [(m.layer, m.record) for m in moments], batches, forward if forward is not None else model)
    all_reduce(moments, process_group)
    divergences = [_divergence(m) for m in moments if m.sums is not None and float(m.sums[-2]) > 1]
    return sum(divergences) / len(divergences) if divergences else None


def _divergence(moments: NormMoments) -> float:
    """The mean over channels of KL(target || source) of one layer."""
    mean, _, biased = moments.statistics()
    source_mean, source_var = (stat.to(mean) for stat in moments.source)
    eps = float(moments.layer.eps)
    ratio = (biased + eps) / (source_var + eps)
    kl = 0.5 * (ratio + (mean - source_mean).square() / (source_var + eps) - 1 - torch.log(ratio))
    return float(kl.mean())
