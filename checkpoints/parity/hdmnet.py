"""HDMNet parity adapter: Pbihao/HDMNet ``model.HDMNet.OneModel`` fixtures.

Inputs: ``in_query_img`` [B, 3, H, W], ``in_supp_img`` [B, K, 3, H, W], ``in_supp_label`` /
``in_query_label`` -> an NHWC episode (`common.episode`). Outputs ``out_final`` /
``out_meta`` [B, 2, H, W] and ``out_base`` [B, N, H, W], NCHW. Intermediates (returned by
`hdmnet.HDMNet` and its transformer, `common.flatten`ed): maps NCHW, ``__chmean`` = mean over
space / tokens [B, C], ``__c<n>`` = first n channels; the transformer's token arrays
(``mid_down<i>_norm_*``, ``mid_match<i>_cross_*``) stay ``[B, L, C]``.
`inputs`, `apply` and `transformer_mids` serve PAHNet's HDMNetPlus adapter too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity.common import (
  ENSEMBLE_LOGITS,
  ENSEMBLE_TOLERANCES,
  apply_with_intermediates,
  chmean,
  config_values,
  ensemble_logits,
  ensemble_merges,
  episode,
  flatten,
  nchw,
  state_shapes,
)
from fss_jax.nn.backbones import resnet

FIXTURE_CLASS = "model.HDMNet.OneModel"


def model_fields(meta: Mapping[str, Any]) -> dict:
  shapes = state_shapes(meta)
  values = config_values(meta)
  shot = int(values.get("shot", meta["input_shapes"]["in_supp_img"][1]))
  fields = dict(
    shot=shot,
    num_base_classes=int(shapes["base_learnear.2.weight"][0]),
    depth=resnet.depth_from_keys(shapes)[0],
  )
  if shot > 1:
    fields["kshot_hidden"] = (
      int(shapes["kshot_rw.0.weight"][0]) if "kshot_rw.0.weight" in shapes else 0
    )
  else:
    fields["kshot_hidden"] = int(values.get("kshot_trans_dim", 2))
  return fields


def inputs(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict:
  """NCHW fixture arrays -> an NHWC episode."""
  del meta
  return episode(arrays)


def apply(module, variables, ep):
  """Eval-mode forward -> ``(outputs, {"intermediates": ...})``."""
  return apply_with_intermediates(module, variables, ep)


def transformer_mids(mid: Mapping[str, Any]) -> dict:
  """The fixture's ``mid_`` arrays of the hierarchical transformer and the low-res logits
  (shared with PAHNet's HDMNetPlus), from `common.flatten`ed intermediates."""
  d = {
    "mid_meta_logits_lowres": nchw(mid["meta_logits_lowres"]),
    "mid_base_logits_lowres": nchw(mid["base_logits_lowres"]),
  }
  for i in range(3):
    t = f"transformer/down_{i}/"
    for who in ("query", "support"):
      d[f"mid_down{i}_patch_embed_{who}__chmean"] = chmean(mid[f"{t}patch_embed_{who}"])
      for j in (1, 2):
        d[f"mid_down{i}_self{j}_{who}__chmean"] = chmean(mid[f"{t}self{j}_{who}"])
    d[f"mid_down{i}_norm_query"] = np.asarray(mid[f"transformer/down{i}_norm_query"])
    s_norm = np.asarray(mid[f"transformer/down{i}_norm_support"])
    d[f"mid_down{i}_norm_support__chmean"] = chmean(s_norm)
    d[f"mid_down{i}_norm_support__c8"] = s_norm[..., :8]
    d[f"mid_match{i}_cross_x"] = np.asarray(mid[f"transformer/match{i}_cross_x"])
    d[f"mid_match{i}_cross_weight"] = np.asarray(mid[f"transformer/match{i}_cross_weight"])
    d[f"mid_match{i}_conv"] = nchw(mid[f"transformer/match{i}_conv"])
    d[f"mid_parse{i}"] = nchw(mid[f"transformer/parse{i}"])
  return d


def outputs(result, meta: Mapping[str, Any]) -> dict:
  out, state = result
  mid = flatten(state.get("intermediates", {}))
  d = ensemble_logits(out)
  for who in ("query", "support"):
    for name in ("layer0", "layer1", "layer2", "layer3", "layer4"):
      d[f"mid_feat_{who}_{name}__chmean"] = chmean(mid[f"feat_{who}_{name}"])
    d[f"mid_feat_{who}_ppm_cls__chmean"] = chmean(mid[f"feat_{who}_feat5"])
  d["mid_feat_query_layer4__c16"] = nchw(mid["feat_query_layer4"])[:, :16]
  d["mid_feat_query_ppm_cls__c16"] = nchw(mid["feat_query_feat5"])[:, :16]
  for name in ("down_query", "down_supp", "supp_merge"):
    d[f"mid_{name}__chmean"] = chmean(mid[f"{name}_out"])
    d[f"mid_{name}__c16"] = nchw(mid[f"{name}_out"])[:, :16]
  d["mid_query_merge"] = nchw(mid["query_merge_out"])
  d["mid_similarity_layer4"] = nchw(mid["similarity_layer4"])
  d["mid_similarity_ppm_cls"] = nchw(mid["similarity_ppm_cls"])
  d["mid_transformer_in_similarity"] = np.concatenate(
    [d["mid_similarity_ppm_cls"], d["mid_similarity_layer4"]], axis=1
  )
  d.update(transformer_mids(mid))
  d.update(ensemble_merges(mid, "ensemble/"))
  return d


PARITY = ParityAdapter(
  model="hdmnet",
  model_classes=(FIXTURE_CLASS,),
  model_fields=model_fields,
  inputs=inputs,
  outputs=outputs,
  apply=apply,
  logit_outputs=ENSEMBLE_LOGITS,
  tolerances=ENSEMBLE_TOLERANCES,
)

ADAPTERS = {"hdmnet": PARITY}
