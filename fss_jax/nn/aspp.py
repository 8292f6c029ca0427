"""ASPP and the ASPP meta decoder of SCCAN (and PAHNet's SCCANPlus), NHWC.

`ASPP`: five branches concatenated in order — global mean -> 1x1 conv -> ReLU
broadcast, 1x1 conv -> ReLU, and 3x3 convs with dilation 6 / 12 / 18 -> ReLU
(all with bias). Names ``layer6_0`` ... ``layer6_4`` as in the official code.

`ASPPDecoder`: ReLU -> ASPP -> res1 (1x1, ReLU) -> res2 (two 3x3 + ReLU, added
to res1) -> cls (3x3, ReLU, Dropout2d 0.1, 1x1 to classes with bias). Its
submodules are ``aspp``, ``res1``, ``res2_0``, ``res2_1``, ``cls_0``, ``cls_1``
(the official ``ASPP_meta``, ``res1_meta``, ``res2_meta.{0,2}``,
``cls_meta.{0,3}``).

Initialisation mirrors PyTorch: ASPP conv weights kaiming-normal (std
sqrt(2 / fan_in)); other convs and all biases U(+-1/sqrt(fan_in)). The decoder
returns its intermediates ``aspp_out``, ``res1_out`` and ``res2_out`` (before the
residual add) beside the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fss_jax.nn.layers import Conv2d

# torch.nn.init.kaiming_normal_ defaults: fan_in, gain sqrt(2), untruncated normal.
_KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv(
  features: int,
  kernel: int,
  *,
  dilation: int = 1,
  use_bias: bool = True,
  kaiming_normal: bool = False,
  name: str | None = None,
) -> Conv2d:
  """A torch Conv2d, symmetric padding dilation * (kernel // 2), torch init
  (or kaiming-normal fan-in weights, as ASPP's ``_init_weight``)."""
  kwargs: dict[str, Any] = {"kernel_init": _KAIMING_NORMAL} if kaiming_normal else {}
  return Conv2d(
    features,
    kernel,
    padding=dilation * (kernel // 2),
    dilation=dilation,
    use_bias=use_bias,
    name=name,
    **kwargs,
  )


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: [B, H, W, C] -> [B, H, W, 5 C].

  Attributes:
    features: channels of every branch (and of the input, as in SCCAN).
    rates: dilations of the three 3x3 branches.
  """

  features: int = 256
  rates: Sequence[int] = (6, 12, 18)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    conv = lambda k, d, name: _conv(self.features, k, dilation=d, kaiming_normal=True, name=name)
    g = jnp.mean(x, axis=(1, 2), keepdims=True)
    g = nn.relu(conv(1, 1, "layer6_0")(g))
    branches = [jnp.broadcast_to(g, (b, h, w, self.features)), nn.relu(conv(1, 1, "layer6_1")(x))]
    for i, r in enumerate(self.rates):
      branches.append(nn.relu(conv(3, r, f"layer6_{i + 2}")(x)))
    return jnp.concatenate(branches, axis=-1)


class ASPPDecoder(nn.Module):
  """SCCAN's meta decoder: features [B, H, W, C] -> logits [B, H, W, classes].

  Attributes:
    features: ASPP branch width and reduce dim (256).
    classes: output channels (2).
    dropout: Dropout2d rate before the classifier (0.1).
  """

  features: int = 256
  classes: int = 2
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, dict]:
    """x [B, H, W, C] -> (logits [B, H, W, classes], intermediates {name: array})."""
    f = self.features
    x = nn.relu(x)
    a = ASPP(f, name="aspp")(x)
    r1 = nn.relu(_conv(f, 1, use_bias=False, name="res1")(a))
    r2 = nn.relu(_conv(f, 3, use_bias=False, name="res2_0")(r1))
    r2 = nn.relu(_conv(f, 3, use_bias=False, name="res2_1")(r2))
    mid = {"aspp_out": a, "res1_out": r1, "res2_out": r2}
    y = r2 + r1
    y = nn.relu(_conv(f, 3, use_bias=False, name="cls_0")(y))
    y = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(y)
    return _conv(self.classes, 1, name="cls_1")(y), mid
