"""PANet's modified VGG-16 encoder (kaixin96/PANet ``models/vgg.py``), NHWC.

Five VGG-16 conv blocks (13 3x3 convolutions with bias, no normalisation):

=====  ==========================================  =========================
block  layers                                      then
=====  ==========================================  =========================
1      conv1_1, conv1_2 (3->64->64), ReLU each     max-pool k3 s2 p1
2      conv2_1, conv2_2 (->128)                    max-pool k3 s2 p1
3      conv3_1..conv3_3 (->256)                    max-pool k3 s2 p1
4      conv4_1..conv4_3 (->512)                    max-pool k3 **s1** p1
5      conv5_1..conv5_3 (->512), dilation 2,       (no pool)
       padding 2, **no ReLU after conv5_3**
=====  ==========================================  =========================

Output stride 8: ``h' = ceil(ceil(ceil(H / 2) / 2) / 2)`` (241 -> 31, 417 -> 53).
Parameters ``conv{b}_{i}/{kernel,bias}``; `panet_vgg_keymap` maps the official
PANet checkpoint keys (``encoder.backbone.features.{2(b-1)}.{2(i-1)}``) and
`imagenet_vgg_keymap` torchvision's ``vgg16`` file (``features.{0,2,5,...}``;
PANet's initialisation copies those 26 tensors positionally, which is the same
mapping).

Max-pooling runs as `fss_jax.ops.pooling.max_pool2d_taps` (default ``pool="taps"``): the same values
and the same gradient as `fss_jax.ops.pooling.max_pool2d` (torch's first-max
rule), but on XLA:CPU the ``reduce_window`` gradient (select-and-scatter) is
expanded into an arg-max reduce-window plus an element-wise scatter: the four
pool gradients of a 473 px PANet step take 2.2-2.5 s that way and 0.6 s as
taps (2 CPU cores; bench/profile_step.py).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from fss_jax import keymaps
from fss_jax.nn.layers import Conv2d
from fss_jax.ops.pooling import max_pool2d, max_pool2d_taps

# (number of convs, output channels, dilation, stride of the pool that follows or None)
VGG16_PANET_BLOCKS: tuple[tuple[int, int, int, int | None], ...] = (
  (2, 64, 1, 2),
  (2, 128, 1, 2),
  (3, 256, 1, 2),
  (3, 512, 1, 1),
  (3, 512, 2, None),
)

# torchvision vgg16 `features` indices of the 13 convolutions, in order.
TORCHVISION_VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

# PANet: kaiming_normal_(weight, nonlinearity="relu") = N(0, 2 / fan_in); torch's
# default bias init is kept.
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def conv_names() -> list[str]:
  """``["conv1_1", "conv1_2", "conv2_1", ..., "conv5_3"]``."""
  return [
    f"conv{b + 1}_{i + 1}" for b, (n, _, _, _) in enumerate(VGG16_PANET_BLOCKS) for i in range(n)
  ]


class PANetVGG16(nn.Module):
  """PANet's VGG-16 encoder.

  Attributes:
    last_relu: apply ReLU after conv5_3 (PANet: False, the embedding is the raw
      conv5_3 output).
    precision: convolution precision (None follows
      `jax.default_matmul_precision`).
    pool: ``"taps"`` (`fss_jax.ops.pooling.max_pool2d_taps`, fast gradient on CPU) or
      ``"reduce_window"`` (`fss_jax.ops.pooling.max_pool2d`); same numbers.
  """

  last_relu: bool = False
  precision: Any = None
  pool: str = "taps"

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """x [N, H, W, 3] normalised images -> dict of block outputs.

    Returns:
      ``{"block1": [N, H, W, 64], "block2": [N, H/2, W/2, 128], "block3":
      [N, H/4, W/4, 256], "block4": [N, H/8, W/8, 512], "block5": [N, H/8,
      W/8, 512]}`` (sizes rounded up). Each block output is taken before the
      max-pool that follows it (the fixture's ``features[2(b-1)]`` hooks);
      ``block5`` is the embedding.
    """
    if x.ndim != 4:
      raise ValueError(f"PANetVGG16 expects images [N, H, W, 3], got {tuple(x.shape)}")
    if self.pool not in ("taps", "reduce_window"):
      raise ValueError(f"pool must be 'taps' or 'reduce_window', got {self.pool!r}")
    pool = max_pool2d_taps if self.pool == "taps" else max_pool2d
    out = {}
    num_blocks = len(VGG16_PANET_BLOCKS)
    for b, (n_convs, ch, dil, pool_stride) in enumerate(VGG16_PANET_BLOCKS):
      for i in range(n_convs):
        x = Conv2d(
          ch,
          3,
          padding=dil,
          dilation=dil,
          kernel_init=kaiming_normal_fan_in,
          precision=self.precision,
          name=f"conv{b + 1}_{i + 1}",
        )(x)
        last = b == num_blocks - 1 and i == n_convs - 1
        if not last or self.last_relu:
          x = nn.relu(x)
      out[f"block{b + 1}"] = x
      if pool_stride is not None:
        x = pool(x, 3, pool_stride, 1)
    return out


def _keymap(src_names: list[str], dst: tuple[str, ...]) -> list:
  rules = []
  for src, name in zip(src_names, conv_names()):
    rules += keymaps.conv(src, (*dst, name))
  return rules


def panet_vgg_keymap(
  prefix: str = "encoder.backbone.", dst: tuple[str, ...] = ("encoder",)
) -> list:
  """Key map of PANet's encoder: ``{prefix}features.{2(b-1)}.{2(i-1)}.{weight,bias}``."""
  src = [
    f"{prefix}features.{2 * b}.{2 * i}"
    for b, (n, _, _, _) in enumerate(VGG16_PANET_BLOCKS)
    for i in range(n)
  ]
  return _keymap(src, dst)


def imagenet_vgg_keymap(
  dst: tuple[str, ...] = ("encoder",), *, with_classifier: bool = True
) -> list:
  """Key map of torchvision's ``vgg16`` state dict (``vgg16-397923af.pth``).

  The 13 ``features.*`` convolutions become ``conv{b}_{i}``; the fully
  connected ``classifier.{0,3,6}`` layers (absent from PANet) are ignored.
  """
  rules = _keymap([f"features.{j}" for j in TORCHVISION_VGG16_CONV_INDICES], dst)
  if with_classifier:
    for j in (0, 3, 6):
      rules += [keymaps.Ignore(f"classifier.{j}.weight"), keymaps.Ignore(f"classifier.{j}.bias")]
  return rules


def feature_size(size: int) -> int:
  """Embedding size for an input size: three stride-2 pools, ``ceil(x / 2)`` each."""
  for _ in range(3):
    size = (size + 1) // 2
  return size


# -- the encoder on its own (registry name "vgg16_panet", wired in specs.py) -------------------


def make_encoder(last_relu: bool = False, **_unused) -> PANetVGG16:
  """The encoder as a top-level module (variables ``params/conv{b}_{i}``)."""
  return PANetVGG16(last_relu=last_relu)


def encoder_keymap(source: str = "imagenet", prefix: str | None = None, **_unused) -> list:
  """Key map for `make_encoder`.

  Args:
    source: ``"imagenet"`` (torchvision ``vgg16``: ``features.*``, classifier
      ignored) or ``"panet"`` (PANet snapshot: ``encoder.backbone.features.*``).
    prefix: source-key prefix in front of ``features.`` (defaults: "" for
      imagenet, "encoder.backbone." for panet).
  """
  if source == "imagenet":
    rules = imagenet_vgg_keymap(dst=())
    return keymaps.prefixed(prefix, rules) if prefix else rules
  if source == "panet":
    return panet_vgg_keymap(prefix="encoder.backbone." if prefix is None else prefix, dst=())
  raise ValueError(f"VGG-16 key map source must be 'imagenet' or 'panet', got {source!r}")
