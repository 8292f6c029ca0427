"""gs:// end to end against a real GCS server (fake-gcs-server on 127.0.0.1, `tests/gcs_emulator.py`).

Build the synthetic PASCAL-5i into ``gs://test-bucket/tfds``, train a PANet smoke run with
``--workdir gs://test-bucket/run``, kill it (-9) once a checkpoint is in the bucket, resume,
evaluate, predict from the gs:// checkpoint with gs:// inputs and output folder, convert weights
to gs://; then list the bucket through the server and check that nothing was written to a local
``gs:`` folder. Deselect with ``-m "not gcs"``; under CI a missing emulator fails the test.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "test-bucket"

pytestmark = [pytest.mark.gcs, pytest.mark.slow]


def _emulator():
  try:
    import gcs_emulator

    gcs_emulator.binary()
  except (ImportError, RuntimeError) as e:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(f"the GCS emulator is not installed ({e}); pip install -r requirements-dev.txt")
    pytest.skip(f"the GCS emulator is not installed ({e})")
  return gcs_emulator


@pytest.fixture(scope="module")
def server():
  with _emulator().running(BUCKET) as s:
    yield s


def _run(args, env, cwd, timeout=600):
  r = subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert r.returncode == 0, f"{args[:3]} exited {r.returncode}:\n{r.stderr[-4000:]}"
  return r


def test_build_train_kill_resume_eval_predict_convert_on_gs(server, tmp_path):
  from data_prep import synthetic

  # Every command runs in an empty folder: a gs:// path mistaken for a local one would
  # appear there as "gs:/test-bucket/...".
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(server.env, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
  raw = synthetic.write_voc(tmp_path / "raw", num_images=24, seed=0)
  data_dir, work = f"gs://{BUCKET}/tfds", f"gs://{BUCKET}/run"

  # -- dataset -> bucket ---------------------------------------------------------------------
  _run(
    [
      "-m",
      "data_prep.build",
      "--dataset",
      "pascal5i",
      "--manual_dir",
      str(raw),
      "--data_dir",
      data_dir,
    ],
    env,
    cwd,
  )
  assert "tfds/pascal5i/1.0.0/fss_build_report.json" in server.list(BUCKET, "tfds/")

  # -- train, kill -9 after the first checkpoint, resume -------------------------------------
  train = [
    "-m",
    "fss_jax.main",
    "--config",
    str(REPO / "configs/panet.py") + ":smoke",
    "--workdir",
    work,
    f"--config.data.data_dir={data_dir}",
    "--config.total_steps=200",
    "--config.checkpoint.every_steps=2",
    "--config.eval.every_steps=0",
  ]
  proc = subprocess.Popen(
    [sys.executable, *train],
    cwd=cwd,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline, saved = time.time() + 400, []
  while time.time() < deadline and proc.poll() is None:
    listed = server.list(BUCKET, "run/")
    saved = sorted(
      int(n.split("/")[2])
      for n in listed
      if n.startswith("run/checkpoints/")
      and n.split("/")[2].isdigit()
      and n.endswith("/commit_success.txt")
      and n.count("/") == 3
    )  # a finished save (orbax's mark on GCS)
    if saved and "run/log.txt" in listed:  # the log is uploaded at each completed checkpoint
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-4000:]
  assert saved, "no checkpoint reached the bucket"
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  resumed = _run(
    [
      *train[:-3],
      "--config.total_steps=" + str(saved[-1] + 2),
      "--config.checkpoint.every_steps=2",
      "--config.eval.every_steps=0",
    ],
    env,
    cwd,
  )
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] == "workdir" and summary["step"] == saved[-1] + 2, summary

  # -- evaluate ----------------------------------------------------------------------------------
  ev = _run(
    [
      "-m",
      "fss_jax.main",
      "--config",
      str(REPO / "configs/panet.py") + ":smoke",
      "--workdir",
      work,
      "--mode",
      "eval",
      f"--config.data.data_dir={data_dir}",
    ],
    env,
    cwd,
  )
  assert "miou" in ev.stdout

  # -- predict from the gs:// checkpoint, gs:// inputs and output folder -------------------------
  stems = sorted(p.stem for p in (raw / "JPEGImages").glob("*.jpg"))[:2]
  copy = "import sys; from fss_jax import io; [io.copy_file(a, b) for a, b in zip(*[iter(sys.argv[1:])] * 2)]"
  _run(
    [
      "-c",
      copy,
      *[
        x
        for stem in stems
        for x in (
          str(raw / "JPEGImages" / f"{stem}.jpg"),
          f"gs://{BUCKET}/inputs/{stem}.jpg",
          str(raw / "SegmentationClassAug" / f"{stem}.png"),
          f"gs://{BUCKET}/inputs/{stem}.png",
        )
      ],
    ],
    env,
    cwd,
  )
  inputs = f"gs://{BUCKET}/inputs"
  _run(
    [
      "-m",
      "fss_jax.predict",
      "--checkpoint",
      work,
      "--support",
      f"{inputs}/{stems[0]}.jpg:{inputs}/{stems[0]}.png",
      "--query",
      f"{inputs}/{stems[1]}.jpg",
      "--out",
      f"gs://{BUCKET}/pred",
    ],
    env,
    cwd,
  )

  # -- convert: a state dict on gs:// -> converted weights on gs:// ------------------------------
  import numpy as np

  from fss_jax.models import registry

  shapes = {"conv": (1, 1, 1, 1), "linear": (1, 1), "copy": (1,)}
  np.savez(
    tmp_path / "panet.npz",
    **{
      r.src: np.zeros(shapes[getattr(r, "transform", "copy")], np.float32)
      for r in registry.get("panet").keymap()
    },
  )
  _run(
    ["-c", copy, str(tmp_path / "panet.npz"), f"gs://{BUCKET}/official/split0/panet.npz"], env, cwd
  )
  _run(
    [
      "-m",
      "checkpoints.convert",
      "--model",
      "panet",
      "--src",
      f"gs://{BUCKET}/official/split0/panet.npz",
      "--dst",
      f"gs://{BUCKET}/converted/panet",
    ],
    env,
    cwd,
  )

  names = server.list(BUCKET)
  run = [n for n in names if n.startswith("run/")]
  print("\n".join(run))  # the closing note quotes this listing
  steps = {n.split("/")[2] for n in run if n.startswith("run/checkpoints/")}
  assert str(saved[-1] + 2) in steps, steps
  assert any(n.startswith(f"run/checkpoints/{saved[-1] + 2}/state/") for n in run)
  assert "run/config.json" in run and "run/config_eval.json" in run and "run/log.txt" in run
  assert any(n.startswith("run/results_pascal5i_f0_") and n.endswith(".json") for n in run), run
  assert any("events.out.tfevents" in n for n in run), run
  assert any(n.startswith("run/episodes/") for n in run), run
  assert "pred/predictions.json" in names and any(n.endswith("_mask.png") for n in names)
  assert "converted/panet/metadata.json" in names
  assert any(n.startswith("converted/panet/variables/") for n in names)
  log = subprocess.run(
    [
      sys.executable,
      "-c",
      ("import sys; from fss_jax import io; print(io.user_path(sys.argv[1]).read_text())"),
      f"{work}/log.txt",
    ],
    env=env,
    cwd=cwd,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert log.count("fss_jax.main --mode train") == 2 and "fss_jax.main --mode eval" in log
  # Nothing went to a local folder named after the bucket path.
  local = [p for p in (cwd, REPO) if (p / "gs:").exists()]
  assert not local, f"gs:// paths were written locally under {local}"
