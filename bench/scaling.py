"""Train steps/s over 1, 2, 4, 8 (fake CPU) devices and memory per device (prints JSON).

Each device count runs ``bench/run.py --devices N`` in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag only affects the
CPU platform), with the same *global* batch (strong scaling: the per-device batch
is batch / N). On one CPU the fake devices share the same cores, so the steps/s
do not grow with N: the run checks that the sharded step compiles and runs for
every mesh size and shows how the per-device compiled memory (XLA
``memory_analysis``: arguments = the replicated state + this device's batch
slice; temp = activations) shrinks as the batch is split::

  python bench/scaling.py --model panet --size 65 --batch 8 --steps 3
  python bench/scaling.py --model sccan --size 97 --batch 8 --devices 1,2,4,8 --out bench/results/scaling.jsonl
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, os.fspath(REPO))

from bench import compare
from bench import run as jax_run


def _env(n: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
  ).strip()
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def run_n(n: int, argv: Sequence[str], timeout: float) -> dict[str, Any]:
  cmd = [sys.executable, os.fspath(HERE / "run.py"), *argv, "--devices", str(n)]
  try:
    p = subprocess.run(
      cmd, cwd=REPO, env=_env(n), capture_output=True, text=True, timeout=timeout, check=False
    )
  except subprocess.TimeoutExpired:
    return {"devices": n, "error": f"ran past {timeout:g}s"}
  rec = compare._last_json(p.stdout)
  if p.returncode or rec is None:
    return {"devices": n, "error": " | ".join((p.stderr or p.stdout).strip().splitlines()[-4:])}
  return rec


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="panet")
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--size", type=int, default=65)
  p.add_argument(
    "--batch", type=int, default=8, help="global batch (a multiple of every device count)"
  )
  p.add_argument("--shot", type=int, default=1)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument(
    "--field", action="append", default=[], help="model field override (bench/run.py --field)"
  )
  p.add_argument("--timeout", type=float, default=600.0)
  p.add_argument("--out", default="")
  argv = list(sys.argv[1:] if argv is None else argv)
  a = p.parse_args(argv)
  counts = [int(v) for v in a.devices.split(",") if v]
  bad = [n for n in counts if a.batch % n]
  if bad:
    p.error(f"--batch {a.batch} is not a multiple of device counts {bad}")
  base = [
    "--model",
    a.model,
    "--mode",
    a.mode,
    "--size",
    str(a.size),
    "--batch",
    str(a.batch),
    "--shot",
    str(a.shot),
    "--steps",
    str(a.steps),
    "--warmup",
    str(a.warmup),
  ]
  for f in a.field:
    base += ["--field", f]
  rows = []
  for n in counts:
    rec = run_n(n, base, a.timeout)
    row = {"devices": n, "batch_per_device": a.batch // n}
    for key in (
      "steps_per_s",
      "episodes_per_s",
      "compile_s",
      "final_loss",
      "peak_memory_bytes",
      "peak_memory_kind",
      "compiled_memory_per_device_bytes",
      "flops_per_step",
      "error",
    ):
      if key in rec:
        row[key] = rec[key]
    rows.append(row)
  first = next((r for r in rows if "steps_per_s" in r), None)
  if first:
    for r in rows:
      if "steps_per_s" in r:
        r["relative_steps_per_s"] = round(r["steps_per_s"] / first["steps_per_s"], 3)
  losses = [r["final_loss"] for r in rows if "final_loss" in r]
  out = {
    "bench": "scaling",
    "model": a.model,
    "mode": a.mode,
    "size": a.size,
    "batch": a.batch,
    "shot": a.shot,
    "rows": rows,
    "loss_spread": (max(losses) - min(losses)) if losses else None,
    "note": (
      "fake CPU devices share one host's cores: steps/s is a sharding-correctness check, not a "
      "speed-up; compiled_memory_per_device_bytes.temp is the per-device activation memory"
    ),
    "command": "python bench/scaling.py " + " ".join(argv),
    "host": jax_run.host_info(),
  }
  jax_run.emit(out, a.out or None)
  return out


if __name__ == "__main__":
  rec = main()
  sys.exit(1 if any("error" in r for r in rec["rows"]) else 0)
