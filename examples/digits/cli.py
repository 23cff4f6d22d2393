"""The LightningCLI application: ``fit`` (then a test on held-out target images and a summary), ``validate``, ``test``.

Run from the repository root::

    python -m examples.digits                       # = fit --config examples/configs/gradual_unfreeze.yaml
    python -m examples.digits fit --config examples/configs/linear_probe.yaml --data.shift=contrast
    python -m examples.digits fit --help
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from examples.digits.data import DigitsTransfer
from examples.digits.model import DigitsClassifier
from examples.digits.plot import SchedulePlot
from lightning_bnfreeze.cli import ClearErrorsCLI

__all__ = ["DEFAULT_CONFIG", "DigitsCLI", "main"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gradual_unfreeze.yaml"
"""The main job's config: gradual unfreezing of the pretrained digits backbone."""


class DigitsCLI(ClearErrorsCLI):
    """LightningCLI whose ``fit`` ends with a test on the held-out target images and a printed summary.

    The test result is kept in :attr:`test_results` (``trainer.test``'s list of metric dicts). A
    configuration error (``lr_scale: 0``, an unknown ``init_args`` key) is one line naming the
    argument and its value (see :class:`~lightning_bnfreeze.cli.ClearErrorsCLI`).
    """

    test_results: list[Mapping[str, float]] | None = None

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        self.test_results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self.trainer.print(self.summary())

    def summary(self) -> str:
        """The final summary: the task, the held-out accuracy, where the plot and the metrics are."""
        trainer, data = self.trainer, self.datamodule
        rows: list[tuple[str, str]] = []
        if isinstance(data, DigitsTransfer) and data.train_set is not None and data.test_set is not None:
            task = f"digits 5-9, {data.k_per_class} labelled images per class, shift {data.shift!r}"
            rows.append(("target task", task))
            held_out = f" on {len(data.test_set)} held-out target images"
        else:
            held_out = ""
        accuracy = self.test_results[0].get("test_acc") if self.test_results else None
        rows.append(("test accuracy", "n/a" if accuracy is None else f"{accuracy:.1%}{held_out}"))
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        rows += [("plot", str(cb.path)) for cb in callbacks if isinstance(cb, SchedulePlot) and cb.path is not None]
        if trainer.log_dir is not None and (Path(trainer.log_dir) / "metrics.csv").is_file():
            rows.append(("metrics", str(Path(trainer.log_dir) / "metrics.csv")))
        name = trainer.logger.name if trainer.logger is not None else "run"
        width = max(len(label) for label, _ in rows)
        return "\n".join([f"\n{f' Summary: {name} ':=^80}", *(f"{k:<{width}}  {v}" for k, v in rows), "=" * 80])


def main(args: list[str] | None = None) -> DigitsCLI:
    """Run the application on ``args`` (default: the command line); with none, the main job.

    The main job is ``fit --config examples/configs/gradual_unfreeze.yaml``: pretraining on digits
    0-4 if the backbone is not cached yet, gradual unfreezing on digits 5-9, and a test.
    """
    if not (sys.argv[1:] if args is None else args):
        args = ["fit", "--config", str(DEFAULT_CONFIG)]
    # The data are in-memory tensors: worker processes would only slow the loaders down.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # The digits network is tiny: one intra-op thread beats several, which spend their time
    # synchronising (many times slower when other processes share the cores). OMP_NUM_THREADS
    # overrides this, e.g. OMP_NUM_THREADS=2 for a larger torchvision backbone.
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        return DigitsCLI(DigitsClassifier, DigitsTransfer, subclass_mode_model=True, subclass_mode_data=True, args=args)
    finally:
        torch.set_num_threads(threads)
