"""Module names and globs: ``lightning_bnfreeze.names``."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from torch import nn

from lightning_bnfreeze.names import as_name_list, closest_names, is_glob, match_names, resolve_names


def _block() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


@pytest.fixture
def model() -> nn.Module:
    """``backbone.{stem, layer1.{0,1}, layer2.{0,1}, layer10}`` and ``head``, like a torchvision ResNet."""
    backbone = nn.Sequential(
        OrderedDict(
            stem=_block(),
            layer1=nn.Sequential(_block(), _block()),
            layer2=nn.Sequential(_block(), _block()),
            layer10=_block(),
        )
    )
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(4, 2)))


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("backbone.layer*", ["backbone.layer1", "backbone.layer2", "backbone.layer10"]),
        ("backbone.layer?", ["backbone.layer1", "backbone.layer2"]),
        ("backbone.layer[2-9]", ["backbone.layer2"]),
        ("backbone.*", ["backbone.stem", "backbone.layer1", "backbone.layer2", "backbone.layer10"]),
        ("backbone.layer*.0", ["backbone.layer1.0", "backbone.layer2.0", "backbone.layer10.0"]),
        ("*", ["backbone", "head"]),  # the children of the root, not the (nameless) root itself
        ("backbone.layer1", ["backbone.layer1"]),  # a plain name matches itself only, not its children
        ("backbone.layer", []),  # nor is it a prefix
    ],
)
def test_globs_match_within_one_dotted_part(model: nn.Module, pattern: str, expected: list[str]) -> None:
    assert match_names(pattern, _names(model)) == expected


@pytest.mark.parametrize(("pattern", "glob"), [("a.b*", True), ("a?", True), ("a[12]", True), ("backbone.l1", False)])
def test_is_glob(pattern: str, glob: bool) -> None:
    assert is_glob(pattern) is glob


def test_as_name_list() -> None:
    assert as_name_list("backbone", "modules") == ["backbone"]
    assert as_name_list(("a", "b.*"), "modules") == ["a", "b.*"]


@pytest.mark.parametrize("value", ["", "  ", ["backbone", ""], ["backbone", 3]])
def test_as_name_list_rejects_empty_and_non_string_names(value: object) -> None:
    with pytest.raises(ValueError, match="`modules`"):
        as_name_list(value, "modules")  # type: ignore[arg-type]


def test_resolve_names_maps_each_pattern_to_its_matches(model: nn.Module) -> None:
    assert resolve_names(model, ["head", "backbone.layer?"], "modules") == {
        "head": ["head"],
        "backbone.layer?": ["backbone.layer1", "backbone.layer2"],
    }


@pytest.mark.parametrize(
    ("pattern", "kind", "closest"),
    [
        ("backbone.layr1", "name", "backbone.layer1"),
        ("backbone.stm", "name", "backbone.stem"),
        ("backbone.layer3", "name", "backbone.layer2"),
        ("backbone.layer*.9", "glob", "backbone.layer2.1"),
        ("backbone.stem*.x", "glob", "backbone.stem.1"),
    ],
)
def test_unknown_name_raises_naming_argument_value_and_closest_names(
    model: nn.Module, pattern: str, kind: str, closest: str
) -> None:
    with pytest.raises(ValueError) as error:
        resolve_names(model, ["backbone", pattern], "modules")
    message = str(error.value)
    assert message.startswith(f"`modules` holds the {kind} {pattern!r}")
    assert f"Closest existing names: {closest!r}" in message  # the closest first


def test_unknown_name_with_nothing_close_has_no_hint(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="`schedule` holds the name 'zzzz'") as error:
        resolve_names(model, ["zzzz"], "schedule")
    assert "Closest" not in str(error.value)


def test_closest_names_best_first_at_most_count(model: nn.Module) -> None:
    names = _names(model)
    assert closest_names("backbone.layer1", names)[0] == "backbone.layer1"
    assert len(closest_names("backbone.layer", names, count=2)) == 2
    assert "" not in closest_names("", names)
