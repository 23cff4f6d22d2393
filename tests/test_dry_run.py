"""``python -m lightning_bnfreeze.dry_run``: torchvision/timm models on the meta device with GradualUnfreeze's arguments
as options (objects in YAML), the learning-rate preview, BNFreezeCallback's frozen layers when a config has no
GradualUnfreeze, its own short help page, one spelling of each option, no Lightning banners, and the base install."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from lightning_bnfreeze import GradualUnfreeze, dry_run
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


def test_timm_model_is_built_on_the_meta_device_without_its_classifier() -> None:
    pytest.importorskip("timm")  # an optional dependency
    model = dry_run.build_model("timm:vit_tiny_patch16_224")
    assert {param.device.type for param in model.parameters()} == {"meta"}
    assert not any(name.startswith("head.") for name, _ in model.named_parameters())  # the user's head replaces it


def test_unknown_model_name_lists_the_closest() -> None:
    with pytest.raises(ValueError, match=r"torchvision model 'vit_b16'.*Closest names: vit_b_16"):
        dry_run.build_model("torchvision:vit_b16")


def test_vit_b_16_plan_releases_its_encoder_layers_output_side_first() -> None:
    plan = dry_run.main(
        ["--model", "torchvision:vit_b_16", "--what", "{class_path: Blocks, init_args: {per_release: 1}}"]
    )
    assert "on torchvision:vit_b_16 as `backbone` (86,567,656 parameters; built on the meta device" in plan
    released = [row[1] for row in rows(plan.partition("Releases:")[2]) if row and row[0].isdigit()]
    layer_11 = next(i for i, name in enumerate(released) if "encoder_layer_11" in name)
    layer_0 = released.index("backbone.encoder.layers.encoder_layer_0")
    assert layer_11 < layer_0


def test_callback_arguments_from_the_command_line() -> None:
    plan = dry_run.main(
        [
            *("--model", "torchvision:resnet18"),
            *(
                "--what",
                "{class_path: Schedule, init_args: {releases: {1: backbone.layer4, 2: [backbone.layer3]}, decay: 0.5}}",
            ),
            *("--lr-scale", "0.1", "--max-epochs", "2"),
        ]
    )
    what = "Schedule({1: 'backbone.layer4', 2: ['backbone.layer3']}, unit='epoch', decay=0.5)"
    assert f"GradualUnfreeze(what={what}, lr_scale=0.1) on torchvision:resnet18" in plan
    assert ["1", "backbone.layer4", "8,393,728", "0.1"] in [row[:4] for row in rows(plan)]
    assert ["2", "(>=", "max_epochs:", "never)", "backbone.layer3", "2,099,712", "0.05"] in [
        row[:7] for row in rows(plan)
    ]


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--what", "LayerDecay", "LayerDecay(0.75, granularity='stage', names=None)"),
        ("--what", "{class_path: Blocks, init_args: {per_release: 3}}", "Blocks(per_release=3,"),
        ("--what", "{class_path: lightning_bnfreeze.Blocks, init_args: {decay: 0.5}}", "Blocks(per_release=2,"),
        ("--when", "{class_path: Every, init_args: {steps: 50, first: 10}}", "Every(steps=50, first=10)"),
        ("--when", "{class_path: Plateau, init_args: {monitor: val_loss}}", "Plateau('val_loss', mode='min'"),
        ("--adapt", "{class_path: AdaBN, init_args: {batches: 4}}", "AdaBN(batches=4, prior=32"),
        ("--adapt", "null", "GradualUnfreeze(adapt=None)"),
        ("--trainable", "['*.bn1.*']", "trainable=['*.bn1.*']"),
    ],
)
def test_objects_are_yaml_with_a_class_name_or_path(option: str, value: str, expected: str) -> None:
    assert expected in dry_run.main(["--model", "torchvision:resnet18", option, value]).splitlines()[0]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--what", "Blocks(per_release=1)", "`--what` names the class 'Blocks\\(per_release=1\\)'"),  # never evaluated
        ("--what", "{class_path: Block}", "`--what` names the class 'Block': did you mean 'Blocks'\\?"),
        ("--when", "{class_path: Blocks}", "`--when` names the class 'Blocks'.* It takes Every, Plateau"),
        ("--what", "{class_path: Blocks, init_args: {per_releas: 1}}", "Blocks has no argument `per_releas`; did you"),
        ("--what", "{class_path: Blocks, init_args: {per_release: 0}}", "`per_release` must be an integer >= 1, got 0"),
        ("--what", "{class_path: Schedule, init_args: {releases: {1.5: backbone.layer4}}}", "has the key 1.5"),
        ("--what", "[Blocks]", "`--what` takes a class name or {class_path: NAME, init_args: {...}}"),
    ],
)
def test_bad_objects_are_one_line_errors(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dry_run.main(["--model", "torchvision:resnet18", option, value])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(message, line), line


@pytest.mark.parametrize(
    "old", [["--max_epochs", "2"], ["--lr_scale", "0.1"], ["--blocks_per_release", "1"], ["--schedule", "{1: x}"]]
)
def test_one_spelling_of_each_option(old: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dry_run.main(["--model", "torchvision:resnet18", *old])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(old)}" in error
    dashed = old[0].replace("_", "-")
    assert (f"did you mean {dashed}?" in error) == (dashed in ("--max-epochs", "--lr-scale"))  # it exists


def test_timm_model_preview_draws_the_learning_rates(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    png = tmp_path / "lr.png"
    plan = dry_run.main(["--model", "timm:resnet18", "--preview", str(png), "--batches-per-epoch", "4"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lrs = plan.partition("Learning rates (4 batches per epoch, AdamW at lr 0.001):")[2]
    # the default plan (two blocks per epoch from epoch 1), to one epoch past its last release (epoch 3)
    assert ["release", "at", "step", "12", "(epoch", "3,", "scheduled):", "backbone.stem"] in rows(lrs)
    assert rows(lrs)[-5][:2] == ["15", "3"]  # the last step


def test_preview_needs_an_end_for_a_plateau(capsys: pytest.CaptureFixture[str]) -> None:
    when = "{class_path: Plateau, init_args: {monitor: val_loss}}"
    with pytest.raises(ValueError, match="needs an end: give --max-epochs N"):
        dry_run.main(["--model", "torchvision:resnet18", "--when", when, "--batches-per-epoch", "4"])
    plan = dry_run.main(
        ["--model", "torchvision:resnet18", "--when", when, "--batches-per-epoch", "4", "--max-epochs", "5"]
    )
    assert "earliest possible, on a plateau" in plan


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "torchvision:resnet18", "--preview", "lr.png"], "--preview needs --batches-per-epoch N"),
        (["--config", str(CONFIGS / "linear_probe.yaml"), "--lr-scale", "0.1"], "--lr-scale: with --model SOURCE:NAME"),
        ([], "give --model SOURCE:NAME"),
    ],
)
def test_misplaced_options_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dry_run.main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line


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


@pytest.mark.parametrize(
    ("model", "error"),
    [("model: {lr: 0.05}\n", "takes none"), ("", "`model` is required (no default): give it")],
    ids=["its-arguments", "nothing"],
)
def test_a_config_written_for_a_cli_with_its_model_class_needs_the_class_first(
    model: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``LightningCLI(MyModel)``'s config names no class: the error says how to name it, and named first (before
    ``--config``, as LightningCLI reads its arguments in order), the plan shows."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"{model}trainer:\n  max_epochs: 4\n  callbacks:\n"
        "    - {class_path: lightning_bnfreeze.GradualUnfreeze, init_args: {lr_scale: 0.5}}\n"
    )
    with pytest.raises(SystemExit):
        dry_run.main(["--config", str(config)])
    message = capsys.readouterr().err
    assert error in message and "names no class: name them first, `--model my_project.MyModel --data" in message
    plan = dry_run.main(["--model", "tests.unfreeze_helpers.CLIModel", "--config", str(config)])
    assert plan.startswith("GradualUnfreeze(backbone='backbone'):") and "0.5" in plan


def test_a_config_with_both_callbacks_shows_the_norm_layers_gradual_unfreeze_freezes_at_fit_start(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {class_path: tests.unfreeze_helpers.CLIModel}\ntrainer:\n  max_epochs: 4\n  callbacks:\n"
        "    - {class_path: lightning_bnfreeze.GradualUnfreeze}\n"
        "    - {class_path: lightning_bnfreeze.BNFreezeCallback}\n"
    )
    plan = dry_run.main(["--config", str(config)])
    norm_table = plan.partition(
        "At fit start, after GradualUnfreeze froze 'backbone' (its releases let them go as above):"
    )[2]
    assert norm_table.startswith("\nBNFreezeCallback(modules=None)")
    layers = [row for row in rows(norm_table) if row and row[0].startswith("backbone.")]
    assert layers and all(row[2] == "frozen" for row in layers)
    assert rows(norm_table)[-2][:4] == ["head.1", "BatchNorm1d", "not", "frozen"]  # the head trains


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


def test_help_is_one_short_page_of_meanings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dry_run.main(["--help"])
    assert exit_info.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith("usage: python -m lightning_bnfreeze.dry_run --model SOURCE:NAME")
    assert "Show what the callbacks would do" in page and len(page.splitlines()) < 70
    options = page.partition("GradualUnfreeze arguments (--model):")[2].partition("\n\n")[0]
    # each argument with its meaning from GradualUnfreeze's docstring (an option, then words), its objects' classes
    for name in inspect.signature(GradualUnfreeze).parameters:
        entry = options.partition(f"--{name.replace('_', '-')} ")[2].split("\n  --")[0]
        assert len(" ".join(entry.split()).split()) > 4, (name, entry)
    assert "what each release frees: Blocks, Schedule, LayerDecay" in " ".join(options.split())
    assert "when the next release happens: Every, Plateau" in " ".join(options.split())
    for internal in ("What", "_FoundBlocks", ":class:", "``", "_"):
        assert internal not in options.replace("--", "").replace("lr-", ""), internal


def test_config_help_is_lightning_clis(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dry_run.main(["--config", str(CONFIGS / "linear_probe.yaml"), "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.max_epochs" in capsys.readouterr().out


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
