"""The release objects in plain PyTorch, without a Trainer: ``Unfreezer`` (``release.py``), the triggers, the plans,
``ReleasedGroups`` and the learning-rate preview's ``simulate``, driven by hand as a fit would drive them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bnfreeze import At, Blocks, Every, LayerDecay, Moment, Plateau, Schedule, Trigger
from lightning_bnfreeze.backbone_parameters import BackboneParameters, ReleaseSettings
from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.freezer import BackboneNorms
from lightning_bnfreeze.lr_preview import Budget, SchedulerStep, simulate
from lightning_bnfreeze.plan import What
from lightning_bnfreeze.record import ReleaseRecord
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.released_groups import ReleasedGroups, origin_rule
from lightning_bnfreeze.saved_releases import changed_rate
from lightning_bnfreeze.step_size import AUTO_STEP, NEAR_DECAY, SMALLEST_REFERENCE, STOP_STEP, adam_step_bound
from tests.unfreeze_helpers import tiny_backbone

BLOCKS = ["backbone.3", "backbone.1", "backbone.0"]  # output side first: the tiny backbone's children with parameters


class Net(nn.Module):
    """A tiny backbone (blocks ``backbone.0``, ``.1``, ``.3``, each conv + BatchNorm) and a linear head."""

    def __init__(self, adapter: bool = False) -> None:
        super().__init__()
        self.backbone = tiny_backbone()
        self.head = nn.Linear(8, 4)
        if adapter:  # a LoRA-style adapter inside a frozen block
            self.backbone[3].lora_down = nn.Linear(8, 2, bias=False)


def named_backbone(root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(root.backbone.named_parameters(prefix="backbone"))


def unfreezer(
    what: What | None = None,
    trigger: Trigger | None = None,
    bn: str = "train",
    lr_scale: float = 0.5,
    optimizer: str = "sgd",
    root: nn.Module | None = None,
    trainable: tuple[str, ...] = (),
    max_step: float | str | None = None,
    warmup_steps: int = 0,
) -> Unfreezer:
    """An Unfreezer as the callback builds one: the backbone withdrawn from a fresh optimizer over every parameter."""
    torch.manual_seed(0)
    root = Net() if root is None else root
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    }[optimizer]
    plan = (what or Blocks(per_release=1)).plan(root, "backbone")
    settings = ReleaseSettings(lr_scale=lr_scale, bn=bn, warmup_steps=warmup_steps, max_step=max_step)
    result = BackboneParameters("backbone", trainable).unfreezer(
        root, plan, trigger or Every(), make(root.parameters()), settings=settings
    )
    result.freeze()
    return result


def group_names(u: Unfreezer) -> list[str | None]:
    return [group.get("name") for group in u.groups.optimizer.param_groups]


def epochs(u: Unfreezer, last: int) -> dict[int, list[ReleaseRecord]]:
    """Epoch starts 0..last, as the callback checks them: the releases at each."""
    return {epoch: u.advance(u.moment(epoch, 4 * epoch), "epoch") for epoch in range(last + 1)}


# --------------------------------------------------------------------------------------------- Unfreezer


def test_freeze_leaves_the_head_and_only_it_training() -> None:
    u = unfreezer()
    root = u.root
    assert not any(p.requires_grad for p in root.backbone.parameters())
    assert all(p.requires_grad for p in root.head.parameters())
    held = {id(p) for group in u.groups.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in root.head.parameters()}
    assert group_names(u) == ["head"] and u.remaining == [0, 1, 2] and u.history == ()


def test_advance_on_a_cadence_records_each_release() -> None:
    u = unfreezer(trigger=Every(epochs=2, first=1), lr_scale=0.5, what=Blocks(per_release=1, decay=0.4))
    done = epochs(u, 6)
    assert {epoch: [r.index for r in records] for epoch, records in done.items() if records} == {1: [0], 3: [1], 5: [2]}
    history = u.history
    assert [(r.index, r.epoch, r.step, r.reason) for r in history] == [
        (0, 1, 4, "scheduled"),
        (1, 3, 12, "scheduled"),
        (2, 5, 20, "scheduled"),
    ]
    assert [r.lr_factors for r in history] == [(0.5,), (pytest.approx(0.2),), (pytest.approx(0.08),)]
    assert [r.train_norms for r in history] == [(True,), (True,), (True,)]
    assert [r.positions for r in history] == [(1,), (2,), (3,)]  # where each group sits in the optimizer
    assert group_names(u) == ["head", *BLOCKS]
    assert all(p.requires_grad for p in u.root.parameters())
    # a check point the trigger is not checked at releases nothing
    assert unfreezer().advance(Moment(5, 20), "step") == []


def test_released_groups_follow_the_head_lr_at_their_factor() -> None:
    u = unfreezer(what=Blocks(per_release=2, decay=0.5), lr_scale=0.3)
    epochs(u, 2)
    u.groups.head["lr"] = 0.02
    u.before_step(8)
    lrs = {group["name"]: group["lr"] for group in u.groups.optimizer.param_groups}
    assert lrs == {"head": 0.02, "backbone.3": 0.006, "backbone.1": 0.006, "backbone.0": pytest.approx(0.003)}
    assert u.history[0].lr_factors == (0.3, 0.3)  # parts of one release share its factor


def test_several_releases_falling_due_at_one_step_happen_together() -> None:
    u = unfreezer(trigger=Every(steps=3, first=2))
    assert u.advance(u.moment(0, 1), "step") == []
    assert [r.index for r in u.advance(u.moment(2, 8), "step")] == [0, 1, 2]  # due at 2, 5 and 8
    assert [r.step for r in u.history] == [8, 8, 8]


def test_first_step_bound_is_the_largest_release_s_under_adam_and_unknown_under_sgd() -> None:
    assert unfreezer(optimizer="sgd").first_step_bound() is None
    assert unfreezer(optimizer="momentum").first_step_bound() is None
    u = unfreezer(optimizer="adam", lr_scale=0.5)  # head lr 0.1: released blocks at 0.05
    expected = max(adam_step_bound(u.root.get_submodule(block).parameters(), lr=0.05) for block in BLOCKS)
    assert u.first_step_bound() == pytest.approx(expected)
    u.groups.head["initial_lr"] = 0.4  # a scheduler that starts from, or rises to, a larger rate
    assert u.first_step_bound() == pytest.approx(4 * expected)


def test_at_triggers_a_schedule_and_a_plan_with_more_times_than_releases_stops() -> None:
    u = unfreezer(what=Schedule({0: "backbone.3", 2: ["backbone.1", "backbone.0"]}), trigger=At([0, 2]))
    assert [[r.index for r in records] for records in epochs(u, 4).values()] == [[0], [], [1], [], []]
    assert [len(r.lr_factors) for r in u.history] == [1, 2]
    with pytest.raises(IndexError, match="every release of the plan is done"):
        u.release(u.moment(5, 20), "scheduled")


def test_state_round_trips_in_plain_types_and_rebuilds_the_groups_in_the_saved_order() -> None:
    """Two unfreezers on one optimizer, their releases interleaved: each restores its own groups, in any order,
    and together they put every group back where it was saved (as ``optimizer.load_state_dict`` expects)."""

    class TwoBackbones(Net):
        def __init__(self) -> None:
            super().__init__()
            self.backbone2 = tiny_backbone()

    def pair(root: TwoBackbones) -> list[Unfreezer]:
        groups = [ReleasedGroups(optimizer) for _ in range(2)]
        result = []
        for name, group in zip(("backbone", "backbone2"), groups, strict=True):
            plan = Blocks(per_release=1).plan(root, name)
            u = Unfreezer(root, plan, Every(), group, bn="auto")
            group.withdraw(root.get_submodule(name).named_parameters(prefix=name))
            result.append(u)
        return result

    torch.manual_seed(0)
    root = TwoBackbones()
    optimizer = torch.optim.SGD(root.parameters(), lr=0.1)
    first, second = pair(root)
    for epoch in (1, 2):
        for u in (first, second):
            u.advance(u.moment(epoch, 4 * epoch), "epoch")
    saved_names = group_names(first)
    assert saved_names == ["head", "backbone.3", "backbone2.3", "backbone.1", "backbone2.1"]
    states = [json.loads(json.dumps(u.state_dict())) for u in (first, second)]  # plain types only

    torch.manual_seed(0)
    root = TwoBackbones()
    optimizer = torch.optim.SGD(root.parameters(), lr=0.1)
    restored = pair(root)
    for u, state in zip(restored, states, strict=True):
        u.load_state_dict(state)
    for u in reversed(restored):  # the second restores first
        u.freeze()
        u.restore()
    assert group_names(restored[0]) == saved_names
    assert [u.history for u in restored] == [first.history, second.history]
    assert [u.state_dict() for u in restored] == states
    assert optimizer.param_groups[1]["params"] == list(root.backbone[3].parameters())


def test_a_checkpoint_with_more_releases_than_the_plan_is_refused() -> None:
    u = unfreezer(what=Blocks(per_release=2))
    epochs(u, 3)
    with pytest.raises(ValueError, match=r"holds 2 releases, but the plan has 1"):
        unfreezer(what=LayerDecay(0.5)).load_state_dict(u.state_dict())


def test_a_checkpoint_whose_releases_free_other_parts_is_refused_before_anything_is_restored() -> None:
    u = unfreezer(what=Blocks(per_release=1))
    epochs(u, 2)
    other = unfreezer(what=Blocks(per_release=2))
    with pytest.raises(
        ValueError, match=r"release 0 freed 1 part\(s\) \(backbone.3\), but the plan's release 0 frees 2"
    ):
        other.load_state_dict(u.state_dict())
    assert other.history == () and other.state_dict()["trigger"] == unfreezer().state_dict()["trigger"]


def test_a_checkpoint_whose_release_freed_other_parts_of_the_same_number_is_refused() -> None:
    u = unfreezer(what=Schedule({1: "backbone.3"}))
    epochs(u, 1)
    other = unfreezer(what=Schedule({1: "backbone.1"}))  # one part, as saved, but another
    with pytest.raises(ValueError, match=r"release 0 freed 1 part\(s\) \(backbone.3\), but .* frees 1 \(backbone.1\)"):
        other.load_state_dict(u.state_dict())
    assert other.history == ()
    old = u.state_dict()
    old["history"] = [{k: v for k, v in record.items() if k != "parts"} for record in old["history"]]
    other.load_state_dict(old)  # a checkpoint that kept no names: its sizes alone can be checked


def test_a_checkpoint_saved_at_another_lr_scale_is_named_with_what_its_releases_keep() -> None:
    u = unfreezer(what=Blocks(per_release=1), lr_scale=0.5, bn="train")
    before = u.state_dict()
    epochs(u, 1)
    saved = u.state_dict()

    assert changed_rate(saved, lr_scale=0.25) == (
        "GradualUnfreeze: the checkpoint was saved with lr_scale=0.5, this callback has lr_scale=0.25: the parts it"
        " released keep the rates it saved; later releases take 0.25."
    )
    assert changed_rate(saved, lr_scale=0.5) is None
    # nothing released yet: nothing keeps the old rate
    assert changed_rate(before, lr_scale=0.25) is None


@pytest.mark.parametrize("bn", ["frozen", "auto"])
def test_a_checkpoint_whose_releases_ran_under_another_bn_is_refused_before_anything_is_restored(bn: str) -> None:
    u = unfreezer(what=Blocks(per_release=1), bn="train")
    before = u.state_dict()
    epochs(u, 1)
    other = unfreezer(what=Blocks(per_release=1), bn=bn)
    with pytest.raises(ValueError, match=rf"releases ran with bn='train', this callback has bn='{bn}': resume with"):
        other.load_state_dict(u.state_dict())
    assert other.history == ()
    other.load_state_dict(before)  # contrast: no release yet, nothing decided under the other policy


def move(u: Unfreezer, part: str, relative: float) -> None:
    """An optimizer step that moves the part's weights (ndim >= 2) by ``relative`` of their norm."""
    with torch.no_grad():
        for param in u.root.get_submodule(part).parameters():
            if param.ndim >= 2:
                param.mul_(1 + relative)


