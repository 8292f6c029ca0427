"""PANet (Wang et al., ICCV 2019): prototype matching with alignment regularisation.

Port of kaixin96/PANet ``models/fewshot.py`` (`FewShotSeg`) following
shared/reference/panet.md. The only weights are the 13 convolutions of the
VGG-16 encoder (`fss_jax.nn.backbones.vgg`). For an episode (NHWC):

1. embed supports and query with one encoder call -> ``[.., h', w', 512]``;
2. masked average pooling of every support at *mask* resolution (features
   up-sampled bilinearly, half-pixel; done exactly through the transposed
   interpolation operator), ``sum(F m) / (sum(m) + 1e-5)``, foreground per
   way and shot, background per way and shot;
3. prototypes: foreground = mean over shots per way, background = mean over
   ways and shots; order ``[bg, way 1, ..., way N]``;
4. scores ``20 * cos(query feature, prototype)`` (torch F.cosine_similarity,
   eps 1e-8), up-sampled bilinearly (align_corners=False) to the image size:
   ``logits [B, H, W, 1 + N]``;
5. training: prototype alignment regularisation (PAR, panet.md §3): query
   prototypes from the argmax of the feature-resolution scores segment the
   supports back; CE (ignore 255) per support image, divided by K * N, mean
   over the batch. Loss = CE(logits, query mask) + 1 * PAR.

Episodes: 1-way ``support_images [B, K, H, W, 3]``, ``support_masks [B, K, H,
W]``; N-way adds a way axis after B (``[B, N, K, ...]``). Support masks hold
0 / 1 / 255 (1 = that way's class). Foreground = ``mask == 1``; background =
``mask != 1`` (PANet counts ignore pixels as background). PANet's N-way
background excludes *every* episode class; an episode can pass that exact
mask as optional ``support_bg_masks`` (and ``support_fg_masks``), float, same
shape as ``support_masks`` (the official code's fixtures do).

CPU training speed (bench/profile_step.py, jax 0.10.2): XLA:CPU hands every
convolution to YNNPACK, whose kernel-gradient convolutions (an image-sized
window) run 4-10x slower than the forward ones and take most of a 473 px
step. ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
sends convolutions to Eigen: 473 px train steps 1.3-3.6x faster (the forward
alone is ~10-20% slower there, so leave eval as is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import frozen
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.backbones.vgg import PANetVGG16, imagenet_vgg_keymap, panet_vgg_keymap
from fss_jax.ops import losses
from fss_jax.ops.pooling import masked_average_pool
from fss_jax.ops.resize import resize_bilinear
from fss_jax.ops.similarity import cosine_similarity

ALPHA = 20.0  # cosine scaler (fixed, not learned)
PROTOTYPE_EPS = 1e-5  # masked average pooling area eps
COSINE_EPS = 1e-8  # torch F.cosine_similarity default
ALIGN_LOSS_WEIGHT = 1.0  # lambda of L_PAR (config.py: align_loss_scaler)
IGNORE = 255


def _with_way_axis(images: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Support images/masks -> ``[B, N, K, H, W, 3]`` / ``[B, N, K, H, W]``."""
  if images.ndim == 5 and masks.ndim == 4:
    return images[:, None], masks[:, None]
  if images.ndim == 6 and masks.ndim == 5:
    return images, masks
  raise ValueError(
    "PANet expects support_images [B, K, H, W, 3] with support_masks [B, K, H, W] (1-way) or "
    "[B, N, K, H, W, 3] with [B, N, K, H, W] (N-way); got "
    f"{tuple(images.shape)} and {tuple(masks.shape)}"
  )


def prototype_scores(
  query_feat: jax.Array, prototypes: jax.Array, *, scaler: float = ALPHA
) -> jax.Array:
  """``scaler * cos(query_feat, prototype_j)`` per position (calDist).

  Args:
    query_feat: ``[B, h, w, C]``.
    prototypes: ``[B, J, C]``.

  Returns:
    ``[B, h, w, J]``.
  """
  return scaler * cosine_similarity(
    query_feat[:, :, :, None, :], prototypes[:, None, None, :, :], axis=-1, eps=COSINE_EPS
  )


def alignment_loss(
  query_feat: jax.Array,
  scores: jax.Array,
  supp_feat: jax.Array,
  fore: jax.Array,
  back: jax.Array,
  *,
  scaler: float = ALPHA,
) -> jax.Array:
  """PANet's PAR loss: the mean over episodes of `alignment_loss_per_episode`."""
  return jnp.mean(
    alignment_loss_per_episode(query_feat, scores, supp_feat, fore, back, scaler=scaler)
  )


