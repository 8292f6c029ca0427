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
   the query's layer4 to the fold's base-class prototypes ``FP_base`` (a constant
   computed once per fold by ``python -m fss_jax.models.jc2a_prior``);
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
import functools
import math
import io
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fss_jax import io as fss_io
from fss_jax import keymaps as km
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.attention.linear import OPERATORS, AlignmentAttention
from fss_jax.nn.backbones.resnet import ResNetDeepStem, resnet_keymap
from fss_jax.nn.decoder import FEMDecoder, MergeConv, pfenet_decoder_keymap
from fss_jax.ops.pooling import adaptive_avg_pool, masked_average_pool
from fss_jax.ops.resize import resize_bilinear
from fss_jax.ops.losses import cross_entropy

FUSIONS = ("add", "multiply", "concat")
POS_EMBEDS = ("spatial", "channel", "none")
SHOT_FUSIONS = ("prob", "logit")
CKMM_SIMILARITIES = ("cosine", "dot")
BACKBONE_SOURCES = ("imagenet", "pspnet")
FP_BASE_FORMAT = 1
PRIOR_MODULE = "fss_jax.models.jc2a_prior"


# ---------------------------------------------------------------------------
# FP_base: the CKMM constant (jc2a.md §5.1)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class FPBase:
  """Base-class feature prototypes of one fold (a constant, never a parameter).

  ``eq=False`` keeps the module that holds it hashable by identity.

  Attributes:
    value: float32 [|C_base|, D] (15 × 2048 PASCAL, 60 × 2048 COCO), rows in ``classes`` order.
    classes: the fold's base class ids, ascending.
    counts: int [|C_base|], instance pairs averaged per class.
    meta: provenance (dataset, fold, layers, image size, backbone weights).
  """
  value: np.ndarray
  classes: tuple[int, ...] = ()
  counts: np.ndarray | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class FPBaseMissingError(FileNotFoundError):
  """The FP_base file of a fold does not exist; the message holds the command that writes it."""


def fp_base_filename(fold: int, layers: int) -> str:
  return f"jc2a_fp_base_fold{int(fold)}_resnet{int(layers)}.npz"


def fp_base_path(data_dir: str | os.PathLike, dataset: str, fold: int, layers: int) -> os.PathLike:
  """Where the prior command writes FP_base: next to the built dataset."""
  from fss_jax.data.source import dataset_dir  # pylint: disable=g-import-not-at-top
  return dataset_dir(data_dir, dataset) / fp_base_filename(fold, layers)


def prior_command(data_dir, dataset: str, fold: int, layers: int) -> str:
  return (f"python -m {PRIOR_MODULE} --data_dir {os.fspath(data_dir)} --dataset {dataset} "
          f"--fold {fold} --layers {layers} --backbone_init <ImageNet resnet{layers}_v2.pth or "
          f"converted checkpoint>")


