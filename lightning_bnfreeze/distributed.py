"""Average the gradients that DistributedDataParallel does not, as its reducer does, in plain PyTorch.

DDP builds its reducer from the parameters that require grad when it wraps the model; parameters
frozen then and released later are left out, so without this their gradients stay per-rank and
the replicas drift apart. :class:`GradientSync` reduces them the way DDP's reducer reduces the
others: in buckets that every rank reduces in the same order, each launched as soon as its
gradients are ready during backward (overlapped with the rest of it), zeros standing in for a
gradient that a rank did not produce (a parameter left as ``None`` only when no rank produced
one), sparse gradients (``nn.Embedding(sparse=True)``) reduced as sparse tensors, all before
``backward`` hands back, so before a gradient scaler checks for infs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from lightning_bnfreeze.fsdp import reduce_unused_gradients
from lightning_bnfreeze.internals import ddp_ignored_names, ddp_process_group, ddp_syncs_gradients, sparse_nnz

__all__ = ["BUCKET_BYTES", "GradientSync", "ddp_reduced_parameters", "sparse_gradient_parameters"]

BUCKET_BYTES = 25 * 2**20
"""Largest dense bucket, DDP's default (``bucket_cap_mb=25``)."""


def ddp_reduced_parameters(model: DistributedDataParallel) -> set[int]:
    """Ids of the parameters whose gradients ``model``'s reducer averages, read right after DDP wrapped the model.

    Those that required grad then (and were not ignored): this reads ``requires_grad`` now.
    """
    ignored = ddp_ignored_names(model)
    return {id(param) for name, param in model.module.named_parameters() if param.requires_grad and name not in ignored}


