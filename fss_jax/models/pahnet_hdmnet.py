"""PAHNet on HDMNet (``hdmnet_pahnet``, tianyu-zou/PAHNet ``HDMNet_PAHNet/model/HDMNetPlus.py``).

Forward (shared/reference/pahnet.md §5), NHWC, sizes for a 473 input (60x60 features);
HDMNet's steps (`fss_jax.models.hdmnet`) except where marked:

1. frozen SSP predictor: ``p_fg`` [B, 64, 64] (PAHNet);
2. frozen PSPNet features of the query and the supports, NOT masked (PAHNet);
3. ``down_query`` / ``down_supp`` on [layer3, layer2];
4. support prototypes (WGAP, bilinear mask);
5. the prototype prior (layer4 / feature 5 chosen per sample), 2 channels (PAHNet);
6. ``supp_merge`` / ``query_merge`` to 64 channels;
7. `TransformerPlus` (PAHNet: FG/BG support self-attention bias, PFE before every
   matching layer, ASC cross-attention) -> meta logits, correlation maps, 3 pseudo
   masks, coarse to fine;
8. base learner on feature 5, BAM's ensemble -> final;
9. final, meta and base resized to the input size.

Loss (§5.3): CE(final) + CE(meta) + distillation + CE(base, no gradient) + mean CE
of the 3 pseudo masks. The shared PAHNet steps are in `fss_jax.models.pahnet_common`;
the spec is registered by `fss_jax.models.pahnet`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.models import hdmnet as hdmnet_lib
from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models import ssp as ssp_lib
from fss_jax.models.inputs import check_episode
from fss_jax.models.pahnet_common import (
  frozen_features,
  level_priors,
  predictor_probability,
  pseudo_mask_ce,
)
from fss_jax.nn.attention import hdm
from fss_jax.nn.prototype import prototype_enhanced_keymap
from fss_jax.ops import losses
from fss_jax.ops.pooling import masked_average_pool
from fss_jax.ops.resize import resize_bilinear


class HDMNetPlus(nn.Module):
  """PAHNet's HDMNetPlus ``OneModel`` (pahnet.md §5).

  Attributes:
    shot: K.
    num_base_classes: base learner outputs incl. background (16 / 61).
    depth: PSPNet ResNet depth.
    predictor_size: the predictor's hard-coded output size (64).
    kshot_hidden: ``kshot_trans_dim`` (2).
    feature_dropout: Dropout2d after down_query / down_supp (0.5).
    transformer_dropout: dropout inside the transformer (0.1; the PFEs have none).
    remat: recompute the transformer layers in the backward (same parameters).
  """

  shot: int = 1
  num_base_classes: int = 16
  depth: int = 50
  predictor_size: int = 64
  kshot_hidden: int = 2
  feature_dropout: float = 0.5
  transformer_dropout: float = 0.1
  remat: bool = False

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """episode as `fss_jax.models.pahnet_sccan.SCCANPlus`. Returns {"logits": final
    [B, H, W, 2], "meta_logits", "base_logits" [B, H, W, N], "prob" [B, 64, 64, 2],
    "corr" (coarse to fine), "pseudo_masks" (coarse to fine), "prior" [B, h, w, 2],
    "est_val" [B], "intermediates"}."""
    b, k, hh, ww = check_episode(episode, self.shot)
    mid: dict[str, Any] = {}  # the intermediates the parity fixtures record

    # 1. predictor
    prob, mid["ssp"] = predictor_probability(
      ssp_lib.SSPMatchingNet(out_size=(self.predictor_size,) * 2, name="ssp"), episode
    )
    mid["pro_pred"] = prob

    # 2. frozen PSPNet features (query + unmasked supports in one batch)
    psp = pspnet_lib.PSPNet(
      num_classes=self.num_base_classes, depth=self.depth, frozen=True, name="pspnet"
    )
    fq, fs = frozen_features(
      psp, episode, mid, ("layer0", "layer1", "layer2", "layer3", "layer4", "feat5")
    )

    # 3. mid-level features [B(*K), h, w, 256]
    q = hdmnet_lib.DownProject(dropout=self.feature_dropout, name="down_query")(
      jnp.concatenate([fq["layer3"], fq["layer2"]], -1), train=train
    )
    s = hdmnet_lib.DownProject(dropout=self.feature_dropout, name="down_supp")(
      jnp.concatenate([fs["layer3"], fs["layer2"]], -1), train=train
    )
    mid["down_query_out"] = q
    mid["down_supp_out"] = s
    _, h, w, _ = s.shape

    # 4. prototypes (WGAP, bilinear ac=True mask) [B*K, 256]
    dtype = episode["query_image"].dtype
    mask = (episode["support_masks"] == 1).astype(dtype).reshape(b * k, hh, ww, 1)
    m_bil = resize_bilinear(mask, (h, w), align_corners=True)  # [B*K, h, w, 1]
    proto = masked_average_pool(s, m_bil, eps=0.0005)

    # 5. prototype prior [B, h, w, 2]
    fs_k = {n: fs[n].reshape(b, k, *fs[n].shape[1:]) for n in ("layer4", "feat5")}
    prior = level_priors(fq, fs_k, m_bil.reshape(b, k, h, w, 1), (h, w), mid)
    mid["prior"] = prior

    # 6. merge to the transformer width (64)
    q_in, s_in = hdmnet_lib.merge_inputs(q, s, proto, prior, mid)

    # 7. transformer
    meta, corr, pseudo, mid["transformer"] = hdm.TransformerPlus(
      shot=k, dropout=self.transformer_dropout, remat=self.remat, name="transformer"
    )(q_in, s_in, mask[..., 0], prior, prob[..., 1], train=train)
    mid["meta_logits_lowres"] = meta

    # 8. base learner and ensemble
    base = psp.classify(fq["feat5"], train=train)
    mid["base_logits_lowres"] = base
    ens = hdmnet_lib.learner_ensemble(
      meta,
      base,
      fq["layer2"],
      fs["layer2"],
      episode,
      shot=k,
      kshot_hidden=self.kshot_hidden,
      train=train,
    )

    # 9. outputs at the input resolution
    up = lambda t: resize_bilinear(t, (hh, ww), align_corners=True)
    return {
      "logits": up(ens["final"]),
      "meta_logits": up(meta),
      "base_logits": up(base),
      "prob": prob,
      "corr": corr,
      "pseudo_masks": tuple(pseudo),
      "prior": prior,
      "est_val": ens["est_val"],
      "intermediates": {**mid, "ensemble": ens["intermediates"]},
    }


def make_model(shot: int = 1, num_base_classes: int = 16, depth: int = 50, **fields) -> HDMNetPlus:
  return HDMNetPlus(shot=shot, num_base_classes=num_base_classes, depth=depth, **fields)


def loss_fn(
  outputs: Mapping[str, Any],
  episode: Mapping[str, jax.Array],
  *,
  aux_weight1: float = 1.0,
  aux_weight2: float = 1.0,
) -> tuple[jax.Array, dict]:
  """HDMNetPlus training loss (pahnet.md §5.3).

  ``CE(final) + CE(meta) + aux_weight1 * distil + aux_weight2 * (CE(base) + mean CE(pi_i))``;
  the base term carries no gradient and is left out without ``query_base_label``.
  """
  y = episode["query_mask"]
  pseudo = pseudo_mask_ce(outputs["pseudo_masks"], y)
  distil = hdm.correlation_distillation_terms(outputs["corr"], y)
  terms = {
    "ce_final": losses.cross_entropy(outputs["logits"], y),
    "ce_meta": losses.cross_entropy(outputs["meta_logits"], y),
    "distil": losses.mean_of(distil),
    "ce_pseudo": losses.mean_of(pseudo),
  }
  weights = {"distil": aux_weight1, "ce_pseudo": aux_weight2}
  if "query_base_label" in episode:
    terms["ce_base"] = jax.lax.stop_gradient(
      losses.cross_entropy(outputs["base_logits"], episode["query_base_label"])
    )
    weights["ce_base"] = aux_weight2
  return losses.weighted_sum(
    terms,
    weights,
    reported={**losses.parts("pseudo", pseudo), **losses.parts("distil_stage", distil)},
  )


_MATCH_SRC = re.compile(r"^(transformer\.mix_transformer\.match_layers\.\d+)\.(\d+)\.")


def keymap(
  shot: int = 1, num_base_classes: int = 16, depth: int = 50, kshot_hidden: int = 2, **unused
) -> list:
  """Official HDMNetPlus state dict (976 entries 1-shot, 980 K-shot) -> `HDMNetPlus`.

  HDMNet's key map (`fss_jax.models.hdmnet.hdmnet_keymap`) with the matching
  layers shifted by one index (``match_layers.i.0`` is now the PFE), plus the
  PFEs, the ASC projections of the matching layers, and SSP. The ``proj_q`` /
  ``proj_s`` of the down-sampling layers exist but are never used: ignored.
  """
  del num_base_classes, unused
  rules = []
  for r in hdmnet_lib.hdmnet_keymap(shot=shot, depth=depth, kshot_hidden=kshot_hidden):
    mt = _MATCH_SRC.match(r.src)
    if mt:
      r = dataclasses.replace(r, src=f"{mt.group(1)}.{int(mt.group(2)) + 1}.{r.src[mt.end() :]}")
    rules.append(r)
  t = "transformer.mix_transformer"
  for i in range(3):
    rules += prototype_enhanced_keymap(f"{t}.match_layers.{i}.0", ("transformer", f"match_pe_{i}"))
    for p in ("proj_q", "proj_s"):
      rules += keymaps.linear(
        f"{t}.match_layers.{i}.1.attn.attn.{p}",
        ("transformer", f"match_{i}", "attn", "attn", p),
        bias=False,
      )
      for j in (1, 2):
        rules.append(keymaps.Ignore(f"{t}.down_sample_layers.{i}.{j}.attn.attn.{p}.weight"))
  rules += ssp_lib.ssp_keymap(prefix="ssp.", dst=("ssp",))
  return rules
