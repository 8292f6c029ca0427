"""ops.conv.conv2d: torch's conv2d on NHWC, 1 x 1 kernels as matrix products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fss_jax.ops import conv as conv_ops


def _lax(x, w, stride, padding, dilation=(1, 1), groups=1):
  return jax.lax.conv_general_dilated(
    x,
    w,
    stride,
    [(p, p) for p in padding],
    rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    precision="highest",
  )


@pytest.mark.parametrize(
  "size,stride", [((9, 9), (1, 1)), ((9, 8), (2, 2)), ((10, 7), (2, 1)), ((5, 5), (3, 3))]
)
def test_pointwise_path_equals_the_convolution(size, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, *size, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 1, 6, 5)), jnp.float32)
  y = conv_ops.conv2d(x, w, stride=stride, precision="highest")
  ref = _lax(x, w, stride, (0, 0))
  assert y.shape == ref.shape  # torch: floor((H - 1) / s) + 1
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  dx, dw = jax.vjp(lambda a, b: conv_ops.conv2d(a, b, stride=stride, precision="highest"), x, w)[1](
    g
  )
  rdx, rdw = jax.vjp(lambda a, b: _lax(a, b, stride, (0, 0)), x, w)[1](g)
  np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-4)


def test_pointwise_runs_as_a_dot_and_other_kernels_as_convolutions():
  x = jnp.zeros((1, 8, 8, 4))
  hlo = lambda f: jax.jit(f).lower(x).as_text()
  assert "convolution" not in hlo(lambda a: conv_ops.conv2d(a, jnp.ones((1, 1, 4, 3))))
  assert "convolution" in hlo(lambda a: conv_ops.conv2d(a, jnp.ones((3, 3, 4, 3)), padding=(1, 1)))
  # padded or grouped 1 x 1 kernels keep the convolution (its zero border / groups)
  assert "convolution" in hlo(lambda a: conv_ops.conv2d(a, jnp.ones((1, 1, 4, 3)), padding=(1, 1)))
  assert "convolution" in hlo(lambda a: conv_ops.conv2d(a, jnp.ones((1, 1, 2, 4)), groups=2))


def test_general_kernels_match_lax_with_dilation_and_groups():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 11, 11, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 2, 6)), jnp.float32)
  y = conv_ops.conv2d(
    x, w, stride=(2, 2), padding=(2, 2), dilation=(2, 2), groups=2, precision="highest"
  )
  np.testing.assert_allclose(y, _lax(x, w, (2, 2), (2, 2), (2, 2), 2), rtol=1e-6)
  assert y.shape == (1, 6, 6, 6)  # floor((11 + 4 - 4 - 1) / 2) + 1
