"""fss_jax.ops.resize against torch.nn.functional.interpolate."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fss_jax.ops import resize  # noqa: E402

pytestmark = pytest.mark.torch

SIZES = [
  ((7, 13), (13, 7)),
  ((13, 7), (7, 13)),
  ((60, 60), (64, 64)),
  ((241, 61), (61, 241)),
  ((1, 5), (5, 1)),
  ((5, 1), (1, 5)),
  ((53, 53), (241, 241)),
  ((64, 64), (60, 60)),
  ((9, 9), (9, 9)),
  ((6, 3), (12, 3)),
]


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _torch_bilinear(x, size=None, scale=None, ac=False):
  t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  return F.interpolate(t, size=size, scale_factor=scale, mode="bilinear", align_corners=ac).numpy()


@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("src,dst", SIZES)
def test_bilinear_matches_torch(src, dst, ac):
  x = np.random.default_rng(0).standard_normal((2, *src, 3)).astype(np.float32)
  ref = _torch_bilinear(x, size=dst, ac=ac)
  out = _nchw(resize.resize_bilinear(jnp.asarray(x), dst, align_corners=ac))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


def test_bilinear_weights_match_torch_exactly():
  # The interpolation matrix itself (torch applied to an identity) is bit-exact,
  # including torch's fused multiply-add in the half-pixel source index.
  for src, dst, ac in [
    (60, 241, False),
    (241, 473, False),
    (64, 13, False),
    (60, 64, True),
    (473, 64, True),
    (5, 1, False),
    (1, 5, True),
  ]:
    eye = np.eye(src, dtype=np.float32)[None, None]
    ref = F.interpolate(
      torch.from_numpy(eye), size=(dst, src), mode="bilinear", align_corners=ac
    ).numpy()[0, 0]
    np.testing.assert_array_equal(resize.linear_weights(src, dst, align_corners=ac), ref)


def test_bilinear_float64():
  x = np.random.default_rng(1).standard_normal((1, 13, 7, 2))
  with jax.enable_x64(True):
    out = _nchw(resize.resize_bilinear(jnp.asarray(x), (29, 3), align_corners=False))
  ref = _torch_bilinear(x, size=(29, 3))
  np.testing.assert_allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("scale", [0.5, 2.0, 1.5, 0.37, 8.0, (0.125, 3.3)])
def test_bilinear_scale_factor(scale, ac):
  x = np.random.default_rng(2).standard_normal((1, 61, 59, 2)).astype(np.float32)
  ref = _torch_bilinear(x, scale=scale, ac=ac)
  out = _nchw(resize.resize_bilinear_scale(jnp.asarray(x), scale, align_corners=ac))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
  "src,dst", SIZES + [((473, 473), (60, 60)), ((60, 60), (473, 473)), ((30, 30), (60, 60))]
)
def test_nearest_int_labels(src, dst):
  lab = np.random.default_rng(3).integers(0, 256, (2, *src)).astype(np.int32)
  ref = (
    F.interpolate(torch.from_numpy(lab[:, None].astype(np.float32)), size=dst, mode="nearest")
    .numpy()[:, 0]
    .astype(np.int32)
  )
  out = np.asarray(resize.resize_nearest(jnp.asarray(lab), dst))
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, ref)
  # NHWC with channels as well.
  out4 = np.asarray(resize.resize_nearest(jnp.asarray(lab[..., None]), dst))[..., 0]
  np.testing.assert_array_equal(out4, ref)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="NHWC"):
    resize.resize_bilinear(jnp.zeros((4, 4, 3)), (2, 2), align_corners=False)
  with pytest.raises(ValueError, match="positive"):
    resize.linear_weights(0, 3, align_corners=False)


def test_jit_and_low_precision_dtypes():
  x = np.random.default_rng(4).standard_normal((1, 11, 9, 2)).astype(np.float32)
  f = jax.jit(lambda v: resize.resize_bilinear(v, (5, 23), align_corners=True))
  ref = _torch_bilinear(x, size=(5, 23), ac=True)
  np.testing.assert_allclose(_nchw(f(jnp.asarray(x))), ref, atol=2e-6)
  out = f(jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(_nchw(out.astype(jnp.float32)), ref, atol=3e-2)
  lab = jnp.asarray(np.random.default_rng(5).integers(0, 3, (1, 11, 9)), jnp.uint8)
  assert jax.jit(lambda v: resize.resize_nearest(v, (4, 20)))(lab).dtype == jnp.uint8