def alignment_loss_per_episode(
  query_feat: jax.Array,
  scores: jax.Array,
  supp_feat: jax.Array,
  fore: jax.Array,
  back: jax.Array,
  *,
  scaler: float = ALPHA,
) -> jax.Array:
  """PANet's prototype alignment regularisation (`alignLoss`) of each episode.

  Args:
    query_feat: ``[B, h, w, C]`` query features.
    scores: ``[B, h, w, 1 + N]`` feature-resolution query scores (only their
      argmax is used; no gradient flows through it).
    supp_feat: ``[B, N, K, h, w, C]`` support features.
    fore, back: ``[B, N, K, H, W]`` float support masks.
    scaler: cosine scaler.

  Returns:
    ``[B]``: ``sum_{w not skipped, k} CE_{b,w,k} / (K N)`` where way w is skipped
    when the query prediction has no pixel of it.
  """
  b, n, k, h, w, c = supp_feat.shape
  hm, wm = fore.shape[-2:]
  pred = jnp.argmax(scores, axis=-1)  # [B, h, w]
  onehot = jax.lax.stop_gradient(jax.nn.one_hot(pred, 1 + n, dtype=query_feat.dtype))
  count = jnp.sum(onehot, axis=(1, 2))  # [B, 1+N]
  qproto = jnp.einsum("bhwc,bhwj->bjc", query_feat, onehot, precision=jax.lax.Precision.HIGHEST) / (
    count[..., None] + PROTOTYPE_EPS
  )
  pairs = jnp.stack([jnp.broadcast_to(qproto[:, :1], (b, n, c)), qproto[:, 1:]], axis=2)
  # [B, N, 2, C] -> support scores [B, N, K, h, w, 2]
  t = scaler * cosine_similarity(
    supp_feat[:, :, :, :, :, None, :], pairs[:, :, None, None, None, :, :], axis=-1, eps=COSINE_EPS
  )
  t = resize_bilinear(t.reshape(b * n * k, h, w, 2), (hm, wm), align_corners=False)
  target = jnp.where(back == 1, 0, jnp.where(fore == 1, 1, IGNORE)).astype(jnp.int32)
  ce = jax.vmap(losses.cross_entropy)(t, target.reshape(b * n * k, hm, wm))
  present = (count[:, 1:] > 0).astype(ce.dtype)  # [B, N]
  return jnp.sum(ce.reshape(b, n, k) * present[:, :, None], axis=(1, 2)) / (k * n)


class PANet(nn.Module):
  """PANet few-shot segmenter (1-way or N-way, K-shot).

  Attributes:
    align: compute the PAR loss in training (PANet's ``cfg["align"]``).
    scaler: cosine scaler alpha.
    ways, shots: optional; when set, episodes of another shape are rejected.
    return_intermediates: also return the encoder's block outputs (``blocks``; not when
      the episode carries cached features).
    precision: convolution precision (None follows the global default).
    encoder_pool: the encoder's max-pool formulation, ``"taps"`` (default) or
      ``"reduce_window"``; identical numbers, the first has a much cheaper
      gradient on XLA:CPU (`fss_jax.ops.pooling.max_pool2d_taps`).
  """

  align: bool = True
  scaler: float = ALPHA
  ways: int | None = None
  shots: int | None = None
  return_intermediates: bool = False
  precision: Any = None
  encoder_pool: str = "taps"

  @nn.compact
  def __call__(self, episode: Mapping[str, jax.Array], *, train: bool) -> dict:
    """Episode -> ``{"logits" [B, H, W, 1+N], "scores" [B, h', w', 1+N],
    "prototypes" [B, 1+N, C], "align_loss" scalar}``."""
    query = episode["query_image"]  # [B, H, W, 3]
    images, masks = _with_way_axis(episode["support_images"], episode["support_masks"])
    b, n, k, hm, wm, _ = images.shape
    if query.ndim != 4 or query.shape[0] != b:
      raise ValueError(f"query_image must be [B={b}, H, W, 3], got {tuple(query.shape)}")
    if self.ways is not None and n != self.ways:
      raise ValueError(f"PANet was built for {self.ways}-way episodes, got {n} ways")
    if self.shots is not None and k != self.shots:
      raise ValueError(f"PANet was built for {self.shots}-shot episodes, got {k} shots")
    fore = episode.get("support_fg_masks")
    fore = (masks == 1) if fore is None else fore.reshape(masks.shape)
    back = episode.get("support_bg_masks")
    back = (masks != 1) if back is None else back.reshape(masks.shape)
    fore, back = fore.astype(jnp.float32), back.astype(jnp.float32)

    # 1. one encoder pass over supports (b, n, k order) and queries, or the embeddings
    #    `fss_jax.eval.cached` computed once per test image.
    cached = frozen.cached_features(episode)
    blocks = None
    if cached is None:
      encoder = PANetVGG16(precision=self.precision, pool=self.encoder_pool, name="encoder")
      blocks = encoder(jnp.concatenate([images.reshape(b * n * k, hm, wm, -1), query], axis=0))
      feats = blocks["block5"]
      supp_flat, query_feat = feats[: b * n * k], feats[b * n * k :]  # query [B, h, w, C]
    else:
      query_feat, supp_flat = cached[0]["block5"], cached[1]["block5"]
    _, h, w, c = query_feat.shape
    supp_feat = supp_flat.reshape(b, n, k, h, w, c)

    # 2. masked average pooling at mask resolution.
    flat = supp_feat.reshape(b * n * k, h, w, c)
    pool = lambda m: masked_average_pool(
      flat, m.reshape(b * n * k, hm, wm), eps=PROTOTYPE_EPS, resize="features"
    )
    fg = pool(fore).reshape(b, n, k, c)
    bg = pool(back).reshape(b, n, k, c)

    # 3. prototypes [bg, way_1..way_N].
    fg_proto = jnp.sum(fg, axis=2) / k  # [B, N, C]
    bg_proto = jnp.sum(jnp.sum(bg, axis=2) / k, axis=1) / n  # [B, C]
    prototypes = jnp.concatenate([bg_proto[:, None], fg_proto], axis=1)  # [B, 1+N, C]

    # 4. cosine scores and up-sampling.
    scores = prototype_scores(query_feat, prototypes, scaler=self.scaler)  # [B, h, w, 1+N]
    logits = resize_bilinear(scores, (query.shape[1], query.shape[2]), align_corners=False)

    out: dict[str, Any] = {
      "logits": logits,
      "scores": scores,
      "prototypes": prototypes,
      "align_loss": jnp.zeros((), jnp.float32),
    }
    # 5. PAR (training only).
    if train and self.align:
      per_episode = alignment_loss_per_episode(
        query_feat, scores, supp_feat, fore, back, scaler=self.scaler
      )
      out["align_loss"] = jnp.mean(per_episode)
      out["align_loss_per_episode"] = per_episode
    if self.return_intermediates and blocks is not None:
      out["blocks"] = blocks
    return out


