"""The blocks of a backbone (``lightning_bnfreeze.blocks``): torchvision, timm and Hugging Face models, user names.

Models are built with random weights, on the meta device where they allow it. Block names are checked with the
backbone named ``backbone`` inside the LightningModule, as ``GradualUnfreeze`` calls ``find_blocks``.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_bnfreeze.blocks
from lightning_bnfreeze.blocks import Block, check_block_order, find_blocks, format_blocks, forward_order
from tests.model_zoo import HF_MODELS, TIMM_MODELS, TORCHVISION_MODELS, hf_models, timm_model, torchvision_model

GRANULARITIES = ("block", "stage")
# One model of each torchvision family: their forward pass on the meta device checks the order of the blocks.
TORCHVISION_FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_32",
]  # fmt: skip


def meta_input(size: int = 224, channels: int = 3) -> torch.Tensor:
    return torch.zeros(1, channels, size, size, device="meta")


def names(blocks: Sequence[Block], prefix: str = "backbone.") -> list[str]:
    return [block.name.removeprefix(prefix) for block in blocks]


def assert_partition(model: nn.Module, blocks: Sequence[Block], prefix: str = "backbone") -> None:
    """Every parameter in exactly one block, in ``named_parameters()`` order; members cover exactly the params."""
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    params = {join(name): param for name, param in model.named_parameters()}
    position = {name: i for i, name in enumerate(params)}
    modules = {join(name) for name, _ in model.named_modules() if name}
    assert sorted(name for block in blocks for name in block.params) == sorted(params)
    assert len({block.name for block in blocks}) == len(blocks), "block names are unique"
    for block in blocks:
        assert list(block.params) == sorted(block.params, key=position.__getitem__)
        assert block.numel == sum(params[name].numel() for name in block.params)
        assert block.members and set(block.members) <= modules | set(params)
        covered = [name for name in params if any(name == m or name.startswith(f"{m}.") for m in block.members)]
        assert covered == list(block.params), f"the members of {block.name} hold exactly its parameters"


def assert_blocks_follow_the_forward_pass(model: nn.Module, *inputs: Any, prefix: str = "backbone") -> None:
    """At both granularities, the blocks run input side first in a forward pass of ``inputs``."""
    order = [f"{prefix}.{name}" if prefix else name for name in forward_order(model, *inputs)]
    for granularity in GRANULARITIES:
        blocks = find_blocks(model, prefix, granularity)
        assert check_block_order(blocks, order) is None
        ran = [any(name == m or name.startswith(f"{m}.") for name in order for m in block.members) for block in blocks]
        # Not vacuous: the blocks run (but T5's `shared` embedding, which runs as its tied `encoder.embed_tokens`).
        assert sum(ran) >= len(blocks) - 1


# torchvision ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_every_torchvision_classifier_is_partitioned_into_several_blocks(name: str) -> None:
    model = torchvision_model(name)
    for granularity in GRANULARITIES:
        blocks = find_blocks(model, "backbone", granularity)
        assert_partition(model, blocks)
        assert len(blocks) >= 5, names(blocks)
    assert len(find_blocks(model, "backbone", "block")) >= len(find_blocks(model, "backbone", "stage"))


@pytest.mark.parametrize("name", TORCHVISION_FAMILIES)
def test_torchvision_blocks_follow_the_forward_pass(name: str) -> None:
    assert_blocks_follow_the_forward_pass(torchvision_model(name), meta_input(299 if name == "inception_v3" else 224))


def _resnet50_blocks() -> list[str]:
    return [f"layer{stage}.{i}" for stage, depth in enumerate((3, 4, 6, 3), start=1) for i in range(depth)]


def _vit_b_16_blocks() -> list[str]:
    return [f"encoder.layers.encoder_layer_{i}" for i in range(11)] + ["encoder.layers.encoder_layer_11+encoder.ln"]


TORCHVISION_EXPECTED = {
    ("resnet50", "block"): ["stem", *_resnet50_blocks(), "fc"],
    ("resnet50", "stage"): ["stem", "layer1", "layer2", "layer3", "layer4", "fc"],
    ("vit_b_16", "block"): ["stem", *_vit_b_16_blocks(), "heads"],
    ("vit_b_16", "stage"): ["stem", *_vit_b_16_blocks(), "heads"],
    ("convnext_tiny", "stage"): [
        "features.0", "features.1+features.2", "features.3+features.4", "features.5+features.6", "features.7",
        "classifier",
    ],
    ("efficientnet_b0", "stage"): [*(f"features.{i}" for i in range(7)), "features.7+features.8", "classifier"],
    ("efficientnet_b0", "block"): [
        "features.0", "features.1", "features.2.0", "features.2.1", "features.3.0", "features.3.1", "features.4.0",
        "features.4.1", "features.4.2", "features.5.0", "features.5.1", "features.5.2", "features.6.0",
        "features.6.1", "features.6.2", "features.6.3", "features.7+features.8", "classifier",
    ],
    ("densenet121", "stage"): [
        "stem", "features.denseblock1+features.transition1", "features.denseblock2+features.transition2",
        "features.denseblock3+features.transition3", "features.denseblock4+features.norm5", "classifier",
    ],
    ("swin_t", "stage"): [
        "features.0", "features.1+features.2", "features.3+features.4", "features.5+features.6", "features.7+norm",
        "head",
    ],
    ("maxvit_t", "block"): [
        "stem", "blocks.0.layers.0", "blocks.0.layers.1", "blocks.1.layers.0", "blocks.1.layers.1",
        *(f"blocks.2.layers.{i}" for i in range(5)), "blocks.3.layers.0", "blocks.3.layers.1", "classifier",
    ],
    ("googlenet", "stage"): [
        "stem", *(f"inception{i}" for i in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")), "aux1+aux2+fc",
    ],
    ("inception_v3", "stage"): [
        "stem", *(f"Mixed_{i}" for i in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")),
        "AuxLogits+fc",
    ],
    ("vgg11", "stage"): [*(f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)), "classifier"],
    ("regnet_x_400mf", "stage"): ["stem", *(f"trunk_output.block{i}" for i in range(1, 5)), "fc"],
    ("shufflenet_v2_x0_5", "stage"): ["conv1", "stage2", "stage3", "stage4+conv5", "fc"],
}  # fmt: skip


@pytest.mark.parametrize(("name", "granularity"), list(TORCHVISION_EXPECTED))
def test_torchvision_blocks_are_the_stem_the_repeated_blocks_and_the_classifier(name: str, granularity: str) -> None:
    assert (
        names(find_blocks(torchvision_model(name), "backbone", granularity)) == TORCHVISION_EXPECTED[name, granularity]
    )


def test_torchvision_stems_hold_the_first_conv_and_the_tokens() -> None:
    resnet = find_blocks(torchvision_model("resnet50"), "backbone")
    assert resnet[0].members == ("backbone.conv1", "backbone.bn1")
    vit = find_blocks(torchvision_model("vit_b_16"), "backbone")
    # class_token is held by the model itself, pos_embedding by its encoder: both are used at the input.
    assert vit[0].members == ("backbone.class_token", "backbone.conv_proj", "backbone.encoder.pos_embedding")
    assert vit[-2].members == ("backbone.encoder.layers.encoder_layer_11", "backbone.encoder.ln")


@pytest.mark.parametrize("name", ["vit_b_16", "convnext_tiny", "efficientnet_b0"])
def test_no_block_but_the_classifier_holds_a_quarter_of_the_backbone(name: str) -> None:
    # The old default released torchvision vit_b_16's whole `encoder` (85M parameters) at once and never its
    # `class_token`; convnext_tiny's and efficientnet_b0's whole `features`.
    model = torchvision_model(name)
    total = sum(param.numel() for param in model.parameters())
    blocks = find_blocks(model, "backbone")
    assert max(block.numel for block in blocks[:-1]) < total / 4, [(b.name, b.numel) for b in blocks]


# timm -----------------------------------------------------------------------------------------------------------


def timm_groups(model: nn.Module, coarse: bool) -> list[set[str]]:
    from timm.models import group_parameters

    return [set(group) for _, group in sorted(group_parameters(model, model.group_matcher(coarse)).items())]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_blocks_are_timms_own_groups(name: str) -> None:
    model = timm_model(name)
    size = model.pretrained_cfg["input_size"][-1]
    for granularity, coarse in (("block", False), ("stage", True)):
        blocks = find_blocks(model, "", granularity)
        assert_partition(model, blocks, prefix="")
        assert [set(block.params) for block in blocks] == timm_groups(model, coarse)
    assert_blocks_follow_the_forward_pass(model, meta_input(size), prefix="")
    assert len(find_blocks(model, "", "block")) > 2


def test_timm_group_matcher_is_used_rather_than_discovery() -> None:
    # Control: on ConvNeXt, timm puts each downsample with the next stage; discovery with the stage before.
    model = timm_model("convnext_atto")
    expected = timm_groups(model, coarse=False)
    assert [set(block.params) for block in find_blocks(model)] == expected
    model.group_matcher = None  # hides the method: discovery instead
    try:
        assert [set(block.params) for block in find_blocks(model)] != expected
    finally:
        del model.group_matcher


@pytest.mark.parametrize(
    "name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "mixer_s16_224", "convmixer_768_32", "vgg11"]
)
def test_discovery_finds_timms_groups_on_its_own(name: str) -> None:
    model = timm_model(name)
    expected = {coarse: timm_groups(model, coarse) for coarse in (False, True)}
    model.group_matcher = None
    try:
        for granularity, coarse in (("block", False), ("stage", True)):
            assert [set(block.params) for block in find_blocks(model, "", granularity)] == expected[coarse]
    finally:
        del model.group_matcher


def test_timm_model_without_group_matcher_is_discovered() -> None:
    model = timm_model("poolformer_s12")  # MetaFormer: no group_matcher
    assert not hasattr(model, "group_matcher")
    assert names(find_blocks(model, "backbone", "stage")) == [
        "stem",
        "stages.0",
        "stages.1",
        "stages.2",
        "stages.3",
        "head",
    ]
    assert_partition(model, find_blocks(model, "backbone"))
    assert_blocks_follow_the_forward_pass(model, meta_input(), prefix="")


def test_timm_vit_stem_holds_the_tokens_and_the_final_norm_joins_the_last_block() -> None:
    blocks = find_blocks(timm_model("vit_tiny_patch16_224"), "backbone")
    assert blocks[0].members == ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")
    assert names(blocks) == ["stem", *(f"blocks.{i}" for i in range(11)), "blocks.11+norm", "head"]


class WithGroupMatcher(nn.Module):
    """A model with timm's ``group_matcher`` protocol, without timm."""

    def __init__(self, callable_matcher: bool = False) -> None:
        super().__init__()
        self.callable_matcher = callable_matcher
        self.stem = nn.Linear(2, 4)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def group_matcher(self, coarse: bool = False) -> Any:
        if self.callable_matcher:  # `blocks.2` before `blocks.0`, `norm` with `stem`: the ordinals decide
            return lambda name: (
                0 if name.startswith(("stem", "norm")) else 9 if name.startswith("head") else 3 - int(name[7])
            )
        rule = r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)"
        return {"stem": r"^stem", "blocks": [(rule, None), (r"^norm", (99999,))]}


