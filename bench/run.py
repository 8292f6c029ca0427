"""Throughput of one fss-jax model: the real jitted train step or the eval forward (prints JSON).

Times what the engine runs (``fss_jax.train.step``: the jitted train step with the
state donated and the batch sharded over the mesh's ``data`` axis, or the eval
forward + argmax at a fixed size) on synthetic, device-resident episodes, so the
figure measures the model and not the input pipeline (``--with-pipeline`` feeds the
real grain loader over a synthetic TFDS build instead)::

  python bench/run.py --model panet --mode train --size 473 --batch 1 --shot 1
  python bench/run.py --model sccan --mode eval --size 473 --batch 8 --shot 1 --steps 50
  python bench/run.py --model panet --mode train --size 129 --batch 2 --steps 5   # CPU
  python bench/run.py --model sccan --mode train --size 473 --batch 8 --peak-tflops 989
  python bench/run.py --model panet --mode train --size 129 --with-pipeline

The model fields and the optimiser come from ``configs/<method>.py:get_config(arg)``
(``--config-arg`` adds to ``shot=K``; ``--field name=value`` overrides one model
field). Output: one JSON line with ``steps_per_s`` (train) or ``episodes_per_s``
(eval), ``images_per_s`` (query + supports), ``compile_s``, peak memory (device
``memory_stats()`` where the backend has it, else the host's peak RSS, labelled),
the compiled program's per-device memory and FLOPs (XLA cost analysis; MFU when
``--peak-tflops`` is given), parameter counts, backend, device kind and versions.
``--out FILE`` also appends the line to a ``.jsonl`` for ``bench/results.py``.

Synthetic episodes (`synthetic_episode`, numpy only, shared with
``bench/torch_ref.py``): normalised-looking standard normal images, masks with one
elliptic foreground blob (1) inside a 255 ring on a 0 background.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if os.fspath(REPO) not in sys.path:
  sys.path.insert(0, os.fspath(REPO))

from fss_jax import io as fss_io

# registry name -> (configs/<file>.py, extra config argument).
CONFIGS: dict[str, tuple[str, str]] = {
  "panet": ("panet", ""),
  "sccan": ("sccan", ""),
  "hdmnet": ("hdmnet", ""),
  "pspnet": ("pspnet", ""),
  "ssp": ("ssp", ""),
  "sccan_pahnet": ("sccan_pahnet", ""),
  "hdmnet_pahnet": ("hdmnet_pahnet", ""),
  "jc2a": ("jc2a", ""),
  "symnet": ("symnet", ""),
}
EVAL_KEYS = ("query_image", "support_images", "support_masks", "class_id")


class BenchError(ValueError):
  """A benchmark cannot run as asked (the message says why and what to do)."""


# ---------------------------------------------------------------------------
# Synthetic episodes (numpy only: also used by bench/torch_ref.py)
# ---------------------------------------------------------------------------


def blob_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """``[n, size, size]`` int32: one random ellipse of 1s, a 255 ring around it, 0 elsewhere."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  out = np.zeros((n, size, size), np.int32)
  for i in range(n):
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.12, 0.3, 2) * size + 1.0
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    out[i][r <= 1.15] = 255
    out[i][r <= 1.0] = 1
  return out


