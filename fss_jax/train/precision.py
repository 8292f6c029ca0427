"""Mixed precision: bfloat16 compute with float32 parameters, statistics and losses.

``config.compute_dtype`` ("float32", the default, or "bfloat16") selects the
dtype the model computes in. The policy is the one of `fss_jax.nn.layers`:

* parameters, BatchNorm running statistics and optimiser state stay float32
  (the train state never changes dtype, so checkpoints are the same files);
* the float inputs of an episode (images) are cast to the compute dtype, and
  every fss-jax layer casts its float32 parameters to its input's dtype, so
  convolutions, matmuls and attention run in bfloat16 (BatchNorm / LayerNorm /
  GroupNorm statistics are computed in float32 and cast back);
* model outputs are cast back to float32 before the loss, the metrics and the
  argmax, so losses and gradients are float32 (the gradient of the float32
  parameters flows through the casts).

An op that mixes a bfloat16 activation with a float32 array (a mask, a
constant) is promoted to float32 by JAX and computes from there in float32:
correct, only less of a speed-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str | Any) -> jnp.dtype:
  """The dtype for ``config.compute_dtype`` (a name or a dtype).

  Raises:
    ValueError: an unsupported name (the message lists the choices).
  """
  key = jnp.dtype(name).name if not isinstance(name, str) else name
  if key not in COMPUTE_DTYPES:
    raise ValueError(
      f"compute_dtype={name!r} is not supported; use one of "
      f"{', '.join(sorted(COMPUTE_DTYPES))} (--config.compute_dtype=bfloat16)"
    )
  return jnp.dtype(COMPUTE_DTYPES[key])


def is_float32(dtype: Any) -> bool:
  return compute_dtype(dtype) == jnp.float32


def _is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts the floating-point leaves of ``tree`` to ``dtype``; int / bool leaves are kept."""
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dt) if _is_float(x) and x.dtype != dt else x, tree)


def to_float32(tree: Any) -> Any:
  """Casts every floating-point leaf of ``tree`` to float32 (outputs before losses/metrics)."""
  return cast_floating(tree, jnp.float32)


def apply(
  model,
  variables: Mapping[str, Any],
  episode: Mapping[str, Any],
  *,
  dtype: Any = "float32",
  **kwargs,
) -> Any:
  """``model.apply(variables, episode, **kwargs)`` computing in ``dtype``.

  Args:
    model: a flax module taking an Episode dict.
    variables: {"params", "batch_stats"?} in float32 (left as they are).
    episode: Episode dict; float arrays are cast to ``dtype``.
    dtype: the compute dtype ("float32" applies the model unchanged).
    **kwargs: passed to ``model.apply`` (train, rngs, mutable, ...).

  Returns:
    What ``model.apply`` returns, with every float leaf cast to float32 (the
    mutated collections of ``mutable=`` are float32 already: the layers keep
    their statistics in float32).
  """
  if is_float32(dtype):
    return model.apply(variables, dict(episode), **kwargs)
  out = model.apply(variables, cast_floating(dict(episode), compute_dtype(dtype)), **kwargs)
  return to_float32(out)


__all__ = ["COMPUTE_DTYPES", "compute_dtype", "is_float32", "cast_floating", "to_float32", "apply"]
