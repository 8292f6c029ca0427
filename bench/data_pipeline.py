"""Training-episode throughput of the data pipeline (prints JSON).

Builds a synthetic PASCAL-layout dataset in a temporary folder
(``data_prep.synthetic.make_built_dataset``), then times the real training loader
(``fss_jax.data.pipeline.make_train_loader``: TFDS array_record -> decode -> §7 sampling
-> §8 augmentation -> 473 random crop -> normalise -> batch) for each shot and worker
count::

  python bench/data_pipeline.py                         # 1- and 5-shot, workers 0 and 2
  python bench/data_pipeline.py --shots 1 --workers 0,1,2 --read_threads 2 --steps 40
  python bench/data_pipeline.py --image_size 375,500    # VOC-sized images (default: synthetic 112..208)

Output: one JSON object; per shot and worker count ``results[i]`` has

* ``cpu_ms_per_episode``: CPU time (user + system) of this process and of its live child
  processes (grain workers, read from ``/proc``) per episode: what the pipeline costs,
  whatever else runs on the host;
* ``episodes_per_s``: episodes (not batches) per second of wall time;

each the median of ``--repeats`` consecutive windows of ``--steps`` batches after
``--warmup`` batches (``*_all``: every window). Goals on 2 CPU cores at VOC sizes
(``--image_size 333,500``), in-process: <= 10 CPU-ms per 1-shot and <= 35 per 5-shot
training episode.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parents[1]))

from data_prep import synthetic
from fss_jax.data import pipeline


def _ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v]


def _children(pid: int) -> list[int]:
  """Every live descendant of ``pid`` (Linux ``/proc``; [] elsewhere)."""
  parent = {}
  for d in pathlib.Path("/proc").glob("[0-9]*"):
    try:
      fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    parent[int(d.name)] = int(fields[1])
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    kids = [c for c, pp in parent.items() if pp == p]
    out += kids
    todo += kids
  return out


def _proc_cpu_s(pid: int) -> float:
  """utime + stime of a live process from ``/proc/<pid>/stat`` (0 once it is gone)."""
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, float]:
  """CPU seconds so far of this process (all threads) and of each live child process."""
  out = {pid: _proc_cpu_s(pid) for pid in _children(os.getpid())}
  out[os.getpid()] = time.process_time()
  return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
  """CPU seconds spent between two `cpu_seconds` readings (children started since: all of it)."""
  return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def run_one(
  data_dir: str,
  *,
  shot: int,
  workers: int,
  threads: int,
  size: int,
  batch: int,
  steps: int,
  warmup: int,
  repeats: int,
  fold: int,
) -> dict:
  cfg = pipeline.EpisodeConfig(
    dataset="pascal5i",
    data_dir=data_dir,
    fold=fold,
    shot=shot,
    train_size=size,
    worker_count=workers,
    read_threads=threads,
    prefetch_batches=max(2, threads),
    worker_buffer_size=2,
    seed=0,
  )
  loader = pipeline.make_train_loader(cfg, global_batch_size=batch)
  it = iter(loader)
  t0 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  startup_s = time.perf_counter() - t0
  rates, cpu_ms = [], []
  for _ in range(repeats):
    c1, t1 = cpu_seconds(), time.perf_counter()
    for _ in range(steps):
      b = next(it)
    t2, c2 = time.perf_counter(), cpu_seconds()
    rates.append(round(steps * batch / (t2 - t1), 1))
    cpu_ms.append(round(1000 * cpu_delta(c1, c2) / (steps * batch), 2))
  if hasattr(it, "close"):
    it.close()
  return {
    "shot": shot,
    "worker_count": workers,
    "read_threads": threads,
    "batch": batch,
    "crop": size,
    "steps": steps,
    "repeats": repeats,
    "cpu_ms_per_episode": statistics.median(cpu_ms),
    "episodes_per_s": statistics.median(rates),
    "cpu_ms_per_episode_all": cpu_ms,
    "episodes_per_s_all": rates,
    "startup_and_warmup_s": round(startup_s, 2),
    "support_images_shape": list(b["support_images"].shape),
    "dtypes": {k: str(v.dtype) for k, v in b.items()},
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shots", type=_ints, default=[1, 5])
  p.add_argument("--workers", type=_ints, default=[0, 2], help="grain worker processes to try")
  p.add_argument("--read_threads", type=int, default=2)
  p.add_argument("--size", type=int, default=473, help="training crop")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3, help="timed windows of --steps (median)")
  p.add_argument("--num_images", type=int, default=300)
  p.add_argument("--fold", type=int, default=0)
  p.add_argument(
    "--image_size",
    type=_ints,
    default=None,
    help="min,max image side of the synthetic data (default: the generator's 112..208)",
  )
  p.add_argument(
    "--data_dir", default=None, help="reuse/keep the built dataset here instead of a temp dir"
  )
  a = p.parse_args(argv)
  if a.image_size:
    synthetic.SIZE_RANGE = (a.image_size[0], a.image_size[-1])
  with tempfile.TemporaryDirectory(prefix="fss_bench_") as tmp:
    root = a.data_dir or tmp
    t0 = time.perf_counter()
    data_dir = synthetic.make_built_dataset(root, "voc", a.num_images, 0)
    build_s = time.perf_counter() - t0
    results = [
      run_one(
        data_dir,
        shot=k,
        workers=w,
        threads=a.read_threads,
        size=a.size,
        batch=a.batch,
        steps=a.steps,
        warmup=a.warmup,
        repeats=a.repeats,
        fold=a.fold,
      )
      for k in a.shots
      for w in a.workers
    ]
  print(
    json.dumps(
      {
        "benchmark": "data_pipeline",
        "dataset": "synthetic pascal5i",
        "num_images": a.num_images,
        "image_side_range": list(synthetic.SIZE_RANGE),
        "cpu_count": os.cpu_count(),
        "build_s": round(build_s, 2),
        "results": results,
      },
      indent=1,
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
