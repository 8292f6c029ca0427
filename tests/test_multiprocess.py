"""Two JAX processes on localhost (gloo CPU collectives) train exactly like one process.

Each worker is this file run as a script: 2 CPU devices, ``jax.distributed`` via
``config.distributed.mode="manual"``, per-process halves of every global batch
(``jax.make_array_from_process_local_data``), orbax checkpoints with one
data-iterator state file per process. The reference is the same loop in this
process on 4 of the 8 fake devices (global batch 8 either way).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent


def _overrides(port: int, pid: int) -> dict:
  return {
    "distributed.mode": "manual",
    "distributed.coordinator_address": f"127.0.0.1:{port}",
    "distributed.num_processes": 2,
    "distributed.process_id": pid,
  }


def _worker(pid: int, port: int, workdir: str, out: str) -> None:
  sys.path[:0] = [str(HERE), str(REPO)]
  import test_engine as te

  from fss_jax import parallel
  from fss_jax.models import registry
  from fss_jax.train import loop

  registry._MODULES["tiny_test"] = "test_engine"
  cfg = te.tiny_config(**_overrides(port, pid), **{"mesh.num_devices": 0})
  parallel.initialize(cfg.distributed)  # before anything asks for jax.process_index()
  import jax

  assert jax.process_count() == 2 and jax.device_count() == 4, (
    jax.process_count(),
    jax.device_count(),
  )
  summary = loop.train_and_evaluate(cfg, workdir, data=te.fake_data(cfg))
  pathlib.Path(out).write_text(json.dumps(summary))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, monkeypatch):
  import test_engine as te

  from fss_jax.models import registry
  from fss_jax.train import loop

  port = _free_port()
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
  )
  procs = []
  for pid in range(2):
    cmd = [
      sys.executable,
      str(pathlib.Path(__file__)),
      str(pid),
      str(port),
      str(tmp_path / "mp"),
      str(tmp_path / f"out{pid}.json"),
    ]
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )

  # Meanwhile: the reference, one process on 4 devices.
  monkeypatch.setitem(registry._MODULES, "tiny_test", "test_engine")
  cfg = te.tiny_config(**{"mesh.num_devices": 4})
  ref = loop.train_and_evaluate(cfg, tmp_path / "single", data=te.fake_data(cfg))

  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process workers timed out")
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  outs = [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]

  ref_losses = [h["loss"] for h in ref["history"]]
  assert len(ref_losses) == cfg.total_steps
  for out in outs:
    losses = [h["loss"] for h in out["history"]]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert out["val"]["miou"] == pytest.approx(ref["val"]["miou"], abs=1e-4)
  step_dir = tmp_path / "mp" / "checkpoints" / str(cfg.total_steps) / "data"
  assert sorted(p.name for p in step_dir.glob("process_*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
