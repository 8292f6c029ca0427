"""Cosine similarities and training-free correlation priors (NHWC).

Two cosine conventions occur in the references and differ for small vectors:

* torch >= 1.12 ``F.cosine_similarity`` (PANet): each input is divided by
  ``max(||x||, eps)`` first, then the products are summed (`cosine_similarity`,
  `cosine_similarity_matrix` with ``eps_mode="clamp"``);
* PFENet / BAM / HDMNet / SCCAN / PAHNet write ``<a, b> / (||a|| ||b|| + eps)``
  with eps 1e-7 (``eps_mode="product"``).

`correlation_prior` implements the query-support priors built on these:
PFENet/BAM's max-cosine prior with min-max normalisation, HDMNet's variant
without normalisation, and SCCAN's softmax-weighted support mask. `ckmm_prior` is JC²A's
class-agnostic map from base-class prototypes (CKMM).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fss_jax.ops import resize as _resize

_HIGHEST = jax.lax.Precision.HIGHEST


def _safe_norm(x: jax.Array, axis: int, keepdims: bool = True) -> jax.Array:
  """L2 norm whose gradient is 0 (not NaN) for all-zero vectors, like torch."""
  sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)


def _clamped_norm(x: jax.Array, axis: int, eps: float) -> jax.Array:
  """``max(||x||, eps)`` with torch's gradient (the clamp runs under no_grad)."""
  n = _safe_norm(x, axis)
  return n + jax.lax.stop_gradient(jnp.maximum(n, eps) - n)


def cosine_similarity(
  a: jax.Array, b: jax.Array, *, axis: int = -1, eps: float = 1e-8
) -> jax.Array:
  """torch ``F.cosine_similarity(a, b, dim=axis, eps=eps)`` (torch >= 1.12).

  ``sum((a / max(||a||, eps)) * (b / max(||b||, eps)))`` over `axis`, after
  broadcasting a and b against each other.

  Args:
    a, b: broadcastable arrays, e.g. ``[B, H, W, C]`` and ``[B, 1, 1, C]``.
    axis: the vector axis.
    eps: norm clamp.

  Returns:
    The broadcast shape without `axis`.
  """
  a, b = jnp.broadcast_arrays(a, b)
  a = a / _clamped_norm(a, axis, eps)
  b = b / _clamped_norm(b, axis, eps)
  return jnp.sum(a * b, axis=axis)


def cosine_similarity_matrix(
  a: jax.Array, b: jax.Array, *, eps: float = 1e-8, eps_mode: str = "clamp"
) -> jax.Array:
  """All-pairs cosine similarity of two sets of vectors.

  Args:
    a: ``[..., N, C]``.
    b: ``[..., M, C]`` (same leading axes).
    eps: the epsilon of `eps_mode`.
    eps_mode: ``"clamp"``: ``<a/max(|a|,eps), b/max(|b|,eps)>`` (torch
      F.cosine_similarity); ``"product"``: ``<a, b> / (|a| |b| + eps)``
      (PFENet/BAM/HDMNet/SCCAN, usually eps=1e-7).

  Returns:
    ``[..., N, M]``.
  """
  if eps_mode == "clamp":
    an = a / _clamped_norm(a, -1, eps)
    bn = b / _clamped_norm(b, -1, eps)
    return jnp.einsum("...nc,...mc->...nm", an, bn)
  if eps_mode == "product":
    dots = jnp.einsum("...nc,...mc->...nm", a, b)
    na = _safe_norm(a, -1)  # [..., N, 1]
    nb = _safe_norm(b, -1)  # [..., M, 1]
    return dots / (na * jnp.swapaxes(nb, -1, -2) + eps)
  raise ValueError(f"eps_mode must be 'clamp' or 'product', got {eps_mode!r}")


def minmax_normalize(x: jax.Array, axis: int | Sequence[int], *, eps: float = 1e-7) -> jax.Array:
  """``(x - min) / (max - min + eps)`` over `axis` (per image)."""
  lo = jnp.min(x, axis=axis, keepdims=True)
  hi = jnp.max(x, axis=axis, keepdims=True)
  return (x - lo) / (hi - lo + eps)


