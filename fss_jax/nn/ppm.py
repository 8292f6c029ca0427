"""PSPNet pyramid pooling module (hszhao/semseg `PPM`, as used by BAM/HDMNet/PAHNet/Sym-Net).

For each bin b: AdaptiveAvgPool(b x b) -> conv 1x1 (no bias) -> BN -> ReLU ->
bilinear up-sampling back to the input size with **align_corners=True**; the
output is ``concat[x, branch_1, ..., branch_n]`` on the channel axis.

Key names follow the PyTorch module: ``ppm.features.{i}.1`` (conv) and
``ppm.features.{i}.2`` (BN) become ``features_{i}/conv`` and ``features_{i}/bn``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.nn.layers import BatchNorm2d, Conv2d
from fss_jax.ops.pooling import adaptive_avg_pool
from fss_jax.ops.resize import resize_bilinear


class PPMBranch(nn.Module):
  """One pyramid level: pool to ``bin x bin``, project, up-sample."""

  bin: int
  features: int
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x ``[B, H, W, C]`` -> ``[B, H, W, features]``."""
    _, h, w, _ = x.shape
    y = adaptive_avg_pool(x, (self.bin, self.bin))
    y = Conv2d(self.features, 1, use_bias=False, name="conv")(y)
    y = BatchNorm2d(name="bn")(y, use_running_average=self.frozen_bn or not train)
    y = nn.relu(y)
    return resize_bilinear(y, (h, w), align_corners=True)


class PPM(nn.Module):
  """Pyramid pooling: ``[B, H, W, C]`` -> ``[B, H, W, C + len(bins) * reduction]``.

  Attributes:
    bins: pooled grid sizes (PSPNet: 1, 2, 3, 6).
    reduction: channels of every branch (PSPNet: 2048 / 4 = 512).
    frozen_bn: BN always uses its running statistics (frozen base learner).
  """

  bins: Sequence[int] = (1, 2, 3, 6)
  reduction: int = 512
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    out = [x]
    for i, b in enumerate(self.bins):
      out.append(PPMBranch(b, self.reduction, self.frozen_bn, name=f"features_{i}")(x, train=train))
    return jnp.concatenate(out, axis=-1)


def ppm_keymap(src: str, dst: tuple[str, ...], num_bins: int = 4) -> list:
  """Key map of `PPM` from torch prefix ``src`` (e.g. "ppm") to Flax path ``dst``."""
  rules = []
  for i in range(num_bins):
    rules += keymaps.conv(f"{src}.features.{i}.1", (*dst, f"features_{i}", "conv"), bias=False)
    rules += keymaps.bn(f"{src}.features.{i}.2", (*dst, f"features_{i}", "bn"))
  return rules
