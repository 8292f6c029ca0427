"""PANet parity adapter: kaixin96/PANet ``models.fewshot.FewShotSeg`` fixtures.

Fixture layouts: supports ``in_supp_imgs`` [Wa, Sh, B, 3, H, W], masks ``in_fore_mask`` /
``in_back_mask`` / ``in_supp_label`` [Wa, Sh, B, H, W], queries ``in_qry_imgs`` [Nq, B, 3, H,
W] (Nq = 1 only); outputs ``out_pred`` [Nq*B, 1 + Wa, H, W] and the scalar
``out_align_loss``. Our episode is batch-major (``[B, Wa, Sh, H, W, 3]``; 1-way episodes drop
the way axis), and our encoder batch is ordered (b, way, shot) then the queries, the
reference's (way, shot, b): the ``mid_vgg_block*`` arrays are reordered. PANet's N-way
background (every episode class excluded) is passed as ``support_bg_masks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity.common import chmean, nchw

MODEL_CLASSES = ("models.fewshot.FewShotSeg",)


def _fixture_dims(meta: Mapping[str, Any]) -> tuple[int, int, int, int]:
  """(ways, shots, queries, batch) of the fixture."""
  cfg = meta.get("config") or {}
  shape = (meta.get("input_shapes") or {}).get("in_supp_imgs")
  ways = int(cfg.get("n_ways", shape[0] if shape else 1))
  shots = int(cfg.get("n_shots", shape[1] if shape else 1))
  queries = int(cfg.get("n_queries", 1))
  batch = int(cfg.get("batch_size", shape[2] if shape else 1))
  return ways, shots, queries, batch


def model_fields(meta: Mapping[str, Any]) -> dict:
  ways, shots, queries, _ = _fixture_dims(meta)
  if queries != 1:
    raise ValueError(
      f"PANet fixtures with {queries} queries per episode are not supported: "
      "fss-jax episodes carry one query image"
    )
  align = bool(((meta.get("config") or {}).get("cfg") or {}).get("align", True))
  return {"ways": ways, "shots": shots, "align": align, "return_intermediates": True}


def inputs(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict:
  """Way/shot-major fixture arrays -> a batch-major NHWC episode (see the module doc)."""
  s = np.asarray(arrays["in_supp_imgs"], np.float32)  # Wa,Sh,B,3,H,W
  wa, sh, b = s.shape[:3]
  q = np.asarray(arrays["in_qry_imgs"], np.float32)
  if q.shape[0] != 1:
    raise ValueError(f"fixture has {q.shape[0]} queries per episode; only 1 is supported")
  to_bnk = lambda m: np.ascontiguousarray(np.moveaxis(m, 2, 0))
  label = arrays.get("in_supp_label")
  fore = np.asarray(arrays["in_fore_mask"], np.float32)
  back = np.asarray(arrays["in_back_mask"], np.float32)
  masks = label.astype(np.int32) if label is not None else fore.astype(np.int32)
  episode = {
    "query_image": q[0].transpose(0, 2, 3, 1),
    "support_images": to_bnk(s).transpose(0, 1, 2, 4, 5, 3),  # B,Wa,Sh,H,W,3
    "support_masks": to_bnk(masks),
    "support_fg_masks": to_bnk(fore),
    "support_bg_masks": to_bnk(back),
    "class_id": np.zeros((b,), np.int32),
  }
  if "in_qry_label" in arrays:
    episode["query_mask"] = arrays["in_qry_label"][0].astype(np.int32)
  if wa == 1:  # exercise the 1-way episode layout
    for key in ("support_images", "support_masks", "support_fg_masks", "support_bg_masks"):
      episode[key] = episode[key][:, 0]
  return {k: jnp.asarray(v) for k, v in episode.items()}


def outputs(out: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
  """Logits [B, H, W, 1+Wa] -> ``out_pred`` NCHW; encoder blocks (b, way, shot)-ordered ->
  the reference's (way, shot, b) order; prototypes [B, 1+Wa, C] and scores [B, h, w, 1+Wa]
  -> per-episode ``mid_prototype_*`` / ``mid_dist_*``."""
  ways, shots, _, batch = _fixture_dims(meta)
  res = {
    "out_pred": nchw(out["logits"]),
    "out_align_loss": np.asarray(out["align_loss"], np.float32),
  }
  n_supp = batch * ways * shots
  order = [
    b * ways * shots + w * shots + s
    for w in range(ways)
    for s in range(shots)
    for b in range(batch)
  ] + list(range(n_supp, n_supp + batch))
  for i, block in enumerate(["block1", "block2", "block3", "block4", "block5"], 1):
    f = np.asarray(out["blocks"][block])[order]
    res[f"mid_vgg_block{i}__chmean"] = chmean(f)
    if i == 5:
      res["mid_vgg_block5__c32"] = nchw(f)[:, :32]
  protos = np.asarray(out["prototypes"])
  scores = np.asarray(out["scores"])
  for b in range(batch):
    res[f"mid_prototype_epi{b}_fg"] = protos[b, 1:]
    res[f"mid_prototype_epi{b}_bg"] = protos[b, :1]
    for j in range(scores.shape[-1]):
      res[f"mid_dist_epi{b}_proto{j}"] = scores[b, :, :, j][None]
  return res


PARITY = ParityAdapter(
  model="panet",
  model_classes=MODEL_CLASSES,
  model_fields=model_fields,
  inputs=inputs,
  outputs=outputs,
  logit_outputs=("out_pred",),
)

ADAPTERS = {"panet": PARITY}