def test_group_matcher_ordinals_and_match_previous() -> None:
    model = WithGroupMatcher()
    assert names(find_blocks(model, "backbone", "stage")) == ["stem", "blocks.0", "blocks.1", "blocks.2+norm", "head"]
    fine = find_blocks(model, "backbone", "block")
    assert names(fine)[-3:] == ["blocks.2.0", "blocks.2.1+norm", "head"] and len(fine) == 8
    ordinals = find_blocks(WithGroupMatcher(callable_matcher=True), "backbone")
    assert names(ordinals) == ["stem", "blocks.2", "blocks.1", "blocks.0", "head"]
    assert ordinals[0].members == ("backbone.stem", "backbone.norm")


# Hugging Face transformers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*HF_MODELS, "bert_for_classification"])
def test_hugging_face_blocks_are_embeddings_layers_and_tail(name: str) -> None:
    build, example, expected = hf_models()[name]
    torch.manual_seed(0)
    model = build()
    for granularity in GRANULARITIES:  # a flat stack of layers: a stage is a layer
        blocks = find_blocks(model, "backbone", granularity)
        assert_partition(model, blocks)
        assert names(blocks) == expected
    assert_blocks_follow_the_forward_pass(model, *example())


def test_hugging_face_stems_hold_the_embeddings() -> None:
    gpt2, clip = (hf_models()[name][0]() for name in ("gpt2", "clip_vision"))
    assert find_blocks(gpt2, "backbone")[0].members == ("backbone.wte", "backbone.wpe")
    assert find_blocks(clip, "backbone")[0].members == ("backbone.embeddings", "backbone.pre_layrnorm")