@pytest.mark.parametrize(
    ("optimizer", "relative", "trains"),
    [
        ("sgd", 2 * AUTO_STEP, True),
        ("sgd", AUTO_STEP / 2, False),
        ("momentum", AUTO_STEP / 5, True),  # one step of momentum 0.9 is a tenth of the steps to come
        ("sgd", AUTO_STEP / 5, False),  # the control: the same step without momentum
        ("adam", AUTO_STEP / 5, False),  # Adam's betas: no correction
    ],
)
def test_bn_auto_decides_from_the_first_steps_relative_weight_change(
    optimizer: str, relative: float, trains: bool
) -> None:
    u = unfreezer(bn="auto", optimizer=optimizer)
    u.start_norms(BackboneNorms(u.root, "backbone"))
    [record] = u.advance(u.moment(1, 4), "epoch")
    assert record.train_norms == (False,)
    layer = u.root.backbone[3][1]
    u.before_step(4)
    assert u.after_step(4) == []  # an accumulated batch, no optimizer step yet: nothing decided
    move(u, "backbone.3", relative)
    notes = u.after_step(5)
    assert u.history[0].train_norms == (trains,)
    [note] = notes
    assert note.text.startswith("backbone.3: its first step moved") and not note.warning
    assert ("train in every released block" if trains else "keep frozen statistics") in note.text
    layer.train()
    u.before_step(5)
    assert layer.training == trains  # a frozen layer is put back in inference mode
    move(u, "backbone.3", 10 * AUTO_STEP)  # later steps decide nothing
    assert u.after_step(6) == [] and u.history[0].train_norms == (trains,)