def correlation_prior(
  query_feat: jax.Array,
  support_feat: jax.Array,
  support_mask: jax.Array,
  *,
  eps: float = 1e-7,
  reduce: str = "max",
  mask_support: bool = True,
  normalize: bool = True,
  norm_eps: float | None = None,
  output_size: Sequence[int] | None = None,
  align_corners: bool = True,
) -> jax.Array:
  """Training-free query prior from query-support feature correlation.

  For every query position j and support position i,
  ``cos[j, i] = <Q_j, S_i> / (|Q_j| |S_i| + eps)``; then

  * ``reduce="max"`` (PFENet/BAM/HDMNet): ``r[j] = max_i cos[j, i]`` with
    ``S = support_feat * support_mask`` when `mask_support` (background
    support pixels become zero vectors with cosine 0);
  * ``reduce="softmax_mask"`` (SCCAN): ``r[j] = sum_i softmax_i(cos[j, i]) *
    mask[i]`` (support features unmasked unless `mask_support`).

  With `normalize`, r is min-max normalised per image,
  ``(r - min) / (max - min + norm_eps)`` (PFENet/BAM/SCCAN; HDMNet skips it).
  Finally r is reshaped to the query grid and, if `output_size` is given,
  resized bilinearly (`align_corners`).

  Args:
    query_feat: ``[B, Hq, Wq, C]``.
    support_feat: ``[B, Hs, Ws, C]`` (one shot; average the priors of K shots
      outside, as the references do).
    support_mask: ``[B, Hs, Ws]`` or ``[B, Hs, Ws, 1]`` float mask at the
      support feature size (resize it first with the reference's rule).
    eps: cosine epsilon added to the product of norms.
    reduce: ``"max"`` or ``"softmax_mask"``.
    mask_support: multiply the support features by the mask first.
    normalize: min-max normalisation per image.
    norm_eps: min-max epsilon (defaults to `eps`).
    output_size: optional ``(h, w)`` for the final bilinear resize.
    align_corners: flag of that resize.

  Returns:
    ``[B, h, w, 1]`` prior (``h, w = Hq, Wq`` without `output_size`).
  """
  if query_feat.ndim != 4 or support_feat.ndim != 4:
    raise ValueError(
      "query_feat and support_feat must be [B, H, W, C], got "
      f"{tuple(query_feat.shape)} and {tuple(support_feat.shape)}"
    )
  if support_mask.ndim == 4:
    support_mask = support_mask[..., 0]
  b, hq, wq, c = query_feat.shape
  _, hs, ws, _ = support_feat.shape
  if support_mask.shape != (b, hs, ws):
    raise ValueError(
      f"support_mask must be [B, Hs, Ws] = {(b, hs, ws)} (at the support "
      f"feature size), got {tuple(support_mask.shape)}"
    )
  mask = support_mask.astype(support_feat.dtype).reshape(b, hs * ws)
  s = support_feat.reshape(b, hs * ws, c)
  if mask_support:
    s = s * mask[..., None]
  q = query_feat.reshape(b, hq * wq, c)
  cos = cosine_similarity_matrix(q, s, eps=eps, eps_mode="product")  # [B, Lq, Ls]
  if reduce == "max":
    r = jnp.max(cos, axis=-1)
  elif reduce == "softmax_mask":
    r = jnp.einsum("bqs,bs->bq", jax.nn.softmax(cos, axis=-1), mask, precision=_HIGHEST)
  else:
    raise ValueError(f"reduce must be 'max' or 'softmax_mask', got {reduce!r}")
  if normalize:
    r = minmax_normalize(r, axis=1, eps=eps if norm_eps is None else norm_eps)
  r = r.reshape(b, hq, wq, 1)
  if output_size is not None:
    r = _resize.resize_bilinear(r, output_size, align_corners=align_corners)
  return r


CKMM_SIMILARITIES = ("cosine", "dot")


def ckmm_prior(
  feat: jax.Array,
  fp_base: jax.Array,
  *,
  similarity: str = "cosine",
  minmax: bool = True,
  eps: float = 1e-7,
) -> jax.Array:
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
