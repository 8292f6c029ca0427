"""End-to-end speed of the test protocol: stored lists -> decode -> transform -> model -> score.

``bench/run.py --mode eval_protocol`` runs this: the model (configs/<method>.py fields,
random weights: speed does not depend on them) evaluated exactly as ``--mode eval`` does
(`fss_jax.eval.evaluate.evaluate_seeds` over `pipeline.make_eval_loader` batches of stored
episode lists, the jitted `step.make_eval_step` scoring at the original label size), with
the frozen-encoder cache (`fss_jax.eval.cached`) or, with ``--no-cache``, the whole forward
per episode::

  python bench/run.py --mode eval_protocol --model sccan --size 241 --shot 1 --episodes 200 --seeds 2
  python bench/run.py --mode eval_protocol --model sccan --size 241 --shot 1 --episodes 200 --seeds 2 --no-cache

Without ``--data_dir`` a synthetic PASCAL-5i (``--num-images``, default 600) is built in a
temporary folder, as bench/data_pipeline.py does. Compilation is excluded from
``episodes_per_s``: a one-batch run on its own episode list compiles every program first
(``compile_s``). Output fields: ``episodes_per_s`` (all seeds' episodes / wall time),
``unique_images``, ``backbone_passes`` (encoder passes: cached = encoded images,
uncached = (1 + K) per episode), ``cache_bytes``, ``cache_placement``, ``peak_mib``,
``miou`` (mean over seeds), ``per_seed_miou``, and XLA's count of the model's arithmetic
(HLO cost analysis, before optimisation): ``gflop_per_episode`` (cached: ``head_gflop``, the
forward on cached features, plus ``encoder_gflop`` per image x passes / episodes; plain: the
whole forward), so plain / cached is the speed-up the arithmetic allows at equal throughput.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

SEED0 = 321


def _episode_files(data_dir: str, folder: str, *, shot: int, num: int, seeds: list[int]) -> dict:
  from fss_jax.data import episodes, source

  val = source.open_split(data_dir, "pascal5i", "val")
  out = {}
  for s in seeds:
    recs = episodes.generate(val.index, "pascal5i", 0, "test", shot=shot, num_episodes=num, seed=s)
    out[s] = f"{folder}/episodes_{shot}shot_s{s}_n{num}.jsonl"
    episodes.write_episodes(out[s], recs)
  return out


def _gflop(fn, *args) -> float:
  """XLA's FLOP count of ``fn(*args)`` (HLO cost analysis of the lowered program), in GFLOP."""
  import jax

  cost = jax.jit(fn).lower(*args).cost_analysis() or {}
  return float(cost.get("flops", float("nan"))) / 1e9


def _arithmetic(model, encoder, variables, example, cache, *, passes: int, episodes: int):
  """GFLOP per episode of the path that ran: the whole forward (plain), or the forward on
  cached features plus the encoder passes shared out over the episodes (cached)."""
  import jax
  import numpy as np

  from fss_jax.models import frozen

  ep = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in example.items()}
  b, k = ep["support_images"].shape[:2]
  forward = lambda v, e: model.apply(v, e, train=False)
  if cache is None:
    return {"gflop_per_episode": round(_gflop(forward, variables, ep) / b, 2)}
  feats = lambda *lead: {
    n: jax.ShapeDtypeStruct((*lead, *shape), dt) for n, (shape, dt) in cache.shapes.items()
  }
  ep[frozen.QUERY_FEATURES], ep[frozen.SUPPORT_FEATURES] = feats(b), feats(b, k)
  head = _gflop(forward, variables, ep) / b
  images = jax.ShapeDtypeStruct((2, *ep["query_image"].shape[1:]), np.float32)
  masks = jax.ShapeDtypeStruct(images.shape[:3], np.int32)
  # Masks as the cache passes them (an encoder without masked_supports ignores them).
  enc = _gflop(lambda v, x, m: encoder(v, x, m), encoder.variables(variables), images, masks) / 2
  return {
    "gflop_per_episode": round(head + enc * passes / episodes, 2),
    "head_gflop": round(head, 2),
    "encoder_gflop": round(enc, 2),
  }


