"""The training loop: ``train_and_evaluate(config, workdir)`` and the side effects of a run.

1. mesh (`fss_jax.parallel`), model + loss from the registry (`build_model`, input sizes
   checked), data loaders (`fss_jax.train.data.make_data`, or an injected `Data` in tests);
2. state, in the fixed resume order (`_initial_state`): the workdir's latest readable
   checkpoint > ``config.resume`` (another run's workdir) > ``config.init`` (converted
   weights, strict keys) > random init; data-derived parameters (`ModelSpec.derived_params`)
   are set on the last two. A workdir holding a checkpoint of another model, other model
   fields, dataset, fold, shot or way, or other parameter shapes is refused with the reason
   (the checks and restores are `fss_jax.train.checkpointing`'s);
3. the jitted train step; every ``log_every_steps`` the metrics are averaged and written
   (clu ``metric_writers``: TensorBoard + log) and ``periodic_actions.ReportProgress`` reports
   speed;
4. periodic validation on stored episodes (seed ``config.eval.val_seed``) ->
   ``<workdir>/best`` keeps the best val-mIoU params (data_protocol.md §10: the references
   select on the test classes);
5. orbax checkpoints in ``<workdir>/checkpoints`` (async; state + data-iterator state of every
   process + metadata; `fss_jax.train.checkpointing`). Losses are checked before every
   checkpoint: a NaN/Inf stops the run with `NonFiniteLossError`, and the last good checkpoint
   is kept untouched. A save that fails (disk full, I/O error) stops the run with
   `checkpointing.CheckpointSaveError`: raised by the save itself, or, for an async save, at
   the first step boundary after its failure. Before the first step the disk must have room
   for one checkpoint, and the unfinished saves of a killed run are removed (when the caller
   holds the workdir's lock, as `fss_jax.main` does; `fss_jax.train.workdir`). SIGTERM /
   SIGINT save the current step and raise `TrainingInterrupted`.

What a run sets up around the loop (the model from the config, the device log, the metric
writer, quiet library logs) is `fss_jax.train.runtime`'s, shared with ``--mode eval``.

A checkpoint's step ``s`` means: ``s`` optimiser steps done, the data iterator positioned at
batch ``s``, and step ``s`` draws ``fold_in(rng, s)`` -- so a resumed run reproduces an
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from fss_jax import io as fss_io
from fss_jax import parallel
from fss_jax.eval import cached as cached_lib
from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.eval import protocol as protocol_lib
from fss_jax.models import registry
from fss_jax.train import checkpointing as ckpt_lib
from fss_jax.train import data as data_lib
from fss_jax.train import optim as optim_lib
from fss_jax.train import runtime
from fss_jax.train import state as state_lib
from fss_jax.train import step as step_lib
from fss_jax.train import workdir as workdir_lib

_HISTORY = 1000  # logged train metrics kept in the returned summary


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/Inf; the message names the step and the kept checkpoint.

  Attributes:
    step: the step whose metrics were non-finite.
    first_ruined: the first step whose saved state must not be kept: ``step - 1`` for a
      non-finite loss (the loss of step s is computed from the state after update s - 1),
      ``step`` when update ``step`` itself made the parameters non-finite.
  """

  def __init__(self, message: str, *, step: int = 0, first_ruined: int | None = None):
    super().__init__(message)
    self.step = step
    self.first_ruined = step if first_ruined is None else first_ruined


class TrainingInterrupted(Exception):
  """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) stopped training after a checkpoint
  of the interrupted step was written.

  Attributes:
    signum: the signal; step: the step saved; exit_code: 128 + signum (143 / 130).
  """

  def __init__(self, signum: int, step: int, workdir: epath.Path, *, saved: bool = True):
    name = signal.Signals(signum).name
    if saved:
      text = (
        f"training interrupted by {name} after step {step}; checkpoint {step} is saved in "
        f"{workdir / ckpt_lib.CHECKPOINT_DIR} and a rerun resumes from it"
      )
    else:
      text = (
        f"training interrupted by {name} before its first step (at step {step}); nothing "
        f"new to save, a rerun starts there"
      )
    super().__init__(text)
    self.signum, self.step, self.exit_code = signum, step, 128 + signum


