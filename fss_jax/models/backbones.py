"""Registry entries for the backbones on their own (ImageNet weight conversion, fixtures).

* ``resnet_torchvision``: torchvision ``resnet50/101`` with its fc head (the
  ``backbone_torchvision_resnet50`` fixtures).
* ``resnet_sccan``: SCCAN's deep-stem, frozen-BN, torchvision-dilated ResNet
  (``initmodel/resnet50_v2.pth``; the ``backbone_sccan_resnet50`` fixtures, keys
  prefixed ``backbone.body.``).
* ``resnet_deep_stem``: the PSPNet-dilated deep-stem ResNet (BAM / HDMNet /
  PAHNet / Sym-Net); its fixture (with PPM and classifier) is run as
  ``pspnet_backbone`` (fss_jax/models/pspnet.py).

Every spec's ``make_model`` and ``keymap`` take the same keyword fields; the
``prefix`` field is the source-key prefix of the state dict (e.g.
``backbone.body.``) and only matters to the key map. ``--model-arg`` of
``python -m checkpoints.convert`` sets them.
"""

from __future__ import annotations

from fss_jax.models.registry import ModelSpec
from fss_jax.nn.backbones import resnet, vgg

# -- resnet_torchvision -----------------------------------------------------------------------


def make_torchvision(
  depth: int = 50,
  include_head: bool = True,
  num_classes: int = 1000,
  frozen: bool = True,
  prefix: str = "",
):
  """torchvision resnet{depth}; input [B, H, W, 3]."""
  return resnet.ResNetTorchvision(
    depth=depth, include_head=include_head, num_classes=num_classes, frozen=frozen
  )


def keymap_torchvision(
  depth: int = 50,
  include_head: bool = True,
  num_classes: int = 1000,
  frozen: bool = True,
  prefix: str = "",
) -> list:
  return resnet.resnet_keymap(
    depth=depth, stem="torchvision", include_head=include_head, prefix=prefix
  )


# -- resnet_sccan -----------------------------------------------------------------------------


def make_sccan(depth: int = 50, frozen: bool = True, prefix: str = ""):
  """SCCAN's backbone (model/backbone_utils.Backbone); input [B, H, W, 3]."""
  return resnet.ResNetSCCAN(depth=depth, frozen=frozen)


def keymap_sccan(depth: int = 50, frozen: bool = True, prefix: str = "") -> list:
  return resnet.resnet_keymap(depth=depth, stem="deep", naming="resnet_v2", prefix=prefix)


# -- resnet_deep_stem -------------------------------------------------------------------------


def make_deep_stem(
  depth: int = 50,
  num_stages: int = 4,
  frozen: bool = True,
  naming: str = "resnet_v2",
  prefix: str = "",
):
  """PSPNet-style deep-stem ResNet (dilation 2/4 in all layer3/layer4 blocks)."""
  return resnet.ResNetDeepStem(depth=depth, num_stages=num_stages, frozen=frozen)


def keymap_deep_stem(
  depth: int = 50,
  num_stages: int = 4,
  frozen: bool = True,
  naming: str = "resnet_v2",
  prefix: str = "",
) -> list:
  """naming: "resnet_v2" (ImageNet resnet50_v2.pth: conv1..bn3) or "pspnet" (layer0.N)."""
  return resnet.resnet_keymap(
    depth=depth,
    num_stages=num_stages,
    stem="deep",
    naming=naming,
    ignore_extra_stages=True,
    prefix=prefix,
  )


SPECS = {
  # min_input_size: one full cell of the deepest features (output stride 32 / 8 / 8 / 8).
  "resnet_torchvision": ModelSpec(
    "resnet_torchvision",
    make_torchvision,
    keymap_torchvision,
    min_input_size=32,
  ),
  "resnet_sccan": ModelSpec("resnet_sccan", make_sccan, keymap_sccan, min_input_size=8),
  "resnet_deep_stem": ModelSpec(
    "resnet_deep_stem", make_deep_stem, keymap_deep_stem, min_input_size=8
  ),
  # PANet's VGG-16 encoder alone (ImageNet torchvision `vgg16` weights by default).
  "vgg16_panet": ModelSpec("vgg16_panet", vgg.make_encoder, vgg.encoder_keymap, min_input_size=8),
}
