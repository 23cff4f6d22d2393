"""The records of releases: what the history of a fit holds, and what a released part's first step said."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.step_size import AUTO_STEP, STOP_STEP

__all__ = ["FirstStepNote", "ReleaseRecord"]


@dataclass(frozen=True)
class ReleaseRecord:
    """A release done: which one of the plan, when, why, at which rates, and where its groups sit in the optimizer.

    ``step`` is the first optimizer step that trains it (``trainer.global_step`` at the release),
    ``epoch`` the epoch it happened in, ``reason`` what the trigger answered (``"scheduled"``,
    ``"plateau"``, ``"max_phase"``, ``"early_stopping"``, or a custom trigger's reason), ``value``
    the monitored metric's value (``None`` for a scheduled release), ``train_norms`` whether its
    norm layers train, ``lr_factors`` each part's learning rate relative to the head's, ``parts``
    their names (empty in older checkpoints, which kept none), ``retries`` how many times it and every later release
    were slowed down from it (a loss rise after it, or for the first, a divergence).
    """

    index: int
    epoch: int
    step: int
    reason: str
    positions: tuple[int, ...] = ()
    value: float | None = None
    metric: str | None = None
    train_norms: tuple[bool, ...] = ()
    lr_factors: tuple[float, ...] = ()
    parts: tuple[str, ...] = ()
    retries: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so that checkpoints load with ``torch.load(weights_only=True)``."""
        state = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in state.items()}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ReleaseRecord:
        fields: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value for key, value in state.items()
        }
        return cls(**fields)

    @property
    def rates(self) -> str:
        """Its parts' rates relative to the head's, in words: ``"0.1"``, ``"1 and 0.3"``."""
        return " and ".join(dict.fromkeys(f"{factor:.3g}" for factor in self.lr_factors))

    def when(self, unit: str) -> str:
        """When and why, in words: ``"epoch 3"``, ``"step 40 (epoch 2), val_loss stopped improving at 0.41"``."""
        when = f"epoch {self.epoch}" if unit == "epoch" else f"step {self.step} (epoch {self.epoch})"
        value = "" if self.value is None else f" at {self.value:.4g}"
        why = {
            "scheduled": "",
            "plateau": f", {self.metric} stopped improving{value}",
            "max_phase": f", the phase reached `max_phase` ({self.metric}{value})",
            "early_stopping": f", EarlyStopping on {self.metric} ran out of patience{value}: releasing instead",
        }
        return when + why.get(self.reason, f", {self.reason}{value}")


class FirstStepNote(NamedTuple):
    """What :meth:`Unfreezer.after_step` has to say about a released part's first step."""

    text: str
    warning: bool

    @classmethod
    def judge(cls, moved: str, bn: str, large: bool, capped: bool, trains: bool | None = None) -> FirstStepNote | None:
        """What to say of a first step (``moved``: what it did; ``large``: above :data:`AUTO_STEP`) under ``bn``
        (``""``: a backbone whose norm mode changes nothing; ``trains``: the mode ``bn="auto"`` decided, if it has): a
        mode the real-weights benchmark saw fail there, a capped rate."""
        if bn == "auto" and trains is False and large:
            advice = _failed("frozen statistics collapsed to chance", "`max_step='released'` or `bn='train'`")
            return cls(f"{moved} (> {AUTO_STEP:.1%}), faster than the first release, whose step kept frozen statistics"
                       f" (`bn='auto'`): {advice}", True)  # fmt: skip
        if bn == "frozen" and large:
            advice = _failed("frozen statistics collapsed to chance", "`bn='auto'` or a smaller `lr_scale`")
            return cls(f"{moved} (> {AUTO_STEP:.1%}) with `bn='frozen'`: {advice}", True)
        if bn == "train" and not large:
            advice = _failed("batch statistics fell below a linear probe", "`bn='auto'`")
            return cls(f"{moved} (< {AUTO_STEP:.1%}) with `bn='train'`: {advice}", True)
        return cls(moved, False) if capped else None

    @classmethod
    def decide(cls, moved: str, trains: bool, parts: int = 1) -> FirstStepNote:
        """What ``bn="auto"`` decided from the first release's first step (``moved``: the largest of its ``parts``
        parts')."""
        moved += f", the largest of its release's {parts}" if parts > 1 else ""
        if trains:
            text = (
                "norm layers train in every released block from now on, and in each later release until one moves less"
            )
            return cls(f"{moved} (> {AUTO_STEP:.1%}): {text}", False)
        return cls(f"{moved} (< {AUTO_STEP:.1%}): norm layers keep frozen statistics in every released block", False)

    @classmethod
    def stop(cls, moved: str) -> FirstStepNote:
        """What ``bn="auto"`` says when a slow release stops batch statistics (``moved``: its largest part's step)."""
        return cls(
            f"{moved} (< {STOP_STEP:.1%}): its norm layers and every later release's keep frozen statistics", False
        )

    @classmethod
    def earlier_start(cls, shift: float, step: float, unit: str, every: int) -> FirstStepNote:
        """What did better than the head alone first (``ours:first=0``) on the real-weights benchmark, far from the
        source (``shift``) when the first release's first step (``step``) was fast, for an ``Every(...)`` trigger."""
        return cls(
            f"far from the source ({shift:.2f} >= {NEAR_SOURCE}), the first release's first step moved its weights by"
            f" {step:.2%} (> {AUTO_STEP:.1%}): at such rates releasing from the first step, with no {unit} of the head"
            f" alone (`when=Every({unit}s={every}, first=0)`), did better in most such settings of the real-weights"
            " benchmark (benchmarks/transfer_real.md)",
            False,
        )


def _failed(what: str, fix: str) -> str:
    return f"at such steps {what} on the real-weights benchmark (benchmarks/transfer_real.md); use {fix}"
