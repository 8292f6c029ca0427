"""HDMNet's hierarchical dense-matching transformer (Pbihao/HDMNet `model/Transformer.py`)
and PAHNet's HDMNetPlus variant (`HDMNet_PAHNet/model/TransformerPlus.py`).

Building blocks, smallest first, each usable on its own:

* `self_attention` / `cross_attention` / `calibrated_cross_attention`: the score
  rules of ``MaskMultiHeadAttention`` (HDMNet's two, PAHNet's ASC cross rule) as
  pure functions on per-head tensors.
* `MaskedMultiHeadAttention`: the four bias-free 64x64 projections around them
  (+ PAHNet's ``proj_q`` / ``proj_s`` when called with the predictor probability).
* `EfficientAttention`: optional spatial reduction of the keys/values
  (conv sr x sr, stride sr, + LayerNorm) + attention + dropout + residual.
* `MixFFN`: conv1x1 -> depthwise conv3x3 -> GELU (erf) -> dropout -> conv1x1 -> dropout.
* `EncoderLayer`: pre-norm ``x + attn(LN1(x), LN1(src))``, ``x + ffn(LN2(x))``.
* `PatchEmbed`, `DownStage` (patch-embed + 2 self-attention layers + LN),
  `ConvModule` (conv3x3 no bias + BN + ReLU), `ParseBlock`, `MetaClassifier`.
* `HierarchicalTransformer`: self-attention down-sampling path (60 -> 30 -> 15)
  shared by query and supports, then cross-attention matching coarse to fine
  with the prior, fused by bilinear (align_corners=False) up-sampling.
* `TransformerPlus`: PAHNet's version (FG/BG bias in the support self-attention,
  a PFE before each matching layer, ASC cross-attention, pseudo masks).
* `correlation_distillation_loss`: the coarse-to-fine KL on the correlation maps.

Tokens are ``[B, L, C]`` with L row-major over the grid (token = y * W + x),
maps NHWC. The numerics follow the mmcv/mmseg blocks of the reference:
LayerNorm eps 1e-6 with two-pass variance, exact-erf GELU, BN always in
inference mode (the reference freezes every BN, see hdmnet.md §4.5),
dropout only when ``train``. Blocks with intermediates return them last as a dict
(``mid``; the transformers' is nested by stage: ``down_0/self1_query``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax import keymaps
from fss_jax.nn.layers import BatchNorm2d, Conv2d, LayerNorm, Linear, kaiming_normal_fan_out
from fss_jax.nn.prototype import PrototypeEnhanced, asc_mismatch, asc_query_state, asc_support_state
from fss_jax.ops.losses import mean_of
from fss_jax.ops.resize import resize_bilinear, resize_nearest
from fss_jax.ops.softmax import softmax_dot_backward


def layer_norm(eps: float, name: str) -> LayerNorm:
  """torch.nn.LayerNorm semantics (two-pass variance; keeps a bfloat16 input's dtype)."""
  return LayerNorm(epsilon=eps, name=name)


def frozen_bn(name: str) -> BatchNorm2d:
  """The transformer's (Sync)BatchNorms: always running statistics (hdmnet.md §4.5)."""
  return BatchNorm2d(use_running_average=True, name=name)


def tokens_to_map(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """``[B, h*w, C]`` -> ``[B, h, w, C]``."""
  return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])


