"""Backbone parity adapters: the ``backbone_torchvision_resnet50`` (torchvision
``ResNet``) and ``backbone_sccan_resnet50`` (SCCAN's ``model.backbone_utils.Backbone``)
fixtures. The PSPNet deep-stem backbone's fixture is `checkpoints.parity.pspnet`'s.

Input ``in_img`` [B, 3, H, W] -> NHWC. Outputs: the stem (``mid_stem``) and stage maps
``layer1..4`` NCHW (``mid_layer<i>`` for torchvision, ``out_layer<i>`` for SCCAN's), and
torchvision's head: ``out_logits`` [B, 1000], ``mid_avgpool`` [B, 2048, 1, 1]. The state-dict
key prefix (e.g. ``backbone.body.``) is read from the stem's ``conv1.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity.common import image_nhwc, nchw
from fss_jax.nn.backbones import resnet


def _state_keys(meta: Mapping[str, Any]) -> list[str]:
  return [e["key"] for e in meta["state_dict"]["keys"]]


def _stem_prefix(keys) -> str:
  """Prefix in front of the stem's ``conv1.weight`` (e.g. "backbone.body.")."""
  for k in keys:
    if k.endswith("conv1.weight") and "layer" not in k:
      return k[: -len("conv1.weight")]
  raise ValueError("no stem conv1.weight among the state-dict keys")


def _image_input(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]):
  return image_nhwc(arrays["in_img"])


def _stage_outputs(out, kind: str, num_stages: int) -> dict:
  d = {f"{kind}_layer{i}": nchw(out[f"layer{i}"]) for i in range(1, num_stages + 1)}
  d["mid_stem"] = nchw(out["layer0"])
  return d


def torchvision_fields(meta: Mapping[str, Any]) -> dict:
  keys = _state_keys(meta)
  prefix = _stem_prefix(keys)
  depth, _ = resnet.depth_from_keys(keys, prefix)
  fields = dict(depth=depth, include_head=f"{prefix}fc.weight" in keys, prefix=prefix)
  for e in meta["state_dict"]["keys"]:
    if e["key"] == f"{prefix}fc.weight":
      fields["num_classes"] = int(e["shape"][0])
  return fields


def torchvision_outputs(out, meta: Mapping[str, Any]) -> dict:
  d = _stage_outputs(out, "mid", 4)
  if "logits" in out:
    d["out_logits"] = np.asarray(out["logits"])
    d["mid_avgpool"] = np.asarray(out["pooled"])[:, :, None, None]
  return d


def sccan_fields(meta: Mapping[str, Any]) -> dict:
  keys = _state_keys(meta)
  prefix = _stem_prefix(keys)
  depth, _ = resnet.depth_from_keys(keys, prefix)
  return dict(depth=depth, prefix=prefix)


TORCHVISION_PARITY = ParityAdapter(
  model="resnet_torchvision",
  model_classes=tuple(f"torchvision.models.resnet.ResNet (resnet{d})" for d in resnet.STAGE_SIZES),
  model_fields=torchvision_fields,
  inputs=_image_input,
  outputs=torchvision_outputs,
  logit_outputs=("out_logits",),
)

SCCAN_PARITY = ParityAdapter(
  model="resnet_sccan",
  model_classes=("model.backbone_utils.Backbone",),
  model_fields=sccan_fields,
  inputs=_image_input,
  outputs=lambda out, meta: _stage_outputs(out, "out", 4),
)

ADAPTERS = {"resnet_torchvision": TORCHVISION_PARITY, "resnet_sccan": SCCAN_PARITY}