@pytest.mark.parametrize(
    ("first", "later", "modes"),
    [
        (2 * AUTO_STEP, 4 * AUTO_STEP, [True, True, True]),
        (2 * AUTO_STEP, STOP_STEP / 2, [True, True, False]),  # a slow release stops batch statistics from there in
        (2 * AUTO_STEP, (STOP_STEP + AUTO_STEP) / 2, [True, True, True]),  # between the lines: training goes on
        ((STOP_STEP + AUTO_STEP) / 2, 0.1, [False, False, False]),  # frozen: a fast release does not restart them
    ],
    ids=["fast", "then-slow", "then-between", "between-then-fast"],
)
def test_bn_auto_trains_statistics_from_the_output_side_until_a_slow_release(
    first: float, later: float, modes: list[bool]
) -> None:
    """The first release that moves decides (above ``AUTO_STEP``: training); after training, a release slower than
    ``STOP_STEP`` stops it for itself and every later one, and nothing restarts it: never frozen statistics on the
    output side of statistics that train (mixed that way, runs collapsed on the real-weights benchmark). A release
    before any step moved takes the first decision, and the modes survive a resume."""
    u = unfreezer(bn="auto")
    u.start_norms(BackboneNorms(u.root, "backbone"))
    u.advance(u.moment(1, 4), "epoch")
    u.before_step(4)
    move(u, "backbone.3", SMALLEST_REFERENCE / 10)  # moved nothing to speak of (a head at zero): decides nothing
    assert u.after_step(5) == [] and u.first_steps.norms_train is None
    [second] = u.advance(u.moment(2, 8), "epoch")
    assert second.train_norms == (False,)
    u.before_step(8)
    move(u, "backbone.1", first)
    [note] = u.after_step(9)
    assert note.text.startswith("backbone.1: its first step moved")
    assert [r.train_norms for r in u.history] == [(modes[0],), (modes[1],)]
    resumed = unfreezer(bn="auto")
    resumed.load_state_dict(json.loads(json.dumps(u.state_dict())))
    resumed.freeze()
    resumed.restore()
    resumed.start_norms(BackboneNorms(resumed.root, "backbone"))
    for each in (u, resumed):
        [third] = each.advance(each.moment(3, 12), "epoch")
        assert third.train_norms == (modes[1],)  # at its release, the mode so far
        assert each.describe(third).endswith(f"norm layers {'train' if modes[1] else 'frozen'}).")
        each.before_step(12)
        move(each, "backbone.0", later)
        notes = each.after_step(13)
        assert [r.train_norms for r in each.history] == [(mode,) for mode in modes]
        if modes == [True, True, True]:
            assert notes == []
        elif modes[0]:
            [stop] = notes
            assert not stop.warning and "its norm layers and every later release's keep frozen statistics" in stop.text
        else:  # frozen statistics at a step the benchmark saw them collapse: one warning naming the fix
            [warning] = notes
            assert warning.warning and "faster than the first release" in warning.text
            assert "`max_step='released'`" in warning.text
        each.root.train()
        each.before_step(13)
        assert [each.root.backbone[i][1].training for i in (3, 1, 0)] == modes


