"""What an episode model checks before its first step: the support count its ``shot`` field
was built for (`check_episode`), and supports of the query's size (`check_supports`)."""

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
  check_supports(x, sx, sy)
  return b, k, hh, ww


def check_supports(query: jax.Array, images: jax.Array, masks: jax.Array) -> None:
  """Raises ValueError unless support images [B, K, H, W, 3] and masks [B, K, H, W] share
  the query's [B, H, W, 3] size."""
  hh, ww = query.shape[1:3]
  if images.shape[2:4] != (hh, ww) or masks.shape[2:] != (hh, ww):
    raise ValueError(
      f"support images {tuple(images.shape)} / masks {tuple(masks.shape)} must share "
      f"the query size {hh}x{ww}"
    )
