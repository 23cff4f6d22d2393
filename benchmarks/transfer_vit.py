"""Transfer accuracy of fine-tuning recipes on a small ViT: recipes x shifts x seeds, paired by seed.

The transformer counterpart of ``benchmarks/transfer.py``: the same task (digits 0-4 -> 5-9 from 10
labelled images per class, ``examples.digits.DigitsTransfer``), shifts and seeds, the same optimizer
(``DigitsClassifier``'s AdamW, weight decay 1e-4, cosine schedule over ``--epochs``), epochs, data and
batch order for every recipe. The head's lr is 1e-3 (``--lr``), not the CNN's 1e-2: at 1e-2 full
fine-tuning of the ViT diverges (see the report). The backbone is timm's ``VisionTransformer`` over
2x2 patches of the 8x8 images (embed dim 64, depth 6, 4 heads, class token, ``num_classes=0``),
randomly initialised, pretrained here on digits 0-4 and cached beside the digits ResNet
(``digits_vit_<hash>.pt``). The metric is the held-out target test accuracy of the final weights.
Run from the repository root::

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.transfer_vit --seeds 0 1 2 3 4 --jobs 2

Raw results are appended to ``benchmarks/raw/transfer_vit.jsonl`` as runs finish; a rerun skips the
runs already there with the same configuration (for ``GradualUnfreeze`` recipes: the same resolved
arguments and plan, so a change of the library's defaults reruns ``ours_default``). The summary goes
to ``benchmarks/transfer_vit.md`` (``--report-only``: from the JSONL alone; ``--notes FILE`` appends an
analysis; ``--show-plans``: print the recipes' release plans).

Recipes (``--recipes``); the ViT's blocks, output side first, are ``norm`` with ``blocks.5`` (timm's
grouping), ``blocks.4`` ... ``blocks.0``, and the stem (``patch_embed``, ``cls_token``, ``pos_embed``):

- ``full``: everything trains from the first step at the head's lr.
- ``probe``: frozen backbone, the head alone (how far the pretrained features are from the target's).
- ``timm_llrd``: timm's ``param_groups_layer_decay`` (layer decay 0.75, timm's weight-decay exclusions),
  the head one layer above the last block as in timm's grouping of the whole model; each group starts
  at ``head_lr * lr_scale`` and the cosine schedule scales all groups alike. ``timm_llrd:layer_decay=0.65``.
- ``finetuning_scheduler``: ``FinetuningScheduler`` with an epoch-driven schedule mirroring
  ``transfer.py``'s: the head, then one block per epoch from epoch 1 (the stem last), each phase at
  0.1 x the head's lr. ``finetuning_scheduler:lr_factor=0.3,first=1,every=1``.
- ``ours_default``: ``GradualUnfreeze()``, the library's defaults at run time.
- ``ours_llrd``: ``GradualUnfreeze(layer_decay=0.75)``, the library's defaults otherwise.
- ``gradual:key=value,...``: ``GradualUnfreeze(**kwargs)``, e.g. ``gradual:lr_scale=1.0,first_release=0``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import inspect
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn

from benchmarks.transfer import SHIFTS, _init_worker, _msd, _quiet, gradual_kwargs
from examples.digits import DigitsClassifier, DigitsTransfer
from examples.digits.backbone import _pretrain, default_cache_dir
from examples.digits.data import TARGET_DIGITS

HERE = Path(__file__).resolve().parent
PEERS = ("full", "timm_llrd", "finetuning_scheduler")
REFERENCES = ("probe",)
OURS = ("ours_default", "ours_llrd")
RECIPES = PEERS + REFERENCES + OURS
K_PER_CLASS = 10
HEAD_LR = 1e-3
VIT_CONFIG: dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=6, num_heads=4, class_token=True, global_pool="token"
)
PRETRAIN: dict[str, Any] = dict(epochs=60, lr=3e-3, batch_size=64, seed=0)
DEPTH = VIT_CONFIG["depth"]
VIT_PARTS = ("patch_embed", "cls_token", "pos_embed", *(f"blocks.{i}" for i in range(DEPTH)), "norm")
BEHAVIOUR_ARGUMENTS = (
    *("lr_scale", "lr_decay", "layer_decay", "granularity", "blocks_per_release", "first_release", "release_every"),
    *("train_bn", "warmup_steps", "adapt_batches", "unit", "monitor"),
)
"""``GradualUnfreeze`` arguments whose defaults, when they change, change what ``ours_*`` recipes run."""
OURS_PRESETS: dict[str, dict[str, Any]] = {"ours_default": {}, "ours_llrd": {"layer_decay": 0.75}}


# --------------------------------------------------------------------------------------------- the model


def digits_vit() -> nn.Module:
    """The randomly initialised ViT backbone (timm's ``VisionTransformer`` without its head)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, **VIT_CONFIG)


def pretrained_vit(cache_dir: str | Path | None = None) -> nn.Module:
    """:func:`digits_vit` pretrained on digits 0-4 like the digits ResNet, cached as ``digits_vit_<hash>.pt``."""
    recipe = {"format": 1, "vit": VIT_CONFIG, **PRETRAIN}  # bump the format when the pretraining code changes
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"digits_vit_{digest}.pt"
    if path.is_file():
        vit = digits_vit()
        vit.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return vit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAIN["seed"])  # the initialisation too: the cache must not depend on the caller's RNG
        vit = digits_vit()
        vit.out_features = vit.num_features  # what `_pretrain` sizes its temporary head with
        accuracy = _pretrain(vit, **PRETRAIN)  # type: ignore[arg-type]
    print(f"Pretrained ViT: source test accuracy {accuracy:.1%}; cached at {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
        torch.save(vit.state_dict(), file)
    os.replace(file.name, path)
    return vit


class ViTClassifier(DigitsClassifier):
    """``DigitsClassifier`` (steps, metrics, AdamW over the trainable parameters, cosine) with the pretrained ViT.

    Args:
        lr: the head's learning rate.
        freeze_backbone: a linear probe.
        layer_decay: timm's layer-wise LR decay param groups for the backbone instead of one group.
    """

    def __init__(self, lr: float = HEAD_LR, freeze_backbone: bool = False, layer_decay: float | None = None) -> None:
        # The parent builds a tiny random CNN backbone, replaced here: only its steps and optimizer are reused.
        super().__init__(backbone="digits", pretrained=False, width=1, lr=lr, scheduler="cosine")
        self.backbone = pretrained_vit()
        self.head = nn.Linear(VIT_CONFIG["embed_dim"], len(TARGET_DIGITS))
        self.layer_decay = layer_decay
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        if self.layer_decay is None:
            return super().configure_optimizers()
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            self.backbone,
            weight_decay=self.weight_decay,
            no_weight_decay_list=self.backbone.no_weight_decay(),
            layer_decay=self.layer_decay,
        )
        for group in groups:  # the head is one layer above `norm`/`blocks.5`, as in timm's grouping of the model
            group["lr_scale"] *= self.layer_decay
            group["lr"] = self.lr * group["lr_scale"]  # the cosine schedule then keeps every group's lr_scale
        head = {"params": list(self.head.parameters()), "name": "head", "lr": self.lr, "lr_scale": 1.0}
        optimizer = torch.optim.AdamW([head, *groups], lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)]


