"""PAHNet (ICCV'25, tianyu-zou/PAHNet): the registry entry of its two variants.

PAHNet = a frozen SSP prototype predictor (`fss_jax.models.ssp.SSPMatchingNet`,
``out_1`` at 64x64) + an affinity learner (SCCAN or HDMNet) whose attention
blocks receive the predictor's foreground probability ``p_fg`` [B, 64, 64]
through PFE (`fss_jax.nn.prototype.PrototypeEnhanced`) and ASC (calibrated
cross-attention), + the frozen PSPNet base learner and BAM's ensemble. Spec:
shared/reference/pahnet.md.

* ``sccan_pahnet``: `fss_jax.models.pahnet_sccan` (SCCANPlus; its blocks are
  `fss_jax.nn.attention.sccan.SCCAPlusBlock`).
* ``hdmnet_pahnet``: `fss_jax.models.pahnet_hdmnet` (HDMNetPlus; its transformer
  is `fss_jax.nn.attention.hdm.TransformerPlus`).
* what both share: `fss_jax.models.pahnet_common`.

This module holds the two `ModelSpec`s (``SPECS``) and the names earlier code
imported from here.
"""

from __future__ import annotations

from fss_jax.models import pahnet_common, pahnet_hdmnet, pahnet_sccan
from fss_jax.models import pspnet as pspnet_lib
from fss_jax.models import sccan as sccan_lib
from fss_jax.models.pahnet_hdmnet import HDMNetPlus  # noqa: F401
from fss_jax.models.pahnet_sccan import SCCANPlus  # noqa: F401
from fss_jax.models.registry import ModelSpec

# HDMNetPlus's ``MaskMultiHeadAttention`` is HDMNet's called with ``query_prob`` (ASC).
from fss_jax.nn.attention.hdm import MaskedMultiHeadAttention as ASCMaskedAttention  # noqa: F401
from fss_jax.nn.attention.hdm import TransformerPlus  # noqa: F401
from fss_jax.nn.attention.sccan import SCCAPlusBlock, SCCAPlusTransformer  # noqa: F401

make_sccan_plus, make_hdmnet_plus = pahnet_sccan.make_model, pahnet_hdmnet.make_model

# Frozen (pahnet.md §6): the SSP predictor and the whole PSPNet base learner; the attn_s
# ASC projections of SCCANPlus and the down-path ones of HDMNetPlus are not built at all.
FROZEN = ("ssp/.*", "pspnet/.*")

SPECS = {
  # Both: the PSPNet base learner's PPM (41 px) above the SSP predictor's top-12 (25 px).
  # Both evaluate at the training K only (any_shot False): the BAM ensemble of a K-shot model
  # has a learned K -> hidden -> K shot weighting (kshot_rw) that a model of another K lacks.
  "sccan_pahnet": ModelSpec(
    "sccan_pahnet",
    pahnet_sccan.make_model,
    pahnet_sccan.keymap,
    loss_fn=pahnet_sccan.loss_fn,
    frozen=FROZEN,
    encoder=pahnet_common.encoder,  # the PSPNet features and the predictor's backbone
    unused=lambda blocks=8, **_: sccan_lib.unused_params(depth=blocks),
    min_input_size=pspnet_lib.MIN_INPUT_SIZE,
    output="probabilities",
  ),
  "hdmnet_pahnet": ModelSpec(
    "hdmnet_pahnet",
    pahnet_hdmnet.make_model,
    pahnet_hdmnet.keymap,
    loss_fn=pahnet_hdmnet.loss_fn,
    frozen=FROZEN,
    encoder=pahnet_common.encoder,  # the PSPNet features and the predictor's backbone
    min_input_size=pspnet_lib.MIN_INPUT_SIZE,
    output="probabilities",
  ),
}
