"""GradualUnfreeze resume exactness: ``trainer.fit(model, ckpt_path=...)`` from a checkpoint taken before, at or
after a release (epoch end or mid-epoch) ends bitwise where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from lightning_bnfreeze import GradualUnfreeze, Schedule
from tests.unfreeze_helpers import (
    RESUME_WARNINGS,
    Run,
    UnfreezeModel,
    ValidatedModel,
    assert_resumed_like,
    cosine,
    fit_run,
    make_trainer,
)

SCHEDULE = {1: "backbone.3", 2: ["backbone.1", "backbone.0"]}
MAX_EPOCHS = 4

pytestmark = RESUME_WARNINGS


def step_lr(optimizer: Optimizer) -> dict[str, Any]:
    # Not ReduceLROnPlateau: Lightning itself does not resume that one exactly from these checkpoints (its
    # epoch-end plateau step is missed), with or without GradualUnfreeze.
    return {"scheduler": sched.StepLR(optimizer, step_size=1, gamma=0.5), "interval": "epoch"}


CONFIGS: dict[str, dict[str, Any]] = {
    # Adam with a per-step scheduler, warm-up running across checkpoints, released norm layers training,
    # validation twice per epoch (it switches every module to eval mode and back)
    "adam-cosine-warmup": {
        "model": {"optimizer": "adam", "lr": 0.01, "scheduler": cosine},
        "unfreeze": {"warmup_steps": 3, "bn": "train"},
        "validate": True,
    },
    # SGD with momentum over trainable parameters only, per-epoch scheduler, released norm layers kept frozen
    "sgd-steplr-frozen-bn": {
        "model": {"optimizer": "sgd_momentum", "lr": 0.05, "scheduler": step_lr, "trainable_only": True},
        "unfreeze": {"bn": "frozen"},
    },
    # plain SGD, released norm layers as their first step decides (the decision is part of the saved history)
    "sgd-auto-bn": {"model": {"optimizer": "sgd", "lr": 0.1}, "unfreeze": {"bn": "auto"}},
}


def train(
    config: str,
    ckpt_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    callback: GradualUnfreeze | None = None,
) -> Run:
    torch.manual_seed(0)
    validate = CONFIGS[config].get("validate", False)
    model = (ValidatedModel if validate else UnfreezeModel)(
        record=True, batches_by_index=True, **CONFIGS[config]["model"]
    )
    if callback is None:
        callback = GradualUnfreeze(what=Schedule(SCHEDULE, decay=0.4), lr_scale=0.3, **CONFIGS[config]["unfreeze"])
    callbacks: list[Any] = [callback]
    if checkpoint_dir is not None:
        callbacks += [
            ModelCheckpoint(checkpoint_dir, "{epoch}", save_top_k=-1, every_n_epochs=1),
            ModelCheckpoint(checkpoint_dir, "{step}", save_top_k=-1, every_n_train_steps=3),
        ]
    trainer = make_trainer(
        callbacks,
        max_epochs=MAX_EPOCHS,
        enable_checkpointing=checkpoint_dir is not None,
        val_check_interval=0.5 if validate else None,
        limit_val_batches=1 if validate else None,
    )
    return fit_run(trainer, model, callback, ckpt_path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:
    runs = {}
    for config in CONFIGS:
        directory = tmp_path_factory.mktemp(config)
        runs[config] = (train(config, checkpoint_dir=directory), directory)
    return runs


@pytest.mark.parametrize(
    ("config", "checkpoint", "released"),
    [
        ("adam-cosine-warmup", "epoch=0.ckpt", []),  # just before the first release
        ("adam-cosine-warmup", "epoch=1.ckpt", [(0, 1, 4)]),  # after one, before the next
        ("adam-cosine-warmup", "epoch=2.ckpt", [(0, 1, 4), (1, 2, 8)]),  # after all
        ("adam-cosine-warmup", "step=6.ckpt", [(0, 1, 4)]),  # mid-epoch, inside the warm-up
        ("adam-cosine-warmup", "step=9.ckpt", [(0, 1, 4), (1, 2, 8)]),  # mid-epoch
        ("sgd-steplr-frozen-bn", "epoch=1.ckpt", [(0, 1, 4)]),
        ("sgd-steplr-frozen-bn", "step=9.ckpt", [(0, 1, 4), (1, 2, 8)]),
        ("sgd-auto-bn", "epoch=1.ckpt", [(0, 1, 4)]),
        ("sgd-auto-bn", "step=9.ckpt", [(0, 1, 4), (1, 2, 8)]),
    ],
)
def test_resume_ends_bitwise_where_the_uninterrupted_run_ends(
    uninterrupted: dict[str, tuple[Run, Path]], config: str, checkpoint: str, released: list[tuple[int, int, int]]
) -> None:
    reference, directory = uninterrupted[config]
    path = directory / checkpoint
    # the checkpoint loads without unpickling arbitrary objects and holds the callback's state
    content = torch.load(path, weights_only=True)
    history = content["callbacks"][reference.callback.state_key]["unfreezer"]["history"]
    assert [(record["index"], record["epoch"], record["step"]) for record in history] == released

    resumed = train(config, ckpt_path=path)

    assert [(g.get("name"), len(g["params"]), g["lr"]) for g in resumed.optimizer["param_groups"]] == [
        (g.get("name"), len(g["params"]), g["lr"]) for g in reference.optimizer["param_groups"]
    ]
    assert_resumed_like(resumed, reference, content["global_step"])


def test_resume_state_is_needed(uninterrupted: dict[str, tuple[Run, Path]]) -> None:
    """Contrast: without the callback's state the resumed optimizer cannot even be restored."""
    reference, directory = uninterrupted["adam-cosine-warmup"]
    path = directory / "epoch=1.ckpt"
    content = torch.load(path, weights_only=True)
    del content["callbacks"][reference.callback.state_key]
    stripped = directory / "stripped.ckpt"
    torch.save(content, stripped)
    with pytest.raises(ValueError, match="parameter group"):
        train("adam-cosine-warmup", ckpt_path=stripped)


