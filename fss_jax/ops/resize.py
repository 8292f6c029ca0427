"""Image / feature-map resizing with PyTorch-exact semantics (NHWC).

PyTorch's `F.interpolate` is used by every reference with a mix of
``align_corners=True`` and ``False``; `jax.image.resize` implements neither
align_corners=True nor torch's (non-antialiased) down-sampling. The functions
here reproduce torch's source-index arithmetic exactly:

* bilinear: the per-axis source coordinate is computed in float32 (float64 for
  float64 inputs) like ATen's ``area_pixel_compute_source_index``; each output
  pixel blends the two neighbours ``i0 = floor(src)``, ``i1 = min(i0 + 1,
  in - 1)``. The blend is applied as a dense ``[out, in]`` interpolation matrix
  per axis (two einsums, highest precision): exact, differentiable without
  scatters and fast on MXUs.
* nearest: torch's legacy ``mode="nearest"`` rule
  ``src = min(floor(dst * (in / out)), in - 1)`` (float32 scale), a gather,
  so it also works on integer label maps.

All sizes are static Python ints, so every function is jit-friendly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _compute_dtype(dtype) -> np.dtype:
  """ATen's opmath type: float64 stays float64, everything else uses float32."""
  return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _pair(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"size must be an int or a pair (h, w), got {size}")
  return size


def _check_nhwc(x, name: str = "x") -> None:
  if x.ndim != 4:
    raise ValueError(
      f"{name} must be NHWC [B, H, W, C], got shape {tuple(x.shape)}; "
      "add a batch / channel axis (x[None] / x[..., None]) first"
    )