def map_to_tokens(x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
  """``[B, h, w, C]`` -> (``[B, h*w, C]``, (h, w))."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w, c), (h, w)


# ---------------------------------------------------------------------------
# Attention score rules (per head: q [B, Lq, H, d], k / v [B, Lk, H, d]).
# ---------------------------------------------------------------------------


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """``[B, L, H*d]`` -> ``[B, L, H, d]`` (head h = channels h*d .. (h+1)*d - 1)."""
  b, l, c = x.shape
  return x.reshape(b, l, heads, c // heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """``[B, L, H, d]`` -> ``[B, L, H*d]``."""
  b, l, h, d = x.shape
  return x.reshape(b, l, h * d)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch ``F.normalize(x, dim=-1, eps)``: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def self_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None
) -> jax.Array:
  """Scaled dot-product attention, softmax over keys.

  Args:
    q: ``[B, Lq, H, d]``; k, v: ``[B, Lk, H, d]``.
    bias: optional additive score bias broadcastable to ``[B, H, Lq, Lk]``.

  Returns:
    ``[B, Lq, H, d]``.
  """
  d = q.shape[-1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (math.sqrt(d) + 1e-9)
  if bias is not None:
    scores = scores + bias
  attn = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", attn, v)


def cosine_scores(q: jax.Array, k: jax.Array, temperature: float = 0.1) -> jax.Array:
  """``<q/|q|, k/|k|> / temperature`` -> ``[B, H, Lq, Lk]`` (range +-1/temperature)."""
  return jnp.einsum("bqhd,bkhd->bhqk", l2_normalize(q), l2_normalize(k)) / temperature


def cross_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *, temperature: float = 0.1
) -> tuple[jax.Array, jax.Array]:
  """HDMNet's masked cosine cross-attention.

  The softmax runs over the QUERY axis (each support token distributes its mass
  over the query positions), then background support tokens are zeroed; rows do
  not sum to one (reference behaviour). The correlation map is the mean over
  foreground keys of the scaled cosine, averaged over heads.

  Args:
    q: ``[B, Lq, H, d]``; k, v: ``[B, Lk, H, d]``.
    key_mask: ``[B, Lk]`` 0/1 (support foreground).
    temperature: cosine temperature (0.1).

  Returns:
    (``[B, Lq, H, d]``, correlation map ``[B, Lq]``).
  """
  m = key_mask.astype(q.dtype)
  scores = cosine_scores(q, k, temperature)
  attn = softmax_dot_backward(scores, -2) * m[:, None, None, :]
  y = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
  corr = jnp.einsum("bhqk,bk->bhq", scores, m) / (jnp.sum(m, axis=-1)[:, None, None] + 1e-9)
  return y, jnp.mean(corr, axis=1)


def calibrated_cross_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  query_state: jax.Array,
  key_state: jax.Array,
  reweight: jax.Array,
  *,
  temperature: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
  """PAHNet's ASC cross-attention (HDMNetPlus, pahnet.md §5.2 (d)).

  ``l = cos(q, k) / temperature`` per head, scores ``R * l``, softmax over the
  QUERY axis (as `cross_attention`), weights of FG-BG mismatched pairs set to 0.
  The correlation map averages ``l`` with the label-consistency weights (2 for
  agreeing hard pairs, 0 for mismatches, ``t`` / ``1 + t`` for soft queries)
  over keys, then over heads.

  Args:
    q: ``[B, Lq, H, d]``; k, v: ``[B, Lk, H, d]``.
    query_state: ``[B, Lq]`` t of `fss_jax.nn.prototype.asc_query_state`.
    key_state: ``[B, Lk]`` binarised support mask s.
    reweight: ``[B, Lq, Lk]`` the learned calibration R (shared by the heads).
    temperature: cosine temperature (0.1).

  Returns:
    (``[B, Lq, H, d]``, correlation map ``[B, Lq]``).
  """
  t, s = query_state, key_state
  ell = cosine_scores(q, k, temperature)  # [B, H, Lq, Lk]
  attn = softmax_dot_backward(reweight[:, None] * ell, -2)
  attn = jnp.where(asc_mismatch(t, s)[:, None], 0.0, attn)
  y = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
  hy = t[:, :, None] + s[:, None, :]
  wts = jnp.where(hy == 0, 2.0, jnp.where(hy == 1, 0.0, hy))  # [B, Lq, Lk]
  corr = jnp.einsum("bhqk,bqk->bhq", ell, wts) / (jnp.sum(wts, -1)[:, None] + 1e-9)
  return y, jnp.mean(corr, axis=1)


class MaskedMultiHeadAttention(nn.Module):
  """``MaskMultiHeadAttention``: bias-free q/k/v/o projections around the score rules.

  Call with ``key_mask`` for the cross-attention rule (returns its correlation
  map), without for plain self-attention (returns None as the map). With
  ``key_mask`` and ``query_prob`` (PAHNet's HDMNetPlus) the cross rule is
  `calibrated_cross_attention` with ``R_ij = <r_i w_q, s_j w_s>`` (``proj_q``,
  ``proj_s``: Linear 1 -> dim, no bias, created only then).
  """

  dim: int = 64
  heads: int = 2
  temperature: float = 0.1

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    source: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    query_prob: jax.Array | None = None,
    bias: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    """x ``[B, Lq, C]``, source ``[B, Lk, C]``; key_mask ``[B, Lk]`` (support mask),
    query_prob ``[B, Lq]`` (predictor FG probability), bias (self-attention scores)
    -> (``[B, Lq, C]``, map ``[B, Lq]`` | None)."""
    dense = lambda n: Linear(self.dim, use_bias=False, name=n)
    q = split_heads(dense("linear_q")(x), self.heads)
    k = split_heads(dense("linear_k")(source), self.heads)
    v = split_heads(dense("linear_v")(source), self.heads)
    if key_mask is None:
      y, corr = self_attention(q, k, v, bias=bias), None
    elif query_prob is None:
      y, corr = cross_attention(q, k, v, key_mask, temperature=self.temperature)
    else:
      r, t = asc_query_state(query_prob.astype(x.dtype))
      s = asc_support_state(key_mask.astype(x.dtype))
      proj = lambda n, a: dense(n)(a[..., None])
      reweight = jnp.einsum("bqc,bkc->bqk", proj("proj_q", r), proj("proj_s", s))
      y, corr = calibrated_cross_attention(q, k, v, t, s, reweight, temperature=self.temperature)
    return dense("linear_o")(merge_heads(y)), corr


class EfficientAttention(nn.Module):
  """mmseg ``EfficientMultiheadAttention``: spatial reduction of K/V, attention, residual.

  ``sr > 1`` reshapes the source with the *query* grid ``hw``, applies conv
  sr x sr / stride sr (+bias) and LayerNorm, giving the key/value tokens.
  Output ``identity + dropout(attn_out)``.
  """

  dim: int = 64
  heads: int = 2
  sr: int = 1
  dropout: float = 0.1
  ln_eps: float = 1e-6
  attention_cls: Any = MaskedMultiHeadAttention

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    hw: tuple[int, int],
    *,
    identity: jax.Array,
    source: jax.Array | None = None,
    train: bool = False,
    attn_kwargs: dict | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    kv = x if source is None else source
    if self.sr > 1:
      kv = tokens_to_map(kv, hw)
      kv = Conv2d(self.dim, self.sr, self.sr, name="sr")(kv)
      kv, _ = map_to_tokens(kv)
      kv = layer_norm(self.ln_eps, "norm")(kv)
    out, corr = self.attention_cls(dim=self.dim, heads=self.heads, name="attn")(
      x, kv, **(attn_kwargs or {})
    )
    out = nn.Dropout(self.dropout)(out, deterministic=not train)
    return identity + out, corr


class MixFFN(nn.Module):
  """SegFormer Mix-FFN without its residual: ``[B, L, C]`` -> ``[B, L, C]``."""

  dim: int = 64
  hidden: int = 256
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int], *, train: bool = False) -> jax.Array:
    y = tokens_to_map(x, hw)
    y = Conv2d(self.hidden, 1, name="fc1")(y)
    y = Conv2d(self.hidden, 3, padding=1, groups=self.hidden, name="pe_conv")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    y = Conv2d(self.dim, 1, name="fc2")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return map_to_tokens(y)[0]


class EncoderLayer(nn.Module):
  """Pre-norm transformer layer (self- or cross-attention) with Mix-FFN.

  Self mode: ``x + attn(LN1(x))``; cross mode (``source`` given): ``x +
  attn(LN1(x), LN1(source))`` with the same LN1. Then ``x + ffn(LN2(x))``.
  """

  dim: int = 64
  heads: int = 2
  sr: int = 1
  mlp_ratio: int = 4
  dropout: float = 0.1
  ln_eps: float = 1e-6
  attention_cls: Any = MaskedMultiHeadAttention

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    hw: tuple[int, int],
    source: jax.Array | None = None,
    train: bool = False,
    attn_kwargs: dict | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    """x ``[B, L, C]`` (grid hw), source ``[B, Ls, C]`` -> (``[B, L, C]``, corr | None).

    Positional arguments as listed (`encoder_layer_cls` with remat needs them so).
    """
    norm1 = layer_norm(self.ln_eps, "norm1")
    src = None if source is None else norm1(source)
    x, corr = EfficientAttention(
      self.dim, self.heads, self.sr, self.dropout, self.ln_eps, self.attention_cls, name="attn"
    )(norm1(x), hw, identity=x, source=src, train=train, attn_kwargs=attn_kwargs)
    y = layer_norm(self.ln_eps, "norm2")(x)
    x = x + MixFFN(self.dim, self.dim * self.mlp_ratio, self.dropout, name="ffn")(
      y, hw, train=train
    )
    return x, corr


def encoder_layer_cls(remat: bool = False) -> Any:
  """`EncoderLayer`, or with ``remat`` the same layer under ``nn.remat`` (jax.checkpoint).

  The parameter tree is the same either way. Call the result positionally:
  ``layer(x, hw, source, train, attn_kwargs)`` (hw and train are static).
  """
  return nn.remat(EncoderLayer, static_argnums=(2, 4)) if remat else EncoderLayer


class PatchEmbed(nn.Module):
  """mmseg PatchEmbed: conv k x k (stride, padding, bias) -> tokens -> LayerNorm."""

  dim: int = 64
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """``[B, H, W, C]`` -> (``[B, h*w, dim]``, (h, w))."""
    y = Conv2d(self.dim, self.kernel, self.stride, self.padding, name="projection")(x)
    tokens, hw = map_to_tokens(y)
    return layer_norm(self.ln_eps, "norm")(tokens), hw


class DownStage(nn.Module):
  """One down-sampling stage: PatchEmbed, ``depth`` self-attention layers, LayerNorm."""

  dim: int = 64
  heads: int = 2
  sr: int = 1
  kernel: int = 1
  stride: int = 1
  depth: int = 2
  mlp_ratio: int = 4
  dropout: float = 0.1
  ln_eps: float = 1e-6
  attention_cls: Any = MaskedMultiHeadAttention
  remat: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    train: bool = False,
    attn_kwargs: dict | None = None,
  ) -> tuple[jax.Array, tuple[int, int], dict[str, jax.Array]]:
    """``[N, H, W, C]`` -> (tokens ``[N, h*w, dim]``, (h, w), intermediates: the tokens
    after ``patch_embed`` and after each layer, ``self1``, ``self2``, ...)."""
    x, hw = PatchEmbed(
      self.dim, self.kernel, self.stride, self.stride // 2, self.ln_eps, name="patch_embed"
    )(x)
    mid = {"patch_embed": x}
    layer = encoder_layer_cls(self.remat)
    for j in range(self.depth):
      x, _ = layer(
        self.dim,
        self.heads,
        self.sr,
        self.mlp_ratio,
        self.dropout,
        self.ln_eps,
        self.attention_cls,
        name=f"layer_{j}",
      )(x, hw, None, train, attn_kwargs)
      mid[f"self{j + 1}"] = x
    return layer_norm(self.ln_eps, "norm")(x), hw, mid


def _tagged(mid: dict[str, jax.Array], tag: str) -> dict[str, jax.Array]:
  """``{name + tag: value}``: a stage's intermediates for the query (``_query``) or the
  supports (``_support``)."""
  return {f"{name}{tag}": v for name, v in mid.items()}


class ConvModule(nn.Module):
  """mmcv ConvModule(conv3x3 without bias, BN, ReLU); BN in inference mode."""

  features: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv2d(
      self.features, 3, padding=1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv"
    )(x)
    return nn.relu(frozen_bn("bn")(x))


class ParseBlock(nn.Module):
  """``parse_layers[i]``: conv1x1, BN, conv3x3, BN, conv1x1, BN, ReLU (no inner ReLUs)."""

  dim: int = 64
  hidden: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = frozen_bn("bn_0")(Conv2d(self.hidden, 1, name="conv_0")(x))
    x = frozen_bn("bn_1")(Conv2d(self.hidden, 3, padding=1, name="conv_1")(x))
    x = frozen_bn("bn_2")(Conv2d(self.dim, 1, name="conv_2")(x))
    return nn.relu(x)


class MetaClassifier(nn.Module):
  """Transformer ``cls``: conv1x1 -> BN -> conv3x3 -> BN -> conv1x1 (no ReLU anywhere)."""

  dim: int = 64
  hidden: int = 256
  num_classes: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = frozen_bn("bn_0")(Conv2d(self.hidden, 1, name="conv_0")(x))
    x = frozen_bn("bn_1")(Conv2d(self.hidden, 3, padding=1, name="conv_1")(x))
    return Conv2d(self.num_classes, 1, name="conv_2")(x)


class HierarchicalTransformer(nn.Module):
  """HDMNet ``MixVisionTransformer``.

  Attributes mirror the reference constructor defaults (3 stages, dim 64,
  heads (2, 4, 8), patch kernels (1, 3, 3) / strides (1, 2, 2), spatial
  reduction (4, 2, 1), 2 matching heads, MLP ratio 4, dropout 0.1);
  ``remat`` recomputes every transformer layer in the backward (`encoder_layer_cls`).
  """

  shot: int = 1
  dim: int = 64
  heads: Sequence[int] = (2, 4, 8)
  match_heads: int = 2
  kernels: Sequence[int] = (1, 3, 3)
  strides: Sequence[int] = (1, 2, 2)
  sr_ratios: Sequence[int] = (4, 2, 1)
  depth: int = 2
  mlp_ratio: int = 4
  dropout: float = 0.1
  ln_eps: float = 1e-6
  num_classes: int = 2
  remat: bool = False

  def _down_stage(self, i: int) -> DownStage:
    """Stage i of the down-sampling path (query and supports share it)."""
    return DownStage(
      self.dim,
      self.heads[i],
      self.sr_ratios[i],
      self.kernels[i],
      self.strides[i],
      self.depth,
      self.mlp_ratio,
      self.dropout,
      self.ln_eps,
      remat=self.remat,
      name=f"down_{i}",
    )

  def _match_layer(self, i: int) -> Any:
    """The cross-attention layer of matching level i (call it positionally)."""
    return encoder_layer_cls(self.remat)(
      self.dim, self.match_heads, 1, self.mlp_ratio, self.dropout, self.ln_eps, name=f"match_{i}"
    )

  def _fuse(
    self,
    i: int,
    x: jax.Array,
    corr: jax.Array,
    hw: tuple[int, int],
    prior: jax.Array,
    fused: jax.Array | None,
    mid: dict[str, Any],
  ) -> jax.Array:
    """Matching level i after its cross-attention (x ``[B, h*w, dim]``, corr ``[B, h*w]``):
    ``ConvModule([x ; prior])`` -> parse block, added to the coarser levels' fusion
    (resized bilinearly, align_corners=False). Returns the fusion ``[B, h, w, dim]``;
    records ``match<i>_cross_x`` / ``_cross_weight`` / ``_conv`` and ``parse<i>`` in
    ``mid``."""
    mid[f"match{i}_cross_x"], mid[f"match{i}_cross_weight"] = x, corr
    x = ConvModule(self.dim, name=f"match_conv_{i}")(
      jnp.concatenate([tokens_to_map(x, hw), prior], axis=-1)
    )
    mid[f"match{i}_conv"] = x
    parse = ParseBlock(self.dim, self.dim * 4, name=f"parse_{i}")
    if fused is None:
      fused = mid[f"parse{i}"] = parse(x)
    else:
      fused = resize_bilinear(fused, hw, align_corners=False)
      p = mid[f"parse{i}"] = parse(x + fused)
      fused = fused + p
    return fused

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    support: jax.Array,
    support_mask: jax.Array,
    similarity: jax.Array,
    *,
    train: bool = False,
  ) -> tuple[jax.Array, list[jax.Array], dict[str, Any]]:
    """Runs the down-sampling and matching paths.

    Args:
      query: ``[B, H, W, dim]`` merged query features.
      support: ``[B*K, H, W, dim]`` merged support features (row b*K + k).
      support_mask: ``[B*K, Hm, Wm]`` binary support masks at input resolution.
      similarity: ``[B, H, W, S]`` prior (unscaled).
      train: dropout on.

    Returns:
      (meta logits ``[B, H, W, num_classes]``, correlation maps coarse to fine
      ``[[B, h2, w2], [B, h1, w1], [B, h0, w0]]``, intermediates: per stage
      ``down_<i>`` {patch_embed, self<j>}_{query,support}, ``down<i>_norm_query`` /
      ``_support``, and per matching level those of `_fuse`).
    """
    b, k = query.shape[0], self.shot
    n = len(self.heads)
    mid: dict[str, Any] = {}
    q_tokens, s_tokens, grids, masks, priors = [], [], [], [], []
    q, s = query, support
    for i in range(n):
      stage = self._down_stage(i)
      if q.shape[1:] == s.shape[1:]:
        # Query and supports share the stage and never interact in it: one batched call.
        ts, hw, both = stage(jnp.concatenate([q, s], axis=0), train=train)
        qt, st, shw = ts[:b], ts[b:], hw
        q_mid = {name: v[:b] for name, v in both.items()}
        s_mid = {name: v[b:] for name, v in both.items()}
      else:
        qt, hw, q_mid = stage(q, train=train)
        st, shw, s_mid = stage(s, train=train)
      mid[f"down_{i}"] = {**_tagged(q_mid, "_query"), **_tagged(s_mid, "_support")}
      mid[f"down{i}_norm_query"], mid[f"down{i}_norm_support"] = qt, st
      m = resize_nearest(support_mask[..., None].astype(query.dtype), shw)
      masks.append(m.reshape(b, k * shw[0] * shw[1]))  # shot-major keys
      priors.append(resize_bilinear(similarity, hw, align_corners=True))
      q_tokens.append(qt)
      s_tokens.append(st.reshape(b, k * st.shape[1], self.dim))
      grids.append(hw)
      q, s = tokens_to_map(qt, hw), tokens_to_map(st, shw)

    fused, corr_maps = None, []
    for i in reversed(range(n)):
      hw = grids[i]
      x, corr = self._match_layer(i)(q_tokens[i], hw, s_tokens[i], train, {"key_mask": masks[i]})
      corr_maps.append(corr.reshape(b, hw[0], hw[1]))
      fused = self._fuse(i, x, corr, hw, priors[i], fused, mid)
    assert fused is not None  # at least one level
    logits = MetaClassifier(self.dim, self.dim * 4, self.num_classes, name="cls")(fused)
    return logits, corr_maps, mid


def _patch_grid(n: int, kernel: int, stride: int) -> int:
  """Output side of `PatchEmbed` (padding stride // 2) on an n-wide input."""
  return (n + 2 * (stride // 2) - kernel) // stride + 1


class TransformerPlus(HierarchicalTransformer):
  """PAHNet's HDMNetPlus ``MixVisionTransformer`` (pahnet.md §5.2).

  HDMNet's `DownStage`s; the support self-attention of stages with spatial
  reduction gets a -100 bias between FG and BG tokens (mask resized nearest to
  the stage grid, then bilinearly to the reduced K/V grid, both >= 0.5); at
  every matching level a PFE (predictor map resized bilinearly) precedes the
  ASC cross-attention (predictor map resized nearest); then HDMNet's
  ConvModule with the prior, parse blocks and classifier.

  Attributes: those of `HierarchicalTransformer` (inherited).
  """

  @nn.compact
  def __call__(  # type: ignore[override]  # PAHNet's variant also takes the predictor's map
    self, query, support, support_mask, similarity, prob, *, train: bool = False
  ):
    """query [B, H, W, dim], support [B*K, H, W, dim] (row b*K + k), support_mask
    [B*K, Hm, Wm] binary at input size, similarity [B, H, W, 2], prob [B, s, s]
    -> (meta logits [B, H, W, 2], corr maps coarse to fine, pseudo masks coarse to fine
    [B, h_i, w_i, 2], intermediates as `HierarchicalTransformer`'s plus ``match<i>_pe_x``
    / ``_pe_y`` / ``_pe_pseudo``)."""
    b, k = query.shape[0], self.shot
    mid: dict[str, Any] = {}
    levels: list[dict[str, Any]] = []
    q, s = query, support
    for i in range(len(self.heads)):
      stage = self._down_stage(i)
      shw = tuple(_patch_grid(n, self.kernels[i], self.strides[i]) for n in s.shape[1:3])
      m = resize_nearest(support_mask[..., None].astype(query.dtype), shw)  # [B*K, h, w, 1]
      kwargs = None
      if self.sr_ratios[i] > 1:  # FG/BG bias on the reduced K/V grid
        sr = self.sr_ratios[i]
        kv = tuple((n - sr) // sr + 1 for n in shw)
        u_q = asc_support_state(m.reshape(b * k, -1))
        u_kv = asc_support_state(resize_bilinear(m, kv, align_corners=True).reshape(b * k, -1))
        kwargs = {
          "bias": jnp.where((u_q[:, :, None] + u_kv[:, None, :]) == 1.0, -100.0, 0.0)[:, None]
        }
      qt, hw, q_mid = stage(q, train=train)
      st, shw2, s_mid = stage(s, train=train, attn_kwargs=kwargs)
      assert shw2 == shw, (shw2, shw)
      mid[f"down_{i}"] = {**_tagged(q_mid, "_query"), **_tagged(s_mid, "_support")}
      mid[f"down{i}_norm_query"], mid[f"down{i}_norm_support"] = qt, st
      p_near = resize_nearest(prob[..., None], hw).reshape(b, -1)
      p_bil = resize_bilinear(prob[..., None], hw, align_corners=True)[..., 0]
      levels.append(
        dict(
          q=qt,
          s=st.reshape(b, k * st.shape[1], self.dim),
          hw=hw,
          mask=m.reshape(b, -1),
          p_near=p_near,
          p_bil=p_bil,
          prior=resize_bilinear(similarity, hw, align_corners=True),
        )
      )
      q, s = tokens_to_map(qt, hw), tokens_to_map(st, shw)

    fused, corr_maps, pseudo_masks = None, [], []
    for i in reversed(range(len(self.heads))):
      lv = levels[i]
      hw = lv["hw"]
      xq, xs, pseudo = PrototypeEnhanced(self.dim, self.mlp_ratio, name=f"match_pe_{i}")(
        lv["q"], lv["s"], lv["mask"], lv["p_bil"], hw
      )
      mid[f"match{i}_pe_x"], mid[f"match{i}_pe_y"], mid[f"match{i}_pe_pseudo"] = xq, xs, pseudo
      pseudo_masks.append(pseudo)
      x, corr = self._match_layer(i)(
        xq, hw, xs, train, {"key_mask": lv["mask"], "query_prob": lv["p_near"]}
      )
      corr_maps.append(corr.reshape(b, *hw))
      fused = self._fuse(i, x, corr, hw, lv["prior"], fused, mid)
    assert fused is not None  # at least one level
    logits = MetaClassifier(self.dim, self.dim * 4, self.num_classes, name="cls")(fused)
    return logits, corr_maps, pseudo_masks, mid


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def correlation_distillation_terms(
  corr_maps: Sequence[jax.Array], query_mask: jax.Array, *, eps: float = 1e-12
) -> list[jax.Array]:
  """Coarse-to-fine KL(teacher || student) of each correlation map (hdmnet.md §5.2).

  The ground truth teaches the coarsest map (foreground 1, everything else,
  ignore included, -1e9, bilinearly down-sampled with align_corners=False);
  each finer map is taught by the previous map (stop-gradient).

  Args:
    corr_maps: ``[B, h_i, w_i]`` maps, coarse to fine.
    query_mask: ``[B, H, W]`` labels (1 = foreground).
    eps: log epsilon.

  Returns:
    one scalar per map: the batch-mean KL (the official ``distil`` calls, in order).
  """
  teacher = jnp.where(query_mask == 1, 1.0, -1e9).astype(jnp.float32)
  terms = []
  for w in corr_maps:
    bsz, h, wd = w.shape
    if teacher.shape[1:] != (h, wd):
      teacher = resize_bilinear(teacher[..., None], (h, wd), align_corners=False)[..., 0]
    t = jax.nn.softmax(teacher.reshape(bsz, -1), axis=-1)
    s = jax.nn.softmax(w.reshape(bsz, -1).astype(jnp.float32), axis=-1)
    kl = jnp.sum(t * jnp.log(t + eps) - t * jnp.log(s + eps), axis=-1)
    terms.append(jnp.mean(kl))
    teacher = jax.lax.stop_gradient(w.astype(jnp.float32))
  return terms


def correlation_distillation_loss(
  corr_maps: Sequence[jax.Array], query_mask: jax.Array, *, eps: float = 1e-12
) -> jax.Array:
  """Mean over the maps of `correlation_distillation_terms` (HDMNet's ``aux_loss1``)."""
  terms = correlation_distillation_terms(corr_maps, query_mask, eps=eps)
  return mean_of(terms)


# ---------------------------------------------------------------------------
# Key maps (official PyTorch names -> Flax paths)
# ---------------------------------------------------------------------------


def encoder_layer_keymap(src: str, dst: tuple[str, ...], sr: int = 1) -> list:
  """``TransformerEncoderLayer`` keys under ``src`` -> `EncoderLayer` at ``dst``."""
  rules = keymaps.layer_norm(f"{src}.norm1", (*dst, "norm1"))
  for p in ("q", "k", "v", "o"):
    rules += keymaps.linear(
      f"{src}.attn.attn.linear_{p}", (*dst, "attn", "attn", f"linear_{p}"), bias=False
    )
  if sr > 1:
    rules += keymaps.conv(f"{src}.attn.sr", (*dst, "attn", "sr"))
    rules += keymaps.layer_norm(f"{src}.attn.norm", (*dst, "attn", "norm"))
  rules += keymaps.layer_norm(f"{src}.norm2", (*dst, "norm2"))
  for i, name in ((0, "fc1"), (1, "pe_conv"), (4, "fc2")):
    rules += keymaps.conv(f"{src}.ffn.layers.{i}", (*dst, "ffn", name))
  return rules


def _sequential_keymap(src: str, dst: tuple[str, ...], layout: Sequence[str]) -> list:
  """Keys of an nn.Sequential whose entries are 'conv', 'bn' or '-' (no parameters)."""
  rules, nc, nb = [], 0, 0
  for i, kind in enumerate(layout):
    if kind == "conv":
      rules += keymaps.conv(f"{src}.{i}", (*dst, f"conv_{nc}"))
      nc += 1
    elif kind == "bn":
      rules += keymaps.bn(f"{src}.{i}", (*dst, f"bn_{nb}"))
      nb += 1
  return rules


def hierarchical_transformer_keymap(
  src: str, dst: tuple[str, ...], sr_ratios: Sequence[int] = (4, 2, 1), depth: int = 2
) -> list:
  """``MixVisionTransformer`` keys (prefix ``src``) -> `HierarchicalTransformer` at ``dst``."""
  rules = []
  for i, sr in enumerate(sr_ratios):
    d = f"{src}.down_sample_layers.{i}"
    rules += keymaps.conv(f"{d}.0.projection", (*dst, f"down_{i}", "patch_embed", "projection"))
    rules += keymaps.layer_norm(f"{d}.0.norm", (*dst, f"down_{i}", "patch_embed", "norm"))
    for j in range(depth):
      rules += encoder_layer_keymap(f"{d}.{j + 1}", (*dst, f"down_{i}", f"layer_{j}"), sr)
    rules += keymaps.layer_norm(f"{d}.{depth + 1}", (*dst, f"down_{i}", "norm"))
    m = f"{src}.match_layers.{i}"
    rules += encoder_layer_keymap(f"{m}.0", (*dst, f"match_{i}"), 1)
    rules += keymaps.conv(f"{m}.1.conv", (*dst, f"match_conv_{i}", "conv"), bias=False)
    rules += keymaps.bn(f"{m}.1.bn", (*dst, f"match_conv_{i}", "bn"))
    rules += _sequential_keymap(
      f"{src}.parse_layers.{i}",
      (*dst, f"parse_{i}"),
      ("conv", "bn", "conv", "bn", "conv", "bn", "-"),
    )
  rules += _sequential_keymap(f"{src}.cls", (*dst, "cls"), ("conv", "bn", "conv", "bn", "conv"))
  return rules
