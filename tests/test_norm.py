"""The plain-PyTorch core without Lightning: ``lightning_bnfreeze.norm`` and ``lightning_bnfreeze.freezer``."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnfreeze import (
    NormFreezer,
    freeze_norm,
    governing_parameters,
    is_norm_frozen,
    is_norm_layer,
    named_norm_layers,
    unfreeze_norm,
)
from lightning_bnfreeze.freezer import KerasFreezer
from tests.helpers import (
    changed,
    judge_norm_forward,
    layer_identities,
    randomize_norm_stats,
    snapshot,
    snapshot_buffers,
)


class ThirdPartyBatchNorm(_BatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        pass


COVERED = {
    "BatchNorm1d": lambda: nn.BatchNorm1d(4),
    "BatchNorm2d": lambda: nn.BatchNorm2d(4),
    "BatchNorm3d": lambda: nn.BatchNorm3d(4),
    "BatchNorm2d_no_affine": lambda: nn.BatchNorm2d(4, affine=False),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(4),
    "LazyBatchNorm1d": nn.LazyBatchNorm1d,
    "LazyBatchNorm2d": nn.LazyBatchNorm2d,
    "LazyBatchNorm3d": nn.LazyBatchNorm3d,
    "InstanceNorm1d_tracking": lambda: nn.InstanceNorm1d(4, track_running_stats=True),
    "InstanceNorm2d_tracking": lambda: nn.InstanceNorm2d(4, track_running_stats=True),
    "InstanceNorm3d_tracking_affine": lambda: nn.InstanceNorm3d(4, affine=True, track_running_stats=True),
    "LazyInstanceNorm2d_tracking": nn.LazyInstanceNorm2d,  # tracks by default, unlike InstanceNorm2d
    "third_party_BatchNorm": lambda: ThirdPartyBatchNorm(4),
}
NOT_COVERED = {
    "LayerNorm": lambda: nn.LayerNorm(4),
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(4),
    "InstanceNorm2d_affine": lambda: nn.InstanceNorm2d(4, affine=True),
    "InstanceNorm3d": lambda: nn.InstanceNorm3d(4),
    "LazyInstanceNorm2d_not_tracking": lambda: nn.LazyInstanceNorm2d(track_running_stats=False),
    "LocalResponseNorm": lambda: nn.LocalResponseNorm(2),
    "Linear": lambda: nn.Linear(4, 4),
    "Sequential_holding_a_BatchNorm": lambda: nn.Sequential(nn.BatchNorm2d(4)),
}


@pytest.mark.parametrize("make", COVERED.values(), ids=COVERED.keys())
def test_is_norm_layer_covers_layers_with_running_statistics(make: Callable[[], nn.Module]) -> None:
    assert is_norm_layer(make())


@pytest.mark.parametrize("make", NOT_COVERED.values(), ids=NOT_COVERED.keys())
def test_is_norm_layer_rejects_the_others(make: Callable[[], nn.Module]) -> None:
    assert not is_norm_layer(make())


def test_named_norm_layers_with_prefix_and_itself() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4))
    assert [name for name, _ in named_norm_layers(model, prefix="m")] == ["m.1"]
    assert [name for name, _ in named_norm_layers(model[1])] == [""]


# --------------------------------------------------------------------------------------------- freeze_norm


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3),
            bn=nn.BatchNorm2d(4),
            block=nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),
            head=nn.Sequential(nn.Flatten(), nn.LazyLinear(2)),
        )
    )
    model(torch.randn(2, 3, 6, 6))  # materialise the head
    randomize_norm_stats(model)
    return model


def _input() -> Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 2


def _bn_verdict(model: nn.Sequential) -> str:
    """Run a forward of ``model``; which statistics ``model.bn`` used, judged from its output."""
    seen = {}
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    handle = model.bn.register_forward_hook(
        lambda layer, args, out: seen.update(v=judge_norm_forward(layer, args[0], out, *stats))
    )
    try:
        model(_input())
    finally:
        handle.remove()
    return seen["v"]


def test_a_train_forward_without_freezing_uses_batch_statistics() -> None:
    """Baseline for the judge: an ordinary layer in training mode."""
    model = _model().train()
    before = snapshot_buffers(model)
    assert _bn_verdict(model) == "batch"
    assert changed(before, snapshot_buffers(model))


@pytest.mark.parametrize(
    "who_calls_train",
    [
        lambda model: model.train(),
        lambda model: model.eval().train(),
        lambda model: model.train(True),
        lambda model: model.bn.train(),
        lambda model: model.requires_grad_(True).train(),
    ],
    ids=["parent_train", "eval_then_train", "train_true", "layer_train", "requires_grad_then_train"],
)
def test_frozen_layer_stays_in_inference_mode(who_calls_train: Callable[[nn.Module], object]) -> None:
    model = _model()
    before = snapshot_buffers(model, ["bn"])
    freeze_norm(model.bn)
    who_calls_train(model)
    assert model.training and model.conv.training and not model.bn.training
    assert _bn_verdict(model) == "running"
    assert changed(before, snapshot_buffers(model, ["bn"])) == []


def test_freeze_norm_leaves_parameters_alone() -> None:
    model = _model()
    freeze_norm(model.bn)
    assert all(p.requires_grad for p in model.bn.parameters())


def test_layer_is_released_only_when_every_holder_lets_go() -> None:
    model = _model()
    freeze_norm(model.bn, holder="a")
    freeze_norm(model.bn, holder="b")
    unfreeze_norm(model.bn, True, holder="a")
    unfreeze_norm(model.bn, True, holder="stranger")  # no effect
    assert is_norm_frozen(model.bn)
    assert not model.train().bn.training
    unfreeze_norm(model.bn, True, holder="b")
    assert not is_norm_frozen(model.bn)
    assert "train" not in vars(model.bn)
    assert model.bn.training
    assert not model.eval().bn.training and model.train().bn.training  # an ordinary module again


@pytest.mark.parametrize("mode", [True, False])
def test_unfreeze_takes_the_given_mode(mode: bool) -> None:
    model = _model()
    freeze_norm(model.bn)
    unfreeze_norm(model.bn, mode)
    assert model.bn.training is mode


def test_frozen_layer_is_the_same_module_with_the_same_attributes() -> None:
    model = _model()
    before = layer_identities(model)
    state_keys = list(model.state_dict())
    freeze_norm(model.bn)
    freeze_norm(model.block[1])
    model.train()
    after = layer_identities(model)
    assert all(after[name].same_as(identity) for name, identity in before.items())
    assert list(model.state_dict()) == state_keys
    assert model.bn.momentum == 0.1 and model.bn.track_running_stats


def test_frozen_layer_loads_and_saves_state_dict() -> None:
    model, other = _model(), _model()
    randomize_norm_stats(other, seed=5)
    freeze_norm(model.bn)
    model.load_state_dict(other.state_dict())
    assert changed(snapshot(model), snapshot(other)) == []
    assert is_norm_frozen(model.bn)


class _Holder:
    """Stands in for a callback: it refers to much more than the model (its trainer, optimizer, ...)."""

    def __init__(self) -> None:
        self.luggage = torch.zeros(100_000)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("holder", [None, "freezer", "callback"])
@pytest.mark.parametrize("mode", [True, False])
def test_copy_of_a_model_with_a_frozen_layer_is_a_plain_model(
    clone: Callable[[nn.Module], nn.Module], holder: str | None, mode: bool
) -> None:
    model = _model().train(mode)
    if holder == "freezer":
        NormFreezer(model).freeze(["bn"])  # the holder is the freezer, which refers to the model
    else:
        freeze_norm(model.bn, _Holder() if holder == "callback" else None)
    model.train(mode)
    copied = clone(model)
    assert not is_norm_frozen(copied.bn) and not {"train", "__getstate__"} & vars(copied.bn).keys()
    assert copied.bn.training == mode  # the mode it would have without the library
    assert changed(snapshot(model), snapshot(copied)) == []
    copied.train()
    assert copied.bn.training and _bn_verdict(copied) == "batch"
    # the original stays frozen
    assert is_norm_frozen(model.bn) and not model.train().bn.training
    before = snapshot_buffers(model, ["bn"])
    assert _bn_verdict(model) == "running"
    assert changed(before, snapshot_buffers(model, ["bn"])) == []


def test_pickle_of_a_model_with_frozen_layers_carries_nothing_of_their_holders() -> None:
    plain = len(pickle.dumps(_model()))
    model = _model()
    freeze_norm(model.bn, _Holder())
    NormFreezer(model).freeze(["block.1"])
    assert len(pickle.dumps(model)) == plain


# --------------------------------------------------------------------------------------------- NormFreezer


@pytest.mark.parametrize("freeze_affine", [True, False])
def test_norm_freezer_freezes_statistics_and_optionally_affine(freeze_affine: bool) -> None:
    model = _model()
    freezer = NormFreezer(model)
    freezer.freeze(["bn", "block.1"], freeze_affine=freeze_affine)
    assert freezer.frozen == {"bn": freeze_affine, "block.1": freeze_affine}
    model.train()
    assert not model.bn.training and not model.block[1].training
    assert all(p.requires_grad is not freeze_affine for p in model.bn.parameters())
    assert all(p.requires_grad for p in model.conv.parameters())
    assert _bn_verdict(model) == "running"


def test_enforce_undoes_direct_changes() -> None:
    model = _model()
    freezer = NormFreezer(model)
    freezer.freeze(["bn"])
    freezer.freeze(["block.1"], freeze_affine=False)
    model.bn.training = True
    model.block[1].training = True
    model.requires_grad_(True)
    freezer.enforce()
    assert not model.bn.training and not model.block[1].training
    assert not any(p.requires_grad for p in model.bn.parameters())
    assert all(p.requires_grad for p in model.block.parameters())  # affine not frozen there; conv untouched
    assert _bn_verdict(model) == "running"


@pytest.mark.parametrize("parent_training", [True, False])
def test_norm_freezer_unfreeze_takes_parents_mode(parent_training: bool) -> None:
    model = _model()
    freezer = NormFreezer(model)
    freezer.freeze(["bn", "block.1"])
    model.train(parent_training)
    model.block.training = not parent_training  # the nested layer follows its own parent
    freezer.unfreeze(["bn", "block.1"])
    assert model.bn.training is parent_training
    assert model.block[1].training is (not parent_training)
    assert freezer.frozen == {}
    assert not any(p.requires_grad for p in model.bn.parameters())  # parameters stay as they are


def test_norm_freezer_rejects_other_layers() -> None:
    with pytest.raises(TypeError, match="'conv' is a Conv2d"):
        NormFreezer(_model()).freeze(["conv"])


def test_two_freezers_share_a_layer() -> None:
    model = _model()
    first, second = NormFreezer(model), NormFreezer(model)
    first.freeze(["bn"])
    second.freeze(["bn"])
    first.unfreeze_all()
    assert not model.train().bn.training
    second.unfreeze_all()
    assert model.train().bn.training


# --------------------------------------------------------------------------------------------- Keras semantics


def _keras_model() -> nn.Module:
    """Norm layers with and without own parameters, at several depths."""
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
            plain=nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),
            nested=nn.Sequential(nn.Conv2d(4, 4, 1), nn.Sequential(nn.InstanceNorm2d(4, track_running_stats=True))),
            top=nn.BatchNorm2d(4, affine=False),
        )
    )


def test_governing_parameters() -> None:
    model = _keras_model()
    deciders = governing_parameters(model)
    assert list(deciders) == ["stem.1", "plain.1", "nested.1.0", "top"]
    assert all(a is b for a, b in zip(deciders["stem.1"], model.stem[1].parameters(), strict=True))
    assert len(deciders["stem.1"]) == 2
    # no parameters of its own: the nearest ancestor that has parameters
    assert all(a is b for a, b in zip(deciders["plain.1"], model.plain.parameters(), strict=True))
    assert all(a is b for a, b in zip(deciders["nested.1.0"], model.nested.parameters(), strict=True))
    assert len(deciders["top"]) == len(list(model.parameters()))  # the root is its nearest such ancestor


@pytest.mark.parametrize(
    "root", [nn.BatchNorm1d(4, affine=False), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4, affine=False))]
)
def test_governing_parameters_without_any_ancestor_parameters(root: nn.Module) -> None:
    assert list(governing_parameters(root).values()) == [()]


def test_requires_grad_follower_sync() -> None:
    model = _keras_model()
    follower = KerasFreezer(NormFreezer(model))
    assert follower.update() == ([], [])

    model.stem[1].requires_grad_(False)  # the layer's own parameters; the conv still trains
    model.plain[0].requires_grad_(False)  # the ancestor's parameters, for the affine-less layer
    model.nested[0].requires_grad_(False)
    assert follower.update() == (["stem.1", "plain.1", "nested.1.0"], [])
    model.train()
    assert [name for name, layer in named_norm_layers(model) if not layer.training] == [
        "stem.1",
        "plain.1",
        "nested.1.0",
    ]
    assert not any(p.requires_grad for p in model.stem[1].parameters())  # parameters are left as they are

    model.stem[1].training = True  # nothing changed in requires_grad: sync still enforces the mode
    assert follower.update() == ([], [])
    assert not model.stem[1].training

    model.plain[0].requires_grad_(True)
    assert follower.update() == ([], ["plain.1"])
    assert model.plain[1].training  # takes its parent's mode
    model.stem[1].weight.requires_grad_(True)  # one trainable parameter is enough to release it
    assert follower.update() == ([], ["stem.1"])
    assert follower.freezer.frozen == {"nested.1.0": False}


def test_requires_grad_follower_keras_semantics_follow_the_layers_own_parameters() -> None:
    model = _keras_model()
    follower = KerasFreezer(NormFreezer(model))
    model.stem[0].requires_grad_(False)  # conv frozen, the norm layer's own parameters trainable
    assert follower.update() == ([], [])
    model.requires_grad_(False)
    assert sorted(follower.update()[0]) == ["nested.1.0", "plain.1", "stem.1", "top"]
