"""SSP (ECCV'22, fanq15/SSP): self-support prototype matching, with PyTorch parity.

The network (`SSPMatchingNet`, ssp.md §2) is also PAHNet's frozen prototype
predictor (pahnet.md §1.2: ``refine=False``, ``out_1`` resized to a fixed
64x64 - ``out_size=(64, 64)``). NHWC, sizes for a 473 input:

1. ResNet-50 layers 0-3 (deep stem, torchvision dilation, no ReLU after the
   last block, BN always in inference mode) on the query and the B*K supports
   -> F [., 60, 60, 1024].
2. Per shot FG / BG prototypes (masked average, masks ``== 1`` / ``== 0``
   resized bilinearly, align_corners=True; eps 1e-5), averaged over shots.
3. ``out_0 = 10 * [cos(F_q, BP), cos(F_q, FP)]``; self-support prototypes from
   ``out_0`` (`fss_jax.nn.prototype.self_support_prototypes`);
   ``FP_1 = (FP + SSFP) / 2``, ``BP_1 = 0.3 SSBP + 0.7 ASBP`` (position-wise),
   ``out_1 = 10 * [cos(F_q, BP_1), cos(F_q, FP_1)]``.
4. ``refine``: a second self-support round, ``out_2 = 0.7 sim(FP_2, BP_2) + 0.3 out_1``.
5. Outputs resized bilinearly (align_corners=True): ``out_1`` to `out_size`
   (None: the image size), ``out_2`` to the image size.
6. Training only: ``self_out`` (query matched with prototypes of its own ground
   truth) and ``supp_out`` (each support with its own prototypes), image size.

Registry name ``ssp``: the original SSP training recipe (ssp.md §4-§5) so the
predictor can be trained per fold with the class split of the affinity learner.
Loss: ``CE(out_1) + CE(self_out) + 0.2 CE(supp_out)`` (+ ``CE(out_2)`` with refine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import frozen
from fss_jax.models.inputs import check_episode, check_supports
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.backbones import resnet
from fss_jax.nn.prototype import self_support_prototypes, ssp_masked_average, ssp_match
from fss_jax.ops import losses
from fss_jax.ops.resize import resize_bilinear


def ssp_head(
  fq: jax.Array,
  fs: jax.Array,
  support_masks: jax.Array,
  *,
  refine: bool = False,
  image_size: Sequence[int],
  out_size: Sequence[int] | None = None,
  fg_threshold: float = 0.7,
  bg_threshold: float = 0.6,
  topk: int = 12,
  temperature: float = 2.0,
) -> dict[str, jax.Array]:
  """SSP's matching head on backbone features (ssp.md §2 steps 2-7).

  Args:
    fq: [B, h, w, C] query features.
    fs: [B, K, h, w, C] support features.
    support_masks: [B, K, H, W] labels at image size (1 FG, 0 BG, 255 neither).
    refine: the second self-support round.
    image_size: (H, W), the size of ``out_2`` (and of ``out_1`` without `out_size`).
    out_size: size of ``out_1`` (PAHNet: (64, 64)).

  Returns:
    see `SSPMatchingNet`, plus "support_fg", "support_bg" [B, K, C] per-shot prototypes.
  """
  b, k = fs.shape[:2]
  hh, ww = image_size
  sy = support_masks.reshape(b * k, *support_masks.shape[2:])
  fs_flat = fs.reshape(b * k, *fs.shape[2:])
  fg_k = ssp_masked_average(fs_flat, (sy == 1).astype(fs.dtype)).reshape(b, k, -1)
  bg_k = ssp_masked_average(fs_flat, (sy == 0).astype(fs.dtype)).reshape(b, k, -1)
  fp, bp = jnp.mean(fg_k, axis=1), jnp.mean(bg_k, axis=1)
  ssp = lambda f, logits: self_support_prototypes(
    f,
    logits,
    fg_threshold=fg_threshold,
    bg_threshold=bg_threshold,
    topk=topk,
    temperature=temperature,
  )

  out0 = ssp_match(fq, fp, bp)
  s1 = ssp(fq, out0)
  fp1 = fp * 0.5 + s1["fg"] * 0.5
  bp1 = s1["bg"][:, None, None, :] * 0.3 + s1["bg_local"] * 0.7
  out1 = ssp_match(fq, fp1, bp1)
  size = (hh, ww) if out_size is None else tuple(out_size)
  out = {
    "out_0_low": out0,
    "out_1_low": out1,
    "ssp_fg": s1["fg"],
    "ssp_bg": s1["bg"],
    "ssp_bg_local": s1["bg_local"],
    "fg_above": s1["fg_above"],
    "bg_above": s1["bg_above"],
    "support_fg": fg_k,
    "support_bg": bg_k,
    "out_1": resize_bilinear(out1, size, align_corners=True),
  }
  out["logits"] = out["out_1"]
  if refine:
    s2 = ssp(fq, out1)
    fp2 = fp * 0.5 + s2["fg"] * 0.5
    bp2 = s2["bg"][:, None, None, :] * 0.3 + s2["bg_local"] * 0.7
    fp2 = fp * 0.5 + fp1 * 0.2 + fp2 * 0.3
    bp2 = bp[:, None, None, :] * 0.5 + bp1 * 0.2 + bp2 * 0.3
    out2 = ssp_match(fq, fp2, bp2) * 0.7 + out1 * 0.3
    out["out_2_low"] = out2
    out["out_2"] = resize_bilinear(out2, (hh, ww), align_corners=True)
    out["logits"] = out["out_2"]
  return out


class SSPMatchingNet(nn.Module):
  """SSP's ``SSP_MatchingNet`` (ResNet-50 layers 0-3 + self-support matching).

  Attributes:
    refine: the second self-support round (``out_2``).
    out_size: size of ``out_1`` (None: the image size; PAHNet: (64, 64)).
    depth: ResNet depth.
    fg_threshold, bg_threshold, topk, temperature: `self_support_prototypes`.
  """

  refine: bool = False
  out_size: Sequence[int] | None = None
  depth: int = 50
  fg_threshold: float = 0.7
  bg_threshold: float = 0.6
  topk: int = 12
  temperature: float = 2.0

  @nn.compact
  def __call__(
    self,
    query_image: jax.Array,
    support_images: jax.Array,
    support_masks: jax.Array,
    query_mask: jax.Array | None = None,
    *,
    train: bool = False,
    features: tuple[Mapping[str, jax.Array], Mapping[str, jax.Array]] | None = None,
  ) -> dict[str, Any]:
    """Runs SSP.

    Args:
      query_image: [B, H, W, 3] normalised.
      support_images: [B, K, H, W, 3].
      support_masks: [B, K, H, W] labels (1 FG, 0 BG, 255 ignored by both).
      query_mask: [B, H, W] labels; needed for the training outputs.
      train: also return ``self_logits`` / ``support_logits`` (BN stays in
        inference mode either way).
      features: the backbone's ``layer3`` of the query ``{"layer3": [B, h, w, C]}`` and the
        supports (``[B*K, h, w, C]``, row b*K + k) computed already (cached evaluation,
        `fss_jax.models.frozen`); None: run the backbone.

    Returns:
      {"out_1": [B, h_o, w_o, 2] (`out_size` or H x W), "out_2": [B, H, W, 2]
      (refine), "logits": out_2 if refine else out_1, "out_0_low", "out_1_low"
      [B, h8, w8, 2], "ssp_fg", "ssp_bg" [B, C], "ssp_bg_local" [B, h8, w8, C],
      "fg_above", "bg_above" [B] (threshold counts of the first round),
      training: "self_logits" [B, H, W, 2], "support_logits" [B, K, H, W, 2];
      "intermediates": the backbone's ``layer3_query`` / ``layer3_support`` and the maps
      above the parity fixtures record}.
    """
    b, hh, ww, _ = query_image.shape
    k = support_images.shape[1]
    check_supports(query_image, support_images, support_masks)
    if features is None:
      backbone = resnet.ResNetSSP(depth=self.depth, frozen=True, name="backbone")
      imgs = jnp.concatenate([query_image, support_images.reshape(b * k, hh, ww, -1)], axis=0)
      features = frozen.split_rows({"layer3": backbone(imgs, train=False)["layer3"]}, b)
    fq, fs = features[0]["layer3"], features[1]["layer3"]
    fs = fs.reshape(b, k, *fs.shape[1:])  # row b, shot k

    out: dict[str, Any] = ssp_head(
      fq,
      fs,
      support_masks,
      refine=self.refine,
      image_size=(hh, ww),
      out_size=self.out_size,
      fg_threshold=self.fg_threshold,
      bg_threshold=self.bg_threshold,
      topk=self.topk,
      temperature=self.temperature,
    )
    recorded = ("out_0_low", "out_1_low", "out_1", "ssp_fg", "ssp_bg", "ssp_bg_local")
    mid = {n: out[n] for n in (*recorded, "fg_above", "bg_above")}
    out["intermediates"] = {"layer3_query": fq, "layer3_support": fs, **mid}

    if train:
      if query_mask is None:
        raise ValueError("SSP training needs the query label (episode['query_mask'])")
      qfg = ssp_masked_average(fq, (query_mask == 1).astype(fq.dtype))
      qbg = ssp_masked_average(fq, (query_mask == 0).astype(fq.dtype))
      up = lambda t: resize_bilinear(t, (hh, ww), align_corners=True)
      out["self_logits"] = up(ssp_match(fq, qfg, qbg))
      fs_flat = fs.reshape(b * k, *fs.shape[2:])
      supp = ssp_match(
        fs_flat, out["support_fg"].reshape(b * k, -1), out["support_bg"].reshape(b * k, -1)
      )
      out["support_logits"] = up(supp).reshape(b, k, hh, ww, 2)
    return out


class SSP(nn.Module):
  """Episode interface of `SSPMatchingNet` (registry name ``ssp``); the net is ``ssp``."""

  shot: int = 1
  refine: bool = False
  depth: int = 50

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """episode: query_image [B, H, W, 3], support_images [B, K, H, W, 3], support_masks
    [B, K, H, W]; query_mask [B, H, W] for training. Returns `SSPMatchingNet`'s dict
    (``logits`` [B, H, W, 2] at the image size)."""
    check_episode(episode, self.shot)
    net = SSPMatchingNet(refine=self.refine, depth=self.depth, name="ssp")
    out = net(
      episode["query_image"],
      episode["support_images"],
      episode["support_masks"],
      episode.get("query_mask"),
      train=train,
      features=frozen.cached_features(episode),  # the backbone's layer3 when cached
    )
    return {**out, "intermediates": {"ssp": out["intermediates"]}}


def loss_fn(outputs: Mapping[str, Any], episode: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
  """SSP's training loss (ssp.md §4): CE with ignore 255 at the image size.

  ``CE(out_1) + CE(self_out) + 0.2 CE(supp_out)`` (+ ``CE(out_2)`` with refine).
  """
  y = episode["query_mask"]
  terms = {"ce_out1": losses.cross_entropy(outputs["out_1"], y)}
  if "out_2" in outputs:
    terms["ce_out2"] = losses.cross_entropy(outputs["out_2"], y)
  terms["ce_self"] = losses.cross_entropy(outputs["self_logits"], y)
  terms["ce_support"] = losses.cross_entropy(outputs["support_logits"], episode["support_masks"])
  return losses.weighted_sum(terms, {"ce_support": 0.2})


def ssp_keymap(*, depth: int = 50, prefix: str = "", dst: tuple[str, ...] = ("ssp",)) -> list:
  """SSP ``state_dict`` keys (``layer0.0.{0,1,3,4,6}``, ``layer0.1``, ``layer1..3``;
  270 entries for ResNet-50) under ``prefix`` -> `SSPMatchingNet` variables at ``dst``.

  PAHNet checkpoints hold the same keys under ``prefix="ssp."``.
  """
  return resnet.resnet_keymap(
    depth=depth,
    num_stages=3,
    stem="deep",
    naming="ssp",
    ignore_head=False,
    prefix=prefix,
    dst=(*dst, "backbone"),
  )


# SSP's ImageNet file ``pretrained/resnet50.pth`` names the deep stem ``conv1.{0,1,3,4,6}``
# + ``bn1`` (ssp.md §8.2); inside SSP_MatchingNet it becomes ``layer0.0.*`` + ``layer0.1``.
_IMAGENET_STEM = {
  "layer0.0.0.": "conv1.0.",
  "layer0.0.1.": "conv1.1.",
  "layer0.0.3.": "conv1.3.",
  "layer0.0.4.": "conv1.4.",
  "layer0.0.6.": "conv1.6.",
  "layer0.1.": "bn1.",
}
SOURCES = ("ssp", "imagenet", "resnet_v2")


def initialisation_keymap(
  source: str = "imagenet", *, depth: int = 50, dst: tuple[str, ...] = ("ssp",)
) -> list:
  """ImageNet ResNet files -> the SSP backbone (layers 0-3; layer4 and fc are dropped).

  Args:
    source: "imagenet" (SSP's ``pretrained/resnet50.pth``: ``conv1.{0,1,3,4,6}``, ``bn1``)
      or "resnet_v2" (PSPNet/BAM's ``resnet50_v2.pth``: ``conv1..3``, ``bn1..3``).
  """
  if source == "resnet_v2":
    return resnet.resnet_keymap(
      depth=depth,
      num_stages=3,
      stem="deep",
      naming="resnet_v2",
      ignore_extra_stages=True,
      ignore_head=True,
      dst=(*dst, "backbone"),
    )
  if source != "imagenet":
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  rules = []
  for r in resnet.resnet_keymap(
    depth=depth,
    num_stages=3,
    stem="deep",
    naming="ssp",
    ignore_extra_stages=True,
    ignore_head=True,
    dst=(*dst, "backbone"),
  ):
    for old, new in _IMAGENET_STEM.items():
      if r.src.startswith(old):
        r = dataclasses.replace(r, src=new + r.src[len(old) :])
        break
    rules.append(r)
  return rules


def make_model(shot: int = 1, refine: bool = False, depth: int = 50) -> SSP:
  return SSP(shot=shot, refine=refine, depth=depth)


def keymap(shot: int = 1, refine: bool = False, depth: int = 50, source: str = "ssp") -> list:
  """Key map of `make_model`'s variables from ``source``: "ssp" (a trained SSP
  ``state_dict``), "imagenet" / "resnet_v2" (ImageNet initialisation files, see
  `initialisation_keymap`)."""
  del shot, refine
  if source == "ssp":
    return ssp_keymap(depth=depth)
  return initialisation_keymap(source, depth=depth)


def encoder(*, depth: int = 50, **_) -> frozen.FrozenEncoder:
  """The backbone alone (cached evaluation; it trains, but is fixed at evaluation): layer3."""
  return frozen.FrozenEncoder(
    resnet.ResNetSSP(depth=depth, frozen=True), scope="ssp/backbone", keep=("layer3",)
  )


# ssp.md §5: only the conv weights of layer2 and layer3 train; layer0, layer1 and every
# BN affine parameter stay frozen (BN statistics are never updated).
FROZEN = (
  r"ssp/backbone/(conv|bn)\d/.*",
  r"ssp/backbone/layer1_\d+/.*",
  r"ssp/backbone/layer[23]_\d+/(bn\d|downsample_bn)/.*",
)

# The self-support top-12 needs 12 query positions of the stride-8 features: ceil(25 / 8)^2 = 16
# (24 px gives 9, and jax.lax.top_k fails).
MIN_INPUT_SIZE = 25

# Per-shot FG / BG prototypes are averaged over the K shots (no K-sized parameter): any K.
SPEC = ModelSpec(
  "ssp",
  make_model,
  keymap,
  loss_fn=loss_fn,
  frozen=FROZEN,
  min_input_size=MIN_INPUT_SIZE,
  any_shot=True,
  encoder=encoder,
)
