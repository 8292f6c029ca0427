"""What an episode model checks before its first step: the support count its ``shot`` field
was built for, and supports of the query's size."""

from __future__ import annotations

from collections.abc import Mapping

import jax


def check_episode(episode: Mapping[str, jax.Array], shot: int) -> tuple[int, int, int, int]:
  """(B, K, H, W) of ``query_image`` [B, H, W, 3], ``support_images`` [B, K, H, W, 3] and
  ``support_masks`` [B, K, H, W].

  Raises:
    ValueError: K is not the model's ``shot``, or the supports are not H x W; the message
      says what to change.
  """
  x, sx, sy = episode["query_image"], episode["support_images"], episode["support_masks"]
  b, hh, ww, _ = x.shape
  k = sx.shape[1]
  if k != shot:
    raise ValueError(
      f"the episode has {k} supports per query but the model was built for {shot}-shot "
      f"episodes; set config.shot={k} (the model field shot) or fix the data"
    )
  if sx.shape[2:4] != (hh, ww) or sy.shape[2:] != (hh, ww):
    raise ValueError(
      f"support images {tuple(sx.shape)} / masks {tuple(sy.shape)} must share "
      f"the query size {hh}x{ww}"
    )
  return b, k, hh, ww
