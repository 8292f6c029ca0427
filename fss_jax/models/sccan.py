"""SCCAN (ICCV'23): self-calibrated cross attention network.

The forward follows ``model/SCCAN.py`` of Sam1224/SCCAN (spec:
shared/reference/sccan.md), NHWC:

1. frozen SCCAN-dilation ResNet-50/101 on the query and the B*K supports;
2. ``down_query`` / ``down_supp``: 1x1 conv on [layer2, layer3] -> ReLU ->
   Dropout2d(0.5), resized to the 64x64 working grid (align_corners=True);
3. per shot: mask resized to 64x64, masked support feature, prototype (WGAP),
   softmax-weighted mask prior from layer4; shots are averaged;
4. ``init_merge_query`` / ``init_merge_supp`` 1x1 convs on [feature, prototype,
   prior | mask];
5. the SCCA transformer (8 blocks, windows 8, alternate half-window pad shift);
6. ReLU -> ASPP decoder -> 2-class logits at 64x64, resized (align_corners=True)
   to ``(H - 1) / 8 * zoom_factor + 1``.

Training loss: SCCAN's weighted Dice (sigmoid per channel) on the full-size
logits; the CE the reference logs at validation is reported as a metric.

The key map converts the official checkpoints (489 entries for ResNet-50;
``module.`` prefixes are stripped by the converter). `check_checkpoint` says
what a state dict is (backbone depth; shot count from the released file name)
when it does not fit the model asked for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps as K
from fss_jax.models import frozen
from fss_jax.models.inputs import check_episode
from fss_jax.models.registry import ModelSpec
from fss_jax.nn.aspp import ASPPDecoder
from fss_jax.nn.attention.sccan import SCCATransformer
from fss_jax.nn.backbones import resnet
from fss_jax.nn.layers import Conv2d
from fss_jax.ops import losses
from fss_jax.ops.pooling import masked_average_pool
from fss_jax.ops.resize import resize_bilinear
from fss_jax.ops.similarity import correlation_prior

BACKBONE_PREFIX = "backbone.body."


def _conv1x1(features: int, name: str) -> Conv2d:
  return Conv2d(features, 1, use_bias=False, name=name)


class SCCAN(nn.Module):
  """SCCAN meta learner on a frozen ResNet.

  Attributes:
    shot: supports per episode (K); episodes must match.
    layers: backbone depth, 50 or 101.
    grid: working resolution of the transformer (64; a multiple of `window`).
    reduce_dim: feature width (256).
    depth, num_heads, window, mlp_ratio: SCCA transformer (8, 8, 8, 1).
    zoom_factor: output size ``int((H - 1) / 8 * zoom_factor + 1)`` (8 = input size).
    classes: 2.
    feature_dropout: Dropout2d after down_query / down_supp (0.5).
    classifier_dropout: Dropout2d in the classifier (0.1).
    remat: recompute the SCCA blocks in the backward (less memory, same parameters).
  """

  shot: int = 1
  layers: int = 50
  grid: int = 64
  reduce_dim: int = 256
  depth: int = 8
  num_heads: int = 8
  window: int = 8
  mlp_ratio: float = 1.0
  zoom_factor: int = 8
  classes: int = 2
  feature_dropout: float = 0.5
  classifier_dropout: float = 0.1
  remat: bool = False

  @nn.compact
  def __call__(self, episode: Mapping[str, jnp.ndarray], *, train: bool) -> dict:
    """Runs one batch of episodes.

    Args:
      episode: ``query_image`` [B, H, W, 3], ``support_images`` [B, K, H, W, 3],
        ``support_masks`` [B, K, H, W] (0 / 1 / 255).
      train: dropout on (needs a "dropout" rng).

    Returns:
      ``logits`` [B, h, w, 2] (h = w = input size for zoom 8), ``logits_low``
      [B, 64, 64, 2], ``prior`` [B, 64, 64, 1], ``support_mask`` [B, 64, 64, 1], and
      ``intermediates`` {name: array} (nested by block: ``transformer/blocks_0/q_out``).
    """
    b, k, hi, wi = check_episode(episode, self.shot)
    x, sx, sy = episode["query_image"], episode["support_images"], episode["support_masks"]
    size = (self.grid, self.grid)
    resize = lambda t, s=size: resize_bilinear(t, s, align_corners=True)

    # 1. Frozen backbone (query and the B*K supports in one batch, b * K + k order), or
    #    the features `fss_jax.eval.cached` computed once per test image.
    cached = frozen.cached_features(episode)
    if cached is None:
      backbone = resnet.ResNetSCCAN(depth=self.layers, name="backbone")
      feats = backbone(jnp.concatenate([x, sx.reshape(b * k, hi, wi, 3)], axis=0))
      feats = {n: jax.lax.stop_gradient(v) for n, v in feats.items() if n != "layer0"}
      cached = frozen.split_rows(feats, b)
    fq, fs = cached
    mid: dict[str, Any] = {}  # the intermediates the parity fixtures record
    for n in frozen.feature_names(fq, ("layer1", "layer2", "layer3", "layer4")):
      mid[f"backbone_query_{n}"], mid[f"backbone_support_{n}"] = fq[n], fs[n]

    # 2. Mid-level features: [layer2, layer3] -> 1x1 conv -> ReLU -> Dropout2d -> 64x64.
    drop = nn.Dropout(self.feature_dropout, broadcast_dims=(1, 2), deterministic=not train)
    q_mid = drop(
      nn.relu(
        _conv1x1(self.reduce_dim, "down_query")(
          jnp.concatenate([fq["layer2"], fq["layer3"]], axis=-1)
        )
      )
    )
    s_mid = drop(
      nn.relu(
        _conv1x1(self.reduce_dim, "down_supp")(
          jnp.concatenate([fs["layer2"], fs["layer3"]], axis=-1)
        )
      )
    )
    mid["down_query_out"], mid["down_supp_out"] = q_mid, s_mid
    query_feat = resize(q_mid)  # [B, 64, 64, 256]
    supp_feat = resize(s_mid).reshape(b, k, *size, self.reduce_dim)  # [B, K, 64, 64, 256]
    supp_high = resize(fs["layer4"]).reshape(b, k, *size, -1)  # [B, K, 64, 64, 2048]

    # 3. Per-shot masks, masked features, prototypes and priors; shots averaged.
    fg = (sy == 1).astype(x.dtype).reshape(b * k, hi, wi, 1)
    masks = resize(fg).reshape(b, k, *size, 1)  # [B, K, 64, 64, 1]
    protos, priors = [], []
    for i in range(k):
      protos.append(masked_average_pool(supp_feat[:, i], masks[:, i], eps=0.0005))
      # Softmax-weighted support mask over the unmasked support layer4 (sccan.md §2 step 6).
      priors.append(
        correlation_prior(
          fq["layer4"],
          supp_high[:, i],
          masks[:, i],
          eps=1e-7,
          reduce="softmax_mask",
          mask_support=False,
          output_size=size,
          align_corners=True,
        )
      )
    supp_mask = jnp.mean(masks, axis=1)  # [B, 64, 64, 1]
    supp_masked = jnp.mean(supp_feat * masks, axis=1)  # [B, 64, 64, 256]
    proto = jnp.mean(jnp.stack(protos, axis=1), axis=1)  # [B, 256]
    proto = jnp.broadcast_to(proto[:, None, None, :], query_feat.shape)
    prior = jnp.mean(jnp.concatenate(priors, axis=-1), axis=-1, keepdims=True)
    mid["prior_mask"] = prior

    # 4. Input projections (no activation).
    q0 = _conv1x1(self.reduce_dim, "init_merge_query")(
      jnp.concatenate([query_feat, proto, prior], axis=-1)
    )
    s0 = _conv1x1(self.reduce_dim, "init_merge_supp")(
      jnp.concatenate([supp_masked, proto, supp_mask], axis=-1)
    )
    mid["init_merge_query_out"], mid["init_merge_supp_out"] = q0, s0

    # 5. SCCA transformer.
    t, mid["transformer"] = SCCATransformer(
      self.reduce_dim,
      self.depth,
      self.num_heads,
      self.window,
      self.mlp_ratio,
      remat=self.remat,
      name="transformer",
    )(q0, s0, supp_mask)
    mid["transformer_out"] = t

    # 6. Decoder and output size.
    logits_low, mid["decoder"] = ASPPDecoder(
      self.reduce_dim, self.classes, self.classifier_dropout, name="decoder"
    )(t, train=train)
    h = int((hi - 1) / 8 * self.zoom_factor + 1)
    w = int((wi - 1) / 8 * self.zoom_factor + 1)
    logits = resize(logits_low, (h, w)) if self.zoom_factor != 1 else logits_low
    return {
      "logits": logits,
      "logits_low": logits_low,
      "prior": prior,
      "support_mask": supp_mask,
      "intermediates": mid,
    }


def make_model(shot: int = 1, layers: int = 50, **fields) -> SCCAN:
  """SCCAN(shot, layers, ...); other fields as the `SCCAN` attributes."""
  if layers not in (50, 101):
    raise ValueError(f"SCCAN supports ResNet-50 and ResNet-101 backbones, got layers={layers}")
  return SCCAN(shot=shot, layers=layers, **fields)


def loss_fn(outputs: Mapping[str, jnp.ndarray], episode: Mapping[str, jnp.ndarray]):
  """SCCAN's training loss: weighted Dice on the full-size logits (sccan.md §5).

  Returns (dice, {"dice", "ce", "loss"}); the CE (ignore 255) is only reported,
  as the reference computes it for logging.
  """
  logits, target = outputs["logits"], episode["query_mask"]
  if logits.shape[1:3] != target.shape[1:3]:
    raise ValueError(
      f"logits {tuple(logits.shape)} and query_mask {tuple(target.shape)} differ "
      "in size; SCCAN trains with zoom_factor=8 (logits at the input size)"
    )
  dice = losses.weighted_dice_loss(logits, target)
  ce = jax.lax.stop_gradient(losses.cross_entropy(logits, target))
  return dice, {"dice": dice, "ce": ce, "loss": dice}


# ---------------------------------------------------------------------------
# Key map (official state dict -> Flax variables)
# ---------------------------------------------------------------------------


def _block_rules(n: int) -> list:
  src, dst = f"transformer.layers.0.blocks.{n}", ("transformer", f"blocks_{n}")
  rules = K.layer_norm(f"{src}.norm1", (*dst, "norm1")) + K.layer_norm(
    f"{src}.norm2", (*dst, "norm2")
  )
  for a in ("attn_q", "attn_s"):
    for lin in ("q", "kv", "proj"):
      rules += K.linear(f"{src}.{a}.{lin}", (*dst, a, lin))
  for m in ("mlp_q", "mlp_s"):
    for lin in ("fc1", "fc2"):
      rules += K.linear(f"{src}.{m}.{lin}", (*dst, m, lin))
  return rules


def keymap(shot: int = 1, layers: int = 50, depth: int = 8, **unused) -> list:
  """Official SCCAN state-dict names -> variables of `make_model(shot, layers)`.

  The shot count does not change the keys (SCCAN has no K-specific module).
  """
  del shot, unused
  rules = resnet.resnet_keymap(
    depth=layers, stem="deep", naming="resnet_v2", prefix=BACKBONE_PREFIX, dst=("backbone",)
  )
  for name in ("down_query", "down_supp", "init_merge_query", "init_merge_supp"):
    rules += K.conv(f"{name}.0", (name,), bias=False)
  for n in range(depth):
    rules += _block_rules(n)
  rules += K.layer_norm("transformer.norm0", ("transformer", "norm0"))
  dec = ("decoder",)
  for i in range(5):
    rules += K.conv(f"ASPP_meta.layer6_{i}.0", (*dec, "aspp", f"layer6_{i}"))
  rules += K.conv("res1_meta.0", (*dec, "res1"), bias=False)
  rules += K.conv("res2_meta.0", (*dec, "res2_0"), bias=False)
  rules += K.conv("res2_meta.2", (*dec, "res2_1"), bias=False)
  rules += K.conv("cls_meta.0", (*dec, "cls_0"), bias=False)
  rules += K.conv("cls_meta.3", (*dec, "cls_1"))
  return rules


_SHOT_IN_NAME = re.compile(r"train(\d+)_epoch|(\d+)s(?:hot)?\b|(\d+)[-_]?shot")


def describe_checkpoint(keys: Sequence[str], source: str | None = None) -> dict:
  """What an SCCAN state dict is: {"layers": 50 | 101, "shot": K or None}.

  The depth comes from the layer3 block count. The keys are the same for every
  shot count, so the shot is read from the released file name when it says so
  (``win8_train5_epoch_..`` = 5-shot, ``win8_train_epoch_..`` = 1-shot, or
  ``..5s..`` / ``5shot``); otherwise it is None (unknown).
  """
  keys = [k[7:] if k.startswith("module.") else k for k in keys]
  if not any(k.startswith(BACKBONE_PREFIX) for k in keys):
    raise ValueError(
      "not an SCCAN checkpoint: no 'backbone.body.*' keys (an ImageNet "
      "backbone alone converts with --model resnet_sccan)"
    )
  layers, _ = resnet.depth_from_keys(keys, BACKBONE_PREFIX)
  shot = None
  if source:
    name = str(source).replace("\\", "/").rsplit("/", 1)[-1]
    if re.search(r"train_epoch", name):
      shot = 1
    else:
      m = _SHOT_IN_NAME.search(name)
      if m:
        shot = int(next(g for g in m.groups() if g))
  return {"layers": layers, "shot": shot}


def check_checkpoint(
  state_dict: Mapping[str, Any], *, shot: int = 1, layers: int = 50, source: str | None = None
) -> None:
  """Raises a ValueError naming what the checkpoint is when it is not for this model.

  Args:
    state_dict: the (possibly ``module.``-prefixed) official state dict.
    shot, layers: what the model is built for.
    source: the checkpoint's file name, used to tell 1-shot from 5-shot files.
  """
  what = describe_checkpoint(list(state_dict), source)
  problems = []
  if what["layers"] != layers:
    problems.append(
      f"a ResNet-{what['layers']} backbone, but the model is built with "
      f"layers={layers} (ResNet-{layers}); pass layers={what['layers']}"
    )
  if what["shot"] is not None and what["shot"] != shot:
    problems.append(
      f"a {what['shot']}-shot model (file name {source!r}), but shot={shot} was "
      f"asked; pass shot={what['shot']} (the keys are the same, the weights are not)"
    )
  if problems:
    raise ValueError("this SCCAN checkpoint is " + "; and ".join(problems))


def unused_params(depth: int = 8, **unused) -> tuple[str, ...]:
  """The last SCCA block's support stream: its output is never read (train_sccan.py's
  AdamW holds it, but its .grad stays None, so torch never moves it)."""
  del unused
  return (rf"transformer/blocks_{depth - 1}/(attn_s|mlp_s)/.*",)


def encoder(*, layers: int = 50, **_) -> frozen.FrozenEncoder:
  """The frozen backbone alone (cached evaluation): the three stages the model reads."""
  return frozen.FrozenEncoder(
    resnet.ResNetSCCAN(depth=layers), scope="backbone", keep=("layer2", "layer3", "layer4")
  )


SPEC = ModelSpec(
  name="sccan",
  make_model=make_model,
  keymap=keymap,
  loss_fn=loss_fn,
  frozen=(r"backbone/.*",),
  unused=unused_params,
  check_checkpoint=check_checkpoint,
  encoder=encoder,
  # One full cell of the stride-8 features (they are then resized to the `grid`).
  min_input_size=8,
  # Per-shot prototypes, priors, masked features and masks are averaged over the K shots
  # before the transformer (no K-sized parameter): any K at test time.
  any_shot=True,
)
