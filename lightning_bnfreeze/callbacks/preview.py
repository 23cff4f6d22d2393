"""Glue between a LightningModule and :mod:`lightning_bnfreeze.lr_preview`: its optimizers, built on a copy."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning.pytorch as pl
from torch.optim import Optimizer

from lightning_bnfreeze.backbone_parameters import BackboneParameters, ReleaseSettings
from lightning_bnfreeze.freezer import set_requires_grad
from lightning_bnfreeze.internals import parse_configure_optimizers
from lightning_bnfreeze.lr_preview import Budget, SchedulerStep
from lightning_bnfreeze.plan import What
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.triggers import Trigger

__all__ = ["configure_on_copy", "groups_preview", "unfreezer_on_copy"]


@dataclass
class _BudgetTrainer:
    """What ``configure_optimizers`` usually reads of ``self.trainer``, from a budget."""

    max_epochs: int
    max_steps: int
    accumulate_grad_batches: int
    num_training_batches: int
    estimated_stepping_batches: int
    current_epoch: int = 0
    global_step: int = 0
    world_size: int = 1
    num_devices: int = 1
    is_global_zero: bool = True


def configure_on_copy(
    pl_module: pl.LightningModule, backbone: str, budget: Budget
) -> tuple[pl.LightningModule, list[Optimizer], list[SchedulerStep]]:
    """A deep copy of ``pl_module`` with ``backbone`` frozen (as at fit start), and its optimizers and schedulers.

    ``configure_optimizers`` runs on the copy with a stand-in ``trainer`` that has the budget's
    ``max_epochs``, ``max_steps``, ``accumulate_grad_batches``, ``num_training_batches`` and
    ``estimated_stepping_batches``; Lightning parses what it returns, as in a fit.
    """
    model = copy.deepcopy(pl_module)
    set_requires_grad(model.get_submodule(backbone).parameters(), False)
    model.trainer = _BudgetTrainer(  # type: ignore[assignment]
        max_epochs=-1 if budget.max_epochs is None else budget.max_epochs,
        max_steps=budget.max_steps,
        accumulate_grad_batches=budget.accumulate_grad_batches,
        num_training_batches=budget.batches_per_epoch,
        estimated_stepping_batches=budget.total_steps,
    )
    try:
        configured = model.configure_optimizers()
    except AttributeError as error:
        raise AttributeError(
            f"{error}. The preview runs `configure_optimizers` with a stand-in trainer that has only"
            f" {', '.join(_BudgetTrainer.__dataclass_fields__)}."
        ) from error
    finally:
        model.trainer = None
    if configured is None or not model.automatic_optimization:
        raise ValueError(
            "The learning-rate preview needs an optimizer from `configure_optimizers` and automatic optimization"
            " (with manual optimization you step the schedulers yourself)."
        )
    # every form `configure_optimizers` may return, as Lightning parses it in a fit
    optimizers, configs = parse_configure_optimizers(configured)
    steps = [SchedulerStep(c.scheduler, c.interval, c.frequency, c.reduce_on_plateau) for c in configs]
    return model, optimizers, steps


def unfreezer_on_copy(
    pl_module: pl.LightningModule,
    params: BackboneParameters,
    what: What,
    trigger: Trigger,
    settings: ReleaseSettings,
    optimizer_index: int | None,
    budget: Budget,
) -> tuple[Unfreezer, list[SchedulerStep]]:
    """The :class:`~lightning_bnfreeze.release.Unfreezer` a fit of ``budget`` would run, on a copy of ``pl_module``
    (:func:`configure_on_copy`), and the LR schedulers of its optimizer."""
    model, optimizers, schedulers = configure_on_copy(pl_module, params.name, budget)
    optimizer = params.optimizer(optimizers, model, optimizer_index)
    mine = [step for step in schedulers if step.scheduler.optimizer is optimizer]
    plan = what.plan(model, params.name)
    return params.unfreezer(model, plan, trigger, optimizer, [step.scheduler for step in mine], settings), mine


def groups_preview(unfreezer: Unfreezer) -> dict[str, list[str]]:
    """Part name -> the user's param groups its parameters take their hyperparameters from."""
    params = dict(unfreezer.root.named_parameters())
    return {
        part.name: sorted({unfreezer.groups.origin_label(params[name]) for name in part.params})
        for parts in unfreezer.plan.releases
        for part in parts
    }
