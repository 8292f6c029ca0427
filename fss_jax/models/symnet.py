"""Sym-Net (Sunbaoquan/Sym-Net): symmetrical support-query prototypes with a self-activation
prior mask, visual-text alignment and top-down hyper-correlation (symnet.md).

Forward (§2), NHWC, sizes for a 473 input (60 x 60 features), 1-way, K shots:

1. Class embedding ``t = E[class_id]`` [B, 300] from the packaged word2vec table
   (`fss_jax.assets`, SHA-256 checked; row = original class id).
2. Frozen deep-stem ResNet on the query and the *unmasked* supports, bottleneck by
   bottleneck (`ResNetBlocks`): stage outputs and the 16 pre-ReLU block outputs.
3. ``f_q = Dropout2d(ReLU(conv1x1([l3, l2])))`` (``down_query``), ``f_s`` likewise
   (``down_supp``); support prototypes by Weighted GAP; support text prototypes
   ``APA(f_s * m, t, p)``; multi-layer correlations (layer4/3/2 blocks).
4. TDC on the shot-mean correlation stacks -> H [B, 60, 60, 48].
5. Gram scene difference of layer2 and K-shot weights w (BAM).
6. SPM prior pyramid R (60, 30, 15, 8) from layer4, shots weighted by w.
7. ``ts = sum_k w_k ts_k``; query self-prototypes (fg / ambiguous / bg) on R_0;
   ``tq = APA(f_q * R_0, t, q_fg)``; hybrid prototype ``g = (tq + ts) / 2``.
8. Per level ``init_merge([pool(f_q), g, H, R_l])`` -> PFENet FEM decoder -> meta logits
   and 4 auxiliary logits.
9. Base learner (PPM + PSPNet classifier on layer4) and the BAM ensemble.
10. final / meta / base bilinearly (align_corners=True) up-sampled to the input size;
    ``logits`` = final (probability-like values used as logits, as in the reference).

Loss (§6): ``CE(final) + CE(meta) + CE(base) [no gradient] + mean_l CE(aux_l) +
triplet`` (support + query hard triplet terms), all weights 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import assets, keymaps
from fss_jax.models import frozen
from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models.inputs import check_episode
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.backbones import resnet
from fss_jax.nn.block_features import ResNetBlocksDeepStem, stage_outputs
from fss_jax.nn.decoder import FEMDecoder, MergeConv, pfenet_decoder_keymap
from fss_jax.nn.ensemble import ensemble_keymap
from fss_jax.nn.symnet_blocks import (
  APA,
  TDC,
  ShotWeightedEnsemble,
  class_embeddings,
  hard_triplet_loss,
  multilayer_correlation,
  query_self_prototypes,
  self_activation_prior,
)
from fss_jax.ops import losses
from fss_jax.ops.pooling import adaptive_avg_pool, masked_average_pool
from fss_jax.ops.resize import resize_bilinear, resize_nearest

REDUCE_DIM = 256


def default_scales(feature_size: int, levels: int = 4) -> tuple[int, ...]:
  """Pyramid bins that follow the feature size: ``round(s / 2^l)`` (round half to even).

  60 -> (60, 30, 15, 8) (PASCAL 473), 81 -> (81, 40, 20, 10) (COCO 641),
  31 -> (31, 16, 8, 4) (241, the parity fixture): the values of the released configs.
  """
  return tuple(max(1, int(round(feature_size / 2**l))) for l in range(levels))


def feature_size(input_size: int) -> int:
  """Side of the stride-8 backbone maps for an input side (473 -> 60, 641 -> 81)."""
  s = (input_size - 1) // 2 + 1  # stem conv s2
  s = (s - 1) // 2 + 1  # max-pool s2
  return (s - 1) // 2 + 1  # layer2 s2


def base_channel(episode: Mapping[str, jax.Array]) -> jax.Array | None:
  """``[B]`` base-learner channel of the episode class (``class_index + 1``) or None."""
  if "class_index" not in episode:
    return None
  return jnp.asarray(episode["class_index"]).reshape(-1).astype(jnp.int32) + 1


class SymNet(nn.Module):
  """Sym-Net ``SymNet`` (ResNet PSPNet backbone, word2vec APA).

  Attributes:
    shot: K.
    dataset: "pascal5i" or "coco20i": selects the word2vec table (and must agree with
      ``num_base_classes``).
    num_base_classes: base learner outputs incl. background (16 PASCAL, 61 COCO).
    depth: backbone depth (50; 101 builds but no released config uses it).
    scales: decoder / SPM pyramid bins; ``()`` follows the feature size
      (`default_scales`). The first bin must equal the feature size.
    kshot_hidden: ``kshot_trans_dim`` (hard-coded 2 in the reference).
    embedding_path: optional custom class-embedding table (.npy, rows = class ids);
      "" uses the packaged word2vec table.
    check_class_ids: raise `assets.AssetError` when a class id falls outside the
      embedding table (when the ids are concrete; under jit such an episode's outputs
      are NaN).
  """

  shot: int = 1
  dataset: str = "pascal5i"
  num_base_classes: int = 16
  depth: int = 50
  scales: Sequence[int] = ()
  kshot_hidden: int = 2
  embedding_path: str = ""
  check_class_ids: bool = True

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """episode: query_image [B, H, W, 3], support_images [B, K, H, W, 3],
    support_masks [B, K, H, W] (0/1/255), class_id [B] (original class id);
    training also query_mask and class_index (fold-local base index).

    Returns:
      {"logits": final [B, H', W', 2], "meta_logits": [B, H', W', 2], "base_logits":
      [B, H', W', N], "aux_logits": 4 x [B, s_l, s_l, 2], "est_val": [B], "prior":
      [B, h, w, 1], and (training) the triplet-loss inputs "support_text",
      "support_features", "query_text", "query_ambiguous", "query_background"; and
      "intermediates" {name: array} (what the parity fixtures record)}.
      H' = (H - 1) / 8 * 8 + 1 = H.
    """
    b, k, hh, ww = check_episode(episode, self.shot)
    x, s_x = episode["query_image"], episode["support_images"]
    dataset = assets.canonical_dataset(self.dataset)
    want_base = pspnet_lib.num_base_classes(dataset)
    if self.num_base_classes != want_base:
      raise ValueError(
        f"num_base_classes={self.num_base_classes} does not fit {dataset} "
        f"({want_base} = background + base classes); the dataset and the base "
        f"learner must agree"
      )
    h = w = feature_size(hh)
    if hh != ww:
      raise ValueError(
        f"Sym-Net's square pyramid bins need square inputs, got {hh}x{ww}; "
        f"use square crops (config data.train_size / test_size)"
      )
    scales = tuple(self.scales) or default_scales(h)
    if scales[0] != h:
      raise ValueError(
        f"the first pyramid bin ({scales[0]}) must equal the feature size {h} "
        f"(input {hh}); set scales=() to follow the input size, or "
        f"{default_scales(h)}"
      )
    mid: dict[str, Any] = {}  # the intermediates the parity fixtures record

    # 1. class embedding
    text = class_embeddings(
      episode, b, self.dataset, self.embedding_path or None, check=self.check_class_ids
    )  # [B, T]

    # 2. frozen backbone, block by block (query and supports in one pass; BN frozen), or the
    #    features `fss_jax.eval.cached` computed once per test image
    psp = pspnet_lib.PSPNetBlocks(
      num_classes=self.num_base_classes, depth=self.depth, frozen=True, name="pspnet"
    )
    cached = frozen.cached_features(episode)
    if cached is None:
      imgs = jnp.concatenate([x, s_x.reshape(b * k, hh, ww, s_x.shape[-1])], 0)
      feats = jax.lax.stop_gradient(psp.backbone(imgs, train=False))
      cached = frozen.split_rows(frozen.flatten(feats), b)  # layer<n>, blocks_<i>: [B(*K), ...]
    for n, v in cached[0].items():
      tag = f"block_%s_{n[7:]}" if n.startswith("blocks_") else f"feat_%s_{n}"
      mid[tag % "query"] = v
      mid[tag % "support"] = cached[1][n]
    sizes = resnet.stage_sizes(self.depth)
    (lq, bq), (ls, bs) = (stage_outputs(f, sizes) for f in cached)  # cached: blocks only
    assert lq[4].shape[1:3] == (h, w), (lq[4].shape, h, w)

    # 3. mid-level features, prototypes, support text prototypes, correlations
    def down(name, f2, f3):
      y = MergeConv(REDUCE_DIM, name=name)(jnp.concatenate([f3, f2], -1))
      return nn.Dropout(0.5, broadcast_dims=(1, 2))(y, deterministic=not train)

    f_q = down("down_query", lq[2], lq[3])  # [B, h, w, 256]
    f_s = down("down_supp", ls[2], ls[3])  # [B*K, h, w, 256]
    mid["down_query_out"] = f_q
    mid["down_supp_out"] = f_s
    masks = (episode["support_masks"] == 1).astype(x.dtype)  # [B, K, H, W]
    m_full = masks.reshape(b * k, hh, ww, 1)
    m = resize_bilinear(m_full, (h, w), align_corners=True)  # binary (§0)
    proto = masked_average_pool(f_s, m, eps=0.0005)  # [B*K, 256]
    mid["supp_proto"] = proto
    apa = APA(REDUCE_DIM, name="apa")
    ts_k = apa(f_s * m, jnp.repeat(text, k, axis=0), proto, train=train)  # [B*K, 256]
    mid["apa_support"] = ts_k

    corr: list[list[jax.Array]] = [[], [], []]
    for j in range(k):
      pick = lambda f, j=j: f.reshape(b, k, *f.shape[1:])[:, j]
      cs = multilayer_correlation(bq, jax.tree.map(pick, bs), pick(m_full), sizes)  # None stays
      for lvl in range(3):
        corr[lvl].append(cs[lvl])
    for lvl, name in enumerate(("l4", "l3", "l2")):
      mid[f"corr_shot0_{name}"] = corr[lvl][0]
    h4, h3, h2 = (losses.mean_of(c) for c in corr)  # mean over the K shots

    # 4. top-down hyper-correlation
    hyper = TDC(name="tdc")(h2, h3, h4)  # [B, h, w, 48]
    mid["tdc_out"] = hyper

    # 5. scene difference, shot weights
    ensemble = ShotWeightedEnsemble(shot=k, kshot_hidden=self.kshot_hidden, name="ensemble")
    weights, e_all = ensemble.shot_weights(lq[2], ls[2].reshape(b, k, *ls[2].shape[1:]))
    est = jnp.sum(weights * e_all, axis=1)  # [B]
    mid["shot_weight"] = weights
    mid["est_val"] = est

    # 6. SPM prior pyramid
    priors = self_activation_prior(
      lq[4], ls[4].reshape(b, k, h, w, -1), m.reshape(b, k, h, w), weights, scales
    )
    for i, r in enumerate(priors):
      mid[f"spm_bin{i}"] = r

    # 7. prototypes
    ts = jnp.sum(weights[..., None] * ts_k.reshape(b, k, -1), axis=1)  # [B, 256]
    q_fg, q_amb, q_bg = query_self_prototypes(f_q, priors[0])
    mid["query_pro_fg"] = q_fg
    mid["query_pro_hard"] = q_amb
    mid["query_pro_bg"] = q_bg
    tq = apa(f_q * priors[0], text, q_fg, train=train)
    mid["apa_query"] = tq
    g = 0.5 * tq + 0.5 * ts
    mid["hybrid_proto"] = g

    # 8. multi-scale merge + PFENet decoder
    merged = []
    for idx, s in enumerate(scales):
      parts = [
        adaptive_avg_pool(f_q, (s, s)),
        jnp.broadcast_to(g[:, None, None, :], (b, s, s, g.shape[-1])),
        resize_bilinear(hyper, (s, s), align_corners=True),
        priors[idx],
      ]
      merged.append(MergeConv(REDUCE_DIM, name=f"init_merge_{idx}")(jnp.concatenate(parts, -1)))
    meta, aux = FEMDecoder(REDUCE_DIM, 2, name="decoder")(merged, train=train)
    for i, a in enumerate(aux):
      mid[f"inner_cls{i}"] = a
    mid["meta_logits_lowres"] = meta

    # 9. base learner + ensemble
    base = psp.base_logits(lq[4], train=train)  # no gradient reaches pspnet (frozen)
    mid["base_logits_lowres"] = base
    ens = ensemble(meta, base, est, exclude_channel=base_channel(episode) if train else None)
    mid.update(ens["intermediates"])

    # 10. outputs at the input resolution
    size = (pspnet_lib.output_size(hh), pspnet_lib.output_size(ww))
    up = lambda t: resize_bilinear(t, size, align_corners=True)
    out = {
      "logits": up(ens["final"]),
      "meta_logits": up(meta),
      "base_logits": up(base),
      "aux_logits": aux,
      "est_val": est,
      "prior": priors[0],
      "intermediates": mid,
    }
    if train:
      out.update(
        support_text=ts,
        support_features=f_s.reshape(b, k, h, w, -1),
        query_text=tq,
        query_ambiguous=q_amb,
        query_background=q_bg,
      )
    return out


def loss_fn(outputs: Mapping[str, Any], episode: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Sym-Net's training loss (symnet.md §6), every weight 1.0.

  ``main = CE(final)``, ``aux1 = CE(meta)``, ``aux2 = CE(base, query_base_label)``
  (stop-gradient: frozen base learner; left out without base labels),
  ``aux_inner = mean_l CE(up(aux_l))``, ``triplet`` = support + query hard triplet
  loss. CE ignores 255 and runs at the input resolution.
  """
  y = episode["query_mask"]
  size = y.shape[1:3]
  terms = {
    "main": losses.cross_entropy(outputs["logits"], y),
    "aux1": losses.cross_entropy(outputs["meta_logits"], y),
  }
  if "query_base_label" in episode:
    terms["aux2"] = jax.lax.stop_gradient(
      losses.cross_entropy(outputs["base_logits"], episode["query_base_label"])
    )
  aux = outputs["aux_logits"]
  inner = [losses.cross_entropy(resize_bilinear(a, size, align_corners=True), y) for a in aux]
  terms["aux_inner"] = losses.mean_of(inner)
  if "support_features" in outputs:
    feats = outputs["support_features"]
    b, k, h, w, _ = feats.shape
    masks = (episode["support_masks"] == 1).astype(jnp.float32)
    small = resize_nearest(masks.reshape(b * k, *masks.shape[2:], 1), (h, w)).reshape(b, k, h, w)
    query = [outputs[n] for n in ("query_text", "query_ambiguous", "query_background")]
    terms["triplet"] = hard_triplet_loss(outputs["support_text"], feats, small, *query)
  return losses.weighted_sum(terms, reported=losses.parts("inner", inner))


