"""Window ops (fss_jax.ops.windows) and the SCCA building blocks on tiny shapes.

References are direct numpy loops over pixels / windows, and a numpy transcription
of the official ``generate_indices`` and ``CrossWindowAttention`` arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fss_jax.nn.attention import sccan as scca
from fss_jax.ops import windows as W

jax.config.update("jax_default_matmul_precision", "highest")


def _np_partition(x: np.ndarray, ws: int) -> np.ndarray:
  b, h, w, c = x.shape
  nh, nw = h // ws, w // ws
  out = np.zeros((b, nh * nw, ws * ws, c), x.dtype)
  for j in range(nh * nw):
    wy, wx = divmod(j, nw)
    for t in range(ws * ws):
      ty, tx = divmod(t, ws)
      out[:, j, t] = x[:, wy * ws + ty, wx * ws + tx]
  return out


def test_partition_matches_pixel_loop_and_merge_inverts():
  x = np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype(np.float32)
  got = np.asarray(W.window_partition(jnp.asarray(x), 8))
  assert got.shape == (2, 6, 64, 3)
  np.testing.assert_array_equal(got, _np_partition(x, 8))
  back = np.asarray(W.window_merge(jnp.asarray(got), 16, 24))
  np.testing.assert_array_equal(back, x)


def test_window_index_order_is_row_major():
  # Every pixel holds its own (y, x); window j must start at (8 * (j // nW), 8 * (j % nW)).
  yy, xx = np.meshgrid(np.arange(16), np.arange(24), indexing="ij")
  x = np.stack([yy, xx], -1)[None].astype(np.float32)
  win = np.asarray(W.window_partition(jnp.asarray(x), 8))
  assert W.window_grid(16, 24, 8) == (2, 3)
  for j in range(6):
    np.testing.assert_array_equal(win[0, j, 0], [8 * (j // 3), 8 * (j % 3)])
    np.testing.assert_array_equal(win[0, j, 9], [8 * (j // 3) + 1, 8 * (j % 3) + 1])


def test_not_divisible_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of the window"):
    W.window_partition(jnp.zeros((1, 12, 16, 1)), 8)


def test_pad_half_window_is_4_per_side_and_crop_inverts():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 64, 2)).astype(np.float32))
  assert W.half_window_padding(8) == (4, 4)
  p = W.pad_half_window(x, 8)
  assert p.shape == (1, 72, 72, 2)
  pn = np.asarray(p)
  assert not pn[:, :4].any() and not pn[:, -4:].any()
  assert not pn[:, :, :4].any() and not pn[:, :, -4:].any()
  np.testing.assert_array_equal(pn[:, 4:68, 4:68], np.asarray(x))
  np.testing.assert_array_equal(np.asarray(W.crop_half_window(p, 8, 64, 64)), np.asarray(x))
  # 9 x 9 windows on the padded map, offset by 4 from the unshifted grid.
  assert W.window_partition(p, 8).shape == (1, 81, 64, 2)


def test_gather_windows_and_window_mean():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  win = W.window_partition(jnp.asarray(x), 8)
  idx = np.array([[3, 3, 0, 1], [2, 0, 0, 0]])
  got = np.asarray(W.gather_windows(win, jnp.asarray(idx)))
  ref = np.stack([np.asarray(win)[b, idx[b]] for b in range(2)])
  np.testing.assert_array_equal(got, ref)
  mean = np.asarray(W.window_mean(jnp.asarray(x), 8))
  ref = x.reshape(2, 2, 8, 2, 8, 3).mean(axis=(2, 4)).reshape(2, 4, 3)
  np.testing.assert_allclose(mean, ref, rtol=1e-6, atol=1e-6)


def test_pad_to_windows_and_top_windows():
  """JC²A's P2B pieces: bottom / right zero padding; stable top-k (ties: lower index first)."""
  x = jnp.ones((1, 8, 7, 2))
  p = np.asarray(W.pad_to_windows(x, 3))
  assert p.shape == (1, 9, 9, 2) and p[:, :8, :7].all()
  assert not p[:, 8:].any() and not p[:, :, 7:].any()
  assert W.pad_to_windows(x[..., 0], 3).shape == (1, 9, 9)  # any trailing axes
  assert W.pad_to_windows(x[:, :6, :6], 3).shape == (1, 6, 6, 2)  # already whole windows
  scores = jnp.asarray([[0.0, 2.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(np.asarray(W.top_windows(scores, 3)), [[1, 4, 3], [0, 1, 2]])
  assert W.top_windows(scores, 9).shape == (2, 5)


# -- patch alignment ---------------------------------------------------------------------------


def _np_generate_indices(q, s, m, ws, eps=5e-4, cos_eps=1e-7):
  """numpy transcription of the official generate_indices (NHWC inputs)."""
  qp = _np_partition(q, ws).mean(axis=2)  # [B, N, C]
  ma = (_np_partition(m, ws).mean(axis=2) * ws * ws + np.float32(eps)).astype(np.float32)
  sp = _np_partition(s * m, ws).mean(axis=2) * ws * ws / ma
  valid = (ma != np.float32(eps)).astype(np.float32)
  cos = np.einsum("bic,bjc->bij", sp, qp) / (
    np.linalg.norm(sp, axis=-1)[:, :, None] * np.linalg.norm(qp, axis=-1)[:, None, :] + cos_eps
  )
  score = (cos + 1) / 2 * valid
  return score.argmax(axis=1), score


def test_alignment_matches_numpy_reference():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 24, 24, 8)).astype(np.float32)
  s = rng.standard_normal((2, 24, 24, 8)).astype(np.float32)
  m = np.zeros((2, 24, 24, 1), np.float32)
  m[0, 3:17, 5:20] = 1.0
  m[0, 2, 5:20] = 0.25  # soft border
  m[1, 10:12, 10:12] = 1.0
  idx, score = scca.align_support_windows(
    jnp.asarray(q), jnp.asarray(s), jnp.asarray(m), 8, return_scores=True
  )
  ref_idx, ref_score = _np_generate_indices(q, s, m, 8)
  np.testing.assert_allclose(np.asarray(score), ref_score, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  assert idx.dtype == jnp.int32 and idx.shape == (2, 9)
  # Item 1 has foreground in window 4 only: every query window must pick it.
  np.testing.assert_array_equal(np.asarray(idx)[1], np.full(9, 4))


def test_alignment_ties_take_the_first_window():
  # No foreground anywhere: all scores are 0 and torch's CPU max returns index 0.
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((1, 16, 16, 4)).astype(np.float32))
  s = jnp.asarray(rng.standard_normal((1, 16, 16, 4)).astype(np.float32))
  idx = scca.align_support_windows(q, s, jnp.zeros((1, 16, 16, 1)), 8)
  np.testing.assert_array_equal(np.asarray(idx), np.zeros((1, 4), np.int32))
  # Two identical valid support windows: the first one wins.
  s2 = np.zeros((1, 16, 16, 4), np.float32)
  s2[0, :8, 8:] = 1.0
  s2[0, 8:, :8] = 1.0
  m2 = np.zeros((1, 16, 16, 1), np.float32)
  m2[0, :8, 8:] = 1.0
  m2[0, 8:, :8] = 1.0
  idx = scca.align_support_windows(q, jnp.asarray(s2), jnp.asarray(m2), 8)
  np.testing.assert_array_equal(np.asarray(idx), np.ones((1, 4), np.int32))


# -- scaled-cosine attention -------------------------------------------------------------------


def _np_attention(p, x, y, heads, n_self):
  n, lq, c = x.shape
  d = c // heads
  q = (x @ p["q"]["kernel"] + p["q"]["bias"]).reshape(n, lq, heads, d).transpose(0, 2, 1, 3)
  kv = (y @ p["kv"]["kernel"] + p["kv"]["bias"]).reshape(n, y.shape[1], 2, heads, d)
  k, v = kv[:, :, 0].transpose(0, 2, 1, 3), kv[:, :, 1].transpose(0, 2, 1, 3)
  logits = q @ k.transpose(0, 1, 3, 2)
  self_l = logits[..., :n_self] * d**-0.5
  qn = np.linalg.norm(q, axis=-1, keepdims=True)
  kn = np.linalg.norm(k[:, :, n_self:], axis=-1, keepdims=True)
  cross = logits[..., n_self:] / (qn @ kn.transpose(0, 1, 3, 2) + 1e-7)
  a = np.concatenate([self_l, cross], -1)
  a = np.exp(a - a.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = (a @ v).transpose(0, 2, 1, 3).reshape(n, lq, c)
  return o @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("with_support", [True, False])
def test_scaled_cosine_attention_matches_numpy(with_support):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 16, 32)).astype(np.float32)
  sup = rng.standard_normal((3, 16, 32)).astype(np.float32)
  mod = scca.ScaledCosineAttention(dim=32, num_heads=4)
  args = (jnp.asarray(x), jnp.asarray(sup)) if with_support else (jnp.asarray(x),)
  params = jax.jit(mod.init)(jax.random.PRNGKey(0), *args)
  got = np.asarray(jax.jit(mod.apply)(params, *args))
  p = jax.tree.map(np.asarray, params["params"])
  y = np.concatenate([x, sup], 1) if with_support else x
  ref = _np_attention(p, x, y, 4, 16)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert set(p) == {"q", "kv", "proj"} and p["kv"]["kernel"].shape == (32, 64)


