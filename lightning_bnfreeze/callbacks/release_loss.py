"""The first release's loss check in a fit: the training losses of the step outputs around it
(:class:`~lightning_bnfreeze.loss_rise.LossRise`) and, if they rose, the release undone and retried at a tenth of its
rate (:class:`~lightning_bnfreeze.snapshot.TrainingSnapshot`), or one warning.

Only the first release is judged: over every release of the default fit in the transfer benchmarks
(``benchmarks/release_loss.md``), the loss rose after the first release only where the pretrained transformer
collapsed at AdamW 3e-3; after later releases it rose up to 1.58 times in runs that ended well, and 1.73 and 3.29 times
in two of the transformer's three collapses at SGD 3e-2, whose first release it did not rise after."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_bnfreeze.callbacks.training_loss import loss_window, smaller_lr_scale
from lightning_bnfreeze.loss_rise import RETRIES, LossRise, Rise
from lightning_bnfreeze.norm import frozen_norm_buffers
from lightning_bnfreeze.record import ReleaseRecord
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.snapshot import TrainingSnapshot
from lightning_bnfreeze.tensor_copy import COPIES_DEVICE

__all__ = ["UNJUDGED_AT_FIRST_STEP", "ReleaseLossCheck"]

UNJUDGED_AT_FIRST_STEP = (
    "GradualUnfreeze: release 0 came at the fit's first step, with no training loss before it: the loss check cannot"
    " judge it, and the divergence check measures every epoch against the batches after it (a collapse to chance, at"
    " about a new head's first loss, shows no rise there: so fits released at the first step collapsed unseen on the"
    " pretrained transformer at large rates, benchmarks/transfer_minilm.md); an epoch of the head alone first"
    " (when=Every(first=1), the default) lets both judge"
)
"""The warning of a first release before any batch (``when=Every(first=0)``, ``At([0])``, ``LayerDecay`` from the
first step)."""


class ReleaseLossCheck:
    """Watches the training loss over the first batches after ``unfreezer``'s first release (an epoch's, at most
    :data:`~lightning_bnfreeze.loss_rise.LOSS_WINDOW`) against as many before it. If it rose, ``on_rise="retry"``
    puts the weights, buffers and optimizer state back as they were at the release's first step (but the statistics
    of the norm layers frozen then: only the library's own decisions changed those) and trains on with the release
    and every later one at :data:`~lightning_bnfreeze.loss_rise.RETRY_SCALE` of their rates, watching the retry as
    the release (at most :data:`RETRIES` retries); ``"warn"`` (or a rise that cannot be undone) warns.

    The losses are rank 0's, and so the decision: every rank takes it. A release at a later step that comes before
    the watch ends judges it with the batches it saw, and only warns (the later release is under way); so does the
    fit's end. A checkpoint keeps the losses, the watch and its snapshot (while the watch is open).
    """

    def __init__(self, unfreezer: Unfreezer, on_rise: str = "retry") -> None:
        self.unfreezer = unfreezer
        self.on_rise = on_rise
        self._watch: LossRise | None = None  # from the first batch or release on: the window needs the trainer
        self._saved: Mapping[str, Any] | None = None  # a checkpoint's watch, until the trainer is known
        self._snapshot: TrainingSnapshot | None = None
        self._snapshot_due = False  # taken at the first release's first step

    @property
    def watching(self) -> bool:
        """Whether the first release's watch is open."""
        return self._watch is not None and self._watch.watching

    def record(self, trainer: pl.Trainer, loss: Tensor) -> int:
        """A batch's training loss (:func:`~lightning_bnfreeze.callbacks.training_loss.batch_loss`; on its device:
        read only when judged); how many batches were undone with the first release (0: none)."""
        rise = self._watching(trainer).record(loss)
        if rise is None or not self._judged(trainer, rise, may_retry=True):
            return 0
        return rise.after_batches

    def released(self, trainer: pl.Trainer, record: ReleaseRecord) -> None:
        """A release: the first starts the watch (it covers the releases at its step); a later one ends it if still
        open (a rise then only warns)."""
        watch = self._watching(trainer)
        if record.index == 0:
            watch.released()
            self._snapshot_due = self.on_rise == "retry" and watch.watching
            if record.step == 0 and not watch.watching:
                rank_zero_warn(UNJUDGED_AT_FIRST_STEP)
        elif watch.watching and record.step > self.unfreezer.history[0].step:
            self._judged(trainer, watch.judge(), may_retry=False)

    def before_step(self, trainer: pl.Trainer) -> None:
        """Before the first release's first step (its norm layers settled): the snapshot it may go back to."""
        if self._snapshot_due:
            self._snapshot = TrainingSnapshot(trainer.lightning_module, trainer.optimizers, device=COPIES_DEVICE)
            self._snapshot_due = False

    def close(self, trainer: pl.Trainer) -> None:
        """The fit's end: a watch still open is judged on the batches it saw (a rise only warns)."""
        if self._watch is not None and self._watch.watching:
            self._judged(trainer, self._watch.judge(), may_retry=False)

    def discard(self) -> None:
        """The snapshot's memory back (a fit that ends, or fails)."""
        self._snapshot, self._snapshot_due = None, False

    def state_dict(self) -> dict[str, Any]:
        """The losses kept and, while the watch is open, its snapshot (whole tensors: a collective under FSDP2)."""
        if self._watch is None:
            return dict(self._saved or {})
        snapshot = None if self._snapshot is None else self._snapshot.state_dict()
        return {"snapshot_due": self._snapshot_due, "snapshot": snapshot, **self._watch.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._saved = state
        self._snapshot_due = self.on_rise == "retry" and bool(state.get("snapshot_due", False))
        self._watch, self._snapshot = None, None

    def _watching(self, trainer: pl.Trainer) -> LossRise:
        """The watch (made at the first batch or release, when the window is known), with a checkpoint's state."""
        if self._watch is None:
            self._watch = LossRise(loss_window(trainer))
            saved, self._saved = self._saved or {}, None  # the checkpoint's copy no longer held
            self._watch.load_state_dict(saved)
            if self.on_rise == "retry" and saved.get("snapshot") is not None:
                self._snapshot = TrainingSnapshot.from_state_dict(
                    trainer.lightning_module, trainer.optimizers, saved["snapshot"], device=COPIES_DEVICE
                )
        return self._watch

    def _judged(self, trainer: pl.Trainer, rise: Rise | None, may_retry: bool) -> bool:
        """Rank 0's ``rise``, every rank's decision: the release undone (``True``) or a warning, if it rose."""
        snapshot, self._snapshot = self._snapshot, None
        rose = rise is not None and rise.rose
        if not trainer.strategy.broadcast(rose, src=0):
            return False
        assert rise is not None  # rank 0's, which the others do not need
        record = self.unfreezer.history[0]
        rose_after = f"GradualUnfreeze: {_rose(self.unfreezer, record, rise)}"
        if not (may_retry and snapshot is not None and record.retries < RETRIES):
            rank_zero_warn(f"{rose_after}: {self._advice(record)}")
            return False
        # frozen norm layers' statistics: only the library's decisions (AdaBN, the source's back) changed them
        snapshot.restore(keep=frozen_norm_buffers(trainer.lightning_module))
        self.unfreezer.slow_down(0)
        assert self._watch is not None
        self._watch.retry()
        if self.unfreezer.history[0].retries < RETRIES:  # else no retry is left to go back for
            self._snapshot = snapshot
        rank_zero_warn(f"{rose_after}: {_retried(self.unfreezer)}")
        return True

    def _advice(self, record: ReleaseRecord) -> str:
        retried = f" (retried {record.retries} times)" if record.retries else ""
        return (
            f"its rate{retried} may be more than the backbone can take: in the real-weights benchmark a pretrained"
            " transformer collapsed so at the head's rate (benchmarks/transfer_minilm.md); "
            + smaller_lr_scale(self.unfreezer, self.on_rise)
        )


def _rose(unfreezer: Unfreezer, record: ReleaseRecord, rise: Rise) -> str:
    return (
        f"the training loss rose after release {record.index} ({record.when(unfreezer.trigger.unit)},"
        f" {record.rates} x the head's rate): {rise.after:.4g} on average over its first {rise.after_batches}"
        f" batches against {rise.before:.4g} over the {rise.before_batches} before it ({rise.ratio:.2f}x)"
    )


def _retried(unfreezer: Unfreezer) -> str:
    return (
        "its weights, buffers and optimizer state are back as they were at the release, which trains on at a tenth"
        f" of its rate ({unfreezer.history[0].rates} x the head's), as every later release (on_loss_rise='retry')"
    )
