"""fss_jax.ops.pooling against torch.nn.functional pooling."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fss_jax.ops import pooling  # noqa: E402

pytestmark = pytest.mark.torch


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
  "src,dst",
  [
    ((60, 60), 1),
    ((60, 60), 2),
    ((60, 60), 3),
    ((60, 60), 6),
    ((61, 59), 6),
    ((7, 13), 3),
    ((13, 7), (8, 5)),
    ((5, 1), 2),
    ((1, 1), 3),
    ((60, 60), (64, 64)),
    ((7, 13), (17, 23)),
    ((30, 30), (8, 8)),
  ],
)
def test_adaptive_avg_pool(src, dst):
  x = np.random.default_rng(0).standard_normal((2, *src, 3)).astype(np.float32)
  ref = F.adaptive_avg_pool2d(_t(x), dst).numpy()
  out = _nchw(pooling.adaptive_avg_pool(jnp.asarray(x), dst))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


POOL_CASES = [
  # (size, kernel, stride, padding, ceil_mode, dilation)
  ((241, 241), 3, 2, 1, False, 1),
  ((31, 31), 3, 1, 1, False, 1),
  ((8, 9), 2, 2, 0, True, 1),
  ((7, 7), 3, 2, 0, True, 1),
  ((10, 11), 3, 2, 1, True, 1),
  ((6, 6), 2, 2, 1, True, 1),  # ceil window starting in the right padding is dropped
  ((13, 9), (3, 2), (2, 1), (1, 0), True, 1),
  ((15, 15), 3, 2, 1, False, 2),
  ((16, 16), 3, 3, 1, True, 2),
]


@pytest.mark.parametrize("size,k,s,p,ceil,d", POOL_CASES)
def test_max_pool2d(size, k, s, p, ceil, d):
  x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
  ref = F.max_pool2d(_t(x), k, s, p, dilation=d, ceil_mode=ceil).numpy()
  out = _nchw(pooling.max_pool2d(jnp.asarray(x), k, s, p, ceil_mode=ceil, dilation=d))
  assert out.shape == ref.shape
  np.testing.assert_array_equal(out, ref)


def test_max_pool2d_int():
  x = np.random.default_rng(2).integers(-5, 5, (1, 9, 9, 1)).astype(np.int32)
  ref = F.max_pool2d(_t(x.astype(np.float32)), 3, 2, 1, ceil_mode=True).numpy()
  out = _nchw(pooling.max_pool2d(jnp.asarray(x), 3, 2, 1, ceil_mode=True))
  np.testing.assert_array_equal(out, ref.astype(np.int32))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("size,k,s,p,ceil,d", [c for c in POOL_CASES if c[-1] == 1])
def test_avg_pool2d(size, k, s, p, ceil, d, count_include_pad):
  x = np.random.default_rng(3).standard_normal((2, *size, 3)).astype(np.float32)
  ref = F.avg_pool2d(_t(x), k, s, p, ceil_mode=ceil, count_include_pad=count_include_pad).numpy()
  out = _nchw(
    pooling.avg_pool2d(jnp.asarray(x), k, s, p, ceil_mode=ceil, count_include_pad=count_include_pad)
  )
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_pool_errors():
  with pytest.raises(ValueError, match="pad should be at most half"):
    pooling.max_pool2d(jnp.zeros((1, 8, 8, 1)), 3, 2, 2)


def _torch_weighted_gap(feat, mask):
  """PFENet/BAM `Weighted_GAP` as written there (avg-pool x area)."""
  f, m = _t(feat), _t(mask[..., None])
  h, w = f.shape[-2:]
  f = f * m
  area = F.avg_pool2d(m, (h, w)) * h * w + 0.0005
  return (F.avg_pool2d(f, (h, w)) * h * w / area)[:, :, 0, 0].numpy()


def test_masked_average_pool_weighted_gap():
  rng = np.random.default_rng(4)
  feat = rng.standard_normal((3, 13, 11, 5)).astype(np.float32)
  mask = (rng.random((3, 13, 11)) > 0.6).astype(np.float32)
  mask[2] = 0  # empty mask -> zero prototype
  mask[1] *= rng.random((13, 11)).astype(np.float32)  # soft mask
  ref = _torch_weighted_gap(feat, mask)
  out = np.asarray(pooling.masked_average_pool(jnp.asarray(feat), jnp.asarray(mask)))
  assert out.shape == (3, 5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[2], 0)
  out4 = pooling.masked_average_pool(jnp.asarray(feat), jnp.asarray(mask[..., None]))
  np.testing.assert_allclose(np.asarray(out4), out, rtol=1e-6)


@pytest.mark.parametrize(
  "fsize,msize", [((31, 31), (241, 241)), ((7, 5), (13, 29)), ((6, 6), (6, 6))]
)
def test_masked_average_pool_upsampled_features(fsize, msize):
  # PANet: up-sample the features to the mask size (bilinear, half-pixel), then pool.
  rng = np.random.default_rng(5)
  feat = rng.standard_normal((2, *fsize, 4)).astype(np.float32)
  mask = (rng.random((2, *msize)) > 0.5).astype(np.float32)
  up = F.interpolate(_t(feat), size=msize, mode="bilinear", align_corners=False)
  m = torch.from_numpy(mask)[:, None]
  ref = (torch.sum(up * m, dim=(2, 3)) / (m.sum(dim=(2, 3)) + 1e-5)).numpy()
  out = np.asarray(
    pooling.masked_average_pool(jnp.asarray(feat), jnp.asarray(mask), eps=1e-5, resize="features")
  )
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)


def test_masked_average_pool_errors():
  with pytest.raises(ValueError, match="resize the mask first"):
    pooling.masked_average_pool(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 8, 8)))


def test_pool_gradients_match_torch_under_jit():
  import jax

  x = np.random.default_rng(6).standard_normal((1, 7, 7, 2)).astype(np.float32)
  cases = [
    (
      lambda v: pooling.max_pool2d(v, 3, 2, 1, ceil_mode=True),
      lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True),
    ),
    (
      lambda v: pooling.avg_pool2d(v, 3, 2, 1, ceil_mode=True),
      lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True),
    ),
    (lambda v: pooling.adaptive_avg_pool(v, 3), lambda t: F.adaptive_avg_pool2d(t, 3)),
  ]
  for ours, theirs in cases:
    g = jax.jit(jax.grad(lambda v: jnp.sum(ours(v) ** 2)))(jnp.asarray(x))  # noqa: B023 (called in this iteration)
    t = _t(x).requires_grad_()
    (theirs(t) ** 2).sum().backward()
    np.testing.assert_allclose(_nchw(g), t.grad.numpy(), atol=1e-5)


@pytest.mark.parametrize("size,stride", [(9, 2), (10, 2), (7, 1), (8, 1)])
def test_max_pool_taps_matches_reduce_window_and_torch(size, stride):
  # Quantised ReLU outputs: many ties (zeros and repeats) inside windows.
  rng = np.random.default_rng(size)
  x = np.maximum(np.round(rng.standard_normal((2, size, size + 1, 3)) * 2) / 2, 0).astype(
    np.float32
  )
  ct = rng.standard_normal(np.asarray(pooling.max_pool2d_taps(x, 3, stride, 1)).shape).astype(
    np.float32
  )
  pools = {"taps": pooling.max_pool2d_taps, "reduce_window": pooling.max_pool2d}
  res = {}
  for name, pool in pools.items():
    fn = lambda v, pool=pool: jnp.sum(pool(v, 3, stride, 1) * ct)
    res[name] = (
      np.asarray(pool(jnp.asarray(x), 3, stride, 1)),
      np.asarray(jax.jit(jax.grad(fn))(x)),
    )
  np.testing.assert_array_equal(res["taps"][0], res["reduce_window"][0])
  np.testing.assert_array_equal(res["taps"][1], res["reduce_window"][1])
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  yt = torch.nn.functional.max_pool2d(xt, 3, stride, 1)
  (yt * torch.tensor(ct.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_array_equal(res["taps"][0], yt.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(
    res["taps"][1], xt.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6
  )