@pytest.mark.parametrize(("relative", "trains"), [(AUTO_STEP / 5, True), (AUTO_STEP / 20, False)])
def test_bn_auto_judges_a_warmed_up_first_step_as_at_the_full_rate(relative: float, trains: bool) -> None:
    """With ``warmup_steps=10`` the first step runs at a tenth of the rate: it counts ten times its size."""
    u = unfreezer(bn="auto", warmup_steps=10)
    u.advance(u.moment(1, 4), "epoch")
    u.before_step(4)
    move(u, "backbone.3", relative)
    u.after_step(5)
    assert u.history[0].train_norms == (trains,)


def test_bn_auto_decides_after_a_resume_before_the_first_step() -> None:
    """Saved between the release and its first step: the resumed unfreezer still decides at that step."""
    u = unfreezer(bn="auto")
    u.advance(u.moment(1, 4), "epoch")
    state = json.loads(json.dumps(u.state_dict()))
    resumed = unfreezer(bn="auto")
    resumed.load_state_dict(state)
    resumed.freeze()
    resumed.restore()
    resumed.before_step(4)
    move(resumed, "backbone.3", 2 * AUTO_STEP)
    assert resumed.after_step(5) and resumed.history[0].train_norms == (True,)


@pytest.mark.parametrize(
    ("bn", "relative", "warns"),
    [
        ("frozen", 2 * AUTO_STEP, True),  # frozen statistics at a large step: the benchmark's collapse
        ("frozen", AUTO_STEP / 2, False),
        ("train", AUTO_STEP / 2, True),  # batch statistics at a small step: below the probe on the benchmark
        ("train", 2 * AUTO_STEP, False),
    ],
)
def test_bn_train_or_frozen_is_kept_and_warned_about_at_the_step_sizes_where_it_failed(
    bn: str, relative: float, warns: bool
) -> None:
    u = unfreezer(bn=bn)
    u.advance(u.moment(1, 4), "epoch")
    u.before_step(4)
    move(u, "backbone.3", relative)
    notes = u.after_step(5)
    assert u.history[0].train_norms == (bn == "train",)
    assert [note.warning for note in notes] == ([True] if warns else [])
    if warns:
        assert f"`bn='{bn}'`" in notes[0].text and "use `bn='auto'`" in notes[0].text
    move(u, "backbone.3", 1.0)  # later steps say nothing
    assert u.after_step(6) == []


def test_trainable_parameters_are_never_frozen_nor_released() -> None:
    root = Net(adapter=True)
    u = unfreezer(root=root, trainable=("backbone.3.lora_down.weight",))
    adapter = root.backbone[3].lora_down.weight
    assert adapter.requires_grad
    assert id(adapter) not in u.frozen_ids
    epochs(u, 3)
    released = [p for group in u.groups.optimizer.param_groups[1:] for p in group["params"]]
    assert len(released) == sum(1 for _ in root.backbone.parameters()) - 1
    assert all(p is not adapter for p in released)
    assert any(p is adapter for p in u.groups.head["params"])  # it stays where the user's optimizer put it


# --------------------------------------------------------------------------------------------- triggers


