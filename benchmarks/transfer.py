"""Transfer accuracy of fine-tuning recipes on the digits example: recipes x shifts x seeds, paired by seed.

Every run fine-tunes the same pretrained digits backbone (``examples.digits``, pretrained once on
digits 0-4 and cached) on digits 5-9 from 10 labelled images per class, with the SAME optimizer
(``DigitsClassifier``'s AdamW, head lr 0.01, weight decay 1e-4, cosine schedule over ``--epochs``),
the same epochs, and the same data and batch order (``DigitsTransfer(seed=seed)`` and
``seed_everything(seed)``); only the recipe differs. The metric is the accuracy of the final weights
on the held-out target test images (about 150 per class). Run from the repository root::

    OMP_NUM_THREADS=1 python -m benchmarks.transfer --seeds 0 1 2 3 4 --jobs 2

Raw results are appended to ``benchmarks/raw/transfer.jsonl`` (git-ignored) as runs finish (a rerun
skips the runs already there, so an interrupted run loses nothing); the report goes to
``benchmarks/transfer.md`` and its numbers to ``benchmarks/transfer.json`` (``--report-only`` rewrites
them from the JSONL without training; ``--notes FILE`` appends a Markdown analysis).

Recipes (``--recipes``; peers first, then the library's):

- ``full``: everything trains from the first step, BatchNorm included.
- ``lightning_backbone_finetuning``: ``lightning.pytorch.callbacks.BackboneFinetuning()`` with its
  documented defaults (backbone released at epoch 10 at 0.1 x the head's lr, then x1.5 per epoch up to
  the head's lr; BatchNorm trains through the frozen phase). ``DigitsClassifier.configure_optimizers``
  already hands the optimizer only the trainable parameters, as ``BackboneFinetuning`` needs.
- ``finetuning_scheduler``: ``FinetuningScheduler`` with an explicit epoch-driven schedule mirroring
  ``GradualUnfreeze``'s default cadence (head, then stage3, stage2, stage1, stem at epochs 1, 2, 3, 4),
  each phase at lr 0.1 x the head's, ``restore_best=False``, default BatchNorm handling.
- ``frozen_bn_training``: ``freeze_backbone=True`` only: BatchNorm statistics keep updating (plain PyTorch).
- ``ours_probe``: ``freeze_backbone=True`` + ``BNFreezeCallback(modules="backbone")``.
- ``ours_probe_adapted``: the same with ``adapt_batches=1.0`` (AdaBN on the target training data, the
  library's default ``adapt_prior``).
- ``ours_gradual``: ``GradualUnfreeze()``, the library defaults (also those of the example config).
- ``ours_gradual_adapted``: ``GradualUnfreeze(adapt_batches=1.0)``.
- ``finetuning_scheduler:key=value,...``: the same with other ``_fts_schedule`` arguments (``lr_factor=0.3``).
- ``gradual:key=value,...``: ``GradualUnfreeze`` with the given arguments (a sweep), e.g.
  ``gradual:lr_scale=0.3,lr_decay=1.0,adapt_batches=1.0``.
- ``probe_adapted:adapt_prior=N`` / ``gradual_adapted:adapt_prior=N``: ``ours_probe`` / ``ours_gradual``
  with AdaBN on the whole first epoch's batches blended with ``N`` source pseudo-samples
  (``TrainDataAdaptation(1.0, prior=N)`` on the backbone's norm layers right after the callback froze
  them: what the callbacks' ``adapt_batches=1.0, adapt_prior=N`` runs).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = ("full", "lightning_backbone_finetuning", "finetuning_scheduler", "frozen_bn_training")
OURS = ("ours_probe", "ours_probe_adapted", "ours_gradual", "ours_gradual_adapted")
RECIPES = PEERS + OURS
SHIFTS = ("none", "contrast", "invert")
HEAD_LR = 0.01
GRADUAL_PRESETS: dict[str, dict[str, Any]] = {
    "ours_gradual": {},
    "ours_gradual_adapted": {"adapt_batches": 1.0},
}


def recipe_kwargs(recipe: str, family: str) -> dict[str, Any] | None:
    """The ``key=value`` arguments of a ``family:k=v,...`` recipe, else ``None``."""
    if recipe != family and not recipe.startswith(f"{family}:"):
        return None
    pairs = (item.split("=", 1) for item in recipe.partition(":")[2].split(",") if item)
    return {key.strip(): ast.literal_eval(value.strip()) for key, value in pairs}


def gradual_kwargs(recipe: str) -> dict[str, Any] | None:
    """``GradualUnfreeze`` arguments of a gradual recipe (a preset or ``gradual:k=v,...``), else ``None``."""
    if recipe in GRADUAL_PRESETS:
        return dict(GRADUAL_PRESETS[recipe])
    return recipe_kwargs(recipe, "gradual")


def adapted_prior(recipe: str) -> float | None:
    """``N`` of a ``probe_adapted:adapt_prior=N`` or ``gradual_adapted:adapt_prior=N`` recipe, else ``None``."""
    for family in ("probe_adapted", "gradual_adapted"):
        kwargs = recipe_kwargs(recipe, family)
        if kwargs is not None and "adapt_prior" in kwargs:
            return float(kwargs["adapt_prior"])
    return None


def _backbone_adaptation(prior: float) -> Any:
    """A callback that re-estimates the backbone's norm statistics at fit start, after the callbacks before it."""
    import lightning.pytorch as pl

    from lightning_bnfreeze import named_norm_layers
    from lightning_bnfreeze.callbacks.train_data_adaptation import TrainDataAdaptation

    class BackboneAdaptation(pl.Callback):
        def __init__(self) -> None:
            self.adaptation = TrainDataAdaptation(1.0, prior, "benchmark")

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            layers = [layer for _, layer in named_norm_layers(pl_module.backbone)]
            self.adaptation.run_once(trainer, pl_module, layers)

    return BackboneAdaptation()


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "finetuning_scheduler", "lightning_bnfreeze"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    _quiet()


