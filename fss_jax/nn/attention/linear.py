"""Query-support alignment by attention: JC²A's linear attention and its Table 4 alternatives.

JC²A (arXiv 2211.01310, Eq. 3 / Eq. 9) aligns support features to every query
position with the "efficient attention" factorisation

    P = ReLU(Q) · (softmax(K)ᵀ · V)          softmax over the support positions, per channel,

which costs O(N·C²) instead of O(N²·C). Table 4 of the paper compares it with
normal (softmax) attention, a normal linear attention and a cosine
interaction; all four are here, as pure functions and as one Flax module with
the Q/K/V projections (`AlignmentAttention`).

Every operator takes the query tokens ``q [B, Nq, C]`` and support keys /
values with a *group* axis, ``k, v [B, G, Nk, C]``: the operator runs
independently per group and the G results are averaged. Point-to-point
alignment (P2P) has G = 1 (all support positions); point-to-block alignment
(P2B) has G = m² — one group per within-block offset j, the Nk = top-k selected
blocks as tokens — which is Eq. 9's ``(1/m²) Σ_{m×m}`` (see jc2a.md §4.2).

Choices the paper does not fix (jc2a.md §4, §14) are parameters:
* ``"ours"``: no 1/√d scaling, no masking (masked-out support positions carry
  K = V = 0: they take softmax mass but add nothing to the context).
* ``"softmax"`` (NA): ``softmax(Q Kᵀ · scale) V``, scale 1/√C by default.
* ``"linear"`` (NLA): ``Φ(Q) · (softmax(K)ᵀ V)`` with Φ = BatchNorm (the paper's
  Eq. 2 text: "batch normalization ... and softmax ... are commonly used"), or
  Katharopoulos et al.'s ``elu + 1`` feature map with its normaliser.
* ``"cosine"``: ``Q̂ · (K̂ᵀ V) / Nk`` with L2-normalised tokens, i.e. every query
  position gets the cosine-similarity-weighted mean of the support values
  (linear cost, no nonlinearity, no softmax).

`HPAM` is JC²A's Hybrid Prototype Alignment Module over a feature pyramid:
P2P (one group over all support positions) + P2B (the top-k mask-covered
support windows, `fss_jax.ops.windows`), with position embeddings (Eq. 3-10).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.nn.layers import BatchNorm2d, Linear, torch_default_kernel_init
from fss_jax.ops import windows

OPERATORS = ("ours", "softmax", "linear", "cosine")
LINEAR_FEATURE_MAPS = ("batchnorm", "elu")
FUSIONS = ("add", "multiply", "concat")
POS_EMBEDS = ("spatial", "channel", "none")


def _grouped(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  if k.ndim == 3:
    k, v = k[:, None], v[:, None]
  if k.ndim != 4 or k.shape != v.shape:
    raise ValueError(
      f"keys / values must be [B, Nk, C] or [B, G, Nk, C] of equal shape, got "
      f"{tuple(k.shape)} and {tuple(v.shape)}"
    )
  return k, v


def factorized_attention(phi_q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """``phi_q · mean_g(softmax_n(K_g)ᵀ V_g)``: the linear-cost core shared by "ours" and NLA.

  Args:
    phi_q: [B, Nq, C] query tokens after the query feature map (ReLU for JC²A).
    k: [B, Nk, C] or [B, G, Nk, C] support keys; softmax over Nk per channel and group.
    v: same shape as k, support values (width D may differ from C).

  Returns:
    [B, Nq, D].
  """
  k, v = _grouped(k, v)
  a = jax.nn.softmax(k, axis=2)  # [B, G, Nk, C]
  context = jnp.einsum("bgnc,bgnd->bcd", a, v) / k.shape[1]  # [B, C, D]
  return jnp.einsum("bqc,bcd->bqd", phi_q, context)


def relu_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """JC²A's linear attention, Eq. 3: ``ReLU(Q) · (softmax(K)ᵀ V)`` ([B, Nq, C] -> [B, Nq, D])."""
  return factorized_attention(jax.nn.relu(q), k, v)


def softmax_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None
) -> jax.Array:
  """Normal attention ``mean_g softmax(Q K_gᵀ · scale) V_g``; softmax over the Nk support tokens.

  Args:
    q: [B, Nq, C]; k, v: [B, Nk, C] or [B, G, Nk, C].
    scale: logit scale; None means 1/sqrt(C).

  Returns:
    [B, Nq, D]. Memory O(B·G·Nq·Nk).
  """
  k, v = _grouped(k, v)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqc,bgnc->bgqn", q, k) * scale
  attn = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bgqn,bgnd->bqd", attn, v) / k.shape[1]


