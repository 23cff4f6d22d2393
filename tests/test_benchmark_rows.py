"""The transfer benchmark's raw rows: which ones a report reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import benchmarks.transfer
from benchmarks.transfer import fingerprint, load, machines, pending


def test_rows_of_stale_or_unparsable_recipes_are_left_out(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    rows = [
        {"recipe": "full", "fingerprint": "", "test_acc": 0.5},
        {"recipe": "ours", "fingerprint": fingerprint("ours"), "test_acc": 0.6},
        {"recipe": "ours", "fingerprint": "what an older release resolved to", "test_acc": 0.7},
        {"recipe": "ours:an_option_of_old=1", "fingerprint": "anything", "test_acc": 0.8},  # no longer parses
    ]
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))

    assert [row["test_acc"] for row in load(raw)] == [0.5, 0.6]


def test_an_earlier_release_s_default_is_kept_as_a_variant_when_asked(tmp_path: Path) -> None:
    raw, markdown = tmp_path / "raw.jsonl", tmp_path / "report.md"
    rows = setting_rows({0: 0.92, 1: 0.94})
    earlier = [{**row, "fingerprint": "(..., '0.8.0')", "test_acc": 0.90} for row in rows if row["recipe"] == "ours"]
    older = [{**row, "fingerprint": "(..., '0.7.0')"} for row in earlier]
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows + earlier + older))

    assert {row["recipe"] for row in load(raw)} == {"full", "probe", "ours"}
    assert [row["recipe"] for row in load(raw, "0.8.0") if row["recipe"].startswith("ours@")] == ["ours@0.8.0"] * 2
    report = ["--bench", "cnn", "--report", "--raw", str(raw), "--markdown", str(markdown), "--previous", "0.8.0"]
    benchmarks.transfer.main(report)
    text = markdown.read_text()
    assert "| none adamw 0.001 K=10 | `ours@0.8.0` | -3.0 | 2 |" in text  # against the default, paired by seed
    assert "| `ours@0.8.0` | 1 | 1 |" in text  # level with full fine-tuning, above the probe: it holds


def test_a_release_that_moves_no_fit_keeps_the_rows_of_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_bnfreeze

    today = fingerprint("ours")
    assert repr(benchmarks.transfer.DEFAULT_BEHAVIOUR) in today
    monkeypatch.setattr(lightning_bnfreeze, "__version__", "99.0.0")
    assert fingerprint("ours") == today
    monkeypatch.setattr(benchmarks.transfer, "DEFAULT_BEHAVIOUR", "99.0.0")  # a release that moves the default's fits
    assert fingerprint("ours") != today


def test_rows_without_the_retry_are_a_variant_of_their_own_the_default_s_keep_their_fingerprint() -> None:
    default = fingerprint("ours")
    assert fingerprint("ours:on_loss_rise='retry'") == default  # 0.11's and 0.12's rows: the same fits where no retry
    assert fingerprint("ours:on_loss_rise='warn'") == default[:-1] + ", 'warn')"


def test_the_release_loss_replay_judges_each_release_as_the_callback_would() -> None:
    from benchmarks.release_loss import release_rises

    losses = [2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 1.0]  # epochs of 2 batches; releases at steps 2 and 4, then 6 (one batch)
    history = [{"index": 0, "step": 2}, {"index": 1, "step": 4}, {"index": 2, "step": 6}, {"index": 3, "step": 6}]
    rises = release_rises(losses, history, batches_per_epoch=2)
    assert [None if rise is None else (rise.before, rise.after) for rise in rises] == [
        (2.0, 3.0),
        (3.0, 1.0),
        None,
        None,
    ]


@pytest.mark.parametrize("recipe", ["ours", "ours:warmup_steps=5", "ours:max_step='released',decay=0.3"])
def test_the_release_loss_replay_watches_a_recipe_with_warnings_only(recipe: str) -> None:
    from benchmarks.release_loss import warned

    assert fingerprint(warned(recipe)) == fingerprint(recipe)[:-1] + ", 'warn')"  # the same fit, but the retry


def test_the_processors_the_rows_ran_on_are_counted() -> None:
    rows = [{"cpu": "Intel Xeon"}, {"cpu": "AMD EPYC"}, {"cpu": "Intel Xeon"}, {}]

    assert machines(rows) == "Intel Xeon (2 runs); AMD EPYC (1 run); a processor not recorded (1 run)"


def setting_rows(ours_by_seed: dict[int, float], **setting: Any) -> list[dict[str, Any]]:
    """The rows of one setting (cnn, none, AdamW 1e-3, K=10 unless ``setting`` says otherwise): full fine-tuning at
    90 %, the probe at 50 %, ours as given per seed."""
    setting = {"bench": "cnn", "task": "none", "optimizer": "adamw", "lr": 1e-3, "k": 10, "epochs": 20, **setting}
    return [
        {**setting, "seed": seed, "recipe": recipe, "fingerprint": fingerprint(recipe), "test_acc": acc, "seconds": 1.0}
        for seed, ours in ours_by_seed.items()
        for recipe, acc in (("full", 0.9), ("probe", 0.5), ("ours", ours))
    ]


def cnn_rows(raw: Path, ours_by_seed: dict[int, float]) -> None:
    """The rows of :func:`setting_rows`'s default setting, written to ``raw``."""
    raw.write_text("".join(json.dumps(row) + "\n" for row in setting_rows(ours_by_seed)))


