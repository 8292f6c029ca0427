"""PAHNet on SCCAN (``sccan_pahnet``, tianyu-zou/PAHNet ``SCCAN_PAHNet/model/SCCANPlus.py``).

Forward (shared/reference/pahnet.md §2-§3), NHWC, sizes for a 473 input:

1. frozen SSP predictor: ``p_fg`` [B, 64, 64];
2. frozen PSPNet features of the query and the UNMASKED supports (60x60);
3. SCCAN's ``down_query`` / ``down_supp`` on [layer2, layer3], resized to 64x64;
4. support masks at 64, prototypes (WGAP), shot means of mask and features;
5. the prototype prior (layer4 / feature 5 chosen per sample), 2 channels;
6. ``init_merge_query`` / ``init_merge_supp``;
7. 8 `SCCAPlusBlock`s (PFE + SCCA with ASC, FG/BG-restricted support
   self-attention) -> tokens and 8 pseudo masks;
8. SCCAN's ASPP decoder -> meta logits at 64;
9. base learner on feature 5 resized to 64, BAM's ensemble -> final;
10. final and meta resized to ``(H - 1) / 8 * zoom + 1``.

Loss (§4): CE(final) + Dice(meta) + mean CE of the 8 pseudo masks.
The shared PAHNet steps are in `fss_jax.models.pahnet_common`; the spec is
registered by `fss_jax.models.pahnet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.models import hdmnet as hdmnet_lib
from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models import sccan as sccan_lib
from fss_jax.models import ssp as ssp_lib
from fss_jax.models.inputs import check_episode
from fss_jax.models.pahnet_common import (
  frozen_features,
  level_priors,
  predictor_probability,
  pseudo_mask_ce,
)
from fss_jax.nn.aspp import ASPPDecoder
from fss_jax.nn.attention.sccan import SCCAPlusTransformer
from fss_jax.nn.ensemble import ensemble_keymap
from fss_jax.nn.layers import Conv2d
from fss_jax.nn.prototype import prototype_enhanced_keymap
from fss_jax.ops import losses
from fss_jax.ops.pooling import masked_average_pool
from fss_jax.ops.resize import resize_bilinear


class SCCANPlus(nn.Module):
  """PAHNet's SCCANPlus ``OneModel`` (pahnet.md §2).

  Attributes:
    shot: K.
    num_base_classes: base learner outputs incl. background (16 PASCAL, 61 COCO).
    depth: PSPNet ResNet depth.
    grid: working resolution (64; also the predictor's output size).
    reduce_dim, blocks, num_heads, window, mlp_ratio: transformer (256, 8, 8, 8, 1).
    kshot_hidden: ``kshot_trans_dim`` (2).
    zoom_factor: output size ``int((H - 1) / 8 * zoom + 1)``.
    feature_dropout, classifier_dropout: Dropout2d rates (0.5, 0.1).
    remat: recompute the transformer blocks in the backward (same parameters).
  """

  shot: int = 1
  num_base_classes: int = 16
  depth: int = 50
  grid: int = 64
  reduce_dim: int = 256
  blocks: int = 8
  num_heads: int = 8
  window: int = 8
  mlp_ratio: float = 1.0
  kshot_hidden: int = 2
  zoom_factor: int = 8
  feature_dropout: float = 0.5
  classifier_dropout: float = 0.1
  remat: bool = False

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """episode: query_image [B, H, W, 3], support_images [B, K, H, W, 3],
    support_masks [B, K, H, W]; training: query_mask, class_index / query_base_label.

    Returns:
      {"logits": final [B, H', W', 2] (probability-like, as the reference),
      "meta_logits": [B, H', W', 2], "base_logits": [B, 64, 64, N],
      "pseudo_masks": 8 x [B, 64, 64, 2], "prob": predictor softmax [B, 64, 64, 2],
      "prior": [B, 64, 64, 2], "est_val": [B], "intermediates": {name: array}}.
    """
    b, k, hh, ww = check_episode(episode, self.shot)
    mid: dict[str, Any] = {}  # the intermediates the parity fixtures record
    size = (self.grid, self.grid)
    up = lambda t, s=size: resize_bilinear(t, s, align_corners=True)

    # 1. predictor
    prob, mid["ssp"] = predictor_probability(
      ssp_lib.SSPMatchingNet(out_size=size, name="ssp"), episode
    )
    mid["pro_pred"] = prob
    p_fg = prob[..., 1]  # [B, 64, 64]

    # 2. frozen PSPNet features (query + unmasked supports in one batch)
    psp = pspnet_lib.PSPNet(
      num_classes=self.num_base_classes, depth=self.depth, frozen=True, name="pspnet"
    )
    fq, fs = frozen_features(psp, episode, mid, ("layer2", "layer3", "layer4", "feat5"))

    # 3. mid-level features [layer2, layer3] -> 1x1 -> ReLU -> Dropout2d -> 64x64
    drop = nn.Dropout(self.feature_dropout, broadcast_dims=(1, 2), deterministic=not train)
    conv1x1 = lambda name: Conv2d(self.reduce_dim, 1, use_bias=False, name=name)
    q_mid = drop(nn.relu(conv1x1("down_query")(jnp.concatenate([fq["layer2"], fq["layer3"]], -1))))
    s_mid = drop(nn.relu(conv1x1("down_supp")(jnp.concatenate([fs["layer2"], fs["layer3"]], -1))))
    mid["down_query_out"] = q_mid
    mid["down_supp_out"] = s_mid
    query_feat = up(q_mid)  # [B, 64, 64, 256]
    supp_feat = up(s_mid).reshape(b, k, *size, self.reduce_dim)  # [B, K, 64, 64, 256]

    # 4. support f4 / f5 at 64, masks, prototypes, shot means (supports NOT masked)
    fs_hi = {n: up(fs[n]).reshape(b, k, *size, -1) for n in ("layer4", "feat5")}
    dtype = episode["query_image"].dtype
    fg = (episode["support_masks"] == 1).astype(dtype).reshape(b * k, hh, ww, 1)
    masks = up(fg).reshape(b, k, *size, 1)  # [B, K, 64, 64, 1]
    protos = masked_average_pool(
      supp_feat.reshape(b * k, *size, -1), masks.reshape(b * k, *size, 1), eps=0.0005
    )
    proto = jnp.mean(protos.reshape(b, k, -1), axis=1)  # [B, 256]
    supp_mask = jnp.mean(masks, axis=1)  # [B, 64, 64, 1]
    supp_mean = jnp.mean(supp_feat, axis=1)
    proto_map = jnp.broadcast_to(proto[:, None, None, :], query_feat.shape)

    # 5. prototype prior (query at backbone resolution, output 64)
    prior = level_priors(fq, fs_hi, masks, size, mid)  # [B, 64, 64, 2]
    mid["prior"] = prior

    # 6. input projections
    q0 = conv1x1("init_merge_query")(jnp.concatenate([query_feat, proto_map, prior], -1))
    s0 = conv1x1("init_merge_supp")(jnp.concatenate([supp_mean, proto_map, supp_mask], -1))
    mid["init_merge_query_out"] = q0
    mid["init_merge_supp_out"] = s0

    # 7. transformer: tokens [B, 64, 64, 256], pseudo masks 8 x [B, 64, 64, 2]
    t, mid["transformer"] = SCCAPlusTransformer(
      self.reduce_dim,
      self.blocks,
      self.num_heads,
      self.window,
      self.mlp_ratio,
      remat=self.remat,
      name="transformer",
    )(q0, s0, supp_mask, p_fg)
    mid["transformer_out"] = t
    pseudo = tuple(mid["transformer"][f"blocks_{i}"]["pseudo"] for i in range(self.blocks))

    # 8. decoder (ReLU -> ASPP -> res1 -> res2 -> cls)
    meta, mid["decoder"] = ASPPDecoder(self.reduce_dim, 2, self.classifier_dropout, name="decoder")(
      t, train=train
    )
    mid["meta_logits_lowres"] = meta

    # 9. base learner on feature 5 at 64, ensemble
    base = psp.classify(up(fq["feat5"]), train=train)
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

    # 10. output size
    out_size = (int((hh - 1) / 8 * self.zoom_factor + 1), int((ww - 1) / 8 * self.zoom_factor + 1))
    final, meta_up = ens["final"], meta
    if self.zoom_factor != 1:
      final, meta_up = up(final, out_size), up(meta, out_size)
    return {
      "logits": final,
      "meta_logits": meta_up,
      "base_logits": base,
      "pseudo_masks": pseudo,
      "prob": prob,
      "prior": prior,
      "est_val": ens["est_val"],
      "intermediates": {**mid, "ensemble": ens["intermediates"]},
    }


def make_model(shot: int = 1, num_base_classes: int = 16, depth: int = 50, **fields) -> SCCANPlus:
  return SCCANPlus(shot=shot, num_base_classes=num_base_classes, depth=depth, **fields)


def loss_fn(
  outputs: Mapping[str, Any],
  episode: Mapping[str, jax.Array],
  *,
  aux_weight1: float = 1.0,
  aux_weight2: float = 1.0,
) -> tuple[jax.Array, dict]:
  """SCCANPlus training loss (pahnet.md §4).

  ``CE(final) + aux_weight1 * Dice(meta) + aux_weight2 * mean_n CE(pi_n, nearest(y, 64))``.
  """
  y = episode["query_mask"]
  if outputs["logits"].shape[1:3] != y.shape[1:3]:
    raise ValueError(
      f"logits {tuple(outputs['logits'].shape)} and query_mask {tuple(y.shape)} "
      "differ in size; SCCANPlus trains with zoom_factor=8"
    )
  pseudo = pseudo_mask_ce(outputs["pseudo_masks"], y)
  terms = {
    "ce_final": losses.cross_entropy(outputs["logits"], y),
    "dice_meta": losses.weighted_dice_loss(outputs["meta_logits"], y),
    "ce_pseudo": losses.mean_of(pseudo),
  }
  return losses.weighted_sum(
    terms,
    {"dice_meta": aux_weight1, "ce_pseudo": aux_weight2},
    reported=losses.parts("pseudo", pseudo),
  )


def keymap(
  shot: int = 1,
  num_base_classes: int = 16,
  depth: int = 50,
  blocks: int = 8,
  kshot_hidden: int = 2,
  **unused,
) -> list:
  """Official SCCANPlus state dict (1080 entries for 1-shot ResNet-50) -> `SCCANPlus`.

  SCCAN's own names (down_*, init_merge_*, transformer blocks, norm0, decoder)
  come from `fss_jax.models.sccan.keymap` without its backbone; the PSPNet,
  SSP, PFE, ASC projections and ensemble are added here. ``attn_s.proj_q`` /
  ``attn_s.proj_s`` exist in the checkpoints but are never used: ignored.
  """
  del num_base_classes, unused
  rules = [r for r in sccan_lib.keymap(depth=blocks) if not r.src.startswith("backbone.")]
  rules += pspnet_lib.pspnet_keymap(naming="pahnet", depth=depth, dst=("pspnet",))
  rules += ssp_lib.ssp_keymap(prefix="ssp.", dst=("ssp",))
  for n in range(blocks):
    src, dst = f"transformer.layers.0.blocks.{n}", ("transformer", f"blocks_{n}")
    rules += prototype_enhanced_keymap(f"{src}.pe", (*dst, "pe"))
    rules += keymaps.linear(f"{src}.attn_q.proj_q", (*dst, "asc_proj_q"))
    rules += keymaps.linear(f"{src}.attn_q.proj_s", (*dst, "asc_proj_s"))
    for p in ("proj_q", "proj_s"):
      rules += [keymaps.Ignore(f"{src}.attn_s.{p}.{t}") for t in ("weight", "bias")]
  rules += ensemble_keymap("", ("ensemble",), shot=shot, kshot_hidden=kshot_hidden)
  return rules