# ---------------------------------------------------------------------------
# Key map (official checkpoints: 420 keys 1-shot, 424 5-shot, `module.` stripped)
# ---------------------------------------------------------------------------


def symnet_keymap(
  *, shot: int = 1, depth: int = 50, levels: int = 4, kshot_hidden: int = 2, prefix: str = ""
) -> list:
  """Official Sym-Net state-dict keys -> `SymNet` variables."""
  # The PSPNet base learner under BAM's names, renamed to Sym-Net's: the backbone keeps
  # layer0..4, `learner_base = Sequential(ppm, cls)` (BAM's encoder.* copies do not exist).
  rename = (("ppm.", "learner_base.0."), ("cls.", "learner_base.1."))
  rules = []
  for r in pspnet_lib.pspnet_keymap(naming="bam", depth=depth, dst=("pspnet",)):
    if r.src.startswith("encoder."):
      continue
    for old, new in rename:
      if r.src.startswith(old):
        r = dataclasses.replace(r, src=new + r.src[len(old) :])
    rules.append(r)
  for name in ("down_query", "down_supp"):
    rules += keymaps.conv(f"{name}.0", (name, "conv"), bias=False)
  for i in range(levels):
    rules += keymaps.conv(f"init_merge.{i}.0", (f"init_merge_{i}", "conv"), bias=False)
  rules += pfenet_decoder_keymap("", ("decoder",), levels=levels)
  tdc = {"merge1.0": "merge1_conv", "merge2.0": "merge2_conv", "merge2.3": "merge2_out"}
  for src, dst in {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", **tdc}.items():
    rules += keymaps.conv(f"hyper_final.{src}", ("tdc", dst))
  for src, dst in (("merge1.1", "merge1_norm"), ("merge2.1", "merge2_norm")):
    rules += keymaps.layer_norm(f"hyper_final.{src}", ("tdc", dst))  # GroupNorm: scale/bias
  rules += ensemble_keymap("", ("ensemble",), shot=shot, kshot_hidden=kshot_hidden)
  rules += keymaps.copy("CrossAttention.weight", ("apa", "weight"))  # used as q @ W: no transpose
  rules += keymaps.linear("CrossAttention.w_q", ("apa", "w_q"), bias=False)
  rules += keymaps.conv("CrossAttention.w_k", ("apa", "w_k"), bias=False)
  rules += keymaps.linear("CrossAttention.proj", ("apa", "proj"))
  return keymaps.prefixed(prefix, rules)


def make_model(
  shot: int = 1,
  dataset: str = "pascal5i",
  num_base_classes: int = 0,
  depth: int = 50,
  scales: Sequence[int] = (),
  kshot_hidden: int = 2,
  embedding_path: str = "",
  check_class_ids: bool = True,
) -> SymNet:
  """Registry factory; ``num_base_classes=0`` follows the dataset (16 / 61)."""
  dataset = assets.canonical_dataset(dataset)
  return SymNet(
    shot=shot,
    dataset=dataset,
    num_base_classes=num_base_classes or pspnet_lib.num_base_classes(dataset),
    depth=depth,
    scales=tuple(scales),
    kshot_hidden=kshot_hidden,
    embedding_path=embedding_path,
    check_class_ids=check_class_ids,
  )


def keymap(
  shot: int = 1, depth: int = 50, scales: Sequence[int] = (), kshot_hidden: int = 2, **_
) -> list:
  return symnet_keymap(shot=shot, depth=depth, levels=len(scales) or 4, kshot_hidden=kshot_hidden)


def encoder(*, depth: int = 50, **_) -> frozen.FrozenEncoder:
  """The base learner's backbone alone (cached evaluation): the pre-ReLU outputs of the blocks
  of layers 2-4, which the correlations read (layers 2-4 are the ReLUs of their last blocks)."""
  sizes = resnet.stage_sizes(depth)
  keep = tuple(f"blocks_{i}" for i in range(sizes[0], sum(sizes)))
  return frozen.FrozenEncoder(
    ResNetBlocksDeepStem(depth=depth, frozen=True), "pspnet/backbone", keep
  )


# Frozen: the PSPNet base learner (backbone, PPM, cls, classifier). Everything else is in
# the reference's optimiser groups (incl. kshot_rw for K > 1 and the [1, 0] merges).
FROZEN = ("pspnet/.*",)

# min_input_size: its PSPNet base learner's PPM. any_shot False: a K-shot model has a learned
# K -> hidden -> K shot weighting (kshot_rw) that a model of another K lacks, so only the training K.
SPEC = ModelSpec(
  "symnet",
  make_model,
  keymap,
  loss_fn=loss_fn,
  frozen=FROZEN,
  min_input_size=pspnet_lib.MIN_INPUT_SIZE,
  any_shot=False,
  output="probabilities",  # BAM's ensemble of meta and base softmaxes
  class_conditioned=True,
  encoder=encoder,
)  # the class's word embedding enters the forward