def elu_linear_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-6
) -> jax.Array:
  """Katharopoulos et al. linear attention with ``φ = elu + 1``, per group, averaged over groups.

  ``out_i = φ(q_i)ᵀ (Σ_n φ(k_n) v_nᵀ) / (φ(q_i)ᵀ Σ_n φ(k_n) + eps)``; shapes as `softmax_attention`.
  """
  k, v = _grouped(k, v)
  fq = jax.nn.elu(q) + 1.0
  fk = jax.nn.elu(k) + 1.0
  kv = jnp.einsum("bgnc,bgnd->bgcd", fk, v)
  num = jnp.einsum("bqc,bgcd->bgqd", fq, kv)
  den = jnp.einsum("bqc,bgc->bgq", fq, fk.sum(axis=2))[..., None] + eps
  return (num / den).mean(axis=1)


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-8) -> jax.Array:
  """``x / max(|x|, eps)`` (torch ``F.normalize``) with a finite gradient at x = 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cosine_interaction(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Cosine interaction ``mean_g Q̂ (K̂_gᵀ V_g) / Nk`` (tokens L2-normalised over channels).

  Equals, per query token, the mean over support tokens of cos(q, k_n) · v_n. Zero
  (masked-out) keys stay zero. Shapes as `softmax_attention`.
  """
  k, v = _grouped(k, v)
  qn, kn = l2_normalize(q, eps=eps), l2_normalize(k, eps=eps)
  context = jnp.einsum("bgnc,bgnd->bcd", kn, v) / (k.shape[1] * k.shape[2])
  return jnp.einsum("bqc,bcd->bqd", qn, context)


class AlignmentAttention(nn.Module):
  """W_Q / W_K / W_V projections followed by one alignment operator (JC²A HPAM core).

  Call the same instance for P2P and P2B (and for every pyramid level) to share
  the projections, as jc2a.md §4 chooses.

  Attributes:
    dim: projection width C (256).
    operator: "ours" | "softmax" | "linear" | "cosine" (Table 4).
    use_bias: projection biases (default off, so zero support features give
      exactly zero keys / values).
    softmax_scale: logit scale of "softmax"; None = 1/sqrt(dim).
    linear_feature_map: Φ of "linear": "batchnorm" (BatchNorm over the query
      tokens; needs a mutable ``batch_stats`` collection when ``train``) or "elu".
    kernel_init: projection initialiser (PyTorch's default).
  """

  dim: int = 256
  operator: str = "ours"
  use_bias: bool = False
  softmax_scale: float | None = None
  linear_feature_map: str = "batchnorm"
  kernel_init: Callable = torch_default_kernel_init

  def setup(self):
    if self.operator not in OPERATORS:
      raise ValueError(f"unknown alignment operator {self.operator!r}; choose one of {OPERATORS}")
    if self.operator == "linear" and self.linear_feature_map not in LINEAR_FEATURE_MAPS:
      raise ValueError(
        f"unknown linear_feature_map {self.linear_feature_map!r}; choose one of "
        f"{LINEAR_FEATURE_MAPS}"
      )
    dense = lambda name: Linear(
      self.dim, use_bias=self.use_bias, kernel_init=self.kernel_init, name=name
    )
    self.w_q, self.w_k, self.w_v = dense("w_q"), dense("w_k"), dense("w_v")
    if self.operator == "linear" and self.linear_feature_map == "batchnorm":
      self.phi_bn = BatchNorm2d(name="phi_bn")

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, train: bool = False) -> jax.Array:
    """Runs the operator on already projected tokens (q [B, Nq, C], k/v [B, (G,) Nk, C])."""
    if self.operator == "ours":
      return relu_softmax_attention(q, k, v)
    if self.operator == "softmax":
      return softmax_attention(q, k, v, scale=self.softmax_scale)
    if self.operator == "cosine":
      return cosine_interaction(q, k, v)
    if self.linear_feature_map == "elu":
      return elu_linear_attention(q, k, v)
    return factorized_attention(self.phi_bn(q, use_running_average=not train), k, v)

  def __call__(self, xq: jax.Array, xs: jax.Array, *, train: bool = False) -> jax.Array:
    """Aligns support tokens to query tokens.

    Args:
      xq: [B, Nq, Cin] query tokens.
      xs: [B, Nk, Cin] or [B, G, Nk, Cin] support tokens (groups averaged, see module doc).
      train: BatchNorm mode of the "linear" operator.

    Returns:
      [B, Nq, dim] aligned prototypes.
    """
    return self.attend(self.w_q(xq), self.w_k(xs), self.w_v(xs), train=train)


def fuse(a: jax.Array, b: jax.Array, how: str) -> jax.Array:
  """Combines two maps [..., C] / [..., C'] channel-wise: "add" | "multiply" | "concat"."""
  if how == "add":
    return a + b
  if how == "multiply":
    return a * b
  if how == "concat":
    return jnp.concatenate([a, b], axis=-1)
  raise ValueError(f"unknown fusion {how!r}; choose one of {FUSIONS}")


