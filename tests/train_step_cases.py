"""Shared runner of the train-step fixture tests (tests/test_train_step_*.py).

Each fixture goes through the CLI exactly as a user runs it,
``python -m checkpoints.verify --fixture X.npz --json OUT``, in a subprocess (verify
picks XLA:CPU's convolution backend before jax starts). The report must pass and list
every ``out_loss_`` / ``grad_`` / ``delta_`` / ``stat_`` array of the fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO, parity_fixture


def run_train_fixture(folder: str, tmp_path, *, cpu_kernels: str = "auto", root=None) -> dict:
  """Runs the verify CLI on the fixture of ``folder`` (``--cpu-kernels``); returns its report.

  ``root``: another fixture folder (tests/parity_extra) instead of ../shared/parity.
  """
  path = parity_fixture(f"{folder}/train") if root is None else \
      sorted((root / folder / "train").glob("*.npz"))[0]
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "checkpoints.verify", "--fixture", str(path), "--json", str(out),
         "--cpu-kernels", cpu_kernels]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
  assert out.is_file(), (f"exit {proc.returncode} (-9: killed, e.g. out of memory)\n"
                         + proc.stdout[-3000:] + proc.stderr[-3000:])
  report = json.loads(out.read_text())
  with np.load(path) as z:
    names = list(z.files)
  want = {"outputs": {n for n in names if n.startswith("out_loss_")},
          "grads": {n[len("grad_"):] for n in names if n.startswith("grad_")},
          "deltas": {n[len("delta_"):] for n in names if n.startswith("delta_")},
          "stats": {n[len("stat_"):] for n in names if n.startswith("stat_")}}
  for cat, keys in want.items():
    assert set(report[cat]) == keys, (cat, sorted(keys ^ set(report[cat]))[:10])
  assert report["kind"] == "train_step"
  assert report["passed"], proc.stdout[-4000:]
  if cpu_kernels == "auto":
    from checkpoints import train_adapters  # pylint: disable=g-import-not-at-top
    cpu_kernels = train_adapters.cpu_kernels(json.loads(path.with_suffix(".json").read_text()))
  assert ("ynn_fusion_type" in report["xla_flags"]) == (cpu_kernels == "xla")
  assert proc.returncode == 0
  assert not report["trainable"]["errors"] and not report["hparams"]["errors"]
  assert report["trainable"]["ours"] == report["trainable"]["reference"]
  return report
