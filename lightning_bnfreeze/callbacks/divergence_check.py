"""A fit's divergence check: the training losses of each epoch's last batches against the fit's first
(:class:`~lightning_bnfreeze.divergence.LossDivergence`) and, once releases made the fit lose what it had learned, its
weights back as they were after its lowest epoch with every release at a tenth of its rate
(:class:`~lightning_bnfreeze.snapshot.TrainingSnapshot`), or one warning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_bnfreeze.callbacks.training_loss import loss_window, smaller_lr_scale
from lightning_bnfreeze.divergence import DIVERGED, EpochLoss, LossDivergence
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.loss_rise import RETRIES
from lightning_bnfreeze.norm import frozen_norm_buffers
from lightning_bnfreeze.release import Unfreezer
from lightning_bnfreeze.snapshot import TrainingSnapshot
from lightning_bnfreeze.tensor_copy import COPIES_DEVICE

__all__ = ["DivergenceCheck"]


class DivergenceCheck:
    """Judges each epoch at the next one's first batch (after its releases settled), or at the fit's end: its last
    batches' mean training loss (an epoch's, at most :data:`~lightning_bnfreeze.loss_rise.LOSS_WINDOW`) against the
    fit's first. An epoch at or above :data:`~lightning_bnfreeze.divergence.DIVERGED` times that, once a release
    trained, diverged: ``on_rise="retry"`` puts every weight and buffer back as the first batch after the lowest epoch
    found them (but the statistics of the norm layers frozen now), restarts the optimizer state, and trains on with
    every release at :data:`~lightning_bnfreeze.loss_rise.RETRY_SCALE` of its rate (the retries of the first release's
    loss check count: at most :data:`RETRIES` in all); ``"warn"``, the fit's end or no retry left warns, once.

    The copy of the lowest epoch is kept while a retry is left (``"retry"`` only): every weight and buffer, once more,
    in the CPU's memory (:data:`~lightning_bnfreeze.tensor_copy.COPIES_DEVICE`), dropped at the fit's end (a
    checkpoint saved after the fit holds none). The losses are rank 0's, and so the decisions: every rank takes them.
    A checkpoint keeps the losses and the copy.
    """

    def __init__(self, unfreezer: Unfreezer, on_rise: str = "retry") -> None:
        self.unfreezer = unfreezer
        self.on_rise = on_rise
        self._watch: LossDivergence | None = None  # from the first batch on: the window needs the trainer
        self._epoch: int | None = None  # the epoch whose losses are recorded
        self._snapshot: TrainingSnapshot | None = None
        self._lowest_epoch: int | None = None  # the epoch after which the snapshot was taken
        self._warned = False
        self._saved: Mapping[str, Any] | None = {}  # a checkpoint's state until the watch takes it (then None)
        self._off = False  # a fit resumed from a checkpoint without the fit's first losses (before 0.14)

    def record(self, trainer: pl.Trainer, loss: Tensor) -> None:
        """A batch's training loss (:func:`~lightning_bnfreeze.callbacks.training_loss.batch_loss`)."""
        if not self._off:
            self._watching(trainer).record(loss)

    def judge_epoch(self, trainer: pl.Trainer, may_judge: bool) -> bool:
        """At an epoch's first batch, the epoch before it: ``True`` if the fit went back to the lowest; else kept as
        the lowest if it is. Not judged while ``may_judge`` is ``False`` (the first release's watch is open)."""
        if self._off:
            return False
        watch = self._watching(trainer)
        if self._epoch is None or trainer.current_epoch == self._epoch:
            self._epoch = trainer.current_epoch
            return False
        ended_epoch, self._epoch = self._epoch, trainer.current_epoch
        ended = watch.epoch_ended()
        if not self._retries_left:
            self._snapshot = None  # no retry left to go back for
        if ended is None or not may_judge:
            return False
        # FSDP2: the parameters it trains, whatever forwards without backward (validation) left registered
        register_sharded_parameters(trainer.lightning_module)
        diverged = self.unfreezer.released_before(trainer.global_step) and ended.diverged
        diverged, lowest = trainer.strategy.broadcast((diverged, not diverged and watch.keep_if_lowest(ended)), src=0)
        if diverged:
            return self._went_back(trainer, ended, ended_epoch)
        if lowest and self._retries_left:
            self._snapshot = None  # its memory back before the next copy
            self._snapshot = TrainingSnapshot(
                trainer.lightning_module, trainer.optimizers, frozen=True, optimizer_state=False, device=COPIES_DEVICE
            )
            self._lowest_epoch = ended_epoch
        return False

    def forget(self, batches: int) -> None:
        """The last ``batches`` recorded were undone (the first release's retry)."""
        if self._watch is not None:
            self._watch.forget(batches)

    def close(self, trainer: pl.Trainer, may_judge: bool) -> None:
        """The fit's end: its last epoch judged (a divergence only warns), its losses kept for a checkpoint saved
        after the fit; not while ``may_judge`` is ``False`` (the first release's watch was open)."""
        ended = None if self._watch is None or self._off else self._watch.epoch()
        released = self.unfreezer.released_before(trainer.global_step)
        diverged = may_judge and ended is not None and released and ended.diverged
        if trainer.strategy.broadcast(diverged, src=0):
            assert ended is not None  # rank 0's, which the others do not need
            self._warn(_diverged(ended, self._epoch))

    def discard(self) -> None:
        """The snapshot's memory back (a fit that ends, or fails)."""
        self._snapshot = None

    def state_dict(self) -> dict[str, Any]:
        """The losses kept, the epoch they are of, whether it warned and the lowest epoch's copy (whole tensors: a
        collective under FSDP2); while off, that it is."""
        if self._off:
            return {"off": True}
        if self._watch is None:
            return dict(self._saved or {})
        snapshot = None if self._snapshot is None else self._snapshot.state_dict()
        return {
            "epoch": self._epoch,
            "lowest_epoch": self._lowest_epoch,
            "warned": self._warned,
            "snapshot": snapshot,
            **self._watch.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """A checkpoint's state; ``None`` for one saved before the check existed, whose fit it leaves unjudged (its
        first losses are gone)."""
        self._off = state is None or bool(state.get("off", False))
        self._saved = state or {}
        self._watch, self._snapshot = None, None
        self._epoch, self._lowest_epoch = self._saved.get("epoch"), self._saved.get("lowest_epoch")
        self._warned = bool(self._saved.get("warned", False))

    @property
    def _retries_left(self) -> bool:
        """Whether the fit may still go back (``"retry"``, and the retries shared with the first release's left)."""
        history = self.unfreezer.history
        return self.on_rise == "retry" and not (history and history[0].retries >= RETRIES)

    def _watching(self, trainer: pl.Trainer) -> LossDivergence:
        """The watch (made at the first batch, when the window is known), with a checkpoint's state."""
        if self._watch is None:
            self._watch = LossDivergence(loss_window(trainer))
            saved, self._saved = self._saved or {}, None  # the checkpoint's copy no longer held
            self._watch.load_state_dict(saved)
            if self._retries_left and saved.get("snapshot") is not None:
                self._snapshot = TrainingSnapshot.from_state_dict(
                    trainer.lightning_module, trainer.optimizers, saved["snapshot"], device=COPIES_DEVICE
                )
        return self._watch

    def _went_back(self, trainer: pl.Trainer, ended: EpochLoss, epoch: int) -> bool:
        """Every rank's decision on rank 0's diverged epoch ``ended``: back to the lowest (``True``), or a warning."""
        diverged = _diverged(ended, epoch)
        if self._snapshot is None or not self._retries_left:
            self._warn(diverged)
            return False
        self._snapshot.restore(keep=frozen_norm_buffers(trainer.lightning_module))
        self.unfreezer.slow_down(0)
        if not self._retries_left:
            self._snapshot = None
        rank_zero_warn(
            f"GradualUnfreeze: {diverged}: every weight and buffer is back as it was at the end of epoch"
            f" {self._lowest_epoch}, where the loss was lowest, the optimizer state starts afresh, and every release"
            f" trains on at a tenth of its rate (the first at {self.unfreezer.history[0].rates} x the head's)"
            " (on_loss_rise='retry')"
        )
        return True

    def _warn(self, diverged: str) -> None:
        if self._warned:
            return
        self._warned = True
        retries = self.unfreezer.history[0].retries
        rank_zero_warn(
            f"GradualUnfreeze: {diverged}: the released blocks' rates"
            + (f" (retried {retries} times)" if retries else "")
            + " may be more than the backbone can take: in the real-weights benchmark a pretrained transformer"
            f" diverged so at SGD 3e-2 (benchmarks/release_loss.md); {smaller_lr_scale(self.unfreezer, self.on_rise)}"
        )


def _diverged(ended: EpochLoss, epoch: int | None) -> str:
    return (
        f"the training loss diverged in epoch {epoch}: {ended.last:.4g} on average over its last {ended.batches}"
        f" batches against {ended.first:.4g} over the fit's first {ended.first_batches} ({ended.ratio:.2f}x, at least"
        f" {DIVERGED:g}x)"
    )