def test_every_defaults_to_each_epoch_from_epoch_one() -> None:
    every = Every()
    assert (every.checked_at, every.unit, every.times(3)) == ("epoch", "epoch", [1, 2, 3])
    assert every.check(Moment(0, 0)) is None and every.check(Moment(1, 4)) == "scheduled"
    assert every.check(Moment(1, 4, released=1)) is None
    assert Every(first=0).times(2) == [0, 1]
    assert Every(epochs=3, first=2).times(3) == [2, 5, 8]
    steps = Every(steps=4)
    assert (steps.checked_at, steps.unit, steps.times(2)) == ("step", "step", [4, 8])
    assert steps.check(Moment(0.5, 3)) is None and steps.check(Moment(1.0, 4)) == "scheduled"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Every(epochs=1, steps=2), r"`epochs` or `steps`, not both"),
        (lambda: Every(epochs=0), r"`epochs` must be an integer >= 1, got 0"),
        (lambda: Every(steps=True), r"`steps` must be an integer >= 1, got True"),
        (lambda: Every(first=-1), r"`first` must be an integer >= 0, got -1"),
        (lambda: At([2, 1]), r"increasing order, got \[2, 1\]"),
        (lambda: At([1.5]), r"`times` must be an integer >= 0, got 1.5"),
        (lambda: At([1], unit="batch"), r"`unit` must be one of .*'batch'"),
    ],
)
def test_bad_trigger_arguments_name_the_argument(build: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_at_releases_at_its_times_in_its_unit() -> None:
    at = At([0, 3], unit="step")
    assert (at.checked_at, at.times(5)) == ("step", [0, 3])
    assert at.check(Moment(0, 0)) == "scheduled"
    assert at.check(Moment(0, 2, released=1)) is None and at.check(Moment(0, 3, released=1)) == "scheduled"
    assert at.check(Moment(9, 9, released=2)) is None


def test_plateau_state_is_plain_and_resets() -> None:
    plateau = Plateau("loss", patience=2)
    assert plateau.state_dict() == {"best": None, "wait": 0}  # no best yet: no infinity in a checkpoint
    plateau.check(Moment(1, 4, metrics={"loss": 0.5}))
    plateau.check(Moment(2, 8, metrics={"loss": 0.6}))
    assert plateau.state_dict() == {"best": 0.5, "wait": 1}
    other = Plateau("loss", patience=2)
    other.load_state_dict(json.loads(json.dumps(plateau.state_dict())))
    assert other.check(Moment(3, 12, metrics={"loss": 0.7})) == "plateau"
    other.reset()
    assert other.state_dict() == {"best": None, "wait": 0}
    assert (Plateau("acc", mode="max").check(Moment(1, 4, metrics={"acc": math.nan})), other.unit) == (None, "epoch")


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        (
            {"val_loss": 1.0, "val_acc": 0.5, "train_loss": 2.0},
            r"'val_los', which is not among the logged metrics. Closest: 'val_loss'",
        ),
        ({}, r"'val_los', which is not among the logged metrics. Logged: \(none\)"),
    ],
)
def test_an_unlogged_metric_names_the_closest_logged_ones(metrics: dict[str, float], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        Moment(1, 4, metrics=metrics).metric("val_los")


def test_moment_counts_time_since_the_last_release() -> None:
    moment = Moment(3.5, 14, released=1, last_release=(2.0, 8))
    assert (moment.since_release("epoch"), moment.since_release("step")) == (1.5, 6)
    assert Moment(3.5, 14).since_release("step") == 14


# --------------------------------------------------------------------------------------------- plans


def plan_names(what: What) -> list[list[str]]:
    return [[part.name for part in release] for release in what.plan(Net(), "backbone").releases]


def test_blocks_per_release_and_decay() -> None:
    plan = Blocks(per_release=2, decay=0.5).plan(Net(), "backbone")
    assert [[part.name for part in release] for release in plan.releases] == [BLOCKS[:2], BLOCKS[2:]]
    assert [[part.lr_factor for part in release] for release in plan.releases] == [[1.0, 1.0], [0.5]]
    assert plan.frozen_params == 0 and [block.name for block in plan.blocks] == BLOCKS[::-1]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["backbone.*"], [["backbone.3"], ["backbone.1"], ["backbone.0"]]),  # a glob: a block per match with params
        (["backbone.[01]", "backbone.3"], [["backbone.3"], ["backbone.1"], ["backbone.0"]]),
        ([["backbone.0", "backbone.1"], "backbone.3"], [["backbone.3"], ["backbone.stem"]]),  # a list: one block
        (["backbone.1"], [["backbone.1+3"], ["backbone.0"]]),  # what no entry holds joins the block before it
    ],
)
def test_named_blocks(names: list[Any], expected: list[list[str]]) -> None:
    assert plan_names(Blocks(per_release=1, names=names)) == expected


def test_a_plain_string_for_names_is_an_error_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"`names` must be a list of blocks.*got 'backbone.3'.*write \['backbone.3'\]"):
        Blocks(names="backbone.3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("releases", "match"),
    [
        ({}, r"`releases` must map epochs.*empty schedule"),
        ([(1, "backbone.3")], r"`releases` must map epochs"),
        ({"1.5": "backbone.3"}, r"`releases` has the key '1.5'"),
        ({1.0: "backbone.3"}, r"`releases` has the key 1.0"),
        ({True: "backbone.3"}, r"`releases` has the key True"),
        ({-1: "backbone.3"}, r"`releases` has the key -1"),
        ({1: 3}, r"`releases\[1\]` is 3"),
        ({1: ["backbone.3", ""]}, r"`releases\[1\]` holds ''"),
    ],
)
def test_schedule_validation(releases: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule(releases)


def test_a_schedule_sorts_its_times_and_decays_by_release() -> None:
    schedule = Schedule({4: "backbone.0", 1: ["backbone.3", "backbone.1"]}, decay=0.5)
    assert schedule.trigger().times(2) == [1, 4]
    plan = schedule.plan(Net(), "backbone")
    assert [[(p.name, p.lr_factor) for p in release] for release in plan.releases] == [
        [("backbone.3", 1.0), ("backbone.1", 1.0)],
        [("backbone.0", 0.5)],
    ]
    assert Blocks().trigger() is None and LayerDecay().trigger() is None


def test_layer_decay_releases_every_block_at_once_decayed_with_depth() -> None:
    [release] = LayerDecay(0.5).plan(Net(), "backbone").releases
    assert [(part.name, part.lr_factor) for part in release] == [
        ("backbone.3", 1.0),
        ("backbone.1", 0.5),
        ("backbone.0", 0.25),
    ]


def test_the_release_line_pairs_each_part_with_its_own_rate() -> None:
    """With layer decay the parts get different rates: the line names each part next to the rate its group has."""
    u = unfreezer(what=LayerDecay(0.5), lr_scale=1.0)
    [record] = u.advance(u.moment(1, 4), "epoch")
    line = u.describe(record)
    rates = {g["name"]: g["lr"] for g in u.groups.optimizer.param_groups}
    described = re.findall(r"(backbone\.\d) \([\d,]+ params, lr ([\d.e-]+) = ([\d.]+) x head", line)
    assert [name for name, _, _ in described] == ["backbone.3", "backbone.1", "backbone.0"]
    for name, lr, factor in described:
        assert float(lr) == pytest.approx(rates[name], rel=1e-3) and float(factor) == pytest.approx(rates[name] / 0.1)


# --------------------------------------------------------------------------------------------- released groups


def test_the_head_is_the_first_group_left_with_parameters() -> None:
    """The user lists a backbone-only group first: the head is the next one, named "head" as it had no name."""
    root = Net()
    optimizer = torch.optim.SGD(
        [{"params": root.backbone.parameters(), "lr": 0.5}, {"params": root.head.parameters(), "lr": 0.01}], lr=0.1
    )
    groups = ReleasedGroups(optimizer)
    groups.withdraw(named_backbone(root))
    assert groups.head_index == 1 and groups.head is optimizer.param_groups[1]
    assert optimizer.param_groups[1]["name"] == "head" and "name" not in optimizer.param_groups[0]
    groups.add(list(root.backbone[3].parameters()), "backbone.3", 0.5, step=0)
    groups.tie_to_head(0)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.005)  # the head's rate, not group 0's
    named = torch.optim.SGD([{"params": root.head.parameters(), "name": "classifier"}], lr=0.1)
    ReleasedGroups(named).withdraw(named_backbone(root))
    assert named.param_groups[0]["name"] == "classifier"