def test_a_report_goes_where_markdown_says(tmp_path: Path) -> None:
    raw, markdown = tmp_path / "raw.jsonl", tmp_path / "elsewhere.md"
    cnn_rows(raw, {0: 0.92, 1: 0.92})
    default = Path(benchmarks.transfer.__file__).parent / "transfer_cnn.md"
    before = default.read_text()

    benchmarks.transfer.main(["--bench", "cnn", "--report", "--raw", str(raw), "--markdown", str(markdown)])

    assert (
        "| none | adamw | 0.001 | 10 | `full` 90.0 | 92.0 | 2.0 ± 0.0 (2/0) | +42.0 | 2 | yes |" in markdown.read_text()
    )
    assert default.read_text() == before


def test_the_pretrained_vit_leaves_the_callers_random_numbers_as_the_cache_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import examples.digits.backbone
    from benchmarks.tasks import pretrained_vit

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: the first call pretrains
    monkeypatch.setattr(examples.digits.backbone, "pretrain", lambda *args, **kwargs: 0.0)
    draws = []
    for _ in ("pretrained now", "from the cache"):
        torch.manual_seed(0)
        pretrained_vit()
        draws.append(torch.rand(4))

    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_a_report_of_the_seeds_asked_for(tmp_path: Path) -> None:
    raw, markdown = tmp_path / "raw.jsonl", tmp_path / "report.md"
    cnn_rows(raw, {0: 0.92, 7: 0.4})
    every_seed = ["--bench", "cnn", "--report", "--raw", str(raw), "--markdown", str(markdown)]

    benchmarks.transfer.main([*every_seed, "--seeds", "0"])
    assert "| `full` 90.0 | 92.0 | 2.0 ± nan (1/0) | +42.0 | 1 | yes |" in markdown.read_text()
    assert "## Seeds at or below the linear probe" not in markdown.read_text()
    benchmarks.transfer.main(every_seed)
    assert "| `full` 90.0 | 66.0 | -24.0 ± 36.8 (1/1) | -10.0 | 2 | NO |" in markdown.read_text()
    # seed 7 ends below the probe: how often each recipe does, and its worst margin over the probe
    assert "| none adamw 0.001 K=10 | 1 of 2 (-10.0) | 0 of 2 (+40.0) | - | - | - | - |" in markdown.read_text()


def test_the_figure_has_a_row_of_panels_per_k_and_a_panel_per_task_and_optimizer() -> None:
    rows = [
        row
        for k in (5, 10)
        for task in ("digits", "textures")
        for optimizer, lrs in (("adamw", (1e-4, 1e-3)), ("sgd", (1e-2,)))
        for lr in lrs
        for row in setting_rows({0: 0.8, 1: 0.7, 2: 0.6}, task=task, optimizer=optimizer, lr=lr, k=k)
    ]

    figure = benchmarks.transfer.accuracy_figure(rows)

    panels = [(task, optimizer) for task in ("digits", "textures") for optimizer in ("adamw", "sgd")]
    assert [axes.get_title() for axes in figure.axes] == [f"{t}, {o}, K={k}" for k in (10, 5) for t, o in panels]
    ours = figure.axes[0].lines[-1]  # digits, AdamW, K=10: ours at each head learning rate, its mean over the seeds
    assert ours.get_label() == "GradualUnfreeze()"
    assert list(ours.get_xdata()) == [1e-4, 1e-3]
    assert list(ours.get_ydata()) == pytest.approx([70.0, 70.0])


def test_a_peer_run_on_fewer_seeds_does_not_shrink_the_comparison_with_another() -> None:
    rows = setting_rows({0: 0.92, 1: 0.92, 2: 0.8})  # full fine-tuning at 90 % on each seed
    row = next(row for row in rows if row["recipe"] == "full")
    rows.append({**row, "recipe": "llrd", "fingerprint": fingerprint("llrd"), "test_acc": 0.89})  # seed 0 alone

    (summary,) = benchmarks.transfer.summarise(rows)

    # ours trails full fine-tuning on the three seeds both ran (-2.0 on average) more than LLRD on its one (+3.0)
    assert summary["best_peer"] == "full"
    assert summary["seeds"] == [(0, None), (1, None), (2, None)]  # seeds, on processors not recorded
    assert summary["vs_best"] == pytest.approx([2.0, 2.0, -10.0])


def test_runs_are_paired_on_one_processor_only() -> None:
    # seed 0 of the default and the peers ran on one processor, a variant's seed 0 on another: a fit's floating-point
    # results differ between processors, so the variant has no pair there
    rows = [{**row, "cpu": "Intel Xeon"} for row in setting_rows({0: 0.92, 1: 0.92})]
    variant = {**rows[2], "recipe": "ours:first=0", "cpu": "AMD EPYC", "test_acc": 0.5}
    rows += [variant, {**variant, "seed": 1, "cpu": "Intel Xeon", "test_acc": 0.8}]

    (summary,) = benchmarks.transfer.summarise(rows, ours="ours:first=0")

    assert summary["seeds"] == [(1, "Intel Xeon")]
    assert summary["vs_best"] == pytest.approx([-10.0])


def test_a_run_is_done_when_it_ran_on_this_processor(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    rows = [{**row, "cpu": "Intel Xeon"} for row in setting_rows({0: 0.92})]
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = [{key: value for key, value in row.items() if key not in ("test_acc", "seconds", "cpu")} for row in rows]

    assert pending(settings, raw, "Intel Xeon") == []
    assert pending(settings, raw, "AMD EPYC") == settings
