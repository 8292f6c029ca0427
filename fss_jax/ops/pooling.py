"""Pooling with PyTorch semantics (NHWC): adaptive / max / average pooling and
masked average pooling (prototypes).

* `adaptive_avg_pool`: torch AdaptiveAvgPool2d bins ``[floor(i*in/out),
  ceil((i+1)*in/out))`` for any sizes (also out > in), applied as a separable
  averaging matrix per axis.
* `max_pool2d` / `avg_pool2d`: torch output sizes, explicit padding (-inf for
  max), ``ceil_mode`` with torch's rule that the last window must start inside
  the input or the left padding, ``count_include_pad`` divisors.
* `masked_average_pool`: Weighted GAP ``sum(f * m) / (sum(m) + eps)`` (PFENet /
  BAM / HDMNet / SCCAN with eps 5e-4, PANet with 1e-5), optionally at the
  mask's resolution through the transposed bilinear operator (PANet
  up-samples the features to the mask size before pooling).

All sizes are static, every function is jit-friendly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax.ops import resize as _resize

_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f"expected an int or a pair, got {v}")
  return v


def _check_nhwc(x, name="x"):
  if x.ndim != 4:
    raise ValueError(f"{name} must be NHWC [B, H, W, C], got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------
# Adaptive average pooling
# ---------------------------------------------------------------------------


def adaptive_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
  """torch adaptive pooling bins ``(start, end)`` along one axis."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"adaptive pooling sizes must be positive, got {in_size} -> {out_size}")
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)]


def adaptive_avg_matrix(in_size: int, out_size: int, dtype=np.float32) -> np.ndarray:
  """``[out, in]`` averaging matrix of torch's AdaptiveAvgPool along one axis."""
  w = np.zeros((out_size, in_size), np.float64)
  for i, (s, e) in enumerate(adaptive_bins(in_size, out_size)):
    w[i, s:e] = 1.0 / (e - s)
  return w.astype(dtype)


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
  """torch ``F.adaptive_avg_pool2d``.

  Args:
    x: ``[B, H, W, C]`` float array.
    output_size: ``(h, w)`` or one int.

  Returns:
    ``[B, h, w, C]``.
  """
  _check_nhwc(x)
  oh, ow = _pair(output_size)
  _, h, w, _ = x.shape
  dtype = x.dtype
  cdt = jnp.promote_types(dtype, jnp.float32)
  xc = x.astype(cdt)
  if (oh, ow) == (1, 1):  # global average pooling: a plain mean
    return jnp.mean(xc, axis=(1, 2), keepdims=True).astype(dtype)
  np_dt = np.float64 if cdt == jnp.float64 else np.float32
  wh = jnp.asarray(adaptive_avg_matrix(h, oh, np_dt))
  ww = jnp.asarray(adaptive_avg_matrix(w, ow, np_dt))
  y = jnp.einsum("oh,bhwc->bowc", wh, xc, precision=_HIGHEST)
  y = jnp.einsum("pw,bowc->bopc", ww, y, precision=_HIGHEST)
  return y.astype(dtype)


# ---------------------------------------------------------------------------
# Max / average pooling
# ---------------------------------------------------------------------------


def pool_output_size(
  in_size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False
) -> int:
  """torch's pooling output length (``pooling_output_shape``)."""
  eff = dilation * (kernel - 1) + 1
  if padding > eff // 2:
    raise ValueError(
      f"pad should be at most half of the effective kernel size, got "
      f"padding={padding}, kernel={kernel}, dilation={dilation}"
    )
  num = in_size + 2 * padding - eff + ((stride - 1) if ceil_mode else 0)
  out = num // stride + 1
  if ceil_mode and (out - 1) * stride >= in_size + padding:
    out -= 1  # the last window must start inside the input or the left padding
  if out < 1:
    raise ValueError(
      f"pooling output would be empty: input {in_size}, kernel {kernel}, "
      f"stride {stride}, padding {padding}, dilation {dilation}"
    )
  return out


