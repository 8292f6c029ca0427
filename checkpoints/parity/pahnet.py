"""PAHNet parity adapters: tianyu-zou/PAHNet ``SCCANPlus`` and ``HDMNetPlus`` fixtures.

Inputs and the forward as HDMNet's (`checkpoints.parity.hdmnet.inputs` / ``apply``: an NHWC
episode; ``(outputs, {"intermediates": ...})``). Outputs: ``out_final`` / ``out_meta`` [B, 2,
H, W], ``out_base`` [B, N, H, W] and (HDMNetPlus) the predictor's ``out_pro_pred`` [B, 2, 64,
64], NCHW. Intermediates (`common.flatten`ed): the SSP predictor's maps NCHW and its
prototypes ``[B, C]`` / ``[B, C, 1, 1]`` as recorded, backbone / merge maps as ``__chmean``
[B, C] and ``__c<n>`` NCHW slices, the prior-choice arrays as they are, SCCAPlus block tokens
``[B, L, C]``, pseudo masks NCHW.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity import hdmnet as hdmnet_parity
from checkpoints.parity.common import (
  ENSEMBLE_LOGITS,
  ENSEMBLE_TOLERANCES,
  chmean,
  config_values,
  ensemble_logits,
  ensemble_merges,
  flatten,
  nchw,
  state_shapes,
)
from fss_jax.nn.backbones import resnet

SCCAN_FIXTURE_CLASS = "SCCAN_PAHNet.model.SCCANPlus.OneModel"
HDMNET_FIXTURE_CLASS = "HDMNet_PAHNet.model.HDMNetPlus.OneModel"


def model_fields(meta: Mapping[str, Any], classifier_key: str) -> dict:
  """Model fields of a fixture: shot, base classes (from ``classifier_key``), depth,
  kshot_hidden."""
  shapes = state_shapes(meta)
  values = config_values(meta)
  shot = int(values.get("shot", meta["input_shapes"]["in_supp_img"][1]))
  fields = dict(
    shot=shot,
    num_base_classes=int(shapes[classifier_key][0]),
    depth=resnet.depth_from_keys(shapes)[0],
  )
  if shot > 1 and "kshot_rw.0.weight" in shapes:
    fields["kshot_hidden"] = int(shapes["kshot_rw.0.weight"][0])
  elif shot > 1:
    fields["kshot_hidden"] = 0
  return fields


def common_outputs(result) -> tuple[dict, dict]:
  """(outputs, {"intermediates": ...}) of a fixture run -> (the `flatten`ed
  intermediates, the fixture arrays both variants record: final / meta / base logits,
  predictor, backbone, prior and ensemble ``mid_`` arrays; NCHW)."""
  out, state = result
  mid = flatten(state.get("intermediates", {}))
  d = ensemble_logits(out)
  d.update(
    {
      "mid_ssp_out": nchw(mid["ssp/out_1"]),
      "mid_ssp_sim_out0": nchw(mid["ssp/out_0_low"]),
      "mid_ssp_sim_out1": nchw(mid["ssp/out_1_low"]),
      "mid_ssp_func_fg": np.asarray(mid["ssp/ssp_fg"]),
      "mid_ssp_func_bg": np.asarray(mid["ssp/ssp_bg"]),
      "mid_ssp_func_bglocal__chmean": chmean(mid["ssp/ssp_bg_local"]),
    }
  )
  d["mid_ssp_layer3_query__chmean"] = chmean(mid["ssp/layer3_query"])
  d["mid_ssp_layer3_support0__chmean"] = chmean(np.asarray(mid["ssp/layer3_support"])[:, 0])
  for who in ("query", "support"):
    for name in ("layer2", "layer3", "layer4"):
      d[f"mid_feat_{who}_{name}__chmean"] = chmean(mid[f"feat_{who}_{name}"])
    d[f"mid_feat_{who}_ppm_cls__chmean"] = chmean(mid[f"feat_{who}_feat5"])
  d["mid_feat_query_layer4__c16"] = nchw(mid["feat_query_layer4"])[:, :16]
  d["mid_feat_query_ppm_cls__c16"] = nchw(mid["feat_query_feat5"])[:, :16]
  for name in ("down_query", "down_supp"):
    d[f"mid_{name}__chmean"] = chmean(mid[f"{name}_out"])
    d[f"mid_{name}__c16"] = nchw(mid[f"{name}_out"])[:, :16]
  for tag in ("layer4", "ppm_cls"):
    for n in ("fg", "bg", "corr"):
      key = "corr" if n == "corr" else f"{n}_corr"
      d[f"mid_prior_{tag}_{key}"] = np.asarray(mid[f"prior_{tag}_{n}"])
    d[f"mid_prior_{tag}_fg_sim_max"] = np.asarray(mid[f"prior_{tag}_fg_max"])
    d[f"mid_prior_{tag}_corr_max"] = np.asarray(mid[f"prior_{tag}_corr_max"])
  d.update(ensemble_merges(mid, "ensemble/"))
  return mid, d


def sccan_outputs(result, meta: Mapping[str, Any]) -> dict:
  """SCCANPlus: `common_outputs` plus the merges, the 8 SCCAPlus blocks (tokens, windows,
  pseudo masks) and the transformer / meta outputs."""
  del meta
  mid, d = common_outputs(result)
  for name in ("init_merge_query", "init_merge_supp"):
    d[f"mid_{name}__chmean"] = chmean(mid[f"{name}_out"])
    d[f"mid_{name}__c8"] = nchw(mid[f"{name}_out"])[:, :8]
  for n in range(len([k for k in mid if k.endswith("/window_index")])):
    blk = f"transformer/blocks_{n}/"
    d[f"mid_swin_block{n}_window_index"] = np.asarray(mid[f"{blk}window_index"])
    d[f"mid_swin_block{n}_pe_q__chmean"] = chmean(mid[f"{blk}pe_q"])
    for a in ("attn_q", "mlp_q", "attn_s", "mlp_s"):
      d[f"mid_swin_block{n}_{a}__chmean"] = chmean(mid[f"{blk}{a}_out"])
    d[f"mid_swin_block{n}_q__chmean"] = chmean(mid[f"{blk}q_out"])
    d[f"mid_swin_block{n}_q__c4"] = np.asarray(mid[f"{blk}q_out"])[..., :4]
    d[f"mid_swin_block{n}_s__chmean"] = chmean(mid[f"{blk}s_out"])
    d[f"mid_swin_block{n}_pseudo"] = nchw(mid[f"{blk}pseudo"])
  d["mid_transformer_out__chmean"] = chmean(mid["transformer_out"])
  d["mid_transformer_out__c8"] = nchw(mid["transformer_out"])[:, :8]
  d["mid_meta_logits_64"] = nchw(mid["meta_logits_lowres"])
  return d


def hdmnet_outputs(result, meta: Mapping[str, Any]) -> dict:
  """HDMNetPlus: `common_outputs` plus the predictor's output, the merges, HDMNet's
  transformer arrays and the PFE inside each match layer."""
  del meta
  mid, d = common_outputs(result)
  d["out_pro_pred"] = nchw(result[0]["prob"])
  for who in ("query", "support"):
    for name in ("layer0", "layer1"):
      d[f"mid_feat_{who}_{name}__chmean"] = chmean(mid[f"feat_{who}_{name}"])
  d["mid_supp_merge__chmean"] = chmean(mid["supp_merge_out"])
  d["mid_supp_merge__c16"] = nchw(mid["supp_merge_out"])[:, :16]
  d["mid_query_merge"] = nchw(mid["query_merge_out"])
  d["mid_transformer_in_similarity"] = nchw(mid["prior"])
  d.update(hdmnet_parity.transformer_mids(mid))
  for i in range(3):  # PFE inside each match layer
    d[f"mid_match{i}_pe_x"] = np.asarray(mid[f"transformer/match{i}_pe_x"])
    d[f"mid_match{i}_pe_y__chmean"] = chmean(mid[f"transformer/match{i}_pe_y"])
    d[f"mid_match{i}_pe_pseudo"] = nchw(mid[f"transformer/match{i}_pe_pseudo"])
  return d


# `outputs` is late-bound to this module's `sccan_outputs` / `hdmnet_outputs`, so that
# tests can wrap them (e.g. to read the branch decisions).
SCCAN_PARITY = ParityAdapter(
  model="sccan_pahnet",
  model_classes=(SCCAN_FIXTURE_CLASS,),
  model_fields=lambda meta: model_fields(meta, "base_learner.2.weight"),
  inputs=hdmnet_parity.inputs,
  outputs=lambda r, m: sccan_outputs(r, m),
  apply=hdmnet_parity.apply,
  logit_outputs=ENSEMBLE_LOGITS,
  tolerances=ENSEMBLE_TOLERANCES,
)

HDMNET_PARITY = ParityAdapter(
  model="hdmnet_pahnet",
  model_classes=(HDMNET_FIXTURE_CLASS,),
  model_fields=lambda meta: model_fields(meta, "base_learnear.2.weight"),
  inputs=hdmnet_parity.inputs,
  outputs=lambda r, m: hdmnet_outputs(r, m),
  apply=hdmnet_parity.apply,
  logit_outputs=(*ENSEMBLE_LOGITS, "out_pro_pred"),
  tolerances=ENSEMBLE_TOLERANCES,
)

ADAPTERS = {"sccan_pahnet": SCCAN_PARITY, "hdmnet_pahnet": HDMNET_PARITY}