def test_the_head_follows_its_group_through_an_optimizer_reload() -> None:
    root = Net()
    optimizer = torch.optim.SGD(root.parameters(), lr=0.1)
    groups = ReleasedGroups(optimizer)
    groups.withdraw(named_backbone(root))
    optimizer.load_state_dict(optimizer.state_dict())  # a resumed fit: new group dicts, the same params lists
    groups.add(list(root.backbone[3].parameters()), "backbone.3", 0.5, step=0)
    assert groups.head is optimizer.param_groups[0]


def test_origin_rule_puts_a_never_held_parameter_where_timms_rule_would() -> None:
    timm_optim = pytest.importorskip("timm.optim")
    root = Net()
    for param in root.backbone.parameters():
        param.requires_grad = False  # configure_optimizers sees only the trainable parameters
    optimizer = torch.optim.AdamW(timm_optim.param_groups_weight_decay(root, weight_decay=0.05), lr=0.01)
    named = list(root.named_parameters())
    rule = origin_rule(optimizer, named)
    assert rule is not None
    groups = ReleasedGroups(optimizer)
    groups.rule = rule
    groups.withdraw(named_backbone(root))
    block = root.backbone[3]
    groups.add([block[0].weight, block[0].bias, block[1].weight], "backbone.3", 1.0, step=0)
    added = {group["name"]: group for group in optimizer.param_groups[2:]}
    # timm's no-decay group comes first: it holds the head's bias, so it is the head's group
    decay, plain = added["backbone.3/group1"], added["backbone.3/head"]
    assert decay["weight_decay"] == 0.05 and decay["params"] == [block[0].weight]  # a conv weight
    assert plain["weight_decay"] == 0.0 and plain["params"] == [block[0].bias, block[1].weight]  # bias, norm weight
    # the control: one group does not follow the rule
    assert origin_rule(torch.optim.AdamW(root.head.parameters(), lr=0.01, weight_decay=0.05), named) is None


# --------------------------------------------------------------------------------------------- lr preview


def test_simulate_drives_an_unfreezer_over_a_budget() -> None:
    u = unfreezer(lr_scale=0.5, what=Blocks(per_release=1, decay=0.5))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(u.groups.optimizer, gamma=0.9)
    u.groups.schedulers.append(scheduler)
    preview = simulate(u, [SchedulerStep(scheduler, "step")], Budget(batches_per_epoch=4, max_epochs=3))
    assert [(r.step, r.epoch, r.names) for r in preview.releases] == [(4, 1, ("backbone.3",)), (8, 2, ("backbone.1",))]
    head = preview.lrs["head"]
    assert head == pytest.approx([0.1 * 0.9**step for step in range(12)])
    assert preview.lrs["backbone.3"][:4] == [None] * 4
    assert preview.lrs["backbone.3"][4:] == pytest.approx([0.5 * lr for lr in head[4:]])
    assert preview.lrs["backbone.1"][8:] == pytest.approx([0.25 * lr for lr in head[8:]])
    assert [r.index for r in u.history] == [0, 1]  # the same object a fit drives


@pytest.mark.parametrize(("relative", "scale"), [(0.05, 0.2), (0.005, 1.0)])
def test_max_step_scales_a_released_parts_rate_by_how_far_its_first_step_went_past_it(
    relative: float, scale: float
) -> None:
    u = unfreezer(bn="auto", lr_scale=0.5, max_step=0.01)
    [record] = u.advance(u.moment(1, 4), "epoch")
    assert record.lr_factors == (0.5,) and group_lr(u, "backbone.3") == pytest.approx(0.05)
    u.before_step(4)
    move(u, "backbone.3", relative)
    u.after_step(5)
    assert u.history[0].lr_factors == pytest.approx((0.5 * scale,))
    u.before_step(5)  # the group follows its factor at the next step
    assert group_lr(u, "backbone.3") == pytest.approx(0.05 * scale)
    state = json.loads(json.dumps(u.state_dict()))
    resumed = unfreezer(bn="auto", lr_scale=0.5, max_step=0.01)
    resumed.load_state_dict(state)
    resumed.freeze()
    resumed.restore()
    resumed.before_step(6)
    assert group_lr(resumed, "backbone.3") == pytest.approx(0.05 * scale)  # the scaled rate survives a resume