def _pads(in_size, kernel, stride, padding, dilation, ceil_mode):
  out = pool_output_size(in_size, kernel, stride, padding, dilation, ceil_mode)
  eff = dilation * (kernel - 1) + 1
  # Right padding reaching the last window; may exceed `padding` (ceil_mode) or
  # be smaller (positions never read). Extra positions are -inf / 0, sliced off.
  right = (out - 1) * stride + eff - in_size - padding
  return out, (padding, max(right, 0))


def max_pool2d(
  x: jax.Array,
  kernel: int | Sequence[int],
  stride: int | Sequence[int] | None = None,
  padding: int | Sequence[int] = 0,
  ceil_mode: bool = False,
  dilation: int | Sequence[int] = 1,
) -> jax.Array:
  """torch ``F.max_pool2d`` (padding behaves like -inf).

  Args:
    x: ``[B, H, W, C]`` (float or int).
    kernel, stride (default = kernel), padding, dilation: ints or pairs.
    ceil_mode: torch's flag.

  Returns:
    ``[B, h, w, C]``.
  """
  _check_nhwc(x)
  kh, kw = _pair(kernel)
  sh, sw = _pair(stride if stride is not None else kernel)
  ph, pw = _pair(padding)
  dh, dw = _pair(dilation)
  _, h, w, _ = x.shape
  oh, pad_h = _pads(h, kh, sh, ph, dh, ceil_mode)
  ow, pad_w = _pads(w, kw, sw, pw, dw, ceil_mode)
  # A concrete numpy identity lets lax pick its differentiable max-window op.
  if jnp.issubdtype(x.dtype, jnp.floating):
    init = np.array(-np.inf, x.dtype)
  else:
    init = np.array(np.iinfo(x.dtype).min, x.dtype)
  y = jax.lax.reduce_window(
    x,
    init,
    jax.lax.max,
    window_dimensions=(1, kh, kw, 1),
    window_strides=(1, sh, sw, 1),
    padding=((0, 0), pad_h, pad_w, (0, 0)),
    window_dilation=(1, dh, dw, 1),
  )
  return y[:, :oh, :ow]


