"""Smoke tests of the benchmark scripts (bench/): they run and print the documented JSON.

Timing numbers are never asserted (DESIGN.md: speed goals live in bench/ scripts);
the tests check that the real jitted train step and the eval forward run for PANet
at a tiny size, that the record has the documented keys and sane values, and that
the results page is generated from JSON lines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import results as results_lib
from bench import run as bench_run
from bench import torch_ref

COMMON_KEYS = {
  "model",
  "mode",
  "size",
  "batch",
  "shot",
  "dtype",
  "devices",
  "steps_per_s",
  "episodes_per_s",
  "images_per_s",
  "compile_s",
  "peak_memory_bytes",
  "peak_memory_kind",
  "params_total",
  "params_trainable",
  "backend",
  "device_kind",
  "jax_version",
  "model_fields",
  "command",
  "host",
}


def _record(capsys, argv):
  rec = bench_run.main(argv)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert len(lines) == 1
  printed = json.loads(lines[0])
  assert printed["steps_per_s"] == rec["steps_per_s"]
  return printed


def test_synthetic_episode_contract():
  ep = bench_run.synthetic_episode(2, 3, 17, seed=1)
  assert ep["query_image"].shape == (2, 17, 17, 3) and ep["query_image"].dtype == np.float32
  assert ep["support_images"].shape == (2, 3, 17, 17, 3)
  assert ep["support_masks"].shape == (2, 3, 17, 17) and ep["query_mask"].dtype == np.int32
  for m in (ep["query_mask"], ep["support_masks"]):
    assert set(np.unique(m)) <= {0, 1, 255}
    assert (m.reshape(-1, 17 * 17) == 1).any(axis=1).all()  # every mask has foreground
  np.testing.assert_array_equal(ep["label_size"], [[17, 17], [17, 17]])
  again = bench_run.synthetic_episode(2, 3, 17, seed=1)
  np.testing.assert_array_equal(
    ep["query_image"], again["query_image"]
  )  # torch_ref gets the same inputs


def test_panet_train_and_eval_json(capsys, tmp_path):
  out = tmp_path / "r.jsonl"
  train = _record(
    capsys,
    [
      "--model",
      "panet",
      "--mode",
      "train",
      "--size",
      "33",
      "--steps",
      "2",
      "--warmup",
      "1",
      "--out",
      str(out),
    ],
  )
  assert COMMON_KEYS <= set(train)
  assert train["mode"] == "train" and train["size"] == 33 and train["devices"] == 1
  assert train["steps_per_s"] > 0 and train["images_per_s"] == pytest.approx(
    2 * train["episodes_per_s"], rel=1e-3
  )
  assert np.isfinite(train["final_loss"])
  assert (
    train["params_total"] == train["params_trainable"] == 14_714_688
  )  # VGG-16 conv layers, nothing frozen
  assert train["model_fields"]["shots"] == 1 and train["config"] == "configs/panet.py:shot=1"
  assert train["peak_memory_bytes"] > 0
  if "flops_per_step" in train:
    assert train["flops_per_step"] > 0

  ev = _record(
    capsys,
    [
      "--model",
      "panet",
      "--mode",
      "eval",
      "--size",
      "33",
      "--batch",
      "2",
      "--devices",
      "2",
      "--steps",
      "2",
      "--warmup",
      "1",
      "--eval-fn",
      "score",
      "--peak-tflops",
      "1",
      "--out",
      str(out),
    ],
  )
  assert COMMON_KEYS <= set(ev)
  assert ev["mode"] == "eval" and ev["devices"] == 2 and ev["eval_fn"] == "score"
  assert ev["episodes_per_s"] == pytest.approx(2 * ev["steps_per_s"], rel=1e-3)
  if "flops_per_step" in ev:
    assert 0 < ev["mfu"] < 1

  # The two lines regenerate a results page with both runs.
  page = results_lib.render(results_lib.load(tmp_path))
  assert "## panet" in page and page.count("| jax | ") == 2
  assert "python bench/run.py --model panet --mode train --size 33" in page


def test_eval_protocol_record(capsys):
  """--mode eval_protocol: stored lists -> loader -> cached SCCAN (smoke fields) -> scores."""
  rec = bench_run.main(
    [
      "--model",
      "sccan",
      "--mode",
      "eval_protocol",
      "--size",
      "41",
      "--episodes",
      "3",
      "--seeds",
      "2",
      "--config-arg",
      "smoke",
      "--num-images",
      "48",
    ]
  )
  printed = json.loads([l for l in capsys.readouterr().out.splitlines() if l.startswith("{")][0])
  assert printed["episodes_per_s"] == rec["episodes_per_s"] > 0 and rec["cache"] is True
  assert set(rec["per_seed_miou"]) == {"321", "322"} and np.isfinite(rec["miou"])
  assert 0 < rec["unique_images"] <= rec["backbone_passes"] < 2 * 3 * 2  # fewer than 1 + K each
  assert rec["cache_bytes"] > 0 and rec["cache_placement"] == "host" and rec["compile_s"] > 0
  # XLA's arithmetic: the head on cached features plus the encoder passes shared out.
  assert 0 < rec["head_gflop"] < rec["gflop_per_episode"] and rec["encoder_gflop"] > 0
  shared = rec["encoder_gflop"] * rec["backbone_passes"] / 6
  assert rec["gflop_per_episode"] == pytest.approx(rec["head_gflop"] + shared, abs=0.02)


def test_results_protocol_table_compares_each_path_with_plain():
  """The protocol table: speed-up and arithmetic ratio against the plain row of the same
  (model, K, size); the latest record of a path wins."""
  common = {"_file": "eval_protocol_cpu.jsonl", "model": "m", "shot": 5, "size": 241}
  run = dict(common, mode="eval_protocol", episodes_per_seed=200, seeds=[321, 322])
  recs = [
    dict(run, cache=True, episodes_per_s=1.0, gflop_per_episode=100.0),  # superseded below
    dict(run, cache=True, episodes_per_s=1.5, gflop_per_episode=60.0),
    dict(run, cache=False, episodes_per_s=0.25, gflop_per_episode=480.0, episodes_per_seed=6),
    dict(common, impl="torch", mode="eval", steps=3, episodes_per_s=0.3),
  ]
  page = results_lib.render(recs)
  rows = [l for l in page.splitlines() if l.startswith("| m | 5 | 241 |")]
  assert [r.split(" | ")[3:8] for r in rows] == [
    ["cached", "200 × 2", "1.5", "6.00×", "60.0"],
    ["plain", "6 × 2", "0.25", "1.00×", "480"],
    ["official (forward only)", "3 steps", "0.3", "1.20×", "–"],
  ]
  assert [r.split(" | ")[8] for r in rows] == ["8.00×", "1.00×", "–"]


def test_bfloat16_train_record(capsys):
  rec = _record(
    capsys,
    [
      "--model",
      "panet",
      "--mode",
      "train",
      "--size",
      "33",
      "--steps",
      "1",
      "--warmup",
      "1",
      "--dtype",
      "bfloat16",
    ],
  )
  assert rec["dtype"] == "bfloat16" and np.isfinite(rec["final_loss"])
  assert rec["params_total"] == 14_714_688


def test_clear_errors():
  with pytest.raises(bench_run.BenchError, match="name=value"):
    bench_run.parse_fields(["grid"])
  with pytest.raises(torch_ref.NotSupportedError, match="not supported"):
    torch_ref.main(["--repo", "/nonexistent", "--model", "unet"])
  with pytest.raises(torch_ref.NotSupportedError, match="no public code"):
    torch_ref.main(["--repo", "/nonexistent", "--model", "jc2a"])
  with pytest.raises(FileNotFoundError, match="HDMNet_PAHNet/model/HDMNetPlus.py"):
    torch_ref.main(["--repo", "/nonexistent", "--model", "hdmnet_pahnet", "--device", "cpu"])


def test_results_render_compare_and_scaling():
  jax_rec = {
    "impl": "jax",
    "model": "m",
    "mode": "train",
    "size": 65,
    "batch": 2,
    "shot": 1,
    "steps_per_s": 2.0,
    "episodes_per_s": 4.0,
    "images_per_s": 8.0,
    "compile_s": 3.0,
    "backend": "cpu",
    "device_kind": "cpu",
    "jax_version": "0.10.2",
    "host": {"load_avg": [3.0, 2.0, 1.0], "cpu": "x", "cpu_count": 2},
  }
  torch_rec = dict(jax_rec, impl="torch", steps_per_s=1.0, compile_s=None, first_step_s=1.5)
  recs = [
    {
      "bench": "compare",
      "model": "m",
      "mode": "train",
      "size": 65,
      "batch": 2,
      "shot": 1,
      "jax": jax_rec,
      "torch": torch_rec,
      "speedup": 2.0,
      "command": "python bench/compare.py --model m",
    },
    {
      "bench": "scaling",
      "model": "m",
      "mode": "train",
      "size": 65,
      "batch": 8,
      "shot": 1,
      "rows": [{"devices": 1, "batch_per_device": 8, "steps_per_s": 1.0}],
      "loss_spread": 0.0,
    },
  ]
  page = results_lib.render(recs)
  assert "JAX vs PyTorch" in page and "| 2 |" in page and "Scaling over devices" in page
  base = dict(
    jax_rec,
    model="sccan",
    mode="eval",
    size=473,
    batch=1,
    dtype="float32",
    devices=1,
    step_ms=100.0,
  )
  plus = dict(base, model="sccan_pahnet", step_ms=250.0)
  plugin_page = results_lib.render([base, plus])
  assert (
    "Cost of the plug-in over sccan" in plugin_page and "| 2.5 | – | – | 3.0 / 3.0 |" in plugin_page
  )
  assert "python bench/compare.py --model m" in page
