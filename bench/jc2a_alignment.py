"""JC²A Table 4 in spirit: forward time of the HPAM alignment per operator, 1- and 5-shot.

  python bench/jc2a_alignment.py [--side 60] [--dim 256] [--iters 20] [--all_levels]

Times the jitted `fss_jax.nn.attention.linear.HPAM` (P2P + P2B, shared projections) on
random features at ``side × side`` tokens (60 = a 473 input) for the alignment
operators of Table 4 — normal softmax attention ("softmax", NA), normal linear
attention ("linear", BatchNorm Φ), cosine interaction, ours without position
embedding, ours — with K = 1 and K = 5 (shots folded into the batch, as the
model's decision-level fusion does). Prints one JSON object: seconds per call and
the speed relative to softmax attention at 1 shot (the paper's "IS" column:
ours 4.10× at 1-shot, 0.82× at 5-shot; NA 0.19× at 5-shot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from fss_jax.nn.attention.linear import HPAM
from fss_jax.ops.pooling import adaptive_avg_pool

SETTINGS = (
  ("NA", dict(operator="softmax")),
  ("NLA", dict(operator="linear")),
  ("cosine", dict(operator="cosine")),
  ("ours w/o PE", dict(pos_embed="none")),
  ("ours", dict()),
)


def _inputs(batch, side, dim, levels, seed=0):
  rng = np.random.default_rng(seed)
  f = jnp.asarray(rng.standard_normal((batch, side, side, dim)), jnp.float32)
  m = jnp.asarray(rng.random((batch, side, side, 1)) < 0.3, jnp.float32)
  sizes = [side, side // 2, side // 4, side // 8 + (side % 8 > 0)][:levels]
  qs = [adaptive_avg_pool(f, (s, s)) for s in sizes]
  sps = [adaptive_avg_pool(f * m, (s, s)) for s in sizes]
  ms = [adaptive_avg_pool(m, (s, s))[..., 0] for s in sizes]
  return qs, sps, ms


def time_hpam(fields, *, batch, side, dim, levels, iters):
  top_k = (60, 20, 5, 3)[:levels]
  hpam = HPAM(dim=dim, top_k=top_k, **fields)
  qs, sps, ms = _inputs(batch, side, dim, levels)
  variables = hpam.init(jax.random.key(0), qs, sps, ms)
  fn = jax.jit(lambda v, q, s, m: hpam.apply(v, q, s, m))
  jax.block_until_ready(fn(variables, qs, sps, ms))  # compile + warm-up
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(variables, qs, sps, ms)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--side", type=int, default=60)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--all_levels", action="store_true", help="the 4-level pyramid, not only 60×60")
  args = p.parse_args(argv)
  levels = 4 if args.all_levels else 1
  seconds = {}
  for shot in (1, 5):
    for name, fields in SETTINGS:
      seconds[f"{name} {shot}-shot"] = time_hpam(
        fields, batch=shot, side=args.side, dim=args.dim, levels=levels, iters=args.iters
      )
  ref = seconds["NA 1-shot"]
  print(
    json.dumps(
      {
        "backend": jax.default_backend(),
        "side": args.side,
        "dim": args.dim,
        "levels": levels,
        "seconds": seconds,
        "speed_vs_NA_1shot": {k: round(ref / v, 3) for k, v in seconds.items()},
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
