"""Print the release schedule of each GradualUnfreeze in a LightningCLI config, without training.

Usage (any LightningCLI arguments; the model comes from the config's ``model.class_path`` or
``--model path.to.Module``)::

    python -m lightning_bnfreeze.dry_run --config config.yaml
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_bnfreeze.callbacks.gradual_unfreeze import GradualUnfreeze

__all__ = ["main"]


def main(args: list[str] | None = None) -> str:
    """Build the model and trainer of a LightningCLI config and return each GradualUnfreeze's plan."""
    cli = LightningCLI(args=args, run=False, save_config_callback=None, auto_configure_optimizers=False)
    configured = cli.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    callbacks = [callback for callback in configured if isinstance(callback, GradualUnfreeze)]
    if not callbacks:
        raise SystemExit("dry_run: the configuration has no GradualUnfreeze in `trainer.callbacks`.")
    max_epochs = cli.trainer.max_epochs if cli.trainer.max_epochs is not None else -1
    tables = [
        f"GradualUnfreeze(backbone={callback.backbone!r}):\n{callback.dry_run(cli.model, max_epochs)}"
        for callback in callbacks
    ]
    return "\n\n".join(tables)


if __name__ == "__main__":
    print(main())
