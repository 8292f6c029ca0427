"""HDMNet (CVPR'23, Pbihao/HDMNet): hierarchical dense matching + correlation distillation.

Forward (hdmnet.md §3), NHWC, sizes for a 473 input (60x60 features):

1. Frozen PSPNet features of the query; of the supports *after multiplying the
   images by their binary masks*; all under stop_gradient.
2. ``q = Dropout2d(ReLU(conv1x1([f3, f2])))`` (``down_query``), same for the
   supports (``down_supp``), 1536 -> 256.
3. Support prototypes: masked average of ``s`` with the bilinearly
   (align_corners=True) resized mask (eps 5e-4).
4. Prior: per shot, max cosine over masked support positions (mask resized
   with torch's legacy nearest rule, cosine eps 1e-7, no min-max
   normalisation) for feature 5 (pre-ReLU cls output) and layer4; mean over shots.
5. ``S_in = ReLU(conv1x1([s, p]))`` (``supp_merge``), ``Q_in = ReLU(conv1x1([q,
   mean_k p, 10 * prior]))`` (``query_merge``), 64 channels.
6. `HierarchicalTransformer` -> meta logits [B, 60, 60, 2] and the correlation
   maps (15, 30, 60) for the distillation loss.
7. Base learner logits from feature 5; BAM `LearnerEnsemble` with the layer2
   Gram scene difference (support layer2 from the masked image).
8. ``final``, ``meta``, ``base`` bilinearly (align_corners=True) up-sampled to
   the input size. ``logits`` = final (probability-like values, used as
   logits by the loss and the argmax, as in the reference).

Loss (§5): CE(final) + CE(meta) + mean KL distillation + CE(base) (no gradient).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.models import frozen
from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models.inputs import check_episode
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.attention.hdm import (
  HierarchicalTransformer,
  correlation_distillation_terms,
  hierarchical_transformer_keymap,
)
from fss_jax.nn.ensemble import LearnerEnsemble, ensemble_keymap
from fss_jax.nn.layers import Conv2d
from fss_jax.ops import losses
from fss_jax.ops.pooling import masked_average_pool
from fss_jax.ops.resize import resize_bilinear, resize_nearest
from fss_jax.ops.similarity import correlation_prior

# The PSPNet features the parity fixtures record (intermediates ``feat_{query,support}_<n>``).
FEATURE_NAMES = ("layer0", "layer1", "layer2", "layer3", "layer4", "feat5")


class DownProject(nn.Module):
  """``down_query`` / ``down_supp``: conv1x1 (no bias) -> ReLU -> Dropout2d(0.5)."""

  features: int = 256
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.relu(Conv2d(self.features, 1, use_bias=False, name="conv")(x))
    return nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)


def episode_base_channel(episode: Mapping[str, jax.Array]) -> jax.Array | None:
  """``[B]`` base-learner channel of the episode class (``class_index + 1``), for training.

  ``class_index`` is the position of the episode class in the fold's training
  (base) class list (the reference's ``cat_idx``). Without it, the channel is
  read off the base label under the query foreground (the base annotation
  numbers base classes in the same order); None when neither is available.
  """
  if "class_index" in episode:
    return jnp.asarray(episode["class_index"]).astype(jnp.int32) + 1
  if "query_base_label" in episode:
    fg = episode["query_mask"] == 1
    lab = jnp.where(fg & (episode["query_base_label"] != 255), episode["query_base_label"], 0)
    return jnp.max(lab.reshape(lab.shape[0], -1), axis=1).astype(jnp.int32)
  return None


def merge_inputs(
  q: jax.Array, s: jax.Array, proto: jax.Array, prior: jax.Array, mid: dict
) -> tuple[jax.Array, jax.Array]:
  """Step 5 (also PAHNet's HDMNetPlus): to the transformer width (64), ReLU.

  ``S_in = conv1x1([s, p_k])`` (``supp_merge``), ``Q_in = conv1x1([q, mean_k p_k,
  10 * prior])`` (``query_merge``) for q [B, h, w, C], s [B*K, h, w, C], prototypes
  p [B*K, C] and the prior [B, h, w, 2]; records ``supp_merge_out`` / ``query_merge_out``
  in the intermediates ``mid``.
  """
  b, h, w, c = q.shape
  k = s.shape[0] // b
  proto_map = jnp.broadcast_to(proto[:, None, None, :], (b * k, h, w, c))
  s_in = nn.relu(
    Conv2d(64, 1, use_bias=False, name="supp_merge")(jnp.concatenate([s, proto_map], -1))
  )
  proto_mean = jnp.mean(proto.reshape(b, k, c), axis=1)
  q_in = nn.relu(
    Conv2d(64, 1, use_bias=False, name="query_merge")(
      jnp.concatenate(
        [q, jnp.broadcast_to(proto_mean[:, None, None, :], (b, h, w, c)), prior * 10.0], -1
      )
    )
  )
  mid["supp_merge_out"] = s_in
  mid["query_merge_out"] = q_in
  return q_in, s_in


def learner_ensemble(
  meta: jax.Array,
  base: jax.Array,
  query_layer2: jax.Array,
  support_layer2: jax.Array,
  episode: Mapping[str, jax.Array],
  *,
  shot: int,
  kshot_hidden: int,
  train: bool,
) -> dict:
  """Step 7 (also PAHNet's): BAM's `LearnerEnsemble` of the meta logits and the base
  learner's, with the layer2 Gram scene difference of the query [B, h, w, C] and each
  support [B*K, h, w, C]; K-shot weights without BAM's unsort (``kshot_unsort=False``);
  in training the episode class channel is left out of the base map."""
  exclude = episode_base_channel(episode) if train else None
  b = query_layer2.shape[0]
  return LearnerEnsemble(shot=shot, kshot_hidden=kshot_hidden, kshot_unsort=False, name="ensemble")(
    meta,
    base,
    query_layer2,
    support_layer2.reshape(b, shot, *support_layer2.shape[1:]),
    exclude_channel=exclude,
  )


class HDMNet(nn.Module):
  """HDMNet ``OneModel`` (ResNet-50 PSPNet backbone).

  Attributes:
    shot: K.
    num_base_classes: base learner outputs incl. background (16 PASCAL, 61 COCO).
    depth: backbone depth.
    kshot_hidden: ``kshot_trans_dim`` of the K-shot reweighting (2).
    mask_support_images: multiply support images by their masks before the
      backbone (HDMNet: True).
    remat: recompute the transformer layers in the backward (less memory, same parameters).
  """

  shot: int = 1
  num_base_classes: int = 16
  depth: int = 50
  kshot_hidden: int = 2
  mask_support_images: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """episode: query_image [B, H, W, 3], support_images [B, K, H, W, 3],
    support_masks [B, K, H, W] (0/1/255); training also query_mask and
    class_index / query_base_label.

    Returns:
      {"logits": final [B, H, W, 2], "meta_logits": [B, H, W, 2],
      "base_logits": [B, H, W, N], "corr": [B, h_i, w_i] x 3 (coarse to fine),
      "est_val": [B], "intermediates": {name: array}}.
    """
    b, k, hh, ww = check_episode(episode, self.shot)
    x, s_x = episode["query_image"], episode["support_images"]
    mid: dict[str, Any] = {}  # the intermediates the parity fixtures record
    psp = pspnet_lib.PSPNet(
      num_classes=self.num_base_classes, depth=self.depth, frozen=True, name="pspnet"
    )

    # 1. frozen features (query; supports from the masked images), or the features
    #    `fss_jax.eval.cached` computed once per test image (supports: per image and class)
    mask = (episode["support_masks"] == 1).astype(x.dtype).reshape(b * k, hh, ww, 1)
    cached = frozen.cached_features(episode)
    if cached is None:
      s_img = s_x.reshape(b * k, hh, ww, s_x.shape[-1])
      if self.mask_support_images:
        s_img = frozen.mask_foreground(s_img, episode["support_masks"].reshape(b * k, hh, ww))
      # One backbone pass over [queries; supports] (per-image ops only: BN is frozen).
      feats = psp.features(jnp.concatenate([x, s_img], 0), train=False)
      cached = frozen.split_rows(jax.lax.stop_gradient(feats), b)
    fq, fs = cached
    for name in frozen.feature_names(fq, FEATURE_NAMES):
      mid[f"feat_query_{name}"] = fq[name]
      mid[f"feat_support_{name}"] = fs[name]

    # 2. mid-level features
    q = DownProject(name="down_query")(
      jnp.concatenate([fq["layer3"], fq["layer2"]], -1), train=train
    )
    s = DownProject(name="down_supp")(
      jnp.concatenate([fs["layer3"], fs["layer2"]], -1), train=train
    )
    mid["down_query_out"] = q
    mid["down_supp_out"] = s
    _, h, w, _ = s.shape

    # 3. prototypes (Weighted GAP, bilinear ac=True mask)
    m_bil = resize_bilinear(mask, (h, w), align_corners=True)
    proto = masked_average_pool(s, m_bil, eps=0.0005)  # [B*K, 256]

    # 4. prior: max cosine to the masked support (legacy nearest mask), mean over shots
    m_near = resize_nearest(mask, (h, w))

    def prior(feat: str) -> jax.Array:
      fq_k = jnp.repeat(fq[feat], k, axis=0)  # row b*K + j
      p = correlation_prior(fq_k, fs[feat], m_near, eps=1e-7, reduce="max", normalize=False)
      return jnp.mean(p.reshape(b, k, h, w, 1), axis=1)

    sim1, sim2 = prior("feat5"), prior("layer4")
    mid["similarity_ppm_cls"] = sim1
    mid["similarity_layer4"] = sim2
    similarity = jnp.concatenate([sim1, sim2], axis=-1)  # [B, h, w, 2]

    # 5. merge to the transformer width
    q_in, s_in = merge_inputs(q, s, proto, similarity, mid)

    # 6. hierarchical transformer
    meta, corr, mid["transformer"] = HierarchicalTransformer(
      shot=k, remat=self.remat, name="transformer"
    )(q_in, s_in, mask[..., 0], similarity, train=train)
    mid["meta_logits_lowres"] = meta

    # 7. base learner and ensemble
    # The frozen classifier's logits carry no gradient (reference: requires_grad=False).
    base = jax.lax.stop_gradient(psp.classify(fq["feat5"], train=train))
    mid["base_logits_lowres"] = base
    ens = learner_ensemble(
      meta,
      base,
      fq["layer2"],
      fs["layer2"],
      episode,
      shot=k,
      kshot_hidden=self.kshot_hidden,
      train=train,
    )

    # 8. outputs at the input resolution
    up = lambda t: resize_bilinear(t, (hh, ww), align_corners=True)
    return {
      "logits": up(ens["final"]),
      "meta_logits": up(meta),
      "base_logits": up(base),
      "corr": corr,
      "est_val": ens["est_val"],
      "intermediates": {**mid, "ensemble": ens["intermediates"]},
    }


def loss_fn(
  outputs: Mapping[str, Any],
  episode: Mapping[str, jax.Array],
  *,
  aux_weight1: float = 1.0,
  aux_weight2: float = 1.0,
) -> tuple[jax.Array, dict]:
  """HDMNet's training loss (hdmnet.md §5).

  ``CE(final) + CE(meta) + aux_weight1 * distil + aux_weight2 * CE(base)``, CE
  with ignore 255 at the input resolution; ``final`` holds probability-like
  values used as logits (reference behaviour); the base term carries no
  gradient (frozen base learner) and is only reported. Without
  ``query_base_label`` the base term is left out.
  """
  y = episode["query_mask"]
  distil = correlation_distillation_terms(outputs["corr"], y)
  terms = {
    "ce_final": losses.cross_entropy(outputs["logits"], y),
    "ce_meta": losses.cross_entropy(outputs["meta_logits"], y),
    "distil": losses.mean_of(distil),
  }
  weights = {"distil": aux_weight1}
  if "query_base_label" in episode:
    terms["ce_base"] = jax.lax.stop_gradient(
      losses.cross_entropy(outputs["base_logits"], episode["query_base_label"])
    )
    weights["ce_base"] = aux_weight2
  return losses.weighted_sum(terms, weights, reported=losses.parts("distil_stage", distil))


# ---------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------


def hdmnet_keymap(
  *, shot: int = 1, depth: int = 50, kshot_hidden: int = 2, prefix: str = ""
) -> list:
  """Official HDMNet state-dict keys (after stripping ``module.``) -> `HDMNet` variables."""
  rules = pspnet_lib.pspnet_keymap(naming="hdmnet", depth=depth, dst=("pspnet",))
  for name in ("down_query", "down_supp"):
    rules += keymaps.conv(f"{name}.0", (name, "conv"), bias=False)
  rules += keymaps.conv("query_merge.0", ("query_merge",), bias=False)
  rules += keymaps.conv("supp_merge.0", ("supp_merge",), bias=False)
  rules += hierarchical_transformer_keymap("transformer.mix_transformer", ("transformer",))
  rules += ensemble_keymap("", ("ensemble",), shot=shot, kshot_hidden=kshot_hidden)
  return keymaps.prefixed(prefix, rules)


def make_model(
  shot: int = 1,
  num_base_classes: int = 16,
  depth: int = 50,
  kshot_hidden: int = 2,
  remat: bool = False,
) -> HDMNet:
  return HDMNet(
    shot=shot,
    num_base_classes=num_base_classes,
    depth=depth,
    kshot_hidden=kshot_hidden,
    remat=remat,
  )


def keymap(
  shot: int = 1,
  num_base_classes: int = 16,
  depth: int = 50,
  kshot_hidden: int = 2,
  remat: bool = False,
) -> list:
  del remat  # no parameters of its own
  return hdmnet_keymap(shot=shot, depth=depth, kshot_hidden=kshot_hidden)


def encoder(
  *, num_base_classes: int = 16, depth: int = 50, mask_support_images: bool = True, **_
) -> frozen.FrozenEncoder:
  """The frozen PSPNet features alone (cached evaluation); supports masked as in the forward."""
  return frozen.FrozenEncoder(
    pspnet_lib.PSPNet(num_classes=num_base_classes, depth=depth, frozen=True),
    scope="pspnet",
    method="features",
    keep=("layer2", "layer3", "layer4", "feat5"),
    masked_supports=frozen.mask_foreground if mask_support_images else None,
  )


SPEC = ModelSpec(
  "hdmnet",
  make_model,
  keymap,
  loss_fn=loss_fn,
  output="probabilities",  # BAM's ensemble mixes the meta and base softmaxes (hdmnet.md §3 step 8)
  # The PSPNet base learner (backbone, PPM, cls, classifier) is frozen; kshot_rw is in
  # no optimiser group of the reference (hdmnet.md §6), so it keeps its initial values.
  # One pattern, so that it matches in 1-shot models (no kshot_rw) as well.
  frozen=(r"(pspnet|ensemble/kshot_rw)/.*",),
  encoder=encoder,
  # The PSPNet base learner's PPM (41 px); the transformer's 4 x 4 reduction needs 25.
  min_input_size=pspnet_lib.MIN_INPUT_SIZE,
  # Only the training K: a K-shot model's ensemble has a learned K -> hidden -> K shot
  # weighting (kshot_rw, K > 1), which a 1-shot model lacks (any_shot stays False).
  any_shot=False,
)
