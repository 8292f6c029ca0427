"""What PAHNet's two variants share (shared/reference/pahnet.md §1, §4-§5).

`fss_jax.models.pahnet_sccan` (SCCANPlus) and `fss_jax.models.pahnet_hdmnet`
(HDMNetPlus) both start from

* the frozen prototype predictor (`predictor_probability`, §1.2),
* the frozen PSPNet features of the query and the UNMASKED supports
  (`frozen_features`, §1.1),
* the prototype prior of layer4 and feature 5 with its per-sample level choice
  (`level_priors`, §1.3),

end in BAM's learner ensemble (`fss_jax.models.hdmnet.learner_ensemble`), and add
the mean CE of the PFE pseudo masks to their losses (`pseudo_mask_ce`). NHWC
throughout. `encoder` runs their two frozen image encoders (the PSPNet, the predictor's
backbone) alone for cached evaluation (`fss_jax.models.frozen`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import frozen
from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models import ssp as ssp_lib
from fss_jax.nn.backbones import resnet
from fss_jax.nn.prototype import prototype_prior, select_prior
from fss_jax.ops import losses
from fss_jax.ops.resize import resize_nearest

# The SSP predictor's backbone output among the cached features (`Encoders`).
SSP_LAYER3 = "ssp_layer3"


def predictor_probability(
  ssp: ssp_lib.SSPMatchingNet, episode: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict]:
  """The frozen predictor's softmax ``[B, s, s, 2]`` (no gradient), pahnet.md §1.2, and
  its intermediates."""
  cached = frozen.cached_features(episode)
  layer3 = lambda f: {"layer3": f[SSP_LAYER3]}
  out = ssp(
    episode["query_image"],
    episode["support_images"],
    episode["support_masks"],
    train=False,
    features=None if cached is None else (layer3(cached[0]), layer3(cached[1])),
  )
  return jax.lax.stop_gradient(jax.nn.softmax(out["out_1"], axis=-1)), out["intermediates"]


def frozen_features(
  psp: pspnet_lib.PSPNet, episode: Mapping[str, jax.Array], mid: dict, names: Sequence[str]
) -> tuple[dict, dict]:
  """PSPNet features of the query and the unmasked supports, one batch, no gradient, or
  those `fss_jax.eval.cached` computed once per test image.

  Returns (query features ``{name: [B, h, w, C]}``, support features
  ``{name: [B*K, h, w, C]}``, row b*K + k); records ``feat_query_<n>`` /
  ``feat_support_<n>`` for the given names (the cached ones among them).
  """
  cached = frozen.cached_features(episode)
  if cached is None:
    x, sx = episode["query_image"], episode["support_images"]
    b, k, hh, ww = sx.shape[:4]
    feats = psp.features(jnp.concatenate([x, sx.reshape(b * k, hh, ww, -1)], 0), train=False)
    cached = frozen.split_rows(jax.lax.stop_gradient(feats), b)
  fq, fs = cached
  for n in frozen.feature_names(fq, names):
    mid[f"feat_query_{n}"] = fq[n]
    mid[f"feat_support_{n}"] = fs[n]
  return fq, fs


class Encoders(nn.Module):
  """PAHNet's two frozen image encoders side by side (cached evaluation): the PSPNet base
  learner's features (`pspnet_lib.PSPNet.features`) and the SSP predictor backbone's layer3
  (as `SSP_LAYER3`); the model's children ``pspnet`` and ``ssp/backbone``."""

  num_base_classes: int = 16
  depth: int = 50

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    psp = pspnet_lib.PSPNet(
      num_classes=self.num_base_classes, depth=self.depth, frozen=True, name="pspnet"
    )
    out = psp.features(images, train=False)
    ssp = resnet.ResNetSSP(depth=ssp_lib.SSPMatchingNet.depth, frozen=True, name="ssp_backbone")
    return {**out, SSP_LAYER3: ssp(images, train=False)["layer3"]}


def encoder(*, num_base_classes: int = 16, depth: int = 50, **_) -> frozen.FrozenEncoder:
  """`Encoders` as a `frozen.FrozenEncoder` (both variants): the PSPNet features the rest of
  the model reads (layer2, layer3 for the mid-level features and the ensemble; layer4 and
  feature 5 for the priors and the base learner) and the predictor's layer3."""
  return frozen.FrozenEncoder(
    Encoders(num_base_classes=num_base_classes, depth=depth),
    scope=("pspnet", "ssp/backbone"),
    keep=("layer2", "layer3", "layer4", "feat5", SSP_LAYER3),
  )


def level_priors(
  fq: Mapping[str, jax.Array],
  fs: Mapping[str, jax.Array],
  masks: jax.Array,
  out_size: Sequence[int],
  mid: dict,
) -> jax.Array:
  """Prototype priors of layer4 and feature 5 and the per-sample choice (§1.3).

  fq: query features at backbone resolution; fs: [B, K, r, r, C] support
  features; masks [B, K, r, r, 1]. Returns the prior [B, o, o, 2].
  """
  p4 = prototype_prior(fq["layer4"], fs["layer4"], masks, out_size)
  p5 = prototype_prior(fq["feat5"], fs["feat5"], masks, out_size)
  prior, choice = select_prior(p4, p5)
  for tag, p in (("layer4", p4), ("ppm_cls", p5)):
    for n, v in p.items():
      mid[f"prior_{tag}_{n}"] = v
  mid["prior_choice_fg"] = choice["fg"]
  mid["prior_choice_corr"] = choice["corr"]
  return prior


def pseudo_mask_ce(pseudo_masks: Sequence[jax.Array], y: jax.Array) -> list[jax.Array]:
  """CE of each pseudo mask (probabilities used as logits) against the label resized
  with torch's legacy nearest rule to its grid (the loss term is their mean)."""
  out = []
  for p in pseudo_masks:
    gt = resize_nearest(y[..., None], p.shape[1:3])[..., 0]
    out.append(losses.cross_entropy(p, gt))
  return out
