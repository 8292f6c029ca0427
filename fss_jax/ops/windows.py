"""Non-overlapping window ops for windowed (Swin-style) attention, NHWC.

Windows are square, ``window x window`` pixels, ordered row-major over the
window grid; the tokens inside a window are row-major too (Swin's
``window_partition``). With kernel = stride = window, PyTorch's
``F.unfold`` / ``F.fold`` are exactly `window_partition` / `window_merge`
(up to the channel-last layout), so a gather of whole windows by index
(SCCAN's patch alignment) is `gather_windows` between the two.

SCCAN's "shifted" windows are not Swin's cyclic roll: the map is zero-padded
by half a window on every side (`pad_half_window`), partitioned, and the
centre is cropped back (`crop_half_window`).

JC²A's point-to-block alignment (jc2a.md §4.2) zero-pads the map at the bottom /
right to whole windows (`pad_to_windows`), scores every window by its mask
coverage (`window_mean` of the padded mask, Eq. 6), keeps the k best
(`top_windows`, Eq. 7) and gathers them (`gather_windows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_divisible(height: int, width: int, window: int) -> None:
  if height % window or width % window:
    raise ValueError(
      f"feature map {height}x{width} is not a multiple of the window size "
      f"{window}; resize or pad it first (e.g. with pad_half_window)"
    )


def window_partition(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """Splits a map into non-overlapping windows.

  Args:
    x: [B, H, W, C] with H and W multiples of `window`.
    window: window side in pixels.

  Returns:
    [B, nH * nW, window * window, C], windows row-major over the (nH, nW) grid,
    tokens row-major inside each window.
  """
  b, h, w, c = x.shape
  _check_divisible(h, w, window)
  nh, nw = h // window, w // window
  x = x.reshape(b, nh, window, nw, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nh * nw, window * window, c)


def window_merge(windows: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Inverse of `window_partition`.

  Args:
    windows: [B, nH * nW, window * window, C].
    height, width: size of the map (multiples of the window side).

  Returns:
    [B, height, width, C].
  """
  b, n, t, c = windows.shape
  window = int(round(t**0.5))
  if window * window != t:
    raise ValueError(f"windows hold {t} tokens, not a square number")
  _check_divisible(height, width, window)
  nh, nw = height // window, width // window
  if nh * nw != n:
    raise ValueError(f"{n} windows cannot tile a {height}x{width} map with window {window}")
  x = windows.reshape(b, nh, nw, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def gather_windows(windows: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """Takes whole windows by index: ``out[b, j] = windows[b, index[b, j]]``.

  Args:
    windows: [B, N, T, C].
    index: [B, M] integer window indices in [0, N).

  Returns:
    [B, M, T, C].
  """
  return jnp.take_along_axis(windows, index[:, :, None, None].astype(jnp.int32), axis=1)


def window_sum(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """Sum over each window (avg_pool2d(kernel=stride=window) x window area).

  Args:
    x: [B, H, W, C].

  Returns:
    [B, nH * nW, C], windows row-major.
  """
  return window_partition(x, window).sum(axis=2)


def window_mean(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """Mean over each window, like ``F.avg_pool2d(x, window, window)`` flattened.

  Args:
    x: [B, H, W, C].

  Returns:
    [B, nH * nW, C], windows row-major.
  """
  return window_sum(x, window) / (window * window)


def half_window_padding(window: int) -> tuple[int, int]:
  """(before, after) zero padding of a shifted block: (w // 2, w - w // 2)."""
  return window // 2, window - window // 2


def pad_half_window(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """Zero-pads H and W by half a window on each side (SCCAN's shift).

  Args:
    x: [B, H, W, C].

  Returns:
    [B, H + window, W + window, C] (padding ``window // 2`` before and
    ``window - window // 2`` after, on both spatial axes).
  """
  before, after = half_window_padding(window)
  return jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))


def crop_half_window(x: jnp.ndarray, window: int, height: int, width: int) -> jnp.ndarray:
  """Inverse of `pad_half_window`: [B, H + window, W + window, C] -> [B, H, W, C]."""
  before, _ = half_window_padding(window)
  return x[:, before : before + height, before : before + width, :]


def window_grid(height: int, width: int, window: int) -> tuple[int, int]:
  """(nH, nW) number of windows along each axis."""
  _check_divisible(height, width, window)
  return height // window, width // window


def pad_to_windows(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """Zero-pads the bottom / right of a map to whole windows.

  Args:
    x: [B, H, W, ...].
    window: window side in pixels.

  Returns:
    [B, ceil(H / window) * window, ceil(W / window) * window, ...]; `x` itself when
    H and W are already multiples of `window`.
  """
  h, w = x.shape[1:3]
  ph, pw = -h % window, -w % window
  if not ph and not pw:
    return x
  return jnp.pad(x, [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3))


def top_windows(scores: jnp.ndarray, k: int) -> jnp.ndarray:
  """Indices of the k highest-scoring windows, ties broken by the lower index.

  A stable descending sort (lexicographic on (-score, index)), so windows with
  equal scores (e.g. many zero-coverage windows) keep their row-major order.

  Args:
    scores: [B, N] per-window scores.
    k: windows to keep; clipped to N.

  Returns:
    [B, min(k, N)] int32 indices into the N windows.
  """
  b, n = scores.shape
  k = min(int(k), n)
  neg = 0.0 - scores  # 0.0 - 0.0 is +0.0: no signed-zero ties
  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  _, order = jax.lax.sort((neg, idx), dimension=1, num_keys=2)
  return order[:, :k]
