"""A tensor's copy on a device of its own: put back bitwise, laid out again as the tensor was (sharded too)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_bnfreeze.step_size import FirstStep
from lightning_bnfreeze.tensor_copy import TensorCopy


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_copy_keeps_the_values_it_was_taken_with_and_puts_them_back(device: str | None) -> None:
    weight = torch.randn(3, 4)
    before = weight.clone()
    copy = TensorCopy.of(weight, device)
    weight.mul_(2.0)
    assert torch.equal(copy.values, before) and copy.values.device == torch.device("cpu")
    rebuilt = copy.tensor()
    assert torch.equal(rebuilt, before) and rebuilt.data_ptr() != copy.values.data_ptr()  # a new tensor each time
    assert copy.tensor(copy=False) is copy.values  # to read: no copy where the values are already
    copy.put_back(weight)
    assert torch.equal(weight, before)
    assert torch.equal(copy.whole(), before) and copy.whole().data_ptr() != copy.values.data_ptr()


def test_a_meta_tensor_s_copy_stays_on_the_meta_device() -> None:
    copy = TensorCopy.of(torch.empty(2, 3, device="meta"), "cpu")  # a preview's model: no values to move
    assert copy.values.is_meta and copy.tensor().is_meta and copy.tensor().shape == (2, 3)
    assert copy.device == torch.device("meta")


def test_a_parameter_is_put_back_in_place_without_autograd() -> None:
    layer = torch.nn.Linear(2, 2)
    copy = TensorCopy.of(layer.weight, "cpu")
    with torch.no_grad():
        layer.weight.add_(1.0)
    storage = layer.weight.data_ptr()
    copy.put_back(layer.weight)  # would raise for a leaf that requires grad outside no_grad
    assert torch.equal(layer.weight, copy.values) and layer.weight.data_ptr() == storage


def test_a_sharded_tensor_is_copied_sharded_beside_it_whatever_the_device_asked(
    process_group: dist.ProcessGroup,
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    whole = torch.arange(12.0).reshape(4, 3)
    sharded = distribute_tensor(whole, mesh, [Shard(0)])
    copy = TensorCopy.of(sharded, "cpu")
    assert isinstance(copy.values, DTensor) and copy.values.placements == (Shard(0),)
    assert copy.values.to_local().data_ptr() != sharded.to_local().data_ptr()
    with torch.no_grad():
        sharded.to_local().zero_()
    rebuilt = copy.tensor()
    assert isinstance(rebuilt, DTensor) and rebuilt.to_local().data_ptr() != copy.values.to_local().data_ptr()
    assert copy.tensor(copy=False) is copy.values
    assert torch.equal(copy.whole(), whole)
    copy.put_back(sharded)
    assert torch.equal(sharded.full_tensor(), whole)


def test_the_first_step_measure_keeps_the_weights_before_it_on_the_cpu() -> None:
    layer = torch.nn.Linear(4, 4)
    probe = FirstStep(layer.parameters())
    (kept,) = (copy for _, copy in probe._before)  # the weight alone: ndim >= 2
    assert kept.values.device == torch.device("cpu") and kept.values.data_ptr() != layer.weight.data_ptr()
    with torch.no_grad():
        layer.weight.mul_(1.02)
    assert probe.change() == pytest.approx(0.02, rel=1e-5)  # float32 weights
