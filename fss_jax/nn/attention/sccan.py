"""SCCA: SCCAN's self-calibrated cross attention transformer, and PAHNet's SCCANPlus
block (Flax linen, NHWC).

The pieces compose, so that SCCAN and PAHNet's SCCANPlus share them:

* `align_support_windows` — patch alignment: for every query window, the index
  of the support window whose masked mean token is most similar (argmax, first
  index on ties) to the query window's mean token.
* `ScaledCosineAttention` — multi-head attention over ``[x ; support]`` keys,
  scaled dot product against the query's own tokens and plain cosine against
  the support tokens, fused in one softmax. Without support tokens it is
  ordinary scaled-dot-product self-attention. Optional additive / multiplicative
  logit terms let variants mask or re-weight the two halves.
* `SCCABlock` — one (optionally shifted) block: shared LayerNorm, alignment,
  query cross attention, support window self-attention, two MLPs
  (`fss_jax.nn.layers.Mlp`: Linear -> exact GELU -> Linear).
* `SCCAPlusBlock` — PAHNet's block (pahnet.md §3): PFE first, then the SCCA
  block with ASC in the query cross attention and FG/BG-restricted support
  self-attention.
* `SCCATransformer` — the stack of blocks (shift 0 / half a window alternately)
  plus the output LayerNorm on the query stream; the block class is a field
  (`SCCAPlusTransformer` = the same stack of `SCCAPlusBlock`).

Parameter names follow the official module names (``norm1``, ``attn_q.q``,
``attn_q.kv``, ``attn_q.proj``, ``mlp_q.fc1``, ...), blocks are ``blocks_{n}``.
Each block returns its intermediates last, as a dict (``mid``, big_vision's ``out``):
``window_index`` [B, n_windows] and its alignment ``window_scores`` [B, n_windows,
n_windows], the residual branches (``attn_q_out`` / ``attn_s_out``
windows [B, n_windows * T, C], ``mlp_q_out``, ``mlp_s_out``) and the block outputs
``q_out``, ``s_out`` (tokens [B, H * W, C]); `SCCAPlusBlock` also ``pe_q`` (PFE query
tokens) and ``pseudo`` (its pseudo mask). The transformer returns them as
``{"blocks_<n>": ...}``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.nn.layers import LayerNorm, Linear, Mlp
from fss_jax.nn.prototype import PrototypeEnhanced, asc_mismatch, asc_query_state, asc_support_state
from fss_jax.ops import windows as W


def _l2norm(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))


def align_support_windows(
  q: jnp.ndarray,
  s: jnp.ndarray,
  s_mask: jnp.ndarray,
  window: int,
  *,
  area_eps: float = 5e-4,
  cos_eps: float = 1e-7,
  return_scores: bool = False,
):
  """Patch alignment (SCCAN ``generate_indices``): one support window per query window.

  For query window j and support window i:
  ``score[i, j] = valid_i * (cos(s_i, q_j) + 1) / 2`` with ``q_j`` the plain window
  mean of the query tokens, ``s_i = sum(s * m) / (sum(m) + area_eps)`` the masked
  window mean of the support tokens and ``valid_i = (sum(m) + area_eps != area_eps)``
  (in float32, as the reference compares). The index is the argmax over i; ties
  (e.g. a support without foreground) go to the first index, as torch's CPU max.

  Args:
    q: [B, H, W, C] query tokens (already layer-normed / padded).
    s: [B, H, W, C] support tokens.
    s_mask: [B, H, W, 1] soft support mask.
    window: window side.
    return_scores: also return the score matrix [B, n_support, n_query].

  Returns:
    index [B, nH * nW] int32 (support window per query window), and the scores
    when asked.
  """
  area = window * window
  q_proto = W.window_mean(q, window)  # [B, Nq, C]
  m_area = W.window_mean(s_mask, window) * area + area_eps  # [B, Ns, 1]
  s_proto = W.window_mean(s * s_mask, window) * area / m_area  # [B, Ns, C]
  valid = (m_area != jnp.asarray(area_eps, m_area.dtype)).astype(q.dtype)
  dots = jnp.einsum("bic,bjc->bij", s_proto, q_proto)
  norms = _l2norm(s_proto) * jnp.swapaxes(_l2norm(q_proto), 1, 2)  # [B, Ns, Nq]
  cos = dots / (norms + cos_eps)
  scores = (cos + 1) / 2 * valid
  index = jnp.argmax(scores, axis=1).astype(jnp.int32)
  return (index, scores) if return_scores else index


class ScaledCosineAttention(nn.Module):
  """Window attention with scaled-dot self keys and cosine support keys.

  Keys/values are ``[x ; support]`` through one shared ``kv`` projection
  (output channels ``[k | v]``, head channel = head * head_dim + d). Logits are
  ``<q, k> / sqrt(head_dim)`` for the query's own keys and
  ``<q, k> / (|q| |k| + cos_eps)`` for the support keys (no temperature), then
  one softmax over all keys.

  Attributes:
    dim: channels C.
    num_heads: heads (C must be divisible).
    qkv_bias: biases on q and kv.
    cos_eps: added to the product of norms in the cosine half.
  """

  dim: int
  num_heads: int
  qkv_bias: bool = True
  cos_eps: float = 1e-7

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    support: jnp.ndarray | None = None,
    *,
    self_bias: jnp.ndarray | None = None,
    cross_weight: jnp.ndarray | None = None,
    cross_bias: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """Attends from `x` to ``[x ; support]``.

    Args:
      x: [N, Lq, C] query tokens (N = batch x windows).
      support: [N, Ls, C] support tokens, or None for plain self-attention.
      self_bias: optional additive term for the self logits, broadcastable to
        [N, heads, Lq, Lq] (e.g. -inf masks).
      cross_weight: optional factor multiplying the cosine logits,
        broadcastable to [N, heads, Lq, Ls].
      cross_bias: optional additive term for the cosine logits (after the factor).

    Returns:
      [N, Lq, C].
    """
    n, lq, c = x.shape
    h = self.num_heads
    if c != self.dim or c % h:
      raise ValueError(f"tokens have {c} channels; expected dim={self.dim} divisible by {h} heads")
    d = c // h
    y = x if support is None else jnp.concatenate([x, support], axis=1)
    lk = y.shape[1]
    q = Linear(c, use_bias=self.qkv_bias, name="q")(x).reshape(n, lq, h, d)
    kv = Linear(2 * c, use_bias=self.qkv_bias, name="kv")(y).reshape(n, lk, 2, h, d)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)  # [N, h, Lq, Lk]
    self_logits = logits[..., :lq] * (d**-0.5)
    if self_bias is not None:
      self_logits = self_logits + self_bias
    if support is None:
      logits = self_logits
    else:
      q_norm = jnp.transpose(_l2norm(q), (0, 2, 1, 3))  # [N, h, Lq, 1]
      k_norm = jnp.transpose(_l2norm(k[:, lq:]), (0, 2, 3, 1))  # [N, h, 1, Ls]
      cross = logits[..., lq:] / (q_norm * k_norm + self.cos_eps)
      if cross_weight is not None:
        cross = cross_weight * cross
      if cross_bias is not None:
        cross = cross + cross_bias
      logits = jnp.concatenate([self_logits, cross], axis=-1)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", attn, v).reshape(n, lq, c)
    return Linear(c, name="proj")(out)


def layer_norm(name: str) -> LayerNorm:
  """PyTorch-default LayerNorm (eps 1e-5; keeps a bfloat16 input's dtype)."""
  return LayerNorm(epsilon=1e-5, name=name)


class ShiftedWindowStreams:
  """What the SCCA blocks share (SCCAN's and PAHNet's): half-window padding, patch
  alignment, window merging, and each stream's residual + MLP tail. For modules with
  `window` and `shifted` fields."""

  if TYPE_CHECKING:  # provided by the flax module this is mixed into
    window: int
    shifted: bool

  def _pad(self, x):
    return W.pad_half_window(x, self.window) if self.shifted else x

  def _aligned_windows(self, qn, sn, mp, mid: dict):
    """Windows of the normed, padded maps qn, sn [B, H', W', C] and the support window
    aligned to each query window (mask mp [B, H', W', 1]); records ``window_index``
    [B, N] and its ``window_scores`` [B, N, N] (support x query) in ``mid``.

    Returns (index [B, N], query windows, support windows, aligned support windows,
    each [B, N, T, C]).
    """
    index, mid["window_scores"] = align_support_windows(qn, sn, mp, self.window, return_scores=True)
    mid["window_index"] = index
    s_win = W.window_partition(sn, self.window)
    return index, W.window_partition(qn, self.window), s_win, W.gather_windows(s_win, index)

  def _unwindow(self, windows, hp, wp, h, w):
    x = W.window_merge(windows, hp, wp)
    return W.crop_half_window(x, self.window, h, w) if self.shifted else x

  def _residual_mlp(self, x, o, mlp, norm, padded_hw, mid: dict, stream: str):
    """``x + crop(merge(o))``, then ``+ mlp(norm(.))``; records ``attn_/mlp_<stream>_out``
    in ``mid``.

    Args:
      x: [B, H, W, C] the stream before the attention.
      o: [B * N, T, C] attention output per window (N windows of T tokens).
      mlp, norm: the stream's MLP and the block's second LayerNorm.
      padded_hw: (H', W') of the padded token grid the windows came from.
      mid: the block's intermediates (written into).
      stream: "q" or "s" (the intermediates' names).
    """
    b, h, w, c = x.shape
    o = o.reshape(b, -1, o.shape[1], c)  # [B, N, T, C]
    mid[f"attn_{stream}_out"] = o.reshape(b, -1, c)
    hp, wp = padded_hw
    x = x + self._unwindow(o, hp, wp, h, w)
    m = mlp(norm(x))
    mid[f"mlp_{stream}_out"] = m.reshape(b, h * w, c)
    return x + m


class SCCABlock(ShiftedWindowStreams, nn.Module):
  """One SCCA block on [B, H, W, C] maps (H, W multiples of the window).

  ``q, s = LN1(q), LN1(s)`` (shared norm), zero-pad by half a window when
  `shifted`, align support windows to query windows, query attention over
  ``[query window ; aligned support window]``, support window self-attention
  on the un-aligned windows, crop, residuals and MLPs (shared ``norm2``).

  Attributes:
    dim, num_heads, window: token width, heads, window side.
    shifted: pad by half a window (SCCAN's odd blocks).
    mlp_ratio: MLP hidden width / dim.
  """

  dim: int = 256
  num_heads: int = 8
  window: int = 8
  shifted: bool = False
  mlp_ratio: float = 1.0

  def setup(self):
    self.norm1 = layer_norm("norm1")
    self.norm2 = layer_norm("norm2")
    self.attn_q = ScaledCosineAttention(self.dim, self.num_heads)
    self.attn_s = ScaledCosineAttention(self.dim, self.num_heads)
    hidden = int(self.dim * self.mlp_ratio)
    self.mlp_q = Mlp(hidden)
    self.mlp_s = Mlp(hidden)

  def __call__(self, q: jnp.ndarray, s: jnp.ndarray, s_mask: jnp.ndarray):
    """Runs the block.

    Args:
      q: [B, H, W, C] query tokens.
      s: [B, H, W, C] support tokens.
      s_mask: [B, H, W, 1] soft support mask (the same for every block).

    Returns:
      (q [B, H, W, C], s [B, H, W, C], intermediates: ``window_index`` [B, n_windows]
      int32 and the streams' tokens, see the module docstring).
    """
    b, h, w, c = q.shape
    qn = self._pad(self.norm1(q))
    sn = self._pad(self.norm1(s))
    mp = self._pad(s_mask.astype(q.dtype))
    hp, wp = qn.shape[1:3]
    mid: dict[str, jnp.ndarray] = {}
    index, q_win, s_win, s_aligned = self._aligned_windows(qn, sn, mp, mid)  # [B, N, T, C]
    nw, t = q_win.shape[1:3]
    o = self.attn_q(q_win.reshape(b * nw, t, c), s_aligned.reshape(b * nw, t, c))
    q = self._residual_mlp(q, o, self.mlp_q, self.norm2, (hp, wp), mid, "q")
    u = self.attn_s(s_win.reshape(b * nw, t, c))
    s = self._residual_mlp(s, u, self.mlp_s, self.norm2, (hp, wp), mid, "s")
    mid["q_out"], mid["s_out"] = q.reshape(b, h * w, c), s.reshape(b, h * w, c)
    return q, s, mid


class SCCAPlusBlock(ShiftedWindowStreams, nn.Module):
  """One SCCANPlus block (pahnet.md §3): PFE, then SCCA with ASC.

  Query stream: ``LN1`` -> (pad when `shifted`) -> window alignment -> attention
  over ``[query window ; aligned support window]`` whose cosine half is
  ``R_ij * cos_ij - inf * mismatch_ij`` (``R`` from `asc_proj_q` / `asc_proj_s`,
  torch ``attn_q.proj_q`` / ``attn_q.proj_s``) -> residual on the PFE output
  -> MLP. Support stream: window self-attention restricted to FG-FG / BG-BG
  pairs of the binarised mask -> residual -> MLP.

  Attributes as `SCCABlock`.
  """

  dim: int = 256
  num_heads: int = 8
  window: int = 8
  shifted: bool = False
  mlp_ratio: float = 1.0

  @nn.compact
  def __call__(self, q: jnp.ndarray, s: jnp.ndarray, s_mask: jnp.ndarray, prob: jnp.ndarray):
    """q, s [B, H, W, C]; s_mask [B, H, W, 1] soft support mask; prob [B, H, W]
    predictor FG probability -> (q, s [B, H, W, C], intermediates: those of `SCCABlock`
    plus ``pe_q`` [B, H * W, C] and the pseudo mask ``pseudo`` [B, H, W, 2])."""
    b, h, w, c = q.shape
    heads, d = self.num_heads, c // self.num_heads
    # PFE: prototype-enhanced tokens and the pseudo mask.
    qt, st, pseudo = PrototypeEnhanced(c, name="pe")(
      q.reshape(b, h * w, c), s.reshape(b, h * w, c), s_mask.reshape(b, h * w), prob, (h, w)
    )
    q, s = qt.reshape(b, h, w, c), st.reshape(b, h, w, c)
    norm1, norm2 = layer_norm("norm1"), layer_norm("norm2")
    qn, sn = self._pad(norm1(q)), self._pad(norm1(s))
    mp = self._pad(s_mask.astype(q.dtype))
    pp = self._pad(prob[..., None].astype(q.dtype))
    hp, wp = qn.shape[1:3]
    mid: dict[str, jnp.ndarray] = {"pe_q": qt, "pseudo": pseudo}
    index, q_win, s_win, s_al = self._aligned_windows(qn, sn, mp, mid)  # [B, N, T, C]
    m_win = W.window_partition(mp, self.window)[..., 0]  # [B, N, T]
    p_win = W.window_partition(pp, self.window)[..., 0]
    m_al = jnp.take_along_axis(m_win, index[:, :, None], axis=1)
    nw, t = q_win.shape[1:3]
    flat = lambda a: a.reshape(b * nw, *a.shape[2:])

    # ASC: calibrated cosine logits of the support half.
    r, state = asc_query_state(flat(p_win))  # [BN, T]
    sj = asc_support_state(flat(m_al))
    mismatch = jnp.where(asc_mismatch(state, sj), -jnp.inf, 0.0)[:, None]  # [BN, 1, T, T]
    e = Linear(c, name="asc_proj_q")(r[..., None]).reshape(b * nw, t, heads, d)
    f = Linear(c, name="asc_proj_s")(sj[..., None]).reshape(b * nw, t, heads, d)
    reweight = jnp.einsum("nqhd,nkhd->nhqk", e, f)
    o = ScaledCosineAttention(c, heads, name="attn_q")(
      flat(q_win), flat(s_al), cross_weight=reweight, cross_bias=mismatch
    )
    hidden = int(c * self.mlp_ratio)
    q = self._residual_mlp(q, o, Mlp(hidden, name="mlp_q"), norm2, (hp, wp), mid, "q")

    # Support self-attention, FG-FG / BG-BG only (un-aligned windows).
    u = asc_support_state(flat(m_win))
    self_bias = jnp.where(asc_mismatch(u, u), -jnp.inf, 0.0)[:, None]
    o = ScaledCosineAttention(c, heads, name="attn_s")(flat(s_win), self_bias=self_bias)
    s = self._residual_mlp(s, o, Mlp(hidden, name="mlp_s"), norm2, (hp, wp), mid, "s")
    mid["q_out"], mid["s_out"] = q.reshape(b, h * w, c), s.reshape(b, h * w, c)
    return q, s, mid


class SCCATransformer(nn.Module):
  """SCCAN's cross swin transformer: `depth` blocks + output LayerNorm.

  Even blocks use unshifted windows, odd blocks the half-window zero-pad shift.
  The support stream is updated block to block and discarded; the query stream
  is returned after ``norm0``, with the blocks' intermediates.

  Attributes:
    dim: token width (256).
    depth: number of blocks (8).
    num_heads: heads (8).
    window: window side (8).
    mlp_ratio: MLP hidden / dim (1).
    remat: recompute each block in the backward (``nn.remat``; same parameters).
    block: the block class (a Module class, `nn.remat` wraps it): built as
      ``block(dim, num_heads, window, shifted=, mlp_ratio=, name="blocks_<n>")`` and
      called ``(q, s, s_mask, *block_args) -> (q, s, intermediates)``. `SCCABlock` (SCCAN) or
      `SCCAPlusBlock` (PAHNet).
  """

  dim: int = 256
  depth: int = 8
  num_heads: int = 8
  window: int = 8
  mlp_ratio: float = 1.0
  remat: bool = False
  block: Callable[..., nn.Module] = SCCABlock

  @nn.compact
  def __call__(self, q: jnp.ndarray, s: jnp.ndarray, s_mask: jnp.ndarray, *block_args):
    """Runs the blocks.

    Args:
      q, s: [B, H, W, C] query / support tokens (H, W multiples of the window).
      s_mask: [B, H, W, 1] soft support mask.
      *block_args: the block's further inputs (`SCCAPlusBlock`: the predictor's FG
        probability [B, H, W]).

    Returns:
      (query tokens [B, H, W, C], intermediates ``{"blocks_<n>": the block's}``: window
      indices [B, n_windows], for `SCCAPlusBlock` also the pseudo masks [B, H, W, 2]).
    """
    h, w = q.shape[1:3]
    W.window_grid(h, w, self.window)  # checks the size
    block = nn.remat(self.block) if self.remat else self.block
    mid = {}
    for i in range(self.depth):
      q, s, mid[f"blocks_{i}"] = block(
        self.dim,
        self.num_heads,
        self.window,
        shifted=bool(i % 2),
        mlp_ratio=self.mlp_ratio,
        name=f"blocks_{i}",
      )(q, s, s_mask, *block_args)
    return layer_norm("norm0")(q), mid


# PAHNet's SCCANPlus transformer: the same stack of `SCCAPlusBlock`s.
SCCAPlusTransformer = functools.partial(SCCATransformer, block=SCCAPlusBlock)