# Custom models, tied parameters, user-named blocks ------------------------------------------------------------------


class Net(nn.Module):
    """``embed``, a ``blocks`` list, ``norm``; with ``reverse`` its forward runs the blocks last to first."""

    def __init__(self, reverse: bool = False, tied_head: bool = False) -> None:
        super().__init__()
        self.reverse = reverse
        self.embed = nn.Embedding(10, 8)
        self.pos = nn.Parameter(torch.zeros(8))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout()) for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        if tied_head:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for block in reversed(self.blocks) if self.reverse else self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def test_discovery_on_a_custom_model() -> None:
    blocks = find_blocks(Net(), "model.backbone")
    assert names(blocks, "model.backbone.") == ["stem", "blocks.0", "blocks.1", "blocks.2+norm", "head"]
    assert blocks[0].members == ("model.backbone.pos", "model.backbone.embed")
    assert_partition(Net(), find_blocks(Net(), ""), prefix="")


def test_tied_parameters_count_once_in_the_first_block_holding_them() -> None:
    model = Net(tied_head=True)
    blocks = find_blocks(model, "backbone")
    assert_partition(model, blocks)
    assert names(blocks) == ["stem", "blocks.0", "blocks.1", "blocks.2+norm"]  # the head holds nothing of its own
    assert "backbone.embed.weight" in blocks[0].params


