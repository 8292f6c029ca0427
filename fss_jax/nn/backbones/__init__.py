"""Backbones: one ResNet with its variants (resnet.py), PANet's VGG-16 (vgg.py).

Registry entries for the backbones alone (weight conversion, parity) are models-layer
code: fss_jax/models/backbones.py.
"""

from fss_jax.nn.backbones.resnet import (
  ResNet,
  ResNetDeepStem,
  ResNetSCCAN,
  ResNetSSP,
  ResNetTorchvision,
  resnet_keymap,
)

__all__ = [
  "ResNet",
  "ResNetDeepStem",
  "ResNetSCCAN",
  "ResNetSSP",
  "ResNetTorchvision",
  "resnet_keymap",
]