# ------------------------------------------------------------------------------------------------ recipes


def _options(recipe: str) -> dict[str, Any]:
    """``{key: value}`` of ``name:key=value,...``."""
    pairs = (item.partition("=") for item in recipe.partition(":")[2].split(",") if item)
    return {key.strip(): ast.literal_eval(value.strip()) for key, _, value in pairs}


def vit_blocks() -> list[list[str]]:
    """The backbone's blocks, output side first, as timm groups them: ``norm`` with the last block, the stem last."""
    blocks = [[f"backbone.blocks.{i}"] for i in reversed(range(DEPTH))]
    return [
        ["backbone.norm", *blocks[0]],
        *blocks[1:],
        ["backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed"],
    ]


def gradual_kwargs_of(recipe: str) -> dict[str, Any] | None:
    """The ``GradualUnfreeze`` arguments of an ``ours_*`` or ``gradual:`` recipe, else ``None``."""
    if recipe in OURS:
        return dict(OURS_PRESETS[recipe])
    return gradual_kwargs(recipe) if recipe.partition(":")[0] == "gradual" else None


def fts_schedule(
    epochs: int, head_lr: float, first: int = 1, every: int = 1, lr_factor: float = 0.1
) -> dict[int, dict[str, Any]]:
    """Phase 0: the head; then one block per phase, output side first, at ``lr_factor`` x the head's lr."""
    blocks = vit_blocks()
    starts = [first + every * i for i in range(len(blocks))]
    schedule: dict[int, dict[str, Any]] = {0: {"params": [r"head\..*"], "max_transition_epoch": starts[0]}}
    for depth, block in enumerate(blocks, start=1):
        patterns = [name.replace(".", r"\.") + r"(\..*)?" for name in block]
        end = starts[depth] if depth < len(blocks) else epochs
        schedule[depth] = {"params": patterns, "lr": lr_factor * head_lr, "max_transition_epoch": end}
    return schedule


