"""JC²A: joint class-aware and class-agnostic alignment for few-shot segmentation.

Huang et al., arXiv 2211.01310. No official code exists; the spec is
``shared/reference/jc2a.md`` (§1 what the paper fixes and what was chosen, §14
the open points, each of which is a field of `JC2A` with the chosen default).

Forward (1-shot, jc2a.md §3), in the order of the paper's Fig. 2:

1. frozen deep-stem dilated ResNet (`ResNetDeepStem`, BN in inference mode);
   ``f_q = down_query([layer3, layer2])``, ``f_s = down_supp(...)`` (256-d, 1/8);
2. support mask ``M`` at 1/8 (bilinear, align_corners=True), prototype
   ``p = wGAP(f_s, M)``, masked support ``f̃_s = f_s ⊙ M``;
3. CKMM: class-agnostic map ``P_ag`` = per-image min-max of the mean cosine of
   the query's layer4 to the fold's base-class prototypes ``FP_base`` — a frozen
   parameter (``params/fp_base``), filled once when training starts from scratch
   from the file ``python -m fss_jax.train.jc2a_prior`` writes (``SPEC.derived_params``)
   and carried by every checkpoint;
4. per pyramid level (60, 30, 15, 8): HPAM = P2P (linear attention over all
   support positions) + P2B (linear attention over the top-k mask-covered 3×3
   support blocks, with position embeddings); MIA = ``init_merge`` on
   ``[q_l, p, P_aw, P_ag]``;
5. PFENet FEM decoder (`fss_jax.nn.decoder.FEMDecoder`) -> 2-class logits,
   upsampled to the input size.

K shots: decision-level fusion — the 1-shot pipeline runs per shot (shots folded
into the batch) and the softmax probabilities are averaged (``shot_fusion``).

Table 3 / 4 / 6 rows are fields: ``use_p2p``, ``use_p2b``, ``use_ckmm``;
``alignment`` ("ours" | "softmax" | "linear" | "cosine") and ``pos_embed``
("spatial" | "none"); ``hpam_fusion`` and ``mia_fusion`` ("add" | "multiply" |
"concat"). Parameter counts of each row: jc2a.md §11 and tests/test_jc2a.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps as km
from fss_jax.models import frozen
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.attention.linear import FUSIONS, HPAM, OPERATORS, POS_EMBEDS, fuse
from fss_jax.nn.backbones.resnet import ResNetDeepStem, resnet_keymap
from fss_jax.nn.decoder import FEMDecoder, MergeConv, pfenet_decoder_keymap
from fss_jax.ops.losses import cross_entropy, mean_of
from fss_jax.ops.pooling import adaptive_avg_pool, masked_average_pool
from fss_jax.ops.resize import resize_bilinear
from fss_jax.ops.similarity import CKMM_SIMILARITIES, ckmm_prior

SHOT_FUSIONS = ("prob", "logit")
BACKBONE_SOURCES = ("imagenet", "pspnet")


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def _level_sizes(bins: Sequence[float], side: int) -> list[int]:
  # PFENet: a bin <= 1.0 is a fraction of the feature side, else an absolute size.
  return [int(side * b) if b <= 1.0 else int(b) for b in bins]


class JC2A(nn.Module):
  """JC²A, 1-way K-shot. Every open point of jc2a.md §14 is a field (default = chosen).

  Attributes:
    shot: K of the run (informational: decision-level fusion handles the episode's K,
      so a 1-shot-trained model evaluates at 5 shots unchanged).
    layers: backbone depth, 50 or 101.
    reduce_dim: C of down_query / down_supp / HPAM / decoder (256).
    pyramid_bins: level sides (ints) or fractions of the feature side (PFENet's rule).
    top_k, block_size: P2B (Eq. 7, m).
    use_p2p, use_p2b, use_ckmm: Table 3 switches.
    hpam_fusion: P^d ∘ P^s (Table 6, "add").
    mia_fusion: P_aw ∘ P_ag (Table 6, "concat"; "add"/"multiply" broadcast the 1-channel map).
    alignment: HPAM operator (Table 4): "ours" | "softmax" | "linear" | "cosine".
    softmax_scale, linear_feature_map: operator options (see `AlignmentAttention`).
    pos_embed, pos_embed_std: P2B position embeddings (Table 4 "w/o PE" = "none").
    share_projections: one W_Q/W_K/W_V for P2P and P2B.
    num_base_classes: rows of the frozen ``fp_base`` parameter [n_base, D] (the fold's base
      classes: 15 PASCAL, 60 COCO); it is set from the prior file when training starts
      (``SPEC.derived_params``), never by the optimiser.
    ckmm_feature: backbone stage used by CKMM ("layer4").
    ckmm_similarity, ckmm_minmax, ckmm_eps: Eq. 13 choices.
    shot_fusion: "prob" (mean softmax; logits = log of it) or "logit" (mean logits).
    feat_dropout: Dropout2d after down_query / down_supp (0.5).
    cls_dropout: Dropout2d before the classifiers (0.1).
    prototype_eps: Weighted GAP eps (5e-4).
    backbone_bn_batch_stats: run the frozen backbone's BN with batch statistics in
      training (PFENet's own script; needs a mutable ``batch_stats``). Default False.
    num_classes: 2 (1-way).
  """

  shot: int = 1
  layers: int = 50
  reduce_dim: int = 256
  pyramid_bins: Sequence[float] = (60, 30, 15, 8)
  top_k: Sequence[int] = (60, 20, 5, 3)
  block_size: int = 3
  use_p2p: bool = True
  use_p2b: bool = True
  use_ckmm: bool = True
  hpam_fusion: str = "add"
  mia_fusion: str = "concat"
  alignment: str = "ours"
  softmax_scale: float | None = None
  linear_feature_map: str = "batchnorm"
  pos_embed: str = "spatial"
  pos_embed_std: float = 0.02
  share_projections: bool = True
  num_base_classes: int = 15
  ckmm_feature: str = "layer4"
  ckmm_similarity: str = "cosine"
  ckmm_minmax: bool = True
  ckmm_eps: float = 1e-7
  shot_fusion: str = "prob"
  feat_dropout: float = 0.5
  cls_dropout: float = 0.1
  prototype_eps: float = 5e-4
  backbone_bn_batch_stats: bool = False
  num_classes: int = 2

  def _check(self) -> None:
    for name, value, allowed in (
      ("hpam_fusion", self.hpam_fusion, FUSIONS),
      ("mia_fusion", self.mia_fusion, FUSIONS),
      ("alignment", self.alignment, OPERATORS),
      ("pos_embed", self.pos_embed, POS_EMBEDS),
      ("shot_fusion", self.shot_fusion, SHOT_FUSIONS),
      ("ckmm_similarity", self.ckmm_similarity, CKMM_SIMILARITIES),
    ):
      if value not in allowed:
        raise ValueError(f"JC2A: unknown {name} {value!r}; choose one of {allowed}")
    hpam = self.use_p2p or self.use_p2b
    if self.use_ckmm and hpam is False and self.mia_fusion != "concat":
      raise ValueError(
        f"JC2A: mia_fusion={self.mia_fusion!r} combines P_aw with P_ag and needs "
        "HPAM (use_p2p or use_p2b); use mia_fusion='concat'"
      )
    if len(self.top_k) != len(self.pyramid_bins):
      raise ValueError(
        f"JC2A: top_k {tuple(self.top_k)} and pyramid_bins "
        f"{tuple(self.pyramid_bins)} must have the same length"
      )

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """Segments the query of a 1-way K-shot episode.

    Args:
      episode: ``query_image [B, H, W, 3]``, ``support_images [B, K, H, W, 3]``,
        ``support_masks [B, K, H, W]`` (0 / 1 / 255; only 1 is foreground).
      train: dropout on (needs the ``dropout`` rng).

    Returns:
      ``logits [B, H, W, 2]`` (fused over shots), ``aux`` (per level [B, s, s, 2],
      fused), ``prior`` (P_ag [B, h, w, 1] when CKMM is on).
    """
    self._check()
    qimg = episode["query_image"]
    simg = episode["support_images"]
    smask = episode["support_masks"]
    b, img_h, img_w, _ = qimg.shape
    k = simg.shape[1]  # any K: the parameters do not depend on the shot count
    simg = simg.reshape(b * k, *simg.shape[2:])
    smask = smask.reshape(b * k, *smask.shape[2:])

    # Step 1-2: frozen backbone (shared instance; XLA drops the unused support layer4), or
    # the features `fss_jax.eval.cached` computed once per test image.
    cached = frozen.cached_features(episode)
    if cached is None:
      backbone = ResNetDeepStem(
        depth=self.layers, frozen=not self.backbone_bn_batch_stats, name="backbone"
      )
      fq = jax.tree.map(jax.lax.stop_gradient, backbone(qimg, train=train))
      fs = jax.tree.map(jax.lax.stop_gradient, backbone(simg, train=train))
    else:
      fq, fs = cached
    drop = nn.Dropout(self.feat_dropout, broadcast_dims=(1, 2), deterministic=not train)
    down = lambda name, f: drop(
      MergeConv(self.reduce_dim, name=name)(jnp.concatenate([f["layer3"], f["layer2"]], -1))
    )
    f_q = down("down_query", fq)  # [B, h, w, C]
    f_s = down("down_supp", fs)  # [BK, h, w, C]
    h, w = f_q.shape[1:3]
    m = resize_bilinear((smask == 1).astype(f_s.dtype)[..., None], (h, w), align_corners=True)
    proto = masked_average_pool(f_s, m, eps=self.prototype_eps)  # [BK, C]
    f_s_masked = f_s * m
    out: dict[str, Any] = {}

    # Step 3: CKMM (does not depend on the support: once per query).
    prior = None
    if self.use_ckmm:
      feat = fq[self.ckmm_feature]  # [B, h, w, D]
      fp_base = self.param(
        "fp_base",
        nn.initializers.zeros_init(),
        (self.num_base_classes, feat.shape[-1]),
        jnp.float32,
      )
      prior = ckmm_prior(
        feat,
        jax.lax.stop_gradient(fp_base),
        similarity=self.ckmm_similarity,
        minmax=self.ckmm_minmax,
        eps=self.ckmm_eps,
      )  # [B, h, w, 1]
      out["prior"] = prior
      prior = jnp.repeat(prior, k, axis=0)
    f_q = jnp.repeat(f_q, k, axis=0)  # [BK, h, w, C]

    # Step 4: pyramid, HPAM, MIA.
    sizes = _level_sizes(self.pyramid_bins, h)
    qs = [adaptive_avg_pool(f_q, (s, s)) for s in sizes]
    hpam_on = self.use_p2p or self.use_p2b
    if hpam_on:
      sps = [adaptive_avg_pool(f_s_masked, (s, s)) for s in sizes]
      ms = [adaptive_avg_pool(m, (s, s))[..., 0] for s in sizes]
      p_aw = HPAM(
        self.reduce_dim,
        tuple(self.top_k),
        self.block_size,
        self.use_p2p,
        self.use_p2b,
        self.hpam_fusion,
        self.alignment,
        self.softmax_scale,
        self.linear_feature_map,
        self.pos_embed,
        self.pos_embed_std,
        self.share_projections,
        name="hpam",
      )(qs, sps, ms, train=train)
    merged = []
    for l, (s, q_l) in enumerate(zip(sizes, qs)):
      parts = [q_l, jnp.broadcast_to(proto[:, None, None, :], q_l.shape)]
      pag = resize_bilinear(prior, (s, s), align_corners=True) if prior is not None else None
      if hpam_on and pag is not None and self.mia_fusion != "concat":
        parts.append(fuse(p_aw[l], pag, self.mia_fusion))
      else:
        parts += [p_aw[l]] if hpam_on else []
        parts += [pag] if pag is not None else []
      merged.append(MergeConv(self.reduce_dim, name=f"init_merge_{l}")(jnp.concatenate(parts, -1)))

    # Step 5: decoder.
    logits, aux = FEMDecoder(self.reduce_dim, self.num_classes, self.cls_dropout, name="decoder")(
      merged, train=train
    )
    logits = resize_bilinear(logits, (img_h, img_w), align_corners=True)
    out["logits"] = self._fuse_shots(logits, b, k)
    out["aux"] = tuple(self._fuse_shots(a, b, k) for a in aux)
    return out

  def _fuse_shots(self, logits: jax.Array, b: int, k: int) -> jax.Array:
    """[B·K, h, w, n] per-shot logits -> [B, h, w, n] (decision-level fusion)."""
    if k == 1:
      return logits
    logits = logits.reshape(b, k, *logits.shape[1:])
    if self.shot_fusion == "logit":
      return logits.mean(1)
    # log of the mean of the per-shot softmax probabilities.
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=1) - math.log(k)


# ---------------------------------------------------------------------------
# Loss, factory, key map, spec
# ---------------------------------------------------------------------------


def make_loss(aux_weight: float = 1.0):
  """PFENet loss: ``CE(out, y) + aux_weight · mean_l CE(up(aux_l), y)`` (ignore 255)."""

  def loss_fn(outputs: Mapping[str, Any], episode: Mapping[str, jax.Array]):
    y = episode["query_mask"]
    size = y.shape[1:3]
    logits = outputs["logits"]
    if logits.shape[1:3] != size:
      logits = resize_bilinear(logits, size, align_corners=True)
    main = cross_entropy(logits, y)
    aux_terms = [
      cross_entropy(resize_bilinear(a, size, align_corners=True), y) for a in outputs["aux"]
    ]
    aux = mean_of(aux_terms) if aux_terms else jnp.zeros((), jnp.float32)
    loss = main + aux_weight * aux
    return loss, {"loss": loss, "main_loss": main, "aux_loss": aux}

  return loss_fn


loss_fn = make_loss(1.0)


def make_model(**fields) -> JC2A:
  """`JC2A` from plain fields (no file I/O: FP_base is a parameter, see `derived_params`)."""
  names = {f.name for f in dataclasses.fields(JC2A)} - {"parent", "name"}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise TypeError(f"JC2A has no field(s) {unknown}; known: {sorted(names)}")
  return JC2A(**fields)


def _pspnet_extra_ignores(layers: int) -> list:
  """Keys of a BAM/PSPNet checkpoint that JC²A does not use (encoder copies, PPM, cls, aux)."""
  rules = []
  for r in resnet_keymap(depth=layers, stem="deep", naming="pspnet"):
    if r.src.startswith("layer"):
      stage, rest = r.src.split(".", 1)
      rules.append(km.Ignore(f"encoder.{stage[5:]}.{rest}"))
  bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
  names = [f"ppm.features.{i}.{n}" for i in range(4) for n in ["1.weight", *(f"2.{p}" for p in bn)]]
  names += ["cls.0.weight", "cls.4.weight", "cls.4.bias", *(f"cls.1.{p}" for p in bn)]
  names += ["aux.0.weight", *(f"aux.1.{p}" for p in bn), "aux.4.weight", "aux.4.bias"]
  return rules + [km.Ignore(n) for n in names]


def keymap(
  *, layers: int = 50, source: str = "imagenet", dst: Sequence[str] = (), **_unused
) -> list:
  """Backbone initialisation key map (no JC²A checkpoint exists to convert).

  ``python -m checkpoints.convert --model jc2a --src resnet50_v2.pth --dst W0
  [--model-arg layers=101] [--model-arg source=pspnet]`` writes the backbone's variables,
  which ``--config.init=W0`` loads under ``config.init_prefix = "backbone"`` (configs/jc2a.py).

  Args:
    layers: 50 or 101.
    source: "imagenet" (hszhao/semseg ``resnet{50,101}_v2.pth``: ``conv1, bn1, conv2, ...``,
      ``fc`` dropped) or "pspnet" (a PSPNet / BAM base-learner ``best.pth``: ``layer0.N``;
      its encoder copies, PPM, classifier and aux head are dropped).
    dst: Flax path of the backbone in the written tree: () (default) = the bare ResNet
      tree, ("backbone",) = its place inside `JC2A`.

  Returns:
    rules writing ``params/<dst>/...`` and ``batch_stats/<dst>/...``; the rest of the model
    starts from its (PyTorch-default) initialisation.
  """
  dst = tuple(dst)
  if source == "imagenet":
    return resnet_keymap(depth=layers, stem="deep", naming="resnet_v2", dst=dst)
  if source == "pspnet":
    return resnet_keymap(
      depth=layers, stem="deep", naming="pspnet", ignore_head=False, dst=dst
    ) + _pspnet_extra_ignores(layers)
  raise ValueError(f"unknown backbone source {source!r}; choose one of {BACKBONE_SOURCES}")


def pfenet_keymap(*, layers: int = 50) -> list:
  """Key map of the parts of a PFENet checkpoint JC²A can reuse (backbone, down_*, decoder).

  ``init_merge`` (513 vs 769 inputs), HPAM and FP_base have no PFENet counterpart;
  PFENet's ``res1`` / ``res2`` / ``cls`` / FEM keys match `FEMDecoder`'s.
  """
  rules = resnet_keymap(
    depth=layers, stem="deep", naming="pspnet", ignore_head=False, dst=("backbone",)
  )
  rules += km.conv("down_query.0", ("down_query", "conv"), bias=False)
  rules += km.conv("down_supp.0", ("down_supp", "conv"), bias=False)
  rules += pfenet_decoder_keymap("", ("decoder",))
  rules += [km.Ignore(f"init_merge.{i}.0.weight") for i in range(4)]
  return rules


def min_input_size(pyramid_bins: Sequence[float] = JC2A.pyramid_bins, **_) -> int:
  """One full cell of the stride-8 features (8 px), and every pyramid level at least 1 x 1: a
  fractional bin b needs ``int(ceil(H / 8) * b) >= 1`` (the smoke bins, down to 0.125: 57 px)."""
  side = 1
  while side < 4096 and min(_level_sizes(pyramid_bins, side), default=1) < 1:
    side += 1
  return max(8, 8 * (side - 1) + 1)


def encoder(
  *,
  layers: int = 50,
  use_ckmm: bool = True,
  ckmm_feature: str = "layer4",
  backbone_bn_batch_stats: bool = False,
  **_,
) -> frozen.FrozenEncoder:
  """The frozen backbone alone (cached evaluation): layer2 and layer3 (down_query /
  down_supp) and CKMM's stage (BN uses its running statistics at evaluation either way)."""
  keep = tuple(dict.fromkeys(("layer2", "layer3", *([ckmm_feature] if use_ckmm else []))))
  module = ResNetDeepStem(depth=layers, frozen=not backbone_bn_batch_stats)
  return frozen.FrozenEncoder(module, "backbone", keep)


SPEC = ModelSpec(
  name="jc2a",
  make_model=make_model,
  keymap=keymap,
  loss_fn=loss_fn,
  # The backbone and the FP_base constant (one pattern: fp_base exists only with CKMM).
  frozen=(r"backbone/.*|fp_base",),
  min_input_size=min_input_size,
  any_shot=True,  # decision-level fusion (mean softmax over shots): any K
  # FP_base from the fold's prior file when a run starts from scratch ({} without CKMM).
  derived_params="fss_jax.train.jc2a_prior:fp_base_params",
  encoder=encoder,
)