def save_fp_base(path: str | os.PathLike, fp: FPBase, *, overwrite: bool = False) -> os.PathLike:
  """Writes `fp` atomically (`fss_jax.io.atomic_write`, local or gs://); never replaces a file
  unless ``overwrite``."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    return fss_io.atomic_write(path, lambda f: np.savez(
        f, fp_base=np.asarray(fp.value, np.float32), classes=np.asarray(fp.classes, np.int64),
        counts=np.asarray(fp.counts if fp.counts is not None else [], np.int64),
        meta=np.str_(json.dumps(dict(fp.meta), sort_keys=True)),
        format=np.int64(FP_BASE_FORMAT)), overwrite=overwrite)
  except FileExistsError:
    raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it") from None


def load_fp_base(path: str | os.PathLike, *, command: str | None = None) -> FPBase:
  """Reads a file written by `save_fp_base`.

  Raises:
    FPBaseMissingError: the file does not exist (the message names the command).
    ValueError: the file is not an FP_base file or is damaged.
  """
  import json  # pylint: disable=g-import-not-at-top
  path = fss_io.user_path(path)
  if not path.is_file():
    how = command or f"python -m {PRIOR_MODULE} --help"
    raise FPBaseMissingError(
        f"JC²A's CKMM needs the fold's base-class prototypes FP_base, but {path} does not exist.\n"
        f"Compute it once per fold (frozen backbone, base-class training pairs) with:\n  {how}\n"
        f"or disable CKMM (model.use_ckmm=False, the Table 3 ablations).")
  try:
    with path.open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
      value = z["fp_base"].astype(np.float32)
      fp = FPBase(value=value, classes=tuple(int(c) for c in z["classes"]),
                  counts=z["counts"], meta=json.loads(str(z["meta"])))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable JC²A FP_base file ({type(e).__name__}: {e}); "
                     f"delete it and run the prior command again") from e
  if value.ndim != 2 or not np.all(np.isfinite(value)):
    raise ValueError(f"{path}: FP_base must be a finite [n_base, D] array, got {value.shape}")
  return fp


def ckmm_prior(feat: jax.Array, fp_base: jax.Array, *, similarity: str = "cosine",
               minmax: bool = True, eps: float = 1e-7) -> jax.Array:
  """CKMM class-agnostic probability map (Eq. 13, jc2a.md §5.2).

  Args:
    feat: [B, H, W, D] query features (frozen layer4).
    fp_base: [n, D] base-class prototypes.
    similarity: "cosine" (``<f, P_c> / (|f| |P_c| + eps)``) or "dot" (the paper's raw
      dot product).
    minmax: per-image min-max normalisation to [0, 1] (eps in the denominator).
    eps: see above.

  Returns:
    [B, H, W, 1]: mean over the n classes of the similarity, optionally min-max normalised.
  """
  dots = jnp.einsum("bhwd,nd->bhwn", feat, fp_base)
  if similarity == "cosine":
    # Safe square roots: finite gradients at all-zero features.
    fn = jnp.sqrt(jnp.maximum(jnp.sum(feat * feat, -1, keepdims=True), 1e-30))
    pn = jnp.sqrt(jnp.maximum(jnp.sum(fp_base * fp_base, -1), 1e-30))
    dots = dots / (fn * pn + eps)
  elif similarity != "dot":
    raise ValueError(f"unknown CKMM similarity {similarity!r}; choose one of {CKMM_SIMILARITIES}")
  raw = dots.mean(-1, keepdims=True)
  if minmax:
    lo = raw.min(axis=(1, 2), keepdims=True)
    hi = raw.max(axis=(1, 2), keepdims=True)
    raw = (raw - lo) / (hi - lo + eps)
  return raw


# ---------------------------------------------------------------------------
# Point-to-block pieces (jc2a.md §4.2)
# ---------------------------------------------------------------------------

def pad_to_blocks(x: jax.Array, block: int) -> jax.Array:
  """Zero-pads [B, H, W, ...] at the bottom / right to multiples of ``block``."""
  h, w = x.shape[1:3]
  ph, pw = -h % block, -w % block
  if not ph and not pw:
    return x
  return jnp.pad(x, [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3))


def block_tokens(x: jax.Array, block: int) -> jax.Array:
  """[B, H, W, C] -> [B, n_b, m², C]: m×m blocks (zero-padded) in raster order.

  Block i sits at block row ``i // (W'/m)``, column ``i % (W'/m)``; within a block the
  m² offsets are in raster order (j = dy·m + dx).
  """
  x = pad_to_blocks(x, block)
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // block) * (w // block), block * block, c)


def block_importance(mask: jax.Array, block: int) -> jax.Array:
  """Eq. 6: foreground coverage of every m×m block, ``Σ_block M / m²``.

  Args:
    mask: [B, H, W] soft or binary mask (zero-padded like the features).

  Returns:
    [B, n_b] in the block order of `block_tokens`.
  """
  return block_tokens(mask[..., None], block)[..., 0].sum(-1) / (block * block)


def select_blocks(importance: jax.Array, k: int) -> jax.Array:
  """Eq. 7: indices [B, k] of the k most important blocks, ties broken by lower index.

  A stable descending sort (lexicographic on (−importance, index)); k is clipped
  to the number of blocks.
  """
  b, n = importance.shape
  k = min(int(k), n)
  neg = 0.0 - importance  # 0.0 - 0.0 is +0.0: no signed-zero ties
  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  _, order = jax.lax.sort((neg, idx), dimension=1, num_keys=2)
  return order[:, :k]


def gather_blocks(tokens: jax.Array, idx: jax.Array) -> jax.Array:
  """tokens [B, n_b, m², C], idx [B, k] -> [B, k, m², C]."""
  return jnp.take_along_axis(tokens, idx[:, :, None, None], axis=1)


def _fuse(a: jax.Array, b: jax.Array, how: str) -> jax.Array:
  if how == "add":
    return a + b
  if how == "multiply":
    return a * b
  if how == "concat":
    return jnp.concatenate([a, b], axis=-1)
  raise ValueError(f"unknown fusion {how!r}; choose one of {FUSIONS}")


class HPAM(nn.Module):
  """Hybrid Prototype Alignment Module over a feature pyramid (jc2a.md §4).

  Attributes:
    dim: feature width C.
    top_k: selected blocks per level (60, 20, 5, 3).
    block_size: m.
    use_p2p / use_p2b: the two alignments (at least one).
    fusion: P^d ∘ P^s when both are on: "add" (Eq. 10) | "multiply" | "concat".
    operator, softmax_scale, linear_feature_map: see `AlignmentAttention`.
    pos_embed: P2B position embeddings: "spatial" (p ∈ R^{s×s} per level, broadcast over
      channels), "channel" (R^{s×s×C}) or "none" (Table 4, "w/o PE").
    pos_embed_std: truncated-normal init std.
    share_projections: one W_Q/W_K/W_V for P2P and P2B (else two sets).
  """
  dim: int = 256
  top_k: Sequence[int] = (60, 20, 5, 3)
  block_size: int = 3
  use_p2p: bool = True
  use_p2b: bool = True
  fusion: str = "add"
  operator: str = "ours"
  softmax_scale: float | None = None
  linear_feature_map: str = "batchnorm"
  pos_embed: str = "spatial"
  pos_embed_std: float = 0.02
  share_projections: bool = True

  @nn.compact
  def __call__(self, queries: Sequence[jax.Array], supports: Sequence[jax.Array],
               masks: Sequence[jax.Array], *, train: bool = False) -> list[jax.Array]:
    """Aligned prototypes per level.

    Args:
      queries: per level q_l [B, s, s, C].
      supports: per level masked, pooled support features [B, s, s, C].
      masks: per level pooled support masks [B, s, s] (block importance).
      train: BatchNorm mode of the "linear" operator.

    Returns:
      per level P_aw [B, s, s, C] (2C for concat fusion).
    """
    if not (self.use_p2p or self.use_p2b):
      raise ValueError("HPAM needs use_p2p or use_p2b")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBEDS}")
    if len(self.top_k) < len(queries):
      raise ValueError(f"top_k {tuple(self.top_k)} has fewer entries than the {len(queries)} levels")
    attn = functools.partial(AlignmentAttention, self.dim, self.operator,
                             softmax_scale=self.softmax_scale,
                             linear_feature_map=self.linear_feature_map)
    p2p = attn(name="attn") if self.use_p2p else None
    if self.use_p2b:
      p2b = p2p if (p2p is not None and self.share_projections) else attn(
          name="attn" if p2p is None else "attn_p2b")
    init = nn.initializers.truncated_normal(self.pos_embed_std)
    outs = []
    for l, (q, sp, m) in enumerate(zip(queries, supports, masks)):
      b, h, w, c = q.shape
      xq = q.reshape(b, h * w, c)
      parts = []
      if self.use_p2p:
        parts.append(p2p(xq, sp.reshape(b, h * w, c), train=train))             # P^d (Eq. 3)
      if self.use_p2b:
        if self.pos_embed != "none":                                            # Eq. 4
          shape = (h, w) if self.pos_embed == "spatial" else (h, w, c)
          pq = self.param(f"pos_q_{l}", init, shape)
          ps = self.param(f"pos_s_{l}", init, shape)
          if self.pos_embed == "spatial":
            pq, ps = pq[..., None], ps[..., None]
          q, sp = q + pq, sp + ps
        blocks = block_tokens(sp, self.block_size)                              # Eq. 5
        idx = select_blocks(block_importance(m, self.block_size), self.top_k[l])  # Eq. 6-7
        sel = gather_blocks(blocks, idx)                                        # [B, k, m², C]
        # Eq. 9: per within-block offset j a softmax over the k blocks, mean over j.
        parts.append(p2b(q.reshape(b, h * w, c), sel.transpose(0, 2, 1, 3), train=train))
      out = parts[0] if len(parts) == 1 else _fuse(parts[0], parts[1], self.fusion)
      outs.append(out.reshape(b, h, w, out.shape[-1]))
    return outs


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
    fp_base: `FPBase` or [n_base, D] array; required when use_ckmm.
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
  fp_base: Any = None
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
    for name, value, allowed in (("hpam_fusion", self.hpam_fusion, FUSIONS),
                                 ("mia_fusion", self.mia_fusion, FUSIONS),
                                 ("alignment", self.alignment, OPERATORS),
                                 ("pos_embed", self.pos_embed, POS_EMBEDS),
                                 ("shot_fusion", self.shot_fusion, SHOT_FUSIONS),
                                 ("ckmm_similarity", self.ckmm_similarity, CKMM_SIMILARITIES)):
      if value not in allowed:
        raise ValueError(f"JC2A: unknown {name} {value!r}; choose one of {allowed}")
    hpam = self.use_p2p or self.use_p2b
    if self.use_ckmm and hpam is False and self.mia_fusion != "concat":
      raise ValueError(f"JC2A: mia_fusion={self.mia_fusion!r} combines P_aw with P_ag and needs "
                       "HPAM (use_p2p or use_p2b); use mia_fusion='concat'")
    if self.use_ckmm and self.fp_base is None:
      raise ValueError("JC2A: use_ckmm=True needs fp_base (the fold's base-class prototypes); build "
                       f"the model through jc2a.make_model(fp_base_file=...) or run "
                       f"`python -m {PRIOR_MODULE} --help` to compute it")
    if len(self.top_k) != len(self.pyramid_bins):
      raise ValueError(f"JC2A: top_k {tuple(self.top_k)} and pyramid_bins "
                       f"{tuple(self.pyramid_bins)} must have the same length")

  def _fp_base(self) -> jax.Array:
    value = getattr(self.fp_base, "value", self.fp_base)
    return jnp.asarray(np.asarray(value, np.float32))

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

    # Step 1-2: frozen backbone (shared instance; XLA drops the unused support layer4).
    backbone = ResNetDeepStem(depth=self.layers, frozen=not self.backbone_bn_batch_stats,
                              name="backbone")
    fq = jax.tree.map(jax.lax.stop_gradient, backbone(qimg, train=train))
    fs = jax.tree.map(jax.lax.stop_gradient, backbone(simg, train=train))
    drop = nn.Dropout(self.feat_dropout, broadcast_dims=(1, 2), deterministic=not train)
    f_q = drop(MergeConv(self.reduce_dim, name="down_query")(
        jnp.concatenate([fq["layer3"], fq["layer2"]], -1)))                  # [B, h, w, C]
    f_s = drop(MergeConv(self.reduce_dim, name="down_supp")(
        jnp.concatenate([fs["layer3"], fs["layer2"]], -1)))                  # [BK, h, w, C]
    h, w = f_q.shape[1:3]
    m = resize_bilinear((smask == 1).astype(f_s.dtype)[..., None], (h, w), align_corners=True)
    proto = masked_average_pool(f_s, m, eps=self.prototype_eps)               # [BK, C]
    f_s_masked = f_s * m
    out = {}

    # Step 3: CKMM (does not depend on the support: once per query).
    prior = None
    if self.use_ckmm:
      prior = ckmm_prior(fq[self.ckmm_feature], self._fp_base(), similarity=self.ckmm_similarity,
                         minmax=self.ckmm_minmax, eps=self.ckmm_eps)          # [B, h, w, 1]
      out["prior"] = prior
      prior = jnp.repeat(prior, k, axis=0)
    f_q = jnp.repeat(f_q, k, axis=0)                                          # [BK, h, w, C]

    # Step 4: pyramid, HPAM, MIA.
    sizes = _level_sizes(self.pyramid_bins, h)
    qs = [adaptive_avg_pool(f_q, (s, s)) for s in sizes]
    hpam_on = self.use_p2p or self.use_p2b
    if hpam_on:
      sps = [adaptive_avg_pool(f_s_masked, (s, s)) for s in sizes]
      ms = [adaptive_avg_pool(m, (s, s))[..., 0] for s in sizes]
      p_aw = HPAM(self.reduce_dim, tuple(self.top_k), self.block_size, self.use_p2p, self.use_p2b,
                  self.hpam_fusion, self.alignment, self.softmax_scale, self.linear_feature_map,
                  self.pos_embed, self.pos_embed_std, self.share_projections,
                  name="hpam")(qs, sps, ms, train=train)
    merged = []
    for l, (s, q_l) in enumerate(zip(sizes, qs)):
      parts = [q_l, jnp.broadcast_to(proto[:, None, None, :], q_l.shape)]
      pag = resize_bilinear(prior, (s, s), align_corners=True) if prior is not None else None
      if hpam_on and pag is not None and self.mia_fusion != "concat":
        parts.append(_fuse(p_aw[l], pag, self.mia_fusion))
      else:
        parts += [p_aw[l]] if hpam_on else []
        parts += [pag] if pag is not None else []
      merged.append(MergeConv(self.reduce_dim, name=f"init_merge_{l}")(jnp.concatenate(parts, -1)))

    # Step 5: decoder.
    logits, aux = FEMDecoder(self.reduce_dim, self.num_classes, self.cls_dropout,
                             name="decoder")(merged, train=train)
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
    aux = [cross_entropy(resize_bilinear(a, size, align_corners=True), y) for a in outputs["aux"]]
    aux = sum(aux) / len(aux) if aux else jnp.zeros((), jnp.float32)
    loss = main + aux_weight * aux
    return loss, {"loss": loss, "main_loss": main, "aux_loss": aux}

  return loss_fn


loss_fn = make_loss(1.0)


def make_model(*, fp_base_file: str | None = None, data_dir: str | None = None,
               dataset: str | None = None, fold: int | None = None, **fields) -> JC2A:
  """Builds `JC2A` from plain fields, loading FP_base when CKMM is on.

  Args:
    fp_base_file: explicit FP_base .npz; else it is looked up next to the dataset
      from (data_dir, dataset, fold, layers) — where the prior command writes it.
    data_dir, dataset, fold: locate the dataset (see `fp_base_path`).
    **fields: `JC2A` fields (``fp_base`` may be given directly, e.g. in tests).

  Raises:
    FPBaseMissingError: CKMM on and no FP_base file (the message names the command).
  """
  names = {f.name for f in dataclasses.fields(JC2A)} - {"parent", "name"}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise TypeError(f"JC2A has no field(s) {unknown}; known: {sorted(names)}")
  if fields.get("use_ckmm", True) and fields.get("fp_base") is None:
    layers = fields.get("layers", 50)
    if fp_base_file is None:
      if data_dir is None or dataset is None or fold is None:
        raise ValueError("JC2A with CKMM needs FP_base: give fp_base_file, or data_dir + dataset + "
                         f"fold to find the file the prior command writes (python -m {PRIOR_MODULE})")
      fp_base_file = fp_base_path(data_dir, dataset, fold, layers)
      command = prior_command(data_dir, dataset, fold, layers)
    else:
      command = None
    fp = load_fp_base(fp_base_file, command=command)
    if fp.meta.get("layers") not in (None, layers):
      raise ValueError(f"{fp_base_file} was computed with ResNet-{fp.meta.get('layers')} but the "
                       f"model uses ResNet-{layers}; run the prior command for --layers {layers}")
    if fold is not None and fp.meta.get("fold") not in (None, fold):
      raise ValueError(f"{fp_base_file} belongs to fold {fp.meta.get('fold')}, not fold {fold}")
    fields["fp_base"] = fp
  return JC2A(**fields)


def _pspnet_extra_ignores(layers: int, num_base_classes: int | None) -> list:
  """Keys of a BAM/PSPNet checkpoint that JC²A does not use (encoder copies, PPM, cls, aux)."""
  del num_base_classes
  rules = []
  for r in resnet_keymap(depth=layers, stem="deep", naming="pspnet"):
    src = r.src
    if src.startswith("layer"):
      stage, rest = src.split(".", 1)
      rules.append(km.Ignore(f"encoder.{stage[5:]}.{rest}"))
  for i in range(4):
    rules += [km.Ignore(f"ppm.features.{i}.1.weight")]
    rules += [km.Ignore(f"ppm.features.{i}.2.{p}") for p in
              ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
  rules += [km.Ignore("cls.0.weight"), km.Ignore("cls.4.weight"), km.Ignore("cls.4.bias")]
  rules += [km.Ignore(f"cls.1.{p}") for p in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
  rules += [km.Ignore(f"aux.{n}") for n in
            ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
             "1.num_batches_tracked", "4.weight", "4.bias")]
  return rules


def keymap(*, layers: int = 50, source: str = "imagenet", dst: Sequence[str] = (), **_unused) -> list:
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
    return (resnet_keymap(depth=layers, stem="deep", naming="pspnet", ignore_head=False, dst=dst)
            + _pspnet_extra_ignores(layers, None))
  raise ValueError(f"unknown backbone source {source!r}; choose one of {BACKBONE_SOURCES}")


def pfenet_keymap(*, layers: int = 50) -> list:
  """Key map of the parts of a PFENet checkpoint JC²A can reuse (backbone, down_*, decoder).

  ``init_merge`` (513 vs 769 inputs), HPAM and FP_base have no PFENet counterpart;
  PFENet's ``res1`` / ``res2`` / ``cls`` / FEM keys match `FEMDecoder`'s.
  """
  rules = resnet_keymap(depth=layers, stem="deep", naming="pspnet", ignore_head=False,
                        dst=("backbone",))
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


SPEC = ModelSpec(
    name="jc2a",
    make_model=make_model,
    keymap=keymap,
    loss_fn=loss_fn,
    frozen=(r"backbone/.*",),
    min_input_size=min_input_size,
    any_shot=True,   # decision-level fusion (mean softmax over shots): any K
)

__all__ = ["JC2A", "HPAM", "FPBase", "FPBaseMissingError", "SPEC", "make_model", "make_loss",
           "loss_fn", "keymap", "pfenet_keymap", "ckmm_prior", "block_tokens", "block_importance",
           "select_blocks", "gather_blocks", "pad_to_blocks", "fp_base_path", "load_fp_base",
           "save_fp_base", "prior_command", "min_input_size"]
