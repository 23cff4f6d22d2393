"""The step-size measures behind ``bn="auto"`` and ``max_step``: what they predict is what torch's optimizers do."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_bnfreeze.first_steps import FirstSteps
from lightning_bnfreeze.fsdp import squared_norm
from lightning_bnfreeze.step_size import FirstStep, adam_step_bound, normalises_first_step, step_now


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


def moved_fast(steps: FirstSteps, index: int, params: list[nn.Parameter]) -> tuple[float, object]:
    """Release ``index`` frees one part (``params``); its first step moves every parameter by 5 %."""
    steps.expect(index, 1)
    steps.snapshot(lambda part: params)
    with torch.no_grad():
        for param in params:
            param.mul_(1.05)
    return steps.judge((index, 0), f"part {index}", momentum=0.0, ramp=1.0)


@pytest.mark.parametrize("bn", ["train", "auto"])
def test_a_part_of_norm_layers_alone_is_not_judged(bn: str) -> None:
    """Its parameters are 1-D: there is no first step to measure, so no cap, no warning, and no release after a fast
    one stops norm layers training on its account."""
    steps = FirstSteps(bn)
    conv = nn.Conv2d(3, 4, 3)
    if bn == "auto":
        moved_fast(steps, 0, list(conv.parameters()))
        assert steps.decide()[0][1] is True  # the first release moved fast: norm layers train
    scale, note = moved_fast(steps, 1, list(nn.BatchNorm2d(4).parameters()))
    assert (scale, note) == (1.0, None)
    assert steps.decide() == []
    assert steps.norms_train is (True if bn == "auto" else None)


def test_the_decision_names_the_largest_of_its_releases_first_steps() -> None:
    """Two parts released together: the one that moved further decides, and the line says it was the larger."""
    steps = FirstSteps("auto")
    slow, fast = nn.Linear(4, 4), nn.Linear(4, 4)
    steps.expect(0, 2)
    steps.snapshot(lambda part: [slow.weight, fast.weight][part[1] : part[1] + 1])
    with torch.no_grad():
        slow.weight.mul_(1.001)
        fast.weight.mul_(1.05)
    for position, name in enumerate(("slow", "fast")):
        steps.judge((0, position), name, momentum=0.0, ramp=1.0)
    ((since, trains, note),) = steps.decide()
    assert (since, trains) == (0, True)
    assert note.text.startswith("fast: its first step moved its weights by 5.00%, the largest of its release's 2 (>")


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-8, 1.0, 1e3], ids=lambda s: f"gradients-{s:g}")
def test_adam_step_bound_holds_whatever_the_gradient(optimizer: type[torch.optim.Adam], scale: float) -> None:
    """Gradients of every size around Adam's ``eps`` (1e-8), some elements without gradient, weight decay."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    bound = adam_step_bound(layer.parameters(), lr=0.01, weight_decay=0.1)
    for param in layer.parameters():
        param.grad = torch.randn_like(param) * scale * (torch.rand_like(param) > 0.2)
    probe = FirstStep(layer.parameters())
    optimizer(layer.parameters(), lr=0.01, weight_decay=0.1).step()
    assert 0 < probe.change() <= bound


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_step_bound_is_the_step_when_every_element_has_a_large_gradient(optimizer: type[torch.optim.Adam]) -> None:
    layer = layer_with_gradient()
    bound = adam_step_bound(layer.parameters(), lr=0.01)
    assert adam_step_bound(layer.parameters(), lr=0.02) == pytest.approx(2 * bound)
    probe = FirstStep(layer.parameters())
    optimizer(layer.parameters(), lr=0.01, weight_decay=0.0).step()
    assert probe.change() == pytest.approx(bound, rel=1e-5)


def test_only_adam_and_adamw_themselves_have_a_first_step_known_in_advance() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    params = list(nn.Linear(2, 2).parameters())
    known = [torch.optim.Adam, torch.optim.AdamW]
    unknown = [torch.optim.SGD, torch.optim.RAdam, torch.optim.NAdam, MyAdam]  # RAdam: SGD-like first steps
    assert [normalises_first_step(make(params, lr=0.1)) for make in known + unknown] == [True, True] + [False] * 4


def test_squared_norm_takes_the_tensors_one_at_a_time_in_double_precision_without_touching_them() -> None:
    tensors = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([[1.0, 2.0]], dtype=torch.float16)]
    kept = [tensor.clone() for tensor in tensors]
    assert squared_norm(tensor for tensor in tensors) == 30.0  # a generator: one at a time
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(tensors, kept, strict=True))  # float64: not squared
