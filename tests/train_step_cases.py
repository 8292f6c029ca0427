"""Shared runner of the train-step fixture tests (tests/test_train_step_*.py).

Each fixture goes through the CLI exactly as a user runs it,
``python -m checkpoints.verify --fixture X.npz --json OUT``, in a subprocess (verify
picks XLA:CPU's convolution backend before jax starts). The report must pass and list
every ``out_loss_`` / ``grad_`` / ``delta_`` / ``stat_`` array of the fixture.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from conftest import REPO, parity_fixture

# Peak RSS of one verify run on CPU, GB (2 cores, XLA's kernels; YNNPACK: SCCAN 6.4, SCCAN +
# PAHNet 12.5 before verify's memory scheduler): a check above EXCLUSIVE_GB runs alone among the
# train-step checks of all pytest workers, the others share (`_memory_slot`).
PEAK_GB = {
  "sccan_pahnet": 10.1,
  "sccan": 4.9,
  "hdmnet_pahnet": 3.4,
  "hdmnet": 2.5,
  "symnet": 2.5,
  "pspnet": 2.0,
  "panet": 1.0,
  "ssp": 1.0,
}
EXCLUSIVE_GB = 8.0
_LOCK = pathlib.Path(tempfile.gettempdir()) / "fss_jax_train_step_memory.lock"


@contextlib.contextmanager
def _memory_slot(folder: str):
  """A reader-writer lock across pytest workers: the largest steps never meet another one."""
  exclusive = PEAK_GB.get(folder, 0.0) > EXCLUSIVE_GB
  with open(_LOCK, "a+b") as f:
    fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_train_fixture(folder: str, tmp_path, *, cpu_kernels: str = "auto", root=None) -> dict:
  """Runs the verify CLI on the fixture of ``folder`` (``--cpu-kernels``); returns its report.

  ``root``: another fixture folder (tests/parity_extra) instead of ../shared/parity.
  """
  path = (
    parity_fixture(f"{folder}/train")
    if root is None
    else sorted((root / folder / "train").glob("*.npz"))[0]
  )
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [
    sys.executable,
    "-m",
    "checkpoints.verify",
    "--fixture",
    str(path),
    "--json",
    str(out),
    "--cpu-kernels",
    cpu_kernels,
  ]
  with _memory_slot(folder):
    proc = subprocess.run(
      cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
    )
  assert out.is_file(), (
    f"exit {proc.returncode} (-9: killed, e.g. out of memory)\n"
    + proc.stdout[-3000:]
    + proc.stderr[-3000:]
  )
  report = json.loads(out.read_text())
  with np.load(path) as z:
    names = list(z.files)
  want = {
    "outputs": {n for n in names if n.startswith("out_loss_")},
    "grads": {n[len("grad_") :] for n in names if n.startswith("grad_")},
    "deltas": {n[len("delta_") :] for n in names if n.startswith("delta_")},
    "stats": {n[len("stat_") :] for n in names if n.startswith("stat_")},
  }
  for cat, keys in want.items():
    assert set(report[cat]) == keys, (cat, sorted(keys ^ set(report[cat]))[:10])
  assert report["kind"] == "train_step"
  assert report["passed"], proc.stdout[-4000:]
  if cpu_kernels == "auto":
    from checkpoints import train_adapters

    cpu_kernels = train_adapters.cpu_kernels(json.loads(path.with_suffix(".json").read_text()))
  assert ("ynn_fusion_type" in report["xla_flags"]) == (cpu_kernels == "xla")
  assert proc.returncode == 0
  assert not report["trainable"]["errors"] and not report["hparams"]["errors"]
  assert report["trainable"]["ours"] == report["trainable"]["reference"]
  return report
