"""Where one model's train step (or eval forward) spends its time, per XLA op (prints JSON).

Jits what the train step differentiates (``fss_jax.train.step.loss_and_grads``:
forward with train=True + backward, no optimiser update) or the eval forward
(``predict_step``), times it, then records one call with ``jax.profiler`` and sums
the duration of every executed XLA op (CPU thunks / GPU kernels, named after the
compiled HLO instructions). Each op is labelled with the heaviest HLO opcode it
contains (convolution, dot, scatter, reduce-window, transpose, ...)::

  python bench/profile_step.py --model panet --size 473 --batch 1
  python bench/profile_step.py --model panet --size 473 --field encoder_pool=reduce_window
  python bench/profile_step.py --model panet --mode eval --size 473 --trace-dir /tmp/panet_trace

Output: one JSON line with ``step_ms`` (min over ``--steps`` timed calls),
``op_ms_total`` (sum over ops; above ``step_ms`` when ops run on parallel
threads), ``by_kind`` (ms per opcode label), ``top_ops`` (the slowest ops with
their label and output shape) and ``hlo_opcodes`` (instruction counts of the
compiled module for the labels). ``--trace-dir`` keeps the trace for
TensorBoard / Perfetto; ``--out FILE`` appends the line to a ``.jsonl``.

On XLA:CPU the YNNPACK fusions (``ynn_fusion.N``: convolutions, dots, large
element-wise ops) and the generated kernels appear as op events; convolutions
run by Eigen (e.g. under ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
-individual_convolution``) do not, so compare ``step_ms`` there.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if os.fspath(REPO) not in sys.path:
  sys.path.insert(0, os.fspath(REPO))

from bench import run as bench_run

# Labels, heaviest first: an op is labelled with the first of these it contains.
KINDS = (
  "convolution",
  "dot",
  "custom-call",
  "select-and-scatter",
  "scatter",
  "gather",
  "sort",
  "reduce-window",
  "while",
  "reduce",
  "transpose",
  "pad",
  "concatenate",
  "copy",
)

_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def _parse_instruction(line: str) -> tuple[str, str, str] | None:
  """``  %name = f32[2,3]{1,0} opcode(...)`` -> (name, shape, opcode); tuple shapes too."""
  left, eq, right = line.strip().partition(" = ")
  if not eq:
    return None
  name = left.removeprefix("ROOT ").strip().lstrip("%")
  if right.startswith("("):  # tuple shape: up to the matching parenthesis
    depth = 0
    for i, ch in enumerate(right):  # noqa: B007 (i is read after the loop)
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    shape, rest = right[: i + 1], right[i + 1 :].strip()
  else:
    shape, _, rest = right.partition(" ")
  opcode = rest.split("(", 1)[0].strip()
  return (name, shape, opcode) if opcode else None


def hlo_index(text: str) -> tuple[dict[str, tuple[str, str]], collections.Counter]:
  """Compiled HLO text -> ({instruction name: (label, shape)}, opcode counts).

  A fusion / call is labelled with the heaviest opcode among the instructions
  of the computations it calls (recursively).
  """
  comps: dict[str, list[tuple[str, str, str, list[str]]]] = {}
  current = None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):  # computation header
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      comps[current] = []
    elif current is not None and (ins := _parse_instruction(line)):
      comps[current].append((*ins, _CALLS.findall(line)))

  @functools.cache
  def opcodes(comp: str, depth: int = 0) -> frozenset:
    out = set()
    for _, _, op, called in comps.get(comp, ()) if depth < 20 else ():
      out.add(op)
      for callee in called:
        out |= opcodes(callee, depth + 1)
    return frozenset(out)

  def label(op: str, called: list[str]) -> str:
    ops = {op}.union(*(opcodes(c) for c in called)) if called else {op}
    for kind in KINDS:
      if kind in ops:
        return kind
    return "elementwise" if op == "fusion" else op

  index, counts = {}, collections.Counter()
  for instrs in comps.values():
    for name, shape, op, called in instrs:
      counts[op] += 1
      index[name] = (label(op, called), shape)
  return index, counts


def op_times(trace_dir: str) -> dict[str, tuple[float, int]]:
  """Sums op events of the newest trace under ``trace_dir``: {name: (ms, calls)}."""
  import jax

  files = sorted(
    glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime
  )
  if not files:
    raise bench_run.BenchError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  ms: dict[str, float] = collections.defaultdict(float)
  calls: collections.Counter = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python" or "XLAPjRt" in line.name:
        continue  # host python frames and the client's wait-for-completion spans
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "$")):
          continue
        ms[ev.name] += ev.duration_ns / 1e6
        calls[ev.name] += 1
  return {k: (v, calls[k]) for k, v in ms.items()}


def build_fn(args):
  """(jitted fn, its arguments, description) for ``--mode``."""
  import jax

  from fss_jax.train import state as state_lib
  from fss_jax.train import step as step_lib

  spec, model, fields, config = bench_run.build(
    args.model,
    shot=args.shot,
    config_arg=args.config_arg,
    field_overrides=bench_run.parse_fields(args.field),
  )
  host = bench_run.synthetic_episode(args.batch, args.shot, args.size, seed=args.seed)
  if args.mode == "eval":
    host = {k: v for k, v in host.items() if k in bench_run.EVAL_KEYS}
  batch = {k: jax.numpy.asarray(v) for k, v in host.items()}
  rng = jax.random.PRNGKey(args.seed)
  variables = state_lib.init_variables(model, state_lib.zeros_like_episode(host), rng)
  if args.mode == "train":
    if spec.loss_fn is None:
      raise bench_run.BenchError(f"model {args.model!r} has no loss_fn")
    trainable = bench_run.build_optimiser(
      spec, config, variables["params"], min_steps=1, fields=fields
    ).trainable
    fn = functools.partial(
      step_lib.loss_and_grads,
      model=model,
      loss_fn=spec.loss_fn,
      trainable=trainable,
      compute_dtype=args.dtype,
    )
    call_args = (variables["params"], variables["batch_stats"], batch, rng)
    what = (
      "fss_jax.train.step.loss_and_grads (forward train=True + backward of the trainable "
      "parameters, as the engine; no optimiser)"
    )
  else:
    import optax

    state = state_lib.create(model, optax.identity(), host, rng=rng)
    fn = functools.partial(step_lib.predict_step, model=model, compute_dtype=args.dtype)
    call_args = (state, batch)
    what = "fss_jax.train.step.predict_step (forward + argmax)"
  return jax.jit(fn), call_args, what, fields


def profile(args) -> dict[str, Any]:
  import jax

  fn, call_args, what, fields = build_fn(args)
  t0 = time.perf_counter()
  compiled = fn.lower(*call_args).compile()
  compile_s = time.perf_counter() - t0
  index, counts = hlo_index(compiled.as_text())
  jax.block_until_ready(compiled(*call_args))  # warm-up
  times = []
  for _ in range(args.steps):
    t1 = time.perf_counter()
    jax.block_until_ready(compiled(*call_args))
    times.append(time.perf_counter() - t1)
  with tempfile.TemporaryDirectory(prefix="fss_profile_") as tmp:
    trace_dir = args.trace_dir or tmp
    jax.profiler.start_trace(trace_dir)
    try:
      jax.block_until_ready(compiled(*call_args))
    finally:
      jax.profiler.stop_trace()
    ops = op_times(trace_dir)
  by_kind: dict[str, float] = collections.defaultdict(float)
  rows = []
  for name, (ms, n) in ops.items():
    kind, shape = index.get(name, ("?", ""))
    by_kind[kind] += ms
    rows.append({"op": name, "kind": kind, "ms": round(ms, 2), "calls": n, "shape": shape})
  rows.sort(key=lambda r: -r["ms"])
  return {
    "bench": "profile_step",
    "model": args.model,
    "mode": args.mode,
    "size": args.size,
    "batch": args.batch,
    "shot": args.shot,
    "dtype": args.dtype,
    "fn": what,
    "model_fields": fields,
    "step_ms": round(1000 * min(times), 2),
    "step_ms_all": [round(1000 * t, 2) for t in times],
    "compile_s": round(compile_s, 2),
    "op_ms_total": round(sum(ms for ms, _ in ops.values()), 2),
    "by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
    "top_ops": rows[: args.top],
    "hlo_opcodes": {k: counts[k] for k in KINDS if counts[k]},
    "trace_dir": args.trace_dir or None,
    "backend": jax.default_backend(),
    "jax_version": jax.__version__,
    "command": "python bench/profile_step.py " + " ".join(args.argv),
    "host": bench_run.host_info(),
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", required=True)
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--size", type=int, default=473)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--shot", type=int, default=1)
  p.add_argument("--steps", type=int, default=2, help="timed calls after one warm-up")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--config-arg", default="")
  p.add_argument("--field", action="append", default=[], help="model field override name=value")
  p.add_argument("--top", type=int, default=15, help="slowest ops listed")
  p.add_argument("--trace-dir", default="", help="keep the jax.profiler trace here")
  p.add_argument("--out", default="", help="also append the JSON line to this .jsonl")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = p.parse_args(argv)
  args.argv = argv
  rec = profile(args)
  bench_run.emit(rec, args.out or None)
  return rec


if __name__ == "__main__":
  main()