def _fts_schedule(epochs: int, first: int = 1, every: int = 1, lr_factor: float = 0.1) -> dict[int, dict[str, Any]]:
    """Phase 0: the head; then stage3, stage2, stage1, stem, one per phase at ``lr_factor`` x the head's lr."""
    stages = ("stage3", "stage2", "stage1", "stem")
    starts = [first + every * i for i in range(len(stages))]
    schedule: dict[int, dict[str, Any]] = {0: {"params": [r"head\..*"], "max_transition_epoch": starts[0]}}
    for depth, stage in enumerate(stages, start=1):
        end = starts[depth] if depth < len(stages) else epochs
        lr = lr_factor * HEAD_LR
        schedule[depth] = {"params": [rf"backbone\.{stage}\..*"], "lr": lr, "max_transition_epoch": end}
    return schedule


def run_one(seed: int, shift: str, recipe: str, epochs: int) -> dict[str, Any]:
    """Fine-tune with one recipe and return the held-out target test accuracy (and a few facts about the run)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import BackboneFinetuning

    from benchmarks.common import transfer_trainer
    from examples.digits import DigitsClassifier, DigitsTransfer
    from lightning_bnfreeze import BNFreezeCallback, GradualUnfreeze

    _quiet()
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = DigitsTransfer(k_per_class=10, shift=shift, seed=seed)  # type: ignore[arg-type]
    prior = adapted_prior(recipe)
    freeze = recipe in ("frozen_bn_training", "ours_probe", "ours_probe_adapted") or recipe.startswith("probe_adapted")
    model = DigitsClassifier(backbone="digits", lr=HEAD_LR, scheduler="cosine", freeze_backbone=freeze)
    callbacks: list[Any] = []
    tmp = tempfile.TemporaryDirectory()
    gradual = gradual_kwargs(recipe)
    if recipe == "full" or recipe == "frozen_bn_training":
        pass
    elif recipe == "lightning_backbone_finetuning":
        callbacks.append(BackboneFinetuning())
    elif recipe == "finetuning_scheduler" or recipe.startswith("finetuning_scheduler:"):
        from finetuning_scheduler import FinetuningScheduler
        from finetuning_scheduler.fts_supporters import FTSCheckpoint

        callbacks += [
            FinetuningScheduler(
                ft_schedule=_fts_schedule(epochs, **(recipe_kwargs(recipe, "finetuning_scheduler") or {})),
                epoch_transitions_only=True,
                restore_best=False,
                log_dir=tmp.name,
                logging_level=logging.ERROR,
            ),
            FTSCheckpoint(dirpath=tmp.name, monitor="val_loss", save_top_k=1),
        ]
    elif recipe == "ours_probe":
        callbacks.append(BNFreezeCallback(modules="backbone"))
    elif recipe == "ours_probe_adapted":
        callbacks.append(BNFreezeCallback(modules="backbone", adapt_batches=1.0))
    elif prior is not None:
        first = BNFreezeCallback(modules="backbone") if recipe.startswith("probe_adapted") else GradualUnfreeze()
        callbacks += [first, _backbone_adaptation(prior)]
    elif gradual is not None:
        callbacks.append(GradualUnfreeze(**gradual))
    else:
        raise ValueError(f"unknown recipe {recipe!r}; known: {RECIPES}, 'gradual:key=value,...', 'probe_adapted:...'")
    trainer = transfer_trainer(epochs, recipe, tmp.name, callbacks)
    trainer.fit(model, datamodule=data)
    val_acc = float(trainer.callback_metrics.get("val_acc", torch.tensor(float("nan"))))
    trained = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)  # before `test`: the
    groups = len(trainer.optimizers[0].param_groups)  # peers' callbacks re-freeze in their `setup` of any stage
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    tmp.cleanup()
    return {
        "seed": seed,
        "shift": shift,
        "recipe": recipe,
        "epochs": epochs,
        "test_acc": float(result["test_acc"]),
        "final_val_acc": val_acc,
        "backbone_trainable_at_end": trained,
        "param_groups_at_end": groups,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------- report


def _load(path: Path, epochs: int) -> dict[tuple[int, str, str], dict[str, Any]]:
    done: dict[tuple[int, str, str], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row["epochs"] == epochs:
                    done[(row["seed"], row["shift"], row["recipe"])] = row
    return done


def _msd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def report(rows: dict[tuple[int, str, str], dict[str, Any]], epochs: int, command: str) -> tuple[str, dict[str, Any]]:
    """The Markdown summary and its JSON form, from the raw results."""
    from benchmarks.common import environment, markdown_table

    acc: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (seed, shift, recipe), row in rows.items():
        acc[(recipe, shift)][seed] = 100.0 * row["test_acc"]
    shifts = [s for s in SHIFTS if any(key[1] == s for key in acc)]
    recipes = [r for r in RECIPES if any(key[0] == r for key in acc)]
    mean = {key: statistics.fmean(v.values()) for key, v in acc.items()}

    def paired(a: str, b: str, shift: str) -> list[float]:
        seeds = sorted(set(acc.get((a, shift), {})) & set(acc.get((b, shift), {})))
        return [acc[(a, shift)][s] - acc[(b, shift)][s] for s in seeds]

    best_peer: dict[str, str] = {}
    for shift in shifts:
        peers = [p for p in PEERS if (p, shift) in mean]
        if peers:
            best_peer[shift] = max(peers, key=lambda p: mean[(p, shift)])

    def worst_shift(recipe: str) -> float:
        """The sweep's order: the smallest mean paired difference to the best peer over the shifts."""
        means = [statistics.fmean(d) for s in best_peer if (d := paired(recipe, best_peer[s], s))]
        return min(means) if means else float("-inf")

    recipes += sorted({key[0] for key in acc} - set(recipes), key=worst_shift, reverse=True)

    lines = [
        "# Transfer accuracy: fine-tuning recipes on the digits example",
        "",
        f"Held-out target test accuracy (%), mean ± sd over seeds (n per cell in brackets); {epochs} epochs,"
        f" AdamW (head lr {HEAD_LR}, weight decay 1e-4), cosine schedule, 10 labelled images per class, batch 10,"
        " the same pretrained backbone, data split and batch order per seed for every recipe.",
        "",
        f"Command: `{command}`",
        "",
    ]
    table = []
    for recipe in recipes:
        cells = []
        for shift in shifts:
            values = list(acc.get((recipe, shift), {}).values())
            cells.append(f"{_msd(values)} [{len(values)}]" if values else "-")
        table.append([f"`{recipe}`", *cells])
    lines += [markdown_table(["recipe", *shifts], table), ""]

    diffs: dict[str, dict[str, Any]] = defaultdict(dict)
    if best_peer:
        lines += [
            "## Paired differences vs the best peer of each shift",
            "",
            "Percentage points, mean ± sd of the per-seed difference (wins/ties/losses over seeds). Best peer: "
            + ", ".join(f"{shift}: `{peer}`" for shift, peer in best_peer.items())
            + ". Sweep rows (`gradual:...`) are sorted by their worst shift.",
            "",
        ]
        table = []
        for recipe in [r for r in recipes if r not in PEERS]:
            cells = []
            for shift in shifts:
                d = paired(recipe, best_peer[shift], shift) if shift in best_peer else []
                if not d:
                    cells.append("-")
                    continue
                wins, ties = sum(x > 0 for x in d), sum(x == 0 for x in d)
                cells.append(f"{_msd(d)} ({wins}/{ties}/{len(d) - wins - ties})")
                diffs[recipe][shift] = {"vs": best_peer[shift], "diffs": d}
            table.append([f"`{recipe}`", *cells])
        lines += [markdown_table(["recipe", *shifts], table), ""]

    adapted_comparisons = (
        ("Frozen backbone with adapted statistics vs the better of 'BN training' and 'BN frozen'", "probe_adapted",
         ("frozen_bn_training", "ours_probe"), "better_probe"),
        ("GradualUnfreeze with adapted statistics vs without", "gradual_adapted", ("ours_gradual",), "ours_gradual"),
    )  # fmt: skip
    for title, family, bases, versus in adapted_comparisons:
        table = []
        members = [r for r in recipes if r == f"ours_{family}" or r.startswith(f"{family}:")]
        for recipe in sorted(members, key=lambda r: adapted_prior(r) or -1.0):  # the preset first, then by prior
            cells = []
            for shift in shifts:
                present = [b for b in bases if paired(recipe, b, shift)]
                if not present:
                    cells.append("-")
                    continue
                best = min(present, key=lambda b: statistics.fmean(paired(recipe, b, shift)))  # on the same seeds
                d = paired(recipe, best, shift)
                wins, ties = sum(x > 0 for x in d), sum(x == 0 for x in d)
                cells.append(f"{_msd(d)} vs `{best}` ({wins}/{ties}/{len(d) - wins - ties})")
                diffs[f"{recipe}_vs_{versus}"][shift] = {"vs": best, "diffs": d}
            table.append([f"`{recipe}`", *cells])
        if table:
            lines += [f"## {title}", "", markdown_table(["recipe", *shifts], table), ""]
    seconds = [row["seconds"] for row in rows.values()]
    lines += [f"{len(rows)} runs, {sum(seconds) / 60:.1f} CPU-process minutes ({statistics.fmean(seconds):.1f} s/run)."]
    env = environment()
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    summary = {
        "epochs": epochs,
        "command": command,
        "accuracy_percent": {f"{r}|{s}": v for (r, s), v in acc.items()},
        "mean_percent": {f"{r}|{s}": v for (r, s), v in mean.items()},
        "best_peer": best_peer,
        "paired_differences": diffs,
        "environment": env,
    }
    return "\n".join(lines), summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-thread processes")
    parser.add_argument("--raw", type=Path, default=HERE / "raw" / "transfer.jsonl", help="raw results (appended)")
    parser.add_argument("--out", type=Path, default=HERE / "transfer", help="writes OUT.md and OUT.json")
    parser.add_argument("--report-only", action="store_true", help="summarise the raw results without training")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended to OUT.md (the analysis)")
    args = parser.parse_args(argv)
    for recipe in args.recipes:
        parsed = (gradual_kwargs(recipe), recipe_kwargs(recipe, "finetuning_scheduler"), adapted_prior(recipe))
        if recipe not in RECIPES and all(value is None for value in parsed):
            parser.error(f"unknown recipe {recipe!r}")
    command = "OMP_NUM_THREADS=1 python -m benchmarks.transfer " + " ".join(argv if argv is not None else [])
    if argv is None:
        import sys

        command = "OMP_NUM_THREADS=1 python -m benchmarks.transfer " + " ".join(sys.argv[1:])
    _init_worker()
    done = _load(args.raw, args.epochs)
    todo = [
        (seed, shift, recipe, args.epochs)
        for seed in args.seeds
        for shift in args.shifts
        for recipe in args.recipes
        if (seed, shift, recipe) not in done
    ]
    if todo and not args.report_only:
        from examples.digits import pretrained_backbone

        pretrained_backbone()  # build the cache once, before the workers read it
        print(f"{len(todo)} runs to do ({len(done)} already in {args.raw})", flush=True)
        args.raw.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures = {pool.submit(run_one, *task): task for task in todo}
            for n, future in enumerate(as_completed(futures), start=1):
                row = future.result()
                with args.raw.open("a") as raw:
                    raw.write(json.dumps(row) + "\n")
                done[(row["seed"], row["shift"], row["recipe"])] = row
                print(
                    f"[{n}/{len(todo)} {time.perf_counter() - start:.0f}s] seed {row['seed']} {row['shift']:8}"
                    f" {row['recipe']}: {100 * row['test_acc']:.1f}% ({row['seconds']:.1f}s)",
                    flush=True,
                )
    rows = {key: row for key, row in done.items() if key[0] in args.seeds or args.report_only}
    markdown, summary = report(rows, args.epochs, command.strip())
    if args.notes is not None:
        markdown += "\n" + args.notes.read_text()
    args.out.with_suffix(".md").write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
