"""Prototype pieces of SSP (ECCV'22) and PAHNet (ICCV'25), NHWC.

SSP (fanq15/SSP `model/SSP_matching.py`, spec ssp.md §2-§3):

* `ssp_masked_average` - prototype of a label mask: the mask is resized
  bilinearly (align_corners=True) to the feature size, ``sum f m / (sum m + 1e-5)``.
* `ssp_match` - ``10 * [cos(F, P_bg), cos(F, P_fg)]`` "logits" (torch
  ``F.cosine_similarity``, eps 1e-8); prototypes global ``[B, C]`` or
  position-wise ``[B, h, w, C]``.
* `self_support_prototypes` - SSP's data-dependent self-support prototypes
  (threshold sets with a top-k fallback, local background prototypes), written
  with masks and fixed shapes so it jits.

PAHNet (tianyu-zou/PAHNet, spec pahnet.md §1.3-§1.4, §3.1, §5.2):

* `prototype_prior` / `select_prior` - the prototype-based prior (FG prior and
  FG-BG contrast per shot, per-sample choice between two feature levels).
* `PrototypeEnhanced` - PFE (prototype-guided feature enhancement).
* `asc_query_state` / `asc_mismatch` - the ambiguity-suppressing calibration
  (ASC) rules shared by the SCCAN and HDMNet variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.nn.layers import LayerNorm, Linear, Mlp
from fss_jax.ops.pooling import masked_average_pool
from fss_jax.ops.resize import resize_bilinear
from fss_jax.ops.similarity import cosine_similarity, cosine_similarity_matrix, minmax_normalize

# ---------------------------------------------------------------------------
# SSP
# ---------------------------------------------------------------------------


def ssp_masked_average(feat: jax.Array, mask: jax.Array, *, eps: float = 1e-5) -> jax.Array:
  """SSP's masked average pooling.

  Args:
    feat: [B, h, w, C] features.
    mask: [B, H, W] float 0/1 label mask at image resolution (resized here,
      bilinear align_corners=True).
    eps: added to the mask area.

  Returns:
    [B, C].
  """
  m = resize_bilinear(mask[..., None].astype(feat.dtype), feat.shape[1:3], align_corners=True)
  return masked_average_pool(feat, m, eps=eps)


def ssp_match(feat: jax.Array, fg: jax.Array, bg: jax.Array, *, scale: float = 10.0) -> jax.Array:
  """SSP's matching function ``scale * [cos(F, bg), cos(F, fg)]``.

  Args:
    feat: [B, h, w, C].
    fg, bg: [B, C] (global) or [B, h, w, C] (position-wise) prototypes.

  Returns:
    [B, h, w, 2] (channel 0 background).
  """
  as_map = lambda p: p[:, None, None, :] if p.ndim == 2 else p
  sim_fg = cosine_similarity(feat, as_map(fg), axis=-1, eps=1e-8)
  sim_bg = cosine_similarity(feat, as_map(bg), axis=-1, eps=1e-8)
  return jnp.stack([sim_bg, sim_fg], axis=-1) * scale


def _selection(prob: jax.Array, threshold: float, topk: int) -> jax.Array:
  """``prob > threshold`` per row, or the `topk` largest entries when that set is empty.

  prob [B, N] -> float mask [B, N].
  """
  above = prob > threshold
  _, idx = jax.lax.top_k(prob, topk)  # [B, k]
  top = jnp.sum(jax.nn.one_hot(idx, prob.shape[1], dtype=prob.dtype), axis=1) > 0
  return jnp.where(jnp.any(above, axis=1, keepdims=True), above, top).astype(prob.dtype)


def self_support_prototypes(
  feat: jax.Array,
  logits: jax.Array,
  *,
  fg_threshold: float = 0.7,
  bg_threshold: float = 0.6,
  topk: int = 12,
  temperature: float = 2.0,
) -> dict[str, jax.Array]:
  """SSP's ``SSP_func``: self-support prototypes from a query prediction.

  Per episode: ``P = softmax(logits)``; S_fg = {n: P_fg[n] > fg_threshold}
  (empty -> the `topk` most confident positions), S_bg likewise with P_bg.
  ``fg``/``bg`` are the means of the query features over S_fg / S_bg;
  ``bg_local[x] = sum_{n in S_bg} softmax_n(temperature * cos(f_x, f_n)) f_n``
  (features normalised without eps). The selection carries no gradient.

  Args:
    feat: [B, h, w, C] query features.
    logits: [B, h, w, 2] matching logits (channel 0 background).

  Returns:
    {"fg": [B, C], "bg": [B, C], "bg_local": [B, h, w, C], "fg_count": [B],
    "bg_count": [B], "fg_above": [B] (positions above the FG threshold; 0 means
    the top-k fallback was used), "bg_above": [B]}.
  """
  b, h, w, c = feat.shape
  n = h * w
  f = feat.reshape(b, n, c)
  prob = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1).reshape(b, n, 2))
  sel_fg = _selection(prob[..., 1], fg_threshold, topk)
  sel_bg = _selection(prob[..., 0], bg_threshold, topk)
  count_fg = jnp.sum(sel_fg, axis=1)
  count_bg = jnp.sum(sel_bg, axis=1)
  hp = jax.lax.Precision.HIGHEST
  fg = jnp.einsum("bnc,bn->bc", f, sel_fg, precision=hp) / count_fg[:, None]
  bg = jnp.einsum("bnc,bn->bc", f, sel_bg, precision=hp) / count_bg[:, None]
  fn = f / jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True))
  sim = jnp.einsum("bxc,bnc->bxn", fn, fn) * temperature  # [B, N, N]
  sim = jnp.where(sel_bg[:, None, :] > 0, sim, -jnp.inf)
  local = jnp.einsum("bxn,bnc->bxc", jax.nn.softmax(sim, axis=-1), f)
  return {
    "fg": fg,
    "bg": bg,
    "bg_local": local.reshape(b, h, w, c),
    "fg_count": count_fg,
    "bg_count": count_bg,
    "fg_above": jnp.sum(prob[..., 1] > fg_threshold, axis=1),
    "bg_above": jnp.sum(prob[..., 0] > bg_threshold, axis=1),
  }


# ---------------------------------------------------------------------------
# PAHNet prototype-based prior
# ---------------------------------------------------------------------------


def prototype_prior(
  query_feat: jax.Array,
  support_feat: jax.Array,
  support_mask: jax.Array,
  output_size: Sequence[int],
  *,
  eps: float = 1e-7,
  area_eps: float = 5e-4,
) -> dict[str, jax.Array]:
  """PAHNet's ``generate_prior_proto`` for one feature level (pahnet.md §1.3).

  Per shot k: ``g = WGAP(S_k, M_k)``, ``h = WGAP(S_k, 1 - M_k)``;
  ``a(x) = cos(Fq(x), g)``, ``b(x) = cos(Fq(x), h)`` (``<a, b> / (|a||b| + eps)``);
  min-max normalised per image, resized (bilinear, align_corners=True) to
  `output_size`; contrast ``c = max(a_hat - b_hat, 0)``.

  Args:
    query_feat: [B, n, n', C] query features (backbone resolution).
    support_feat: [B, K, r, r', C] support features.
    support_mask: [B, K, r, r', 1] soft support masks at the support size.
    output_size: (o, o') of the priors.

  Returns:
    {"fg": [B, K, o, o'], "bg": [B, K, o, o'], "corr": [B, K, o, o'],
    "fg_max": [B, K] (raw max cosine), "corr_max": [B, K]}.
  """
  b, k = support_feat.shape[:2]
  c = query_feat.shape[-1]
  sf = support_feat.reshape(b * k, *support_feat.shape[2:])
  sm = support_mask.reshape(b * k, *support_mask.shape[2:])
  g = masked_average_pool(sf, sm, eps=area_eps).reshape(b, k, c)
  bgp = masked_average_pool(sf, 1.0 - sm, eps=area_eps).reshape(b, k, c)
  q = query_feat.reshape(b, -1, c)  # [B, N, C]
  sim_fg = cosine_similarity_matrix(q, g, eps=eps, eps_mode="product")  # [B, N, K]
  sim_bg = cosine_similarity_matrix(q, bgp, eps=eps, eps_mode="product")
  fg_max = jnp.max(sim_fg, axis=1)  # [B, K]
  nh, nw = query_feat.shape[1:3]

  def to_map(s):
    s = minmax_normalize(s, axis=1, eps=eps).reshape(b, nh, nw, k)
    return jnp.transpose(
      resize_bilinear(s, tuple(output_size), align_corners=True), (0, 3, 1, 2)
    )  # [B, K, o, o']

  fg, bg = to_map(sim_fg), to_map(sim_bg)
  corr = jnp.maximum(fg - bg, 0.0)
  return {
    "fg": fg,
    "bg": bg,
    "corr": corr,
    "fg_max": fg_max,
    "corr_max": jnp.max(corr.reshape(b, k, -1), axis=-1),
  }


def select_prior(
  low: dict[str, jax.Array], high: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per sample and shot, the level with the larger maximum (strict ``<``: ties keep `low`).

  Args:
    low, high: `prototype_prior` outputs of layer4 and of feature 5.

  Returns:
    (prior [B, o, o', 2] = [mean_k FG, mean_k contrast], decisions
    {"fg": [B, K] bool, "corr": [B, K] bool} - True where `high` was taken).
  """
  use_fg = low["fg_max"] < high["fg_max"]
  use_corr = low["corr_max"] < high["corr_max"]
  fg = jnp.where(use_fg[..., None, None], high["fg"], low["fg"]).mean(axis=1)
  corr = jnp.where(use_corr[..., None, None], high["corr"], low["corr"]).mean(axis=1)
  return jnp.stack([fg, corr], axis=-1), {"fg": use_fg, "corr": use_corr}


# ---------------------------------------------------------------------------
# PFE
# ---------------------------------------------------------------------------


def _wgap_tokens(x: jax.Array, m: jax.Array, eps: float = 5e-4) -> jax.Array:
  """Weighted GAP over tokens: x [B, N, C], m [B, N] -> [B, C]."""
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("bnc,bn->bc", x, m, precision=hp) / (jnp.sum(m, axis=1)[:, None] + eps)


class PrototypeEnhanced(nn.Module):
  """PAHNet's ``PrototypeEnhanced`` (PFE), pahnet.md §1.4.

  Support FG/BG prototypes are pooled from the projected support tokens; the
  query pseudo mask is the softmax of ``10 * [cos(k, bg), cos(k, fg)]``; two
  query FG prototypes (pooled with the pseudo mask and with the predictor map)
  are fused with the support one (weight ``(cos + 1) / 2``) and injected into
  both streams. The output residual is added to the *normalised* inputs
  (reference quirk).

  Attributes:
    dim: token width d.
    mlp_ratio: FFN hidden / d (4).
    ln_eps: LayerNorm eps (1e-5).
  """

  dim: int
  mlp_ratio: int = 4
  ln_eps: float = 1e-5

  @nn.compact
  def __call__(
    self, x: jax.Array, y: jax.Array, mask: jax.Array, prob: jax.Array, hw: tuple[int, int]
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the PFE.

    Args:
      x: [B, N, d] query tokens on the `hw` grid (N = h * w, row-major).
      y: [B, Ns, d] support tokens (all shots, shot-major).
      mask: [B, Ns] or [B, Ns, 1] support mask.
      prob: [B, h, w] predictor foreground probability (or [B, N]).
      hw: the query grid.

    Returns:
      (x_out [B, N, d], y_out [B, Ns, d], pseudo mask [B, h, w, 2] (softmax,
      channel 0 background)).
    """
    b, n, d = x.shape
    norm1 = LayerNorm(epsilon=self.ln_eps, name="norm1")
    norm2 = LayerNorm(epsilon=self.ln_eps, name="norm2")
    lin = lambda name, f=d: Linear(f, use_bias=False, name=name)
    m = mask.reshape(b, -1).astype(x.dtype)
    p = prob.reshape(b, -1).astype(x.dtype)
    xn, yn = norm1(x), norm1(y)
    sq = lin("q")(yn)  # support
    kq = lin("k")(xn)  # query
    vq = lin("v")(xn)
    fg = _wgap_tokens(sq, m)
    bg = _wgap_tokens(sq, 1.0 - m)
    z_fg = cosine_similarity(kq, fg[:, None, :], eps=1e-8) * 10.0
    z_bg = cosine_similarity(kq, bg[:, None, :], eps=1e-8) * 10.0
    pseudo = jax.nn.softmax(jnp.stack([z_bg, z_fg], axis=-1), axis=-1)  # [B, N, 2]

    def fuse(weights):
      u = _wgap_tokens(vq, weights)
      s = (cosine_similarity(u, fg, eps=1e-8)[:, None] + 1.0) / 2.0
      return s * fg + (1.0 - s) * u  # [B, d]

    p1, p2 = fuse(pseudo[..., 1]), fuse(p)

    def inject(t, prefix):
      cat = lambda a, proto: jnp.concatenate(
        [a, jnp.broadcast_to(proto[:, None, :], a.shape)], axis=-1
      )
      t1 = lin(f"proj_{prefix}1")(cat(t, p1))
      t2 = lin(f"proj_{prefix}2")(cat(t, p2))
      return lin(f"final_proj_{prefix}")(jnp.concatenate([t1, t2], axis=-1)) + t

    xm, ym = inject(x, "x"), inject(y, "y")
    hidden = d * self.mlp_ratio
    x_out = xn + Mlp(hidden, name="ffn_x")(norm2(xm))
    y_out = yn + Mlp(hidden, name="ffn_y")(norm2(ym))
    return x_out, y_out, pseudo.reshape(b, hw[0], hw[1], 2)


def prototype_enhanced_keymap(src: str, dst: tuple[str, ...]) -> list:
  """Torch ``PrototypeEnhanced`` keys under ``src`` -> `PrototypeEnhanced` at ``dst``."""
  rules = keymaps.layer_norm(f"{src}.norm1", (*dst, "norm1"))
  rules += keymaps.layer_norm(f"{src}.norm2", (*dst, "norm2"))
  for name in (
    "q",
    "k",
    "v",
    "proj_x1",
    "proj_y1",
    "proj_x2",
    "proj_y2",
    "final_proj_x",
    "final_proj_y",
  ):
    rules += keymaps.linear(f"{src}.{name}", (*dst, name), bias=False)
  for ffn in ("ffn_x", "ffn_y"):
    for fc in ("fc1", "fc2"):
      rules += keymaps.linear(f"{src}.{ffn}.{fc}", (*dst, ffn, fc))
  return rules


# ---------------------------------------------------------------------------
# ASC
# ---------------------------------------------------------------------------


def asc_query_state(
  prob: jax.Array, *, low: float = 0.3, high: float = 0.7
) -> tuple[jax.Array, jax.Array]:
  """ASC's query side: (r = min(p, 1), t = 0 if r < low, 1 if r > high, r otherwise)."""
  r = jnp.minimum(prob, 1.0)
  t = jnp.where(r < low, 0.0, jnp.where(r > high, 1.0, r)).astype(prob.dtype)
  return r.astype(prob.dtype), t


def asc_support_state(mask: jax.Array, *, threshold: float = 0.5) -> jax.Array:
  """ASC's support side: the mask binarised at ``>= threshold`` (float 0/1)."""
  return (mask >= threshold).astype(mask.dtype)


def asc_mismatch(t: jax.Array, s: jax.Array) -> jax.Array:
  """``t_i + s_j == 1`` (query FG vs support BG or the reverse): t [..., Lq], s [..., Lk]
  -> bool [..., Lq, Lk]. The exact float test of the reference (t is 0, 1 or in
  [low, high], s is 0 or 1)."""
  return (t[..., :, None] + s[..., None, :]) == 1.0
