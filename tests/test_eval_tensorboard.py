"""TensorBoard from ``--mode eval`` and smoke runs; devices and mesh in the first log lines.

`fss_jax.train.data.make_data` passes the dataset's class names, `fss_jax.eval.run.evaluate`
writes its scores to TensorBoard, and both entry points log the devices and the mesh first
(`fss_jax.train.runtime.log_devices`).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import logging
import os
import re

import numpy as np
import pytest
import test_engine as te
from conftest import RUN_CONFIGS

from fss_jax.eval import metrics
from fss_jax.eval import run as eval_run
from fss_jax.models import registry
from fss_jax.train import data as data_lib
from fss_jax.train import loop


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_smoke_configs_write_tensorboard(name):
  """A smoke run takes the real run's code path, event files included."""
  c = importlib.import_module(f"configs.{name}").get_config("smoke")
  assert c.smoke and c.tensorboard


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of every event file in ``logdir``."""
  import tensorflow as tf  # clu's writers use it already

  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
        out.setdefault(v.tag, []).append((event.step, value))
  return out


def test_eval_mode_writes_scores_to_tensorboard_and_logs_the_mesh(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(registry._MODULES, "tiny_test", te.__name__)
  cfg = te.tiny_config(
    tensorboard=True,
    total_steps=1,
    **{"eval.every_steps": 0, "checkpoint.every_steps": 1, "eval.num_images": 0},
  )
  data = dataclasses.replace(te.fake_data(cfg), class_names=metrics.class_names("pascal5i"))
  loop.train_and_evaluate(cfg, tmp_path, data=data)
  with caplog.at_level(logging.INFO):
    summary = eval_run.evaluate(cfg, tmp_path, data=data)
  lines = [r.getMessage() for r in caplog.records]
  devices = re.compile(r"\d+ process\(es\), \d+ \w+ device\(s\) .* mesh \{'data': 1, 'model': 1\}")
  first = next(i for i, m in enumerate(lines) if devices.search(m))
  assert first < next(i for i, m in enumerate(lines) if m.startswith("evaluating ")), lines
  assert any(m.startswith("seed 1: 10/10 episodes (100%)") for m in lines), (
    lines
  )  # progress inside a seed

  scalars = _scalars(tmp_path)
  assert "train/loss" in scalars  # the training run's
  ((step, miou),) = scalars["eval/miou"]
  assert step == 1 and miou == pytest.approx(summary["miou_mean"], abs=1e-4)
  assert {
    "eval/miou_std",
    "eval/fb_iou",
    "eval/fb_iou_std",
    "eval/iou/1_aeroplane",
    "eval/iou/5_bottle",
  } <= set(scalars)
  assert summary["class_names"] == {
    "1": "aeroplane",
    "2": "bicycle",
    "3": "bird",
    "4": "boat",
    "5": "bottle",
  }
  assert all("aeroplane" in t for t in summary["tables"].values())


def test_real_data_carries_the_dataset_class_names(tmp_path):
  cfg = importlib.import_module("configs.panet").get_config("dataset=coco,fold=1,smoke")
  data = data_lib.make_data(cfg, tmp_path, eval_batch_size=2)
  assert data.class_names == metrics.class_names("coco20i") and data.class_names[2] == "bicycle"
  assert np.isin(data.classes, list(data.class_names)).all()
