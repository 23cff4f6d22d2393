"""Test configuration shared by the test suite."""

import pytest
import torch


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