@contextlib.contextmanager
def _stop_requests():
  """Collects SIGTERM / SIGINT while training (the loop saves, then stops): yields the list of
  received signals. Outside the main thread (no handlers possible) it yields an empty list.

  Multi-process runs leave SIGTERM to JAX's preemption service, which makes every process
  reach the same sync step (`CheckpointManager.reached_preemption`, checked by the loop), so
  that all hosts save the same step; only SIGINT is caught here then.
  """
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return

  def handler(signum, frame):
    del frame
    received.append(signum)

  caught = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  old = {sig: signal.signal(sig, handler) for sig in caught}
  try:
    yield received
  finally:
    for sig, h in old.items():
      signal.signal(sig, h)


# ---------------------------------------------------------------------------
# Metric bookkeeping
# ---------------------------------------------------------------------------


class _Pending:
  """Device metrics since the last flush; checked for NaN/Inf and averaged on the host."""

  def __init__(self):
    self.items: list[tuple[int, Any]] = []
    self.last: dict[str, float] = {}
    self.history: list[dict[str, float]] = []

  def add(self, step: int, metrics: Any) -> None:
    self.items.append((step, metrics))

  def flush(
    self, *, last_good: int | None = None, workdir: epath.Path | None = None
  ) -> dict[str, float] | None:
    """Averages the pending metrics; raises `NonFiniteLossError` at the first bad step."""
    del last_good, workdir  # the loop names the checkpoint that is kept
    if not self.items:
      return None
    steps = [s for s, _ in self.items]
    host = [parallel.to_host(m) for _, m in self.items]
    self.items = []
    for s, m in zip(steps, host):
      bad_params = float(m.get("params_finite", 1.0)) != 1.0
      if not np.isfinite(m["loss"]) or bad_params:
        others = ", ".join(f"{k}={float(v):.4g}" for k, v in m.items() if k != "params_finite")
        if np.isfinite(m["loss"]):
          what, first_ruined = (
            (f"update {s} made parameters non-finite (loss {float(m['loss']):.4g} before it)"),
            s,
          )
        else:
          what, first_ruined = f"the loss is {float(m['loss'])}", s - 1
        raise NonFiniteLossError(
          f"training stopped: {what} at step {s} ({others})", step=s, first_ruined=first_ruined
        )
    keys = [k for k in host[-1].keys() if k != "params_finite"]
    self.last = {k: float(np.mean([float(m[k]) for m in host])) for k in keys}
    self.history.append({"step": steps[-1], **self.last})
    del self.history[:-_HISTORY]
    return self.last


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _set_derived_params(config, state):
  """``state`` with the parameters its model computes from the training data set
  (`ModelSpec.derived_params`, e.g. JC²A's FP_base): only when a run starts from scratch or
  config.init; a checkpoint already holds them."""
  from flax import traverse_util

  derive = registry.get(config.model).derived_params_fn()
  values = dict(derive(config)) if derive is not None else {}
  if not values:
    return state
  flat = traverse_util.flatten_dict(state.params, sep="/")
  for path, value in values.items():
    value = np.asarray(value)
    if path not in flat or tuple(flat[path].shape) != value.shape:
      have = f"shape {tuple(flat[path].shape)}" if path in flat else "no such parameter"
      raise ValueError(
        f"{config.model}: the data-derived parameter {path} {value.shape} does not "
        f"fit the model ({have})"
      )
    value = value.astype(flat[path].dtype)
    flat[path] = jax.make_array_from_callback(
      value.shape, flat[path].sharding, lambda idx, v=value: v[idx]
    )
    logging.info("parameter %s %s set from the training data", path, list(value.shape))
  return state.replace(params=traverse_util.unflatten_dict(flat, sep="/"))


def _initial_state(config, mngr, abstract, meta, it, first, model, opt, rng, repl, workdir):
  """The fixed resume order: workdir latest > config.resume > config.init > scratch.

  Returns:
    (state, where it came from, the first batch or None when the data iterator was restored).
  """
  state = ckpt_lib.restore_latest_readable(mngr, abstract, meta, workdir=workdir, data_iter=it)
  if state is not None:
    return state, "workdir", None
  if config.resume:
    src = ckpt_lib.checkpoint_root(fss_io.user_path(config.resume))
    found = ckpt_lib.restore_latest(src, abstract, meta, where=f"config.resume {src}", data_iter=it)
    if found is None:
      raise FileNotFoundError(
        f"config.resume={config.resume!r} holds no checkpoint (looked in {src})"
      )
    return found[0], "resume", None
  inits = state_lib.parse_inits(config.init, config.init_prefix)
  absent = [path for _, path in inits if not fss_io.user_path(path).exists()]
  if config.get("init_required", False) and (not inits or absent):
    # A frozen part (the fold's base learner) must come from somewhere; training it as random
    # weights would silently give a meaningless model.
    if not inits:
      problem = "config.init is empty"
    elif len(inits) == 1:
      problem = f"config.init={config.init!r} does not exist"
    else:
      problem = f"config.init={config.init!r}: {', '.join(absent)} not found"
    raise FileNotFoundError(
      f"{config.model} needs converted or trained weights for its frozen parts: "
      f"{problem}.\n{config.get('init_help', '')}".rstrip()
    )
  ckpt_lib.check_init_folds(config, inits, mode="train")
  state = state_lib.create(model, opt.tx, first, rng=rng, sharding=repl)
  state = _set_derived_params(config, state)  # data-derived parameters (JC²A's FP_base)
  if inits:
    state = ckpt_lib.load_init(config, state, inits, opt.tx, sharding=repl)
    return state, "init", first
  return state, "scratch", first


