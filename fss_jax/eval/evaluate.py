"""Evaluation over stored test episode lists: several seeds -> mean ± std, results JSON.

`evaluate_episodes` runs the jitted eval step (`fss_jax.train.step.make_eval_step`)
over one loader of stored episodes and accumulates a `metrics.ClassIoU`, logging
its progress from completed batches (`ProgressLog`: episodes done / total,
episodes/s, ETA); `evaluate_seeds` does that for every seed and summarises:

  {"seeds": {"510": {"miou": 61.2, "fb_iou": 75.0, "per_class": {...}, "episodes": 1000}, ...},
   "miou_mean": ..., "miou_std": ..., "fb_iou_mean": ..., "fb_iou_std": ...,
   "per_class_mean": {...}, "num_seeds": 5, "class_names": {"1": "aeroplane", ...}}

(percent; std over seeds with ddof=0, so one seed gives std 0). `write_json`
writes results atomically (temporary file + rename) from process 0 only;
`summary_scalars` turns a summary into TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from fss_jax import io as fss_io
from fss_jax import parallel
from fss_jax.eval import metrics as metrics_lib

# Keys of an eval batch that are bookkeeping, not model input.
_META_KEYS = ("valid",)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Numeric arrays of a host batch (strings / object arrays dropped)."""
  out = {}
  for k, v in batch.items():
    a = np.asarray(v)
    if a.dtype.kind in "biuf":
      out[k] = a
  return out


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short host batch to ``size`` episodes with copies of episode 0 (valid = 0)."""
  n = len(next(iter(batch.values())))
  valid = np.asarray(batch.get("valid", np.ones(n, np.int32)), np.int32)
  if n == size:
    return {**batch, "valid": valid}
  if n > size:
    raise ValueError(f"eval batch has {n} episodes, more than the per-process batch {size}")
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = np.concatenate([v, np.repeat(v[:1], size - n, axis=0)], axis=0)
  out["valid"] = np.concatenate([valid, np.zeros(size - n, np.int32)])
  return out


class ProgressLog:
  """Logs an evaluation's progress from completed episodes (a `evaluate_episodes` callback).

  Called with ``(done, total)`` after each batch whose results are on the host, it logs
  the first call (the time includes compilation), then at most one line every
  ``every_s`` seconds, and the last call (``done == total``)::

    seed 321: 480/1000 episodes (48%), 95.3 episodes/s, ETA 5 s

  The speed counts from the first completed batch, so compilation does not skew it.

  Args:
    label: what is evaluated ("seed 321", "validation").
    every_s: seconds between lines.
    clock: monotonic time in seconds (tests pass a fake).
    log: ``printf``-style logger (absl ``logging.info``).
  """

  def __init__(
    self,
    label: str = "eval",
    *,
    every_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[..., None] = logging.info,
  ):
    self.label, self.every_s, self.clock, self.log = label, float(every_s), clock, log
    self.start = clock()
    self.first: tuple[float, int] | None = None  # (time, episodes) of the first completed batch
    self.last_log = -math.inf

  def __call__(self, done: int, total: int | None) -> None:
    now = self.clock()
    finished = total is not None and done >= total
    if self.first is None:
      self.first = (now, done)
      self.last_log = now
      self.log(
        "%s: %s after %.1f s (compilation included)",
        self.label,
        _count(done, total),
        now - self.start,
      )
      return
    if not finished and now - self.last_log < self.every_s:
      return
    self.last_log = now
    t1, n1 = self.first
    rate = (done - n1) / max(now - t1, 1e-9)
    eta = (
      f", ETA {(total - done) / rate:.0f} s"
      if total is not None and rate > 0 and not finished
      else ""
    )
    self.log("%s: %s, %.1f episodes/s%s", self.label, _count(done, total), rate, eta)


def _count(done: int, total: int | None) -> str:
  """ "480/1000 episodes (48%)", or "480 episodes" when the total is unknown."""
  if not total:
    return f"{done} episodes"
  return f"{done}/{total} episodes ({100.0 * done / total:.0f}%)"


def evaluate_episodes(
  eval_fn: Callable,
  state: Any,
  batches: Iterable[Mapping[str, Any]],
  *,
  classes: Sequence[int],
  mesh,
  local_batch_size: int,
  class_names: Mapping[int, str] | None = None,
  max_batches: int | None = None,
  baseline: metrics_lib.ClassIoU | None = None,
  total: int | None = None,
  progress: Callable[[int, int | None], None] | None = None,
  to_global: Callable[[dict[str, np.ndarray]], Any] | None = None,
) -> metrics_lib.ClassIoU:
  """Accumulates the eval step's counts over ``batches`` (this process's shards).

  Args:
    eval_fn: jitted ``(state, global batch) -> {"intersection", "union", "class_id", "valid"}``.
    state: the train state.
    batches: host batches of this process (every process must yield the same number).
    classes: the novel classes (global ids) of the fold.
    mesh: the device mesh.
    local_batch_size: episodes per process per step (short batches are padded).
    class_names: optional {id: name} for the table (`metrics.class_names(dataset)`).
    max_batches: stop after this many batches.
    baseline: if given, also accumulates the trivial "every pixel is the episode's
      foreground" prediction on the same episodes (from the target areas).
    total: the number of episodes (all processes), for the progress lines; default
      ``batches.episodes_per_epoch`` (the eval loaders have it), else unknown.
    progress: called as ``progress(done, total)`` after every batch once its results
      are on the host (``done``: valid episodes scored so far, all processes); default
      a `ProgressLog` line every 10 s.
    to_global: this process's padded host batch -> the global batch the step reads
      (default `parallel.to_global`; cached evaluation adds the encoder features,
      `fss_jax.eval.cached.FeatureCache.attach`).

  Returns:
    The filled `metrics.ClassIoU` (identical on every process).
  """
  acc = metrics_lib.ClassIoU(classes, class_names)
  if total is None:
    total = getattr(batches, "episodes_per_epoch", None)
  progress = progress or ProgressLog("evaluation")

  def count(step_out: Any) -> None:  # waits for one step's counts, adds them, reports
    out = parallel.to_host(step_out)
    acc.add(out["intersection"], out["union"], out["class_id"], out["valid"] > 0)
    if baseline is not None:
      baseline.add(*all_foreground_counts(out["target"]), out["class_id"], out["valid"] > 0)
    progress(acc.episodes, total)

  # One step in flight: batch i + 1 is read, given its cached features and dispatched
  # before step i's counts are fetched, so the host's work overlaps the device's.
  in_flight = None
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    host = pad_batch(model_inputs(batch), local_batch_size)
    batch_in = to_global(host) if to_global is not None else parallel.to_global(host, mesh)
    step_out = eval_fn(state, batch_in)
    if in_flight is not None:
      count(in_flight)
    in_flight = step_out
  if in_flight is not None:
    count(in_flight)
  if total != acc.episodes:  # stopped early (max_batches) or the total was unknown: a last line
    progress(acc.episodes, acc.episodes)
  return acc


def all_foreground_counts(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(intersection, union) [B, C] of predicting way 1 everywhere, from target areas [B, C]."""
  target = np.asarray(target, np.int64)
  inter = np.zeros_like(target)
  inter[:, 1] = target[:, 1]
  union = target.copy()
  union[:, 1] = target.sum(axis=1)
  return inter, union


