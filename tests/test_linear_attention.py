"""Alignment operators of fss_jax.nn.attention.linear (JC²A Eq. 3 / 9 and Table 4's alternatives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fss_jax.nn.attention import linear as la


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _direct_ours(q, k, v):
  """ReLU(Q) · (softmax(K)ᵀ V), softmax over support positions per channel; mean over groups."""
  out = 0.0
  for g in range(k.shape[1]):
    a = _np_softmax(k[:, g], axis=1)  # [B, N, C]
    ctx = np.einsum("bnc,bnd->bcd", a.astype(np.float64), v[:, g].astype(np.float64))
    out = out + np.einsum("bqc,bcd->bqd", np.maximum(q, 0).astype(np.float64), ctx)
  return out / k.shape[1]


def _direct_softmax(q, k, v, scale):
  out = 0.0
  for g in range(k.shape[1]):
    att = _np_softmax(np.einsum("bqc,bnc->bqn", q.astype(np.float64), k[:, g]) * scale, axis=-1)
    out = out + np.einsum("bqn,bnd->bqd", att, v[:, g].astype(np.float64))
  return out / k.shape[1]


def _direct_cosine(q, k, v):
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  out = 0.0
  for g in range(k.shape[1]):
    kn = k[:, g] / np.linalg.norm(k[:, g], axis=-1, keepdims=True)
    out = out + np.einsum("bqn,bnd->bqd", np.einsum("bqc,bnc->bqn", qn, kn), v[:, g]) / k.shape[2]
  return out / k.shape[1]


@pytest.mark.parametrize("groups", [1, 4])
def test_ours_equals_direct_formula_and_differs_from_softmax(groups):
  b, nq, nk, c = 2, 12, 9, 8
  q, k, v = _rand((b, nq, c), 0), _rand((b, groups, nk, c), 1), _rand((b, groups, nk, c), 2)
  got = np.asarray(la.relu_softmax_attention(q, k, v))
  want = _direct_ours(q, k, v)
  assert got.shape == (b, nq, c)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Not the softmax attention (whatever its scale).
  for scale in (1.0, c**-0.5):
    sm = _direct_softmax(q, k, v, scale)
    assert np.abs(got - sm).max() > 1e-2
  if groups == 1:  # [B, Nk, C] keys are G = 1
    np.testing.assert_allclose(
      np.asarray(la.relu_softmax_attention(q, k[:, 0], v[:, 0])), got, rtol=1e-6, atol=1e-7
    )


def test_alternatives_equal_their_formulas():
  b, nq, nk, c, g = 2, 10, 7, 6, 3
  q, k, v = _rand((b, nq, c), 3), _rand((b, g, nk, c), 4), _rand((b, g, nk, c), 5)
  np.testing.assert_allclose(
    np.asarray(la.softmax_attention(q, k, v)),
    _direct_softmax(q, k, v, c**-0.5),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(la.softmax_attention(q, k, v, scale=0.3)),
    _direct_softmax(q, k, v, 0.3),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(la.cosine_interaction(q, k, v)), _direct_cosine(q, k, v), rtol=1e-5, atol=1e-6
  )
  # Katharopoulos elu+1 linear attention == its quadratic form.
  fq, fk = np.where(q > 0, q + 1, np.exp(q)), np.where(k > 0, k + 1, np.exp(k))
  want = 0.0
  for j in range(g):
    sim = np.einsum("bqc,bnc->bqn", fq, fk[:, j])
    want = want + np.einsum("bqn,bnd->bqd", sim / sim.sum(-1, keepdims=True), v[:, j])
  np.testing.assert_allclose(
    np.asarray(la.elu_linear_attention(q, k, v, eps=0.0)), want / g, rtol=1e-5, atol=1e-6
  )


def test_zero_support_positions_add_nothing():
  """Masked-out support tokens (K = V = 0) take softmax mass but contribute no value."""
  b, nq, nk, c = 1, 5, 6, 4
  q, k, v = _rand((b, nq, c), 6), _rand((b, nk, c), 7), _rand((b, nk, c), 8)
  k[:, 3:] = 0.0
  v[:, 3:] = 0.0
  got = np.asarray(la.relu_softmax_attention(q, k, v))
  a = np.exp(k) / np.exp(k).sum(1, keepdims=True)
  want = np.einsum("bqc,bcd->bqd", np.maximum(q, 0), np.einsum("bnc,bnd->bcd", a[:, :3], v[:, :3]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("operator", la.OPERATORS)
def test_module_projects_then_attends(operator):
  b, nq, g, nk, cin, dim = 2, 6, 2, 5, 8, 4
  xq, xs = _rand((b, nq, cin), 9), _rand((b, g, nk, cin), 10)
  mod = la.AlignmentAttention(dim=dim, operator=operator)
  variables = mod.init(jax.random.key(0), xq, xs)
  p = variables["params"]
  assert set(p) >= {"w_q", "w_k", "w_v"}
  assert all("bias" not in p[n] for n in ("w_q", "w_k", "w_v"))
  n_proj = sum(int(np.prod(p[n]["kernel"].shape)) for n in ("w_q", "w_k", "w_v"))
  assert n_proj == 3 * cin * dim
  out = np.asarray(mod.apply(variables, xq, xs))
  assert out.shape == (b, nq, dim)
  wq, wk, wv = (np.asarray(p[n]["kernel"]) for n in ("w_q", "w_k", "w_v"))
  q, k, v = xq @ wq, xs @ wk, xs @ wv
  if operator == "ours":
    want = _direct_ours(q, k, v)
  elif operator == "softmax":
    want = _direct_softmax(q, k, v, dim**-0.5)
  elif operator == "cosine":
    want = _direct_cosine(q, k, v)
  else:  # BatchNorm Φ in inference mode at init = identity up to eps
    want = np.einsum(
      "bqc,bcd->bqd", q / np.sqrt(1 + 1e-5), np.einsum("bgnc,bgnd->bcd", _np_softmax(k, 2), v) / g
    )
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_linear_batchnorm_trains_with_mutable_stats():
  xq, xs = _rand((2, 6, 8), 11), _rand((2, 5, 8), 12)
  mod = la.AlignmentAttention(dim=4, operator="linear")
  variables = mod.init(jax.random.key(0), xq, xs)
  out, updates = mod.apply(variables, xq, xs, train=True, mutable=["batch_stats"])
  assert out.shape == (2, 6, 4)
  assert not np.allclose(updates["batch_stats"]["phi_bn"]["mean"], 0.0)


def test_unknown_operator_is_a_clear_error():
  with pytest.raises(ValueError, match="alignment operator"):
    la.AlignmentAttention(operator="nope").init(
      jax.random.key(0), jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3))
    )


def test_cosine_gradient_is_finite_at_zero_keys():
  q, k, v = _rand((1, 4, 3), 13), _rand((1, 5, 3), 14), _rand((1, 5, 3), 15)
  k[:, 2:] = 0.0
  g = jax.grad(lambda k: la.cosine_interaction(q, k, v).sum())(jnp.asarray(k))
  assert np.all(np.isfinite(np.asarray(g)))
