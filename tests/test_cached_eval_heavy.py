"""Issue 18: the cached-evaluation logits check of the slowest models (PAHNet's two variants,
Sym-Net, JC²A), in a file of its own so that the suite's two workers share the load; see
tests/test_cached_eval.py."""

from __future__ import annotations

import jax
import pytest
from cached_eval_cases import (
  HEAVY,
  SEEDS,
  assert_logits_equal,
  build_voc,
  logits_both_ways,
  make_loaders,
  random_state,
  small_model,
)

from fss_jax import parallel
from fss_jax.eval import cached as cached_lib

voc_dir = pytest.fixture(scope="module")(build_voc)


@pytest.mark.parametrize("name", HEAVY)
def test_cached_logits_equal_plain(voc_dir, name, shot=5):
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  spec, model, fields = small_model(name, shot)
  loaders = make_loaders(voc_dir, shot, 2)
  st = random_state(model, loaders[SEEDS[0]], mesh)
  cache = cached_lib.FeatureCache(spec.encoder(**fields), st.variables(), loaders, mesh=mesh)
  assert_logits_equal(*logits_both_ways(model, st, cache, loaders[SEEDS[0]], SEEDS[0], 2))