def fingerprint(recipe: str) -> str:
    """A ``GradualUnfreeze`` recipe as it resolves today, hashed; ``""`` for the other recipes.

    It covers the release plan, the arguments given and the defaults of :data:`BEHAVIOUR_ARGUMENTS`, so
    that a change of those defaults reruns ``ours_default`` while a new argument that is off by
    default does not invalidate the runs done.
    """
    kwargs = gradual_kwargs_of(recipe)
    if kwargs is None:
        return ""
    from lightning_bnfreeze import GradualUnfreeze

    arguments = inspect.signature(GradualUnfreeze).bind(**kwargs)
    arguments.apply_defaults()
    model = nn.Module()
    model.backbone = digits_vit()
    resolved = sorted((k, repr(v)) for k, v in arguments.arguments.items() if k in kwargs or k in BEHAVIOUR_ARGUMENTS)
    return hashlib.sha256(json.dumps([resolved, GradualUnfreeze(**kwargs).dry_run(model)]).encode()).hexdigest()[:12]


def make_callbacks(recipe: str, epochs: int, lr: float, log_dir: str) -> list[Any]:
    """The callbacks of a recipe (raises ``ValueError`` on an unknown one)."""
    kwargs = gradual_kwargs_of(recipe)
    if kwargs is not None:
        from lightning_bnfreeze import GradualUnfreeze

        return [GradualUnfreeze(**kwargs)]
    name = recipe.partition(":")[0]
    if name == "finetuning_scheduler":
        from finetuning_scheduler import FinetuningScheduler
        from finetuning_scheduler.fts_supporters import FTSCheckpoint

        return [
            FinetuningScheduler(
                ft_schedule=fts_schedule(epochs, lr, **_options(recipe)),
                epoch_transitions_only=True,
                restore_best=False,
                log_dir=log_dir,
                logging_level=logging.ERROR,
            ),
            FTSCheckpoint(dirpath=log_dir, monitor="val_loss", save_top_k=1),
        ]
    if recipe in ("full", "probe") or name == "timm_llrd":
        return []
    raise ValueError(
        f"unknown recipe {recipe!r}: known: {RECIPES}, 'gradual:key=value,...' and the 'name:key=value'"
        " forms of timm_llrd and finetuning_scheduler"
    )


def _relative_change(backbone: nn.Module, pretrained: dict[str, torch.Tensor], part: str) -> float:
    """``||w - w_pretrained|| / ||w_pretrained||`` over the parameters of one part of the backbone."""
    names = [name for name, _ in backbone.named_parameters() if name == part or name.startswith(f"{part}.")]
    params = dict(backbone.named_parameters())
    delta = sum(float((params[name].detach() - pretrained[name]).pow(2).sum()) for name in names)
    norm = sum(float(pretrained[name].pow(2).sum()) for name in names)
    return (delta / norm) ** 0.5 if norm > 0 else 0.0


