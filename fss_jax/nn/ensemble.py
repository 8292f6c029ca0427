"""BAM's learner ensemble with the Gram-matrix scene difference (chunbolang/BAM).

Used by HDMNet, Sym-Net and PAHNet. Given the meta learner's logits, the base
learner's logits and low-level (layer2) features of the query and the K
supports:

1. ``e_k = ||G(query) - G(support_k)||_F / C`` with the channel-cosine Gram
   matrix ``G[c, c'] = <F_c, F_c'> / (|F_c| |F_c'| + 1e-7)`` (`scene_difference`);
   C = ||1_{CxC}||_F.
2. K > 1: `KShotReweight` turns the ascending-sorted e's into softmax weights;
   ``e = sum_k w_k e_k``. BAM / Sym-Net scatter the weights back to the shot
   order (``unsort=True``); HDMNet / PAHNet compose the two permutations into
   the identity, so the j-th weight (meant for the j-th smallest e) multiplies
   the e of shot j (``unsort=False``, reproduced for their checkpoints).
3. ``base_map`` = sum of the base learner's foreground probabilities
   (training: without the episode class channel, see `base_foreground`).
4. ``gram_merge`` (1x1 conv 2->1, no bias, init [1, 0]) with the same weights
   on ``[P_bg, e]`` and ``[P_fg, e]``; ``cls_merge`` (same form) on
   ``[bg', base_map]``; ``final = concat[bg'', fg']`` - probability-like values
   that the references feed to cross-entropy / argmax as logits.

All maps NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.nn.layers import Conv2d


def gram_matrix(feat: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Channel-cosine Gram matrix: ``[N, H, W, C]`` -> ``[N, C, C]``."""
  n, h, w, c = feat.shape
  f = feat.reshape(n, h * w, c)
  dots = jnp.einsum("nlc,nld->ncd", f, f)
  norms = jnp.sqrt(jnp.sum(f * f, axis=1))  # [N, C]
  return dots / (norms[:, :, None] * norms[:, None, :] + eps)


def scene_difference(query_feat: jax.Array, support_feat: jax.Array) -> jax.Array:
  """BAM's adjustment factor e_k.

  Args:
    query_feat: ``[B, H, W, C]``.
    support_feat: ``[B, K, H, W, C]``.

  Returns:
    ``[B, K]``: ``||G_q - G_{s,k}||_F / C``.
  """
  b, k = support_feat.shape[:2]
  c = query_feat.shape[-1]
  gq = gram_matrix(query_feat)  # [B, C, C]
  gs = gram_matrix(support_feat.reshape(b * k, *support_feat.shape[2:])).reshape(b, k, c, c)
  diff = gq[:, None] - gs
  return jnp.sqrt(jnp.sum(diff * diff, axis=(2, 3))) / float(c)


def base_foreground(base_prob: jax.Array, exclude_channel: jax.Array | None = None) -> jax.Array:
  """Sum of the base learner's foreground probabilities.

  Args:
    base_prob: ``[B, H, W, N]`` softmax of the base logits (channel 0 = background).
    exclude_channel: optional ``[B]`` int channel to leave out (training: the
      episode class, ``class_index + 1``); negative / out-of-range values
      exclude nothing.

  Returns:
    ``[B, H, W, 1]``.
  """
  n = base_prob.shape[-1]
  keep = jnp.arange(n) != 0
  if exclude_channel is not None:
    keep = keep[None, :] & (jnp.arange(n)[None, :] != exclude_channel[:, None])  # [B, N]
    return jnp.sum(base_prob * keep[:, None, None, :].astype(base_prob.dtype), -1, keepdims=True)
  return jnp.sum(base_prob[..., 1:], axis=-1, keepdims=True)


class KShotReweight(nn.Module):
  """``kshot_rw``: weights for the K scene differences.

  ``hidden > 0``: conv1x1 K->hidden (bias) -> ReLU -> conv1x1 hidden->K (bias)
  (torch keys ``kshot_rw.0``, ``kshot_rw.2``); ``hidden == 0``: one conv1x1
  K->K without bias initialised to 1/K (``kshot_rw``).
  """

  shot: int
  hidden: int = 2
  unsort: bool = False

  @nn.compact
  def __call__(self, e: jax.Array) -> jax.Array:
    """e ``[B, K]`` -> softmax weights ``[B, K]`` aligned with e as the reference does."""
    order = jnp.argsort(e, axis=1)
    x = jnp.take_along_axis(e, order, axis=1)[:, None, None, :]  # sorted, [B, 1, 1, K]
    if self.hidden > 0:
      x = nn.relu(Conv2d(self.hidden, 1, name="conv_0")(x))
      x = Conv2d(self.shot, 1, name="conv_1")(x)
    else:
      x = Conv2d(
        self.shot,
        1,
        use_bias=False,
        name="conv",
        kernel_init=nn.initializers.constant(1.0 / self.shot),
      )(x)
    w = x[:, 0, 0, :]
    if self.unsort:
      w = jnp.take_along_axis(w, jnp.argsort(order, axis=1), axis=1)
    return jax.nn.softmax(w, axis=1)


