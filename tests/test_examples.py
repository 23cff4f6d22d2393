"""The shipped examples: every config in examples/configs runs through the digits LightningCLI app on a small
budget, writes its plot and a held-out accuracy; the dry-run block in each config's comments is what the dry run
prints for it; the EfficientNet-Lite0 backbone has its ImageNet weights; the plot's releases and axes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg

from examples import plans
from examples.digits import DigitsClassifier, DigitsTransfer
from examples.digits.backbone import pretrained_backbone
from examples.digits.cli import DEFAULT_CONFIG, DigitsCLI, main
from examples.digits.data import normalise
from examples.digits.imagenet import efficientnet_lite, imagenet_inputs
from examples.digits.plot import SchedulePlot

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
    "imagenet_efficientnet",
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
    if name not in ("resnet18", "imagenet_efficientnet"):
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
    unfreezing, 2 epochs: stage3 and stage2 (released at epoch 1) trained, stage1 and the stem not (their
    statistics moved to the target's as the released norm layers started training: ``adapt="auto"``). Full
    fine-tuning: everything."""
    pretrained = pretrained_backbone(cache_dir, epochs=PRETRAIN_EPOCHS).state_dict()

    def changed(cli: DigitsCLI, statistics: bool = True) -> set[str]:
        state = cli.model.backbone.state_dict(keep_vars=True)
        return {
            key.split(".")[0]
            for key, value in state.items()
            if (statistics or isinstance(value, torch.nn.Parameter)) and not torch.equal(value, pretrained[key])
        }

    assert changed(run_config("linear_probe", tmp_path, cache_dir)) == set()
    gradual = run_config("gradual_unfreeze", tmp_path, cache_dir, "--trainer.max_epochs=2")
    assert changed(gradual, statistics=False) == {"stage3", "stage2"}  # released at epoch 1; the others at 2, never
    assert changed(gradual) == {"stem", "stage1", "stage2", "stage3"}
    plotter = next(cb for cb in gradual.trainer.callbacks if isinstance(cb, SchedulePlot))  # type: ignore[attr-defined]
    assert set(plotter.lrs) == {"head", "backbone.stage3", "backbone.stage2"}
    assert sorted(plotter.lrs["backbone.stage3"]) == [1] and sorted(plotter.lrs["backbone.stage2"]) == [1]
    assert changed(run_config("full_finetune", tmp_path, cache_dir)) == {"stem", "stage1", "stage2", "stage3"}


def test_no_arguments_runs_the_main_job(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr("examples.digits.cli.DigitsCLI", lambda *a, **kw: seen.update(kw))
    main([])
    assert seen["args"] == ["fit", "--config", str(DEFAULT_CONFIG)]


def test_every_config_with_gradual_unfreeze_has_a_dry_run_block() -> None:
    with_plan = {path.stem for path in plans.configs_with_a_plan()}
    assert with_plan == set(SHIPPED) - {"linear_probe", "full_finetune"}
    for config in plans.configs_with_a_plan():
        text = config.read_text()
        assert text.count(plans.BEGIN) == 1 and text.count(plans.END) == 1, config


@pytest.mark.parametrize("config", plans.configs_with_a_plan(), ids=lambda path: path.stem)
def test_dry_run_block_in_the_config_is_what_the_dry_run_prints(config: Path) -> None:
    """What each config's comments say is released when: the dry run's plan, regenerated
    (`python -m examples.plans --write` rewrites a stale block)."""
    current, fresh = plans.check(config)
    assert current == fresh, f"stale dry-run block in {config.name}: run `python -m examples.plans --write`"


def test_dry_run_command_prints_the_plan(tmp_path: Path) -> None:
    """The command documented in gradual_unfreeze.yaml, run from the repository root, prints the config's block."""
    config = "examples/configs/gradual_unfreeze.yaml"
    command = [sys.executable, "-m", "lightning_bnfreeze.dry_run", "--config", config]
    command.append("--model.init_args.pretrained=false")  # the plan needs the architecture only
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    block = plans.check(REPO / config)[0].splitlines()[1:-1]
    assert [line.removeprefix("#   ").removeprefix("#") for line in block] == result.stdout.strip().splitlines()
    *table, max_step, adapt, loss = result.stdout.partition("Releases:")[2].strip().splitlines()
    assert max_step.startswith("max_step='auto'")  # what the default may change in the planned rates
    assert adapt.startswith("adapt='auto'")  # and in the norm statistics
    assert loss.startswith("on_loss_rise='retry'")  # and a rise of the loss after the first release
    rows = table[2:]
    releases = [line.split()[:2] for line in rows]
    # the defaults: two blocks per epoch from epoch 1, at the head's learning rate
    assert releases == [
        ["1", "backbone.stage3"],
        ["backbone.stage2", "14,528"],
        ["2", "backbone.stage1"],
        ["backbone.stem", "176"],
    ]
    assert all(" 1 " in line for line in rows)


def test_efficientnet_lite0_backbone_has_imagenet_weights_and_trains_a_step(tmp_path: Path) -> None:
    """`backbone: efficientnet_lite0`: the packaged ImageNet weights, ImageNet inputs, one training step."""
    torch.manual_seed(0)
    model = DigitsClassifier(backbone="efficientnet_lite0", image_size=64, scheduler="none")
    reference = efficientnet_lite(0).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.backbone.state_dict().items())
    assert not torch.equal(
        model.backbone.state_dict()["conv_stem.weight"],
        DigitsClassifier(backbone="efficientnet_lite0", pretrained=False).backbone.state_dict()["conv_stem.weight"],
    )
    # the digits as ImageNet inputs: 64x64 RGB with ImageNet's normalisation
    grey = torch.rand(2, 1, 8, 8)
    inputs = imagenet_inputs(grey, 64)
    assert inputs.shape == (2, 3, 64, 64)
    assert inputs[:, 0].mean().item() == pytest.approx(((grey.mean() - 0.485) / 0.229).item(), abs=0.05)
    assert model(normalise(grey)).shape == (2, 5)
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    trainer = pl.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=DigitsTransfer(k_per_class=2, batch_size=4, eval_batch_size=10))
    changed = [name for name, p in model.backbone.named_parameters() if not torch.equal(p, before[name])]
    assert changed  # full fine-tuning without callbacks: the backbone trained


