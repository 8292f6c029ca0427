"""Convolution, linear and batch-norm layers with PyTorch semantics, NHWC.

Ports of the reference models need three things that flax's stock layers do
not give directly:

* `Conv2d`: torch's symmetric integer padding (never "SAME", which pads
  asymmetrically for even kernels or strides), dilation and groups, with the
  parameter names ``kernel`` [kh, kw, in/groups, out] (HWIO) and ``bias`` that
  `fss_jax.keymaps.conv` writes.
* `BatchNorm2d`: eps 1e-5 and torch's momentum convention
  (``running = (1 - momentum) * running + momentum * batch``, running variance
  from the unbiased batch variance), inference as the affine map
  ``x * (w / sqrt(var + eps)) + (b - mean * w / sqrt(var + eps))`` that torch
  and frozen batch norms compute; parameters ``scale``/``bias`` and batch
  stats ``mean``/``var`` as written by `fss_jax.keymaps.bn`.
  `FrozenBatchNorm2d` always uses the running statistics.
* torch's default initialisers (kaiming-uniform with a = sqrt(5), i.e.
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases), so that layers
  trained from scratch start like the reference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fss_jax.ops import conv as conv_ops

Initializer = Callable[..., jax.Array]
IntOr2 = int | Sequence[int]


def _pair(v: IntOr2, name: str) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
  return v


# torch.nn.Conv2d / nn.Linear default weight init: kaiming_uniform_(a=sqrt(5))
# = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in/groups * kh * kw.
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)
# torchvision ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu").
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """torch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv2d(nn.Module):
  """torch.nn.Conv2d on NHWC inputs.

  Attributes:
    features: output channels.
    kernel_size, stride, padding, dilation: ints or (h, w) pairs; `padding`
      is torch's symmetric zero padding on each side.
    groups: feature groups (``groups == in_channels`` is depthwise).
    use_bias: add a bias (torch ``bias=True``).
    kernel_init / bias_init: default to torch's initialisers; `bias_init`,
      when given, is a plain flax initializer.
    precision: passed to `fss_jax.ops.conv.conv2d` (None follows
      `jax.default_matmul_precision`); 1 x 1 kernels run as matrix products.
  """

  features: int
  kernel_size: IntOr2 = 3
  stride: IntOr2 = 1
  padding: IntOr2 = 0
  dilation: IntOr2 = 1
  groups: int = 1
  use_bias: bool = True
  kernel_init: Initializer = torch_default_kernel_init
  bias_init: Initializer | None = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H', W', features] with torch's output size
    floor((H + 2p - d(k-1) - 1) / s) + 1."""
    kh, kw = _pair(self.kernel_size, "kernel_size")
    ph, pw = _pair(self.padding, "padding")
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(
        f"Conv2d: in ({cin}) and out ({self.features}) channels must be "
        f"divisible by groups={self.groups}"
      )
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, cin // self.groups, self.features), jnp.float32
    )
    y = conv_ops.conv2d(
      x,
      kernel.astype(x.dtype),
      stride=_pair(self.stride, "stride"),
      padding=(ph, pw),
      dilation=_pair(self.dilation, "dilation"),
      groups=self.groups,
      precision=self.precision,
    )
    if self.use_bias:
      fan_in = cin // self.groups * kh * kw
      bias = self.param(
        "bias", self.bias_init or torch_default_bias_init(fan_in), (self.features,), jnp.float32
      )
      y = y + bias.astype(y.dtype)
    return y


class Linear(nn.Module):
  """torch.nn.Linear: x [..., in] -> [..., features]; kernel [in, features]."""

  features: int
  use_bias: bool = True
  kernel_init: Initializer = torch_default_kernel_init
  bias_init: Initializer | None = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
    y = jnp.matmul(x, kernel.astype(x.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param(
        "bias", self.bias_init or torch_default_bias_init(fan_in), (self.features,), jnp.float32
      )
      y = y + bias.astype(y.dtype)
    return y


class Mlp(nn.Module):
  """Linear(C -> hidden) -> GELU (exact erf) -> Linear(hidden -> `out`, default C); no dropout.

  The transformer MLP of SCCAN's blocks and PAHNet's PFE (params ``fc1``, ``fc2``).
  """

  hidden: int
  out: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.out or x.shape[-1]
    x = Linear(self.hidden, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return Linear(out, name="fc2")(x)


class BatchNorm2d(nn.Module):
  """torch.nn.BatchNorm2d over the last (channel) axis of NHWC inputs.

  Attributes:
    use_running_average: True = inference mode (running statistics; this is
      also what frozen BN does); may instead be passed to `__call__`.
    eps: added to the variance (torch default 1e-5).
    momentum: torch convention, weight of the new batch statistic.
  Variables: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.
  """

  use_running_average: bool | None = None
  eps: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """x [..., C] -> same shape."""
    ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if ura:
      # torch eval / FrozenBatchNorm2d: one fused affine map.
      mul = scale * jax.lax.rsqrt(ra_var.value + self.eps)
      add = bias - ra_mean.value * mul
      return x * mul.astype(x.dtype) + add.astype(x.dtype)
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - mean), axes)  # biased, used to normalise
    if not self.is_initializing():
      n = math.prod(x.shape[:-1])
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      ra_mean.value = (1 - m) * ra_mean.value + m * mean
      ra_var.value = (1 - m) * ra_var.value + m * unbiased
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


FrozenBatchNorm2d = functools.partial(BatchNorm2d, use_running_average=True)


def _normalize(
  x: jax.Array, axes: tuple[int, ...], eps: float, scale: jax.Array, bias: jax.Array
) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over ``axes``, two-pass variance in float32.

  The statistics and the affine map are computed in (at least) float32 and the
  result is cast to x's dtype (bfloat16 compute stays bfloat16; see
  `fss_jax.train.precision`). Same operation order as flax's normalisation
  layers, so float32 results are identical to ``flax.linen.LayerNorm`` /
  ``GroupNorm`` with ``use_fast_variance=False``.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axes, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
  y = (xf - mean) * (jax.lax.rsqrt(var + eps) * scale)
  return (y + bias).astype(x.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis: x [..., C] -> same shape and dtype.

  Params ``scale`` / ``bias`` [C] (the tree of ``flax.linen.LayerNorm``, which
  `fss_jax.keymaps.layer_norm` writes). Unlike flax's layer, the result keeps a
  bfloat16 input's dtype instead of being promoted by the float32 params.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return _normalize(x, (x.ndim - 1,), self.epsilon, scale, bias)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm for NHWC: x [B, ..., C] -> same shape and dtype.

  Statistics per sample and group over the spatial axes and the group's
  C / num_groups channels; per-channel ``scale`` / ``bias`` [C] (flax's tree).
  """

  num_groups: int
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, g = x.shape[-1], self.num_groups
    if g <= 0 or c % g:
      raise ValueError(f"GroupNorm: num_groups={g} does not divide the {c} channels")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xg = x.reshape(x.shape[:-1] + (g, c // g))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    y = _normalize(xg, axes, self.epsilon, scale.reshape(g, c // g), bias.reshape(g, c // g))
    return y.reshape(x.shape)
