"""The release plan as the text table of a dry run, in plain Python."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_bnfreeze.divergence import DIVERGED
from lightning_bnfreeze.loss_rise import LOSS_RISE, LOSS_WINDOW, RETRY_SCALE
from lightning_bnfreeze.plan import ReleasePlan
from lightning_bnfreeze.step_size import AUTO, AUTO_STEP, NEAR_DECAY, MaxStep
from lightning_bnfreeze.tables import format_table
from lightning_bnfreeze.triggers import Trigger

__all__ = ["format_plan"]

_NORMS = {
    "auto": "frozen; train while the releases move fast",
    "train": "train",
    "frozen": "frozen (affine trains)",
}


def format_plan(
    plan: ReleasePlan,
    trigger: Trigger,
    lr_scale: float,
    bn: str,
    last: int = -1,
    groups: Mapping[str, Sequence[str]] | None = None,
    max_step: MaxStep = None,
    adapt_auto: bool = False,
    statistics: bool = True,
    on_loss_rise: str = "retry",
) -> str:
    """One row per released part: when, what, parameters, learning rate relative to the head's, norm layers,
    and (``groups``: part name -> the user's groups its parameters take their hyperparameters from) the groups;
    a line on what ``max_step`` may change in the planned rates, and with ``bn="auto"`` one on ``adapt="auto"``;
    ``statistics=False`` (no norm layer of the backbone keeps running statistics): a line saying that norm modes,
    the shift ``max_step="auto"`` measures and ``adapt="auto"`` have nothing to act on; with
    ``on_loss_rise="retry"``, a line on what a rise of the loss after the first release changes.

    With ``last >= 0`` (``max_epochs`` or ``max_steps``), releases at or past it are marked as never happening.
    """
    times = trigger.times(len(plan.releases))
    header = [trigger.unit, "released", "parameters", "lr x head", "norm layers"]
    rows = [header + (["hyperparameters from"] if groups is not None else [])]
    for k, parts in enumerate(plan.releases):
        if times is None:
            at = f"release {k + 1}"
        elif 0 <= last <= times[k]:
            at = f"{times[k]} (>= max_{trigger.unit}s: never)"
        else:
            at = str(times[k])
        for i, part in enumerate(parts):
            norms = _NORMS[bn] if statistics else "-"
            row = [at if i == 0 else "", part.name, f"{part.numel:,}", f"{lr_scale * part.lr_factor:.4g}", norms]
            if groups is not None:
                row.append(", ".join(groups.get(part.name, ())) or "head's")
            rows.append(row)
    table = format_table(rows)
    if times is None:
        table += f"\nReleases in this order, each when {trigger!r} says."
    if not statistics:
        table += (
            f"\nNo norm layer of {plan.backbone!r} keeps running statistics: `bn` changes nothing"
            + (", max_step='auto' runs without a cap (max_step=None)" if max_step == AUTO else "")
            + "."
        )
    elif max_step == AUTO and len(plan.releases) > 1:
        table += (
            f"\nmax_step='auto': near the source, once the first release moves fast, release k (from 0) trains at"
            f" {NEAR_DECAY:g}**k x the lr above, less if its first step moves more than {NEAR_DECAY:g}**k x the"
            " first's."
        )
    elif max_step is not None and max_step != AUTO:
        table += f"\nmax_step={max_step!r}: a release's rate may be scaled down after its first step."
    if bn == "auto" and adapt_auto and statistics:
        table += "\nadapt='auto': as norm layers start training, the backbone's take the training data's statistics"
        table += (
            " (far from the source: before the first step, unless Adam or AdamW cannot move any release by more than"
            f" {AUTO_STEP:.1%}; the source's come back after the first step if its gradients say the first release"
            " will not move that far, or as released ones stay frozen)."
            if max_step == AUTO
            else "."
        )
    if on_loss_rise == "retry" and plan.releases:
        table += (
            f"\non_loss_rise='retry': if the training loss rises after the first release ({LOSS_RISE:g}x over its"
            f" first epoch, at most {LOSS_WINDOW} batches), it is undone and retried at {RETRY_SCALE:g} x the lr"
            f" above, as every later release; if, after a release, the loss over an epoch's last batches ends"
            f" {DIVERGED:g}x above the fit's first, the fit goes back to its lowest epoch and every release trains"
            f" on at {RETRY_SCALE:g} x."
        )
        if times is not None and times[0] == 0:
            table += (
                " The first release comes at the first step, with no loss before it: the first check cannot judge it,"
                " and the fit's first batches, which the second measures against, follow it."
            )
    if plan.frozen_params:
        table += f"\nNever released (stays frozen): {plan.frozen_params:,} parameters of {plan.backbone!r}."
    return table