def test_plot_shows_every_group_and_labels_on_fixed_axes() -> None:
    """Groups at equal learning rates (decay=1) each get a panel; releases and the test figure are labelled;
    the axes depend on the run's peak learning rate only, not on the values plotted; the log axes have a
    labelled tick per decade."""

    def figure(accuracy: float) -> list[Axes]:
        plot = SchedulePlot()
        plot.lrs = {"head": {0: 0.01, 1: 0.01, 2: 0.005}, "backbone.stage3": {1: 0.003, 2: 0.0015}}
        plot.lrs["backbone.stage2"] = {2: 0.0015}  # at the same rate as stage3
        plot.metric, plot.val_images = {0: accuracy, 1: accuracy, 2: accuracy}, 100
        plot.test_metric, plot.test_images = 0.95, 746
        return plot.figure().axes

    head, stage3, stage2, band, accuracy = figure(0.5)
    assert [line.get_ydata()[-1] for line in (stage3.lines[0], stage2.lines[0])] == [0.0015, 0.0015]
    assert [panel.get_ylim() for panel in (head, stage3, stage2)] == [pytest.approx((1e-5, 0.3))] * 3
    assert accuracy.get_ylim() == (0.0, 1.0) == figure(0.9)[-1].get_ylim()
    low, high = head.get_ylim()
    ticks = [tick for tick in head.get_yticks() if low * 0.999 <= tick <= high]
    assert ticks == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])  # more than the two ends
    assert [text.get_text() for text in band.texts] == ["stage3", "stage2"]
    assert len(accuracy.texts) == 0  # the labels are in their own band, off the accuracy curves
    legend = [text.get_text() for text in accuracy.figure.legends[0].get_texts()]
    assert "validation accuracy each epoch (val_acc): 100 images" in legend[0]
    assert legend[1].startswith("test accuracy after training (test_acc): 95.0% on 746 other images")


def test_plot_marks_mid_epoch_releases_where_they_happened_off_the_accuracy_axes() -> None:
    """A release at a step inside an epoch (even the first one) gets its dotted line, marker and label there;
    no label overlaps the accuracy panel."""
    plot = SchedulePlot()
    plot.lrs = {"head": dict.fromkeys(range(4), 0.01), "backbone.stage3": dict.fromkeys(range(4), 0.01)}
    plot.lrs["backbone.stage2"] = dict.fromkeys(range(2, 4), 0.01)
    plot.release_points = {"backbone.stage3": 0.1, "backbone.stage2": 1.7}  # mid-epoch 0, mid-epoch 2
    plot.metric, plot.val_images = dict.fromkeys(range(4), 0.99), 100
    assert plot.releases() == {0.1: ["backbone.stage3"], 1.7: ["backbone.stage2"]}
    figure = plot.figure()
    *_, band, accuracy = figure.axes
    assert [text.get_text() for text in band.texts] == ["stage3", "stage2"]
    assert [line.get_xdata()[0] for line in band.lines if line.get_marker() == "^"] == [0.1, 1.7]
    assert sorted(line.get_xdata()[0] for line in accuracy.lines if line.get_linestyle() == ":") == [0.1, 1.7]
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    panel = accuracy.get_window_extent(renderer)
    assert not any(text.get_window_extent(renderer).overlaps(panel) for text in band.texts)


def test_plot_records_where_a_step_release_happened(tmp_path: Path, cache_dir: Path) -> None:
    """The steps config releases stage3 before step 3, inside epoch 0 (5 batches): its point is 3/5 into it."""
    cli = run_config(
        "gradual_unfreeze_steps", tmp_path, cache_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=5"
    )
    plotter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SchedulePlot))  # type: ignore[attr-defined]
    assert plotter.release_points == {"backbone.stage3": pytest.approx(-0.5 + 3 / 5)}
    assert list(plotter.releases().items()) == [(pytest.approx(0.1), ["backbone.stage3"])]