def resnet18() -> nn.Module:
    return torchvision_model("resnet18")


@pytest.mark.parametrize(
    ("user_blocks", "expected"),
    [
        # Unnamed parameters: those registered before the first block form the stem, the others join the block
        # registered before them (fc joins layer4).
        (["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"],
         ["stem", "layer1", "layer2", "layer3", "layer4+fc"]),
        (["backbone.conv1", "backbone.layer[12]", "backbone.layer[34]", "backbone.fc"],
         ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]),  # a glob is one block per module it matches
        (["backbone.conv1", ["backbone.layer[12]"], ["backbone.layer[34]"], "backbone.fc"],
         ["stem", "layer1+layer2", "layer3+layer4", "fc"]),  # a list (of names or globs) is one block
        (["backbone.layer1.0", "backbone.layer1", ["backbone.layer2.*"]],  # overlaps: the first entry holding it wins
         ["stem", "layer1.0", "layer1.1", "layer2+layer3+layer4+1 more"]),
        (["backbone.bn1.weight", ["backbone.layer*"]], ["conv1", "bn1", "layer1+layer2+layer3+2 more"]),
    ],
)  # fmt: skip
def test_user_named_blocks(user_blocks: list[str], expected: list[str]) -> None:
    blocks = find_blocks(resnet18(), "backbone", blocks=user_blocks)
    assert_partition(resnet18(), blocks)
    assert names(blocks) == expected


def test_user_named_blocks_win_over_a_group_matcher() -> None:
    blocks = find_blocks(WithGroupMatcher(), "backbone", blocks=["backbone.stem", "backbone.blocks"])
    assert names(blocks) == ["stem", "blocks+norm+head"]