def test_a_callback_fitted_before_resumes_the_checkpoint_it_is_given(
    uninterrupted: dict[str, tuple[Run, Path]],
) -> None:
    """The callback of a finished fit, used again with ``ckpt_path``, takes the checkpoint's releases, not its own."""
    reference, directory = uninterrupted["sgd-auto-bn"]
    used = train("sgd-auto-bn").callback
    assert len(used.history) == 2
    resumed = train("sgd-auto-bn", ckpt_path=directory / "epoch=1.ckpt", callback=used)
    assert_resumed_like(resumed, reference, torch.load(directory / "epoch=1.ckpt", weights_only=True)["global_step"])


def test_resuming_with_another_lr_scale_warns_and_keeps_the_released_parts_rates(
    uninterrupted: dict[str, tuple[Run, Path]],
) -> None:
    reference, directory = uninterrupted["sgd-auto-bn"]
    callback = GradualUnfreeze(what=Schedule(SCHEDULE, decay=0.4), lr_scale=0.6)  # the checkpoint's: 0.3
    with pytest.warns(UserWarning, match=r"saved with lr_scale=0.3, this callback has lr_scale=0.6: the parts it"):
        resumed = train("sgd-auto-bn", ckpt_path=directory / "epoch=1.ckpt", callback=callback)

    head = reference.optimizer["param_groups"][0]["lr"]
    rates = {g["name"]: g["lr"] / head for g in resumed.optimizer["param_groups"]}
    assert rates["backbone.3"] == pytest.approx(0.3)  # released before the checkpoint: its saved rate
    assert rates["backbone.1"] == rates["backbone.0"] == pytest.approx(0.6 * 0.4)  # released after: the new one
