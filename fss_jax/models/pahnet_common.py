"""What PAHNet's two variants share (shared/reference/pahnet.md §1, §4-§5).

`fss_jax.models.pahnet_sccan` (SCCANPlus) and `fss_jax.models.pahnet_hdmnet`
(HDMNetPlus) both start from

* the frozen prototype predictor (`predictor_probability`, §1.2),
* the frozen PSPNet features of the query and the UNMASKED supports
  (`frozen_features`, §1.1),
* the prototype prior of layer4 and feature 5 with its per-sample level choice
  (`level_priors`, §1.3),

end in BAM's learner ensemble (`fss_jax.models.hdmnet.learner_ensemble`), and add
the mean CE of the PFE pseudo masks to their losses (`pseudo_mask_ce`). The
fixture helpers (`fixture_fields`, `flatten`, `common_outputs`) read what both
record. NHWC throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models import ssp as ssp_lib
from fss_jax.models.hdmnet import chmean, nchw
from fss_jax.nn.prototype import prototype_prior, select_prior
from fss_jax.ops import losses
from fss_jax.ops.resize import resize_nearest

Sow = Callable[[str, Any], Any]


def check_episode(episode: Mapping[str, jax.Array], shot: int) -> tuple[int, int, int, int]:
  """(B, K, H, W) of an episode; a clear error when K is not the model's shot."""
  x, sx, sy = episode["query_image"], episode["support_images"], episode["support_masks"]
  b, hh, ww, _ = x.shape
  k = sx.shape[1]
  if k != shot:
    raise ValueError(
      f"the model was built for {shot}-shot episodes, got {k} supports; "
      f"set config.shot={k} (model field shot)"
    )
  if sx.shape[2:4] != (hh, ww) or sy.shape[2:] != (hh, ww):
    raise ValueError(
      f"support images {tuple(sx.shape)} / masks {tuple(sy.shape)} must share "
      f"the query size {hh}x{ww}"
    )
  return b, k, hh, ww


def predictor_probability(
  ssp: ssp_lib.SSPMatchingNet, episode: Mapping[str, jax.Array]
) -> jax.Array:
  """The frozen predictor's softmax ``[B, s, s, 2]`` (no gradient), pahnet.md §1.2."""
  out = ssp(
    episode["query_image"], episode["support_images"], episode["support_masks"], train=False
  )
  return jax.lax.stop_gradient(jax.nn.softmax(out["out_1"], axis=-1))


def frozen_features(
  psp: pspnet_lib.PSPNet, episode: Mapping[str, jax.Array], sow: Sow, names: Sequence[str]
) -> tuple[dict, dict]:
  """PSPNet features of the query and the unmasked supports, one batch, no gradient.

  Returns (query features ``{name: [B, h, w, C]}``, support features
  ``{name: [B*K, h, w, C]}``, row b*K + k); sows ``feat_query_<n>`` /
  ``feat_support_<n>`` for the given names.
  """
  x, sx = episode["query_image"], episode["support_images"]
  b, k, hh, ww = sx.shape[:4]
  feats = jax.lax.stop_gradient(
    psp.features(jnp.concatenate([x, sx.reshape(b * k, hh, ww, -1)], 0), train=False)
  )
  fq = {n: f[:b] for n, f in feats.items()}
  fs = {n: f[b:] for n, f in feats.items()}
  for n in names:
    sow(f"feat_query_{n}", fq[n])
    sow(f"feat_support_{n}", fs[n])
  return fq, fs


def level_priors(
  fq: Mapping[str, jax.Array],
  fs: Mapping[str, jax.Array],
  masks: jax.Array,
  out_size: Sequence[int],
  sow: Sow,
) -> jax.Array:
  """Prototype priors of layer4 and feature 5 and the per-sample choice (§1.3).

  fq: query features at backbone resolution; fs: [B, K, r, r, C] support
  features; masks [B, K, r, r, 1]. Returns the prior [B, o, o, 2].
  """
  p4 = prototype_prior(fq["layer4"], fs["layer4"], masks, out_size)
  p5 = prototype_prior(fq["feat5"], fs["feat5"], masks, out_size)
  prior, choice = select_prior(p4, p5)
  for tag, p in (("layer4", p4), ("ppm_cls", p5)):
    for n, v in p.items():
      sow(f"prior_{tag}_{n}", v)
  sow("prior_choice_fg", choice["fg"])
  sow("prior_choice_corr", choice["corr"])
  return prior


def pseudo_mask_ce(pseudo_masks: Sequence[jax.Array], y: jax.Array) -> list[jax.Array]:
  """CE of each pseudo mask (probabilities used as logits) against the label resized
  with torch's legacy nearest rule to its grid (the loss term is their mean)."""
  out = []
  for p in pseudo_masks:
    gt = resize_nearest(y[..., None], p.shape[1:3])[..., 0]
    out.append(losses.cross_entropy(p, gt))
  return out


# ---------------------------------------------------------------------------
# Fixture helpers (the parity adapters are in `fss_jax.models.pahnet`)
# ---------------------------------------------------------------------------


def fixture_fields(meta: Mapping[str, Any], classifier_key: str) -> dict:
  """Model fields of a fixture: shot, base classes (from ``classifier_key``), depth,
  kshot_hidden."""
  shapes = {e["key"]: tuple(e["shape"]) for e in meta["state_dict"]["keys"]}
  values = (meta.get("config") or {}).get("values") or {}
  shot = int(values.get("shot", meta["input_shapes"]["in_supp_img"][1]))
  fields = dict(
    shot=shot,
    num_base_classes=int(shapes[classifier_key][0]),
    depth=pspnet_lib.resnet.depth_from_keys(shapes)[0],
  )
  if shot > 1 and "kshot_rw.0.weight" in shapes:
    fields["kshot_hidden"] = int(shapes["kshot_rw.0.weight"][0])
  elif shot > 1:
    fields["kshot_hidden"] = 0
  return fields


def flatten(tree, prefix: str = "") -> dict:
  """Sown intermediates -> {"path/name": value} (one-element tuples unwrapped)."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten(v, f"{prefix}{k}/"))
    else:
      flat[f"{prefix}{k}"] = v[0] if isinstance(v, tuple) and len(v) == 1 else v
  return flat


def common_outputs(result) -> tuple[dict, dict]:
  """(outputs, {"intermediates": ...}) of a fixture run -> (the `flatten`ed
  intermediates, the fixture arrays both variants record: final / meta / base logits,
  predictor, backbone, prior and ensemble ``mid_`` arrays; NCHW)."""
  out, state = result
  mid = flatten(state.get("intermediates", {}))
  d = {
    "out_final": nchw(out["logits"]),
    "out_meta": nchw(out["meta_logits"]),
    "out_base": nchw(out["base_logits"]),
  }
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
  for name in ("gram_merge_in_bg", "gram_merge_in_fg", "cls_merge_in"):
    d[f"mid_{name}"] = nchw(mid[f"ensemble/{name}"])
  return mid, d
