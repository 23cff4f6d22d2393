"""The default schedule of ``GradualUnfreeze`` on every model ``tests/model_zoo.py`` builds (issue 10's coverage).

Every torchvision classifier, the timm models and the Hugging Face models, each the ``backbone`` of a module with
a head of its own: by the end of the default schedule every backbone parameter is released exactly once, each block
whole, output side first, the stem last, in more than one release when there is more than one block; with
``LayerDecay`` every block is released at once at its depth's factor. The defaults are read from the signatures of
``Blocks``, ``LayerDecay`` and ``Every``, never restated here; the second setting differs from the defaults in both
the granularity and the blocks per release, whatever the defaults are.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bnfreeze import Blocks, Every, GradualUnfreeze, LayerDecay
from lightning_bnfreeze.blocks import GRANULARITIES, Block, find_blocks
from lightning_bnfreeze.plan import ReleasePlan
from tests.model_zoo import HF_MODELS, TIMM_MODELS, TORCHVISION_MODELS, hf_models, timm_model, torchvision_model


def defaults(cls: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


BLOCKS = defaults(Blocks)
MODELS = [
    *(f"torchvision:{name}" for name in TORCHVISION_MODELS),
    *(f"timm:{name}" for name in TIMM_MODELS),
    *(f"transformers:{name}" for name in [*HF_MODELS, "bert_for_classification"]),
]
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "other": {
        "granularity": next(g for g in GRANULARITIES if g != BLOCKS["granularity"]),
        "per_release": 1 if BLOCKS["per_release"] != 1 else 2,
    },
}


class WithHead(nn.Module):
    """``backbone`` and a head of its own, which no release may touch."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2, 2, device="meta")


@functools.cache
def holder(model: str) -> WithHead:
    source, name = model.split(":")
    if source == "torchvision":
        return WithHead(torchvision_model(name))
    if source == "timm":
        return WithHead(timm_model(name))
    torch.manual_seed(0)
    return WithHead(hf_models()[name][0]())


@functools.cache
def blocks_of(model: str, granularity: str) -> list[Block]:
    return find_blocks(holder(model).backbone, "backbone", granularity)


def backbone_params(module: WithHead) -> list[str]:
    return [name for name, _ in module.named_parameters() if name.startswith("backbone.")]


def schedule_faults(plan: ReleasePlan, blocks: Sequence[Block], params: Sequence[str], per_release: int) -> list[str]:
    """The properties of a cadence schedule that ``plan`` breaks, for ``blocks`` (input side first) of ``params``."""
    released = [name for release in plan.releases for part in release for name in part.params]
    release_of = {name: k for k, release in enumerate(plan.releases) for part in release for name in part.params}
    faults = []
    if plan.frozen_params != 0 or sorted(released) != sorted(params):
        faults.append("every parameter released exactly once")
    if any(len({release_of.get(name) for name in block.params}) != 1 for block in blocks):
        faults.append("each block whole")
    if [part.params for release in plan.releases for part in release] != [b.params for b in reversed(blocks)]:
        faults.append("output side first")
    if not plan.releases or any(release_of.get(name) != len(plan.releases) - 1 for name in blocks[0].params):
        faults.append("the stem in the last release")
    if len(plan.releases) != math.ceil(len(blocks) / per_release):
        faults.append(f"{per_release} block(s) per release")
    return faults


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model", MODELS)
def test_the_default_schedule_releases_every_block_whole_output_side_first(model: str, setting: str) -> None:
    module = holder(model)
    config = {**BLOCKS, **SETTINGS[setting]}
    callback = GradualUnfreeze(what=Blocks(**SETTINGS[setting])) if SETTINGS[setting] else GradualUnfreeze()
    plan = callback.plan(module)
    blocks = blocks_of(model, config["granularity"])
    assert schedule_faults(plan, blocks, backbone_params(module), config["per_release"]) == []
    if setting == "defaults" and len(blocks) > 1:
        assert len(plan.releases) > 1
    assert isinstance(callback.when, Every) and callback.when.unit == "epoch"
    assert callback.when.first >= 1  # epoch 0 trains the head alone
    times = callback.when.times(len(plan.releases))
    assert times == [callback.when.first + k * callback.when.every for k in range(len(plan.releases))]
    for k, release in enumerate(plan.releases):
        for part in release:
            assert part.lr_factor == pytest.approx(config["decay"] ** k)


@pytest.mark.parametrize("model", MODELS)
def test_layer_decay_releases_every_block_at_once_at_its_depths_factor(model: str) -> None:
    module = holder(model)
    callback = GradualUnfreeze(what=LayerDecay(0.75))
    plan = callback.plan(module)
    blocks = blocks_of(model, defaults(LayerDecay)["granularity"])
    assert plan.frozen_params == 0
    assert callback.when.times(len(plan.releases)) == Every().times(1)
    [parts] = plan.releases
    assert [part.params for part in parts] == [block.params for block in reversed(blocks)]
    assert sorted(name for part in parts for name in part.params) == sorted(backbone_params(module))
    for depth, part in enumerate(parts):
        assert part.lr_factor == pytest.approx(0.75**depth)


def test_the_second_setting_differs_from_the_defaults() -> None:
    """No repeated cases: the parametrized settings give different plans."""
    module = holder("torchvision:resnet18")
    plans = [GradualUnfreeze(what=Blocks(**setting)).plan(module) for setting in SETTINGS.values()]
    assert plans[0].releases != plans[1].releases


def test_schedule_faults_catches_broken_schedules() -> None:
    """Controls: a schedule input side first, one missing its last release, one splitting blocks (stages)."""
    model = "torchvision:resnet18"
    module = holder(model)
    params = backbone_params(module)
    fine = blocks_of(model, "block")
    plan = Blocks(per_release=1, granularity="block").plan(module, "backbone")
    assert schedule_faults(plan, fine, params, 1) == []
    input_first = replace(plan, releases=plan.releases[::-1])
    assert schedule_faults(input_first, fine, params, 1) == ["output side first", "the stem in the last release"]
    unfinished = replace(plan, releases=plan.releases[:-1])
    assert "every parameter released exactly once" in schedule_faults(unfinished, fine, params, 1)
    stages = blocks_of(model, "stage")
    assert schedule_faults(plan, stages, params, 1) == [
        "each block whole",
        "output side first",
        "1 block(s) per release",
    ]