def synthetic_episode(
  batch: int, shot: int, size: int, *, seed: int = 0, num_base_classes: int = 16
) -> dict[str, np.ndarray]:
  """A 1-way K-shot Episode dict of numpy arrays (DESIGN.md contract), NHWC.

  Returns:
    query_image [B, S, S, 3] f32, query_mask [B, S, S] i32, support_images
    [B, K, S, S, 3] f32, support_masks [B, K, S, S] i32, class_id [B] i32 (1..15),
    class_index [B] i32 (0-based base-class position), query_base_label [B, S, S]
    i32 (class_index + 1 under the query foreground, 255 on the ring, 0 elsewhere),
    label_original [B, S, S] i32 and label_size [B, 2] i32 (scoring at S x S).
  """
  rng = np.random.default_rng(seed)
  b, k, s = batch, shot, size
  query_mask = blob_masks(rng, b, s)
  support_masks = blob_masks(rng, b * k, s).reshape(b, k, s, s)
  class_index = rng.integers(0, max(1, num_base_classes - 1), size=b).astype(np.int32)
  base = np.where(query_mask == 1, class_index[:, None, None] + 1, 0)
  base = np.where(query_mask == 255, 255, base).astype(np.int32)
  return {
    "query_image": rng.standard_normal((b, s, s, 3), dtype=np.float32),
    "query_mask": query_mask,
    "support_images": rng.standard_normal((b, k, s, s, 3), dtype=np.float32),
    "support_masks": support_masks,
    "class_id": rng.integers(1, 16, size=b).astype(np.int32),
    "class_index": class_index,
    "query_base_label": base,
    "label_original": query_mask.copy(),
    "label_size": np.full((b, 2), s, np.int32),
  }


# ---------------------------------------------------------------------------
# Host facts shared with torch_ref.py
# ---------------------------------------------------------------------------


def host_info() -> dict[str, Any]:
  """CPU model, core count and the 1/5/15-minute load average (the machine is shared)."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "load_avg": load,
    "python": platform.python_version(),
    "os": f"{platform.system()} {platform.release()}",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
  }


def host_peak_rss_bytes() -> int:
  """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r) * (1 if sys.platform == "darwin" else 1024)


def parse_fields(items: Sequence[str]) -> dict[str, Any]:
  """``["grid=32", "align=False"]`` -> {"grid": 32, "align": False} (Python literals, else str)."""
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise BenchError(f"--field expects name=value, got {item!r}")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def emit(record: Mapping[str, Any], out: str | None) -> None:
  line = json.dumps(
    record, sort_keys=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)
  )
  print(line, flush=True)
  if out:
    path = fss_io.user_path(out)
    if fss_io.is_remote(path):  # an object cannot be appended to: rewritten whole
      old = path.read_text() if path.exists() else ""
      fss_io.atomic_write(path, old + line + "\n")
      return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
      f.write(line + "\n")


# ---------------------------------------------------------------------------
# Model / config
# ---------------------------------------------------------------------------


def _config_arg(model: str, shot: int, config_arg: str) -> tuple[str, str]:
  file, extra = CONFIGS.get(model, (model, ""))
  return file, ",".join(a for a in (extra, f"shot={shot}", config_arg) if a)


def config_label(model: str, shot: int, config_arg: str = "") -> str:
  """``configs/<file>.py:<arg>`` as passed to ``fss_jax.main --config``."""
  file, arg = _config_arg(model, shot, config_arg)
  return f"configs/{file}.py:{arg}"


def load_config(model: str, shot: int, config_arg: str = ""):
  """``configs/<file>.py:get_config("shot=K,...")`` for registry name ``model``; None if none exists."""
  import importlib

  file, arg = _config_arg(model, shot, config_arg)
  try:
    mod = importlib.import_module(f"configs.{file}")
  except ModuleNotFoundError as e:
    if e.name == f"configs.{file}":
      return None
    raise
  return mod.get_config(arg)


def build(model_name: str, *, shot: int, config_arg: str, field_overrides: Mapping[str, Any]):
  """(spec, module, fields, config) for the benchmark."""
  from fss_jax.models import registry

  spec = registry.get(model_name)
  config = load_config(model_name, shot, config_arg)
  if config is not None:
    f = config.model_fields
    fields = dict(f.to_dict() if hasattr(f, "to_dict") else f)
  else:
    fields = {"shot": shot}
  fields.update(field_overrides)
  try:
    module = spec.make_model(**fields)
  except TypeError as e:
    raise BenchError(
      f"model fields {fields} do not fit model {model_name!r}: {e}; fix --field / --config-arg"
    ) from None
  return spec, module, fields, config


