"""Transfer accuracy of fine-tuning recipes: benches x tasks x optimizers x learning rates x K x seeds, paired.

Within a setting (bench, task, optimizer, head learning rate, K labelled images per class, epochs) every
recipe gets the same data split, batch order and initial weights per seed; only the recipe differs. A
fit's floating-point results, hence every fit past its first steps, differ between processors: runs are
paired by seed and processor (a run is done when it ran on this one). The metric is the accuracy of the
final weights on the held-out test images. Run from the repository root (``pip install -e '.[bench]'``)::

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.transfer --bench real --jobs 2 \\
        --tasks digits textures --optimizers adamw --lrs 1e-4 3e-4 1e-3 3e-3 --seeds 0 1 2 3 4
    python -m benchmarks.transfer --bench real --report        # benchmarks/transfer_real.md (+ .png)
    python -m benchmarks.transfer --quick                      # every bench, one short run per recipe (CI)

Raw results are appended to ``benchmarks/raw/transfer_<bench>.jsonl`` as runs finish; a rerun skips the runs done on
this processor, unless the library's defaults changed what ``ours`` runs (a fingerprint of its resolved arguments).
Those files are committed: a report is rebuilt from them, and a new release reruns only ``ours`` (the peers' rows
stay valid on the processor they ran on). See ``benchmarks.tasks`` for the benches and ``benchmarks.recipes`` for
the recipes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
DEFAULT_BEHAVIOUR = "0.11.0"
"""The release whose default the ``ours`` rows with ``max_step="auto"`` ran: a change that moves any fit of the default
(a rule, a constant, an order of operations) bumps it to the new release, and every such row reruns. Releases that
move no fit (messages, checks, new options) keep it, and the rows stay. 0.13's ``on_loss_rise="retry"`` moves only
the fits whose first release made the training loss rise (``benchmarks/release_loss.md``: on this project's benches,
the transformer's at large rates): those rows (``minilm``'s) ran again, the others stay; the rows before 0.13 are
``on_loss_rise="warn"``'s fits, which a row's ``history`` tells apart from a retried one by its ``retries``. 0.14's
divergence check moves only the fits that diverged after a release (``benchmarks/release_loss.md``: the transformer's
at SGD 3e-2; no epoch of another bench's default fits reached its line, on seeds 0-2 on an AMD EPYC): ``minilm``'s
``ours`` rows ran again, the others stay (their other seeds, and the Intel Xeon's rows, vouched for by that only).
0.15 lowers that line from 1.2 to 1.1 times the fit's first batches: no epoch of those default fits lies between (the
same report), and ``minilm``'s ``ours`` rows, every variant's but ``warn``'s with them, ran again."""
EPOCHS = {"real": 15, "lite2": 15, "cnn": 20, "vit": 20, "minilm": 15}
OPTIMIZERS = ("adamw", "sgd")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "finetuning_scheduler", "lightning_bnfreeze"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    _quiet()


def fingerprint(recipe: str) -> str:
    """What an ``ours`` recipe resolves to today (its arguments and the library's defaults); ``""`` for peers."""
    if recipe.partition(":")[0] != "ours":
        return ""
    from benchmarks.recipes import gradual_unfreeze
    from lightning_bnfreeze.domain_shift import NEAR_SOURCE
    from lightning_bnfreeze.step_size import AUTO_STEP, NEAR_DECAY

    callback = gradual_unfreeze(recipe)
    return repr(
        (
            callback.what,
            callback.when,
            callback.lr_scale,
            callback.bn,
            callback.warmup_steps,
            AUTO_STEP,
            callback.max_step,
        )
        # the near-source rule changes with releases (0.7: the decay also caps first steps); other values' rows stay
        + ((NEAR_SOURCE, NEAR_DECAY, DEFAULT_BEHAVIOUR) if callback.max_step == "auto" else ())
        + ((repr(callback.adapt),) if callback.adapt is not None else ())
        + ((callback.on_loss_rise,) if callback.on_loss_rise != "retry" else ())
    )


def run_one(setting: dict[str, Any], losses: bool = False) -> dict[str, Any]:
    """Fine-tune with one recipe in one setting; the held-out accuracy and a few facts about the run (with
    ``losses``, every training batch's loss)."""
    import lightning.pytorch as pl

    from benchmarks.common import BatchLosses, cpu_model
    from benchmarks.recipes import callbacks_of, model_options
    from benchmarks.tasks import make_data, make_model

    _quiet()
    start = time.perf_counter()
    pl.seed_everything(setting["seed"], verbose=False)
    data = make_data(setting["bench"], setting["task"], setting["k"], setting["seed"])
    recipe = setting["recipe"]
    model = make_model(setting["bench"], setting["optimizer"], setting["lr"], **model_options(recipe))
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = callbacks_of(recipe, model, setting["lr"], setting["epochs"], tmp)
        batches = BatchLosses()
        trainer = pl.Trainer(
            max_epochs=setting["epochs"],
            logger=False,
            enable_checkpointing=recipe.startswith("finetuning_scheduler"),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=True,
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp,
            callbacks=[*callbacks, *([batches] if losses else [])],
        )
        trainer.fit(model, datamodule=data)
        history = [record.to_dict() for cb in callbacks for record in getattr(cb, "history", ())]
        shifts = [cb.source_shift for cb in callbacks if getattr(cb, "source_shift", None) is not None]
        (result,) = trainer.test(model, datamodule=data, verbose=False)
    return {
        **setting,
        "test_acc": float(result["test_acc"]),
        "history": history,
        **({"source_shift": shifts[0]} if shifts else {}),
        **({"losses": batches.losses} if losses else {}),
        "seconds": time.perf_counter() - start,
        "cpu": cpu_model(),  # floating-point results, hence every fit past its first steps, differ between CPUs
    }


# -------------------------------------------------------------------------------------------------- runs

Key = tuple[Any, ...]
SETTING = ("bench", "task", "optimizer", "lr", "k", "epochs")
Unit = tuple[int, str | None]  # what a pair shares: the seed and the processor


def _unit(row: dict[str, Any]) -> Unit:
    return row["seed"], row.get("cpu")


def _key(row: dict[str, Any]) -> Key:
    return (*(row[name] for name in SETTING), row["seed"], row["recipe"], row["fingerprint"])


def load(path: Path, previous: str | None = None) -> list[dict[str, Any]]:
    """The raw rows, keeping for ``ours`` recipes only those that ran what they resolve to today (none of a recipe
    that no longer parses: an option of an older release); with ``previous`` (a version), also the rows of that
    release's default, as the variant ``ours@<previous>``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    current = {recipe: _fingerprint_today(recipe) for recipe in {row["recipe"] for row in rows}}
    kept = []
    for row in rows:
        if row["fingerprint"] == current[row["recipe"]]:
            kept.append(row)
        elif previous is not None and row["recipe"] == "ours" and repr(previous) in row["fingerprint"]:
            kept.append({**row, "recipe": f"ours@{previous}"})
    return kept


def is_ours(recipe: str) -> bool:
    """The default (``ours``), a variant of it (``ours:<options>``) or an earlier release's (``ours@<version>``)."""
    return recipe == "ours" or recipe.startswith(("ours:", "ours@"))


def _fingerprint_today(recipe: str) -> str | None:
    try:
        return fingerprint(recipe)
    except (TypeError, ValueError):
        return None


def pending(settings: list[dict[str, Any]], raw: Path, cpu: str) -> list[dict[str, Any]]:
    """The settings that ``raw`` holds no run of on processor ``cpu``."""
    done = {_key(row) for row in load(raw) if row.get("cpu") == cpu}
    return [setting for setting in settings if _key(setting) not in done]


def run(settings: list[dict[str, Any]], raw: Path, jobs: int) -> None:
    """Run the settings not in ``raw`` yet on this processor, appending each result as it finishes."""
    from benchmarks.common import cpu_model

    todo = pending(settings, raw, cpu_model())
    print(f"{len(todo)} runs to do ({len(settings) - len(todo)} done on this processor)", flush=True)
    raw.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = [pool.submit(run_one, setting) for setting in todo]
        for n, future in enumerate(as_completed(futures), start=1):
            row = future.result()
            with raw.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(
                f"[{n}/{len(todo)} {time.perf_counter() - start:.0f}s] {row['task']} {row['optimizer']} {row['lr']:g}"
                f" k={row['k']} seed {row['seed']} {row['recipe']}:"
                f" {100 * row['test_acc']:.1f}% ({row['seconds']:.0f}s)",
                flush=True,
            )


# ------------------------------------------------------------------------------------------------ report


def _msd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def _paired(acc: dict[str, dict[Unit, float]], recipe: str, other: str) -> dict[Unit, float]:
    """``recipe``'s accuracy minus ``other``'s on each seed both ran on one processor, by seed in order (empty if
    either is missing)."""
    units = sorted(set(acc.get(recipe, {})) & set(acc.get(other, {})), key=lambda unit: (unit[0], str(unit[1])))
    return {unit: acc[recipe][unit] - acc[other][unit] for unit in units}


def summarise(rows: list[dict[str, Any]], ours: str = "ours") -> list[dict[str, Any]]:
    """Per setting: each recipe's accuracies by seed, the best peer, ours against it and against the probe.

    Ours is paired with each peer on every seed both ran on one processor, so a peer run on fewer seeds does not
    shrink the other comparisons; the best peer is the one ours trails most (with the same seeds everywhere: the
    highest mean)."""
    from benchmarks.recipes import PEERS

    by_setting: dict[Key, dict[str, dict[Unit, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_setting[tuple(row[name] for name in SETTING)][row["recipe"]][_unit(row)] = 100.0 * row["test_acc"]
    summaries = []
    for setting, acc in sorted(by_setting.items(), key=lambda item: tuple(map(str, item[0]))):
        summary: dict[str, Any] = {"setting": dict(zip(SETTING, setting, strict=True)), "accuracy": acc}
        # peers in the rows' order: a tie (the ViT's full and full_bn_frozen run alike) names the same peer
        paired = {name: by_seed for name in acc if name in PEERS and (by_seed := _paired(acc, ours, name))}
        if paired:
            best = min(paired, key=lambda name: statistics.fmean(paired[name].values()))
            summary.update(best_peer=best, vs_best=list(paired[best].values()), seeds=list(paired[best]))
            if "probe" in acc:
                summary["vs_probe"] = list(_paired(acc, ours, "probe").values())
        summaries.append(summary)
    return summaries


def report(bench: str, rows: list[dict[str, Any]], command: str) -> str:
    """The Markdown report: the verdict per setting, then every recipe's accuracy per setting."""
    from benchmarks.common import environment, markdown_table

    summaries = summarise(rows)
    lines = [
        f"# Transfer accuracy: the `{bench}` bench",
        "",
        (sys.modules[__name__].__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        f"Command: `{command}`",
        "",
        "## `GradualUnfreeze()` against the best peer of each setting",
        "",
        "Paired by seed, in points: mean ± sd (wins/losses), and the smallest margin over the linear probe.",
        "",
    ]
    table = []
    for summary in summaries:
        if "vs_best" not in summary:
            continue
        s, diffs = summary["setting"], summary["vs_best"]
        paired = summary["seeds"]
        best = statistics.fmean(summary["accuracy"][summary["best_peer"]][seed] for seed in paired)
        ours = statistics.fmean(summary["accuracy"]["ours"][seed] for seed in paired)
        probe = f"{min(summary['vs_probe']):+.1f}" if summary.get("vs_probe") else "-"
        verdict = "yes" if _holds(summary) else "NO"
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        table.append([
            s["task"], s["optimizer"], f"{s['lr']:g}", str(s["k"]), f"`{summary['best_peer']}` {best:.1f}",
            f"{ours:.1f}", f"{_msd(diffs)} ({wins}/{losses})", probe, str(len(paired)), verdict,
        ])  # fmt: skip
    header = ["task", "optimizer", "head lr", "K", "best peer", "ours", "ours - best", "min over probe", "seeds"]
    header.append("holds")
    lines += [markdown_table(header, table), "", *below_probe(summaries), *shifts(rows), *overview(summaries)]
    lines += [*variants(summaries), *verdicts(rows)]
    lines += ["## Every recipe", ""]
    for summary in summaries:
        s = summary["setting"]
        lines.append(f"**{s['task']}, {s['optimizer']}, head lr {s['lr']:g}, K={s['k']}, {s['epochs']} epochs**")
        lines.append("")
        rows_ = sorted(summary["accuracy"].items(), key=lambda item: -statistics.fmean(item[1].values()))
        lines += [markdown_table(["recipe", "accuracy", "seeds"], [[f"`{r}`", _msd(list(v.values())), str(len(v))]
                                                                    for r, v in rows_]), ""]  # fmt: skip
    seconds = [row["seconds"] for row in rows]
    lines += [f"{len(rows)} runs, {sum(seconds) / 3600:.1f} CPU-process hours, on: {machines(rows)}.", ""]
    lines += ["Environment of the report: " + ", ".join(f"{k} {v}" for k, v in environment().items()), ""]
    return "\n".join(lines)


def machines(rows: list[dict[str, Any]]) -> str:
    """The processors the rows ran on, with their counts (a fit's results differ between processors)."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row.get("cpu", "a processor not recorded")] += 1
    return "; ".join(f"{cpu} ({n} run{'s' * (n != 1)})" for cpu, n in sorted(counts.items(), key=lambda item: -item[1]))


def below_probe(summaries: list[dict[str, Any]]) -> list[str]:
    """Where ours ends at or below the linear probe on some seed: on how many seeds each recipe does, and its worst
    margin over the probe."""
    from benchmarks.common import markdown_table
    from benchmarks.recipes import PEERS

    table = []
    for summary in summaries:
        acc, s = summary["accuracy"], summary["setting"]
        if not summary.get("vs_probe") or min(summary["vs_probe"]) > 0:
            continue
        counts = []
        for recipe in ("ours", *PEERS):
            margins = list(_paired(acc, recipe, "probe").values())
            counts.append(f"{sum(m <= 0 for m in margins)} of {len(margins)} ({min(margins):+.1f})" if margins else "-")
        table.append([f"{s['task']} {s['optimizer']} {s['lr']:g} K={s['k']}", *counts])
    if not table:
        return []
    header = ["setting", *(f"`{recipe}`" for recipe in ("ours", *PEERS))]
    title = "## Seeds at or below the linear probe, where ours has any (each recipe's, on the seeds it ran; its worst)"
    return [title, "", markdown_table(header, table), ""]


def shifts(rows: list[dict[str, Any]]) -> list[str]:
    """What ``max_step="auto"`` measured and chose per task (the runs of ``ours`` that recorded a shift)."""
    from benchmarks.common import markdown_table
    from lightning_bnfreeze.domain_shift import NEAR_SOURCE
    from lightning_bnfreeze.step_size import NEAR_DECAY

    measured: dict[str, list[float]] = {}
    for row in rows:
        if row["recipe"] == "ours" and "source_shift" in row:
            measured.setdefault(row["task"], []).append(row["source_shift"])
    if not measured:
        return []
    table = [
        [task, f"{min(values):.2f} to {max(values):.2f}", str(len(values)),
         "'released'" if max(values) < NEAR_SOURCE else "None" if min(values) >= NEAR_SOURCE else "both"]
        for task, values in sorted(measured.items())
    ]  # fmt: skip
    return [
        f"## The target's shift: what `max_step=\"auto\"` chose (`'released'` below {NEAR_SOURCE}, with each later"
        f" release at {NEAR_DECAY:g}**k once the first moves fast; else `None`)",
        "",
        markdown_table(["task", "shift", "runs", "max_step"], table),
        "",
    ]


def overview(summaries: list[dict[str, Any]]) -> list[str]:
    """Per task: every recipe's mean accuracy (rows) at each optimizer and head learning rate (columns)."""
    from benchmarks.common import markdown_table

    lines = []
    for task in sorted({s["setting"]["task"] for s in summaries}):
        chosen = sorted((s for s in summaries if s["setting"]["task"] == task),
                        key=lambda s: (s["setting"]["optimizer"], s["setting"]["lr"], s["setting"]["k"]))  # fmt: skip
        recipes = sorted({r for s in chosen for r in s["accuracy"]}, key=lambda r: (r.startswith("ours"), r))
        several_ks = len({s["setting"]["k"] for s in chosen}) > 1
        header = ["recipe"] + [
            f"{s['setting']['optimizer']} {s['setting']['lr']:g}" + (f" K={s['setting']['k']}" if several_ks else "")
            for s in chosen
        ]
        table = [[f"`{r}`", *(f"{statistics.fmean(s['accuracy'][r].values()):.1f}" if r in s["accuracy"] else "-"
                              for s in chosen)] for r in recipes]  # fmt: skip
        lines += [
            f"## Mean accuracy on `{task}`" + ("" if several_ks else f" (K={chosen[0]['setting']['k']})"),
            "",
            markdown_table(header, table),
            "",
        ]
    return lines


def _holds(summary: dict[str, Any]) -> bool:
    """The line a setting's recipe must meet: within 1 point of the best peer on average, above the probe on every
    seed."""
    probe = summary.get("vs_probe")
    return statistics.fmean(summary["vs_best"]) >= -1.0 and (not probe or min(probe) > 0)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """In how many settings the default and each variant of ours hold (paired with each peer on the seeds both ran)."""
    from benchmarks.common import markdown_table

    table = []
    for name in sorted({row["recipe"] for row in rows if is_ours(row["recipe"])}):
        judged = [summary for summary in summarise(rows, ours=name) if "vs_best" in summary]
        if judged:
            table.append([f"`{name}`", str(sum(map(_holds, judged))), str(len(judged))])
    if len(table) < 2:
        return []
    title = "## Settings where the default and each variant hold (the first table's line, on the seeds each ran)"
    return [title, "", markdown_table(["recipe", "holds", "settings"], table), ""]


def variants(summaries: list[dict[str, Any]]) -> list[str]:
    """Each variant of ours (``ours:...``, ``ours@...``) against the default, paired by the seeds both ran: mean
    difference."""
    from benchmarks.common import markdown_table

    table = []
    for summary in summaries:
        s, acc = summary["setting"], summary["accuracy"]
        for name in sorted(r for r in acc if is_ours(r) and r != "ours" and "ours" in acc):
            diffs = _paired(acc, name, "ours")
            if diffs:
                setting = f"{s['task']} {s['optimizer']} {s['lr']:g} K={s['k']}"
                table.append([setting, f"`{name}`", f"{statistics.fmean(diffs.values()):+.1f}", str(len(diffs))])
    if not table:
        return []
    title = "## Variants of ours against the default (variant - default, paired by seed)"
    return [title, "", markdown_table(["setting", "variant", "difference", "seeds"], table), ""]


def accuracy_figure(rows: list[dict[str, Any]]) -> Figure:
    """Accuracy against the head's learning rate for the BatchNorm question: a row of panels per K (largest
    first), a panel per task and optimizer."""
    from matplotlib.figure import Figure

    curves = {"full": "full fine-tuning, BN training", "full_bn_frozen": "full fine-tuning, BN frozen",
              "probe": "linear probe", "llrd": "layer-wise LR decay 0.75", "ours": "GradualUnfreeze()"}  # fmt: skip
    summaries = summarise(rows)
    ks = sorted({s["setting"]["k"] for s in summaries}, reverse=True)
    panels = sorted({(s["setting"]["task"], s["setting"]["optimizer"]) for s in summaries})
    fig = Figure(figsize=(4.2 * len(panels), 3.6 * len(ks)), layout="constrained")
    grid = fig.subplots(len(ks), len(panels), squeeze=False)
    for k, row_axes in zip(ks, grid, strict=True):
        for axes, (task, optimizer) in zip(row_axes, panels, strict=True):
            panel = [s for s in summaries if (s["setting"]["task"], s["setting"]["optimizer"]) == (task, optimizer)]
            chosen = sorted((s for s in panel if s["setting"]["k"] == k), key=lambda s: s["setting"]["lr"])
            for recipe, label in curves.items():
                points = [(s["setting"]["lr"], statistics.fmean(s["accuracy"][recipe].values())) for s in chosen
                          if recipe in s["accuracy"]]  # fmt: skip
                if points:
                    axes.plot(*zip(*points, strict=True), "o-", lw=2.5 if recipe == "ours" else 1.2, label=label)
            axes.set(xscale="log", xlabel=f"head learning rate ({optimizer})", ylabel="test accuracy (%)",
                     title=f"{task}, {optimizer}, K={k}", ylim=(0, 100))  # fmt: skip
            axes.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="lower left")
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.common import check_tables
    from benchmarks.recipes import PEERS, REFERENCES, validate
    from benchmarks.tasks import BENCHES

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bench", choices=sorted(BENCHES), default="real")
    parser.add_argument("--tasks", nargs="+", help="default: the bench's tasks (cnn, vit: the shifts)")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=["adamw"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3], help="the head's learning rates")
    parser.add_argument("--ks", type=int, nargs="+", default=[10], help="labelled training images per class")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 3 4 (--report: every seed run)")
    parser.add_argument("--recipes", nargs="+", default=[*PEERS, *REFERENCES, "ours"])
    parser.add_argument("--epochs", type=int, help="default: 15 (real, lite2, minilm), 20 (cnn, vit)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-thread processes")
    parser.add_argument("--raw", type=Path, help="default: benchmarks/raw/transfer_<bench>.jsonl")
    parser.add_argument("--report", action="store_true", help="write benchmarks/transfer_<bench>.md from the raw runs")
    parser.add_argument("--markdown", type=Path, help="with --report: write it here instead (and no figure)")
    parser.add_argument("--previous", help="with --report: also that release's default, as the variant ours@VERSION")
    parser.add_argument("--quick", action="store_true", help="every bench, one seed, 2 epochs, 3 recipes (CI)")
    args = parser.parse_args(argv)
    for recipe in args.recipes:
        try:
            validate(recipe)
        except ValueError as error:
            parser.error(str(error))
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            for bench, tasks in BENCHES.items():
                settings = [{"bench": bench, "task": tasks[0], "optimizer": "adamw", "lr": 1e-3, "k": 2, "epochs": 2,
                             "seed": 0, "recipe": recipe, "fingerprint": fingerprint(recipe)}
                            for recipe in ("full", "probe", "ours")]  # fmt: skip
                run(settings, Path(tmp) / f"{bench}.jsonl", args.jobs)
                rows = load(Path(tmp) / f"{bench}.jsonl")
                text = report(bench, rows, "--quick")
                print(text.split("## Every recipe")[0])
                # the verdict, the seeds below the probe (if ours has any), the shifts max_step="auto" measured (norm
                # layers with statistics), the overview, the setting's recipes
                measured = any("source_shift" in row for row in rows)
                below = bool(below_probe(summarise(rows)))
                check_tables(text, 3 + below + measured, f"transfer --bench {bench}")
        return
    raw = args.raw or HERE / "raw" / f"transfer_{args.bench}.jsonl"
    if args.report:
        rows = [row for row in load(raw, args.previous) if args.seeds is None or row["seed"] in args.seeds]
        command = "python -m benchmarks.transfer " + " ".join(sys.argv[1:] if argv is None else argv)
        markdown = args.markdown or HERE / f"transfer_{args.bench}.md"
        markdown.write_text(report(args.bench, rows, command))
        if args.bench == "real" and args.markdown is None:  # the README's figure
            accuracy_figure(rows).savefig(png := HERE / "transfer_real.png", dpi=110)
            print(f"figure: {png}")
        print(f"report: {markdown}")
        return
    epochs = args.epochs or EPOCHS[args.bench]
    settings = [
        {"bench": args.bench, "task": task, "optimizer": optimizer, "lr": lr, "k": k, "epochs": epochs, "seed": seed,
         "recipe": recipe, "fingerprint": fingerprint(recipe)}
        for seed in args.seeds or range(5) for task in args.tasks or BENCHES[args.bench]
        for optimizer in args.optimizers for lr in args.lrs for k in args.ks for recipe in args.recipes
    ]  # fmt: skip
    run(settings, raw, args.jobs)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
