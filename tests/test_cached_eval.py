"""Issue 18: evaluation with the frozen encoder run once per unique test image is exact.

SCCAN, 1-shot, sharded over 8 fake devices, is evaluated end to end on the stored episodes of
a synthetic PASCAL-5i build twice, the plain path (the whole forward per episode) and
`fss_jax.eval.cached`: the per-seed mIoU / FB-IoU agree to 1e-6 and the logits to 1e-5
(relative to their scale), the cache encodes each unique image once, and a host budget of 3
images splits the episodes into windows without changing a number. Every model that declares
a frozen encoder (`ModelSpec.encoder`) then gets the logits check at 5 shots on one device
(the support order of K > 1; each also checks that its forward reads the cached features).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from cached_eval_cases import (
  ENCODED,
  EPISODES,
  HEAVY,
  SEEDS,
  assert_logits_equal,
  build_voc,
  check_logits,
  evaluate_all_seeds,
  logits_both_ways,
  make_loaders,
  random_state,
  small_model,
)

from fss_jax import parallel
from fss_jax.eval import cached as cached_lib
from fss_jax.train import step as step_lib

voc_dir = pytest.fixture(scope="module")(build_voc)


def test_cached_evaluation_equals_plain(voc_dir):
  """SCCAN end to end, 1-shot over 8 fake devices: per-seed mIoU / FB-IoU, logits, one encoder
  pass per unique image; with a budget of 3 images the episodes run in windows and every
  number stays, and so it does with the cache on the devices (gathered inside a jit)."""
  shot, devices = 1, 8
  mesh = parallel.make_mesh(devices=jax.devices()[:devices])
  spec, model, fields = small_model("sccan", shot)
  loaders = make_loaders(voc_dir, shot, devices)
  st = random_state(model, loaders[SEEDS[0]], mesh)
  eval_fn = step_lib.make_eval_step(model=model, mesh=mesh, score="original")
  plain = evaluate_all_seeds(eval_fn, st, loaders, mesh, devices)

  enc = spec.encoder(**fields)
  runs, item_bytes = {}, 0
  for budget, place in ((0, "host"), (3, "host"), (0, "device")):  # 3: room for 3 images
    loaders = make_loaders(voc_dir, shot, devices)
    cache = cached_lib.FeatureCache(
      enc,
      st.variables(),
      loaders,
      mesh=mesh,
      encode_batch=8,
      budget_bytes=budget * item_bytes,
      placement=place,
    )
    item_bytes = cache.item_bytes
    summary = evaluate_all_seeds(eval_fn, st, loaders, mesh, devices, cache)
    runs[budget, place] = (summary, cache.stats())
    assert cache.stats()["placement"] == place
  whole = runs[0, "host"][1]
  for (budget, _), (fast, stats) in runs.items():
    for s in SEEDS:
      a, b = plain["seeds"][str(s)], fast["seeds"][str(s)]
      assert a["episodes"] == b["episodes"] == EPISODES
      np.testing.assert_allclose(b["miou"], a["miou"], rtol=0, atol=1e-6)
      np.testing.assert_allclose(b["fb_iou"], a["fb_iou"], rtol=0, atol=1e-6)
    assert stats["uncached_passes"] == len(SEEDS) * EPISODES * (1 + shot)
    if budget:
      # One window per global batch of 8 episodes (each needs more than 3 images).
      assert stats["windows"] == len(SEEDS) and stats["cache_bytes"] < whole["cache_bytes"]
      assert stats["backbone_passes"] >= whole["backbone_passes"]
    else:
      assert stats["windows"] == 1 and stats["backbone_passes"] == stats["unique_inputs"]
      assert stats["backbone_passes"] < stats["uncached_passes"]

  loaders = make_loaders(voc_dir, shot, devices)
  cache = cached_lib.FeatureCache(enc, st.variables(), loaders, mesh=mesh, encode_batch=8)
  assert_logits_equal(*logits_both_ways(model, st, cache, loaders[SEEDS[0]], SEEDS[0], devices))


@pytest.mark.parametrize("name", [n for n in ENCODED if n not in HEAVY])
def test_cached_logits_equal_plain(voc_dir, name, shot=5):
  """Every model with an encoder, 5-shot: the logits from cached features are the plain ones
  (tests/test_cached_eval_heavy.py: the slowest models, in a file of their own so that the
  suite's two workers share them)."""
  check_logits(voc_dir, name, shot)