def summarize(per_seed: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
  """Mean ± std (ddof=0) over seeds of mIoU, FB-IoU and every class IoU."""
  seeds = list(per_seed)
  if not seeds:
    raise ValueError("no seed results to summarise")
  miou = np.asarray([per_seed[s]["miou"] for s in seeds], np.float64)
  fb = np.asarray([per_seed[s]["fb_iou"] for s in seeds], np.float64)
  classes = list(per_seed[seeds[0]]["per_class"])
  per_class = {c: float(np.mean([per_seed[s]["per_class"][c] for s in seeds])) for c in classes}
  return {
    "seeds": {str(s): dict(per_seed[s]) for s in seeds},
    "num_seeds": len(seeds),
    "miou_mean": float(miou.mean()),
    "miou_std": float(miou.std()),
    "miou_max": float(miou.max()),
    "fb_iou_mean": float(fb.mean()),
    "fb_iou_std": float(fb.std()),
    "per_class_mean": per_class,
  }


def evaluate_seeds(
  eval_fn: Callable,
  state: Any,
  make_loader: Callable[[int], Iterable],
  *,
  seeds: Sequence[int],
  classes: Sequence[int],
  mesh,
  local_batch_size: int,
  class_names: Mapping[int, str] | None = None,
  to_global: Callable[[int], Callable[[dict[str, np.ndarray]], Any]] | None = None,
) -> tuple[dict, dict[int, str]]:
  """Runs `evaluate_episodes` for every seed.

  Args:
    make_loader: seed -> this process's batches of that seed's stored episodes.
    class_names: {id: name} shown in the tables and kept in the summary.
    to_global: seed -> that seed's `evaluate_episodes` ``to_global`` (cached evaluation).

  Returns:
    (the `summarize` dict, plus ``"class_names"`` {str(id): name} of ``classes`` when
    names are given; {seed: per-class table text}).
  """
  per_seed, tables = {}, {}
  for seed in seeds:
    t0 = time.time()
    acc = evaluate_episodes(
      eval_fn,
      state,
      make_loader(int(seed)),
      classes=classes,
      mesh=mesh,
      local_batch_size=local_batch_size,
      class_names=class_names,
      progress=ProgressLog(f"seed {int(seed)}"),
      to_global=to_global(int(seed)) if to_global is not None else None,
    )
    r = acc.result()
    r["seconds"] = round(time.time() - t0, 3)
    per_seed[int(seed)] = r
    tables[int(seed)] = acc.table()
    logging.info(
      "seed %d: mIoU %.2f FB-IoU %.2f over %d episodes (%.1fs)\n%s",
      seed,
      r["miou"],
      r["fb_iou"],
      r["episodes"],
      r["seconds"],
      tables[int(seed)],
    )
  summary = summarize(per_seed)
  names = {int(c): str(n) for c, n in (class_names or {}).items()}
  named = {str(c): names[int(c)] for c in classes if int(c) in names}
  if named:
    summary["class_names"] = named
  return summary, tables


def summary_scalars(summary: Mapping[str, Any], *, prefix: str = "eval") -> dict[str, float]:
  """TensorBoard scalars of a `summarize` dict: mIoU / FB-IoU mean and std, per-class IoU.

  Per-class tags read ``f"{prefix}/iou/{id}_{name}"`` (``"eval/iou/3_bird"``), or
  ``f"{prefix}/iou/{id}"`` without a name in ``summary["class_names"]``.
  """
  names = summary.get("class_names") or {}
  out = {
    f"{prefix}/miou": float(summary["miou_mean"]),
    f"{prefix}/miou_std": float(summary["miou_std"]),
    f"{prefix}/fb_iou": float(summary["fb_iou_mean"]),
    f"{prefix}/fb_iou_std": float(summary["fb_iou_std"]),
  }
  for c, v in summary["per_class_mean"].items():
    name = names.get(str(c), "").replace(" ", "_")
    out[f"{prefix}/iou/{c}_{name}" if name else f"{prefix}/iou/{c}"] = float(v)
  return out


def write_json(path: str | os.PathLike, obj: Any) -> os.PathLike | None:
  """Writes ``obj`` as JSON atomically (process 0 only); returns the path (None elsewhere)."""
  if jax.process_index() != 0:
    return None
  return fss_io.atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def format_summary(summary: Mapping[str, Any]) -> str:
  """One line: mIoU mean ± std (per seed) and FB-IoU."""
  seeds = ", ".join(f"{s}: {r['miou']:.2f}" for s, r in summary["seeds"].items())
  return (
    f"mIoU {summary['miou_mean']:.2f} ± {summary['miou_std']:.2f} "
    f"(FB-IoU {summary['fb_iou_mean']:.2f} ± {summary['fb_iou_std']:.2f}) over "
    f"{summary['num_seeds']} seed(s) [{seeds}]"
  )


__all__ = [
  "evaluate_episodes",
  "all_foreground_counts",
  "evaluate_seeds",
  "summarize",
  "write_json",
  "format_summary",
  "model_inputs",
  "pad_batch",
  "ProgressLog",
  "summary_scalars",
]