def train_and_evaluate(
  config,
  workdir: str | os.PathLike,
  *,
  data: data_lib.Data | None = None,
  on_checkpoint: Callable[[int], None] | None = None,
) -> dict:
  """Trains ``config`` in ``workdir`` (resuming when possible); returns a summary.

  ``on_checkpoint(step)`` runs each time a checkpoint is complete (`fss_jax.main` uploads the
  log of a gs:// workdir there).

  Returns:
    {"step", "train": last averaged train metrics, "history": [{"step", metrics...}]
    per log interval of this invocation, "val": last validation result (or None),
    "best_miou", "resumed_from": "workdir"|"resume"|"init"|"scratch", "total_steps"}.

  Raises:
    NonFiniteLossError, TrainingInterrupted, checkpointing.WorkdirMismatchError /
    CheckpointDamagedError / CheckpointSaveError / OtherFoldError, registry.UnsupportedModelError,
    source.DatasetNotReadyError (with the build command), ValueError for bad config.
  """
  with _stop_requests() as stop_signals:
    return _train_and_evaluate(config, workdir, data, stop_signals, on_checkpoint)


def _train_and_evaluate(
  config,
  workdir,
  data: data_lib.Data | None,
  stop_signals: list[int],
  on_checkpoint: Callable[[int], None] | None = None,
) -> dict:
  config = protocol_lib.apply(config)  # the protocol's training lists and validation episodes
  workdir = fss_io.user_path(workdir)
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  runtime.log_devices(mesh)
  local_bs = parallel.local_batch_size(config.batch_size, mesh)
  eval_bs = data_lib.global_eval_batch_size(config, mesh)
  local_eval_bs = parallel.local_batch_size(eval_bs, mesh)
  spec, model = runtime.build_model(config, sizes=("train_size", "test_size"))
  if spec.loss_fn is None:
    raise ValueError(f"model {config.model!r} has no loss_fn; it cannot be trained")
  if data is None:
    data = data_lib.make_data(config, workdir, eval_batch_size=eval_bs)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_run_record(config, workdir, mode="train")

  # -- data and sizes --------------------------------------------------------------------
  loader = data.train()
  it = iter(loader)
  first = evaluate_lib.model_inputs(next(it))
  got = len(next(iter(first.values())))
  if got != local_bs:
    raise ValueError(
      f"the training loader yields {got} episodes per process, expected {local_bs} "
      f"(config.batch_size={config.batch_size} over {jax.process_count()} processes)"
    )
  steps_per_epoch = int(getattr(loader, "steps_per_epoch", 0) or 0)
  if config.epochs > 0:
    if not steps_per_epoch:
      raise ValueError("config.epochs needs a loader with steps_per_epoch; set config.total_steps")
    total_steps = config.epochs * steps_per_epoch
  else:
    total_steps = int(config.total_steps)
  eval_every = int(config.eval.every_steps)
  if eval_every == -1:
    eval_every = steps_per_epoch or 0
  ckpt_every = int(config.checkpoint.every_steps)
  log_every = max(1, int(config.log_every_steps))
  if data.eval is not None and eval_every:
    # Every data requirement before the first step: the validation episodes (test split,
    # shot / way, pool sizes) are generated and stored now, not after an epoch of training.
    try:
      data.eval(int(config.eval.val_seed), int(config.eval.val_episodes))
    except ValueError as e:
      raise ValueError(
        f"the validation episodes (test split, seed {config.eval.val_seed}, "
        f"K={config.shot}) cannot be made, nothing was trained: {e}"
      ) from None

  # -- optimiser and state ---------------------------------------------------------------
  repl = parallel.replicated(mesh)
  rng = jax.random.PRNGKey(int(config.seed))
  params_shape = jax.eval_shape(
    lambda k: state_lib.init_variables(model, state_lib.zeros_like_episode(first), k)["params"], rng
  )
  opt = optim_lib.build(
    config.optim,
    params_shape,
    total_steps=total_steps,
    frozen=spec.frozen_patterns(ckpt_lib.model_fields(config)),
  )
  logging.info("optimiser labels (tensors per label): %s", opt.summary)
  abstract = state_lib.abstract(model, opt.tx, first, sharding=repl)
  meta = ckpt_lib.checkpoint_meta(config)
  if jax.process_index() == 0:
    if workdir_lib.holds_lock(workdir):  # else a live run's save in progress could be removed
      workdir_lib.remove_unfinished_saves(
        [workdir / ckpt_lib.CHECKPOINT_DIR, workdir / ckpt_lib.BEST_DIR]
      )
    workdir_lib.check_room(workdir, workdir_lib.tree_nbytes(abstract))

  mngr = ckpt_lib.checkpoint_manager(
    workdir / ckpt_lib.CHECKPOINT_DIR,
    keep=int(config.checkpoint.keep),
    async_save=bool(config.checkpoint.async_save),
  )
  best_mngr = ckpt_lib.checkpoint_manager(workdir / ckpt_lib.BEST_DIR, keep=1, async_save=False)
  try:
    state, resumed_from, unused_first = _initial_state(
      config, mngr, abstract, meta, it, first, model, opt, rng, repl, workdir
    )
  except BaseException:
    mngr.close()
    best_mngr.close()
    raise
  start = int(jax.device_get(parallel.to_host(state.step)))
  best_miou = ckpt_lib.best_so_far(best_mngr)
  logging.info(
    "state from %s at step %d of %d (best val mIoU so far: %s)",
    resumed_from,
    start,
    total_steps,
    best_miou,
  )

  # -- steps -------------------------------------------------------------------------------
  dtype = runtime.compute_dtype_name(config)
  train_step = step_lib.make_train_step(
    model=model,
    loss_fn=spec.loss_fn,
    tx=opt.tx,
    mesh=mesh,
    trainable=opt.trainable,
    compute_dtype=dtype,
  )
  eval_data = data.eval
  eval_step = (
    step_lib.make_eval_step(
      model=model, mesh=mesh, score=protocol_lib.scoring(config), compute_dtype=dtype
    )
    if eval_data is not None
    else None
  )
  predict_step = (
    step_lib.make_predict_step(model=model, mesh=mesh, compute_dtype=dtype)
    if eval_step is not None and int(config.eval.get("num_images", 0)) > 0
    else None
  )
  from clu import periodic_actions  # imports TensorFlow

  writer = runtime.metric_writer(config, workdir)
  # Reports only at logging steps (no time trigger), each after that step's metrics reached
  # the host: the rate and ETA are of completed steps, not of the asynchronous dispatch.
  report = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=log_every, every_secs=None
  )
  pending = _Pending()
  last_good = mngr.latest_step()
  saver = ckpt_lib.Saver(mngr, workdir / ckpt_lib.CHECKPOINT_DIR, on_committed=on_checkpoint)
  val_result = None

  def save(step_done: int) -> None:
    nonlocal last_good
    pending.flush(last_good=last_good, workdir=workdir)
    if mngr.latest_step() == step_done:
      return
    saver.save(step_done, ckpt_lib.save_args(state, meta, step_done, it))
    last_good = step_done

  try:
    if stop_signals:  # a signal during the set-up: nothing was trained
      raise TrainingInterrupted(stop_signals[0], start, workdir, saved=False)
    t_first = time.time()
    for step in range(start, total_steps):
      batch = unused_first if unused_first is not None else evaluate_lib.model_inputs(next(it))
      unused_first = None
      state, metrics = train_step(state, parallel.to_global(batch, mesh))
      done = step + 1
      if step == start:
        jax.block_until_ready(metrics)
        logging.info(
          "first step done (step %d) in %.1f s, compilation included", done, time.time() - t_first
        )
      pending.add(done, metrics)
      logging_step = done % log_every == 0 or done == total_steps
      if not logging_step:
        report(done)  # clu's bookkeeping (called once per step); it reports at logging steps
      saver.check()
      if not stop_signals and jax.process_count() > 1 and mngr.reached_preemption(done):
        stop_signals.append(signal.SIGTERM)  # every host stops at this same step
      if stop_signals:
        logging.info("signal %s after step %d: saving and stopping", stop_signals[0], done)
        save(done)
        saver.wait()
        raise TrainingInterrupted(stop_signals[0], done, workdir)
      if logging_step:
        # The flush waits for step ``done`` (its metrics come to the host), so the progress
        # report times completed steps.
        means = pending.flush(last_good=last_good, workdir=workdir)
        report(done)
        if means:
          lrs = {f"lr/{k}": v for k, v in opt.learning_rates(done - 1).items()}
          writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()} | lrs)
      if (
        eval_step is not None
        and eval_data is not None
        and eval_every
        and (done % eval_every == 0 or done == total_steps)
      ):
        pending.flush(last_good=last_good, workdir=workdir)
        with report.timed("eval"):
          val_seed = int(config.eval.val_seed)
          val_loader = eval_data(val_seed, int(config.eval.val_episodes))
          # The parameters changed since the last validation: a fresh cache each time.
          cache = cached_lib.for_evaluation(
            config, spec, state.variables(), {val_seed: val_loader}, mesh=mesh, dtype=dtype
          )
          acc = evaluate_lib.evaluate_episodes(
            eval_step,
            state,
            val_loader,
            classes=data.classes,
            mesh=mesh,
            local_batch_size=local_eval_bs,
            class_names=data.class_names,
            progress=evaluate_lib.ProgressLog(f"step {done} validation"),
            to_global=None if cache is None else functools.partial(cache.attach, val_seed),
          )
        val_result = acc.result()
        writer.write_scalars(
          done, {"val/miou": val_result["miou"], "val/fb_iou": val_result["fb_iou"]}
        )
        runtime.write_episode_images(
          config,
          writer,
          done,
          state,
          predict_step,
          eval_data(int(config.eval.val_seed), int(config.eval.val_episodes)),
          mesh,
          local_eval_bs,
        )
        logging.info(
          "step %d validation: mIoU %.2f FB-IoU %.2f\n%s",
          done,
          val_result["miou"],
          val_result["fb_iou"],
          acc.table(),
        )
        if best_miou is None or val_result["miou"] > best_miou:
          best_miou = val_result["miou"]
          ckpt_lib.save_best(best_mngr, done, state, meta, val_result, resume_step=saver.committed)
      if (ckpt_every and done % ckpt_every == 0) or done == total_steps:
        save(done)
    saver.wait()
    pending.flush(last_good=last_good, workdir=workdir)
  except NonFiniteLossError as e:
    raise _drop_ruined_checkpoints(mngr, e, workdir) from None
  finally:
    mngr.wait_until_finished()
    mngr.close()
    best_mngr.close()
    writer.close()
  return {
    "step": int(jax.device_get(parallel.to_host(state.step))),
    "train": dict(pending.last),
    "history": list(pending.history),
    "val": val_result,
    "best_miou": best_miou,
    "resumed_from": resumed_from,
    "total_steps": total_steps,
  }


