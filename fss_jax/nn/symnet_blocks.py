"""Sym-Net building blocks (Sunbaoquan/Sym-Net ``model/SymNet.py``, symnet.md §5, §6.2).

All maps NHWC, token sets [B, L, C] with L = h * w row-major.

* `block_correlation` / `multilayer_correlation` (§5.3): per hyper-feature, the mean over
  the support foreground positions of ReLU(cosine) — HSNet's correlations collapsed to
  one 2-D map per block (no 4-D volumes).
* `TDC` (§5.1): top-down hyper-correlation head, layer4 + layer3 stacks, then layer2.
* `APA` (§5.2): visual-text alignment prototype aggregation (bilinear attention of a
  [text; prototype] query over the feature tokens, residual to the prototype).
* `self_activation_prior` (§5.4, SPM): query-norm re-weighted cosine between
  window-averaged layer4 features, averaged over all support positions, min-max
  normalised, averaged over three windows and the shots.
* `query_self_prototypes` (§5.5): SSP-style fg / ambiguous / bg prototypes of the query
  thresholded on the prior, with the reference's top-12 / middle-12 fallbacks.
* `hard_triplet_loss` (§6.2): the co-optimised hard triplet loss (support and query part).
* `ShotWeightedEnsemble`: BAM's learner ensemble (Gram scene difference, K-shot
  reweighting, gram_merge / cls_merge) split in two calls, because Sym-Net needs the
  shot weights *before* the meta learner (they weight the SPM priors and the support
  text prototypes). Built from `fss_jax.nn.ensemble`'s pieces, same variable names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fss_jax import assets
from fss_jax.nn.ensemble import KShotReweight, base_foreground, scene_difference
from fss_jax.nn.layers import Conv2d, GroupNorm, Linear
from fss_jax.ops.pooling import avg_pool2d
from fss_jax.ops.resize import resize_bilinear

SPM_WINDOWS = ((5, 5), (7, 1), (1, 7))


def _norm(x: jax.Array, axis: int = -1, keepdims: bool = True) -> jax.Array:
  """L2 norm with a zero (not NaN) gradient at the zero vector, like torch."""
  sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


# ---------------------------------------------------------------------------
# Multi-layer correlation (model/correlation.py + mask_feature)
# ---------------------------------------------------------------------------


def block_correlation(
  query: jax.Array, support: jax.Array, fg: jax.Array, *, eps: float = 1e-5
) -> jax.Array:
  """Mean over support foreground positions of ``max(0, <q^, s^_j>)``.

  Args:
    query: ``[B, h, w, C]`` query hyper-feature.
    support: ``[B, h, w, C]`` support hyper-feature (same size).
    fg: ``[B, h, w]`` bool, support foreground (the reference keeps positions whose
      resized mask equals exactly 1). An empty foreground gives 0 (the reference's
      zero-vector fallback).
    eps: added to the norms (``x / (||x|| + eps)``).

  Returns:
    ``[B, h, w]``.
  """
  b, h, w, c = query.shape
  q = query.reshape(b, h * w, c)
  s = support.reshape(b, -1, c)
  q = q / (_norm(q) + eps)
  s = s / (_norm(s) + eps)
  corr = jax.nn.relu(jnp.einsum("blc,bmc->blm", q, s))
  m = fg.reshape(b, -1).astype(corr.dtype)
  out = jnp.einsum("blm,bm->bl", corr, m) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
  return out.reshape(b, h, w)


def multilayer_correlation(
  query_blocks: Sequence[jax.Array],
  support_blocks: Sequence[jax.Array],
  support_mask: jax.Array,
  stage_sizes: Sequence[int],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Correlation stacks of layer4, layer3, layer2 (Sym-Net drops the layer1 block).

  Args:
    query_blocks: pre-ReLU outputs of every bottleneck of the query (network order).
    support_blocks: the same for one support shot.
    support_mask: ``[B, H, W, 1]`` binary support mask at the input size; it is resized
      to every block's size (bilinear, align_corners=True) and positions == 1 count.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).

  Returns:
    ``(c4 [B, h, w, n4], c3 [B, h, w, n3], c2 [B, h, w, n2])``, n_l = blocks of stage l.
  """
  if len(stage_sizes) != 4:
    raise ValueError(f"the multi-layer correlation needs 4 stages, got {stage_sizes}")
  maps = []
  start = stage_sizes[0]  # blocks of layer1 are not used (HSNet stack_ids)
  cache = {}
  for qf, sf in zip(query_blocks[start:], support_blocks[start:]):
    size = qf.shape[1:3]
    if size not in cache:
      m = resize_bilinear(support_mask.astype(qf.dtype), size, align_corners=True)
      cache[size] = m[..., 0] == 1.0
    maps.append(block_correlation(qf, sf, cache[size]))
  n2, n3 = stage_sizes[1], stage_sizes[2]
  stack = lambda ms: jnp.stack(ms, axis=-1)
  return stack(maps[n2 + n3 :]), stack(maps[n2 : n2 + n3]), stack(maps[:n2])


