"""Registry entries for the backbones on their own (ImageNet weight conversion, parity).

* ``resnet_torchvision``: torchvision ``resnet50/101`` with its fc head;
  parity with the ``backbone_torchvision_resnet50`` fixtures.
* ``resnet_sccan``: SCCAN's deep-stem, frozen-BN, torchvision-dilated ResNet
  (``initmodel/resnet50_v2.pth``); parity with the ``backbone_sccan_resnet50``
  fixtures (keys prefixed ``backbone.body.``).
* ``resnet_deep_stem``: the PSPNet-dilated deep-stem ResNet (BAM / HDMNet /
  PAHNet / Sym-Net); its fixture (with PPM and classifier) is run by
  ``pspnet_backbone`` in fss_jax/models/pspnet.py.

Every spec's ``make_model`` and ``keymap`` take the same keyword fields; the
``prefix`` field is the source-key prefix of the state dict (e.g.
``backbone.body.``) and only matters to the key map. ``--model-arg`` of
``python -m checkpoints.convert`` sets them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from fss_jax.models.registry import ModelSpec, ParityAdapter
from fss_jax.nn.backbones import resnet, vgg

# -- helpers shared by the adapters ------------------------------------------------------------


def _state_keys(meta: Mapping[str, Any]) -> list[str]:
  return [e["key"] for e in meta["state_dict"]["keys"]]


def _stem_prefix(keys) -> str:
  """Prefix in front of the stem's ``conv1.weight`` (e.g. "backbone.body.")."""
  for k in keys:
    if k.endswith("conv1.weight") and "layer" not in k:
      return k[: -len("conv1.weight")]
  raise ValueError("no stem conv1.weight among the state-dict keys")


def _image_input(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]):
  """in_img [B, 3, H, W] -> [B, H, W, 3] float32."""
  return jnp.asarray(np.transpose(arrays["in_img"], (0, 2, 3, 1)).astype(np.float32))


def _nchw(x) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _stage_outputs(out, kind: str, num_stages: int) -> dict:
  d = {f"{kind}_layer{i}": _nchw(out[f"layer{i}"]) for i in range(1, num_stages + 1)}
  d["mid_stem"] = _nchw(out["layer0"])
  return d


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


def _torchvision_fields(meta: Mapping[str, Any]) -> dict:
  keys = _state_keys(meta)
  prefix = _stem_prefix(keys)
  depth, _ = resnet.depth_from_keys(keys, prefix)
  fields = dict(depth=depth, include_head=f"{prefix}fc.weight" in keys, prefix=prefix)
  for e in meta["state_dict"]["keys"]:
    if e["key"] == f"{prefix}fc.weight":
      fields["num_classes"] = int(e["shape"][0])
  return fields


def _torchvision_outputs(out, meta: Mapping[str, Any]) -> dict:
  d = _stage_outputs(out, "mid", 4)
  if "logits" in out:
    d["out_logits"] = np.asarray(out["logits"])
    d["mid_avgpool"] = np.asarray(out["pooled"])[:, :, None, None]
  return d


TORCHVISION_PARITY = ParityAdapter(
  model_classes=tuple(f"torchvision.models.resnet.ResNet (resnet{d})" for d in resnet.STAGE_SIZES),
  model_fields=_torchvision_fields,
  inputs=_image_input,
  outputs=_torchvision_outputs,
  logit_outputs=("out_logits",),
)


# -- resnet_sccan -----------------------------------------------------------------------------


def make_sccan(depth: int = 50, frozen: bool = True, prefix: str = ""):
  """SCCAN's backbone (model/backbone_utils.Backbone); input [B, H, W, 3]."""
  return resnet.ResNetSCCAN(depth=depth, frozen=frozen)


def keymap_sccan(depth: int = 50, frozen: bool = True, prefix: str = "") -> list:
  return resnet.resnet_keymap(depth=depth, stem="deep", naming="resnet_v2", prefix=prefix)


def _sccan_fields(meta: Mapping[str, Any]) -> dict:
  keys = _state_keys(meta)
  prefix = _stem_prefix(keys)
  depth, _ = resnet.depth_from_keys(keys, prefix)
  return dict(depth=depth, prefix=prefix)


SCCAN_PARITY = ParityAdapter(
  model_classes=("model.backbone_utils.Backbone",),
  model_fields=_sccan_fields,
  inputs=_image_input,
  outputs=lambda out, meta: _stage_outputs(out, "out", 4),
)


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
    parity=TORCHVISION_PARITY,
    min_input_size=32,
  ),
  "resnet_sccan": ModelSpec(
    "resnet_sccan", make_sccan, keymap_sccan, parity=SCCAN_PARITY, min_input_size=8
  ),
  "resnet_deep_stem": ModelSpec(
    "resnet_deep_stem", make_deep_stem, keymap_deep_stem, min_input_size=8
  ),
  # PANet's VGG-16 encoder alone (ImageNet torchvision `vgg16` weights by default).
  "vgg16_panet": ModelSpec("vgg16_panet", vgg.make_encoder, vgg.encoder_keymap, min_input_size=8),
}
