"""Evaluation that runs a model's frozen encoder once per unique test image.

Across the seeds of a test protocol (5 x 1000 episodes) the same few hundred images go
through the frozen backbone thousands of times, and at evaluation every parameter is fixed
and the test transform is deterministic. `FeatureCache` therefore encodes each unique
(image, test transform) once — per (image, class) when a model's encoder reads the support
mask — in fixed-size sharded batches, and the eval step then runs the model on episodes
that carry the cached features (`fss_jax.models.frozen`): the same model, loss-free eval
step and scoring as the plain path, minus the repeated encoder passes.

Where the cache lives:

* ``device``: an accelerator whose free memory holds the whole cache three times over keeps
  it there (replicated); each batch's features are gathered on the device.
* ``host``: otherwise the cache is host memory (numpy) and each batch's features are copied
  in with the batch; it is bounded by ``budget_bytes`` (default a quarter of the host's
  memory): when the episodes need more, they are evaluated in *windows* of consecutive
  batches whose images fit, and an image needed again in the next window is kept, not
  re-encoded. ``stats()`` reports what happened (unique images, encoder passes, windows,
  bytes, placement).

Exact: every cached feature is the encoder child's output on the same transformed image
(tests/test_cached_eval.py compares the logits and the metrics with the plain path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fss_jax import parallel
from fss_jax.data import pipeline
from fss_jax.data import transforms as T
from fss_jax.models import frozen
from fss_jax.train import checkpointing as ckpt_lib
from fss_jax.train import precision

# (record position, class id): the class whose mask a masked-support encoder reads; -1 for
# the image alone (every key of an encoder that reads no mask, and the queries).
Key = tuple[int, int]
IMAGE_ONLY = -1


@dataclasses.dataclass(frozen=True)
class EpisodeKeys:
  """The encoder inputs of one stored episode: its query and supports (way-major)."""

  query: Key
  supports: tuple[Key, ...]


def episode_keys(spec: pipeline.EpisodeSpec, *, masked_supports: bool) -> EpisodeKeys:
  supports = tuple(
    (int(p), int(c) if masked_supports else IMAGE_ONLY)
    for c, way in zip(spec.class_ids, spec.supports)
    for p in way
  )
  return EpisodeKeys((int(spec.query), IMAGE_ONLY), supports)


def supports_cache(loader: Any) -> bool:
  """Whether an eval loader exposes what caching needs (its stored episodes and source)."""
  return bool(getattr(loader, "specs", None)) and getattr(loader, "source", None) is not None


def host_memory_bytes() -> int:
  """Physical memory of this host (0 when unknown)."""
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return 0


def free_device_bytes(device: jax.Device) -> int | None:
  """Free memory of an accelerator (None: the backend does not say, e.g. CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


@functools.partial(jax.jit, static_argnames=("encoder", "dtype"))
def _encode(variables, images, masks, *, encoder: frozen.FrozenEncoder, dtype) -> dict:
  """One encoder batch (jitted once per encoder, dtype and shapes, across caches)."""
  return encoder(variables, images.astype(dtype), masks)


@jax.jit
def _gather(store: Mapping[str, jax.Array], rows: jax.Array) -> dict:
  """Device cache rows [B] / [B, NK] -> features [B, (NK,) h, w, C] (sharded as ``rows``)."""
  return {n: v[rows] for n, v in store.items()}


class TestImages:
  """Transformed test images (and class masks) of a loader's source, by `Key`.

  The same `pipeline.LoadEpisode` + `transforms.test_ops` the eval loader runs, on a
  one-support episode of the image with itself: the §9 transform is the same for a query
  and a support of one image.
  """

  def __init__(self, cfg: pipeline.EpisodeConfig, source: Any):
    self.load = pipeline.LoadEpisode(source, binary=cfg.cross_domain)
    self.ops = T.test_ops(cfg.test_size, resize=cfg.test_resize, bucket=None)

  def __call__(self, keys: Sequence[Key]) -> tuple[np.ndarray, np.ndarray]:
    """images float32 [n, S, S, 3] (normalised) and masks int32 [n, S, S] (0 / 1 / 255;
    all ones for `IMAGE_ONLY` keys)."""
    images, masks = [], []
    for pos, cls in keys:
      spec = pipeline.EpisodeSpec(0, pos, (max(cls, 0),), (0,), ((pos,),))
      ep = T.apply_ops(self.load.map(spec), self.ops)
      images.append(np.asarray(ep["query_image"], np.float32))
      m = np.asarray(ep["support_masks"][0], np.int32)
      masks.append(m if cls != IMAGE_ONLY else np.ones_like(m))
    return np.stack(images), np.stack(masks)


def _batch_keys(
  specs: Sequence[pipeline.EpisodeSpec], keys: Sequence[EpisodeKeys], g: int, size: int
) -> set[Key]:
  """Keys of global batch ``g`` (episodes past the end are copies of episode 0)."""
  out: set[Key] = set()
  for i in range(g * size, (g + 1) * size):
    ek = keys[i] if i < len(specs) else keys[0]
    out.add(ek.query)
    out.update(ek.supports)
  return out


class FeatureCache:
  """Encoder features of every test image the given eval loaders need, encoded once.

  Args:
    encoder: the model's `frozen.FrozenEncoder`.
    variables: the whole model's variables (``state.variables()``).
    loaders: {seed: eval loader} (`pipeline.make_eval_loader`; `supports_cache` true), in
      the order they will be evaluated.
    mesh: the device mesh (encoder batches are split over its data axis).
    compute_dtype: the forward's dtype (the cache holds features in it).
    encode_batch: images per encoder call (global; rounded up to the data axis).
    budget_bytes: the most host memory the cache may hold (0: a quarter of the host's).
    placement: "auto" (device when the accelerator reports free memory for 3 copies, else
      host), "host" or "device" (whole cache on the devices, as asked; on CPU that is host
      memory again, gathered inside a jit).
  """

  def __init__(
    self,
    encoder: frozen.FrozenEncoder,
    variables: Mapping[str, Any],
    loaders: Mapping[int, Any],
    *,
    mesh,
    compute_dtype: str = "float32",
    encode_batch: int = 8,
    budget_bytes: int = 0,
    placement: str = "auto",
  ):
    if not loaders or not all(supports_cache(ld) for ld in loaders.values()):
      raise ValueError("cached evaluation needs eval loaders over stored episode lists")
    self.encoder, self.mesh, self.dtype = encoder, mesh, precision.compute_dtype(compute_dtype)
    d = parallel.data_size(mesh)
    # At least 2 images per device: XLA:CPU's convolutions round a 1-image batch differently
    # from any larger one (whose per-image results agree bit for bit), and the plain
    # forward always encodes >= 2 images (query + supports) per episode.
    self.encode_batch = max(2 * d, math.ceil(encode_batch / d) * d)
    first = next(iter(loaders.values()))
    self.images = TestImages(first.episode_config, first.source)
    self.variables = encoder.variables(variables)  # replicated already (the train state)
    masked = encoder.masked_supports is not None
    self.keys = {
      s: [episode_keys(sp, masked_supports=masked) for sp in ld.specs] for s, ld in loaders.items()
    }
    self.loaders = dict(loaders)
    size = int(first.episode_config.test_size)
    shapes = jax.eval_shape(
      functools.partial(_encode, encoder=encoder, dtype=self.dtype),
      self.variables,
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, size, size), jnp.int32),
    )
    self.shapes = {n: (tuple(s.shape[1:]), s.dtype) for n, s in shapes.items()}
    self.item_bytes = sum(math.prod(sh) * np.dtype(dt).itemsize for sh, dt in self.shapes.values())
    self.unique = sorted(
      {k for ks in self.keys.values() for ek in ks for k in (ek.query, *ek.supports)}
    )
    self.placement = self._place(placement, budget_bytes)
    self.windows = self._plan()
    self._window: int | None = None
    self._rows: dict[Key, int] = {}
    self._store: dict[str, Any] = {}
    self._batch_no = {s: 0 for s in loaders}
    self.passes = 0
    self.encode_seconds = 0.0
    self.peak_bytes = 0

  # -- planning ------------------------------------------------------------------------

  def _place(self, placement: str, budget_bytes: int) -> str:
    total = self.item_bytes * len(self.unique)
    free = free_device_bytes(self.mesh.devices.flat[0])
    fits_device = free is not None and 3 * total <= free
    if placement not in ("auto", "host", "device"):
      raise ValueError(f"cache placement must be auto, host or device, got {placement!r}")
    place = "device" if placement == "device" or (placement == "auto" and fits_device) else "host"
    if place == "device":
      self.budget = max(total, self.item_bytes)
    else:
      self.budget = int(budget_bytes) or max(host_memory_bytes() // 4, self.item_bytes)
    return place

  def _plan(self) -> list[list[tuple[int, int]]]:
    """Windows of consecutive (seed, batch) whose keys fit the budget (one when all do)."""
    cap = max(1, self.budget // max(self.item_bytes, 1))
    windows: list[list[tuple[int, int]]] = [[]]
    keys: set[Key] = set()
    for seed, ld in self.loaders.items():
      for g in range(ld.steps_per_epoch):
        need = _batch_keys(ld.specs, self.keys[seed], g, ld.global_batch_size)
        if windows[-1] and len(keys | need) > cap:
          windows.append([])
          keys = set()
        windows[-1].append((seed, g))
        keys |= need
    self._window_of = {sb: w for w, win in enumerate(windows) for sb in win}
    return windows

  # -- encoding ------------------------------------------------------------------------

  def _encode_keys(self, keys: Sequence[Key]) -> dict[str, np.ndarray]:
    """Features {name: [len(keys), ...]} (host), encoded in fixed-size sharded batches."""
    t0 = time.perf_counter()
    e, p, n = self.encode_batch, jax.process_index(), jax.process_count()
    out: dict[str, list[np.ndarray]] = {name: [] for name in self.shapes}
    for start in range(0, len(keys), e):
      chunk = list(keys[start : start + e])
      chunk += [chunk[0]] * (e - len(chunk))  # fixed shape: pad with copies
      local = chunk[p * e // n : (p + 1) * e // n]
      images, masks = parallel.to_global(self.images(local), self.mesh)
      feats = parallel.to_host(
        _encode(self.variables, images, masks, encoder=self.encoder, dtype=self.dtype)
      )
      for name, v in feats.items():
        out[name].append(np.asarray(v)[: min(e, len(keys) - start)])
    self.passes += len(keys)
    self.encode_seconds += time.perf_counter() - t0
    return {name: np.concatenate(v) for name, v in out.items()}

  def _enter(self, w: int) -> None:
    """Makes window ``w``'s keys resident: kept rows copied, the others encoded."""
    need: set[Key] = set()
    for seed, g in self.windows[w]:
      ld = self.loaders[seed]
      need |= _batch_keys(ld.specs, self.keys[seed], g, ld.global_batch_size)
    order = sorted(need)
    kept = [k for k in order if k in self._rows]
    new = [k for k in order if k not in self._rows]
    fresh = self._encode_keys(new) if new else {}
    host = self._host_store() if kept else {}  # a device cache comes back only to keep rows
    rows = {k: i for i, k in enumerate(order)}
    store = {}
    for name, (shape, dt) in self.shapes.items():
      a = np.empty((len(order), *shape), dt)
      if kept:
        a[[rows[k] for k in kept]] = host[name][[self._rows[k] for k in kept]]
      if new:
        a[[rows[k] for k in new]] = fresh[name]
      store[name] = a
    self._rows = rows
    self._window = w
    if self.placement == "device":
      store = parallel.replicate(store, self.mesh)
    self._store = store
    self.peak_bytes = max(self.peak_bytes, len(order) * self.item_bytes)
    logging.info(
      "feature cache window %d/%d: %d images resident (%d encoded, %d kept), %.1f MiB on %s",
      w + 1,
      len(self.windows),
      len(order),
      len(new),
      len(kept),
      len(order) * self.item_bytes / 2**20,
      self.placement,
    )

  def _host_store(self) -> dict[str, np.ndarray]:
    if self.placement == "device" and self._store:
      return {n: np.asarray(parallel.to_host(v)) for n, v in self._store.items()}
    return self._store

  # -- batches -------------------------------------------------------------------------

  def attach(self, seed: int, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Adds ``query_features`` / ``support_features`` to this process's padded host batch
    of ``seed`` (its next batch, in loader order) and returns the global batch."""
    g = self._batch_no[seed]
    self._batch_no[seed] = g + 1
    w = self._window_of[(seed, g)]
    if w != self._window:
      self._enter(w)
    keys = self.keys[seed]
    idx = np.asarray(batch["episode_index"]).reshape(-1)
    eks = [keys[i] if i < len(keys) else keys[0] for i in idx]
    q_rows = np.asarray([self._rows[ek.query] for ek in eks], np.int32)
    s_rows = np.asarray([[self._rows[k] for k in ek.supports] for ek in eks], np.int32)
    out = parallel.to_global(dict(batch), self.mesh)
    if self.placement == "device":
      rows = parallel.to_global({"q": q_rows, "s": s_rows}, self.mesh)
      out[frozen.QUERY_FEATURES] = _gather(self._store, rows["q"])
      out[frozen.SUPPORT_FEATURES] = _gather(self._store, rows["s"])
    else:
      out[frozen.QUERY_FEATURES] = parallel.to_global(
        {n: v[q_rows] for n, v in self._store.items()}, self.mesh
      )
      out[frozen.SUPPORT_FEATURES] = parallel.to_global(
        {n: v[s_rows] for n, v in self._store.items()}, self.mesh
      )
    return out

  def stats(self) -> dict[str, Any]:
    """What the cache did: unique keys / images, encoder passes, bytes, windows, placement."""
    episodes = sum(len(ld.specs) for ld in self.loaders.values())
    per_episode = 1 + len(next(iter(self.keys.values()))[0].supports)
    return {
      "placement": self.placement,
      "unique_images": len({pos for pos, _ in self.unique}),
      "unique_inputs": len(self.unique),
      "backbone_passes": int(self.passes),
      "uncached_passes": episodes * per_episode,
      "cache_bytes": int(self.peak_bytes),
      "item_bytes": int(self.item_bytes),
      "windows": len(self.windows),
      "encode_s": round(self.encode_seconds, 3),
    }


def for_evaluation(
  config, spec: Any, variables: Mapping[str, Any], loaders: Mapping[int, Any], *, mesh, dtype: str
) -> FeatureCache | None:
  """The `FeatureCache` of an evaluation run by ``config`` (the eval config), or None for the
  plain path: ``config.eval.cache`` off, a model without a frozen encoder, or loaders that
  are not stored episode lists (each case logged)."""
  if not bool(config.eval.get("cache", True)):
    logging.info("feature cache off (config.eval.cache=False): the whole forward per episode")
    return None
  if spec.encoder is None:
    logging.info("feature cache not used: %s", spec.encoder_missing)
    return None
  if not all(supports_cache(ld) for ld in loaders.values()):
    logging.info("feature cache not used: the eval data are not stored episode lists")
    return None
  first = next(iter(loaders.values()))
  per_episode = 1 + first.episode_config.shot * first.episode_config.way
  return FeatureCache(
    spec.encoder(**ckpt_lib.model_fields(config)),
    variables,
    loaders,
    mesh=mesh,
    compute_dtype=dtype,
    encode_batch=first.global_batch_size * per_episode,
    budget_bytes=int(config.eval.get("cache_bytes", 0)),
    placement=str(config.eval.get("cache_placement", "auto")),
  )


def attach_for(cache: FeatureCache | None):
  """`evaluate.evaluate_seeds`'s ``to_global`` for ``cache`` (None: the plain path)."""
  if cache is None:
    return None
  return lambda seed: functools.partial(cache.attach, seed)


__all__ = [
  "EpisodeKeys",
  "FeatureCache",
  "TestImages",
  "attach_for",
  "episode_keys",
  "for_evaluation",
  "supports_cache",
]