def run(args, build, peak_memory) -> dict[str, Any]:
  """One measurement (``args`` of bench/run.py; ``build`` / ``peak_memory`` its helpers)."""
  import jax
  import optax

  from data_prep import synthetic
  from fss_jax import parallel
  from fss_jax.data import pipeline
  from fss_jax.eval import cached as cached_lib
  from fss_jax.eval import evaluate as evaluate_lib
  from fss_jax.eval import protocol as protocol_lib
  from fss_jax.train import state as state_lib
  from fss_jax.train import step as step_lib

  spec, model, fields, config = build(
    args.model, shot=args.shot, config_arg=args.config_arg, field_overrides={}
  )
  mesh = parallel.make_mesh({"data": -1, "model": 1, "num_devices": args.devices})
  batch = args.batch
  seeds = [SEED0 + i for i in range(args.seeds)]
  with tempfile.TemporaryDirectory(prefix="fss_eval_bench_") as tmp:
    data_dir = args.data_dir or synthetic.make_built_dataset(tmp, "voc", args.num_images or 600, 0)
    files = _episode_files(data_dir, tmp, shot=args.shot, num=args.episodes, seeds=seeds)
    warm = _episode_files(data_dir, tmp, shot=args.shot, num=batch, seeds=[SEED0 + 100])
    cfg = pipeline.EpisodeConfig(
      dataset="pascal5i",
      data_dir=data_dir,
      fold=0,
      shot=args.shot,
      test_size=args.size,
      test_resize=protocol_lib.resolve(config)["test_resize"] if config is not None else "aspect",
      read_threads=args.read_threads,
    )

    def loaders(which: dict) -> dict:
      return {
        s: pipeline.make_eval_loader(cfg, p, global_batch_size=batch) for s, p in which.items()
      }

    first = loaders(warm)
    example = evaluate_lib.model_inputs(next(iter(first[SEED0 + 100])))
    example = {k: v for k, v in example.items() if k != "valid"}
    state = state_lib.create(
      model,
      optax.identity(),
      example,
      rng=jax.random.PRNGKey(0),
      sharding=parallel.replicated(mesh),
    )
    # The method's protocol scoring (pfenet_bam: aspect resize -> "pad_square"), as --mode eval.
    score = protocol_lib.scoring(config) if config is not None else args.score
    eval_fn = step_lib.make_eval_step(model=model, mesh=mesh, score=score)

    def evaluate(which: dict) -> tuple[dict, Any, float, dict]:
      lds = loaders(which)
      t0 = time.perf_counter()
      cache = None
      if not args.no_cache:
        if spec.encoder is None:
          raise ValueError(f"{args.model} has no frozen encoder ({spec.encoder_missing})")
        cache = cached_lib.FeatureCache(
          spec.encoder(**fields),
          state.variables(),
          lds,
          mesh=mesh,
          encode_batch=batch * (1 + args.shot),
        )
      summary, _ = evaluate_lib.evaluate_seeds(
        eval_fn,
        state,
        lds.__getitem__,
        seeds=list(lds),
        classes=cfg.test_classes(),
        mesh=mesh,
        local_batch_size=parallel.local_batch_size(batch, mesh),
        to_global=cached_lib.attach_for(cache),
      )
      return summary, cache, time.perf_counter() - t0, lds

    _, _, compile_s, _ = evaluate(warm)
    summary, cache, seconds, lds = evaluate(files)
  episodes = args.episodes * len(seeds)
  stats = cache.stats() if cache is not None else {}
  passes = stats.get("backbone_passes", episodes * (1 + args.shot))
  arithmetic = _arithmetic(
    model,
    spec.encoder(**fields) if cache is not None else None,
    state.variables(),
    example,
    cache,
    passes=passes,
    episodes=episodes,
  )
  unique = {p for ld in lds.values() for sp in ld.specs for p in (sp.query, *sum(sp.supports, ()))}
  return {
    "model": args.model,
    "mode": "eval_protocol",
    "cache": not args.no_cache,
    "size": args.size,
    "shot": args.shot,
    "batch": batch,
    "seeds": seeds,
    "episodes_per_seed": args.episodes,
    "episodes_per_s": round(episodes / seconds, 4),
    "seconds": round(seconds, 3),
    "compile_s": round(compile_s, 3),
    "unique_images": stats.get("unique_images", len(unique)),
    "backbone_passes": passes,
    "cache_bytes": stats.get("cache_bytes", 0),
    "cache_placement": stats.get("placement", "none"),
    "encode_s": stats.get("encode_s"),
    "peak_mib": round(peak_memory(jax.devices())["peak_memory_bytes"] / 2**20, 1),
    "miou": round(float(summary["miou_mean"]), 4),
    "per_seed_miou": {s: round(float(r["miou"]), 4) for s, r in summary["seeds"].items()},
    **arithmetic,
  }
