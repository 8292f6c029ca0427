"""SCCAN parity adapter: Sam1224/SCCAN ``model.SCCAN.OneModel`` fixtures.

Inputs: ``in_query_img`` [B, 3, H, W], ``in_supp_img`` [B, K, 3, H, W], ``in_supp_label`` [B,
K, H, W] -> an NHWC episode (`common.episode`, ``class_id`` zeros: SCCAN does not read it).
Outputs: ``out_logits`` [B, 2, H, W]. The ``mid_`` names the json lists are looked up among
the intermediates `sccan.SCCAN` returns: maps NHWC -> NCHW, SCCA block tokens stay NLC
``[B, L, C]`` (``__c<n>`` keeps the first n channels, ``__chmean`` the mean over space /
tokens), ``*_window_index`` as int64.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity.common import chmean, config_values, episode
from fss_jax.models.sccan import BACKBONE_PREFIX
from fss_jax.nn.backbones import resnet

MODEL_CLASSES = ("model.SCCAN.OneModel",)


def model_fields(meta: Mapping[str, Any]) -> dict:
  values = config_values(meta)
  shapes = meta.get("input_shapes") or {}
  shot = int(values.get("shot", shapes.get("in_supp_img", [0, 1])[1]))
  if "in_supp_img" in shapes and shapes["in_supp_img"][1] != shot:
    raise ValueError(
      f"fixture config says shot={shot} but in_supp_img has shape {shapes['in_supp_img']}"
    )
  keys = [e["key"] for e in meta["state_dict"]["keys"]]
  layers, _ = resnet.depth_from_keys(keys, BACKBONE_PREFIX)
  if "layers" in values and int(values["layers"]) != layers:
    raise ValueError(
      f"fixture config says layers={values['layers']} but its keys are ResNet-{layers}"
    )
  fields = {"shot": shot, "layers": layers}
  if "zoom_factor" in values:
    fields["zoom_factor"] = int(values["zoom_factor"])
  return fields


def inputs(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict:
  del meta
  b = np.shape(arrays["in_query_img"])[0]
  return episode(arrays, class_id=np.zeros((b,), np.int32))


_SWIN_MIDS = {
  "window_index": "window_index",
  "attn_q": "attn_q_out",
  "mlp_q": "mlp_q_out",
  "attn_s": "attn_s_out",
  "mlp_s": "mlp_s_out",
  "q": "q_out",
  "s": "s_out",
}


def _mid_source(base: str, inter: Mapping[str, Any]):
  """The Flax intermediate behind a fixture ``mid_`` base name (NHWC maps / NLC tokens)."""
  m = re.fullmatch(r"swin_block(\d+)_(\w+)", base)
  if m and m.group(2) in _SWIN_MIDS:
    return inter["transformer"][f"blocks_{m.group(1)}"][_SWIN_MIDS[m.group(2)]]
  dec = {"aspp": "aspp_out", "res1": "res1_out", "res2": "res2_out"}
  if base in dec:
    return inter["decoder"][dec[base]]
  for name in (f"{base}_out", base):
    if name in inter:
      return inter[name]
  return None


def _to_torch_layout(x: np.ndarray, suffix: str) -> np.ndarray:
  """NHWC map / NLC tokens -> the fixture's layout for a ``__<suffix>`` name."""
  x = np.asarray(x)
  if suffix == "chmean":
    return chmean(x)
  if x.ndim == 4:
    x = x.transpose(0, 3, 1, 2)
  if suffix.startswith("c") and suffix[1:].isdigit():
    n = int(suffix[1:])
    x = x[:, :n] if x.ndim == 4 else x[..., :n]
  return x


def outputs(out: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
  res = {"out_logits": np.asarray(out["logits"]).transpose(0, 3, 1, 2)}
  inter = out.get("intermediates") or {}
  extra = {"meta_logits_64": out["logits_low"]}
  for name in meta.get("tensors") or {}:
    if not name.startswith("mid_"):
      continue
    base, _, suffix = name[4:].partition("__")
    src = extra.get(base)
    if src is None:
      src = _mid_source(base, inter)
    if src is None:
      continue
    v = _to_torch_layout(src, suffix)
    if base.endswith("window_index"):
      v = v.astype(np.int64)
    res[name] = v
  return res


PARITY = ParityAdapter(
  model="sccan",
  model_classes=MODEL_CLASSES,
  model_fields=model_fields,
  inputs=inputs,
  outputs=outputs,
  logit_outputs=("out_logits",),
)

ADAPTERS = {"sccan": PARITY}
