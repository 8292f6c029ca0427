"""PSPNet base learner (hszhao/semseg via chunbolang/BAM `model/PSPNet.py`).

The frozen base learner of BAM, HDMNet, PAHNet and Sym-Net, and a model of
its own so that users can train base learners for folds whose released
weights they lack (hdmnet.md §2):

  image -> deep-stem dilated ResNet (layer0..layer4, output stride 8)
        -> PPM (bins 1, 2, 3, 6) -> cls: conv3x3 4096->512 + BN   ("feature 5", pre-ReLU)
        -> classifier: ReLU -> Dropout2d(0.1) -> conv1x1 512->N    (N = 1 + base classes)
        -> bilinear (align_corners=True) to ((H-1)/8*zoom+1)

`PSPNet.features` returns every stage for the few-shot models that reuse the
network; `PSPNet.classify` is the classifier tail (HDMNet's ``base_learnear``).

Registry names:

* ``pspnet``: base-class training (``logits`` [B, H, W, N], CE against
  ``query_base_label``) and conversion of BAM ``best.pth`` checkpoints
  (``layerN.*``, duplicated ``encoder.N.*``, ``ppm.*``, ``cls.{0,1,4}``).
* ``pspnet_backbone``: the same network under HDMNet's key names (``layer0..4``, ``ppm``,
  ``cls``, ``base_learnear``), as the ``backbone_pspnet_resnet50`` fixtures hold it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from fss_jax import keymaps
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.backbones import resnet
from fss_jax.nn.block_features import ResNetBlocksDeepStem
from fss_jax.nn.layers import BatchNorm2d, Conv2d
from fss_jax.nn.ppm import PPM, ppm_keymap
from fss_jax.ops import losses
from fss_jax.ops.resize import resize_bilinear

# Classifier key names of the references: BAM's PSPNet keeps the whole `cls`
# Sequential (cls.4 is the classifier conv); HDMNet / HDMNet-PAHNet / Sym-Net
# split it into `cls` (0, 1) and `base_learnear` (2 = the conv); SCCAN-PAHNet
# spells it `base_learner`.
CLASSIFIER_NAMES = {"bam": "cls.4", "hdmnet": "base_learnear.2", "pahnet": "base_learner.2"}


def num_base_classes(dataset: str) -> int:
  """Classifier outputs of the base learner: background + 15 (PASCAL) / 60 (COCO)."""
  if dataset.startswith("pascal"):
    return 16
  if dataset.startswith("coco"):
    return 61
  raise ValueError(f"unknown dataset {dataset!r}: the base learner knows pascal5i and coco20i")


def output_size(size: int, zoom_factor: int = 8) -> int:
  """PSPNet's prediction size ``int((size - 1) / 8 * zoom + 1)`` (= size for zoom 8)."""
  return int((size - 1) / 8 * zoom_factor + 1)


