"""Test configuration shared by the test suite."""

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


def pytest_configure(config: pytest.Config) -> None:
    # The tests run tiny batches: intra-op threads only add overhead, and on a busy 2-core CI machine
    # they make each training step several times slower.
    torch.set_num_threads(1)
    # Lightning's advice for real training jobs, which tiny test runs trigger, and its own deprecation noise.
    for message in (
        "The '.*dataloader' does not have many workers",
        "The number of training batches .* is smaller than the logging interval",
        "You defined a `validation_step` but have no `val_dataloader`",
        "Total length of .* across ranks is zero",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    ):
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


CUDA_SUITE = "the CUDA suite (compile tests on CUDA, DDP over NCCL, FSDP2, AdaBN and loss-check copies on CUDA)"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Without a GPU every test marked `cuda` skips here, from one place: `pytest -m cuda -rs` says so in one line.
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device: skipped {CUDA_SUITE}")


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine now: a gloo group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def process_group(free_port: int) -> Iterator[dist.ProcessGroup]:
    """A single-process gloo group, destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        assert isinstance(group, dist.ProcessGroup)
        yield group
    finally:
        dist.destroy_process_group()
