"""What ``GradualUnfreeze`` checks and warns about when a fit starts, and when it checks metrics."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_bnfreeze.blocks import check_block_order, forward_order
from lightning_bnfreeze.callbacks.early_stopping import is_early_stopping
from lightning_bnfreeze.internals import batches_done_in_epoch
from lightning_bnfreeze.plan import ReleasePlan
from lightning_bnfreeze.triggers import Trigger

__all__ = [
    "check_something_trains",
    "checks_on_train_epoch_end",
    "epochs_done",
    "warn_about_a_trained_trainer",
    "warn_about_adapters",
    "warn_about_early_stopping",
    "warn_about_forward_order",
    "warn_about_group_rates",
    "warn_about_late_releases",
]


def warn_about_early_stopping(trainer: pl.Trainer) -> None:
    """Lightning's own ``EarlyStopping`` among the callbacks: it stops the fit while blocks are still frozen."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    if any(is_early_stopping(cb) and not hasattr(cb, "releases_instead") for cb in callbacks):
        rank_zero_warn(
            "GradualUnfreeze: Lightning's EarlyStopping stops the fit as usual, also while blocks are still frozen;"
            " to make the next release instead, use lightning_bnfreeze.ReleasingEarlyStopping (same arguments)."
        )


def check_something_trains(pl_module: nn.Module, backbone: str, frozen: list[nn.Parameter], trigger: Trigger) -> None:
    """Before the backbone's parameters (``frozen``) are frozen: if nothing else would train until the first release,
    and the trigger releases after the first step (or only on a metric), the first step's loss would have no
    gradient; raise, naming the ways out."""
    to_freeze = {id(param) for param in frozen}
    if any(param.requires_grad for param in pl_module.parameters() if id(param) not in to_freeze):
        return
    times = trigger.times(1)
    if times == [0] or (times is None and trigger.checked_at != "metrics"):  # released before the first step, or may be
        return
    raise ValueError(
        f"GradualUnfreeze: nothing would train until the first release: every trainable parameter of the"
        f" LightningModule is in `backbone` ({backbone!r}), frozen at fit start (its classifier too?). Keep the head"
        f" outside it (e.g. a timm model built with num_classes=0 as the backbone, and an nn.Linear of your own),"
        f" name it in `trainable` (e.g. trainable=['{backbone}.fc.*']), or release from the start"
        " (when=Every(first=0), or a release at 0 in your Schedule)."
    )


def warn_about_group_rates(own_rates: dict[str, float], head_lr: float, lr_scale: float) -> None:
    """The user's param groups gave backbone parameters learning rates of their own (``own_rates``, by group), other
    than the head's ``head_lr`` and than it times ``lr_scale`` (all before any scheduler): released blocks train at
    the latter, and one warning says so, with what gives the group's rate."""
    other = {
        label: lr
        for label, lr in own_rates.items()
        if not any(math.isclose(lr, rate, rel_tol=1e-6) for rate in (head_lr, head_lr * lr_scale))
    }
    if not other or head_lr <= 0:
        return
    groups = ", ".join(f"{label!r} (lr {lr:g})" for label, lr in other.items())
    rates = set(other.values())
    if len(rates) > 1:
        remedy = "For rates that fall block by block, use what=LayerDecay(...)."
    elif (rate := rates.pop()) > 0:
        remedy = f"For the group's rate, set lr_scale={rate / head_lr:.3g}."
    else:
        remedy = "A block that must not train: leave it out of the release plan (Blocks(names=...) or a Schedule)."
    rank_zero_warn(
        f"GradualUnfreeze: your param group(s) {groups} set a learning rate for backbone parameters; released blocks"
        f" take those groups' other hyperparameters, but train at the head's lr ({head_lr:g}) times lr_scale"
        f" ({lr_scale:g}) and the plan's factors. {remedy}"
    )