class PSPNet(nn.Module):
  """The PSPNet base learner, NHWC.

  Attributes:
    num_classes: classifier outputs (16 PASCAL, 61 COCO).
    depth: ResNet depth (50, 101, 152).
    bins: PPM bins.
    frozen: every BatchNorm uses its running statistics (the few-shot models
      freeze the base learner); False trains them (base-class training).
    dropout: Dropout2d rate before the classifier (active when ``train``).
    zoom_factor: output up-sampling (8: back to the input size).
  """

  num_classes: int = 16
  depth: int = 50
  bins: Sequence[int] = (1, 2, 3, 6)
  frozen: bool = False
  dropout: float = 0.1
  zoom_factor: int = 8

  def setup(self):
    self.backbone = resnet.ResNetDeepStem(depth=self.depth, frozen=self.frozen)
    self.ppm = PPM(tuple(self.bins), 2048 // len(self.bins), frozen_bn=self.frozen)
    self.cls_conv = Conv2d(512, 3, padding=1, use_bias=False)
    self.cls_bn = BatchNorm2d()
    self.classifier = Conv2d(self.num_classes, 1)
    self.drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2))

  def features(self, image: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """image ``[B, H, W, 3]`` (normalised) -> {"layer0": [B, H/4, W/4, 128], "layer1": 256,
    "layer2": [B, H/8, W/8, 512], "layer3": 1024, "layer4": 2048, "ppm": 4096,
    "feat5": [B, H/8, W/8, 512] (cls conv + BN, before the ReLU)}."""
    out = dict(self.backbone(image, train=train))
    out["ppm"] = self.ppm(out["layer4"], train=train)
    out["feat5"] = self.cls_bn(
      self.cls_conv(out["ppm"]), use_running_average=self.frozen or not train
    )
    return out

  def classify(self, feat5: jax.Array, *, train: bool = False) -> jax.Array:
    """Classifier tail: ReLU -> Dropout2d -> conv1x1. ``[B, h, w, 512]`` -> ``[B, h, w, N]``."""
    return self.classifier(self.drop(nn.relu(feat5), deterministic=not train))

  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """Base-class segmentation of ``batch["image"]`` [B, H, W, 3] (the base-learner loader,
    `fss_jax.data.pipeline.make_base_train_loader`) or ``episode["query_image"]``.

    Returns:
      {"logits": [B, H', W', N] up-sampled (align_corners=True) to
      H' = (H - 1) / 8 * zoom + 1, "base_logits": [B, H/8, W/8, N]}.
    """
    image = episode["image"] if "image" in episode else episode["query_image"]
    _, h, w, _ = image.shape
    f = self.features(image, train=train)
    logits = self.classify(f["feat5"], train=train)
    out = {"base_logits": logits}
    if self.zoom_factor != 1:
      size = (output_size(h, self.zoom_factor), output_size(w, self.zoom_factor))
      logits = resize_bilinear(logits, size, align_corners=True)
    out["logits"] = logits
    return out


class PSPNetBlocks(PSPNet):
  """The PSPNet base learner whose backbone also returns every block's pre-ReLU output
  (Sym-Net's base learner).

  Same fields and variables as `pspnet.PSPNet` (``backbone``, ``ppm``, ``cls_conv``,
  ``cls_bn``, ``classifier``), so BAM's converted base learner loads under
  ``init_prefix="pspnet"``; only the backbone is `ResNetBlocks` instead of `ResNet`.
  """

  def setup(self):
    self.backbone = ResNetBlocksDeepStem(depth=self.depth, frozen=self.frozen)
    self.ppm = PPM(tuple(self.bins), 2048 // len(self.bins), frozen_bn=self.frozen)
    self.cls_conv = Conv2d(512, 3, padding=1, use_bias=False)
    self.cls_bn = BatchNorm2d()
    self.classifier = Conv2d(self.num_classes, 1)
    self.drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2))

  def base_logits(self, layer4: jax.Array, *, train: bool = False) -> jax.Array:
    """``learner_base`` = PPM -> cls conv + BN -> classifier: ``[B, h, w, 2048]`` ->
    ``[B, h, w, N]`` (Dropout2d active when ``train``; BN frozen)."""
    feat5 = self.cls_bn(self.cls_conv(self.ppm(layer4, train=False)), use_running_average=True)
    return self.classify(feat5, train=train)


