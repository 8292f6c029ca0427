"""``python -m fss_jax.main``: config errors, missing data, too large K, and a PANet smoke run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "fss_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def voc_data(tmp_path_factory):
  from data_prep import synthetic

  return synthetic.make_built_dataset(tmp_path_factory.mktemp("data"), "voc", num_images=32, seed=0)


def test_parse_arg():
  a = common.parse_arg("dataset=coco,fold=2,smoke", dataset="pascal5i", fold=0, shot=1, smoke=False)
  assert (a.dataset, a.fold, a.shot, a.smoke) == ("coco", 2, 1, True)
  with pytest.raises(
    ValueError, match="unknown config argument 'shots'.*known: dataset, fold, shot"
  ):
    common.parse_arg("shots=5", dataset="pascal5i", fold=0, shot=1)
  from configs import panet

  c = panet.get_config("dataset=coco,fold=1,shot=5")
  assert (c.dataset, c.fold, c.model_fields.shots, c.optim.milestones) == (
    "coco20i",
    1,
    5,
    (10000, 20000),
  )
  assert c.is_locked


def test_unknown_config_key_lists_close_matches(tmp_path):
  r = _main(
    "--config",
    "configs/panet.py:dataset=pascal5i",
    "--workdir",
    str(tmp_path),
    "--config.optim.lrr=0.1",
  )
  assert r.returncode == 2
  assert "unknown config key 'optim.lrr'; close matches: optim.lr" in r.stderr
  r = _main("--config", "configs/panet.py:dataset=pascal5i,shots=5", "--workdir", str(tmp_path))
  assert r.returncode == 2 and "unknown config argument 'shots'" in r.stderr


def test_missing_data_dir_says_how_to_build(tmp_path):
  r = _main(
    "--config",
    "configs/panet.py:smoke",
    "--workdir",
    str(tmp_path / "w"),
    f"--config.data.data_dir={tmp_path / 'nothing'}",
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert "is not built" in r.stderr and "python -m data_prep.build --dataset pascal5i" in r.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()
  # one line on the console, the traceback in the workdir's text log
  assert "Traceback" not in r.stderr
  log = (tmp_path / "w" / "log.txt").read_text()
  assert "run failed" in log and "Traceback" in log and "DatasetNotReadyError" in log


def test_shot_larger_than_available_supports(tmp_path, voc_data):
  r = _main(
    "--config",
    "configs/panet.py:smoke,shot=40",
    "--workdir",
    str(tmp_path),
    f"--config.data.data_dir={voc_data}",
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert "K=40" in r.stderr and "support images" in r.stderr and "smaller shot" in r.stderr


@pytest.mark.slow
def test_panet_smoke_train_via_main(tmp_path, voc_data):
  """3 PANet steps on synthetic VOC data: checkpoints, validation on stored episodes, summary JSON."""
  work = tmp_path / "panet"
  r = _main(
    "--config",
    "configs/panet.py:smoke",
    "--workdir",
    str(work),
    f"--config.data.data_dir={voc_data}",
  )
  assert r.returncode == 0, r.stderr[-4000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["step"] == 3 and summary["resumed_from"] == "scratch"
  assert len(summary["history"]) == 3 and all(h["loss"] > 0 for h in summary["history"])
  assert summary["train"]["align_loss"] > 0  # PAR is on in training
  assert summary["val"]["episodes"] == 4 and 0 <= summary["val"]["miou"] <= 100
  assert (work / "checkpoints" / "3").is_dir() and (work / "best").is_dir()
  assert list((work / "episodes").glob("pascal5i_f0_1shot_s321_n4.jsonl"))
  # the workdir explains itself: resolved config (overrides applied), versions, devices, commit
  record = json.loads((work / "config.json").read_text())
  assert record["mode"] == "train" and record["config"]["data"]["data_dir"] == str(voc_data)
  assert record["config"]["data"]["test_size"] == 65 and record["config"]["model"] == "panet"
  assert record["versions"]["jax"] and record["devices"] and "git_commit" in record
  log = (work / "log.txt").read_text()
  assert "fss_jax.main --mode train" in log and "state from scratch" in log
  # predict on the workdir runs at the size the model was trained and evaluated at
  from fss_jax import predict

  p = predict.Predictor(None, work)
  assert (p.size, p.resize) == (65, record["config"]["data"]["test_resize"])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_tiny_settings(tmp_path):
  """`make demo`'s path (build, train, novel-class eval + baseline, overlays) with tiny settings."""
  from examples import demo

  opts = demo.Options(num_images=32, steps=2, size=33, episodes=6, overlays=2)
  out = demo.run(tmp_path, opts)
  assert set(out) == {"model", "novel_mIoU", "fb_iou", "baseline_mIoU", "episodes", "seconds"}
  assert out["model"] == "panet" and out["episodes"] == 6
  assert 0 < out["baseline_mIoU"] < 100 and 0 <= out["novel_mIoU"] <= 100
  assert len(list((tmp_path / "overlays").glob("episode_*.png"))) == 2
  saved = json.loads((tmp_path / "demo_result.json").read_text())
  assert saved["novel_mIoU"] == out["novel_mIoU"]


