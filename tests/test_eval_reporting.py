"""Evaluation reporting: progress inside a seed, class names in the results, TensorBoard scalars."""

from __future__ import annotations

import numpy as np
import pytest

from fss_jax import parallel
from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.eval import metrics


class FakeLoader:
  """Host batches of ``sizes`` episodes (local batch 2; a short batch gets padded)."""

  def __init__(self, sizes=(2, 2, 1), class_ids=(1, 2)):
    self.sizes, self.class_ids = sizes, class_ids
    self.episodes_per_epoch = sum(sizes)

  def __iter__(self):
    for i, n in enumerate(self.sizes):
      yield {
        "x": np.zeros((n, 3), np.float32),
        "class_id": np.full(n, self.class_ids[i % 2], np.int32),
        "valid": np.ones(n, np.int32),
      }


class FakeEvalStep:
  """An eval step with fixed counts that records the valid episodes of each batch it is
  dispatched (in order; `evaluate_episodes` fetches them one step later)."""

  def __init__(self):
    self.returned = []

  def __call__(self, state, batch):
    del state
    valid = np.asarray(batch["valid"])
    b = len(valid)
    self.returned.append(int(valid.sum()))
    return {
      "intersection": np.tile([[3, 1]], (b, 1)),
      "union": np.tile([[4, 2]], (b, 1)),
      "class_id": np.asarray(batch["class_id"]),
      "valid": valid,
    }


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"num_devices": 1})


def test_progress_counts_completed_valid_episodes(mesh):
  step, reported = FakeEvalStep(), []

  def progress(done, total):
    fetched = len(reported) + 1  # progress runs once per batch whose counts are on the host
    assert done == sum(step.returned[:fetched]), "only batches whose results are on the host count"
    assert len(step.returned) <= fetched + 1, "at most one step in flight"
    reported.append((done, total))

  acc = evaluate_lib.evaluate_episodes(
    step, None, FakeLoader(), classes=(1, 2), mesh=mesh, local_batch_size=2, progress=progress
  )
  assert reported == [(2, 5), (4, 5), (5, 5)]  # the padding episode of batch 3 is not counted
  assert acc.episodes == 5


def test_progress_ends_at_the_scored_count_when_stopped_early(mesh):
  reported = []
  evaluate_lib.evaluate_episodes(
    FakeEvalStep(),
    None,
    FakeLoader(),
    classes=(1, 2),
    mesh=mesh,
    local_batch_size=2,
    max_batches=2,
    progress=lambda done, total: reported.append((done, total)),
  )
  assert reported == [(2, 5), (4, 5), (4, 4)]


def test_progress_log_lines():
  now, lines = [100.0], []
  log = evaluate_lib.ProgressLog(
    "seed 321", every_s=10, clock=lambda: now[0], log=lambda fmt, *args: lines.append(fmt % args)
  )
  for t, done in ((130.0, 100), (135.0, 200), (140.0, 300), (145.0, 400), (146.0, 500)):
    now[0] = t
    log(done, 500)
  assert lines == [
    "seed 321: 100/500 episodes (20%) after 30.0 s (compilation included)",
    "seed 321: 300/500 episodes (60%), 20.0 episodes/s, ETA 10 s",  # 10 s after the first line
    "seed 321: 500/500 episodes (100%), 25.0 episodes/s",  # the last batch is always logged
  ]


def test_evaluate_seeds_keeps_class_names_in_tables_and_summary(mesh):
  summary, tables = evaluate_lib.evaluate_seeds(
    FakeEvalStep(),
    None,
    lambda seed: FakeLoader(),
    seeds=(321, 322),
    classes=(1, 2),
    mesh=mesh,
    local_batch_size=2,
    class_names=metrics.class_names("pascal5i"),
  )
  assert summary["class_names"] == {"1": "aeroplane", "2": "bicycle"}
  assert all("aeroplane" in t and "bicycle" in t for t in tables.values())
  scalars = evaluate_lib.summary_scalars(summary)
  assert scalars == {
    "eval/miou": pytest.approx(50.0),
    "eval/miou_std": 0.0,
    "eval/fb_iou": pytest.approx(62.5),
    "eval/fb_iou_std": 0.0,
    "eval/iou/1_aeroplane": pytest.approx(50.0),
    "eval/iou/2_bicycle": pytest.approx(50.0),
  }
