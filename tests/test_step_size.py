"""The step-size measures behind ``bn="auto"`` and ``max_step``: what they predict is what torch's optimizers do."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_bnfreeze.step_size import FirstStep, step_now


def layer_with_gradient(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(6, 5)
    layer(torch.randn(8, 6)).square().sum().backward()
    return layer


@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.SGD(params, lr=0.05),
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1),
        lambda params: torch.optim.Adam(params, lr=0.01),
        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.0),
    ],
    ids=["sgd", "momentum-sgd-weight-decay", "adam", "adamw"],
)
def test_step_now_predicts_the_first_step_torchs_optimizer_takes(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    layer = layer_with_gradient()
    optimizer = make(list(layer.parameters()))
    [group] = optimizer.param_groups
    predicted = step_now([(group, group["lr"])])
    probe = FirstStep(layer.parameters())
    optimizer.step()
    assert predicted > 0
    assert predicted == pytest.approx(probe.change(), rel=1e-4)  # momentum left out: the first step has none


def test_step_now_scales_with_the_rate_and_ignores_biases_and_missing_gradients() -> None:
    layer = layer_with_gradient()
    group = {"params": list(layer.parameters()), "weight_decay": 0.0}
    assert step_now([(group, 0.2)]) == pytest.approx(2 * step_now([(group, 0.1)]))
    with torch.no_grad():
        layer.bias.grad.mul_(1000)  # type: ignore[union-attr]
    assert step_now([(group, 0.1)]) == pytest.approx(
        0.1 * layer.weight.grad.norm().item() / layer.weight.norm().item()  # type: ignore[union-attr]
    )
    layer.zero_grad(set_to_none=True)
    assert step_now([(group, 0.1)]) == 0.0