def loss_fn(
  outputs: Mapping[str, jax.Array],
  episode: Mapping[str, jax.Array],
  *,
  align_weight: float = ALIGN_LOSS_WEIGHT,
):
  """``CE(logits, query_mask; ignore 255) + align_weight * PAR`` (panet.md §4).

  Returns:
    (loss, {"loss", "seg_loss", "align_loss", "align_epi<b>" per episode}).
  """
  seg = losses.cross_entropy(outputs["logits"], episode["query_mask"])
  align = outputs.get("align_loss", jnp.zeros((), jnp.float32))
  per_episode = outputs.get("align_loss_per_episode")
  reported = (
    {}
    if per_episode is None
    else losses.parts("align_epi", [per_episode[i] for i in range(per_episode.shape[0])])
  )
  return losses.weighted_sum(
    {"seg_loss": seg, "align_loss": align}, {"align_loss": align_weight}, reported=reported
  )


def make_model(**fields) -> PANet:
  return PANet(**fields)


def keymap(source: str = "panet", **_unused) -> list:
  """Key map to the PANet variables (``params/encoder/conv{b}_{i}``).

  Args:
    source: ``"panet"`` — a PANet snapshot / the parity fixtures
      (``encoder.backbone.features.*``, after stripping ``module.``);
      ``"imagenet"`` — torchvision's ``vgg16`` ImageNet file
      (``features.*``, classifier ignored), PANet's initialisation.
  """
  if source == "panet":
    return panet_vgg_keymap(prefix="encoder.backbone.", dst=("encoder",))
  if source == "imagenet":
    return imagenet_vgg_keymap(dst=("encoder",))
  raise ValueError(f"PANet key map source must be 'panet' or 'imagenet', got {source!r}")


def imagenet_keymap(**_unused) -> list:
  """torchvision ``vgg16-397923af.pth`` -> PANet variables (training init)."""
  return keymap(source="imagenet")


def encoder(*, precision: Any = None, encoder_pool: str = "taps", **_) -> frozen.FrozenEncoder:
  """The VGG-16 encoder alone (cached evaluation; it trains, but is fixed at evaluation): the
  embedding ``block5``."""
  return frozen.FrozenEncoder(
    PANetVGG16(precision=precision, pool=encoder_pool),
    scope="encoder",
    method=lambda vgg, images, train: vgg(images),  # no BN or dropout: no train flag
    keep=("block5",),
  )


SPEC = ModelSpec(
  name="panet",
  make_model=make_model,
  keymap=keymap,
  loss_fn=loss_fn,
  frozen=(),  # PANet fine-tunes the whole VGG-16
  # One full cell of the stride-8 features; a smaller input is mostly the pools' padding.
  min_input_size=8,
  # Prototypes are means over the K shots (foreground per way, background over ways and
  # shots), N ways are N prototypes: any K and any N at test time.
  any_shot=True,
  any_way=True,
  shot_field="shots",
  way_field="ways",
  encoder=encoder,
)
