"""torch.nn.functional.conv2d on NHWC arrays, with 1 x 1 convolutions as matrix products.

A 1 x 1 convolution (no padding, one group) is ``x @ W`` per pixel. As a convolution,
XLA:CPU (jax 0.10) computes its weight gradient as a convolution over activations it
first transposes to [C, B, H, W], with the element-wise backward of the layers around it
(BatchNorm, ReLU, residual add) fused into that transpose and run in strided order; as a
dot the same gradient needs one [C, B*H*W] transpose. SSP's training step at 241 px
(bench/profile_step.py): 1080 ms -> 828 ms. The values are the same up to float
summation order. (A custom backward that materialises the dot operands first, with
``lax.optimization_barrier``, measured slower: 969 ms.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Pair = tuple[int, int]


def pointwise_conv(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
  """x [B, H, W, I] @ w [I, O] -> [B, H, W, O] (a 1 x 1 convolution)."""
  return jnp.einsum("bhwi,io->bhwo", x, w, precision=precision)


def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  *,
  stride: Pair = (1, 1),
  padding: Pair = (0, 0),
  dilation: Pair = (1, 1),
  groups: int = 1,
  precision: Any = None,
) -> jax.Array:
  """Cross-correlation as torch's ``conv2d`` (symmetric zero padding).

  Args:
    x: [B, H, W, Cin].
    kernel: [kh, kw, Cin / groups, Cout] (HWIO).
    stride, padding, dilation: (h, w) pairs; ``padding`` zeros on each side.
    groups: feature groups.
    precision: for the dot / convolution (None: ``jax.default_matmul_precision``).

  Returns:
    [B, H', W', Cout], H' = floor((H + 2 p - d (k - 1) - 1) / s) + 1.
  """
  kh, kw = kernel.shape[:2]
  if (kh, kw) == (1, 1) and tuple(padding) == (0, 0) and groups == 1:
    sh, sw = stride
    if (sh, sw) != (1, 1):
      x = x[:, ::sh, ::sw]  # floor((H - 1) / s) + 1 rows, as torch
    return pointwise_conv(x, kernel[0, 0], precision)
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=tuple(stride),
    padding=tuple((p, p) for p in padding),
    rhs_dilation=tuple(dilation),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    precision=precision,
  )