def linear_weights(
  in_size: int, out_size: int, *, align_corners: bool, scale: float | None = None, dtype=np.float32
) -> np.ndarray:
  """The torch bilinear interpolation matrix of one axis.

  Args:
    in_size: input length along the axis.
    out_size: output length.
    align_corners: torch's flag.
    scale: the user's scale factor when torch was called with ``scale_factor``
      (then, for align_corners=False, the coordinate scale is ``1 / scale``
      instead of ``in / out``); None when torch was called with ``size``.
    dtype: arithmetic dtype for the coordinates (float32 like ATen for float
      inputs; float64 for float64 inputs).

  Returns:
    ``[out_size, in_size]`` numpy matrix W with ``y = W @ x`` along the axis.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  t = np.dtype(dtype).type
  dst = np.arange(out_size).astype(dtype)
  if align_corners:
    ratio = t(in_size - 1) / t(out_size - 1) if out_size > 1 else t(0)
    src = ratio * dst
  else:
    if scale is not None and scale > 0:
      ratio = t(1.0 / scale)  # ATen: static_cast<opmath_t>(1.0 / scale) in double first
    else:
      ratio = t(in_size) / t(out_size)
    # ATen's `scale * (dst + 0.5) - 0.5` is compiled to a fused multiply-add
    # (one rounding); emulate it with a wider intermediate.
    wide = np.float64 if t is np.float32 else np.longdouble
    src = (wide(ratio) * (dst + t(0.5)).astype(wide) - wide(0.5)).astype(dtype)
    src = np.maximum(src, t(0))
  i0 = src.astype(np.int64)  # src >= 0: truncation == floor, as in ATen
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam1 = (src - i0.astype(dtype)).astype(dtype)
  lam0 = (t(1) - lam1).astype(dtype)
  w = np.zeros((out_size, in_size), dtype)
  rows = np.arange(out_size)
  np.add.at(w, (rows, i0), lam0)
  np.add.at(w, (rows, i1), lam1)
  return w


def _apply_axis_matrices(x: jax.Array, wh: np.ndarray, ww: np.ndarray) -> jax.Array:
  """y[b, o, p, c] = sum_{h, w} wh[o, h] ww[p, w] x[b, h, w, c]."""
  dtype = x.dtype
  cdt = jnp.promote_types(dtype, jnp.float32)
  xc = x.astype(cdt)
  # Contract the axis that shrinks most first (fewer flops / memory).
  h, w = x.shape[1], x.shape[2]
  oh, ow = wh.shape[0], ww.shape[0]
  wh_j = jnp.asarray(wh, cdt)
  ww_j = jnp.asarray(ww, cdt)
  if oh * w <= h * ow:
    y = jnp.einsum("oh,bhwc->bowc", wh_j, xc, precision=_HIGHEST)
    y = jnp.einsum("pw,bowc->bopc", ww_j, y, precision=_HIGHEST)
  else:
    y = jnp.einsum("pw,bhwc->bhpc", ww_j, xc, precision=_HIGHEST)
    y = jnp.einsum("oh,bhpc->bopc", wh_j, y, precision=_HIGHEST)
  return y.astype(dtype)


def resize_bilinear(x: jax.Array, size: int | Sequence[int], *, align_corners: bool) -> jax.Array:
  """torch ``F.interpolate(x, size, mode="bilinear", align_corners=...)``.

  Up- and down-sampling, no antialiasing (torch's default).

  Args:
    x: ``[B, H, W, C]`` float array.
    size: output ``(h, w)`` (or one int for both).
    align_corners: torch's flag; False is half-pixel
      (``src = (dst + 0.5) * in / out - 0.5`` clamped at 0), True maps corner
      to corner (``src = dst * (in - 1) / (out - 1)``, 0 when ``out == 1``).

  Returns:
    ``[B, h, w, C]`` with x's dtype.
  """
  _check_nhwc(x)
  oh, ow = _pair(size)
  _, h, w, _ = x.shape
  if (oh, ow) == (h, w):
    return x  # torch's weights are exactly the identity in this case
  cdt = _compute_dtype(x.dtype)
  wh = linear_weights(h, oh, align_corners=align_corners, dtype=cdt)
  ww = linear_weights(w, ow, align_corners=align_corners, dtype=cdt)
  return _apply_axis_matrices(x, wh, ww)


def scale_output_size(in_size: int, scale_factor: float) -> int:
  """Output length torch computes from ``scale_factor``: ``floor(in * s)``."""
  return int(np.floor(float(in_size) * float(scale_factor)))


def resize_bilinear_scale(
  x: jax.Array, scale_factor: float | Sequence[float], *, align_corners: bool
) -> jax.Array:
  """torch ``F.interpolate(x, scale_factor=s, mode="bilinear", ...)``.

  With ``recompute_scale_factor=None`` torch uses ``out = floor(in * s)`` and,
  for align_corners=False, the coordinate scale ``1 / s`` (not ``in / out``).

  Args:
    x: ``[B, H, W, C]`` float array.
    scale_factor: one float or ``(s_h, s_w)``.
    align_corners: torch's flag (True ignores the scale for the coordinates).

  Returns:
    ``[B, floor(H * s_h), floor(W * s_w), C]``.
  """
  _check_nhwc(x)
  if isinstance(scale_factor, (int, float, np.floating, np.integer)):
    sh = sw = float(scale_factor)
  else:
    sh, sw = (float(s) for s in scale_factor)
  _, h, w, _ = x.shape
  oh, ow = scale_output_size(h, sh), scale_output_size(w, sw)
  cdt = _compute_dtype(x.dtype)
  wh = linear_weights(h, oh, align_corners=align_corners, scale=sh, dtype=cdt)
  ww = linear_weights(w, ow, align_corners=align_corners, scale=sw, dtype=cdt)
  return _apply_axis_matrices(x, wh, ww)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """torch legacy nearest source indices ``min(floor(dst * (in/out)), in-1)``."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  if in_size == out_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1  # ATen's fast path (identical values)
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.floor(np.arange(out_size).astype(f32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
  """torch ``F.interpolate(x, size, mode="nearest")`` (legacy floor rule).

  Args:
    x: ``[B, H, W, C]`` or ``[B, H, W]`` array of any dtype (labels stay int).
    size: output ``(h, w)``.

  Returns:
    ``[B, h, w, C]`` (or ``[B, h, w]``), same dtype.
  """
  if x.ndim not in (3, 4):
    raise ValueError(f"resize_nearest expects [B, H, W] or [B, H, W, C], got {tuple(x.shape)}")
  oh, ow = _pair(size)
  h, w = x.shape[1], x.shape[2]
  if (oh, ow) == (h, w):
    return x
  x = jnp.take(x, jnp.asarray(nearest_indices(h, oh)), axis=1)
  return jnp.take(x, jnp.asarray(nearest_indices(w, ow)), axis=2)


def linear_weights_for(
  in_size: int, out_size: int, *, align_corners: bool, dtype=np.float32
) -> np.ndarray:
  """Like `linear_weights` but exactly the identity when sizes match.

  Convenience for callers that fold a resize into a contraction (e.g. masked
  pooling of up-sampled features through the transposed operator).
  """
  if in_size == out_size:
    return np.eye(in_size, dtype=dtype)
  return linear_weights(in_size, out_size, align_corners=align_corners, dtype=dtype)
