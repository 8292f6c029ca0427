"""Random weights drawn on the host in the shapes of an abstract variable tree: jitting a
large model's ``init`` costs more than the check that needs the weights (~35 s for
HDMNet-PAHNet on this CPU)."""

from __future__ import annotations

import jax
import numpy as np


def draw(shapes, seed: int = 0):
  """Arrays for the ``jax.ShapeDtypeStruct`` leaves of ``shapes``: kernels ~ N(0, 1/fan_in)
  (fan_in = all axes but the last), biases and running means 0, scales and running
  variances 1, integer leaves 0."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if name in ("bias", "mean") or not np.issubdtype(s.dtype, np.floating):
      return np.zeros(s.shape, s.dtype)
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)
