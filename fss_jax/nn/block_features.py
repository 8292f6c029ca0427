"""A bottleneck ResNet run block by block, returning every block's pre-ReLU output.

HSNet's ``extract_feat_res`` (also used by Sym-Net, ``model/future.py``) walks the
bottlenecks one by one and keeps, besides the stage outputs, the output of each block
*after the residual addition and before its final ReLU* — the "hyper-features" that
multi-layer correlations are computed from.

`ResNetBlocks` is `fss_jax.nn.backbones.resnet.ResNet` with that extra output: it
has the same fields and builds exactly the same variable tree (``conv1``, ``bn1``, …,
``layer{L}_{b}/…``), so `resnet.resnet_keymap` converts its checkpoints and the
parameter counts are identical. Only the forward differs:

  out = ResNetBlocks(stem="deep", output_stride=8, dilation_style="pspnet")(x)
  out["layer0"] ... out["layer4"]      # post-ReLU stage outputs, as ResNet
  out["blocks"]                        # list of 16 (ResNet-50) pre-ReLU block outputs
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from fss_jax.nn.backbones import resnet
from fss_jax.nn.layers import BatchNorm2d, Conv2d, kaiming_normal_fan_out


class ResNetBlocks(resnet.ResNet):
  """`resnet.ResNet` that also returns the pre-ReLU output of every bottleneck.

  Same attributes and variables as `resnet.ResNet` (``include_head`` is not
  supported: the walkers that need block outputs never use the classifier).
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> dict:
    """x [B, H, W, 3] -> {"layer0".."layer4": post-ReLU stage outputs (as `ResNet`),
    "blocks": [pre-ReLU block outputs [B, h, w, 4 * width]] in network order}."""
    if self.stem not in resnet.STEMS:
      raise ValueError(f"stem must be one of {resnet.STEMS}, got {self.stem!r}")
    if self.include_head:
      raise ValueError("ResNetBlocks does not build the classification head; use ResNet")
    ura = self.frozen or not train
    conv = functools.partial(Conv2d, use_bias=False, kernel_init=kaiming_normal_fan_out)
    norm = functools.partial(BatchNorm2d, use_running_average=ura)
    if self.stem == "torchvision":
      y = nn.relu(norm(name="bn1")(conv(64, 7, 2, padding=3, name="conv1")(x)))
    else:
      y = nn.relu(norm(name="bn1")(conv(64, 3, 2, padding=1, name="conv1")(x)))
      y = nn.relu(norm(name="bn2")(conv(64, 3, 1, padding=1, name="conv2")(y)))
      y = nn.relu(norm(name="bn3")(conv(128, 3, 1, padding=1, name="conv3")(y)))
    y = nn.max_pool(y, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    out = {"layer0": y}
    blocks = []
    plan = resnet.block_plan(
      resnet.stage_sizes(self.depth, self.num_stages), self.output_stride, self.dilation_style
    )
    for i, stage in enumerate(plan):
      for j, (stride, dilation) in enumerate(stage):
        pre = resnet.Bottleneck(
          resnet.STAGE_WIDTHS[i],
          stride,
          dilation,
          downsample=j == 0,
          last_relu=False,
          name=f"layer{i + 1}_{j}",
        )(y, use_running_average=ura)
        blocks.append(pre)
        last = i == len(plan) - 1 and j == len(stage) - 1
        y = nn.relu(pre) if (self.last_relu or not last) else pre
      out[f"layer{i + 1}"] = y
    out["blocks"] = blocks
    return out


def stage_outputs(
  feats: Mapping[str, jax.Array], sizes: Sequence[int]
) -> tuple[dict[int, jax.Array], list[Any]]:
  """`ResNetBlocks` outputs stored flat (``layer<n>``, ``blocks_<i>``, as
  `fss_jax.models.frozen.flatten` writes them), some possibly left out -> ({n: layer n} for
  n = 2..4, [block i, None where left out]). ``sizes``: blocks per stage. A stage output
  left out is the ReLU of its last block, as `ResNetBlocks` computes it (bit for bit)."""
  last = np.cumsum(sizes) - 1
  layers = {}
  for n in (2, 3, 4):
    name = f"layer{n}"
    layers[n] = feats[name] if name in feats else nn.relu(feats[f"blocks_{last[n - 1]}"])
  return layers, [feats.get(f"blocks_{i}") for i in range(int(last[-1]) + 1)]


ResNetBlocksDeepStem = functools.partial(
  ResNetBlocks, stem="deep", output_stride=8, dilation_style="pspnet"
)

__all__ = ["ResNetBlocks", "ResNetBlocksDeepStem", "stage_outputs"]
