"""Pure functions with PyTorch-exact semantics (NHWC), shared by all models.

Re-exports the convolution, resize, pooling and similarity ops; `fss_jax.ops.windows`
(window partition / merge) is imported from its own module.
"""

from __future__ import annotations

from fss_jax.ops.conv import conv2d, pointwise_conv
from fss_jax.ops.pooling import adaptive_avg_pool, avg_pool2d, masked_average_pool, max_pool2d
from fss_jax.ops.resize import resize_bilinear, resize_bilinear_scale, resize_nearest
from fss_jax.ops.similarity import (
  correlation_prior,
  cosine_similarity,
  cosine_similarity_matrix,
  minmax_normalize,
)

__all__ = [
  "conv2d",
  "pointwise_conv",
  "adaptive_avg_pool",
  "avg_pool2d",
  "masked_average_pool",
  "max_pool2d",
  "resize_bilinear",
  "resize_bilinear_scale",
  "resize_nearest",
  "correlation_prior",
  "cosine_similarity",
  "cosine_similarity_matrix",
  "minmax_normalize",
]