def test_attention_logit_hooks():
  """self_bias / cross_weight / cross_bias enter the logits where variants need them."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((1, 4, 8)).astype(np.float32))
  sup = jnp.asarray(rng.standard_normal((1, 4, 8)).astype(np.float32))
  mod = scca.ScaledCosineAttention(dim=8, num_heads=2)
  params = jax.jit(mod.init)(jax.random.PRNGKey(0), x, sup)
  apply = jax.jit(mod.apply)
  base = apply(params, x, sup)
  same = apply(params, x, sup, cross_weight=jnp.ones((1, 2, 4, 4)), self_bias=jnp.zeros(()))
  np.testing.assert_allclose(np.asarray(same), np.asarray(base), atol=1e-6)
  # Masking every support key leaves plain self-attention.
  masked = apply(params, x, sup, cross_bias=jnp.full((1, 2, 4, 4), -jnp.inf))
  alone = apply(params, x)
  np.testing.assert_allclose(np.asarray(masked), np.asarray(alone), atol=1e-6)


def test_shifted_block_shapes_and_window_counts():
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.standard_normal((1, 16, 16, 16)).astype(np.float32))
  s = jnp.asarray(rng.standard_normal((1, 16, 16, 16)).astype(np.float32))
  m = jnp.asarray((rng.random((1, 16, 16, 1)) > 0.5).astype(np.float32))
  for shifted, n in ((False, 4), (True, 9)):
    blk = scca.SCCABlock(dim=16, num_heads=2, window=8, shifted=shifted)
    params = jax.jit(blk.init)(jax.random.PRNGKey(0), q, s, m)
    q2, s2, inter = jax.jit(blk.apply)(params, q, s, m)
    assert q2.shape == q.shape and s2.shape == s.shape
    assert inter["window_index"].shape == (1, n)
    assert inter["attn_q_out"].shape == (1, n * 64, 16)
    assert inter["q_out"].shape == (1, 256, 16)
    assert sorted(params["params"]) == ["attn_q", "attn_s", "mlp_q", "mlp_s", "norm1", "norm2"]