def max_pool2d_taps(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """torch ``F.max_pool2d(x, kernel, stride, padding)`` as a chain of strided slices.

  Bit-identical to `max_pool2d` in value and gradient: the
  k*k window taps are visited in row-major order and a tap replaces the running
  maximum only when strictly greater, so the gradient goes to the first maximum
  of each window (torch's and XLA select-and-scatter's rule). Its gradient is
  selects and strided pads, which XLA:CPU fuses; the ``reduce_window`` gradient
  lowers to an element-wise scatter there (~4x slower at [2, 473, 473, 64]).

  Args:
    x: ``[B, H, W, C]`` float array.
    kernel, stride, padding: square window, torch semantics (floor mode,
      padding behaves like -inf).

  Returns:
    ``[B, h, w, C]``.
  """
  _, h, w, _ = x.shape
  oh, ow = (
    pool_output_size(h, kernel, stride, padding),
    pool_output_size(w, kernel, stride, padding),
  )
  right = lambda n, o: max((o - 1) * stride + kernel - n - padding, 0)
  xp = jnp.pad(
    x,
    ((0, 0), (padding, right(h, oh)), (padding, right(w, ow)), (0, 0)),
    constant_values=np.array(-np.inf, x.dtype),
  )
  y = None
  for di in range(kernel):
    for dj in range(kernel):
      tap = xp[
        :, di : di + (oh - 1) * stride + 1 : stride, dj : dj + (ow - 1) * stride + 1 : stride
      ]
      y = tap if y is None else jnp.where(tap > y, tap, y)
  assert y is not None, "kernel must be >= 1"
  return y


def _avg_divisor(in_size, out, kernel, stride, padding, count_include_pad):
  """Per-output-position divisor along one axis (torch avg_pool2d)."""
  d = np.zeros(out, np.float64)
  for o in range(out):
    start = o * stride - padding
    end = min(start + kernel, in_size + padding)
    size = end - start
    start, end = max(start, 0), min(end, in_size)
    d[o] = size if count_include_pad else (end - start)
  return d


def avg_pool2d(
  x: jax.Array,
  kernel: int | Sequence[int],
  stride: int | Sequence[int] | None = None,
  padding: int | Sequence[int] = 0,
  ceil_mode: bool = False,
  count_include_pad: bool = True,
) -> jax.Array:
  """torch ``F.avg_pool2d`` (zero padding, torch divisors).

  Args:
    x: ``[B, H, W, C]`` float array.
    kernel, stride (default = kernel), padding: ints or pairs.
    ceil_mode, count_include_pad: torch's flags. With ceil_mode the extra
      right-hand positions beyond the padding never count in the divisor.

  Returns:
    ``[B, h, w, C]``.
  """
  _check_nhwc(x)
  kh, kw = _pair(kernel)
  sh, sw = _pair(stride if stride is not None else kernel)
  ph, pw = _pair(padding)
  _, h, w, _ = x.shape
  oh, pad_h = _pads(h, kh, sh, ph, 1, ceil_mode)
  ow, pad_w = _pads(w, kw, sw, pw, 1, ceil_mode)
  dtype = x.dtype
  cdt = jnp.promote_types(dtype, jnp.float32)
  s = jax.lax.reduce_window(
    x.astype(cdt),
    np.array(0, cdt),
    jax.lax.add,
    window_dimensions=(1, kh, kw, 1),
    window_strides=(1, sh, sw, 1),
    padding=((0, 0), pad_h, pad_w, (0, 0)),
  )[:, :oh, :ow]
  dh = _avg_divisor(h, oh, kh, sh, ph, count_include_pad)
  dw = _avg_divisor(w, ow, kw, sw, pw, count_include_pad)
  div = jnp.asarray((dh[:, None] * dw[None, :])[None, :, :, None], cdt)
  return (s / div).astype(dtype)


# ---------------------------------------------------------------------------
# Masked average pooling (prototypes)
# ---------------------------------------------------------------------------


def masked_average_pool(
  feat: jax.Array, mask: jax.Array, *, eps: float = 0.0005, resize: str | None = None
) -> jax.Array:
  """Weighted GAP: ``sum_xy f * m / (sum_xy m + eps)``.

  Args:
    feat: ``[B, H, W, C]`` features.
    mask: ``[B, Hm, Wm]`` or ``[B, Hm, Wm, 1]`` float weights (0/1 or soft).
      Without `resize` it must have the feature size.
    eps: added to the mask area (PFENet's Weighted_GAP 0.0005; PANet 1e-5).
    resize: None (mask already at feature size), or ``"features"``: pool the
      features *up-sampled to the mask size* (bilinear, align_corners=False,
      as PANet does) without materialising them, through the transposed
      interpolation operator: ``sum up(F) * M = sum F * (R_h^T M R_w)``.

  Returns:
    ``[B, C]`` prototypes.
  """
  _check_nhwc(feat, "feat")
  if mask.ndim == 4:
    if mask.shape[-1] != 1:
      raise ValueError(f"mask must be [B, H, W] or [B, H, W, 1], got {tuple(mask.shape)}")
    mask = mask[..., 0]
  if mask.ndim != 3:
    raise ValueError(f"mask must be [B, H, W] or [B, H, W, 1], got {tuple(mask.shape)}")
  b, h, w, c = feat.shape
  cdt = jnp.promote_types(feat.dtype, jnp.float32)
  mask = mask.astype(cdt)
  area = jnp.sum(mask, axis=(1, 2))  # [B]
  if resize is None:
    if mask.shape[1:] != (h, w):
      raise ValueError(
        f"mask size {tuple(mask.shape[1:])} differs from the feature size "
        f"{(h, w)}; resize the mask first or pass resize='features'"
      )
    m = mask
  elif resize == "features":
    hm, wm = mask.shape[1:]
    np_dt = np.float64 if cdt == jnp.float64 else np.float32
    rh = jnp.asarray(_resize.linear_weights_for(h, hm, align_corners=False, dtype=np_dt))
    rw = jnp.asarray(_resize.linear_weights_for(w, wm, align_corners=False, dtype=np_dt))
    m = jnp.einsum("yh,byx,xw->bhw", rh, mask, rw, precision=_HIGHEST)
  else:
    raise ValueError(f"resize must be None or 'features', got {resize!r}")
  num = jnp.einsum("bhwc,bhw->bc", feat.astype(cdt), m, precision=_HIGHEST)
  return (num / (area[:, None] + eps)).astype(feat.dtype)