def test_demo_ctrl_c_is_one_line_and_the_default_workdir_is_per_checkout(tmp_path):
  import signal
  import time

  work = tmp_path / "demo"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "examples.demo",
      f"--workdir={work}",
      "--num_images=32",
      "--steps=50",
      "--size=33",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 120
  while not (work / "run").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
  makefile = (REPO / "Makefile").read_text()
  assert "DEMO_DIR ?= $(CURDIR)/demo_out" in makefile and "/tmp/fss_jax_demo" not in makefile


def test_preemption_saves_the_interrupted_step_and_resumes(tmp_path, voc_data, sig="SIGTERM"):
  """SIGTERM (a scheduler's preemption; SIGINT takes the same handler) during training: the
  step is saved, one line, exit 128 + signum, and the rerun continues from that step."""
  import signal
  import time

  work = tmp_path / "w"
  args = [
    sys.executable,
    "-m",
    "fss_jax.main",
    "--config",
    "configs/panet.py:smoke",
    "--workdir",
    str(work),
    f"--config.data.data_dir={voc_data}",
    "--config.total_steps=400",
    "--config.checkpoint.every_steps=1000",
    "--config.eval.every_steps=0",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(
    args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  log = work / "log.txt"
  while time.time() < deadline and proc.poll() is None:
    if log.is_file() and "first step done" in log.read_text():
      break
    time.sleep(0.2)
  time.sleep(1.0)  # a few more training steps
  proc.send_signal(getattr(signal, sig))
  _, err = proc.communicate(timeout=240)
  signum = int(getattr(signal, sig))
  assert proc.returncode == 128 + signum, err[-3000:]
  assert "Traceback" not in err and f"interrupted by {sig} after step" in err
  saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 0 < saved[0] < 400
  resumed = subprocess.run(
    [*args, "--config.total_steps=" + str(saved[0] + 1)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] == "workdir" and summary["step"] == saved[0] + 1


def test_mistyped_config_path_is_one_line(tmp_path):
  r = _main("--config", "configs/sccan_typo.py", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2, r.stderr
  assert (
    r.stderr.strip()
    == "error: config file configs/sccan_typo.py not found; close matches: configs/sccan.py, "
    "configs/sccan_pahnet.py"
  )
  r = _main("--config=configs/pahnett.py:smoke", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert r.stderr.startswith(
    "error: config file configs/pahnett.py not found; close matches: configs/panet.py, "
    "configs/sccan_pahnet.py"
  ), r.stderr
  r = _main("--config=configs/pahnet.py:smoke", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert r.stderr.strip() == (
    "error: configs/pahnet.py is not a run configuration (it defines no get_config); "
    "close matches: configs/hdmnet_pahnet.py, configs/sccan_pahnet.py, configs/panet.py"
  ), r.stderr
  assert not (tmp_path / "w").exists()


def _converted_panet(dst: pathlib.Path, **metadata) -> pathlib.Path:
  """Random PANet weights (the smoke config's model) as a converted checkpoint."""
  import jax
  import numpy as np

  from checkpoints import io as ckpt_io
  from configs import panet
  from fss_jax.models import registry
  from fss_jax.train import state as state_lib

  c = panet.get_config("smoke")
  model = registry.get("panet").make_model(**c.model_fields)
  s = c.data.test_size
  ep = {
    "query_image": np.zeros((1, s, s, 3), np.float32),
    "query_mask": np.zeros((1, s, s), np.int32),
    "support_images": np.zeros((1, 1, s, s, 3), np.float32),
    "support_masks": np.zeros((1, 1, s, s), np.int32),
    "class_id": np.zeros((1,), np.int32),
  }
  shapes = jax.eval_shape(lambda k: state_lib.init_variables(model, ep, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: (0.01 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
  return ckpt_io.write_orbax(variables, dst, metadata={"model": "panet", "fields": {}, **metadata})


def test_init_at_the_wrong_prefix_says_what_the_checkpoint_is(tmp_path, voc_data):
  """A full converted model loaded under a sub-module prefix: one line naming the checkpoint
  (its metadata.json) and the prefix to pass, a key count; every key goes to log.txt."""
  ckpt = _converted_panet(tmp_path / "panet_full", dataset="pascal5i", fold=0)
  work = tmp_path / "w"
  r = _main(
    "--config",
    "configs/panet.py:smoke",
    "--workdir",
    str(work),
    "--mode",
    "eval",
    f"--config.data.data_dir={voc_data}",
    f"--config.init={ckpt}",
    "--config.init_prefix=backbone",
  )
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.splitlines()
  err = lines[[l.startswith("error:") for l in lines].index(True) :]  # after the INFO log lines
  assert "Traceback" not in r.stderr
  assert err[0].startswith(
    f"error: {ckpt} holds a converted panet checkpoint (pascal5i fold 0): "
    f"they fit the whole model, not under 'backbone' ("
  ), err
  assert err[0].endswith("pass --config.init_prefix=''"), err
  assert "unexpected keys under 'backbone')" in err[0]
  assert len(err) == 2 and err[1].strip() == f"every key is listed in {work / 'log.txt'}", err
  log = (work / "log.txt").read_text()
  assert (
    "unexpected in the checkpoint (the model lacks them)" in log
    and "params/backbone/encoder/" in log
  )


def test_eval_with_weights_of_another_fold_is_refused(tmp_path, voc_data):
  ckpt = _converted_panet(tmp_path / "panet_f2", dataset="pascal5i", fold=2)
  args = [
    "--config",
    "configs/panet.py:smoke",
    "--mode",
    "eval",
    f"--config.data.data_dir={voc_data}",
    f"--config.init={ckpt}",
  ]
  r = _main(*args, "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert err[0].startswith(
    f"error: checkpoint {ckpt} was trained on pascal5i fold 2; evaluating "
    f"fold 0 with it scores classes it was trained on. "
  ), err
  assert err[0].endswith(
    "--config.eval.allow_other_fold=true to run it anyway (the scores are then not a fold-0 result)"
  ), err
  assert not list((tmp_path / "w").glob("results_*.json"))
  r = _main(*args, "--workdir", str(tmp_path / "w2"), "--config.eval.allow_other_fold=true")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "was trained on pascal5i fold 2; evaluating fold 0" in r.stderr  # the warning stays
  assert list((tmp_path / "w2").glob("results_pascal5i_f0_1shot.json"))


NOISE = (
  "Unable to initialize backend",
  "oneDNN custom operations",
  "TF_ENABLE_ONEDNN_OPTS",
  "This TensorFlow binary is optimized",
  "absl::InitializeLog",
  "Load dataset info from",
  "Downloading and preparing dataset",
  "_CHECKPOINT_METADATA",
  "Metadata file does not exist",
)


def test_a_smoke_run_prints_no_library_noise(tmp_path, voc_data):
  """What a new user sees: no TPU-backend probe, TensorFlow oneDNN note, TFDS 'Downloading and
  preparing dataset' or orbax metadata warning (JAX_PLATFORMS left unset, as users run it)."""
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
  }
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  work = tmp_path / "w"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "fss_jax.main",
      "--config",
      "configs/panet.py:smoke",
      "--workdir",
      str(work),
      f"--config.data.data_dir={voc_data}",
      "--config.total_steps=1",
      "--config.eval.every_steps=1",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  found = [n for n in NOISE if n in r.stderr]
  assert not found, f"{found} in stderr:\n{r.stderr[-4000:]}"
