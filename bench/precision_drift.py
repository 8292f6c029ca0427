"""bfloat16 parity drift: every parity fixture run under the mixed-precision policy (prints JSON).

For each fixture (default: every ``*.npz`` under ../shared/parity and
tests/parity_extra) runs ``checkpoints.verify`` with ``compute_dtype`` =
bfloat16 (`fss_jax.train.precision`: bf16 inputs and compute, float32 params)
and prints one JSON line per fixture with, per ``out_`` array, the max abs
difference from the float32 PyTorch reference, its scale, ``rel`` =
max_abs / max(1, scale) and the argmax agreement of logit outputs::

  python bench/precision_drift.py --out bench/results/precision_drift.jsonl
  python bench/precision_drift.py --fixture ../shared/parity/sccan/sccan_1shot_129.npz

``bench/results.py`` renders the lines as a "bfloat16 drift" table per model.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if os.fspath(REPO) not in sys.path:
  sys.path.insert(0, os.fspath(REPO))

from bench import run as bench_run

DEFAULT_DIRS = (REPO.parent / "shared" / "parity", REPO / "tests" / "parity_extra")


def fixtures_under(dirs: Sequence[pathlib.Path]) -> list[pathlib.Path]:
  return [p for d in dirs if d.is_dir() for p in sorted(d.glob("*/*.npz"))]


def drift_record(path: pathlib.Path, dtype: str = "bfloat16") -> dict[str, Any]:
  """The JSON record of one fixture (see module docstring)."""
  import jax

  from checkpoints import verify

  t0 = time.perf_counter()
  report = verify.verify_fixture(path, compute_dtype=dtype)
  try:
    name = os.fspath(path.resolve().relative_to(REPO.parent))
  except ValueError:
    name = os.fspath(path)
  return {
    "bench": "precision",
    "model": report["model"],
    "fixture": name,
    "compute_dtype": dtype,
    "outputs": report["outputs"],
    "finite": bool(report["passed"]),
    "seconds": round(time.perf_counter() - t0, 2),
    "backend": jax.default_backend(),
    "jax_version": jax.__version__,
    "command": f"python bench/precision_drift.py --fixture {name}",
    "host": bench_run.host_info(),
  }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--fixture",
    action="append",
    default=[],
    help="a fixture .npz (repeatable); "
    "default: every fixture under ../shared/parity and tests/parity_extra",
  )
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16",))
  p.add_argument("--out", help="append the JSON lines to this .jsonl")
  args = p.parse_args(argv)
  paths = [pathlib.Path(f) for f in args.fixture] or fixtures_under(DEFAULT_DIRS)
  if not paths:
    raise SystemExit(
      "no parity fixtures found: pass --fixture X.npz or put ../shared beside the repo"
    )
  records = []
  for path in paths:
    rec = drift_record(path, args.dtype)
    bench_run.emit(rec, args.out)
    records.append(rec)
  return records


if __name__ == "__main__":
  main()