def sparse_gradient_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that get sparse gradients: ``nn.Embedding``/``EmbeddingBag`` weights with ``sparse=True``.

    Decided from the modules, as DDP does, so that every rank agrees even where one gets no gradient.
    """
    return {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse
    }


@dataclass(eq=False)
class _Bucket:
    """Parameters reduced together: dense ones of one dtype and device, or one sparse parameter."""

    params: list[nn.Parameter]
    sparse: bool
    ready: int = 0  # parameters whose gradient is ready in this backward
    work: dist.Work | None = None
    buffer: Tensor | None = None


class GradientSync:
    """Average the gradients of released parameters that ``model``'s DDP reducer leaves out, as DDP does.

    :meth:`track` the parameters when they are released; call :meth:`finish_backward` after every
    backward (Lightning's ``on_after_backward``): it reduces what is still pending and writes the
    averages into ``.grad``. As with DDP, only a backward pass after a forward pass of ``model`` with
    grad enabled and outside ``model.no_sync()`` reduces. The reductions use a process group of
    their own, so that they never interleave with DDP's.
    Only for a ``DistributedDataParallel``: construct it right after DDP wrapped the model, before
    any release (the parameters that require grad then are DDP's). FSDP2 (``fully_shard``) reduces
    every gradient itself: :meth:`track` only keeps its reductions alike on every rank for released
    parameters some rank did not use (:func:`~lightning_bnfreeze.fsdp.reduce_unused_gradients`).
    """

    def __init__(self, model: nn.Module | None, bucket_bytes: int = BUCKET_BYTES) -> None:
        self._model = model
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self._reduced: set[int] = set()
        self._sparse: set[int] = set()
        if self._ddp is not None:
            self._reduced = ddp_reduced_parameters(self._ddp)
            self._sparse = sparse_gradient_parameters(self._ddp)
        self._bucket_bytes = bucket_bytes
        self._group: dist.ProcessGroup | None = None
        self._buckets: list[_Bucket] = []
        self._launched = 0  # buckets launched in this backward: always a prefix, the same order on every rank
        self._hooks: list[RemovableHandle] = []
        self._expecting = False  # whether the last forward pass of the model is one whose backward reduces
        self.params: list[nn.Parameter] = []

    def track(self, params: Sequence[nn.Parameter]) -> None:
        """Average these parameters' gradients from now on, unless DDP's reducer already does.

        Every rank must track the same parameters in the same order.
        """
        if self._ddp is None:
            if self._model is not None:
                reduce_unused_gradients(self._model, params)
            return
        tracked = {id(param) for param in self.params}
        new = [param for param in params if id(param) not in self._reduced and id(param) not in tracked]
        if not new:
            return
        if self._group is None:
            group = dist.new_group(dist.get_process_group_ranks(ddp_process_group(self._ddp)))
            assert isinstance(group, dist.ProcessGroup)  # this rank is in DDP's group
            self._group = group
            self._hooks.append(self._ddp.register_forward_pre_hook(self._on_forward))
        self.params += new
        for bucket in self._bucket(new[::-1]):  # gradients get ready roughly from the output side
            self._buckets.append(bucket)
            self._hooks += [
                param.register_post_accumulate_grad_hook(self._on_ready(bucket))  # type: ignore[no-untyped-call]
                for param in bucket.params
            ]

    def finish_backward(self) -> None:
        """Reduce every bucket not launched yet, wait for all, and write the averages into ``.grad``."""
        if not self._syncing():
            return
        for bucket in self._buckets[self._launched :]:
            self._launch(bucket)
        for bucket in self._buckets:
            self._unpack(bucket)
        self._launched = 0
        self._expecting = False

    def close(self) -> None:
        """Remove the hooks from the parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _on_forward(self, model: nn.Module, args: object) -> None:
        assert self._ddp is not None
        self._expecting = torch.is_grad_enabled() and ddp_syncs_gradients(self._ddp)

    def _syncing(self) -> bool:
        return self._expecting and bool(self._buckets)

    def _bucket(self, params: Sequence[nn.Parameter]) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        size = 0
        for param in params:
            if id(param) in self._sparse:
                buckets.append(_Bucket([param], sparse=True))
                continue
            last = buckets[-1] if buckets else None
            nbytes = param.numel() * param.element_size()
            if (
                last is None
                or last.sparse
                or (last.params[0].dtype, last.params[0].device) != (param.dtype, param.device)
                or size + nbytes > self._bucket_bytes
            ):
                buckets.append(_Bucket([param], sparse=False))
                size = 0
            else:
                last.params.append(param)
            size += nbytes
        return buckets

    def _on_ready(self, bucket: _Bucket) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            if not self._syncing():
                return
            if bucket.work is not None:
                raise RuntimeError(
                    "GradientSync: a released parameter's gradient was accumulated twice in one backward pass, after"
                    " it was reduced (reentrant activation checkpointing?): use `use_reentrant=False`."
                )
            bucket.ready += 1
            # In order: a bucket waits for those before it, so that every rank launches the same sequence.
            while self._launched < len(self._buckets) and self._buckets[self._launched].ready == len(
                self._buckets[self._launched].params
            ):
                self._launch(self._buckets[self._launched])

        return hook

    def _launch(self, bucket: _Bucket) -> None:
        world = dist.get_world_size(self._group)
        if bucket.sparse:
            (param,) = bucket.params
            grad = param.grad.coalesce() if param.grad is not None else _empty_sparse_like(param)
            bucket.buffer = grad / world
        else:
            # Gradients (zeros where missing), then one flag per parameter: whether this rank has its gradient.
            first = bucket.params[0]
            flags = torch.tensor([p.grad is not None for p in bucket.params], dtype=first.dtype, device=first.device)
            bucket.buffer = torch.cat([*(_flat_gradient(param) for param in bucket.params), flags])
            bucket.buffer[: -len(flags)].div_(world)
        bucket.work = dist.all_reduce(bucket.buffer, group=self._group, async_op=True)
        self._launched += 1

    def _unpack(self, bucket: _Bucket) -> None:
        assert bucket.work is not None and bucket.buffer is not None
        bucket.work.wait()
        reduced, bucket.work, bucket.buffer, bucket.ready = bucket.buffer, None, None, 0
        if bucket.sparse:
            if sparse_nnz(reduced) > 0:
                bucket.params[0].grad = reduced
            return
        sizes = [param.numel() for param in bucket.params]
        values, flags = reduced[: sum(sizes)], reduced[sum(sizes) :]
        for param, value, used in zip(bucket.params, torch.split(values, sizes), flags.tolist(), strict=True):
            if used > 0:  # else no rank has a gradient for it: it stays None, as with DDP
                param.grad = value.view_as(param)


def _flat_gradient(param: nn.Parameter) -> Tensor:
    if param.grad is None:
        return torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
    return (param.grad.to_dense() if param.grad.is_sparse else param.grad).reshape(-1)


def _empty_sparse_like(param: nn.Parameter) -> Tensor:
    indices = torch.empty((1, 0), dtype=torch.long, device=param.device)
    values = torch.empty((0, *param.shape[1:]), dtype=param.dtype, device=param.device)
    return torch.sparse_coo_tensor(indices, values, param.shape, check_invariants=True)
