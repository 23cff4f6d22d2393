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

The sums live on the inputs' device, in float64, except on MPS, which has no float64: there they are
float32, so a channel whose mean is large against its spread gets a less accurate variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_bnfreeze.internals import InstanceNormBase, NormBase

__all__ = ["DEFAULT_PRIOR", "AdaBN", "adapt_norm_statistics", "check_prior"]

DEFAULT_PRIOR = 32.0
"""Source pseudo-samples blended with the target statistics by default.

From a sweep on the digits transfer benchmark (``benchmarks/transfer.md``): adapting on 50 target images,
32 kept the source statistics at 0.39 of the weight and was level with or better than both frozen and
training statistics on every shift, where 0 (plain AdaBN) was not. The weight is ``N / (N + n)``.
"""


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


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _running_statistics(layer: NormBase) -> tuple[Tensor, Tensor]:
    running_mean, running_var = layer.running_mean, layer.running_var
    assert isinstance(running_mean, Tensor) and isinstance(running_var, Tensor)
    return running_mean, running_var


class _Moments:
    """What one norm layer saw, ``sums = [first (C), second (C), count, samples]``, and its statistics before.

    BatchNorm: per-channel sums of values and of squares over samples and positions, ``count``
    positions. InstanceNorm: sums of per-instance means and unbiased variances, ``count`` instances.
    ``samples`` counts the inputs' first dimension: the ``n`` the prior is weighed against.
    """

    def __init__(self, layer: NormBase, prior: float) -> None:
        self.layer = layer
        self.prior = prior
        self.per_instance = isinstance(layer, InstanceNormBase)
        self.sums: Tensor | None = None  # made at the first input: a Lazy layer has no size before
        self.source: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))

    def start(self, device: torch.device) -> Tensor:
        """The sums, made (zero) on ``device`` the first time, when the source statistics are saved."""
        if self.sums is None:
            self.sums = torch.zeros(2 * self.layer.num_features + 2, dtype=_accumulation_dtype(device), device=device)
            running_mean, running_var = _running_statistics(self.layer)
            self.source = (running_mean.clone(), running_var.clone())
        return self.sums

    def add(self, x: Tensor) -> None:
        sums = self.start(x.device)
        flat = x.detach().to(sums.dtype).movedim(1, 0).flatten(2 if self.per_instance else 1)
        if self.per_instance:
            first, second = flat.mean(-1).sum(1), flat.var(-1, correction=1).sum(1)
        else:
            first, second = flat.sum(1), flat.square().sum(1)
        sums += torch.cat([first, second, first.new_tensor([flat.shape[1], x.shape[0]])])

    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, unbiased variance, biased variance) of what was added, blended with the source's by the prior."""
        assert self.sums is not None
        (first, second), (count, samples) = self.sums[:-2].chunk(2), self.sums[-2:]
        mean = first / count
        if self.per_instance:
            unbiased = biased = second / count
        else:
            biased = (second / count - mean.square()).clamp_min(0)
            unbiased = biased * count / (count - 1).clamp_min(1)
        if not self.prior:
            return mean, unbiased, biased
        weight = self.prior / (self.prior + samples)  # the source's
        source_mean, source_var = (stat.to(mean) for stat in self.source)
        return (
            torch.lerp(mean, source_mean, weight),
            torch.lerp(unbiased, source_var, weight),
            torch.lerp(biased, source_var, weight),
        )

    def write(self, mean: Tensor, var: Tensor) -> None:
        running_mean, running_var = _running_statistics(self.layer)
        running_mean.copy_(mean)
        running_var.copy_(var)

    def normalise_with_statistics_so_far(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: add the input; the layer (in inference mode) normalises it with the statistics so far."""
        self.add(args[0])
        mean, _, biased = self.statistics()
        self.write(mean, biased)


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
    run = forward if forward is not None else model
    moments = [_Moments(layer, prior) for layer in dict.fromkeys(layers) if layer.running_mean is not None]
    modes = {module: module.training for module in model.modules()}
    hooks = [m.layer.register_forward_pre_hook(m.normalise_with_statistics_so_far) for m in moments]
    used = 0
    try:
        model.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # the hooks accumulate in Python
            for batch in batches:
                run(batch)
                used += 1
        _all_reduce(moments, process_group)
    except BaseException:
        for m in moments:
            if m.sums is not None:
                m.write(*m.source)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    for m in moments:
        if m.sums is not None:
            mean, unbiased, _ = m.statistics()
            seen = m.sums[-1] > 0  # on no rank otherwise: keep the statistics (no host sync on this device)
            m.write(torch.where(seen, mean, m.source[0]), torch.where(seen, unbiased, m.source[1]))
    return used


def _all_reduce(moments: Sequence[_Moments], process_group: dist.ProcessGroup | None) -> None:
    """Sum each layer's sums over the ranks (one collective), when ``torch.distributed`` is initialised."""
    if not (dist.is_available() and dist.is_initialized()) or not moments:
        return
    sums = [m.start(_running_statistics(m.layer)[0].device) for m in moments]  # zeros where no batch reached it
    flat = torch.cat(sums)
    dist.all_reduce(flat, group=process_group)
    for m, reduced in zip(moments, torch.split(flat, [s.numel() for s in sums]), strict=True):
        m.sums = reduced
