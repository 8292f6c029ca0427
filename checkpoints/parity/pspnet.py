"""PSPNet base-learner parity adapter: the ``backbone_pspnet_resnet50`` fixtures
(``layer0..layer4``, ``ppm``, ``cls`` and the classifier of the official PSPNet).

Input ``in_img`` [B, 3, H, W] -> NHWC. The forward runs `pspnet.PSPNet.features` and
`pspnet.PSPNet.classify` (no up-sampling); outputs ``out_layer0..4``, ``out_ppm_cls`` and
``out_base_logits`` at feature resolution, NCHW; ``mid_ppm__chmean`` = the PPM output's mean
over space [B, 4096].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from checkpoints.parity import ParityAdapter
from checkpoints.parity.common import chmean, image_nhwc, nchw, state_shapes
from fss_jax.models.pspnet import CLASSIFIER_NAMES, classifier_naming
from fss_jax.nn.backbones import resnet

BACKBONE_FIXTURE_CLASS = "model.PSPNet.OneModel sub-modules (layer0..layer4, ppm, cls)"


def model_fields(meta: Mapping[str, Any]) -> dict:
  shapes = state_shapes(meta)
  naming = classifier_naming(shapes)
  depth, _ = resnet.depth_from_keys(shapes)
  return dict(
    num_classes=int(shapes[f"{CLASSIFIER_NAMES[naming]}.weight"][0]),
    depth=depth,
    frozen=True,
    naming=naming,
  )


def _stages_and_logits(module, image: jax.Array) -> dict[str, jax.Array]:
  """Every stage plus the base logits at feature resolution (eval mode)."""
  out = module.features(image, train=False)
  out["base_logits"] = module.classify(out["feat5"], train=False)
  return out


def apply(module, variables, image):
  fn = jax.jit(lambda v, x: module.apply(v, x, method=_stages_and_logits))
  return fn(variables, image)


def outputs(out, meta) -> dict:
  d = {f"out_layer{i}": nchw(out[f"layer{i}"]) for i in range(5)}
  # The fixture ran base_learnear (in-place ReLU first) before storing f5, so its
  # out_ppm_cls holds ReLU(f5); HDMNet's own fixture keeps the pre-ReLU values.
  d["out_ppm_cls"] = nchw(np.maximum(out["feat5"], 0))
  d["out_base_logits"] = nchw(out["base_logits"])
  d["mid_ppm__chmean"] = chmean(out["ppm"])
  return d


BACKBONE_PARITY = ParityAdapter(
  model="pspnet_backbone",
  model_classes=(BACKBONE_FIXTURE_CLASS,),
  model_fields=model_fields,
  inputs=lambda arrays, meta: image_nhwc(arrays["in_img"]),
  outputs=outputs,
  apply=apply,
  logit_outputs=("out_base_logits",),
)

ADAPTERS = {"pspnet_backbone": BACKBONE_PARITY}