def gradients(u: Unfreezer, part: str, relative: float) -> None:
    """Gradients on the part's weights (ndim >= 2) that a plain SGD step at rate 1 would move by ``relative``."""
    for param in u.root.get_submodule(part).parameters():
        param.grad = relative * param.detach().clone() if param.ndim >= 2 else torch.zeros_like(param)


def group_lr(u: Unfreezer, name: str) -> float:
    """The learning rate of the optimizer's param group named ``name``."""
    [group] = [g for g in u.groups.optimizer.param_groups if g.get("name") == name]
    return float(group["lr"])


@pytest.mark.parametrize(("later", "scale"), [(0.06, 1 / 3), (0.01, 1.0)])
def test_max_step_released_caps_a_release_at_the_step_the_earlier_parts_would_take_now(
    later: float, scale: float
) -> None:
    u = unfreezer(bn="auto", lr_scale=0.5, max_step="released")
    u.advance(u.moment(1, 4), "epoch")
    u.before_step(4)
    gradients(u, "backbone.3", 0.5)  # no part before it: the first release is never capped
    u.after_step(5)
    assert u.history[0].lr_factors == pytest.approx((0.5,))
    u.advance(u.moment(2, 8), "epoch")
    u.before_step(8)
    gradients(u, "backbone.3", 0.02)  # what the earlier part would move now, not at its own first step
    gradients(u, "backbone.1", later)
    notes = u.after_step(9)
    assert u.history[1].lr_factors == pytest.approx((0.5 * scale,))
    said = " ".join(note.text for note in notes)
    expected = "3.0 times as far as the blocks released before it would move now: its rate is scaled by 0.33"
    assert (expected in said) == (scale < 1), said
    u.before_step(9)
    assert group_lr(u, "backbone.1") == pytest.approx(0.1 * 0.5 * scale)
    resumed = unfreezer(bn="auto", lr_scale=0.5, max_step="released")
    resumed.load_state_dict(json.loads(json.dumps(u.state_dict())))
    resumed.freeze()
    resumed.restore()
    resumed.before_step(10)
    assert group_lr(resumed, "backbone.1") == pytest.approx(0.1 * 0.5 * scale)  # the cap survives a resume
    uncapped = unfreezer(bn="auto", lr_scale=0.5)
    uncapped.advance(uncapped.moment(1, 4), "epoch")
    uncapped.advance(uncapped.moment(2, 8), "epoch")
    uncapped.before_step(8)
    gradients(uncapped, "backbone.3", 0.02)
    gradients(uncapped, "backbone.1", later)
    uncapped.after_step(9)
    assert uncapped.history[1].lr_factors == pytest.approx((0.5,))  # the control: no cap by default


def test_max_step_released_leaves_a_release_alone_when_the_earlier_parts_have_no_gradient() -> None:
    u = unfreezer(bn="auto", lr_scale=0.5, max_step="released")
    u.advance(u.moment(1, 4), "epoch")
    u.before_step(4)
    u.after_step(5)
    u.advance(u.moment(2, 8), "epoch")
    u.before_step(8)
    gradients(u, "backbone.1", 0.5)  # backbone.3 has none (a head still at zero): nothing to compare with
    u.after_step(9)
    assert u.history[1].lr_factors == pytest.approx((0.5,))


@pytest.mark.parametrize(("first", "trains"), [(2 * AUTO_STEP, True), (AUTO_STEP / 2, False), (None, None)])
def test_bn_auto_takes_its_decision_from_a_checkpoint_that_predates_it(
    first: float | None, trains: bool | None
) -> None:
    """A 0.3 checkpoint has the first release's first step but no decision: the step decides as it would have."""
    u = unfreezer(bn="auto")
    state = u.state_dict()
    del state["norms_train"]
    state["first_step"] = [None, 0.0] if first is None else [0, first]
    u.load_state_dict(state)
    assert u.first_steps.norms_train is trains


@pytest.mark.parametrize(
    ("shift", "resolved", "said"),
    [(0.1, "released", "near its source"), (NEAR_SOURCE, None, "far from its"), (None, None, "unknown")],
)
def test_max_step_auto_resolves_from_the_targets_shift_and_keeps_it_through_a_checkpoint(
    shift: float | None, resolved: str | None, said: str
) -> None:
    u = unfreezer(max_step="auto")
    assert u.first_steps.unresolved
    assert said in u.first_steps.resolve(shift)
    assert u.first_steps.max_step == resolved and not u.first_steps.unresolved
    state = json.loads(json.dumps(u.state_dict()))
    resumed = unfreezer(max_step="auto")
    resumed.load_state_dict(state)
    assert (resumed.first_steps.max_step, resumed.first_steps.source_shift) == (resolved, shift)


def auto_unfreezer() -> Unfreezer:
    """``max_step="auto"`` and ``bn="auto"``, released blocks at 0.5 x the head's rate, one block per release."""
    return unfreezer(bn="auto", lr_scale=0.5, max_step="auto", what=Blocks(per_release=1))


def auto_resumed(state: Mapping[str, Any]) -> Unfreezer:
    """An :func:`auto_unfreezer` resumed from ``state``, saved through JSON as a checkpoint keeps it."""
    resumed = auto_unfreezer()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.freeze()
    resumed.restore()
    return resumed