def test_user_blocks_from_a_callable() -> None:
    def stages(backbone: nn.Module) -> list[list[str]]:
        assert backbone is resnet18()
        return [["backbone.conv1", "backbone.bn1"], ["backbone.layer1", "backbone.layer2"], ["backbone.layer[34]"]]

    assert names(find_blocks(resnet18(), "backbone", blocks=stages)) == ["stem", "layer1+layer2", "layer3+layer4+fc"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "layer"}, "`granularity` must be one of \\('block', 'stage'\\), got 'layer'"),
        ({"blocks": ["backbone.layer5"]},
         "`names` holds .*'backbone.layer5'.* Closest existing names: 'backbone.layer"),
        ({"blocks": ["layer1"]}, "`names` holds .*'layer1'.* Closest existing names: 'backbone.layer1'"),
        ({"blocks": ["backbone.stage*"]}, "`names` holds the glob 'backbone.stage\\*'"),
        ({"blocks": lambda backbone: [["backbone.fc"], ["backbone.head"]]},
         "`names\\(backbone\\)` holds .*'backbone.head'.* Closest existing names: .*'backbone.fc'"),
        ({"blocks": ["backbone.layer1", "backbone.layer1.0"]},
         "`names` holds 'backbone.layer1.0', which has no parameters that an earlier entry does not hold"),
        ({"blocks": []}, "`names` = \\[\\]: expected a non-empty list"),
        ({"blocks": lambda backbone: None}, "`names\\(backbone\\)` = None: expected a non-empty list"),
        ({"blocks": "backbone.layer1"}, "`names` = 'backbone.layer1': expected a non-empty list"),  # a list, not a name
        ({"blocks": ["backbone.layer1", ""]}, "`names\\[1\\]` holds ''"),
        ({"blocks": lambda backbone: [["backbone.fc", 3]]}, "`names\\(backbone\\)\\[0\\]` holds 3"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named_with_their_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        find_blocks(resnet18(), "backbone", **kwargs)


# forward_order, check_block_order, format_blocks ----------------------------------------------------------------------


def test_forward_order_lists_modules_as_they_first_run() -> None:
    assert forward_order(Net(), torch.zeros(2, dtype=torch.long)) == [
        "embed",
        *(f"blocks.{i}{part}" for i in range(3) for part in ("", ".0", ".1", ".2")),
        "norm",
        "head",
    ]
    reverse = forward_order(Net(reverse=True), torch.zeros(2, dtype=torch.long))
    assert reverse.index("blocks.2") < reverse.index("blocks.1") < reverse.index("blocks.0")


def test_forward_order_runs_in_eval_mode_and_restores_everything() -> None:
    model = Net()
    model.train()
    model.blocks[1].eval()  # a mixed state, as fine-tuning leaves it
    modes = [module.training for module in model.modules()]
    stats = [block[1].running_mean.clone() for block in model.blocks]
    forward_order(model, torch.arange(4))
    assert [module.training for module in model.modules()] == modes
    assert all(torch.equal(block[1].running_mean, before) for block, before in zip(model.blocks, stats, strict=True))
    assert not any(module._forward_pre_hooks for module in model.modules())
    with torch.no_grad():  # control: a training-mode forward does move the statistics
        model(torch.arange(4))
    assert not torch.equal(model.blocks[0][1].running_mean, stats[0])


def test_forward_order_cleans_up_when_the_forward_fails() -> None:
    model = Net()
    with pytest.raises(IndexError):
        forward_order(model, torch.tensor([42]))  # out of the embedding's range
    assert model.training and not any(module._forward_pre_hooks for module in model.modules())


def test_check_block_order_names_the_blocks_out_of_order() -> None:
    blocks = find_blocks(Net(), "backbone")
    example = torch.zeros(2, dtype=torch.long)
    in_order = ["backbone." + name for name in forward_order(Net(), example)]
    assert check_block_order(blocks, in_order) is None
    reversed_order = ["backbone." + name for name in forward_order(Net(reverse=True), example)]
    message = check_block_order(blocks, reversed_order)
    assert message is not None
    assert "block 2 'backbone.blocks.1' runs before block 1 'backbone.blocks.0'" in message


def test_format_blocks_is_a_table_of_the_blocks() -> None:
    blocks = find_blocks(resnet18(), "backbone", "stage")
    lines = format_blocks(blocks).splitlines()
    assert lines[0].split() == ["block", "name", "members", "parameters"]
    assert len(lines) == 2 + len(blocks)
    assert lines[2].split() == ["0", "backbone.stem", "backbone.conv1,", "backbone.bn1", f"{blocks[0].numel:,}"]
    assert lines[-1].split() == [str(len(blocks) - 1), "backbone.fc", "backbone.fc", "513,000"]


@pytest.mark.parametrize("module", ["blocks", "block_groups", "block_discovery"])
def test_the_library_modules_import_neither_timm_nor_transformers(module: str) -> None:
    tree = ast.parse((Path(lightning_bnfreeze.blocks.__file__).parent / f"{module}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"__future__", "collections", "dataclasses", "itertools", "math", "re", "typing", "torch",
                     "lightning_bnfreeze"}, roots  # fmt: skip


def test_a_block_label_named_in_a_schedule_is_said_to_be_one_with_the_modules_it_stands_for() -> None:
    from lightning_bnfreeze import Schedule

    root = nn.Module()
    root.backbone = torchvision_model("resnet18")  # its first block, `backbone.stem`, is conv1 and bn1
    assert find_blocks(root.backbone, "backbone")[0].name == "backbone.stem"
    with pytest.raises(ValueError, match="matches nothing") as error:
        Schedule({2: "backbone.stem"}).plan(root, "backbone")
    assert str(error.value).endswith(
        "'backbone.stem' is the label of a block found automatically, made of 'backbone.conv1', 'backbone.bn1':"
        " name those."
    )
    with pytest.raises(ValueError, match="matches nothing") as error:  # contrast: no block's label
        Schedule({2: "backbone.stme"}).plan(root, "backbone")
    assert "label" not in str(error.value)


def test_a_block_label_named_in_blocks_is_said_to_be_one_with_the_modules_it_stands_for() -> None:
    from lightning_bnfreeze import Blocks

    root = nn.Module()
    root.backbone = torchvision_model("resnet18")
    with pytest.raises(ValueError, match="matches nothing") as error:
        Blocks(names=["backbone.stem", "backbone.layer1"]).plan(root, "backbone")
    assert str(error.value).endswith("made of 'backbone.conv1', 'backbone.bn1': name those.")
    with pytest.raises(ValueError, match="matches nothing") as error:  # contrast: no block's label
        Blocks(names=["backbone.stme", "backbone.layer1"]).plan(root, "backbone")
    assert "label" not in str(error.value)
