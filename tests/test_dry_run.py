"""``python -m lightning_bnfreeze.dry_run``: torchvision/timm models on the meta device, BNFreezeCallback's frozen
layers when a config has no GradualUnfreeze, its own help page, no Lightning banners, and the base install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from lightning_bnfreeze import dry_run
from lightning_bnfreeze.norm_plan import norm_freeze_plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
NO_PRETRAINING = "--model.init_args.pretrained=false"  # the plan needs the architecture only


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dry_run"])  # LightningCLI parses `args`, not pytest's argv


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_torchvision_model_is_built_on_the_meta_device() -> None:
    model = dry_run.build_model("torchvision:vit_b_16")
    assert {param.device.type for param in model.parameters()} == {"meta"}
    assert sum(param.numel() for param in model.parameters()) == 86_567_656


def test_timm_model_is_built_on_the_meta_device() -> None:
    pytest.importorskip("timm")  # an optional dependency
    model = dry_run.build_model("timm:vit_tiny_patch16_224")
    assert {param.device.type for param in model.parameters()} == {"meta"}


def test_unknown_model_name_lists_the_closest() -> None:
    with pytest.raises(ValueError, match=r"torchvision model 'vit_b16'.*Closest names: vit_b_16"):
        dry_run.build_model("torchvision:vit_b16")


def test_vit_b_16_plan_releases_its_encoder_layers_output_side_first() -> None:
    plan = dry_run.main(["--model", "torchvision:vit_b_16", "--blocks_per_release", "1"])
    assert "on torchvision:vit_b_16 as `backbone` (86,567,656 parameters; built on the meta device" in plan
    released = [row[1] for row in rows(plan.partition("Releases:")[2]) if row and row[0].isdigit()]
    layer_11 = next(i for i, name in enumerate(released) if "encoder_layer_11" in name)
    layer_0 = released.index("backbone.encoder.layers.encoder_layer_0")
    assert layer_11 < layer_0


def test_callback_arguments_from_the_command_line() -> None:
    plan = dry_run.main(
        [
            *("--model", "torchvision:resnet18"),
            *("--schedule", "{1: backbone.layer4, 2: [backbone.layer3]}"),
            *("--lr_scale", "0.1", "--lr_decay", "0.5", "--max_epochs", "2"),
        ]
    )
    assert (
        "GradualUnfreeze(schedule={1: 'backbone.layer4', 2: ['backbone.layer3']}, lr_scale=0.1, lr_decay=0.5)" in plan
    )
    assert ["1", "backbone.layer4", "8,393,728", "0.1"] in rows(plan)
    assert ["2", "(>=", "max_epochs:", "never)", "backbone.layer3", "2,099,712", "0.05"] in rows(plan)


def test_config_with_bn_freeze_callback_shows_its_frozen_layers() -> None:
    plan = dry_run.main(["--config", str(CONFIGS / "linear_probe.yaml"), NO_PRETRAINING])
    assert plan.startswith("BNFreezeCallback(modules=['backbone'])")
    assert ["backbone.stage2.shortcut.1", "BatchNorm2d", "frozen", "inside", "'backbone'"] in rows(plan)
    assert plan.endswith("9 of 9 norm layer(s) frozen.")


def test_config_without_the_callbacks_shows_what_bn_freeze_callback_would_freeze() -> None:
    plan = dry_run.main(["--config", str(CONFIGS / "full_finetune.yaml"), NO_PRETRAINING])
    assert plan.startswith("No GradualUnfreeze or BNFreezeCallback in `trainer.callbacks`")
    assert "Keras semantics" in plan  # BNFreezeCallback()'s rule; here every parameter trains: nothing frozen
    assert plan.endswith("0 of 9 norm layer(s) frozen.")
    frozen_backbone = dry_run.main(
        ["--config", str(CONFIGS / "full_finetune.yaml"), NO_PRETRAINING, "--model.init_args.freeze_backbone=true"]
    )
    assert frozen_backbone.endswith("9 of 9 norm layer(s) frozen.")


def test_keras_rule_explains_layers_without_parameters() -> None:
    """An InstanceNorm without affine parameters follows its nearest parent that has some."""
    inner = nn.Sequential(nn.Conv2d(1, 2, 1), nn.InstanceNorm2d(2, track_running_stats=True))
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), inner)
    inner.requires_grad_(False)
    table = rows(norm_freeze_plan(model))
    assert ["1", "BatchNorm2d", "not", "frozen", "2", "of", "its", "2", "own", "parameters", "require", "grad"] in table
    assert [
        "2.1",
        "InstanceNorm2d",
        "frozen",
        "all",
        "2",
        "of",
        "its",
        "parent's",
        "have",
        "requires_grad=False",
    ] in table


def test_help_describes_the_tool_then_the_lightning_cli_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dry_run.main(["--help"])
    assert exit_info.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith("usage: python -m lightning_bnfreeze.dry_run --config CONFIG")
    tool, _, lightning_cli = page.partition("LightningCLI arguments, for --config")
    assert "Show what the callbacks would do" in tool and "--lr_scale" in tool
    assert "--trainer.max_epochs" in lightning_cli


def test_no_lightning_banners(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lightning_bnfreeze.dry_run", "--config", str(CONFIGS / "linear_probe.yaml")]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, NO_PRETRAINING], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BNFreezeCallback(modules=['backbone'])")
    for banner in ("GPU available", "TPU available", "Tip:", "Seed set"):
        assert banner not in result.stdout + result.stderr


def test_base_install_without_jsonargparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """--config says in one line which extra to install; --model SOURCE:NAME needs no LightningCLI."""
    monkeypatch.setattr(dry_run, "CLI_AVAILABLE", False)
    with pytest.raises(SystemExit, match=r"^dry_run: .*pip install 'lightning-bnfreeze\[cli\]'$"):
        dry_run.main(["--config", str(CONFIGS / "gradual_unfreeze.yaml")])
    assert "backbone.layer4" in dry_run.main(["--model", "torchvision:resnet18"])