def _drop_ruined_checkpoints(
  mngr, error: NonFiniteLossError, workdir: epath.Path
) -> NonFiniteLossError:
  """Deletes the checkpoints of steps >= ``error.first_ruined`` (their weights produced the
  non-finite loss) and returns the error naming the checkpoint that is kept."""
  ruined = ckpt_lib.remove_steps_from(mngr, error.first_ruined)
  good = mngr.latest_step()
  dropped = (
    f" (checkpoint{'s' if len(ruined) > 1 else ''} {', '.join(map(str, ruined))} "
    f"removed: {'their' if len(ruined) > 1 else 'its'} weights give the non-finite loss)"
    if ruined
    else ""
  )
  if good is not None:
    kept = (
      f"the last good checkpoint (step {good}) in {workdir / ckpt_lib.CHECKPOINT_DIR} is kept"
      f"{dropped} and a rerun resumes from it"
    )
  else:
    kept = f"no good checkpoint exists{dropped}, so a rerun starts again from the beginning"
  return NonFiniteLossError(
    f"{error}; {kept}. Lower config.optim.lr, enable "
    f"config.optim.grad_clip_norm, or check the data.",
    step=error.step,
    first_ruined=error.first_ruined,
  )


__all__ = ["NonFiniteLossError", "TrainingInterrupted", "train_and_evaluate"]
