r"""
BatchNorm Freeze
================

Keeps frozen norm layers in inference mode, with untouched statistics, in every training forward.

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_bnfreeze.adapt import AdaBN
from lightning_bnfreeze.callbacks.adaptation import TrainDataAdaptation
from lightning_bnfreeze.callbacks.base import NormFreezingCallback, after_configure_model
from lightning_bnfreeze.checks import check_bool
from lightning_bnfreeze.freezer import KerasFreezer, NormFreezer, norm_layer_names, set_requires_grad
from lightning_bnfreeze.fsdp import register_sharded_parameters
from lightning_bnfreeze.internals import callback_state_key
from lightning_bnfreeze.names import as_name_list, resolve_names
from lightning_bnfreeze.norm import is_norm_frozen, named_norm_layers
from lightning_bnfreeze.step_size import AUTO_STEP, FirstStep, momentum_of

__all__ = ["BNFreezeCallback"]


class BNFreezeCallback(NormFreezingCallback):
    r"""Freeze norm layers the way Keras does: frozen means inference mode, statistics untouched.

    A frozen norm layer normalises with its running statistics in every training forward, whoever
    called ``.train()``, and keeps ``running_mean``, ``running_var`` and ``num_batches_tracked``
    bitwise unchanged. It stays the same module object: nothing is swapped or converted. Covered:
    every ``_BatchNorm`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, Lazy variants, subclasses) and
    InstanceNorm with ``track_running_stats=True``. Other layers behave as without the callback.

    Args:
        modules: ``None`` (default) for Keras semantics: a norm layer is frozen exactly when all its
            own parameters have ``requires_grad=False`` (one without parameters follows its nearest
            ancestor that has some), re-evaluated before every training step, so it composes with
            any way of freezing. Or a module name, glob or list of them (``"backbone"``,
            ``["backbone.layer*"]``, relative to the LightningModule): every norm layer inside is
            frozen, affine parameters included; the modules' other parameters are left alone.
        train_affine: with ``modules`` given, freeze the statistics but let ``weight`` and ``bias``
            train (Keras' fine-tuning recipe after unfreezing).
        adapt: re-estimate the frozen layers' statistics on the training data before the first step,
            then keep them frozen (:class:`~lightning_bnfreeze.AdaBN`, blended with a source prior);
            ``None`` (default): keep the statistics the model has. A batch reaches the model through
            ``pl_module.adapt_norm_step(batch)`` if defined, else ``pl_module(batch[0])`` for a tuple
            or list batch, ``pl_module(batch)`` otherwise. A resumed run keeps its checkpoint's.

    Raises:
        ValueError: ``train_affine=True`` without ``modules``, or (at ``setup``, before training)
            a name or glob that matches no module; the message lists the closest names.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bnfreeze import BNFreezeCallback
        >>> trainer = Trainer(callbacks=[BNFreezeCallback(modules="backbone")])

    The layers are frozen from ``on_train_start`` and released at ``teardown``, taking their
    parent's mode again; parameters keep the ``requires_grad`` they have then.
    """

    def __init__(
        self,
        modules: str | Sequence[str] | None = None,
        train_affine: bool = False,
        adapt: AdaBN | None = None,
    ) -> None:
        check_bool("train_affine", train_affine)
        if modules is None and train_affine:
            raise ValueError(
                "`train_affine=True` needs `modules`: with `modules=None` a norm layer is frozen because its"
                " affine parameters are, so they cannot train. Name the modules whose statistics to freeze."
            )
        self.modules = None if modules is None else as_name_list(modules, "modules")
        self.train_affine = train_affine
        self._adaptation = TrainDataAdaptation(adapt, "BNFreezeCallback")
        self._module_names: list[str] = []
        self._keras: KerasFreezer | None = None
        self._first_step: tuple[FirstStep, int, float] | None = None

    @property
    def frozen_layers(self) -> list[str]:
        """Names of the norm layers frozen now."""
        return list(self._freezer.frozen) if self._freezer is not None else []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)
        self._adaptation.reset()  # a checkpoint's state, loaded after `setup`, may say otherwise
        after_configure_model(pl_module, lambda: self._resolve(pl_module))

    def resolve(self, pl_module: nn.Module) -> list[str]:
        """The modules of ``pl_module`` that ``modules`` names (none with ``modules=None``), checked against the model.

        Raises:
            ValueError: a name or glob that matches no module (with the closest names).
        """
        if self.modules is None:
            return []
        return [name for names in resolve_names(pl_module, self.modules, "modules").values() for name in names]

    def _resolve(self, pl_module: pl.LightningModule) -> None:
        if self.modules is None:
            if next(named_norm_layers(pl_module), None) is None:
                rank_zero_warn("BNFreezeCallback: the model has no BatchNorm or tracking InstanceNorm layer to freeze.")
            return
        self._module_names = self.resolve(pl_module)
        layers = norm_layer_names(pl_module, self._module_names)
        if not layers:
            rank_zero_warn(f"BNFreezeCallback: no BatchNorm or tracking InstanceNorm layer inside {self.modules}.")
        for name in layers:
            set_requires_grad(pl_module.get_submodule(name).parameters(), self.train_affine)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Frozen here, after the strategy set up the model (SyncBatchNorm conversion swaps modules)
        # and after Lightning's check for modules in eval mode, which our layers must not trip.
        register_sharded_parameters(pl_module)  # FSDP2: the parameters it trains, whose `requires_grad` counts
        self._freezer = NormFreezer(pl_module, holder=self)
        if self.modules is None:
            self._keras = KerasFreezer(self._freezer)
            self._update()
        else:
            self._freezer.freeze(norm_layer_names(pl_module, self._module_names), freeze_affine=not self.train_affine)
            rank_zero_info(f"BNFreezeCallback: {len(self._freezer.frozen)} norm layer(s) frozen in inference mode.")
        self._adaptation.run_once(trainer, pl_module, self._freezer.layers)
        self.remember_statistics()
        self._watch_first_step(trainer, pl_module)

    def _watch_first_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``modules``: watch how far the first step moves their trainable weights (``on_train_batch_end``)."""
        modules = [pl_module.get_submodule(name) for name in self._module_names]
        weights = [p for module in modules for p in module.parameters() if p.requires_grad]
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        ids = {id(p) for p in weights}
        group = next((g for g in groups if any(id(q) in ids for q in g["params"])), None)
        if weights and group is not None:
            self._first_step = FirstStep(weights), trainer.global_step, momentum_of(group)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._first_step is None or trainer.global_step == self._first_step[1]:
            return
        probe, _, momentum = self._first_step
        self._first_step = None
        change = probe.change(momentum)
        if change > AUTO_STEP:
            rank_zero_warn(
                f"BNFreezeCallback: the first step moved the trainable weights of {self.modules} by {change:.2%}"
                f" (> {AUTO_STEP:.1%}) around norm layers whose statistics stay frozen: at such steps frozen statistics"
                " collapsed to chance on the real-weights benchmark (benchmarks/transfer_real.md). Lower their learning"
                " rate, or freeze them and release them with `GradualUnfreeze()` (`bn='auto'`)."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._keras is not None:
            self._update()
        elif self._freezer is not None:
            self._freezer.enforce()

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, modules=self.modules)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._adaptation.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._adaptation.load_state_dict(state_dict)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._keras = None
        self._first_step = None

    def _update(self) -> None:
        assert self._keras is not None
        frozen, released = self._keras.update()
        if frozen or released:
            self.remember_statistics()
            root = self._keras.freezer.root
            held = sum(is_norm_frozen(root.get_submodule(name)) for name in released)
            others = f" ({held} of them still frozen by another callback: GradualUnfreeze's `bn`?)" if held else ""
            rank_zero_info(
                f"BNFreezeCallback: {len(frozen)} norm layer(s) frozen, {len(released)} released{others};"
                f" {len(self._keras.freezer.frozen)} frozen by it in all, as their parameters' `requires_grad` says."
            )
