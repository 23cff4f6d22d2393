"""The README's table: for a model of each family, the blocks ``GradualUnfreeze()`` finds and its default releases.

Models built with random weights as ``tests/test_blocks.py`` builds them (torchvision and timm on the meta
device, Hugging Face tiny configs of 3 layers), each the ``backbone`` of a module. Blocks:
``find_blocks`` at the default ``granularity``, written as the stem (the input-side block; "stem (a, b)"
when made of several modules), the count of blocks between (first … last; ``x+y``: ``y``, a final norm, a
pooler or a downsample, joined ``x``), and the classifier left in the backbone, its own last block. Releases:
``GradualUnfreeze().plan(module)`` with every default. ``tests/test_default_schedule.py`` checks the same
schedules on every model the tests cover.

Run from the repository root (under a minute)::

    python -m benchmarks.blocks_table
    python -m benchmarks.blocks_table --markdown /tmp/blocks.md
    python -m benchmarks.blocks_table --quick                     # CI smoke test: a model per zoo, to a temp dir

The report goes to ``benchmarks/blocks_table.md`` (committed).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

import timm
import torch
import torchvision
import transformers
from torch import nn

from benchmarks import common
from benchmarks.common import markdown_table
from lightning_bnfreeze import Block, GradualUnfreeze, Trigger
from lightning_bnfreeze.plan import ReleasePlan
from tests.model_zoo import HF_MODELS, hf_models, timm_model, torchvision_model

CLASSIFIER = re.compile(r"fc|heads?|classifier|last_linear|lm_head|pre_logits|aux\w*", re.IGNORECASE)
"""The module names ``find_blocks`` takes for a classifier (as ``lightning_bnfreeze.blocks`` does)."""
TORCHVISION = {
    "resnet50": "ResNet",
    "vit_b_16": "ViT",
    "swin_t": "Swin",
    "maxvit_t": "MaxViT",
    "convnext_tiny": "ConvNeXt",
    "efficientnet_b0": "EfficientNet",
    "efficientnet_v2_s": "EfficientNetV2",
    "mobilenet_v3_large": "MobileNetV3",
    "regnet_y_400mf": "RegNet",
    "densenet121": "DenseNet",
    "inception_v3": "Inception v3",
    "vgg16_bn": "VGG",
}
TIMM = {
    "resnet50": "ResNet",
    "convnext_tiny": "ConvNeXt",
    "efficientnet_b0": "EfficientNet",
    "vit_base_patch16_224": "ViT",
    "swin_tiny_patch4_window7_224": "Swin",
    "eva02_tiny_patch14_224": "EVA-02",
    "maxvit_nano_rw_256": "MaxViT",
    "levit_128s": "LeViT",
    "mixer_s16_224": "MLP-Mixer",
    "poolformer_s12": "PoolFormer",
}


def models(quick: bool = False) -> list[tuple[str, nn.Module]]:
    """``(label, model)`` of each family: torchvision, timm, then Hugging Face (``quick``: the first of each)."""
    first = slice(1 if quick else None)
    vision = [(family, f"torchvision `{name}`", torchvision_model, name) for name, family in TORCHVISION.items()][first]
    vision += [(family, f"timm `{name}`", timm_model, name) for name, family in TIMM.items()][first]
    built = [(f"{family} ({source})", build(name)) for family, source, build, name in vision]
    for name in HF_MODELS[first]:
        torch.manual_seed(0)
        model = hf_models()[name][0]()
        built.append((f"transformers `{type(model).__name__}` (3 layers)", model))
    return built


def describe_blocks(blocks: Sequence[Block], prefix: str = "backbone.") -> str:
    """``stem (a, b) + 16 blocks (`layer1.0` … `layer4.2`) + `fc```: stem, the blocks between, the classifier."""

    def local(name: str) -> str:
        return name.removeprefix(prefix)

    def single(block: Block) -> str:
        if len(block.members) > 1 and block.name == f"{prefix}stem":
            return f"stem ({', '.join(map(local, block.members))})"
        return f"`{local(block.name)}`"

    last = blocks[-1]
    has_classifier = len(blocks) > 2 and all(CLASSIFIER.fullmatch(member.split(".")[-1]) for member in last.members)
    body = blocks[1:-1] if has_classifier else blocks[1:]
    parts = [single(blocks[0])]
    if len(body) == 1:
        parts.append(f"1 block ({single(body[0])})")
    elif body:
        parts.append(f"{len(body)} blocks (`{local(body[0].name)}` … `{local(body[-1].name)}`)")
    if has_classifier:
        parts.append(single(last))
    return " + ".join(parts)


def describe_releases(plan: ReleasePlan, when: Trigger) -> str:
    """``8 releases, epochs 1-8``; ``3 releases, epochs 1, 3, 5`` for another cadence."""
    times = when.times(len(plan.releases)) or []
    frozen = f"; {plan.frozen_params:,} parameters never released" if plan.frozen_params else ""
    if len(times) == 1:
        return f"1 release, {when.unit} {times[0]}{frozen}"
    consecutive = times == list(range(times[0], times[-1] + 1))
    spread = f"{times[0]}-{times[-1]}" if consecutive else ", ".join(map(str, times))
    return f"{len(times)} releases, {when.unit}s {spread}{frozen}"


def rows(quick: bool = False) -> list[list[str]]:
    table = []
    unfreeze = GradualUnfreeze()
    for label, model in models(quick):
        plan = unfreeze.plan(nn.ModuleDict({"backbone": model}))
        table.append([label, describe_blocks(plan.blocks), describe_releases(plan, unfreeze.when)])
    return table


def report(table: Sequence[Sequence[str]]) -> str:
    defaults = GradualUnfreeze()
    shown = f"what={defaults.what!r}, when={defaults.when!r}"
    return (
        "# The blocks found and the default releases\n\n"
        "Generated by `python -m benchmarks.blocks_table` (torch"
        f" {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, transformers"
        f" {transformers.__version__}; random weights; torchvision and timm models on the meta device, Hugging Face"
        " models in tiny configs of 3 layers).\n\n"
        f"`GradualUnfreeze()` with its defaults ({shown}) on the model as `backbone`. Every backbone parameter"
        ' belongs to exactly one block; "stem (a, b)" is an input-side block made of several modules; `x+y` is a'
        " block where `y` (a final norm, a pooler, a downsample between stages, a last 1x1 conv) joined `x`; a"
        " classifier left in the backbone is its own last block. The blocks are released output side first,"
        " `Blocks(per_release=...)` at a time, the stem last. timm models use their own `group_matcher` (PoolFormer"
        " has none); the others are discovered.\n\n"
        f"{markdown_table(['model family', 'blocks found', 'default releases'], table)}\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    common.output_arguments(parser, "blocks_table", raw=False)
    args = parser.parse_args(argv)
    common.write_report(args, "blocks_table", report(rows(args.quick)), {}, 1)


if __name__ == "__main__":
    main()
