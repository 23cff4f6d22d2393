"""The default schedule of ``GradualUnfreeze`` on every model ``tests/test_blocks.py`` covers (issue 10's coverage).

Every torchvision classifier, the timm models and the Hugging Face models, each the ``backbone`` of a module with
a head of its own: by the end of the default schedule every backbone parameter is released exactly once, each block
whole, output side first, the stem last, in more than one release when there is more than one block; with
``layer_decay`` every block is released at once at its depth's factor. The defaults are read from the signature of
``GradualUnfreeze``, never restated here.
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

from lightning_bnfreeze.blocks import Block, find_blocks
from lightning_bnfreeze.callbacks.gradual_unfreeze import GradualUnfreeze
from lightning_bnfreeze.schedule import ReleasePlan, plan_blocks
from tests.test_blocks import HF_MODELS, TIMM_MODELS, TORCHVISION_MODELS, _hf_models, timm_model, torchvision_model

DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(GradualUnfreeze).parameters.items()}
MODELS = [
    *(f"torchvision:{name}" for name in TORCHVISION_MODELS),
    *(f"timm:{name}" for name in TIMM_MODELS),
    *(f"transformers:{name}" for name in [*HF_MODELS, "bert_for_classification"]),
]
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "block": {"granularity": "block"},
    "stage": {"granularity": "stage"},
    "two_per_release": {"blocks_per_release": 2},
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
    return WithHead(_hf_models()[name][0]())


@functools.cache
def blocks_of(model: str, granularity: str) -> list[Block]:
    return find_blocks(holder(model).backbone, "backbone", granularity)


def backbone_params(module: WithHead) -> list[str]:
    return [name for name, _ in module.named_parameters() if name.startswith("backbone.")]


def schedule_faults(plan: ReleasePlan, blocks: Sequence[Block], params: Sequence[str], per_release: int) -> list[str]:
    """The properties of a cadence schedule that ``plan`` breaks, for ``blocks`` (input side first) of ``params``."""
    released = [name for release in plan.releases for part in release.parts for name in part.params]
    release_of = {name: k for k, release in enumerate(plan.releases) for part in release.parts for name in part.params}
    faults = []
    if plan.frozen_params != 0 or sorted(released) != sorted(params):
        faults.append("every parameter released exactly once")
    if any(len({release_of.get(name) for name in block.params}) != 1 for block in blocks):
        faults.append("each block whole")
    if [part.params for release in plan.releases for part in release.parts] != [b.params for b in reversed(blocks)]:
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
    config = {**DEFAULTS, **SETTINGS[setting]}
    plan = GradualUnfreeze(**SETTINGS[setting]).plan(module)
    blocks = blocks_of(model, config["granularity"])
    assert schedule_faults(plan, blocks, backbone_params(module), config["blocks_per_release"]) == []
    if setting == "defaults" and len(blocks) > 1:
        assert len(plan.releases) > 1
    for k, release in enumerate(plan.releases):
        assert release.at == config["first_release"] + k * config["release_every"]
        for part in release.parts:
            assert part.lr_factor == pytest.approx(config["lr_scale"] * config["lr_decay"] ** k)


@pytest.mark.parametrize("model", MODELS)
def test_layer_decay_releases_every_block_at_once_at_its_depths_factor(model: str) -> None:
    module = holder(model)
    plan = GradualUnfreeze(layer_decay=0.75).plan(module)
    blocks = blocks_of(model, DEFAULTS["granularity"])
    assert plan.frozen_params == 0
    assert [release.at for release in plan.releases] == [DEFAULTS["first_release"]]
    parts = plan.releases[0].parts
    assert [part.params for part in parts] == [block.params for block in reversed(blocks)]
    assert sorted(name for part in parts for name in part.params) == sorted(backbone_params(module))
    for depth, part in enumerate(parts):
        assert part.lr_factor == pytest.approx(DEFAULTS["lr_scale"] * 0.75**depth)


def test_schedule_faults_catches_broken_schedules() -> None:
    """Controls: a schedule input side first, one missing its last release, one splitting blocks (stages)."""
    model = "torchvision:resnet18"
    module = holder(model)
    params = backbone_params(module)
    fine = blocks_of(model, "block")
    plan = plan_blocks("backbone", fine, 1, 1, 1, 0.3, 1.0)
    assert schedule_faults(plan, fine, params, 1) == []
    input_first = plan_blocks("backbone", fine[::-1], 1, 1, 1, 0.3, 1.0)
    assert schedule_faults(input_first, fine, params, 1) == ["output side first", "the stem in the last release"]
    unfinished = replace(plan, releases=plan.releases[:-1])
    assert "every parameter released exactly once" in schedule_faults(unfinished, fine, params, 1)
    stages = blocks_of(model, "stage")
    assert schedule_faults(plan, stages, params, 1) == [
        "each block whole",
        "output side first",
        "1 block(s) per release",
    ]
