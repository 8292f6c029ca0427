"""Episode loaders: a built TFDS split (`source.SplitSource`) -> grain -> batched episodes.

Layout of one global batch step t (G = global batch, P processes, b = G / P): process
p gets the episodes with global indices ``t·G + p·b … t·G + p·b + b - 1``. Every
episode (query, class, supports, augmentation draws) is a pure function of
``(seed, global index)``, so processes need no communication, the P shards of an
epoch are disjoint and cover it, and the worker count never changes the data.

Training (`make_train_loader`) is an endless stream (or ``num_epochs`` epochs): epoch
e visits every query of the fold's training list once, in a permutation seeded by
(seed, e); the episode class and supports are drawn per episode (§7); the §8
augmentation runs as grain ``random_map`` ops seeded by the pipeline seed and the
global index.

Evaluation (`make_eval_loader`) reads a stored JSON-lines episode file
(``python -m fss_jax.data.episodes --split test``) so every model sees the same
episodes. Its length is padded to a multiple of G with copies of episode 0 whose
``valid`` entry is 0 — drop them from the metric sums. The cross-domain test sets
(``fss1000``, ``deepglobe``, ``isic2018``, ``chest_xray``; docs/cross_domain.md) are read
from their "test" split, over every class of it, and their binary masks (1 = the record's
class) give 1-way episodes only.

Batches (dict of numpy arrays, docs/DESIGN.md §2 "The episode"), b = per-process batch::

  query_image [b, H, W, 3] f32 (ImageNet-normalised)    query_mask [b, H, W] u8 (0/1/255)
  support_images [b, K, H, W, 3] f32                       support_masks [b, K, H, W] u8
  class_id [b] i32 (original class id)                      class_index [b] i32 (subcls)
  episode_index [b] i32                                     query_base_label [b, H, W] u8 (optional)
  eval only: label_original [b, Hb, Wb] u8 (255-padded), label_size [b, 2] i32, valid [b] i32
  N-way: support_* get a way axis [b, N, K, ...]; class_id / class_index are [b, N].

Labels stay uint8 (a quarter of the bytes to copy and transfer); the jitted steps
(`fss_jax.train.step`) widen them to int32 on the device. Each episode's last op
(`transforms.fused_ops`) hands its images over unmaterialised and `transforms.batch_episodes`
normalises them straight into their batch rows (for a crop, from the unpadded image), in
worker processes into shared memory, which reaches this process without another copy.

The loader's iterator is a grain ``DatasetIterator``: ``it.get_state()`` /
``it.set_state(state)`` (JSON-able dicts; orbax: ``grain.checkpoint.CheckpointSave``)
resume to the same next batches; restore with the same worker count (``worker_count=-1``
resolves the same way on the same host: `resolve_worker_count`; `Loader.worker_count`
is the number used). With workers the training data is produced in spawned processes:
scripts must run under ``if __name__ == "__main__":``. Evaluation loaders always run in
this process (no worker start-up on the evaluation path).

Usage::

  cfg = EpisodeConfig(dataset="pascal5i", data_dir=D, fold=0, shot=1)
  train = make_train_loader(cfg, global_batch_size=8, shard_index=jax.process_index(),
                            shard_count=jax.process_count())
  it = iter(train); batch = next(it)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import numpy as np

from fss_jax.data import episodes as episodes_lib
from fss_jax.data import splits
from fss_jax.data import transforms as T

DEFAULT_LABEL_BUCKET = {"pascal5i": 512, "coco20i": 640}
AUTO_WORKERS = -1  # EpisodeConfig.worker_count: from the host's cores (resolve_worker_count)
MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def resolve_worker_count(worker_count: int) -> int:
  """``EpisodeConfig.worker_count`` -> grain worker processes: itself when >= 0; for
  `AUTO_WORKERS` (-1) one per usable core but one (left to the training step), at most
  `MAX_AUTO_WORKERS` (0 on a single core). The same on every run on one host."""
  if worker_count != AUTO_WORKERS:
    return worker_count
  return min(MAX_AUTO_WORKERS, usable_cores() - 1)


def canonical_dataset(name: str) -> str:
  """ "pascal5i" / "coco20i" / a cross-domain test set ("isic2018", ...) for a name or alias."""
  try:
    kind = splits.dataset_kind(name)
  except ValueError:
    raise ValueError(
      f"unknown dataset {name!r}; use one of "
      f"{', '.join(splits.DATASETS + splits.CROSS_DOMAIN_DATASETS)}"
    ) from None
  return (
    splits.canonical_cross_domain(name)
    if kind == "cross_domain"
    else splits.canonical_dataset(name)
  )


def is_cross_domain(dataset: str) -> bool:
  """A fold-less cross-domain test set (binary masks, a "test" split; docs/cross_domain.md)."""
  try:
    return splits.dataset_kind(dataset) == "cross_domain"
  except ValueError:
    return False


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
  """Everything the loaders need, as plain fields (filled from the engine's config).

  Attributes:
    dataset: "pascal5i" or "coco20i".
    data_dir: the ``--data_dir`` of ``python -m data_prep.build``.
    fold, shot, way: the episode setting (way 1 = the PFENet/BAM protocol).
    seed: sampling + augmentation seed of the training stream.
    train_size: crop (or squash) size, e.g. 473 (PASCAL), 641 (BAM COCO).
    train_resize: "crop" (PFENet/BAM/SCCAN) or "squash" (HDMNet).
    scale, rotate: RandScale range and RandRotate angle range (§8); (1, 1) / (0, 0) leave
      the step out.
    blur: probability of the Gaussian blur (§8.3; 0 leaves it out).
    test_size: S of §9 (473; BAM COCO 641; HDMNet COCO 633).
    test_resize: "aspect" (§9.1, aspect + pad) or "squash" (§9.2).
    label_bucket: side of the padded original-size query label of eval batches
      (None: 512 PASCAL / 640 COCO, the largest query of the episode list on the
      cross-domain sets); every eval query must fit. Not used with ``score_size``.
    score_size: S when the protocol scores at the input size (``score="input"``: HSNet,
      PATNet): the eval query label is resized to S×S on the host by torch's nearest rule
      (``label_original`` [S, S], ``label_size`` (S, S)), so any image size fits (ISIC,
      Chest X-ray images are thousands of px). None: scored at the original label size.
    protocol: "bam" (training images with novel pixels removed) or "pfenet".
    coco_split: "interleaved" (default) or "contiguous".
    base_label: also yield ``query_base_label`` (BAM/HDMNet base learner ensemble).
    min_pixels: the §5.1 list threshold (2·32·32 = 2048; change only for toy data).
    worker_count: grain worker processes of the training loaders: 0 produces in this
      process, -1 ("auto") one per usable core but one, at most `MAX_AUTO_WORKERS`
      (`resolve_worker_count`; 0 on a single core). Evaluation loaders ignore it (always
      in this process).
    worker_buffer_size: batches each worker keeps ready.
    read_threads: threads per producing process (OpenCV releases the GIL).
    prefetch_batches: batches buffered per producing process.
    cv2_threads: OpenCV threads inside worker processes (None: leave OpenCV's default).
    tune_malloc: keep freed multi-MB buffers in the producing process (glibc ``mallopt``:
      mmap threshold 32 MiB, trim threshold 128 MiB) instead of returning them to the OS
      and page-faulting them back for every image (about 2x faster augmentation). Applied
      in worker processes, and in this process when ``worker_count == 0``.
  """

  dataset: str = "pascal5i"
  data_dir: str = "~/tensorflow_datasets"
  fold: int = 0
  shot: int = 1
  way: int = 1
  seed: int = 321
  train_size: int = 473
  train_resize: str = "crop"
  scale: tuple[float, float] = (0.9, 1.1)
  rotate: tuple[float, float] = (-10.0, 10.0)
  blur: float = 0.5
  test_size: int = 473
  test_resize: str = "aspect"
  label_bucket: int | None = None
  score_size: int | None = None
  protocol: str = "bam"
  coco_split: str = "interleaved"
  base_label: bool = False
  min_pixels: int = splits.MIN_PIXELS
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 2
  prefetch_batches: int = 2
  cv2_threads: int | None = 1
  tune_malloc: bool = True

  def __post_init__(self):
    object.__setattr__(self, "dataset", canonical_dataset(self.dataset))
    episodes_lib.check_way(self.dataset, self.way)
    object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
    object.__setattr__(self, "rotate", tuple(float(v) for v in self.rotate))
    if self.train_resize not in T.TRAIN_RESIZES:
      raise ValueError(
        f"train_resize must be one of {', '.join(T.TRAIN_RESIZES)}, got {self.train_resize!r}"
      )
    if self.test_resize not in ("aspect", "squash"):
      raise ValueError(f"test_resize must be 'aspect' or 'squash', got {self.test_resize!r}")
    if self.worker_count < AUTO_WORKERS or self.read_threads < 1:
      raise ValueError(
        f"worker_count must be >= 0 (or {AUTO_WORKERS}: auto) and read_threads >= 1, got "
        f"{self.worker_count}, {self.read_threads}"
      )

  @property
  def bucket(self) -> tuple[int, int] | None:
    """(Hb, Wb) of eval labels: ``label_bucket`` or the dataset's default (None: none set)."""
    side = self.label_bucket or DEFAULT_LABEL_BUCKET.get(self.dataset)
    return (int(side), int(side)) if side else None

  @property
  def cross_domain(self) -> bool:
    return is_cross_domain(self.dataset)

  @property
  def test_split(self) -> str:
    """The split test episodes come from: "val" (PASCAL-5i, COCO-20i) or "test" (cross-domain)."""
    return episodes_lib.test_split(self.dataset)

  def fold_classes(self) -> splits.FoldClasses:
    if self.cross_domain:
      raise ValueError(
        f"{self.dataset} is a cross-domain test set: it has no folds and no base classes"
      )
    return splits.fold_classes(self.dataset, self.fold, coco_split=self.coco_split)

  def test_classes(self) -> tuple[int, ...]:
    """The classes the test episodes are drawn from and scored over: the fold's novel classes,
    or every class of a cross-domain test split (`splits.cross_domain`)."""
    if self.cross_domain:
      return tuple(splits.cross_domain(self.dataset).classes(self.test_split))
    return tuple(self.fold_classes().novel)


# -- sharding ------------------------------------------------------------------------------


def per_process_batch(global_batch_size: int, shard_count: int) -> int:
  """b = G / P; ValueError unless P divides G."""
  if global_batch_size < 1 or shard_count < 1 or global_batch_size % shard_count:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {shard_count} "
      f"processes; choose a multiple of {shard_count}"
    )
  return global_batch_size // shard_count


def global_indices(
  local: np.ndarray | int, *, global_batch_size: int, shard_index: int, shard_count: int
) -> np.ndarray | int:
  """Global episode index of a process-local element index (see the module docstring)."""
  b = per_process_batch(global_batch_size, shard_count)
  return (local // b) * global_batch_size + shard_index * b + local % b


class _Range(grain.MapDataset):
  """Global episode indices 0..n-1 (``n = sys.maxsize``: endless)."""

  def __init__(self, n: int):
    super().__init__()
    self._n = int(n)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return int(index)

  def __str__(self) -> str:
    return f"EpisodeRange(n={self._n})"


class _ProcessShard(grain.MapDataset):
  """Process-local view: local element i -> global element `global_indices(i)`."""

  def __init__(
    self, parent: grain.MapDataset, *, global_batch_size: int, shard_index: int, shard_count: int
  ):
    super().__init__(parent)
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    self._g = global_batch_size
    self._p = shard_index
    self._n = shard_count
    self._b = per_process_batch(global_batch_size, shard_count)
    n = len(parent)
    self._len = sys.maxsize if n >= sys.maxsize else (n // global_batch_size) * self._b

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[
      global_indices(
        int(index), global_batch_size=self._g, shard_index=self._p, shard_count=self._n
      )
    ]

  def __str__(self) -> str:
    return f"ProcessShard({self._p}/{self._n}, global_batch={self._g})"


# -- sources -------------------------------------------------------------------------------


class ArraySource:
  """In-memory stand-in for `source.SplitSource` (tests, demos, user images).

  Args:
    images: N arrays uint8 [H_i, W_i, 3] RGB.
    labels: N arrays uint8 [H_i, W_i] raw class ids (0 background, 1..C, 255 ignore).
    num_classes: C.
    image_ids: N unique ids (default "img_00000", ...).
  """

  def __init__(
    self,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    num_classes: int,
    image_ids: Sequence[str] | None = None,
  ):
    from fss_jax.data import source as source_lib

    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = [np.asarray(i, np.uint8) for i in images]
    self.labels = [np.asarray(l, np.uint8) for l in labels]
    ids = list(image_ids) if image_ids is not None else [f"img_{i:05d}" for i in range(len(images))]
    for i, (im, lb) in enumerate(zip(self.images, self.labels)):
      if im.ndim != 3 or im.shape[2] != 3 or im.shape[:2] != lb.shape:
        raise ValueError(
          f"image {ids[i]}: image {im.shape} and label {lb.shape} do not match [H, W, 3] / [H, W]"
        )
      bad = np.setdiff1d(np.unique(lb), np.r_[np.arange(num_classes + 1), T.IGNORE])
      if len(bad):
        raise ValueError(
          f"image {ids[i]}: label values {bad.tolist()} are not classes 0..{num_classes} or 255"
        )
    counts = (
      np.stack([np.bincount(l.ravel(), minlength=256) for l in self.labels])
      if self.labels
      else np.zeros((0, 256), np.int64)
    )
    self.index = source_lib.DatasetIndex(
      image_ids=np.asarray(ids, dtype=str),
      heights=np.asarray([l.shape[0] for l in self.labels], np.int32),
      widths=np.asarray([l.shape[1] for l in self.labels], np.int32),
      class_pixels=counts[:, : num_classes + 1].astype(np.int64),
      ignore_pixels=counts[:, T.IGNORE].astype(np.int64),
    )
    self.index.validate()
    self._positions = {k: i for i, k in enumerate(ids)}

  @property
  def num_classes(self) -> int:
    return self.index.num_classes

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    return {
      "image": self.images[i],
      "label": self.labels[i],
      "image_id": str(self.index.image_ids[i]),
    }

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    return [self[k] for k in keys]

  def id_to_position(self, image_id: str) -> int:
    try:
      return self._positions[image_id]
    except KeyError:
      raise KeyError(f"image {image_id!r} is not in this source") from None


# -- loading -------------------------------------------------------------------------------


def _binary_lut(class_ids: Sequence[int], *, binary: bool = False) -> np.ndarray:
  """uint8 [256]: class_ids[w] -> w + 1, 255 -> 255, everything else -> 0 (§7.1 steps 4, 6).

  ``binary``: the label is already the record's class mask (cross-domain builds: 1 = the class,
  0 = background); 1 -> 1, 255 -> 255, all else 0. 1-way only (one class per label)."""
  lut = np.zeros(256, np.uint8)
  if binary:
    if len(class_ids) != 1:
      raise ValueError(
        f"binary masks hold one class: {len(class_ids)}-way episodes cannot be labelled"
      )
    lut[1] = 1
  else:
    for w, c in enumerate(class_ids):
      lut[int(c)] = w + 1
  lut[T.IGNORE] = T.IGNORE
  return lut


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """torch ``F.interpolate(mode="nearest")`` source indices ``min(floor(dst · in / out), in - 1)``,
  the scale in float32 as torch computes it (= `fss_jax.eval.metrics.nearest_rows`)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


@dataclasses.dataclass(frozen=True)
class LabelAtInput(grain.transforms.Map):
  """Scoring at the input size (HSNet / PATNet ``score="input"``): the query mask -> S×S by
  torch's nearest rule (PATNet ``isic.py:35``, ``F.interpolate(mask, (400, 400), "nearest")``),
  before `transforms.KeepOriginalLabel` keeps it as the scored label. The eval step's own
  nearest resize from S to S is then the identity, so the counts are those of scoring the
  original label resized on the device, for any image size."""

  size: int

  def map(self, ep):
    mask = ep["query_mask"]
    s = int(self.size)
    rows, cols = nearest_indices(mask.shape[0], s), nearest_indices(mask.shape[1], s)
    return {**ep, "query_mask": np.ascontiguousarray(mask[rows[:, None], cols[None, :]])}


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  """Record positions of one episode (what a `LoadEpisode` needs)."""

  index: int
  query: int
  class_ids: tuple[int, ...]
  class_indices: tuple[int, ...]
  supports: tuple[tuple[int, ...], ...]
  valid: bool = True


class SampleEpisode(grain.transforms.Map):
  """Global index -> `EpisodeSpec` drawn by an `episodes.EpisodeSampler`."""

  def __init__(self, sampler: episodes_lib.EpisodeSampler):
    self.sampler = sampler

  def map(self, index: int) -> EpisodeSpec:
    e = self.sampler.sample(index)
    return EpisodeSpec(e.index, e.query, e.class_ids, e.class_indices, e.supports)


class StoredEpisode(grain.transforms.Map):
  """Global index -> `EpisodeSpec` of a stored list; indices past its end are padding
  (copies of episode 0 with ``valid=False``)."""

  def __init__(self, specs: Sequence[EpisodeSpec]):
    self.specs = tuple(specs)

  def map(self, index: int) -> EpisodeSpec:
    if index < len(self.specs):
      return self.specs[index]
    return dataclasses.replace(self.specs[0], index=index, valid=False)


class LoadEpisode(grain.transforms.Map):
  """`EpisodeSpec` -> episode element (see `transforms`): decoded float32 images,
  binary masks (episode class 1, 255 kept, all else 0; N-way: way w -> w), the base
  label when ``base_lut`` is given, and the scalars."""

  def __init__(
    self,
    source,
    *,
    base_lut: np.ndarray | None = None,
    with_valid: bool = False,
    binary: bool = False,
  ):
    self.source = source
    self.base_lut = base_lut
    self.with_valid = with_valid
    self.binary = binary  # labels are the record's class mask (cross-domain builds)

  def map(self, spec: EpisodeSpec) -> dict[str, Any]:
    # One read per record: array_record's batched read starts a thread pool per call.
    q = self.source[spec.query]
    lut = _binary_lut(spec.class_ids, binary=self.binary)
    ep = {
      "query_image": q["image"].astype(np.float32),
      "query_mask": cv2.LUT(q["label"], lut),
      "query_id": q["image_id"],
    }
    if self.base_lut is not None:
      ep["query_base_label"] = cv2.LUT(q["label"], self.base_lut)
    s_img, s_msk = [], []
    for w, way in enumerate(spec.supports):
      wl = _binary_lut([spec.class_ids[w]], binary=self.binary)
      for p in way:
        item = self.source[p]
        s_img.append(item["image"].astype(np.float32))
        s_msk.append(cv2.LUT(item["label"], wl))
    ep["support_images"], ep["support_masks"] = s_img, s_msk
    single = len(spec.class_ids) == 1
    ep["class_id"] = np.asarray(spec.class_ids[0] if single else spec.class_ids, np.int32)
    ep["class_index"] = np.asarray(
      spec.class_indices[0] if single else spec.class_indices, np.int32
    )
    ep["episode_index"] = np.asarray(spec.index, np.int32)
    if self.with_valid:
      ep["valid"] = np.asarray(int(spec.valid), np.int32)
    return ep


# -- loaders ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Loader:
  """A batched episode stream of one process.

  ``iter(loader)`` -> a grain ``DatasetIterator`` (``get_state`` / ``set_state``).

  Attributes:
    dataset: the grain ``IterDataset``.
    global_batch_size, batch_size: G and the per-process b = G / P.
    episodes_per_epoch: training: queries in the fold's list; eval: stored episodes.
    steps_per_epoch: training: ⌊episodes_per_epoch / G⌋ (≥ 1; the reference's
      drop-last epoch length); eval: ⌈episodes / G⌉ batches (the last one padded).
    classes: the class list (base for training, novel for eval); ``class_index`` indexes it.
    num_steps: batches the iterator yields (None: endless).
    specs: eval: the stored episodes (record positions), in order; training: empty.
    source: eval: the record source the episodes index.
    episode_config: the `EpisodeConfig` the loader was made with.
    worker_count: the worker processes producing the batches (`resolve_worker_count` of
      the config's; 0: this process, always for evaluation).
  """

  dataset: Any
  global_batch_size: int
  batch_size: int
  episodes_per_epoch: int
  steps_per_epoch: int
  classes: tuple[int, ...]
  num_steps: int | None
  specs: tuple[EpisodeSpec, ...] = ()
  source: Any = None
  episode_config: EpisodeConfig | None = None
  worker_count: int = 0

  def __iter__(self):
    return iter(self.dataset)


def _mark_flags_parsed() -> None:
  # grain's worker processes read absl flags; libraries/tests run without absl.app.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def tune_malloc() -> bool:
  """glibc: serve and keep buffers up to 32 MiB from the heap (see EpisodeConfig.tune_malloc).

  Returns False where glibc's ``mallopt`` is unavailable (then nothing changes)."""
  try:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
  return bool(
    libc.mallopt(m_mmap_threshold, 32 << 20)
    and libc.mallopt(m_trim_threshold, 128 << 20)
    and libc.mallopt(m_top_pad, 16 << 20)
  )


@dataclasses.dataclass(frozen=True)
class _WorkerInit:
  """Picklable per-worker set-up (OpenCV threads, malloc tuning)."""

  cv2_threads: int | None
  malloc: bool

  def __call__(self, worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    if self.cv2_threads is not None:
      import cv2

      cv2.setNumThreads(self.cv2_threads)
    if self.malloc:
      tune_malloc()


def _finish(
  ds: grain.MapDataset,
  cfg: EpisodeConfig,
  *,
  global_batch_size: int,
  shard_index: int,
  shard_count: int,
  workers: int,
) -> grain.IterDataset:
  """Shard, batch (`transforms.BatchEpisodes`; in shared memory when ``workers`` > 0) and
  prefetch with ``cfg.read_threads`` threads in this process or in ``workers`` processes."""
  b = per_process_batch(global_batch_size, shard_count)
  ds = _ProcessShard(
    ds, global_batch_size=global_batch_size, shard_index=shard_index, shard_count=shard_count
  )
  ds = ds.batch(b, drop_remainder=True, batch_fn=T.BatchEpisodes(shared_memory=workers > 0))
  it = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=cfg.read_threads, prefetch_buffer_size=max(1, cfg.prefetch_batches)
    )
  )
  if workers > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=cfg.worker_buffer_size
      ),
      worker_init_fn=_WorkerInit(cfg.cv2_threads, cfg.tune_malloc),
    )
  elif cfg.tune_malloc:
    tune_malloc()
  return it


def _train_ops(cfg: EpisodeConfig) -> list:
  """The §8 chain of ``cfg``, its tail fused into the batch writes (`transforms.fused_ops`)."""
  return T.fused_ops(
    T.train_ops(
      cfg.train_size, scale=cfg.scale, rotate=cfg.rotate, blur=cfg.blur, resize=cfg.train_resize
    )
  )


def _apply_ops(ds: grain.MapDataset, ops: Sequence) -> grain.MapDataset:
  for op in ops:
    ds = ds.random_map(op) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
  return ds


def _open(cfg: EpisodeConfig, split: str, source):
  if source is not None:
    return source
  from fss_jax.data import source as source_lib

  return source_lib.open_split(cfg.data_dir, cfg.dataset, split)


def make_train_loader(
  cfg: EpisodeConfig,
  *,
  global_batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  source=None,
) -> Loader:
  """The training episode stream of this process (§7.2 sampling, §8 augmentation).

  Args:
    cfg: sizes, shot, fold, augmentation, workers.
    global_batch_size: G over all processes (P must divide it).
    shard_index, shard_count: this process and P (``jax.process_index()``,
      ``jax.process_count()``).
    num_epochs: None for an endless stream, else ⌊num_epochs·Q / G⌋ batches.
    source: the train split (default: ``source.open_split(cfg.data_dir, cfg.dataset, "train")``);
      anything with ``index``, ``__getitems__`` and picklable for worker processes.

  Returns:
    A `Loader` with batches of the module docstring's format.
  """
  src = _open(cfg, "train", source)
  sampler = episodes_lib.make_sampler(
    src.index,
    cfg.dataset,
    cfg.fold,
    "train",
    shot=cfg.shot,
    seed=cfg.seed,
    way=cfg.way,
    protocol=cfg.protocol,
    coco_split=cfg.coco_split,
    min_pixels=cfg.min_pixels,
  )
  b = per_process_batch(global_batch_size, shard_count)
  q = len(sampler)
  n = sys.maxsize if num_epochs is None else num_epochs * q
  fc = cfg.fold_classes()
  ds = _Range(n).map(SampleEpisode(sampler))
  ds = ds.map(LoadEpisode(src, base_lut=fc.base_label_lut() if cfg.base_label else None))
  ds = _apply_ops(ds.seed(cfg.seed), _train_ops(cfg))
  workers = resolve_worker_count(cfg.worker_count)
  it = _finish(
    ds,
    cfg,
    global_batch_size=global_batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    workers=workers,
  )
  return Loader(
    dataset=it,
    global_batch_size=global_batch_size,
    batch_size=b,
    episodes_per_epoch=q,
    steps_per_epoch=max(1, q // global_batch_size),
    classes=sampler.lists.classes,
    num_steps=None if num_epochs is None else n // global_batch_size,
    worker_count=workers,
  )


def load_episode_specs(
  path: str | os.PathLike, source, classes: Sequence[int]
) -> list[EpisodeSpec]:
  """Reads a stored episode file and resolves image ids to record positions.

  Raises ValueError naming the file/line for unknown images or classes outside ``classes``.
  """
  records = episodes_lib.read_episodes(path)
  classes = tuple(int(c) for c in classes)
  specs = []
  for n, r in enumerate(records):
    where = f"{path}: episode {n} (line {n + 1})"
    if isinstance(r["class_id"], list):  # N-way: one class and one support list per way
      cids, sups = r["class_id"], r["supports"]
    else:
      cids, sups = [r["class_id"]], [r["supports"]]
    if len(sups) != len(cids) or any(not isinstance(s, list) or not s for s in sups):
      raise ValueError(
        f"{where}: supports must be one non-empty list per class, got {r['supports']!r}"
      )
    bad = [c for c in cids if int(c) not in classes]
    if bad:
      raise ValueError(
        f"{where}: class {bad[0]} is not one of this fold's classes {classes}; was the file "
        f"generated for another dataset or fold?"
      )
    try:
      query = source.id_to_position(str(r["query"]))
      supports = tuple(tuple(source.id_to_position(str(s)) for s in way) for way in sups)
    except KeyError as e:
      raise ValueError(
        f"{where}: {e.args[0]}; was the file generated from another dataset build?"
      ) from None
    specs.append(
      EpisodeSpec(
        index=n,
        query=query,
        class_ids=tuple(int(c) for c in cids),
        class_indices=tuple(classes.index(int(c)) for c in cids),
        supports=supports,
      )
    )
  shots = {len(w) for s in specs for w in s.supports}
  ways = {len(s.class_ids) for s in specs}
  if len(shots) != 1 or len(ways) != 1:
    raise ValueError(
      f"{path}: episodes mix shots {sorted(shots)} / ways {sorted(ways)}; one file per setting"
    )
  return specs


def make_eval_loader(
  cfg: EpisodeConfig,
  episodes_path: str | os.PathLike,
  *,
  global_batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  source=None,
) -> Loader:
  """Batches of the stored test episodes in ``episodes_path`` (§9 test transform).

  Every process reads the whole file and keeps its shard of each global batch; the last
  global batch is filled with ``valid = 0`` copies. ``cfg.shot`` / ``cfg.way`` must match
  the file. Besides the module docstring's arrays, batches hold ``label_original``
  [b, Hb, Wb] (original-size binary query label, 255-padded into ``cfg.bucket``; S×S with
  ``cfg.score_size``) and ``label_size`` [b, 2]. ``source`` defaults to the dataset's test
  split (``cfg.test_split``: "val", or "test" for the cross-domain sets). Produced in this
  process whatever ``cfg.worker_count`` says (no worker start-up before an evaluation).
  """
  src = _open(cfg, cfg.test_split, source)
  classes = cfg.test_classes()
  specs = load_episode_specs(episodes_path, src, classes)
  shot, way = len(specs[0].supports[0]), len(specs[0].class_ids)
  if (shot, way) != (cfg.shot, cfg.way):
    raise ValueError(
      f"{episodes_path} holds {way}-way {shot}-shot episodes but the config asks for "
      f"{cfg.way}-way {cfg.shot}-shot"
    )
  idx = src.index
  qpos = np.asarray([s.query for s in specs])
  largest = int(max(idx.heights[qpos].max(), idx.widths[qpos].max()))
  if cfg.score_size:
    bucket = (int(cfg.score_size),) * 2  # labels resized to S×S on the host
  elif cfg.bucket is None:  # no default (cross-domain): fit the largest query
    bucket = (largest, largest)
  else:
    bucket = cfg.bucket
    hb, wb = bucket
    too_big = np.flatnonzero((idx.heights[qpos] > hb) | (idx.widths[qpos] > wb))
    if len(too_big):
      i = qpos[too_big[0]]
      raise ValueError(
        f"query image {idx.image_ids[i]} is {idx.heights[i]}x{idx.widths[i]}, larger than the "
        f"label bucket {hb}x{wb}; set EpisodeConfig.label_bucket >= {largest}"
      )
  base_lut = (
    cfg.fold_classes().base_label_lut() if cfg.base_label and not cfg.cross_domain else None
  )
  b = per_process_batch(global_batch_size, shard_count)
  steps = math.ceil(len(specs) / global_batch_size)
  ds = _Range(steps * global_batch_size).map(StoredEpisode(specs))
  ds = ds.map(LoadEpisode(src, base_lut=base_lut, with_valid=True, binary=cfg.cross_domain))
  ops = T.fused_ops(T.test_ops(cfg.test_size, resize=cfg.test_resize, bucket=bucket))
  ds = _apply_ops(ds, ([LabelAtInput(int(cfg.score_size))] if cfg.score_size else []) + ops)
  it = _finish(
    ds,
    cfg,
    global_batch_size=global_batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    workers=0,
  )
  return Loader(
    dataset=it,
    global_batch_size=global_batch_size,
    batch_size=b,
    episodes_per_epoch=len(specs),
    steps_per_epoch=steps,
    classes=classes,
    num_steps=steps,
    specs=tuple(specs),
    source=src,
    episode_config=cfg,
  )


# -- base-learner pre-training (BAM `BaseData`, §6) ------------------------------------------


class _BaseImage(grain.transforms.Map):
  """Global index -> {"query_image", "query_mask" = base label of the full pool}."""

  def __init__(self, source, lut: np.ndarray, seed: int, order: str):
    self.source, self.lut, self.seed, self.order = source, lut, seed, order
    self._cache: tuple[int, np.ndarray] | None = None

  def _position(self, index: int) -> int:
    n = len(self.source)
    if self.order == "list":
      return index % n
    epoch = index // n
    if self._cache is None or self._cache[0] != epoch:
      self._cache = (
        epoch,
        np.random.default_rng([episodes_lib._ORDER_STREAM, self.seed, epoch]).permutation(n),
      )
    return int(self._cache[1][index % n])

  def map(self, index: int) -> dict[str, Any]:
    item = self.source[self._position(index)]
    return {
      "query_image": item["image"].astype(np.float32),
      "query_mask": cv2.LUT(item["label"], self.lut),
      "query_id": item["image_id"],
      "episode_index": np.asarray(index, np.int32),
    }


class _RenameBase(grain.transforms.Map):
  def map(self, ep):
    return {"image": ep["query_image"], "label": ep["query_mask"], "index": ep["episode_index"]}


def make_base_train_loader(
  cfg: EpisodeConfig,
  *,
  global_batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  source=None,
) -> Loader:
  """Base-learner (PSPNet) training batches over the **whole** train pool (§6 BaseData):
  ``image`` [b, H, W, 3] f32 and ``label`` [b, H, W] u8 (base classes 1..|base|, novel
  and background 0, 255 kept), §8 augmentation with ``cfg.train_size`` / ``cfg.scale``
  (BAM: 417, (0.5, 2.0)); the crop's 85 % rule counts label 1, as the reference does."""
  src = _open(cfg, "train", source)
  fc = cfg.fold_classes()
  b = per_process_batch(global_batch_size, shard_count)
  n_img = len(src)
  n = sys.maxsize if num_epochs is None else num_epochs * n_img
  lut = fc.base_label_lut()
  ds = _Range(n).map(_BaseImage(src, lut, cfg.seed, "shuffle")).seed(cfg.seed)
  ds = _apply_ops(ds, _train_ops(cfg)).map(_RenameBase())
  workers = resolve_worker_count(cfg.worker_count)
  it = _finish(
    ds,
    cfg,
    global_batch_size=global_batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    workers=workers,
  )
  return Loader(
    dataset=it,
    global_batch_size=global_batch_size,
    batch_size=b,
    episodes_per_epoch=n_img,
    steps_per_epoch=max(1, n_img // global_batch_size),
    classes=fc.base,
    num_steps=None if num_epochs is None else n // global_batch_size,
    worker_count=workers,
  )


__all__ = [
  "EpisodeConfig",
  "Loader",
  "ArraySource",
  "EpisodeSpec",
  "SampleEpisode",
  "StoredEpisode",
  "LoadEpisode",
  "LabelAtInput",
  "make_train_loader",
  "make_eval_loader",
  "make_base_train_loader",
  "load_episode_specs",
  "per_process_batch",
  "global_indices",
  "DEFAULT_LABEL_BUCKET",
  "AUTO_WORKERS",
  "MAX_AUTO_WORKERS",
  "usable_cores",
  "resolve_worker_count",
  "canonical_dataset",
  "is_cross_domain",
  "nearest_indices",
]