def warn_about_a_trained_trainer(trainer: pl.Trainer) -> None:
    """At the start of training, a Trainer that took optimizer steps in an earlier fit and resumes no checkpoint
    (``trainer.fit`` called again to go on): for the callback the fit starts over."""
    if trainer.global_step > 0 and trainer.ckpt_path is None:
        rank_zero_warn(
            f"GradualUnfreeze: this Trainer took {trainer.global_step} optimizer steps before this fit: the callback"
            " starts over, freezing the backbone again and making every release due by now at once. To go on with a"
            " fit, resume it from its checkpoint instead: `trainer.fit(model, ckpt_path=...)`."
        )


def warn_about_forward_order(plan: ReleasePlan, pl_module: pl.LightningModule) -> None:
    """With found blocks and an ``example_input_array``, warn if the forward pass runs them in another order."""
    example = pl_module.example_input_array
    if not plan.blocks or example is None or isinstance(example, dict):
        return
    inputs = example if isinstance(example, tuple) else (example,)
    message = check_block_order(plan.blocks, forward_order(pl_module, *inputs))
    if message is not None:
        rank_zero_warn(f"GradualUnfreeze: {message} Name them with `what=Blocks(names=[...])` (input side first).")


def warn_about_late_releases(trigger: Trigger, plan: ReleasePlan, trainer: pl.Trainer, started: bool = False) -> None:
    """Releases due at or after the fit's last epoch or step: those blocks would never train. Before the fit
    (``started=False``): epochs, and steps under ``max_steps``; once it started, steps without it (the fit's last
    step is known then, from the training data)."""
    unit = trigger.unit
    counted = unit == "step" and trainer.max_steps < 0  # the last step: max_epochs times the epoch's steps
    if counted != started:
        return
    if counted:
        last = trainer.estimated_stepping_batches
        end = f"the fit's last optimizer step ({last:g}, from `max_epochs={trainer.max_epochs}`)"
    else:
        last = trainer.max_steps if unit == "step" else -1 if trainer.max_epochs is None else trainer.max_epochs
        end = f"`max_{unit}s={last}`"
    late = [time for time in trigger.times(len(plan.releases)) or [] if time >= last >= 0]
    if late:
        rank_zero_warn(f"GradualUnfreeze: release {unit}(s) {late} are at or past {end}: those blocks never train.")


def warn_about_adapters(named: list[tuple[str, nn.Parameter]], is_trainable: Callable[[str], bool]) -> None:
    """A few backbone parameters that require grad among many that do not: an adapter (LoRA) set up by hand."""
    wanted = [(name, p) for name, p in named if p.requires_grad and not is_trainable(name)]
    if wanted and 2 * sum(p.numel() for _, p in wanted) < sum(p.numel() for _, p in named):
        names = [name for name, _ in wanted]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        rank_zero_warn(
            f"GradualUnfreeze: {len(names)} backbone parameter(s) require grad while most do not ({shown}):"
            " an adapter? They are frozen until their block is released; to train them from the first step,"
            f" name them in `trainable` (e.g. trainable={names[:1]!r}). Blocks that an earlier fit of this model"
            " released look the same: then nothing is to be done."
        )


def checks_on_train_epoch_end(trainer: pl.Trainer, trigger: Trigger) -> bool:
    """``EarlyStopping``'s rule: at the training epoch end when validation runs once per epoch (or never),
    else after each validation; a trigger's ``check_on_train_epoch_end`` (``True``/``False``) overrides it."""
    setting = getattr(trigger, "check_on_train_epoch_end", None)
    if setting is not None:
        return bool(setting)
    return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1


def epochs_done(trainer: pl.Trainer) -> float:
    """Epochs trained so far: the current epoch plus the fraction of its batches done."""
    total = trainer.num_training_batches
    fraction = batches_done_in_epoch(trainer) / total if 0 < total < float("inf") else 0.0
    return trainer.current_epoch + min(fraction, 1.0)