def base_labels(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Base-class labels of a batch: ``label`` (base-learner loader) or ``query_base_label``."""
  for key in ("label", "query_base_label"):
    if key in batch:
      return batch[key]
  raise KeyError(
    "the pspnet base learner trains on base labels: the batch needs 'label' "
    "(fss_jax.data.pipeline.make_base_train_loader) or 'query_base_label' [B, H, W] "
    "(base classes 1..N-1, novel and background 0, 255 ignore)"
  )


def loss_fn(
  outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict]:
  """CE (ignore 255) of the up-sampled logits against the base labels (BAM train_base.py)."""
  ce = losses.cross_entropy(outputs["logits"], base_labels(batch))
  return losses.weighted_sum({"ce": ce})


# ---------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------


def pspnet_keymap(
  *,
  naming: str = "bam",
  depth: int = 50,
  num_bins: int = 4,
  prefix: str = "",
  dst: tuple[str, ...] = (),
) -> list:
  """Official PSPNet keys -> `PSPNet` variables at ``dst``.

  Args:
    naming: "bam" (BAM ``best.pth``: ``cls.{0,1,4}`` and the backbone duplicated
      under ``encoder.{0..4}``, whose copies are dropped), "hdmnet"
      (``cls.{0,1}``, ``base_learnear.2``) or "pahnet" (``base_learner.2``).
    depth: ResNet depth.
    num_bins: PPM branches.
    prefix: source key prefix.
    dst: Flax path of the PSPNet module.
  """
  if naming not in CLASSIFIER_NAMES:
    raise ValueError(f"naming must be one of {sorted(CLASSIFIER_NAMES)}, got {naming!r}")
  dst = tuple(dst)
  backbone = resnet.resnet_keymap(
    depth=depth, stem="deep", naming="pspnet", ignore_head=False, dst=(*dst, "backbone")
  )
  rules = list(backbone)
  if naming == "bam":  # nn.Sequential(layer0..layer4) registered a second time as `encoder`
    for r in backbone:
      layer, rest = r.src.split(".", 1)
      rules.append(keymaps.Ignore(f"encoder.{int(layer[len('layer') :])}.{rest}"))
  rules += ppm_keymap("ppm", (*dst, "ppm"), num_bins)
  rules += keymaps.conv("cls.0", (*dst, "cls_conv"), bias=False)
  rules += keymaps.bn("cls.1", (*dst, "cls_bn"))
  rules += keymaps.conv(CLASSIFIER_NAMES[naming], (*dst, "classifier"))
  return keymaps.prefixed(prefix, rules)


def make_model(
  num_classes: int = 16,
  depth: int = 50,
  frozen: bool = False,
  naming: str = "bam",
  zoom_factor: int = 8,
  dropout: float = 0.1,
) -> PSPNet:
  """Registry factory (``naming`` only matters to the key map)."""
  return PSPNet(
    num_classes=num_classes, depth=depth, frozen=frozen, zoom_factor=zoom_factor, dropout=dropout
  )


def keymap(
  num_classes: int = 16,
  depth: int = 50,
  frozen: bool = False,
  naming: str = "bam",
  zoom_factor: int = 8,
  dropout: float = 0.1,
) -> list:
  return pspnet_keymap(naming=naming, depth=depth)


def classifier_naming(keys) -> str:
  """Which reference's classifier key names a state dict uses ("bam", "hdmnet", "pahnet")."""
  for naming, name in CLASSIFIER_NAMES.items():
    if f"{name}.weight" in keys:
      return naming
  raise ValueError(
    "no PSPNet classifier (cls.4 / base_learnear.2 / base_learner.2) among the state-dict keys"
  )


# The PPM's 6 x 6 bins need 6 cells of the stride-8 features: ceil(41 / 8) = 6. The few-shot
# models built on this base learner (HDMNet, PAHNet, Sym-Net) share the minimum.
MIN_INPUT_SIZE = 41

SPEC = ModelSpec(
  "pspnet",
  make_model,
  keymap,
  loss_fn=loss_fn,
  min_input_size=MIN_INPUT_SIZE,
  encoder_missing="the base learner segments each query alone: no episode reuses its features",
)
SPECS = {
  "pspnet": SPEC,
  "pspnet_backbone": ModelSpec(
    "pspnet_backbone",
    make_model,
    keymap,
    loss_fn=loss_fn,
    min_input_size=MIN_INPUT_SIZE,
  ),
}