def _merge_init(key, shape, dtype=jnp.float32):
  """gram_merge / cls_merge start as the identity on the first input: [1, 0]."""
  return jnp.zeros(shape, dtype).at[..., 0, :].set(1.0)


class LearnerEnsemble(nn.Module):
  """Meta/base learner ensemble with the scene-difference adjustment.

  Attributes:
    shot: K.
    kshot_hidden: ``kshot_trans_dim`` (2 in every reference; 0 = single conv).
    kshot_unsort: see the module docstring (False for HDMNet/PAHNet, True for BAM/Sym-Net).
  """

  shot: int = 1
  kshot_hidden: int = 2
  kshot_unsort: bool = False

  @nn.compact
  def __call__(
    self,
    meta_logits: jax.Array,
    base_logits: jax.Array,
    query_low: jax.Array,
    support_low: jax.Array,
    *,
    exclude_channel: jax.Array | None = None,
  ) -> dict[str, Any]:
    """Ensembles at the feature resolution.

    Args:
      meta_logits: ``[B, h, w, 2]``.
      base_logits: ``[B, h, w, N_base]``.
      query_low: ``[B, h', w', C]`` low-level query features (layer2).
      support_low: ``[B, K, h', w', C]`` low-level support features.
      exclude_channel: ``[B]`` base channel of the episode class (training), or None.

    Returns:
      dict: ``final`` [B, h, w, 2], ``est_val`` [B], ``scene_difference`` [B, K],
      ``base_map`` [B, h, w, 1], ``meta_prob`` [B, h, w, 2], and ``intermediates``: the
      merges' inputs ``gram_merge_in_bg`` / ``_fg`` [B, h, w, 2], ``cls_merge_in``.
    """
    meta_prob = jax.nn.softmax(meta_logits, axis=-1)
    base_prob = jax.nn.softmax(base_logits, axis=-1)
    e_all = scene_difference(query_low, support_low)  # [B, K]
    if self.shot > 1:
      weights = KShotReweight(self.shot, self.kshot_hidden, self.kshot_unsort, name="kshot_rw")(
        e_all
      )
    else:
      weights = jnp.ones_like(e_all)
    est = jnp.sum(weights * e_all, axis=1)  # [B]
    base_map = base_foreground(base_prob, exclude_channel)
    est_map = jnp.broadcast_to(est[:, None, None, None], base_map.shape).astype(meta_prob.dtype)
    gram_merge = Conv2d(1, 1, use_bias=False, kernel_init=_merge_init, name="gram_merge")
    cls_merge = Conv2d(1, 1, use_bias=False, kernel_init=_merge_init, name="cls_merge")
    bg_in = jnp.concatenate([meta_prob[..., 0:1], est_map], axis=-1)
    fg_in = jnp.concatenate([meta_prob[..., 1:2], est_map], axis=-1)
    bg, fg = gram_merge(bg_in), gram_merge(fg_in)
    merge_in = jnp.concatenate([bg, base_map], axis=-1)
    final = jnp.concatenate([cls_merge(merge_in), fg], axis=-1)
    return {
      "final": final,
      "est_val": est,
      "scene_difference": e_all,
      "base_map": base_map,
      "meta_prob": meta_prob,
      "intermediates": {
        "gram_merge_in_bg": bg_in,
        "gram_merge_in_fg": fg_in,
        "cls_merge_in": merge_in,
      },
    }


def ensemble_keymap(
  src: str = "", dst: tuple[str, ...] = ("ensemble",), *, shot: int = 1, kshot_hidden: int = 2
) -> list:
  """Torch ``gram_merge``, ``cls_merge``, ``kshot_rw`` (K > 1) -> `LearnerEnsemble` at ``dst``."""
  rules = keymaps.conv(f"{src}gram_merge", (*dst, "gram_merge"), bias=False)
  rules += keymaps.conv(f"{src}cls_merge", (*dst, "cls_merge"), bias=False)
  if shot > 1:
    if kshot_hidden > 0:
      rules += keymaps.conv(f"{src}kshot_rw.0", (*dst, "kshot_rw", "conv_0"))
      rules += keymaps.conv(f"{src}kshot_rw.2", (*dst, "kshot_rw", "conv_1"))
    else:
      rules += keymaps.conv(f"{src}kshot_rw", (*dst, "kshot_rw", "conv"), bias=False)
  return rules
