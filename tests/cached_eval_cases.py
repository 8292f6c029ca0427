"""Shared pieces of the cached-evaluation tests (tests/test_cached_eval*.py): a synthetic
PASCAL-5i build, stored episode lists, small models, the plain and the cached evaluation and
the logits of both ways."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import random_weights

from data_prep import synthetic
from fss_jax import parallel
from fss_jax.data import episodes, pipeline, source
from fss_jax.eval import cached as cached_lib
from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.models import frozen, registry
from fss_jax.train import state as state_lib

SIZE = 41
SEEDS = (321, 322)
EPISODES = 5
# Small instances of each method (fields as the smoke configs shrink them).
FIELDS = {
  "sccan": dict(grid=16, depth=2),
  "hdmnet": dict(),
  "sccan_pahnet": dict(grid=32, blocks=2),
  "jc2a": dict(pyramid_bins=(6, 3), top_k=(3, 1), reduce_dim=32),
}
# The models whose check takes longest: tests/test_cached_eval_heavy.py.
HEAVY = ("sccan_pahnet", "hdmnet_pahnet", "symnet", "jc2a")
ENCODED = tuple(n for n in registry.names() if registry.get(n).encoder is not None)


def build_voc(tmp_path_factory):
  """240 synthetic images: enough test images per class for 5-shot episodes."""
  return synthetic.make_built_dataset(tmp_path_factory.mktemp("cached_voc"), "voc", 240, 0)


@functools.cache
def episode_file(data_dir: str, shot: int, seed: int) -> str:
  val = source.open_split(data_dir, "pascal5i", "val")
  recs = episodes.generate(
    val.index, "pascal5i", 0, "test", shot=shot, num_episodes=EPISODES, seed=seed, min_pixels=16
  )  # the synthetic classes are small: supports need only 16 px of their class
  path = f"{data_dir}/episodes_{shot}shot_{seed}.jsonl"
  episodes.write_episodes(path, recs)
  return path


def make_loaders(data_dir: str, shot: int, batch: int) -> dict:
  cfg = pipeline.EpisodeConfig(
    dataset="pascal5i", data_dir=data_dir, fold=0, shot=shot, test_size=SIZE, read_threads=1
  )
  return {
    s: pipeline.make_eval_loader(cfg, episode_file(data_dir, shot, s), global_batch_size=batch)
    for s in SEEDS
  }


@functools.cache
def small_model(name: str, shot: int):
  spec = registry.get(name)
  fields = {**({spec.shot_field: shot} if spec.shot_field else {}), **FIELDS.get(name, {})}
  return spec, spec.make_model(**fields), fields


def random_state(model, loader, mesh):
  """A state with host-drawn random weights (`random_weights.draw`), replicated."""
  example = evaluate_lib.model_inputs(next(iter(loader)))
  example = {k: v for k, v in example.items() if k != "valid"}
  shapes = state_lib.abstract(model, optax.identity(), example)
  st = state_lib.TrainState(
    step=np.zeros((), np.int32),
    params=random_weights.draw(shapes.params),
    batch_stats=random_weights.draw(shapes.batch_stats),
    opt_state=shapes.opt_state,  # optax.identity: no leaves
    rng=np.zeros(shapes.rng.shape, shapes.rng.dtype),
  )
  return jax.device_put(st, parallel.replicated(mesh))


def evaluate_all_seeds(eval_fn, st, loaders, mesh, batch, cache=None):
  summary, _ = evaluate_lib.evaluate_seeds(
    eval_fn,
    st,
    lambda s: loaders[s],
    seeds=SEEDS,
    classes=(1, 2, 3, 4, 5),
    mesh=mesh,
    local_batch_size=batch,
    to_global=(lambda s: functools.partial(cache.attach, s)) if cache is not None else None,
  )
  return summary


def logits_both_ways(model, st, cache, loader, seed, batch):
  """The model's logits on the first batch of ``loader``: plain, from the cache, and from
  the cached features with the query's shifted by 1 (a forward that reads them changes)."""
  host = evaluate_lib.pad_batch(evaluate_lib.model_inputs(next(iter(loader))), batch)
  drop = ("valid", "label_original", "label_size")
  forward = jax.jit(lambda v, ep: model.apply(v, ep, train=False)["logits"])
  want = forward(st.variables(), {k: v for k, v in host.items() if k not in drop})
  with_features = {k: v for k, v in cache.attach(seed, host).items() if k not in drop}
  got = forward(st.variables(), with_features)
  shifted = {n: v + 1 for n, v in with_features[frozen.QUERY_FEATURES].items()}
  moved = forward(st.variables(), {**with_features, frozen.QUERY_FEATURES: shifted})
  return np.asarray(want), np.asarray(got), np.asarray(moved)


def assert_logits_equal(want, got, moved):
  assert want.shape == got.shape and np.isfinite(want).all()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert np.abs(moved - want).max() > 1e-3 * np.abs(want).max(), "cached features unread"


def check_logits(data_dir: str, name: str, shot: int) -> None:
  """The logits check of `name` at `shot` on one device, a batch of 2 episodes."""
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  spec, model, fields = small_model(name, shot)
  loaders = make_loaders(data_dir, shot, 2)
  st = random_state(model, loaders[SEEDS[0]], mesh)
  cache = cached_lib.FeatureCache(spec.encoder(**fields), st.variables(), loaders, mesh=mesh)
  assert_logits_equal(*logits_both_ways(model, st, cache, loaders[SEEDS[0]], SEEDS[0], 2))
