"""``--mode eval``: a trained (or converted) model scored on the stored test episodes of every
seed, written to a results JSON.

``evaluate(config, workdir)`` takes the test run's config from
`fss_jax.eval.protocol.eval_config` (resolved protocol; ``eval.shot`` / ``way`` / ``dataset`` /
``fold``), loads the state with `load_for_eval` -- the workdir's ``best/`` then
``checkpoints/`` (reversed by ``config.eval.checkpoint=latest``), then ``config.resume``, then
``config.init`` (converted weights; fold check, fresh state, `checkpointing.load_init`), else
`FileNotFoundError` -- whose metadata is checked against the *training* config, and runs
`fss_jax.eval.evaluate.evaluate_seeds` over ``config.eval.seeds`` x ``config.eval.episodes``.

It writes ``<workdir>/results_<dataset>_f<fold>_[<way>way]<shot>shot<protocol tag>.json``
(`results_path`; no ``_f<fold>`` for the cross-domain sets) with its bar chart,
``config_eval.json`` (the run record), and TensorBoard scalars ``eval/miou``, ``eval/fb_iou``
(+ ``_std``), ``eval/iou/<id>_<name>`` at the checkpoint's step (+ episode panels when
``config.eval.num_images`` > 0). The data comes from `fss_jax.train.data.make_data` (or an
injected `fss_jax.train.data.Data`); the model, devices log and writer are set up as for training
(`fss_jax.train.runtime`).
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging
from etils import epath

from fss_jax import io as fss_io
from fss_jax import parallel
from fss_jax.eval import cached as cached_lib
from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.eval import protocol as protocol_lib
from fss_jax.train import checkpointing as ckpt_lib
from fss_jax.train import data as data_lib
from fss_jax.train import optim as optim_lib
from fss_jax.train import runtime
from fss_jax.train import state as state_lib
from fss_jax.train import step as step_lib
from fss_jax.train import workdir as workdir_lib


def results_path(config, workdir: epath.Path) -> epath.Path:
  """Where the results JSON of the test run ``config`` goes in ``workdir``."""
  from fss_jax.data import pipeline

  way = f"{config.way}way" if config.way > 1 else ""
  fold = (
    "" if pipeline.is_cross_domain(config.dataset) else f"_f{config.fold}"
  )  # fold-less test sets
  return workdir / (
    f"results_{config.dataset}{fold}_{way}{config.shot}shot{protocol_lib.results_tag(config)}.json"
  )


def load_for_eval(config, workdir: epath.Path, model, tx, example, mesh):
  """State for ``--mode eval``: best > latest checkpoint of the workdir (order by
  ``config.eval.checkpoint``), else config.resume, else config.init; else an error.

  Returns:
    (state, a description of where it came from: "workdir <folder> step <s>", ...).
  """
  repl = parallel.replicated(mesh)
  abstract = state_lib.abstract(model, tx, example, sharding=repl)
  meta = ckpt_lib.checkpoint_meta(config)
  order = (
    [ckpt_lib.BEST_DIR, ckpt_lib.CHECKPOINT_DIR]
    if config.eval.checkpoint == "best"
    else [ckpt_lib.CHECKPOINT_DIR, ckpt_lib.BEST_DIR]
  )
  candidates = [(workdir / d, f"workdir {workdir / d}") for d in order]
  if config.resume:
    candidates.append(
      (ckpt_lib.checkpoint_root(fss_io.user_path(config.resume)), f"config.resume {config.resume}")
    )
  for path, where in candidates:
    if not path.is_dir():
      continue
    found = ckpt_lib.restore_latest(path, abstract, meta, where=where, with_data=False)
    if found is not None:
      state, step = found
      return state, f"{where} step {step}"
  if config.init:
    inits = state_lib.parse_inits(config.init, config.init_prefix)
    ckpt_lib.check_init_folds(config, inits, mode="eval")
    state = state_lib.create(
      model, tx, example, rng=jax.random.PRNGKey(int(config.seed)), sharding=repl
    )
    return ckpt_lib.load_init(config, state, inits, tx, sharding=repl), f"config.init {config.init}"
  raise FileNotFoundError(
    f"nothing to evaluate: {workdir} has no checkpoint (train first with --mode train) and "
    f"config.init / config.resume are not set (--config.init=<converted weights dir>)"
  )


def evaluate(config, workdir: str | os.PathLike, *, data: data_lib.Data | None = None) -> dict:
  """``--mode eval``: every seed of ``config.eval.seeds`` -> results JSON; returns the summary.

  The test run's config is `protocol_lib.eval_config(config)` (resolved protocol, eval.shot /
  way / dataset / fold); the checkpoint is checked against ``config``, the training run."""
  train_config, config = config, protocol_lib.eval_config(config)
  workdir = fss_io.user_path(workdir)
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  runtime.log_devices(mesh)
  eval_bs = data_lib.global_eval_batch_size(config, mesh)
  local_eval_bs = parallel.local_batch_size(eval_bs, mesh)
  spec, model = runtime.build_model(config, sizes=("test_size",))
  if data is None:
    data = data_lib.make_data(config, workdir, eval_batch_size=eval_bs)
  eval_data = data.eval
  if eval_data is None:
    raise ValueError("evaluation needs the test episodes: this Data has no eval loader")
  seeds = [int(s) for s in config.eval.seeds]
  num = int(config.eval.episodes)
  first_loader = eval_data(seeds[0], num)
  example = evaluate_lib.model_inputs(next(iter(first_loader)))
  example = {k: v for k, v in example.items() if k != "valid"}
  params_shape = jax.eval_shape(
    lambda k: state_lib.init_variables(model, state_lib.zeros_like_episode(example), k)["params"],
    jax.random.PRNGKey(0),
  )
  opt = optim_lib.build(
    config.optim,
    params_shape,
    total_steps=max(1, int(config.total_steps)),
    frozen=spec.frozen_patterns(ckpt_lib.model_fields(config)),
  )
  state, source = load_for_eval(train_config, workdir, model, opt.tx, example, mesh)
  logging.info("evaluating %s on %d seed(s) x %d episodes", source, len(seeds), num)
  dtype = runtime.compute_dtype_name(config)
  score = protocol_lib.scoring(config)
  eval_step = step_lib.make_eval_step(model=model, mesh=mesh, score=score, compute_dtype=dtype)
  t0 = time.time()
  loaders = {s: first_loader if s == seeds[0] else eval_data(s, num) for s in seeds}
  cache = cached_lib.for_evaluation(
    config, spec, state.variables(), loaders, mesh=mesh, dtype=dtype
  )
  summary, tables = evaluate_lib.evaluate_seeds(
    eval_step,
    state,
    loaders.__getitem__,
    seeds=seeds,
    classes=data.classes,
    mesh=mesh,
    local_batch_size=local_eval_bs,
    class_names=data.class_names,
    to_global=cached_lib.attach_for(cache),
  )
  if cache is not None:
    summary["feature_cache"] = cache.stats()
    logging.info("feature cache: %s", summary["feature_cache"])
  summary.update(
    {
      "model": config.model,
      "dataset": config.dataset,
      "fold": config.fold,
      "shot": config.shot,
      "way": config.way,
      "episodes_per_seed": num,
      "checkpoint": source,
      "score": score.mode,
      **protocol_lib.results_fields(train_config, config),
      "seconds": round(time.time() - t0, 3),
      "tables": {str(k): v for k, v in tables.items()},
    }
  )
  path = evaluate_lib.write_json(results_path(config, workdir), summary)
  workdir_lib.write_run_record(config, workdir, mode="eval")
  if path is not None:  # process 0
    from fss_jax.eval import visualize

    visualize.summary_bar_chart(summary, visualize.chart_path(path), class_names=data.class_names)
  step = int(jax.device_get(parallel.to_host(state.step)))
  # TensorBoard: eval/miou, eval/fb_iou (+ _std), eval/iou/<id>_<name>
  writer = runtime.metric_writer(config, workdir)
  try:
    writer.write_scalars(step, evaluate_lib.summary_scalars(summary))
    if int(config.eval.get("num_images", 0)) > 0:
      runtime.write_episode_images(
        config,
        writer,
        step,
        state,
        step_lib.make_predict_step(model=model, mesh=mesh, compute_dtype=dtype),
        eval_data(seeds[0], num),
        mesh,
        local_eval_bs,
      )
  finally:
    writer.close()
  logging.info("%s -> %s", evaluate_lib.format_summary(summary), path)
  return summary


__all__ = ["evaluate", "load_for_eval", "results_path"]
