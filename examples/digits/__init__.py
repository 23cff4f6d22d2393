"""Transfer learning on scikit-learn's bundled UCI digits, with frozen BatchNorm and gradual unfreezing.

A small ResNet-style CNN is pretrained on digits 0-4 (the source task, cached on disk), then
fine-tuned on digits 5-9 (the target task) from a few labelled images per class, optionally under
a distribution shift of the target images. Run from the repository root::

    python -m examples.digits                      # the main job: gradual unfreezing, then a test
    python -m examples.digits fit --config examples/configs/linear_probe.yaml

Modules: :mod:`.data` (the data module), :mod:`.backbone` (the CNN and its pretraining),
:mod:`.imagenet` (EfficientNet-Lite with real ImageNet weights, and ImageNet inputs),
:mod:`.model` (the LightningModule), :mod:`.plot` (the learning-rate/release/accuracy plot),
:mod:`.cli` (the LightningCLI application and its final summary).
"""

from examples.digits.backbone import DigitsResNet, pretrained_backbone
from examples.digits.data import DigitsTransfer
from examples.digits.model import DigitsClassifier
from examples.digits.plot import SchedulePlot

__all__ = ["DigitsClassifier", "DigitsResNet", "DigitsTransfer", "SchedulePlot", "pretrained_backbone"]
