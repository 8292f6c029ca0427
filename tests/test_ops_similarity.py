"""fss_jax.ops.similarity against torch (cosine) and torch re-statements of the
PFENet / HDMNet / SCCAN priors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fss_jax.ops import similarity  # noqa: E402

pytestmark = pytest.mark.torch


def _vectors(rng):
  a = rng.standard_normal((4, 5, 6, 8)).astype(np.float32)
  b = rng.standard_normal((4, 1, 1, 8)).astype(np.float32)
  a[0, 0, 0] = 0.0  # zero vector
  a[0, 0, 1] = 1e-9  # norm below eps
  a[0, 0, 2] = 3e-9
  b[1] = 0.0
  b[2] = 2e-9
  return a, b


def test_cosine_similarity_matches_torch_including_tiny_vectors():
  a, b = _vectors(np.random.default_rng(0))
  ref = F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1).numpy()
  out = np.asarray(similarity.cosine_similarity(jnp.asarray(a), jnp.asarray(b)))
  assert out.shape == (4, 5, 6)
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
  # Channel axis in the middle (NCHW-style call) and a custom eps.
  ref = F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=2, eps=0.5).numpy()
  out = np.asarray(similarity.cosine_similarity(jnp.asarray(a), jnp.asarray(b), axis=2, eps=0.5))
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_cosine_similarity_gradient_matches_torch():
  a, b = _vectors(np.random.default_rng(1))
  ta, tb = torch.from_numpy(a).requires_grad_(), torch.from_numpy(b).requires_grad_()
  w = np.random.default_rng(2).standard_normal((4, 5, 6)).astype(np.float32)
  (F.cosine_similarity(ta, tb, dim=-1) * torch.from_numpy(w)).sum().backward()
  ga, gb = jax.grad(lambda x, y: jnp.sum(similarity.cosine_similarity(x, y) * w), argnums=(0, 1))(
    jnp.asarray(a), jnp.asarray(b)
  )
  assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()
  # Compare away from the degenerate vectors (torch's clamp under no_grad makes
  # those gradients scale with 1/eps; ours agree but the values are huge).
  np.testing.assert_allclose(np.asarray(ga)[1:], ta.grad.numpy()[1:], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gb)[3:], tb.grad.numpy()[3:], rtol=1e-4, atol=1e-5)


def test_cosine_similarity_matrix_modes():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((2, 7, 5)).astype(np.float32)
  b = rng.standard_normal((2, 4, 5)).astype(np.float32)
  b[0, 1] = 0
  with jax.default_matmul_precision("highest"):
    clamp = np.asarray(similarity.cosine_similarity_matrix(jnp.asarray(a), jnp.asarray(b)))
    prod = np.asarray(
      similarity.cosine_similarity_matrix(
        jnp.asarray(a), jnp.asarray(b), eps=1e-7, eps_mode="product"
      )
    )
  ref = F.cosine_similarity(
    torch.from_numpy(a)[:, :, None], torch.from_numpy(b)[:, None], dim=-1
  ).numpy()
  np.testing.assert_allclose(clamp, ref, atol=1e-6)
  ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
  ref = (
    torch.bmm(ta, tb.transpose(1, 2))
    / (torch.bmm(ta.norm(dim=2, keepdim=True), tb.norm(dim=2, keepdim=True).transpose(1, 2)) + 1e-7)
  ).numpy()
  np.testing.assert_allclose(prod, ref, atol=1e-6)
  np.testing.assert_array_equal(prod[0, :, 1], 0)


def _torch_pfenet_prior(q, s, m, out_size, normalize=True):
  """PFENet's prior, written as in its forward (NCHW, float64)."""
  q, s, m = (torch.from_numpy(np.ascontiguousarray(v)).double() for v in (q, s, m))
  s = s * m
  b, c, h, w = q.shape
  tq = q.reshape(b, c, -1)
  tq_norm = torch.norm(tq, 2, 1, True)
  ts = s.reshape(b, c, -1).permute(0, 2, 1)
  ts_norm = torch.norm(ts, 2, 2, True)
  sim = torch.bmm(ts, tq) / (torch.bmm(ts_norm, tq_norm) + 1e-7)
  sim = sim.max(1)[0].view(b, h * w)
  if normalize:
    lo, hi = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
    sim = (sim - lo) / (hi - lo + 1e-7)
  sim = sim.view(b, 1, h, w)
  if out_size is not None:
    sim = F.interpolate(sim, size=out_size, mode="bilinear", align_corners=True)
  return sim.numpy()


def _torch_sccan_prior(q, s, m):
  """SCCAN's softmax-weighted mask prior (NCHW, float64), unmasked support."""
  q, s, m = (torch.from_numpy(np.ascontiguousarray(v)).double() for v in (q, s, m))
  b, c, h, w = q.shape
  tq = q.reshape(b, c, -1).permute(0, 2, 1)  # [b, Lq, c]
  ts = s.reshape(b, c, -1)  # [b, c, Ls]
  cos = torch.bmm(tq, ts) / (
    torch.bmm(tq.norm(dim=2, keepdim=True), ts.norm(dim=1, keepdim=True)) + 1e-7
  )
  r = torch.bmm(cos.softmax(-1), m.reshape(b, -1, 1))[..., 0]
  lo, hi = r.min(1, keepdim=True)[0], r.max(1, keepdim=True)[0]
  return ((r - lo) / (hi - lo + 1e-7)).view(b, 1, h, w).numpy()


def _inputs(rng, hq=9, wq=9, hs=10, ws=10, c=16):
  q = rng.standard_normal((2, hq, wq, c)).astype(np.float32)
  s = rng.standard_normal((2, hs, ws, c)).astype(np.float32)
  m = (rng.random((2, hs, ws)) > 0.5).astype(np.float32)
  return q, s, m


def _nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("normalize,out_size", [(True, (12, 12)), (False, None)])
def test_correlation_prior_max(normalize, out_size):
  q, s, m = _inputs(np.random.default_rng(4), hs=9, ws=9)
  with jax.default_matmul_precision("highest"):
    out = similarity.correlation_prior(
      jnp.asarray(q), jnp.asarray(s), jnp.asarray(m), normalize=normalize, output_size=out_size
    )
  ref = _torch_pfenet_prior(_nchw(q), _nchw(s), m[:, None], out_size, normalize)
  assert out.shape == (2, *(out_size or (9, 9)), 1)
  np.testing.assert_allclose(_nchw(out), ref, atol=2e-5)


def test_correlation_prior_softmax_mask():
  q, s, m = _inputs(np.random.default_rng(5))
  with jax.default_matmul_precision("highest"):
    out = similarity.correlation_prior(
      jnp.asarray(q), jnp.asarray(s), jnp.asarray(m), reduce="softmax_mask", mask_support=False
    )
  ref = _torch_sccan_prior(_nchw(q), _nchw(s), m[:, None])
  np.testing.assert_allclose(_nchw(out), ref, atol=2e-5)


def test_correlation_prior_errors():
  q, s, m = _inputs(np.random.default_rng(6))
  with pytest.raises(ValueError, match="support feature size"):
    similarity.correlation_prior(jnp.asarray(q), jnp.asarray(s), jnp.asarray(m[:, :5]))
