"""Softmax with a dot-product backward (same values and gradient as jax.nn.softmax)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_dot_backward(x: jax.Array, axis: int) -> jax.Array:
  """``jax.nn.softmax(x, axis)`` with the same gradient, its reduction written as a dot.

  The backward is JAX's own rule ``y * (g - sum_axis(g * y))``; the sum is an
  einsum (a batched dot) instead of a reduce. Reason (XLA:CPU, jax 0.10): the
  autodiff reduce of a softmax over a 3600 x 3600 score matrix is put in a
  YNNPACK reduce fusion together with the score-gradient dot and the
  re-broadcast, which runs ~100x slower than the plain ops (one HDMNet
  473 px gradient took 110-190 s). As a dot it stays on the fast path.

  Args:
    x: any-rank scores.
    axis: the normalised axis (static).

  Returns:
    ``softmax(x)`` along ``axis``, x's shape.
  """
  return jax.nn.softmax(x, axis=axis)


def _softmax_fwd(x: jax.Array, axis: int):
  y = jax.nn.softmax(x, axis=axis)
  return y, y


def _softmax_bwd(axis: int, y: jax.Array, g: jax.Array):
  ax = axis % y.ndim
  letters = "abcdefghijklmnopqrstuvwxyz"[: y.ndim]
  rest = letters[:ax] + letters[ax + 1 :]
  dot = jnp.einsum(f"{letters},{letters}->{rest}", g, y)  # sum over `axis`
  return (y * (g - jnp.expand_dims(dot, ax)),)


softmax_dot_backward.defvjp(_softmax_fwd, _softmax_bwd)


__all__ = ["softmax_dot_backward"]
