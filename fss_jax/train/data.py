"""The data a run reads: `Data` (what the loop and ``--mode eval`` consume) and `make_data`, its
real implementation over the built TFDS dataset (`fss_jax.data.pipeline`'s grain loaders).

Training batches are Episode dicts of numpy arrays (docs/DESIGN.md §2), ``B / process_count``
episodes per process. Test episodes are stored lists (`ensure_episodes` writes
``<episodes_dir or workdir/episodes>/<dataset>_f<fold>_[<N>way]<K>shot_s<seed>_n<num><tag>.jsonl``
once, deterministically from the seed, through `fss_jax.data.episodes.write_episodes`), so
validation and evaluation score the same episodes on every run and process count. Tests inject
their own `Data`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from absl import logging
from etils import epath

from fss_jax import io as fss_io
from fss_jax import parallel
from fss_jax.eval import metrics as metrics_lib
from fss_jax.eval import protocol as protocol_lib


@dataclasses.dataclass
class Data:
  """What the loop reads.

  Attributes:
    train: () -> training loader: ``iter(loader)`` yields this process's host
      batches (Episode dicts of numpy arrays) and has ``get_state()`` /
      ``set_state()``; optional ``steps_per_epoch``.
    eval: (seed, num_episodes) -> this process's batches of the stored test
      episodes of that seed (each with ``valid``; all processes yield the same
      number of batches).
    classes: the fold's novel classes (global ids) scored by the mIoU.
    class_names: optional {id: name}.
  """

  train: Callable[[], Any]
  eval: Callable[[int, int], Iterable[Mapping[str, Any]]] | None
  classes: tuple[int, ...]
  class_names: Mapping[int, str] | None = None


def global_eval_batch_size(config, mesh) -> int:
  """The global evaluation batch: ``config.eval.batch_size``, or one episode per device of the
  mesh's data axis when it is <= 0."""
  bs = int(config.eval.batch_size)
  d = parallel.data_size(mesh)
  if bs <= 0:
    bs = d
  return bs


def episode_config(config):
  """``config.data`` + run fields -> `fss_jax.data.pipeline.EpisodeConfig` (``score_size``: the
  test size when the protocol scores at the input, so any image size fits)."""
  from fss_jax.data import pipeline

  d = config.data
  scoring = protocol_lib.scoring(config)
  return pipeline.EpisodeConfig(
    dataset=config.dataset,
    data_dir=os.fspath(fss_io.user_path(d.data_dir)),
    fold=config.fold,
    shot=config.shot,
    way=config.way,
    seed=config.seed,
    train_size=d.train_size,
    train_resize=d.train_resize,
    scale=tuple(d.scale),
    rotate=tuple(d.rotate),
    blur=float(d.get("blur", pipeline.EpisodeConfig.blur)),
    test_size=d.test_size,
    test_resize=d.test_resize,
    label_bucket=d.label_bucket or None,
    score_size=int(scoring.size) if scoring.mode == "input" else None,
    protocol=d.protocol,
    coco_split=d.coco_split,
    base_label=d.base_label,
    worker_count=d.worker_count,
    read_threads=d.read_threads,
    prefetch_batches=d.prefetch_batches,
  )


def episodes_path(config, workdir: epath.Path, seed: int, num: int) -> epath.Path:
  """Where the stored test episodes of (dataset, fold, way, shot, seed, num) live (no fold for
  a fold-less cross-domain test set)."""
  from fss_jax.data import pipeline

  root = (
    fss_io.user_path(config.eval.episodes_dir) if config.eval.episodes_dir else workdir / "episodes"
  )
  way = f"{config.way}way" if config.way > 1 else ""
  fold = "" if pipeline.is_cross_domain(config.dataset) else f"_f{config.fold}"
  name = (
    f"{config.dataset}{fold}_{way}{config.shot}shot_s{seed}_n{num}"
    f"{protocol_lib.episodes_tag(config)}.jsonl"
  )
  return root / name


def ensure_episodes(config, workdir: epath.Path, seed: int, num: int) -> epath.Path:
  """The stored test episode list, generated (deterministically) when absent."""
  from fss_jax.data import episodes as episodes_lib
  from fss_jax.data import source as source_lib

  path = episodes_path(config, workdir, seed, num)
  if not path.is_file():
    src = source_lib.open_split(
      fss_io.user_path(config.data.data_dir),
      config.dataset,
      episodes_lib.test_split(config.dataset),
    )
    records = episodes_lib.generate(
      src.index,
      config.dataset,
      config.fold,
      "test",
      shot=config.shot,
      num_episodes=num,
      seed=seed,
      way=config.way,
      protocol=config.data.protocol,
      coco_split=config.data.coco_split,
      **protocol_lib.episode_kwargs(config),
    )
    episodes_lib.write_episodes(path, records)
    logging.info("wrote %d test episodes (seed %d) to %s", len(records), seed, path)
  return path


def make_data(config, workdir: epath.Path, *, eval_batch_size: int) -> Data:
  """The real data: grain loaders over the built TFDS dataset."""
  from fss_jax.data import pipeline

  ecfg = episode_config(config)
  p, n = jax.process_index(), jax.process_count()

  task = config.data.get("task", "episodes")
  if task not in ("episodes", "base"):
    raise ValueError(f"config.data.task must be 'episodes' or 'base', got {task!r}")
  make = pipeline.make_base_train_loader if task == "base" else pipeline.make_train_loader

  def train():
    # "base": base-learner batches {"image", "label"} over the whole train pool (BAM BaseData).
    return make(ecfg, global_batch_size=config.batch_size, shard_index=p, shard_count=n)

  def evaluate(seed: int, num: int):
    path = ensure_episodes(config, workdir, seed, num)
    return pipeline.make_eval_loader(
      ecfg, path, global_batch_size=eval_batch_size, shard_index=p, shard_count=n
    )

  return Data(
    train=train,
    eval=evaluate,
    classes=ecfg.test_classes(),
    class_names=metrics_lib.class_names(ecfg.dataset),
  )


__all__ = [
  "Data",
  "ensure_episodes",
  "episode_config",
  "episodes_path",
  "global_eval_batch_size",
  "make_data",
]