# ---------------------------------------------------------------------------
# TDC (hyper_final)
# ---------------------------------------------------------------------------


class TDC(nn.Module):
  """Top-down hyper-correlation: ``[B, h, w, n2|n3|n4]`` stacks -> ``[B, h, w, out]``.

  ``a = GN-ReLU(conv3x3(conv1(h4) + conv2(h3)))``; ``H = conv3x3(GN-ReLU(conv3x3(a +
  conv3(h2))))``. GroupNorm with one group, eps 1e-5 (torch), all convs with bias.
  """

  hidden: int = 16
  features: int = 48

  @nn.compact
  def __call__(self, h2: jax.Array, h3: jax.Array, h4: jax.Array) -> jax.Array:
    gn = lambda name: GroupNorm(num_groups=1, epsilon=1e-5, name=name)
    a = Conv2d(self.hidden, 1, name="conv2")(h3) + Conv2d(self.hidden, 1, name="conv1")(h4)
    a = nn.relu(gn("merge1_norm")(Conv2d(self.hidden, 3, padding=1, name="merge1_conv")(a)))
    a = a + Conv2d(self.hidden, 1, name="conv3")(h2)
    a = nn.relu(gn("merge2_norm")(Conv2d(self.hidden, 3, padding=1, name="merge2_conv")(a)))
    return Conv2d(self.features, 3, padding=1, name="merge2_out")(a)


# ---------------------------------------------------------------------------
# APA (CrossAttention, score function "bi_linear")
# ---------------------------------------------------------------------------


class APA(nn.Module):
  """Visual-text alignment prototype aggregation.

  ``q = w_q([text; proto])``, ``kx = tokens(w_k(feat))`` (keys and values),
  ``a = softmax_L((q W) kx^T)`` (unscaled), ``out = Dropout(proj(a kx)) + proto``.

  Attributes:
    hidden: attention width (= prototype channels, 256).
    dropout: element-wise dropout on the projected output (training only).
  """

  hidden: int = 256
  dropout: float = 0.1

  @nn.compact
  def __call__(
    self, feat: jax.Array, text: jax.Array, proto: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """feat ``[B, h, w, C]``, text ``[B, T]``, proto ``[B, C]`` -> ``[B, C]``."""
    b, h, w, c = feat.shape
    if c != self.hidden or proto.shape[-1] != self.hidden:
      raise ValueError(
        f"APA expects {self.hidden}-channel features and prototypes, got {c} and {proto.shape[-1]}"
      )
    q = Linear(self.hidden, use_bias=False, name="w_q")(jnp.concatenate([text, proto], -1))
    kx = Conv2d(self.hidden, 1, use_bias=False, name="w_k")(feat).reshape(b, h * w, self.hidden)
    bound = 1.0 / math.sqrt(self.hidden)
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound
    )
    weight = self.param("weight", init, (self.hidden, self.hidden), jnp.float32)  # U(-1/16, 1/16)
    score = jnp.einsum("bd,bld->bl", q @ weight, kx)
    attn = jax.nn.softmax(score, axis=-1)
    out = Linear(self.hidden, name="proj")(jnp.einsum("bl,bld->bd", attn, kx))
    out = nn.Dropout(self.dropout)(out, deterministic=not train)
    return out + proto


# ---------------------------------------------------------------------------
# SPM: self-activation prior mask
# ---------------------------------------------------------------------------