def run_one(seed: int, shift: str, recipe: str, epochs: int, lr: float) -> dict[str, Any]:
    """Fine-tune with one recipe and return the held-out target test accuracy (and a few facts about the run)."""
    import lightning.pytorch as pl

    from benchmarks.common import transfer_trainer

    _quiet()
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = DigitsTransfer(k_per_class=K_PER_CLASS, shift=shift, seed=seed)  # type: ignore[arg-type]
    layer_decay = _options(recipe).get("layer_decay", 0.75) if recipe.partition(":")[0] == "timm_llrd" else None
    model = ViTClassifier(lr=lr, freeze_backbone=recipe == "probe", layer_decay=layer_decay)
    pretrained = copy.deepcopy(model.backbone.state_dict())
    tmp = tempfile.TemporaryDirectory()
    callbacks = make_callbacks(recipe, epochs, lr, tmp.name)
    trainer = transfer_trainer(epochs, recipe, tmp.name, callbacks)
    trainer.fit(model, datamodule=data)
    val_acc = float(trainer.callback_metrics.get("val_acc", torch.tensor(float("nan"))))
    trained = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    groups = len(trainer.optimizers[0].param_groups)
    moved = {block: _relative_change(model.backbone, pretrained, block) for block in VIT_PARTS}
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    tmp.cleanup()
    return {
        "seed": seed,
        "shift": shift,
        "recipe": recipe,
        "fingerprint": fingerprint(recipe),
        "epochs": epochs,
        "head_lr": lr,
        "k_per_class": K_PER_CLASS,
        "test_acc": float(result["test_acc"]),
        "final_val_acc": val_acc,
        "backbone_trainable_at_end": trained,
        "param_groups_at_end": groups,
        "relative_change": moved,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------- report

Config = tuple[int, float]
"""(epochs, head lr)."""
Key = tuple[int, float, int, str, str]
"""(epochs, head lr, seed, shift, recipe)."""


def _key(row: dict[str, Any]) -> Key:
    return row["epochs"], row["head_lr"], row["seed"], row["shift"], row["recipe"]


def _load(path: Path) -> dict[Key, dict[str, Any]]:
    """The raw rows whose recipe still resolves as it did when they ran (stale ones are reported, not used)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [row for row in rows if row["k_per_class"] == K_PER_CLASS]
    current = {recipe: fingerprint(recipe) for recipe in {row["recipe"] for row in rows}}
    stale = sorted({row["recipe"] for row in rows if row["fingerprint"] != current[row["recipe"]]})
    if stale:
        print(f"ignoring runs of {stale}: they resolved to another schedule or arguments than today", flush=True)
    return {_key(row): row for row in rows if row["fingerprint"] == current[row["recipe"]]}


def _section(rows: list[dict[str, Any]], movement: bool) -> list[str]:
    """Accuracy per recipe and shift, paired differences vs the best peer (and how far the weights moved)."""
    from benchmarks.common import markdown_table

    acc: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        acc[(row["recipe"], row["shift"])][row["seed"]] = 100.0 * row["test_acc"]
    shifts = [s for s in SHIFTS if any(key[1] == s for key in acc)]
    mean = {key: statistics.fmean(v.values()) for key, v in acc.items()}

    def paired(a: str, b: str, shift: str) -> list[float]:
        seeds = sorted(set(acc.get((a, shift), {})) & set(acc.get((b, shift), {})))
        return [acc[(a, shift)][s] - acc[(b, shift)][s] for s in seeds]

    best_peer = {
        shift: max(peers, key=lambda p: mean[(p, shift)])
        for shift in shifts
        if (peers := [p for p in PEERS if (p, shift) in mean])
    }

    def worst_shift(recipe: str) -> float:
        means = [statistics.fmean(d) for s in best_peer if (d := paired(recipe, best_peer[s], s))]
        return min(means) if means else float("-inf")

    named = [r for r in RECIPES if any(key[0] == r for key in acc)]
    recipes = named + sorted({key[0] for key in acc} - set(named), key=worst_shift, reverse=True)
    table = [
        [
            f"`{recipe}`",
            *(f"{_msd(list(v.values()))} [{len(v)}]" if (v := acc.get((recipe, s))) else "-" for s in shifts),
        ]
        for recipe in recipes
    ]
    lines = [markdown_table(["recipe", *shifts], table), ""]
    if best_peer:
        lines += [
            "Paired differences vs the best peer of each shift: percentage points, mean ± sd of the per-seed"
            " difference, [min, max], (wins/ties/losses). Best peer: "
            + ", ".join(f"{shift}: `{peer}`" for shift, peer in best_peer.items())
            + ". Rows after the named recipes are sorted by their worst shift.",
            "",
        ]
        table = []
        for recipe in [r for r in recipes if r not in PEERS]:
            cells = []
            for shift in shifts:
                d = paired(recipe, best_peer[shift], shift) if shift in best_peer else []
                wins, ties = sum(x > 0 for x in d), sum(x == 0 for x in d)
                cells.append(
                    f"{_msd(d)} [{min(d):+.1f}, {max(d):+.1f}] ({wins}/{ties}/{len(d) - wins - ties})" if d else "-"
                )
            table.append([f"`{recipe}`", *cells])
        lines += [markdown_table(["recipe", *shifts], table), ""]
    if movement:
        moved: dict[str, list[dict[str, float]]] = defaultdict(list)
        for row in rows:
            moved[row["recipe"]].append(row["relative_change"])
        lines += [
            "How far the pretrained weights moved: `||w - w_pretrained|| / ||w_pretrained||` at the end of training,"
            " per part of the backbone, mean over seeds and shifts.",
            "",
            markdown_table(
                ["recipe", *VIT_PARTS],
                [[f"`{r}`", *(f"{statistics.fmean(m[p] for m in moved[r]):.3f}" for p in VIT_PARTS)] for r in recipes],
            ),
            "",
        ]
    return lines


def report(rows: dict[Key, dict[str, Any]], configs: Sequence[Config], command: str) -> str:
    """The Markdown summary: one section per (epochs, head lr), the first one with the weights' movement."""
    from benchmarks.common import environment

    lines = [
        "# Transfer accuracy on a small ViT: fine-tuning recipes on the digits example",
        "",
        f"Held-out target test accuracy (%), mean ± sd over seeds [n]; timm `VisionTransformer` ({VIT_CONFIG}),"
        f" pretrained on digits 0-4 ({PRETRAIN}), fine-tuned on digits 5-9 from {K_PER_CLASS} labelled images per"
        " class; AdamW (weight decay 1e-4) with a cosine schedule over the epochs, batch 10; the same backbone,"
        " data split and batch order per seed for every recipe.",
        "",
        f"Command: `{command}`",
        "",
    ]
    for number, (epochs, lr) in enumerate(configs):
        chosen = [row for key, row in rows.items() if key[:2] == (epochs, lr)]
        if chosen:
            lines += [f"## {epochs} epochs, head lr {lr:g}", "", *_section(chosen, movement=number == 0)]
    seconds = [row["seconds"] for row in rows.values()]
    if seconds:
        lines += [
            f"{len(rows)} runs, {sum(seconds) / 60:.1f} CPU-process minutes ({statistics.fmean(seconds):.1f} s/run)."
        ]
    env = environment()
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--epochs", type=int, nargs="+", help="default: 20 (report only: every value in the raw file)")
    parser.add_argument(
        "--lr", type=float, nargs="+", help=f"the head's learning rate; default: {HEAD_LR:g} (report only: every value)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-thread processes")
    parser.add_argument("--raw", type=Path, default=HERE / "raw" / "transfer_vit.jsonl", help="raw results (appended)")
    parser.add_argument("--out", type=Path, default=HERE / "transfer_vit.md", help="the Markdown report")
    parser.add_argument("--report-only", action="store_true", help="summarise the raw results without training")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended to the report (the analysis)")
    parser.add_argument("--show-plans", action="store_true", help="print each recipe's release plan and exit")
    args = parser.parse_args(argv)
    for recipe in args.recipes:
        try:
            make_callbacks(recipe, 20, HEAD_LR, "")
        except (ValueError, TypeError, SyntaxError) as error:
            parser.error(f"recipe {recipe!r}: {error}")
    if args.show_plans:
        model = nn.Module()
        model.backbone, model.head = digits_vit(), nn.Linear(VIT_CONFIG["embed_dim"], len(TARGET_DIGITS))
        for recipe in args.recipes:
            print(f"== {recipe}")
            for callback in make_callbacks(recipe, 20, HEAD_LR, ""):
                if hasattr(callback, "dry_run"):
                    print(callback.dry_run(model, (args.epochs or [20])[0]))
        return
    command = "OMP_NUM_THREADS=1 python -m benchmarks.transfer_vit " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    _init_worker()
    done = _load(args.raw)
    if args.report_only:
        found = {key[:2] for key in done}
        configs = sorted(
            (c for c in found if c[0] in (args.epochs or [c[0]]) and c[1] in (args.lr or [c[1]])),
            key=lambda c: (c != (20, HEAD_LR), c),
        )
        markdown = report(done, configs, command.strip())
    else:
        configs = [(epochs, lr) for epochs in args.epochs or [20] for lr in args.lr or [HEAD_LR]]
        _train(args, configs, done)
        chosen = {key: row for key, row in done.items() if key[2] in args.seeds and key[4] in args.recipes}
        markdown = report(chosen, configs, command.strip())
    if args.notes is not None:
        markdown += "\n" + args.notes.read_text()
    args.out.write_text(markdown)
    print(markdown)


def _train(args: argparse.Namespace, configs: Sequence[Config], done: dict[Key, dict[str, Any]]) -> None:
    """Run what ``done`` lacks, appending each result to ``args.raw`` (and ``done``) as it finishes."""
    todo = [
        (seed, shift, recipe, epochs, lr)
        for epochs, lr in configs
        for seed in args.seeds
        for shift in args.shifts
        for recipe in args.recipes
        if (epochs, lr, seed, shift, recipe) not in done
    ]
    if not todo:
        return
    pretrained_vit()  # build the cache once, before the workers read it
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(todo)} runs to do ({len(done)} already in {args.raw})", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = [pool.submit(run_one, *task) for task in todo]
        for n, future in enumerate(as_completed(futures), start=1):
            row = future.result()
            with args.raw.open("a") as raw:
                raw.write(json.dumps(row) + "\n")
            done[_key(row)] = row
            print(
                f"[{n}/{len(todo)} {time.perf_counter() - start:.0f}s] {row['epochs']} epochs, lr {row['head_lr']:g},"
                f" seed {row['seed']} {row['shift']:8} {row['recipe']}: {100 * row['test_acc']:.1f}%"
                f" ({row['seconds']:.1f}s)",
                flush=True,
            )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
