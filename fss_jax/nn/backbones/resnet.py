"""One bottleneck ResNet (50/101/152) with the variants the few-shot models use.

Variants are fields of `ResNet` (named ones are `functools.partial`s below):

* `ResNetTorchvision` - torchvision ``resnet50`` (v1.5: stride on the 3x3
  conv), 7x7 stem, optional avgpool + fc head.
* `ResNetDeepStem` - PSPNet / BAM / HDMNet / PAHNet / Sym-Net backbone
  (hszhao/semseg ``resnet50_v2``): deep stem 3x3 s2 -> 3x3 -> 3x3 (64, 64,
  128) + maxpool; PSPNet's in-place surgery makes *every* block of layer3 use
  dilation 2 and of layer4 dilation 4, stride 1 (output stride 8).
* `ResNetSCCAN` - SCCAN's torchvision-style ResNet with the deep stem, frozen
  batch norm and ``replace_stride_with_dilation=[False, True, True]``: the
  first block of a dilated stage keeps the previous dilation (layer3.0 d=1,
  layer3.1.. d=2, layer4.0 d=2, layer4.1.. d=4).
* `ResNetSSP` - SSP's layers 0-3 only, torchvision dilation, no ReLU after the
  last block.

`ResNet.__call__` takes images [B, H, W, 3] and returns every stage:
``{"layer0": stem incl. maxpool, "layer1", ..., "layer4"}`` (NHWC; strides
4, 4, 8, 16/8, 32/8), plus ``"pooled"`` [B, 2048] and ``"logits"`` [B,
num_classes] with the head. All convolutions use torch's symmetric padding.

`resnet_keymap` maps the PyTorch state-dict names of each reference
(torchvision / SCCAN ``conv1, bn1, [conv2, bn2, conv3, bn3]``; PSPNet
``layer0.{0,1,3,4,6,7}``; SSP ``layer0.0.{0,1,3,4,6}``, ``layer0.1``;
``layerL.b.{conv,bn}{1,2,3}``, ``layerL.0.downsample.{0,1}``; ``fc``) to the
Flax variables of `ResNet`, under any source prefix and destination path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fss_jax import keymaps
from fss_jax.nn.layers import BatchNorm2d, Conv2d, Linear, kaiming_normal_fan_out
from fss_jax.ops.pooling import max_pool2d

STAGE_SIZES: dict[int, tuple[int, ...]] = {
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
STEMS = ("torchvision", "deep")
DILATION_STYLES = ("torchvision", "pspnet")
# Stem key names of each reference, in Flax-module order conv1, bn1, conv2, ...
STEM_NAMINGS: dict[str, tuple[str, ...]] = {
  "torchvision": ("conv1", "bn1"),
  "resnet_v2": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),  # semseg/SCCAN
  "pspnet": ("layer0.0", "layer0.1", "layer0.3", "layer0.4", "layer0.6", "layer0.7"),
  "ssp": ("layer0.0.0", "layer0.0.1", "layer0.0.3", "layer0.0.4", "layer0.0.6", "layer0.1"),
}


def stage_sizes(depth: int, num_stages: int = 4) -> tuple[int, ...]:
  """Blocks per stage for a bottleneck ResNet of `depth` (first `num_stages`)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {depth}")
  if not 1 <= num_stages <= 4:
    raise ValueError(f"num_stages must be 1..4, got {num_stages}")
  return STAGE_SIZES[depth][:num_stages]


def block_plan(
  sizes: Sequence[int], output_stride: int = 32, dilation_style: str = "torchvision"
) -> list[list[tuple[int, int]]]:
  """(stride, dilation) of the 3x3 conv of every block, per stage.

  The first block's stride is also its downsample's stride. Stages whose
  stride would push the output stride past `output_stride` are dilated:
  torchvision style (`replace_stride_with_dilation`) keeps the previous
  dilation in the first block of the stage; PSPNet style dilates all blocks.
  """
  if output_stride not in (8, 16, 32):
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
  if dilation_style not in DILATION_STYLES:
    raise ValueError(f"dilation_style must be one of {DILATION_STYLES}, got {dilation_style!r}")
  plan, current_stride, dilation = [], 4, 1
  for i, n in enumerate(sizes):
    stride = 1 if i == 0 else 2
    previous = dilation
    if stride > 1 and current_stride * stride > output_stride:
      dilation *= stride
      stride = 1
    current_stride *= stride
    first = previous if dilation_style == "torchvision" else dilation
    plan.append([(stride, first)] + [(1, dilation)] * (n - 1))
  return plan