def _window_prior(q: jax.Array, s: jax.Array, window: tuple[int, int], eps: float) -> jax.Array:
  """One window of SPM for one shot: q, s ``[B, h, w, C]`` -> min-max normalised ``[B, L]``."""
  pad = (window[0] // 2, window[1] // 2)
  tq = avg_pool2d(q, window, 1, pad, count_include_pad=True)
  ts = avg_pool2d(s, window, 1, pad, count_include_pad=True)
  b, h, w, c = tq.shape
  tq = tq.reshape(b, h * w, c)
  ts = ts.reshape(b, h * w, c)
  qn = _norm(tq)  # [B, L, 1]
  sn = _norm(ts)[..., 0]  # [B, L]
  dots = jnp.einsum("blc,bmc->blm", tq, ts)
  sim = dots / (qn * sn[:, None, :] + eps) * qn  # cosine x query norm
  r = jnp.mean(sim, axis=-1)  # over all support positions
  lo = jnp.min(r, axis=1, keepdims=True)
  hi = jnp.max(r, axis=1, keepdims=True)
  return (r - lo) / (hi - lo + eps)


def self_activation_prior(
  query: jax.Array,
  supports: jax.Array,
  masks: jax.Array,
  weights: jax.Array,
  scales: Sequence[int],
  *,
  windows: Sequence[tuple[int, int]] = SPM_WINDOWS,
  eps: float = 1e-7,
) -> list[jax.Array]:
  """SPM pseudo query masks.

  Args:
    query: ``[B, h, w, C]`` query layer4.
    supports: ``[B, K, h, w, C]`` support layer4 (from the unmasked images).
    masks: ``[B, K, h, w]`` support masks at the feature size (bilinear,
      align_corners=True from the input size).
    weights: ``[B, K]`` shot weights (ones for K = 1).
    scales: pyramid sides; ``scales[0]`` must equal h (= w).

  Returns:
    ``[R_0 [B, s_0, s_0, 1], ..., R_n]``: R_0 = sum_k w_k mean_windows(prior), then
    bilinear (align_corners=True) resizes to the other scales. Values in [0, 1].
  """
  b, k, h, w, _ = supports.shape
  if h != scales[0] or w != scales[0]:
    raise ValueError(
      f"SPM needs the first pyramid bin ({scales[0]}) to equal the feature "
      f"size {h}x{w}; derive scales from the input size (model field scales=())"
    )
  total = jnp.zeros((b, h * w), query.dtype)
  for j in range(k):
    s = supports[:, j] * masks[:, j, :, :, None]
    r = sum(_window_prior(query, s, win, eps) for win in windows) / len(windows)
    total = total + weights[:, j : j + 1] * r
  r0 = total.reshape(b, h, w, 1)
  return [r0] + [resize_bilinear(r0, (sc, sc), align_corners=True) for sc in scales[1:]]


# ---------------------------------------------------------------------------
# Query self-support prototypes (feat_aggregation)
# ---------------------------------------------------------------------------


def query_self_prototypes(
  feat: jax.Array,
  prior: jax.Array,
  *,
  fg_thresh: float = 0.7,
  bg_thresh: float = 0.4,
  ambiguous: tuple[float, float] = (0.4, 0.55),
  fallback: int = 12,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Foreground, ambiguous and background prototypes of the query.

  Args:
    feat: ``[B, h, w, C]`` query features (after dropout in training).
    prior: ``[B, h, w, 1]`` SPM prior R_0.
    fg_thresh, bg_thresh, ambiguous: fg = r > 0.7, ambiguous = 0.4 < r < 0.55, bg = r < 0.4.
    fallback: size of the fallback sets for an empty set: the `fallback` largest r (fg),
      the middle ranks ``argsort(r)[L/2 - 6 : L/2 + 6]`` (ambiguous), the largest 1 - r (bg).

  Returns:
    ``(fg, ambiguous, bg)``, each ``[B, C]`` (means over the selected positions).
  """
  b, h, w, c = feat.shape
  L = h * w
  f = feat.reshape(b, L, c)
  r = prior.reshape(b, L)
  n = min(fallback, L)

  def set_mean(sel: jax.Array, fallback_idx: jax.Array) -> jax.Array:
    selw = sel.astype(f.dtype)
    cnt = jnp.sum(selw, axis=1, keepdims=True)
    mean = jnp.einsum("bl,blc->bc", selw, f) / jnp.maximum(cnt, 1.0)
    fb = jnp.mean(jnp.take_along_axis(f, fallback_idx[..., None], axis=1), axis=1)
    return jnp.where(cnt > 0, mean, fb)

  _, top = jax.lax.top_k(r, n)
  _, top_bg = jax.lax.top_k(1.0 - r, n)
  order = jnp.argsort(r, axis=1)
  lo = max(L // 2 - fallback // 2, 0)
  mid = order[:, lo : lo + n]
  fg = set_mean(r > fg_thresh, top)
  amb = set_mean((r > ambiguous[0]) & (r < ambiguous[1]), mid)
  bg = set_mean(r < bg_thresh, top_bg)
  return fg, amb, bg


# ---------------------------------------------------------------------------
# Co-optimised hard triplet loss (get_triple_loss / hard_triplet_dig)
# ---------------------------------------------------------------------------


def _l2n(x: jax.Array) -> jax.Array:
  """torch ``F.normalize(x, dim=-1)``: x / max(||x||, 1e-12)."""
  return x / jnp.maximum(_norm(x), 1e-12)


def _pdist(a: jax.Array, b: jax.Array) -> jax.Array:
  """torch ``F.pairwise_distance(a, b)`` = ||a - b + 1e-6||_2 over the last axis."""
  return _norm(a - b + 1e-6, keepdims=False)


def hard_triplet_loss(
  support_text: jax.Array,
  support_feats: jax.Array,
  support_masks: jax.Array,
  query_text: jax.Array,
  query_ambiguous: jax.Array,
  query_background: jax.Array,
  *,
  margin: float = 0.5,
) -> jax.Array:
  """Sym-Net's triplet loss = support part + query part.

  Args:
    support_text: ``[B, C]`` shot-combined support text prototype (anchor of every shot).
    support_feats: ``[B, K, h, w, C]`` ``down_supp`` features.
    support_masks: ``[B, K, h, w]`` 0/1 masks at the feature size (legacy nearest
      resize; ignore pixels are 0, i.e. negatives).
    query_text: ``[B, C]`` query text prototype (anchor).
    query_ambiguous: ``[B, C]`` positive of the query part.
    query_background: ``[B, C]`` negative of the query part.
    margin: 0.5.

  Returns:
    scalar. Support part: per shot and image ``relu(m + max_pos d(a, p_i) - d(a,
    mean_neg n(q_j)))`` on normalised vectors, images without positives or negatives
    skipped, summed / max(#valid, 1), averaged over K. Query part: ``relu(m + d(tq,
    amb) - d(tq, bg))`` averaged over B.
  """
  b, k, h, w, c = support_feats.shape
  anchor = _l2n(support_text)  # [B, C]
  f = _l2n(support_feats.reshape(b, k, h * w, c))  # [B, K, L, C]
  m = support_masks.reshape(b, k, h * w)
  pos, neg = m == 1, m == 0
  dpos = _pdist(anchor[:, None, None, :], f)  # [B, K, L]
  hardest = jnp.max(jnp.where(pos, dpos, -jnp.inf), axis=-1)  # [B, K]
  negw = neg.astype(f.dtype)
  npos, nneg = jnp.sum(pos, -1), jnp.sum(negw, -1)
  neg_mean = jnp.einsum("bkl,bklc->bkc", negw, f) / jnp.maximum(nneg, 1.0)[..., None]
  dneg = _pdist(anchor[:, None, :], neg_mean)  # [B, K]
  valid = (npos > 0) & (nneg > 0)
  per = jnp.where(valid, jax.nn.relu(margin + jnp.where(valid, hardest, 0.0) - dneg), 0.0)
  count = jnp.maximum(jnp.sum(valid, axis=0), 1).astype(per.dtype)  # [K]
  support_part = jnp.mean(jnp.sum(per, axis=0) / count)
  tq = _l2n(query_text)
  query_part = jnp.mean(
    jax.nn.relu(margin + _pdist(tq, _l2n(query_ambiguous)) - _pdist(tq, _l2n(query_background)))
  )
  return support_part + query_part


# ---------------------------------------------------------------------------
# BAM ensemble with the shot weights computed first
# ---------------------------------------------------------------------------


def _merge_init(key, shape, dtype=jnp.float32):
  """gram_merge / cls_merge start as [1, 0] (identity on the first input)."""
  del key
  return jnp.zeros(shape, dtype).at[..., 0, :].set(1.0)


class ShotWeightedEnsemble(nn.Module):
  """BAM's ensemble in two calls (same variables as `fss_jax.nn.ensemble.LearnerEnsemble`:
  ``kshot_rw/conv_{0,1}`` for K > 1, ``gram_merge``, ``cls_merge``).

  ``shot_weights(query_low, support_low)`` -> (w [B, K], e [B, K]) with BAM / Sym-Net's
  inverse-permutation scatter (``unsort=True``); ``__call__(meta, base, est)`` merges.
  """

  shot: int = 1
  kshot_hidden: int = 2

  def setup(self):
    if self.shot > 1:
      self.kshot_rw = KShotReweight(self.shot, self.kshot_hidden, unsort=True)
    self.gram_merge = Conv2d(1, 1, use_bias=False, kernel_init=_merge_init)
    self.cls_merge = Conv2d(1, 1, use_bias=False, kernel_init=_merge_init)

  def shot_weights(
    self, query_low: jax.Array, support_low: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """query_low ``[B, h, w, C]``, support_low ``[B, K, h, w, C]`` (layer2) ->
    (softmax shot weights ``[B, K]``, scene differences e ``[B, K]``)."""
    e = scene_difference(query_low, support_low)
    w = self.kshot_rw(e) if self.shot > 1 else jnp.ones_like(e)
    return w, e

  def __call__(
    self,
    meta_logits: jax.Array,
    base_logits: jax.Array,
    est: jax.Array,
    *,
    exclude_channel: jax.Array | None = None,
  ) -> dict[str, Any]:
    """meta ``[B, h, w, 2]``, base ``[B, h, w, N]``, est ``[B]`` (= sum_k w_k e_k) ->
    {"final" [B, h, w, 2], "base_map" [B, h, w, 1], "intermediates": the merges' inputs
    ``gram_merge_in_bg|fg``, ``cls_merge_in``} (as `LearnerEnsemble` returns them)."""
    meta_prob = jax.nn.softmax(meta_logits, axis=-1)
    base_map = base_foreground(jax.nn.softmax(base_logits, axis=-1), exclude_channel)
    est_map = jnp.broadcast_to(est[:, None, None, None], base_map.shape).astype(meta_prob.dtype)
    bg_in = jnp.concatenate([meta_prob[..., 0:1], est_map], axis=-1)
    fg_in = jnp.concatenate([meta_prob[..., 1:2], est_map], axis=-1)
    merge_in = jnp.concatenate([self.gram_merge(bg_in), base_map], axis=-1)
    final = jnp.concatenate([self.cls_merge(merge_in), self.gram_merge(fg_in)], axis=-1)
    return {
      "final": final,
      "base_map": base_map,
      "intermediates": {
        "gram_merge_in_bg": bg_in,
        "gram_merge_in_fg": fg_in,
        "cls_merge_in": merge_in,
      },
    }


def class_embeddings(
  episode: Mapping[str, jax.Array], b: int, dataset: str, path: str | None, *, check: bool
) -> jax.Array:
  """``[B, T]`` the episodes' class embeddings: ``episode["class_embedding"]`` when given,
  else the rows ``class_id [B]`` of the dataset's table (`assets.load_class_embeddings`;
  ``path`` = a custom .npy table). With ``check``, concrete ids outside the table raise
  `assets.AssetError`; under jit such an episode's embedding is NaN, so every output of that
  episode is NaN (the engine stops on a NaN loss) rather than silently reading another
  class's row."""
  if "class_embedding" in episode:
    return jnp.asarray(episode["class_embedding"], jnp.float32).reshape(b, -1)
  table = assets.load_class_embeddings(dataset, path)
  ids = jnp.asarray(episode["class_id"]).reshape(-1).astype(jnp.int32)
  if ids.shape[0] != b:
    raise ValueError(
      f"Sym-Net is 1-way: expected one class id per episode ({b}), got "
      f"class_id of shape {tuple(jnp.shape(episode['class_id']))}"
    )
  rows = table.shape[0]
  if check and not isinstance(ids, jax.core.Tracer):
    assets.check_class_ids(np.asarray(ids), dataset, rows)
  emb = jnp.asarray(table)[jnp.clip(ids, 0, rows - 1)]
  return jnp.where(((ids >= 0) & (ids < rows))[:, None], emb, jnp.nan)


__all__ = [
  "TDC",
  "APA",
  "block_correlation",
  "multilayer_correlation",
  "self_activation_prior",
  "query_self_prototypes",
  "hard_triplet_loss",
  "ShotWeightedEnsemble",
  "SPM_WINDOWS",
  "class_embeddings",
]
