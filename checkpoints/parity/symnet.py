"""Sym-Net parity adapter: Sunbaoquan/Sym-Net ``model.SymNet.SymNet`` fixtures.

Inputs: ``in_query_img`` [B, 3, H, W], ``in_supp_img`` [B, K, 3, H, W], ``in_supp_label`` /
``in_query_label`` and ``in_class_chosen`` [B] (the class id of the word embedding) -> an
NHWC episode (`common.episode`). Outputs ``out_final`` / ``out_meta`` [B, 2, H, W] and
``out_base`` [B, N, H, W], NCHW. Intermediates: backbone stages and the per-bottleneck
hyper-features as ``__chmean`` [B, C] (supports: shot 0 only, ``support0``) and ``__c4`` NCHW
slices; prototypes [B, C] as NCHW ``[B, C, 1, 1]``; APA outputs ``[B, 1, C]``; correlation /
prior / decoder maps NCHW; ``mid_est_val`` ``[B, 1, 1, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity.common import (
  ENSEMBLE_LOGITS,
  ENSEMBLE_TOLERANCES,
  chmean,
  config_values,
  ensemble_logits,
  ensemble_merges,
  episode,
  nchw,
  state_shapes,
)
from fss_jax import assets
from fss_jax.nn.backbones import resnet

FIXTURE_CLASS = "model.SymNet.SymNet"


def model_fields(meta: Mapping[str, Any]) -> dict:
  shapes = state_shapes(meta, strip="module.")
  values = config_values(meta)
  shot = int(values.get("shot", meta["input_shapes"]["in_supp_img"][1]))
  fields = dict(
    shot=shot,
    dataset=assets.canonical_dataset(values.get("data_set", "pascal")),
    num_base_classes=int(shapes["learner_base.1.4.weight"][0]),
    depth=resnet.depth_from_keys(shapes)[0],
  )
  if values.get("scales"):
    fields["scales"] = tuple(int(s) for s in values["scales"])
  if shot > 1:
    fields["kshot_hidden"] = int(shapes["kshot_rw.0.weight"][0])
  return fields


def inputs(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict:
  """NCHW fixture arrays -> an NHWC episode (class_id = in_class_chosen)."""
  del meta
  return episode(arrays, class_id=arrays["in_class_chosen"])


def apply(module, variables, ep):
  """Eval-mode forward -> ``(outputs, {"intermediates": ...})``: the model's outputs
  (``intermediates`` among them) and the outputs of the decoder's res1 / res2 that Flax's
  ``capture_intermediates`` records: their sum is the cls input the fixture stores as
  ``mid_decoder_feat``."""
  assets.check_class_ids(np.asarray(ep["class_id"]), module.dataset)
  capture = lambda mdl, method: method == "__call__" and mdl.name in ("res1", "res2")
  fn = jax.jit(
    lambda v, e: module.apply(
      v, e, train=False, mutable=["intermediates"], capture_intermediates=capture
    )
  )
  return fn(variables, ep)


def outputs(result, meta: Mapping[str, Any]) -> dict:
  out, state = result
  decoder = state.get("intermediates", {}).get("decoder", {})
  mid = out["intermediates"]
  b = out["logits"].shape[0]
  col = lambda v: np.asarray(v)[:, :, None, None]  # [B, C] -> NCHW 1x1
  d = ensemble_logits(out)
  first_shot = lambda v: np.asarray(v).reshape(b, -1, *np.shape(v)[1:])[:, 0]
  for who, tag in (("query", "query"), ("support", "support0")):
    pick = (lambda v: v) if who == "query" else first_shot
    for n in range(5):
      f = pick(mid[f"feat_{who}_layer{n}"])
      d[f"mid_feat_{tag}_layer{n}__chmean"] = chmean(f)
      if n >= 2:
        d[f"mid_feat_{tag}_layer{n}__c4"] = nchw(f)[:, :4]
    sizes = resnet.stage_sizes(int(model_fields(meta)["depth"]))
    for i in range(sum(sizes) - (sizes[0] - 1)):
      d[f"mid_hyperfeat_{tag}_{i:02d}__chmean"] = chmean(
        pick(mid[f"block_{who}_{i + sizes[0] - 1}"])
      )
  d["mid_down_query__chmean"] = chmean(mid["down_query_out"])
  d["mid_down_query__c8"] = nchw(mid["down_query_out"])[:, :8]
  s0 = first_shot(mid["down_supp_out"])
  d["mid_down_supp_shot0__chmean"] = chmean(s0)
  d["mid_down_supp_shot0__c8"] = nchw(s0)[:, :8]
  d["mid_supp_pro_shot0"] = col(first_shot(mid["supp_proto"]))
  d["mid_apa_support0"] = first_shot(mid["apa_support"])[:, None, :]
  d["mid_apa_query"] = np.asarray(mid["apa_query"])[:, None, :]
  for name in ("l4", "l3", "l2"):
    d[f"mid_corr_shot0_{name}"] = nchw(mid[f"corr_shot0_{name}"])
  d["mid_tdc"] = nchw(mid["tdc_out"])
  for i in range(4):
    d[f"mid_spm_bin{i}"] = nchw(mid[f"spm_bin{i}"])
    d[f"mid_inner_cls{i}"] = nchw(mid[f"inner_cls{i}"])
  d["mid_shot_weight"] = col(mid["shot_weight"])
  d["mid_est_val"] = np.asarray(mid["est_val"]).reshape(b, 1, 1, 1)
  d["mid_query_pro_fg"] = col(mid["query_pro_fg"])
  d["mid_query_pro_hard"] = col(mid["query_pro_hard"])
  d["mid_query_pro_bg"] = col(mid["query_pro_bg"])
  d["mid_hybrid_proto"] = col(mid["hybrid_proto"])
  if "res1" in decoder and "res2" in decoder:
    feat = np.asarray(decoder["res1"]["__call__"][0]) + np.asarray(decoder["res2"]["__call__"][0])
    d["mid_decoder_feat__chmean"] = chmean(feat)
    d["mid_decoder_feat__c4"] = nchw(feat)[:, :4]
  d["mid_meta_logits_lowres"] = nchw(mid["meta_logits_lowres"])
  d["mid_base_logits_lowres"] = nchw(mid["base_logits_lowres"])
  d.update(ensemble_merges(mid))
  return d


PARITY = ParityAdapter(
  model="symnet",
  model_classes=(FIXTURE_CLASS,),
  model_fields=model_fields,
  inputs=inputs,
  outputs=outputs,
  apply=apply,
  logit_outputs=ENSEMBLE_LOGITS,
  # the ensemble's est_val and, here, the saturated meta softmax: ~1e-3 absolute on out_final
  tolerances=ENSEMBLE_TOLERANCES,
)

ADAPTERS = {"symnet": PARITY}