def build_optimiser(spec, config, params, *, min_steps: int, fields=None):
  """The config's optimiser with the model's frozen patterns for ``fields`` (``optim.build``),
  as fss_jax.main builds it."""
  from fss_jax.train import optim as optim_lib

  optim_cfg = (
    config.optim if config is not None else {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9}
  )
  total = int(config.total_steps) if config is not None and int(config.total_steps) > 0 else 10_000
  return optim_lib.build(
    optim_cfg, params, total_steps=max(total, min_steps), frozen=spec.frozen_patterns(fields)
  )


def _count(tree) -> int:
  import jax

  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _cost(compiled) -> dict[str, Any]:
  """FLOPs / bytes of the compiled program (per device, XLA's estimate) and its memory."""
  out: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    if cost:
      if "flops" in cost:
        out["flops_per_step"] = float(cost["flops"])
      if "bytes accessed" in cost:
        out["bytes_accessed_per_step"] = float(cost["bytes accessed"])
  except Exception as e:  # not every backend has it
    out["cost_analysis_error"] = f"{type(e).__name__}: {e}"
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      out["compiled_memory_per_device_bytes"] = {
        k: int(getattr(mem, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "alias", "generated_code")
        if hasattr(mem, f"{k}_size_in_bytes")
      }
  except Exception as e:
    out["memory_analysis_error"] = f"{type(e).__name__}: {e}"
  return out


def _peak_memory(devices) -> dict[str, Any]:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return {
      "peak_memory_bytes": max(peaks),
      "peak_memory_kind": "device peak_bytes_in_use (max over devices)",
    }
  return {
    "peak_memory_bytes": host_peak_rss_bytes(),
    "peak_memory_kind": "host peak RSS (backend has no device memory_stats)",
  }


def _pipeline_loader(args, config, tmp: str):
  """The real training loader over a synthetic PASCAL-layout TFDS build (train crop = --size)."""
  from data_prep import synthetic
  from fss_jax.data import pipeline

  data_dir = args.data_dir or synthetic.make_built_dataset(tmp, "voc", args.num_images or 120, 0)
  d = config.data if config is not None else None
  cfg = pipeline.EpisodeConfig(
    dataset="pascal5i",
    data_dir=data_dir,
    fold=0,
    shot=args.shot,
    train_size=args.size,
    train_resize=d.train_resize if d is not None else "crop",
    base_label=bool(d.base_label) if d is not None else False,
    **(
      {
        "scale": tuple(d.scale),
        "rotate": tuple(d.rotate),
        "blur": float(d.get("blur", pipeline.EpisodeConfig.blur)),
      }
      if d is not None
      else {}
    ),
    worker_count=args.workers,
    read_threads=args.read_threads,
    seed=0,
  )
  return pipeline.make_train_loader(cfg, global_batch_size=args.batch)


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
  """Builds, compiles and times one configuration; returns the JSON record."""
  import jax
  import optax

  from fss_jax import parallel
  from fss_jax.train import state as state_lib
  from fss_jax.train import step as step_lib

  spec, model, fields, config = build(
    args.model, shot=args.shot, config_arg=args.config_arg, field_overrides=parse_fields(args.field)
  )
  if args.mode == "train" and spec.loss_fn is None:
    raise BenchError(f"model {args.model!r} has no loss_fn; only --mode eval can be benchmarked")
  if args.devices > jax.device_count():
    raise BenchError(
      f"--devices {args.devices} but only {jax.device_count()} {jax.default_backend()} "
      f"devices exist (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)"
    )
  mesh = parallel.make_mesh({"data": -1, "model": 1, "num_devices": args.devices})
  n_dev = mesh.devices.size
  if args.batch % n_dev:
    raise BenchError(f"--batch {args.batch} must be a multiple of --devices {n_dev}")
  repl = parallel.replicated(mesh)
  num_base = int(fields.get("num_base_classes", 16) or 16)

  tmp = tempfile.TemporaryDirectory(prefix="fss_bench_")
  try:
    loader_it = None
    if args.with_pipeline:
      loader_it = iter(_pipeline_loader(args, config, tmp.name))
      host = {k: np.asarray(v) for k, v in next(loader_it).items()}
    else:
      host = synthetic_episode(
        args.batch, args.shot, args.size, seed=args.seed, num_base_classes=num_base
      )
    if args.mode == "eval":
      keys = EVAL_KEYS + (("label_original", "label_size") if args.eval_fn == "score" else ())
      keep = [k for k in keys if k in host]
      if args.eval_fn == "score" and "label_original" not in host:
        raise BenchError(
          "--eval-fn score needs label_original; the training loader of --with-pipeline "
          "has none: use --eval-fn predict"
        )
      host = {k: host[k] for k in keep}
    else:
      keep = list(host)
    batch = parallel.to_global(host, mesh)

    rng = jax.random.PRNGKey(args.seed)
    if args.mode == "train":
      params_shape = jax.eval_shape(
        lambda k: state_lib.init_variables(model, state_lib.zeros_like_episode(host), k)["params"],
        rng,
      )
      opt = build_optimiser(
        spec, config, params_shape, min_steps=args.warmup + args.steps + 1, fields=fields
      )
      tx, trainable = opt.tx, opt.trainable
      fn = step_lib.make_train_step(
        model=model,
        loss_fn=spec.loss_fn,
        tx=tx,
        mesh=mesh,
        trainable=trainable,
        compute_dtype=args.dtype,
      )
      step_source = "fss_jax.train.step.make_train_step (state donated)"
    else:
      tx, trainable = optax.identity(), None
      if args.eval_fn == "score":
        fn = step_lib.make_eval_step(
          model=model, mesh=mesh, score=args.score, compute_dtype=args.dtype
        )
        step_source = f"fss_jax.train.step.make_eval_step (score={args.score})"
      else:
        fn = step_lib.make_predict_step(model=model, mesh=mesh, compute_dtype=args.dtype)
        step_source = "fss_jax.train.step.make_predict_step (forward + argmax)"
    state = state_lib.create(model, tx, host, rng=rng, sharding=repl)
    n_params = _count(state.params)
    n_train = (
      int(
        sum(
          int(np.prod(p.shape))
          for p, t in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable))
          if t
        )
      )
      if trainable is not None
      else None
    )
    n_stats = _count(state.batch_stats)

    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = _cost(compiled)

    def next_batch():
      if loader_it is None:
        return batch
      h = next(loader_it)
      return parallel.to_global({k: np.asarray(h[k]) for k in keep}, mesh)

    metrics = None
    for _ in range(args.warmup):
      if args.mode == "train":
        state, metrics = compiled(state, next_batch())
      else:
        metrics = compiled(state, next_batch())
    jax.block_until_ready((state, metrics))
    t1 = time.perf_counter()
    for _ in range(args.steps):
      if args.mode == "train":
        state, metrics = compiled(state, next_batch())
      else:
        metrics = compiled(state, next_batch())
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t1
  finally:
    tmp.cleanup()

  rate = args.steps / elapsed
  episodes_s = rate * args.batch
  rec: dict[str, Any] = {
    "bench": "fss_jax",
    "impl": "jax",
    "model": args.model,
    "mode": args.mode,
    "size": args.size,
    "batch": args.batch,
    "shot": args.shot,
    "dtype": args.dtype,
    "devices": n_dev,
    "with_pipeline": bool(args.with_pipeline),
    "steps": args.steps,
    "warmup": args.warmup,
    "steps_per_s": round(rate, 4),
    "episodes_per_s": round(episodes_s, 4),
    "images_per_s": round(episodes_s * (1 + args.shot), 4),
    "step_ms": round(1000 * elapsed / args.steps, 2),
    "compile_s": round(compile_s, 2),
  }
  if args.mode == "eval":
    rec["eval_fn"] = args.eval_fn
  if args.mode == "train" and metrics is not None and "loss" in metrics:
    rec["final_loss"] = float(np.asarray(parallel.to_host(metrics["loss"])))
  rec.update(_peak_memory(mesh.devices.flat))
  rec.update(cost)
  if "flops_per_step" in cost:
    achieved = cost["flops_per_step"] * rate
    rec["tflops_per_s_per_device"] = round(achieved / 1e12, 4)
    if args.peak_tflops:
      rec["peak_tflops"] = args.peak_tflops
      rec["mfu"] = round(achieved / (args.peak_tflops * 1e12), 4)
  rec.update(
    {
      "params_total": n_params,
      "params_trainable": n_train,
      "batch_stats": n_stats,
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "step_fn": step_source,
      "config": config_label(args.model, args.shot, args.config_arg)
      if config is not None
      else None,
      "model_fields": fields,
      "command": "python bench/run.py " + " ".join(args.argv),
    }
  )
  try:
    import flax

    rec["flax_version"] = flax.__version__
  except ImportError:
    pass
  rec["host"] = host_info()
  return rec


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", required=True, help="registry name (panet, sccan, hdmnet, ...)")
  p.add_argument(
    "--mode",
    choices=("train", "eval", "eval_protocol"),
    default="train",
    help="eval_protocol: the test protocol end to end (bench/eval_protocol.py)",
  )
  p.add_argument("--size", type=int, default=473, help="square input side H = W")
  p.add_argument("--batch", type=int, default=1, help="global episodes per step")
  p.add_argument("--shot", type=int, default=1)
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype (config.compute_dtype: bfloat16 = bf16 compute, float32 params/losses)",
  )
  p.add_argument(
    "--devices", type=int, default=1, help="devices of the data-parallel mesh (0: all)"
  )
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--config-arg", default="", help="extra config argument, e.g. 'dataset=coco,layers=101'"
  )
  p.add_argument(
    "--field", action="append", default=[], help="model field override name=value (repeatable)"
  )
  p.add_argument(
    "--eval-fn",
    choices=("predict", "score"),
    default="predict",
    help="eval: forward + argmax (predict) or the engine's eval step scoring at S x S (score)",
  )
  p.add_argument("--score", choices=("pad_square", "original"), default="pad_square")
  p.add_argument(
    "--peak-tflops", type=float, default=0.0, help="device peak TFLOP/s for the MFU figure"
  )
  p.add_argument(
    "--with-pipeline",
    action="store_true",
    help="feed the grain training loader over a synthetic TFDS build (measures data + model)",
  )
  p.add_argument(
    "--data-dir",
    "--data_dir",
    default="",
    help="--with-pipeline / eval_protocol: an existing TFDS data_dir to read",
  )
  p.add_argument(
    "--num-images",
    type=int,
    default=0,
    help="synthetic images to build (0: 120 for --with-pipeline, 600 for eval_protocol)",
  )
  p.add_argument("--workers", type=int, default=0, help="--with-pipeline: grain worker processes")
  p.add_argument("--read-threads", type=int, default=2)
  p.add_argument("--out", default="", help="also append the JSON line to this .jsonl file")
  p.add_argument("--episodes", type=int, default=200, help="eval_protocol: episodes per seed")
  p.add_argument("--seeds", type=int, default=2, help="eval_protocol: seeds 321, 322, ...")
  p.add_argument("--no-cache", action="store_true", help="eval_protocol: whole forward per episode")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(argv)
  args.argv = argv
  if args.steps < 1 or args.warmup < 0:
    raise BenchError("--steps must be >= 1 and --warmup >= 0")
  if (
    args.devices > 1
    and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    and "jax" not in sys.modules
  ):
    # Only affects the CPU platform; a GPU run uses its real devices.
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
  if args.mode == "eval_protocol":
    from bench import eval_protocol

    rec = {
      **eval_protocol.run(args, build, _peak_memory),
      "host": host_info(),
      "command": " ".join(["python bench/run.py", *argv]),
    }
  else:
    rec = run(args)
  emit(rec, args.out or None)
  return rec


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:  # BenchError, registry.UnsupportedModelError, bad config
    print(f"bench/run.py: {e}", file=sys.stderr)
    sys.exit(2)