class HPAM(nn.Module):
  """Hybrid Prototype Alignment Module over a feature pyramid (JC²A, jc2a.md §4).

  Attributes:
    dim: feature width C.
    top_k: selected blocks per level (60, 20, 5, 3).
    block_size: m.
    use_p2p / use_p2b: the two alignments (at least one).
    fusion: P^d ∘ P^s when both are on: "add" (Eq. 10) | "multiply" | "concat".
    operator, softmax_scale, linear_feature_map: see `AlignmentAttention`.
    pos_embed: P2B position embeddings: "spatial" (p ∈ R^{s×s} per level, broadcast over
      channels), "channel" (R^{s×s×C}) or "none" (Table 4, "w/o PE").
    pos_embed_std: truncated-normal init std.
    share_projections: one W_Q/W_K/W_V for P2P and P2B (else two sets).
  """

  dim: int = 256
  top_k: Sequence[int] = (60, 20, 5, 3)
  block_size: int = 3
  use_p2p: bool = True
  use_p2b: bool = True
  fusion: str = "add"
  operator: str = "ours"
  softmax_scale: float | None = None
  linear_feature_map: str = "batchnorm"
  pos_embed: str = "spatial"
  pos_embed_std: float = 0.02
  share_projections: bool = True

  @nn.compact
  def __call__(
    self,
    queries: Sequence[jax.Array],
    supports: Sequence[jax.Array],
    masks: Sequence[jax.Array],
    *,
    train: bool = False,
  ) -> list[jax.Array]:
    """Aligned prototypes per level.

    Args:
      queries: per level q_l [B, s, s, C].
      supports: per level masked, pooled support features [B, s, s, C].
      masks: per level pooled support masks [B, s, s] (block importance).
      train: BatchNorm mode of the "linear" operator.

    Returns:
      per level P_aw [B, s, s, C] (2C for concat fusion).
    """
    if not (self.use_p2p or self.use_p2b):
      raise ValueError("HPAM needs use_p2p or use_p2b")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBEDS}")
    if len(self.top_k) < len(queries):
      raise ValueError(
        f"top_k {tuple(self.top_k)} has fewer entries than the {len(queries)} levels"
      )
    attn = functools.partial(
      AlignmentAttention,
      self.dim,
      self.operator,
      softmax_scale=self.softmax_scale,
      linear_feature_map=self.linear_feature_map,
    )
    p2p = attn(name="attn") if self.use_p2p else None
    if self.use_p2b:
      p2b = (
        p2p
        if (p2p is not None and self.share_projections)
        else attn(name="attn" if p2p is None else "attn_p2b")
      )
    init = nn.initializers.truncated_normal(self.pos_embed_std)
    blk = self.block_size
    outs = []
    for l, (q, sp, m) in enumerate(zip(queries, supports, masks)):
      b, h, w, c = q.shape
      xq = q.reshape(b, h * w, c)
      parts = []
      if p2p is not None:  # use_p2p
        parts.append(p2p(xq, sp.reshape(b, h * w, c), train=train))  # P^d (Eq. 3)
      if self.use_p2b:
        if self.pos_embed != "none":  # Eq. 4
          shape = (h, w) if self.pos_embed == "spatial" else (h, w, c)
          pq = self.param(f"pos_q_{l}", init, shape)
          ps = self.param(f"pos_s_{l}", init, shape)
          if self.pos_embed == "spatial":
            pq, ps = pq[..., None], ps[..., None]
          q, sp = q + pq, sp + ps
        # Eq. 5-7: m×m blocks (zero-padded), mask coverage per block, the top-k blocks.
        blocks = windows.window_partition(windows.pad_to_windows(sp, blk), blk)  # [B, n_b, m², C]
        coverage = windows.window_mean(windows.pad_to_windows(m[..., None], blk), blk)[..., 0]
        sel = windows.gather_windows(blocks, windows.top_windows(coverage, self.top_k[l]))
        # Eq. 9: per within-block offset j a softmax over the k blocks, mean over j.
        parts.append(p2b(q.reshape(b, h * w, c), sel.transpose(0, 2, 1, 3), train=train))
      out = parts[0] if len(parts) == 1 else fuse(parts[0], parts[1], self.fusion)
      outs.append(out.reshape(b, h, w, out.shape[-1]))
    return outs


__all__ = [
  "OPERATORS",
  "LINEAR_FEATURE_MAPS",
  "FUSIONS",
  "POS_EMBEDS",
  "AlignmentAttention",
  "HPAM",
  "fuse",
  "factorized_attention",
  "relu_softmax_attention",
  "softmax_attention",
  "elu_linear_attention",
  "cosine_interaction",
  "l2_normalize",
]
