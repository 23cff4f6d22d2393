"""The shipped examples: every config in examples/configs runs through the digits LightningCLI app on a small
budget, writes its plot and a held-out accuracy; the dry run prints the release plan of the shipped configs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.axes import Axes

from examples.digits.backbone import pretrained_backbone
from examples.digits.cli import DEFAULT_CONFIG, DigitsCLI, main
from examples.digits.plot import SchedulePlot
from lightning_bnfreeze import dry_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
PRETRAIN_EPOCHS = 1  # a small pretraining budget (its own cache entry), in a temporary cache
SMALL_RUN = [
    "--trainer.max_epochs=3",  # gradual_unfreeze.yaml releases at epochs 1 and 2; resnet18.yaml at 2
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.eval_batch_size=50",
]
SHIPPED = [  # every config in examples/configs
    "linear_probe",
    "gradual_unfreeze",
    "gradual_unfreeze_steps",
    "gradual_unfreeze_plateau",
    "full_finetune",
    "resnet18",
]


pytestmark = pytest.mark.filterwarnings("ignore:GradualUnfreeze. release epoch")  # max_epochs=3 cuts schedules


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["examples.digits"])  # LightningCLI parses `args`, not pytest's argv


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backbone_cache")


def run_config(name: str, out: Path, cache_dir: Path, *extra: str) -> DigitsCLI:
    args = ["fit", "--config", str(CONFIGS / f"{name}.yaml"), f"--trainer.logger.init_args.save_dir={out}", *SMALL_RUN]
    if name != "resnet18":
        args += [f"--model.init_args.cache_dir={cache_dir}", f"--model.init_args.pretrain_epochs={PRETRAIN_EPOCHS}"]
    return main([*args, *extra])


def test_shipped_configs() -> None:
    names = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert names == set(SHIPPED)  # every shipped config runs in test_config_fits_tests_and_plots
    assert DEFAULT_CONFIG == CONFIGS / "gradual_unfreeze.yaml"


@pytest.mark.parametrize("name", SHIPPED)
def test_config_fits_tests_and_plots(name: str, tmp_path: Path, cache_dir: Path) -> None:
    cli = run_config(name, tmp_path, cache_dir, "--data.init_args.shift=contrast")
    assert cli.test_results is not None
    accuracy = cli.test_results[0]["test_acc"]
    assert 0.0 <= accuracy <= 1.0
    log_dir = Path(cli.trainer.log_dir or "")
    assert log_dir.is_relative_to(tmp_path) and log_dir.parent.name == name
    plot = log_dir / "schedule.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(log_dir / "metrics.csv") as file:
        assert any(row.get("test_acc") for row in csv.DictReader(file))
    plotter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SchedulePlot))  # type: ignore[attr-defined]
    assert plotter.path == plot and sorted(plotter.metric) == [0, 1, 2]
    # the test figure is on the plot, with the number of images behind each figure (one batch of 50 here)
    assert plotter.test_metric == pytest.approx(accuracy) and plotter.test_images == plotter.val_images == 50
    summary = cli.summary()
    assert f"{accuracy:.1%}" in summary and str(plot) in summary


def test_what_each_config_trains(tmp_path: Path, cache_dir: Path) -> None:
    """Linear probe: the backbone (BatchNorm statistics included) is bitwise the pretrained one. Gradual
    unfreezing, 2 epochs: stage3 and stage2 (released at epoch 1) trained, stage1 and the stem not. Full
    fine-tuning: everything."""
    pretrained = pretrained_backbone(cache_dir, epochs=PRETRAIN_EPOCHS).state_dict()

    def changed(cli: DigitsCLI) -> set[str]:
        state = cli.model.backbone.state_dict()
        return {key.split(".")[0] for key, value in state.items() if not torch.equal(value, pretrained[key])}

    assert changed(run_config("linear_probe", tmp_path, cache_dir)) == set()
    gradual = run_config("gradual_unfreeze", tmp_path, cache_dir, "--trainer.max_epochs=2")
    assert changed(gradual) == {"stage3", "stage2"}  # released at epoch 1; stage1 and the stem at 2, never reached
    plotter = next(cb for cb in gradual.trainer.callbacks if isinstance(cb, SchedulePlot))  # type: ignore[attr-defined]
    assert set(plotter.lrs) == {"head", "backbone.stage3", "backbone.stage2"}
    assert sorted(plotter.lrs["backbone.stage3"]) == [1] and sorted(plotter.lrs["backbone.stage2"]) == [1]
    assert changed(run_config("full_finetune", tmp_path, cache_dir)) == {"stem", "stage1", "stage2", "stage3"}


def test_no_arguments_runs_the_main_job(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr("examples.digits.cli.DigitsCLI", lambda *a, **kw: seen.update(kw))
    main([])
    assert seen["args"] == ["fit", "--config", str(DEFAULT_CONFIG)]


def test_dry_run_command_prints_the_plan(tmp_path: Path) -> None:
    """The command documented in gradual_unfreeze.yaml, run from the repository root."""
    command = [sys.executable, "-m", "lightning_bnfreeze.dry_run", "--config", "examples/configs/gradual_unfreeze.yaml"]
    command.append("--model.init_args.pretrained=false")  # the plan needs the architecture only
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    releases = result.stdout.partition("Releases:")[2]
    rows = [line.split() for line in releases.strip().splitlines()[2:]]
    # epoch (on a release's first row), block, parameters, lr factor, norm layers, hyperparameters from
    # (the config's: two blocks per release, at 2 x the head's learning rate)
    assert [(row[0] if len(row) == 6 else "", row[-5], row[-3]) for row in rows] == [
        ("1", "backbone.stage3", "2"),
        ("", "backbone.stage2", "2"),
        ("2", "backbone.stage1", "2"),
        ("", "backbone.stem", "2"),
    ]


def test_dry_run_resnet18_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    plan = dry_run.main(["--config", "examples/configs/resnet18.yaml"])
    rows = [line.split() for line in plan.splitlines()]
    at_6 = rows.index(["6", "backbone.layer2", "525,568", "0.025", "train", "head"])  # released together, same rate
    assert rows[at_6 + 1] == ["backbone.layer1", "147,968", "0.025", "train", "head"]
    assert "Never released (stays frozen): 9,536 parameters of 'backbone'." in plan  # the stem (conv1, bn1)


def test_plot_shows_every_group_and_labels_on_fixed_axes() -> None:
    """Groups at equal learning rates (decay=1) each get a panel; releases and the test figure are labelled;
    the axes depend on the run's peak learning rate only, not on the values plotted."""

    def figure(accuracy: float) -> list[Axes]:
        plot = SchedulePlot()
        plot.lrs = {"head": {0: 0.01, 1: 0.01, 2: 0.005}, "backbone.stage3": {1: 0.003, 2: 0.0015}}
        plot.lrs["backbone.stage2"] = {2: 0.0015}  # at the same rate as stage3
        plot.metric, plot.val_images = {0: accuracy, 1: accuracy, 2: accuracy}, 100
        plot.test_metric, plot.test_images = 0.95, 746
        return plot.figure().axes

    head, stage3, stage2, accuracy = figure(0.5)
    assert [line.get_ydata()[-1] for line in (stage3.lines[0], stage2.lines[0])] == [0.0015, 0.0015]
    assert [panel.get_ylim() for panel in (head, stage3, stage2)] == [pytest.approx((1e-5, 0.3))] * 3
    assert accuracy.get_ylim() == (0.0, 1.0) == figure(0.9)[-1].get_ylim()
    texts = [text.get_text() for text in accuracy.texts]
    assert texts == ["released: stage3", "released: stage2"]
    legend = [text.get_text() for text in accuracy.figure.legends[0].get_texts()]
    assert "validation accuracy each epoch (val_acc): 100 images" in legend[0]
    assert legend[1].startswith("test accuracy after training (test_acc): 95.0% on 746 other images")
