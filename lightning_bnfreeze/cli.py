"""LightningCLI configuration errors as one line naming the class, the argument, its value and the fix.

Under a plain ``LightningCLI``, a wrong value (``lr_scale: fast``) prints some 50 lines of usage and
``Does not validate against any of the Union subtypes``, the cause deep inside; a value a callback
rejects (``lr_scale: 0``) or a name that is not in the model (``backbone: backbon``) prints a
traceback of 50 to 80 lines with the message on its last one. :class:`ClearErrorsCLI` is a drop-in
``LightningCLI`` that prints one line instead, and exits with status 2 as argparse does::

    error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a number, got 'fast'.
    error: trainer.callbacks[0] (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a positive number, got 0.0.
    error: trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): no argument `lr_scal` (given 0.5); did you mean
    `lr_scale`?

followed by ``(set JSONARGPARSE_DEBUG=true for the traceback)``. :func:`parse_error` and
:func:`configuration_error` compute those lines, for CLIs that cannot change their base class.

The lines come from :mod:`lightning_bnfreeze.cli_parse_errors` (the parser's errors) and
:mod:`lightning_bnfreeze.cli_config_errors` (the library's errors about a configuration).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_bnfreeze.callbacks import BNFreezeCallback, GradualUnfreeze
from lightning_bnfreeze.callbacks.base import overrides_configure_model
from lightning_bnfreeze.cli_config_errors import configuration_error
from lightning_bnfreeze.cli_parse_errors import parse_error

__all__ = ["ClearErrorsCLI", "ClearErrorsParser", "check_against_model", "configuration_error", "parse_error"]

DEBUG_VARIABLE = "JSONARGPARSE_DEBUG"
"""Set to ``true`` for jsonargparse's full message and the traceback instead of the one line."""
DEBUG_HINT = f"(set {DEBUG_VARIABLE}=true for the traceback)"


class ClearErrorsParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose errors are one line (see :func:`parse_error`), without the usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        line = parse_error(message) if self.exit_on_error and not _debugging() else None
        if line is not None:
            _exit(line)
        super().error(message, ex)


class ClearErrorsCLI(LightningCLI):
    """A ``LightningCLI`` whose configuration errors are one line naming the class, the argument, its value and the fix.

    - A value of the wrong type, a missing or unknown argument, at any depth of the configuration
      (``trainer.callbacks``, their ``init_args``, objects inside those): the parser's error in one
      line (:func:`parse_error`; :class:`ClearErrorsParser` is the default ``parser_class``).
    - An error this library raises about a configuration, while a class is constructed
      (``lr_scale: 0``), when its callbacks meet the model (``backbone: backbon``, a module name of
      ``Schedule`` or ``modules`` that is not in the model: checked before the Trainer is built,
      unless the model builds layers in ``configure_model``), or during the run (a ``Plateau``
      whose ``monitor`` is never logged): ``<config key> (<class>): <its message>``
      (:func:`configuration_error`). Other errors keep their traceback.

    Each prints ``error: <line>`` and ``(set JSONARGPARSE_DEBUG=true for the traceback)`` on stderr
    and exits with status 2, as argparse does for bad arguments; with ``JSONARGPARSE_DEBUG=true``
    everything is as with ``LightningCLI``. Use it as it is, or subclass it as you would ``LightningCLI``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", ClearErrorsParser)
        try:
            super().__init__(*args, **kwargs)
        except (ValueError, TypeError, RuntimeError) as error:
            line = None if _debugging() else configuration_error(error, *self._configs())
            if line is None:
                raise
            _exit(line)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, once the library's callbacks of the configuration are checked against the model."""
        config = self._configs()[1]
        callbacks = config.get("trainer.callbacks") if isinstance(config, Namespace) else None
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            check_against_model(callback, self.model)
        return super().instantiate_trainer(**kwargs)

    def _configs(self) -> tuple[Namespace | None, Namespace | None]:
        """The parsed configuration and the instantiated one (of the subcommand if any), where they exist yet."""
        subcommand = getattr(self, "subcommand", None)
        configs = [getattr(self, name, None) for name in ("config", "config_init")]
        chosen = [config[subcommand] if subcommand and isinstance(config, Namespace) else config for config in configs]
        return chosen[0], chosen[1]


def check_against_model(callback: object, model: LightningModule) -> None:
    """Raise now the configuration errors one of the library's callbacks would raise at ``setup`` for ``model``.

    Nothing for other callbacks, or a model that builds layers in ``configure_model``.
    """
    if overrides_configure_model(model):
        return
    if isinstance(callback, GradualUnfreeze):
        callback.plan(model)
    elif isinstance(callback, BNFreezeCallback):
        callback.resolve(model)


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").lower() in ("true", "1", "yes")


def _exit(line: str) -> NoReturn:
    print(f"error: {line}\n{DEBUG_HINT}", file=sys.stderr)
    raise SystemExit(2)
