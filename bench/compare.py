"""fss-jax vs the official PyTorch code, same model, inputs and sizes, in one run (prints JSON).

Runs ``bench/run.py`` and ``bench/torch_ref.py`` one after the other as separate
processes (so neither framework's threads or memory affect the other) and prints
one JSON line with both records and the ratios::

  python bench/compare.py --repo /tmp/PANet --model panet --mode train --size 129 --batch 2 --steps 5
  python bench/compare.py --repo /tmp/SCCAN --model sccan --mode eval --size 473 --batch 8 \\
      --out bench/results/sccan_gpu.jsonl

``speedup`` = JAX steps/s ÷ PyTorch steps/s (> 1: fss-jax is faster). Arguments
other than ``--repo``/``--out``/``--jax-arg``/``--torch-arg`` are passed to both;
``--jax-arg`` / ``--torch-arg`` (repeatable) go to one side only, e.g.
``--jax-arg=--peak-tflops=989`` or ``--torch-arg=--threads=2`` (or
``--torch-arg=--repo-commit=<sha>`` for a checkout that is not a git work tree).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, os.fspath(REPO))

from bench import run as jax_run


def _last_json(text: str) -> dict[str, Any] | None:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def run_side(script: str, argv: Sequence[str], timeout: float) -> dict[str, Any]:
  """Runs ``python bench/<script> argv``; its JSON record, or {"error": ...}."""
  cmd = [sys.executable, os.fspath(HERE / script), *argv]
  try:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"{script} ran past --timeout {timeout:g}s", "command": " ".join(cmd)}
  rec = _last_json(p.stdout)
  if p.returncode != 0 or rec is None:
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {
      "error": f"{script} exited {p.returncode}: " + " | ".join(tail),
      "command": " ".join(cmd),
    }
  return rec


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--repo", required=True, help="checkout of the official repository (bench/torch_ref.py)"
  )
  p.add_argument("--model", required=True)
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--size", type=int, default=473)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--shot", type=int, default=1)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--jax-arg", action="append", default=[], help="extra argument for bench/run.py only"
  )
  p.add_argument(
    "--torch-arg", action="append", default=[], help="extra argument for bench/torch_ref.py only"
  )
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per side")
  p.add_argument("--out", default="", help="also append the combined JSON line to this .jsonl")
  argv = list(sys.argv[1:] if argv is None else argv)
  a = p.parse_args(argv)
  common = [
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
    "--seed",
    str(a.seed),
  ]
  jax_rec = run_side("run.py", common + list(a.jax_arg), a.timeout)
  torch_rec = run_side("torch_ref.py", ["--repo", a.repo] + common + list(a.torch_arg), a.timeout)
  out: dict[str, Any] = {
    "bench": "compare",
    "model": a.model,
    "mode": a.mode,
    "size": a.size,
    "batch": a.batch,
    "shot": a.shot,
    "jax": jax_rec,
    "torch": torch_rec,
  }
  if "error" not in jax_rec and "error" not in torch_rec:
    out["speedup"] = float(
      f"{jax_rec['steps_per_s'] / torch_rec['steps_per_s']:.4g}"
    )  # 4 significant digits
    out["jax_steps_per_s"] = jax_rec["steps_per_s"]
    out["torch_steps_per_s"] = torch_rec["steps_per_s"]
  flags = os.environ.get("XLA_FLAGS", "")
  if flags:  # e.g. --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
    out["xla_flags"] = flags
  out["command"] = (
    (f"XLA_FLAGS={flags} " if flags else "") + "python bench/compare.py " + " ".join(argv)
  )
  jax_run.emit(out, a.out or None)
  return out


if __name__ == "__main__":
  rec = main()
  sys.exit(0 if "speedup" in rec else 1)