def near_unfreezer(shift: float, first: float) -> Unfreezer:
    """An :func:`auto_unfreezer` resolved from ``shift``; the first release's first step moved its weights by
    ``first``, and the second release is done."""
    u = auto_unfreezer()
    u.first_steps.resolve(shift)
    u.advance(u.moment(1, 4), "epoch")
    u.before_step(4)
    move(u, "backbone.3", first)
    u.after_step(5)
    u.advance(u.moment(2, 8), "epoch")
    return u


@pytest.mark.parametrize(
    ("shift", "first", "decay"),
    [(0.1, 2 * AUTO_STEP, NEAR_DECAY), (0.1, AUTO_STEP / 2, 1.0), (NEAR_SOURCE, 2 * AUTO_STEP, 1.0)],
    ids=["near-fast", "near-slow", "far-fast"],
)
def test_max_step_auto_near_the_source_decays_each_later_release_once_the_first_moved_fast(
    shift: float, first: float, decay: float
) -> None:
    u = near_unfreezer(shift, first)
    assert u.history[0].lr_factors == pytest.approx((0.5,))
    assert u.history[1].lr_factors == pytest.approx((0.5 * decay,))
    assert group_lr(u, "backbone.1") == pytest.approx(0.1 * 0.5 * decay)
    resumed = auto_resumed(u.state_dict())
    resumed.advance(resumed.moment(3, 12), "epoch")  # a release after the resume decays as the fit would have
    assert resumed.history[2].lr_factors == pytest.approx((0.5 * decay**2,))


@pytest.mark.parametrize(
    ("shift", "later", "scale"),
    [(0.1, 4 * NEAR_DECAY * AUTO_STEP, 0.5), (0.1, NEAR_DECAY * AUTO_STEP, 1.0), (NEAR_SOURCE, 0.1, 1.0)],
    ids=["near-beyond", "near-within", "far"],
)
def test_max_step_auto_near_the_source_caps_a_later_first_step_at_the_decayed_first_one(
    shift: float, later: float, scale: float
) -> None:
    """Near the source, release k's first step moves at most ``NEAR_DECAY ** k`` as far as the first release's did
    (under momentum SGD the input side's steps grow, and the decayed rate alone does not keep them so): a faster
    one has its rate scaled down to that, through a resume; far from the source nothing caps it."""
    u = near_unfreezer(shift, 2 * AUTO_STEP)
    u.before_step(8)
    move(u, "backbone.1", later)
    notes = u.after_step(9)
    decay = NEAR_DECAY if shift < NEAR_SOURCE else 1.0
    assert u.history[1].lr_factors == pytest.approx((0.5 * decay * scale,), rel=1e-4)  # float32 weights
    said = " ".join(note.text for note in notes)
    cap = f"{NEAR_DECAY * 2 * AUTO_STEP:.2%}"
    expected = f"more than {NEAR_DECAY:g} x as far as the first release's first step ({cap}): its rate is scaled by 0.5"
    assert (expected in said) == (scale < 1), said
    resumed = auto_resumed(u.state_dict())
    resumed.before_step(10)
    assert group_lr(resumed, "backbone.1") == pytest.approx(0.1 * 0.5 * decay * scale, rel=1e-4)


def test_max_step_auto_decays_nothing_released_before_the_first_release_has_moved() -> None:
    u = auto_unfreezer()
    u.first_steps.resolve(0.1)
    u.advance(u.moment(1, 4), "epoch")
    u.advance(u.moment(2, 4), "epoch")  # a second release before the first one's first step: nothing known yet
    u.before_step(4)
    move(u, "backbone.3", 2 * AUTO_STEP)
    u.after_step(5)
    u.advance(u.moment(3, 8), "epoch")
    assert [r.lr_factors for r in u.history] == [(0.5,), (0.5,), pytest.approx((0.5 * NEAR_DECAY**2,))]


def test_max_step_auto_resumes_a_checkpoint_from_0_5_without_the_decay() -> None:
    """0.5 resolved ``"auto"`` without decaying later releases: its checkpoints go on so."""
    state = near_unfreezer(0.1, 2 * AUTO_STEP).state_dict()
    del state["near_decay"], state["first_fast"]
    resumed = auto_resumed(state)
    resumed.advance(resumed.moment(3, 12), "epoch")
    assert resumed.history[2].lr_factors == pytest.approx((0.5,))


def test_max_step_auto_resumes_a_checkpoint_from_0_6_with_the_decayed_rate_alone() -> None:
    """0.6 decayed later releases' rates without capping their first steps: its checkpoints go on so."""
    state = near_unfreezer(0.1, 2 * AUTO_STEP).state_dict()
    del state["near_step_cap"]
    resumed = auto_resumed(state)
    resumed.before_step(8)
    move(resumed, "backbone.1", 4 * NEAR_DECAY * AUTO_STEP)  # capped to half by 0.7 (the test above)
    resumed.after_step(9)
    assert resumed.history[1].lr_factors == pytest.approx((0.5 * NEAR_DECAY,))


def test_max_step_auto_resumes_a_checkpoint_from_0_4_without_a_cap_and_leaves_a_set_value_alone() -> None:
    """0.4 had no ``"auto"``: its default, ``None``, is what its checkpoints ran with."""
    state = unfreezer(max_step="auto").state_dict()
    del state["max_step"], state["source_shift"]
    resumed = unfreezer(max_step="auto")
    resumed.load_state_dict(state)
    assert resumed.first_steps.max_step is None
    explicit = unfreezer(max_step="released")
    explicit.load_state_dict({**state, "max_step": None})
    assert explicit.first_steps.max_step == "released"
