"""PFENet's Feature Enrichment Module (FEM) decoder and its merge convolution.

PFENet (Tian et al., TPAMI 2020, ``dvlab-research/PFENet`` ``model/PFENet.py``)
decodes a few-shot query with a feature pyramid: per level l (side s_l, e.g. 60,
30, 15, 8) a merged query feature x_l (query ⊕ prototype ⊕ guidance, through
`MergeConv`) is refined top-down and classified by an auxiliary head; all
levels are upsampled to the finest side, concatenated and classified. JC²A uses
it unchanged as its "multi-scale residual" decoder (jc2a.md §7). All convs are
bias-free except the final 1×1 classifiers; no normalisation; Dropout2d(0.1)
before each classifier.

Flax names mirror PFENet's ``nn.Sequential`` indices (key map friendly):

  alpha_conv_{l-1}      1×1 512→C + ReLU                (levels l ≥ 1)
  beta_conv_{l}/conv0,1 3×3 C→C + ReLU, twice, residual
  inner_cls_{l}/conv0   3×3 C→C + ReLU; Dropout2d; conv1 1×1 C→classes (bias)
  res1                  1×1 (L·C)→C + ReLU
  res2/conv0,1          3×3 C→C + ReLU, twice, residual
  cls/conv0, conv1      as inner_cls
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps as km
from fss_jax.nn.layers import Conv2d
from fss_jax.ops.resize import resize_bilinear


def conv(features: int, kernel: int, *, name: str, bias: bool = False, dilation: int = 1) -> Conv2d:
  """A torch ``nn.Conv2d(k, padding=k//2·dilation)`` with torch's default init, NHWC."""
  return Conv2d(
    features, kernel, padding=(kernel // 2) * dilation, dilation=dilation, use_bias=bias, name=name
  )


class MergeConv(nn.Module):
  """``ReLU(Conv1x1(x))`` without bias: PFENet's ``init_merge`` / ``down_*`` / ``res1`` pattern.

  Attributes:
    features: output channels.
  """

  features: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H, W, features]."""
    return nn.relu(conv(self.features, 1, name="conv")(x))


class DoubleConv(nn.Module):
  """``ReLU(Conv3x3(ReLU(Conv3x3(x))))`` without biases (PFENet ``beta_conv`` / ``res2``)."""

  features: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(conv(self.features, 3, name="conv0")(x))
    return nn.relu(conv(self.features, 3, name="conv1")(x))


class ClassifierHead(nn.Module):
  """``Conv1x1_bias(Dropout2d(ReLU(Conv3x3(x))))`` (PFENet ``inner_cls`` / ``cls``).

  Attributes:
    features: hidden channels.
    num_classes: output channels (2 for 1-way).
    dropout: Dropout2d rate (whole channels, active only when ``train``; needs the
      ``dropout`` rng).
  """

  features: int = 256
  num_classes: int = 2
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> logits [B, H, W, num_classes]."""
    x = nn.relu(conv(self.features, 3, name="conv0")(x))
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
    return conv(self.num_classes, 1, name="conv1", bias=True)(x)


class FEMDecoder(nn.Module):
  """PFENet's Feature Enrichment Module after the per-level merge.

  Attributes:
    features: channel width C of every level (256).
    num_classes: logits channels (2).
    dropout: Dropout2d rate before each classifier (0.1).
  """

  features: int = 256
  num_classes: int = 2
  dropout: float = 0.1

  @nn.compact
  def __call__(
    self, merged: Sequence[jax.Array], *, train: bool = False
  ) -> tuple[jax.Array, list[jax.Array]]:
    """Decodes a feature pyramid.

    Args:
      merged: per level l, the merged query feature [B, s_l, s_l, C], finest first
        (s_0 is the output side, e.g. 60, 30, 15, 8).
      train: dropout on/off.

    Returns:
      (logits [B, s_0, s_0, num_classes], aux: per level logits [B, s_l, s_l, num_classes]).
    """
    size0 = merged[0].shape[1:3]
    upsampled: list[jax.Array] = []
    aux: list[jax.Array] = []
    for l, x in enumerate(merged):
      size = x.shape[1:3]
      if l >= 1:
        # PFENet resizes the previous level (already at the finest side) to this side.
        prev = resize_bilinear(upsampled[-1], size, align_corners=True)
        x = MergeConv(self.features, name=f"alpha_conv_{l - 1}")(jnp.concatenate([x, prev], -1)) + x
      x = DoubleConv(self.features, name=f"beta_conv_{l}")(x) + x
      aux.append(
        ClassifierHead(self.features, self.num_classes, self.dropout, name=f"inner_cls_{l}")(
          x, train=train
        )
      )
      upsampled.append(resize_bilinear(x, size0, align_corners=True))
    h = MergeConv(self.features, name="res1")(jnp.concatenate(upsampled, -1))
    h = DoubleConv(self.features, name="res2")(h) + h
    logits = ClassifierHead(self.features, self.num_classes, self.dropout, name="cls")(
      h, train=train
    )
    return logits, aux


def pfenet_decoder_keymap(
  src: str = "", dst: tuple[str, ...] = ("decoder",), *, levels: int = 4, alpha: bool = True
) -> list:
  """Key-map rules PFENet state dict -> `FEMDecoder` variables.

  Args:
    src: source prefix ("" for a PFENet checkpoint).
    dst: Flax path of the decoder module.
    levels: pyramid levels.
    alpha: include ``alpha_conv`` (False when the checkpoint has none).
  """
  rules = []
  for l in range(levels):
    if alpha and l >= 1:
      rules += km.conv(
        f"{src}alpha_conv.{l - 1}.0", (*dst, f"alpha_conv_{l - 1}", "conv"), bias=False
      )
    rules += km.conv(f"{src}beta_conv.{l}.0", (*dst, f"beta_conv_{l}", "conv0"), bias=False)
    rules += km.conv(f"{src}beta_conv.{l}.2", (*dst, f"beta_conv_{l}", "conv1"), bias=False)
    rules += km.conv(f"{src}inner_cls.{l}.0", (*dst, f"inner_cls_{l}", "conv0"), bias=False)
    rules += km.conv(f"{src}inner_cls.{l}.3", (*dst, f"inner_cls_{l}", "conv1"))
  rules += km.conv(f"{src}res1.0", (*dst, "res1", "conv"), bias=False)
  rules += km.conv(f"{src}res2.0", (*dst, "res2", "conv0"), bias=False)
  rules += km.conv(f"{src}res2.2", (*dst, "res2", "conv1"), bias=False)
  rules += km.conv(f"{src}cls.0", (*dst, "cls", "conv0"), bias=False)
  rules += km.conv(f"{src}cls.3", (*dst, "cls", "conv1"))
  return rules


__all__ = [
  "FEMDecoder",
  "MergeConv",
  "DoubleConv",
  "ClassifierHead",
  "conv",
  "pfenet_decoder_keymap",
]
