"""A checkpoint's releases against the configuration that resumes them: what is refused, what only warns.

Checked before anything is restored, so that a refused checkpoint leaves the fit as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_bnfreeze.plan import ReleasePlan
from lightning_bnfreeze.record import ReleaseRecord

__all__ = ["changed_rate", "check_saved_releases"]


def check_saved_releases(history: Sequence[ReleaseRecord], plan: ReleasePlan, bn: str, saved_bn: str) -> None:
    """Refuse releases that ``plan`` under ``bn`` would not have made.

    Raises:
        ValueError: more releases than the plan has, a release of other parts, or releases made under another
            ``bn`` (a norm policy does not change halfway: ``"auto"``'s decision is its state).
    """
    if history and saved_bn != bn:
        raise ValueError(
            f"GradualUnfreeze: the checkpoint's releases ran with bn={saved_bn!r}, this callback has"
            f" bn={bn!r}: resume with bn={saved_bn!r}."
        )
    if len(history) > len(plan.releases):
        raise ValueError(
            f"GradualUnfreeze: the checkpoint holds {len(history)} releases, but the plan has"
            f" {len(plan.releases)}: resume with the configuration the checkpoint was saved with."
        )
    for record, parts in zip(history, plan.releases, strict=False):
        names = tuple(part.name for part in parts)  # an older checkpoint kept no names: its sizes alone are checked
        if len(record.lr_factors) != len(parts) or record.parts not in ((), names):
            freed = f" ({', '.join(record.parts)})" if record.parts else ""
            raise ValueError(
                f"GradualUnfreeze: the checkpoint's release {record.index} freed {len(record.lr_factors)}"
                f" part(s){freed}, but the plan's release {record.index} frees {len(parts)} ({', '.join(names)}):"
                " resume with the `what` and `when` the checkpoint was saved with."
            )


def changed_rate(state: Mapping[str, Any], lr_scale: float) -> str | None:
    """A line on a checkpoint whose releases ran at another ``lr_scale``: they keep their saved rates, later
    releases take this one (``None``: the same, no release yet, or a checkpoint that does not hold it)."""
    saved = state.get("settings", {}).get("lr_scale")
    if saved is None or saved == lr_scale or not state.get("history"):
        return None
    return (
        f"GradualUnfreeze: the checkpoint was saved with lr_scale={saved!r}, this callback has"
        f" lr_scale={lr_scale!r}: the parts it released keep the rates it saved; later releases take"
        f" {lr_scale!r}."
    )
