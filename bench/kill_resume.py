"""kill -9 at random moments, resume, and compare with an uninterrupted run (prints JSON).

Trains a smoke config through ``python -m fss_jax.main`` twice on a synthetic
PASCAL-layout dataset (built in a temporary folder): once without interruption,
once killed with SIGKILL at ``--kills`` random moments (start-up, compilation,
steps, checkpoint writes in flight) and rerun each time until it finishes. The
final checkpoints of both runs are compared leaf by leaf (params, optimiser state,
batch statistics, step)::

  python bench/kill_resume.py --kills 12 --steps 60 --seed 0

Prints one JSON line: per kill its phase (start-up or training), time, the step
that run had resumed from and the checkpoints on disk after it; ``bitwise_equal``
(every leaf identical) and ``max_abs_diff``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep import synthetic


def _command(config: str, workdir: pathlib.Path, data_dir: str, steps: int) -> list[str]:
  return [
    sys.executable,
    "-m",
    "fss_jax.main",
    "--config",
    config,
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={data_dir}",
    f"--config.total_steps={steps}",
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.async_save=true",
    "--config.eval.every_steps=0",
  ]


def _env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _final_state(workdir: pathlib.Path):
  """(step, {path: numpy array}) of the latest checkpoint in ``workdir``."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(
    workdir / "checkpoints",
    item_names=("state",),
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _first_steps(workdir: pathlib.Path) -> int:
  """How many runs of ``workdir`` have logged their first training step."""
  log = workdir / "log.txt"
  return log.read_text().count("first step done") if log.is_file() else 0


def _steps_saved(workdir: pathlib.Path) -> list[int]:
  """The complete checkpoint steps in ``workdir`` (orbax renames a finished save to its step)."""
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _resumed_step(workdir: pathlib.Path) -> int | None:
  """The step the last run of ``workdir`` resumed from (its log line), None from scratch."""
  log = (workdir / "log.txt").read_text() if (workdir / "log.txt").is_file() else ""
  found = re.findall(r"state from (\w+) at step (\d+)", log)
  return int(found[-1][1]) if found and found[-1][0] == "workdir" else None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--config", default="configs/panet.py:smoke")
  p.add_argument("--kills", type=int, default=12)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--max_delay",
    type=float,
    default=6.0,
    help="a kill comes 0..max_delay seconds after the first step of a rerun "
    "(or after its start, for one kill in five)",
  )
  p.add_argument("--num_images", type=int, default=48)
  a = p.parse_args(argv)
  rng = random.Random(a.seed)
  import numpy as np

  with tempfile.TemporaryDirectory() as root:
    root = pathlib.Path(root)
    data_dir = synthetic.make_built_dataset(root / "data", "voc", a.num_images, 0)
    ref, run = root / "ref", root / "run"
    t0 = time.time()
    subprocess.run(
      _command(a.config, ref, data_dir, a.steps),
      cwd=REPO,
      env=_env(),
      check=True,
      capture_output=True,
    )
    ref_s = time.time() - t0
    kills = []
    while len(kills) < a.kills:
      # One kill in five during start-up (restore, compilation), the others while training
      # (a checkpoint write is in flight after every step): 0..max_delay s after the first step.
      during_startup = rng.random() < 0.2
      delay = rng.uniform(0.0, a.max_delay)
      steps_before = _first_steps(run)
      t_start = time.time()
      proc = subprocess.Popen(
        _command(a.config, run, data_dir, a.steps),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
      )
      while not during_startup and proc.poll() is None and _first_steps(run) == steps_before:
        time.sleep(0.05)
      try:
        proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(
          {
            "phase": "start-up" if during_startup else "training",
            "after_s": round(time.time() - t_start, 2),
            "resumed_from_step": _resumed_step(run),
            "checkpoints": _steps_saved(run),
          }
        )
        continue
      if proc.returncode != 0:
        raise SystemExit(f"the run exited {proc.returncode} before {a.kills} kills")
      break  # finished before the kill: the run is done
    final = subprocess.run(
      _command(a.config, run, data_dir, a.steps),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      check=False,
    )
    (s_ref, ref_state), (s_run, run_state) = _final_state(ref), _final_state(run)
    diffs = {
      k: float(np.max(np.abs(ref_state[k].astype(np.float64) - run_state[k].astype(np.float64))))
      if ref_state[k].size
      else 0.0
      for k in ref_state
      if k in run_state
    }
    equal = (
      set(ref_state) == set(run_state)
      and s_ref == s_run
      and all(np.array_equal(ref_state[k], run_state[k]) for k in ref_state)
    )
    print(
      json.dumps(
        {
          "bench": "kill_resume",
          "config": a.config,
          "steps": a.steps,
          "seed": a.seed,
          "kills": kills,
          "num_kills": len(kills),
          "final_exit": final.returncode,
          "final_step": {"uninterrupted": s_ref, "killed": s_run},
          "leaves": len(ref_state),
          "bitwise_equal": bool(equal),
          "max_abs_diff": max(diffs.values()) if diffs else None,
          "uninterrupted_s": round(ref_s, 1),
        }
      )
    )
    return 0 if equal and final.returncode == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