class Bottleneck(nn.Module):
  """conv1x1 -> BN -> ReLU -> conv3x3 (stride, dilation) -> BN -> ReLU ->
  conv1x1 -> BN, + identity (or 1x1 conv + BN downsample), ReLU."""

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  last_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H/stride, W/stride, 4 * planes]."""
    conv = functools.partial(Conv2d, use_bias=False, kernel_init=kaiming_normal_fan_out)
    norm = functools.partial(BatchNorm2d, use_running_average=use_running_average)
    y = nn.relu(norm(name="bn1")(conv(self.planes, 1, name="conv1")(x)))
    y = conv(
      self.planes, 3, self.stride, padding=self.dilation, dilation=self.dilation, name="conv2"
    )(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(self.planes * EXPANSION, 1, name="conv3")(y))
    identity = x
    if self.downsample:
      identity = conv(self.planes * EXPANSION, 1, self.stride, name="downsample_conv")(x)
      identity = norm(name="downsample_bn")(identity)
    y = y + identity
    return nn.relu(y) if self.last_relu else y


class ResNet(nn.Module):
  """Bottleneck ResNet returning every stage.

  Attributes:
    depth: 50, 101 or 152.
    num_stages: how many of layer1..layer4 to build (SSP uses 3).
    stem: "torchvision" (7x7 s2, 64) or "deep" (3x3 s2 64, 3x3 64, 3x3 128).
    output_stride: 32 (plain), 16 or 8 (dilated last stages).
    dilation_style: "torchvision" or "pspnet" (see `block_plan`).
    frozen: batch norm always uses the running statistics (the reference
      backbones are frozen); otherwise they follow `train`.
    last_relu: ReLU after the very last block (SSP: False).
    include_head: global average pool + fc -> "pooled", "logits".
    num_classes: fc outputs.
  """

  depth: int = 50
  num_stages: int = 4
  stem: str = "torchvision"
  output_stride: int = 32
  dilation_style: str = "torchvision"
  frozen: bool = True
  last_relu: bool = True
  include_head: bool = False
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """x [B, H, W, 3] normalised images -> {"layer0": [B, H/4, W/4, 64|128],
    "layer1": [.., 256], "layer2": [.., 512], "layer3": [.., 1024],
    "layer4": [.., 2048] (+ "pooled" [B, 2048], "logits" [B, num_classes])}."""
    if self.stem not in STEMS:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
    ura = self.frozen or not train
    conv = functools.partial(Conv2d, use_bias=False, kernel_init=kaiming_normal_fan_out)
    norm = functools.partial(BatchNorm2d, use_running_average=ura)
    out = {}
    # layer0: stem + maxpool 3x3 s2 p1 (-inf padding, as torch).
    if self.stem == "torchvision":
      y = nn.relu(norm(name="bn1")(conv(64, 7, 2, padding=3, name="conv1")(x)))
    else:
      y = nn.relu(norm(name="bn1")(conv(64, 3, 2, padding=1, name="conv1")(x)))
      y = nn.relu(norm(name="bn2")(conv(64, 3, 1, padding=1, name="conv2")(y)))
      y = nn.relu(norm(name="bn3")(conv(128, 3, 1, padding=1, name="conv3")(y)))
    y = max_pool2d(y, 3, 2, padding=1)
    out["layer0"] = y
    plan = block_plan(
      stage_sizes(self.depth, self.num_stages), self.output_stride, self.dilation_style
    )
    for i, blocks in enumerate(plan):
      for j, (stride, dilation) in enumerate(blocks):
        last = i == len(plan) - 1 and j == len(blocks) - 1
        y = Bottleneck(
          STAGE_WIDTHS[i],
          stride,
          dilation,
          downsample=j == 0,
          last_relu=self.last_relu or not last,
          name=f"layer{i + 1}_{j}",
        )(y, use_running_average=ura)
      out[f"layer{i + 1}"] = y
    if self.include_head:
      pooled = jnp.mean(y, axis=(1, 2))
      out["pooled"] = pooled
      out["logits"] = Linear(self.num_classes, name="fc")(pooled)
    return out


ResNetTorchvision = functools.partial(ResNet, stem="torchvision")
ResNetDeepStem = functools.partial(ResNet, stem="deep", output_stride=8, dilation_style="pspnet")
ResNetSCCAN = functools.partial(ResNet, stem="deep", output_stride=8, dilation_style="torchvision")
ResNetSSP = functools.partial(
  ResNet, stem="deep", num_stages=3, output_stride=8, dilation_style="torchvision", last_relu=False
)


def _stage_rules(depth: int, stage: int, dst: keymaps.Path) -> list:
  rules = []
  for j in range(STAGE_SIZES[depth][stage - 1]):
    src, d = f"layer{stage}.{j}", (*dst, f"layer{stage}_{j}")
    for k in (1, 2, 3):
      rules += keymaps.conv(f"{src}.conv{k}", (*d, f"conv{k}"), bias=False)
      rules += keymaps.bn(f"{src}.bn{k}", (*d, f"bn{k}"))
    if j == 0:
      rules += keymaps.conv(f"{src}.downsample.0", (*d, "downsample_conv"), bias=False)
      rules += keymaps.bn(f"{src}.downsample.1", (*d, "downsample_bn"))
  return rules


def resnet_keymap(
  *,
  depth: int = 50,
  num_stages: int = 4,
  stem: str = "torchvision",
  naming: str | None = None,
  include_head: bool = False,
  ignore_head: bool = True,
  ignore_extra_stages: bool = False,
  prefix: str = "",
  dst: keymaps.Path = (),
) -> list:
  """Key map of a reference ResNet state dict -> variables of `ResNet`.

  Args:
    depth, num_stages, stem, include_head: as the `ResNet` fields.
    naming: stem key names, one of `STEM_NAMINGS` ("torchvision" for the 7x7
      stem; "resnet_v2" (default for the deep stem: ImageNet resnet50_v2.pth,
      SCCAN), "pspnet" (``layer0.N``), "ssp" (``layer0.0.N``, ``layer0.1``)).
    ignore_head: without `include_head`, accept and drop ``fc.weight/bias``
      (ImageNet checkpoints carry them).
    ignore_extra_stages: with ``num_stages < 4``, accept and drop the keys of
      the stages that are not built.
    prefix: source key prefix (e.g. "backbone.body."), prepended to every key.
    dst: Flax module path of the ResNet (e.g. ("backbone",)).
  """
  naming = naming or ("torchvision" if stem == "torchvision" else "resnet_v2")
  if naming not in STEM_NAMINGS:
    raise ValueError(f"naming must be one of {sorted(STEM_NAMINGS)}, got {naming!r}")
  if (stem == "torchvision") != (naming == "torchvision"):
    raise ValueError(f"stem {stem!r} cannot use the {naming!r} key names")
  stage_sizes(depth, num_stages)  # validates
  dst = tuple(dst)
  names = STEM_NAMINGS[naming]
  rules = []
  for k in range(len(names) // 2):
    rules += keymaps.conv(names[2 * k], (*dst, f"conv{k + 1}"), bias=False)
    rules += keymaps.bn(names[2 * k + 1], (*dst, f"bn{k + 1}"))
  for stage in range(1, num_stages + 1):
    rules += _stage_rules(depth, stage, dst)
  if ignore_extra_stages:
    for stage in range(num_stages + 1, 5):
      rules += [keymaps.Ignore(r.src) for r in _stage_rules(depth, stage, dst)]
  if include_head:
    rules += keymaps.linear("fc", (*dst, "fc"))
  elif ignore_head:
    rules += [keymaps.Ignore("fc.weight"), keymaps.Ignore("fc.bias")]
  return keymaps.prefixed(prefix, rules)


def num_blocks_from_keys(keys, prefix: str = "") -> tuple[int, ...]:
  """Blocks per stage found in state-dict keys (``{prefix}layerL.b.conv1.weight``)."""
  counts = []
  for stage in range(1, 5):
    head = f"{prefix}layer{stage}."
    blocks = {
      k[len(head) :].split(".")[0]
      for k in keys
      if k.startswith(head) and k.endswith(".conv1.weight")
    }
    if not blocks:
      break
    counts.append(len(blocks))
  return tuple(counts)


def depth_from_keys(keys, prefix: str = "") -> tuple[int, int]:
  """(depth, num_stages) of the bottleneck ResNet whose state-dict keys are given."""
  counts = num_blocks_from_keys(keys, prefix)
  for depth, sizes in STAGE_SIZES.items():
    if counts and sizes[: len(counts)] == counts:
      return depth, len(counts)
  raise ValueError(
    f"state dict is not a bottleneck ResNet-50/101/152 (blocks per stage "
    f"{counts}, prefix {prefix!r})"
  )
