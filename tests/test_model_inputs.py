"""`fss_jax.models.inputs.check_episode`: the shot / support-size check every episode model
runs first (the models' own shot-mismatch tests check that they call it)."""

from __future__ import annotations

import numpy as np
import pytest

from fss_jax.models.inputs import check_episode


def _episode(b, k, h, w, sh=None, sw=None):
  sh, sw = sh or h, sw or w
  return {
    "query_image": np.zeros((b, h, w, 3), np.float32),
    "support_images": np.zeros((b, k, sh, sw, 3), np.float32),
    "support_masks": np.zeros((b, k, sh, sw), np.int32),
  }


def test_returns_batch_shots_and_size():
  assert check_episode(_episode(2, 5, 33, 41), 5) == (2, 5, 33, 41)


def test_wrong_shot_names_the_count_and_the_setting():
  with pytest.raises(
    ValueError, match=r"has 1 supports per query .* built for 5-shot .* config\.shot=1"
  ):
    check_episode(_episode(2, 1, 33, 33), 5)


def test_supports_of_another_size_are_refused():
  with pytest.raises(ValueError, match=r"must share the query size 33x33"):
    check_episode(_episode(1, 1, 33, 33, sh=32), 1)
  bad_masks = dict(_episode(1, 1, 33, 33), support_masks=np.zeros((1, 1, 33, 32), np.int32))
  with pytest.raises(ValueError, match=r"masks \(1, 1, 33, 32\)"):
    check_episode(bad_masks, 1)
