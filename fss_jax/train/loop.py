"""The training loop: owns every side effect (data, checkpoints, logs, evaluation).

``train_and_evaluate(config, workdir)``:

1. mesh (`fss_jax.parallel`), model + loss from the registry, data loaders
   (`fss_jax.data.pipeline`, or an injected `Data` in tests);
2. state, in the fixed resume order: the workdir's latest checkpoint >
   ``config.resume`` (another run's workdir) > ``config.init`` (converted weights,
   strict keys) > random init. A workdir holding a checkpoint of another model,
   other model fields, dataset, fold, shot or way, or other parameter shapes is
   refused with the reason;
3. the jitted train step; every ``log_every_steps`` the metrics are averaged
   and written (clu ``metric_writers``: TensorBoard + log) and
   ``periodic_actions.ReportProgress`` reports speed;
4. periodic validation on stored episodes (seed ``config.eval.val_seed``) ->
   ``<workdir>/best`` keeps the best val-mIoU params (data_protocol.md §10:
   the references select on the test classes);
5. orbax checkpoints in ``<workdir>/checkpoints`` (async; state + data-iterator
   state of every process + metadata). Losses are checked before every
   checkpoint: a NaN/Inf stops the run with `NonFiniteLossError`, and the last
   good checkpoint is kept untouched. A save that fails (disk full, I/O error)
   stops the run with `CheckpointSaveError`: raised by the save itself, or, for
   an async save, at the first step boundary after its failure. Before the first
   step the disk must have room for one checkpoint, and the unfinished saves of
   a killed run are removed (when the caller holds the workdir's lock, as
   `fss_jax.main` does; `fss_jax.train.workdir`).

``evaluate(config, workdir)`` scores the best (or latest) checkpoint — or the
converted weights of ``config.init`` — on ``config.eval.seeds`` and writes
``<workdir>/results_<dataset>_f<fold>_[<way>way]<shot>shot<protocol tag>.json`` (`results_path`;
no ``_f<fold>`` for the cross-domain sets).

A checkpoint's step ``s`` means: ``s`` optimiser steps done, the data iterator
positioned at batch ``s``, and step ``s`` draws ``fold_in(rng, s)`` — so a
resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from fss_jax import io as fss_io
from fss_jax import parallel
from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.eval import metrics as metrics_lib
from fss_jax.eval import protocol as protocol_lib
from fss_jax.models import registry
from fss_jax.train import optim as optim_lib
from fss_jax.train import precision
from fss_jax.train import state as state_lib
from fss_jax.train import step as step_lib
from fss_jax.train import workdir as workdir_lib

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
# 1: model, model_fields, dataset, fold, shot, way. 2: adds "input", "labels" and "output"
# (`describe`): what evaluating or predicting with the weights needs besides them.
META_FORMAT = 2
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
        f"{workdir / CHECKPOINT_DIR} and a rerun resumes from it"
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


class CheckpointDamagedError(ValueError):
  """Every checkpoint of the workdir is unreadable (truncated or corrupted files)."""


class CheckpointSaveError(Exception):
  """A checkpoint could not be written (disk full, I/O error); the message names the step, the
  folder, the reason and the checkpoint a rerun resumes from."""


class WorkdirMismatchError(ValueError):
  """The workdir (or config.resume) holds a checkpoint of another model or shape."""


class _QuietLibraries:
  """absl log filter: orbax's INFO records (several per checkpoint), its notes on read-only
  managers (used to read checkpoints for evaluation) and its tracebacks of a failed save, with
  asyncio's reports of orbax's failed write tasks (the loop reports that failure in one line),
  jax's INFO notes on the platforms it probes ("Unable to initialize backend 'tpu'") and
  TFDS's ("Load dataset info from ...") are dropped from the console; log.txt keeps every
  record."""

  def filter(self, record) -> bool:
    if record.name == "asyncio":  # "Task exception was never retrieved" for each write
      return "/orbax/" not in record.getMessage()
    if record.name.startswith("jax._src.xla_bridge") and record.levelno <= 20:
      return False  # "Unable to initialize backend 'tpu'": jax probing platforms
    if "/tensorflow_datasets/" in record.pathname and record.levelno <= 20:
      return False  # "Load dataset info from ...", each time a split is opened
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno <= 20 or record.exc_info:
      return False
    return record.levelno > 30 or "read only" not in record.getMessage().replace("_", " ")


def _without_closed_loop_noise(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """A ``sys.unraisablehook`` that drops "Event loop is closed": after a failed save, tensorstore
  calls back into the event loop orbax has closed, once per write still pending."""

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  hook.quiet_closed_loop = True  # type: ignore[attr-defined]  # marks it as installed
  return hook


# What TensorFlow's C++ start-up prints whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21 logs
# through absl before absl's logging is initialised): notes about CPU features, not problems.
_TF_STARTUP_NOTES = (
  "absl::InitializeLog",
  "oneDNN custom operations",
  "cpu_feature_guard",
  "To enable the following instructions",
  "rebuild TensorFlow with",
)


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow (clu's TensorBoard writer and TFDS load it) with its start-up notes
  dropped; any other line it prints still reaches stderr."""
  if "tensorflow" in sys.modules:
    return
  with fss_io.captured_stderr() as lines:
    pass
  rest = [line for line in lines if not any(n in line for n in _TF_STARTUP_NOTES)]
  if rest:
    print("\n".join(rest), file=sys.stderr)


def quiet_library_logs() -> None:
  """Keeps the run's own INFO lines readable (orbax logs every file it renames), a failed
  save to the loop's one line, and the console free of TensorFlow's start-up notes."""
  _import_tensorflow_quietly()
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  if not getattr(sys.unraisablehook, "quiet_closed_loop", False):
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  """What the loop reads.

  Attributes:
    train: () -> training loader: ``iter(loader)`` yields this process's host
      batches (Episode dicts of numpy arrays) and has ``get_state()`` /
      ``set_state()``; optional ``steps_per_epoch``.
    eval: (seed, num_episodes) -> this process's batches of the stored test
      episodes of that seed (each with ``valid``; all processes yield the same
      number of batches).
    classes: the fold's novel classes (global ids) scored by the mIoU.
    class_names: optional {id: name}.
  """

  train: Callable[[], Any]
  eval: Callable[[int, int], Iterable[Mapping[str, Any]]] | None
  classes: tuple[int, ...]
  class_names: Mapping[int, str] | None = None


def episode_config(config):
  """``config.data`` + run fields -> `fss_jax.data.pipeline.EpisodeConfig` (``score_size``: the
  test size when the protocol scores at the input, so any image size fits)."""
  from fss_jax.data import pipeline

  d = config.data
  scoring = protocol_lib.scoring(config)
  return pipeline.EpisodeConfig(
    dataset=config.dataset,
    data_dir=os.fspath(fss_io.user_path(d.data_dir)),
    fold=config.fold,
    shot=config.shot,
    way=config.way,
    seed=config.seed,
    train_size=d.train_size,
    train_resize=d.train_resize,
    scale=tuple(d.scale),
    rotate=tuple(d.rotate),
    blur=float(d.get("blur", pipeline.EpisodeConfig.blur)),
    test_size=d.test_size,
    test_resize=d.test_resize,
    label_bucket=d.label_bucket or None,
    score_size=int(scoring.size) if scoring.mode == "input" else None,
    protocol=d.protocol,
    coco_split=d.coco_split,
    base_label=d.base_label,
    worker_count=d.worker_count,
    read_threads=d.read_threads,
    prefetch_batches=d.prefetch_batches,
  )


def episodes_path(config, workdir: epath.Path, seed: int, num: int) -> epath.Path:
  """Where the stored test episodes of (dataset, fold, way, shot, seed, num) live (no fold for
  a fold-less cross-domain test set)."""
  from fss_jax.data import pipeline

  root = (
    fss_io.user_path(config.eval.episodes_dir) if config.eval.episodes_dir else workdir / "episodes"
  )
  way = f"{config.way}way" if config.way > 1 else ""
  fold = "" if pipeline.is_cross_domain(config.dataset) else f"_f{config.fold}"
  name = (
    f"{config.dataset}{fold}_{way}{config.shot}shot_s{seed}_n{num}"
    f"{protocol_lib.episodes_tag(config)}.jsonl"
  )
  return root / name


def ensure_episodes(config, workdir: epath.Path, seed: int, num: int) -> epath.Path:
  """The stored test episode list, generated (deterministically) when absent."""
  from fss_jax.data import episodes as episodes_lib
  from fss_jax.data import source as source_lib

  path = episodes_path(config, workdir, seed, num)
  if not path.is_file():
    src = source_lib.open_split(
      fss_io.user_path(config.data.data_dir),
      config.dataset,
      episodes_lib.test_split(config.dataset),
    )
    records = episodes_lib.generate(
      src.index,
      config.dataset,
      config.fold,
      "test",
      shot=config.shot,
      num_episodes=num,
      seed=seed,
      way=config.way,
      protocol=config.data.protocol,
      coco_split=config.data.coco_split,
      **protocol_lib.episode_kwargs(config),
    )
    episodes_lib.write_episodes(path, records)
    logging.info("wrote %d test episodes (seed %d) to %s", len(records), seed, path)
  return path


def make_data(config, workdir: epath.Path, *, eval_batch_size: int) -> Data:
  """The real data: grain loaders over the built TFDS dataset."""
  from fss_jax.data import pipeline

  ecfg = episode_config(config)
  p, n = jax.process_index(), jax.process_count()

  task = config.data.get("task", "episodes")
  if task not in ("episodes", "base"):
    raise ValueError(f"config.data.task must be 'episodes' or 'base', got {task!r}")
  make = pipeline.make_base_train_loader if task == "base" else pipeline.make_train_loader

  def train():
    # "base": base-learner batches {"image", "label"} over the whole train pool (BAM BaseData).
    return make(ecfg, global_batch_size=config.batch_size, shard_index=p, shard_count=n)

  def evaluate(seed: int, num: int):
    path = ensure_episodes(config, workdir, seed, num)
    return pipeline.make_eval_loader(
      ecfg, path, global_batch_size=eval_batch_size, shard_index=p, shard_count=n
    )

  return Data(
    train=train,
    eval=evaluate,
    classes=ecfg.test_classes(),
    class_names=metrics_lib.class_names(ecfg.dataset),
  )


# ---------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------


def model_fields(config) -> dict:
  f = config.model_fields
  return f.to_dict() if hasattr(f, "to_dict") else dict(f)


def check_input_sizes(config, spec, keys: tuple[str, ...]) -> None:
  """Refuses ``config.data.<key>`` input sizes below the model's minimum (`ModelSpec.min_size`).

  Raises:
    ValueError: naming the model, the size, the minimum and the config key.
  """
  minimum = spec.min_size(model_fields(config))
  for key in keys:
    size = int(config.data[key])
    if minimum is not None and size < minimum:
      raise ValueError(
        f"config.data.{key}={size} is below the smallest input model "
        f"{config.model!r} takes ({minimum} px); set --config.data.{key}={minimum} "
        f"or larger"
      )


def build_model(config, sizes: tuple[str, ...] = ()):
  """(ModelSpec, module) of ``config.model`` with ``config.model_fields``; the ``config.data``
  input sizes named in ``sizes`` are checked against the model's minimum first."""
  spec = registry.get(config.model)
  check_input_sizes(config, spec, sizes)
  fields = model_fields(config)
  try:
    model = spec.make_model(**fields)
  except TypeError as e:
    raise ValueError(f"config.model_fields do not fit model {config.model!r}: {e}") from None
  return spec, model


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def describe(config) -> dict:
  """What using a model's weights needs besides them, from its config:

  * ``input``: the test transform -- ``size`` (side S), ``resize`` ("aspect": §9.1 aspect +
    pad, "squash": §9.2), ``mean`` / ``std`` (RGB, 0..255) of the normalisation;
  * ``labels``: ``background`` and ``ignore`` values of a label map, and ``classes``
    {id: name} of the dataset;
  * ``output``: what the model's ``logits`` hold (`ModelSpec.output`: "logits" or
    "probabilities").
  """
  from fss_jax.data import transforms

  return _jsonable(
    {
      "input": {
        "size": int(config.data.test_size),
        "resize": str(config.data.test_resize),
        "mean": list(transforms.MEAN),
        "std": list(transforms.STD),
      },
      "labels": {
        "background": 0,
        "ignore": int(transforms.IGNORE),
        "classes": {str(k): v for k, v in metrics_lib.class_names(config.dataset).items()},
      },
      "output": registry.get(config.model).output,
    }
  )


def checkpoint_meta(config) -> dict:
  """What a checkpoint records: what it must agree on to be resumed (model, fields, episode
  setting; `_meta_differences`) and what evaluating or predicting with it needs (`describe`)."""
  return _jsonable(
    {
      "format": META_FORMAT,
      "model": config.model,
      "model_fields": model_fields(config),
      "dataset": config.dataset,
      "fold": config.fold,
      "shot": config.shot,
      "way": config.way,
      **describe(config),
    }
  )


# Model fields that change how a step is computed but not the variables or the function
# (rematerialisation): a run may resume with them switched.
COMPUTE_ONLY_FIELDS = frozenset({"remat"})


def _meta_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  diffs = []
  for key in ("model", "dataset", "fold", "shot", "way"):
    if saved.get(key) != current.get(key):
      diffs.append(f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}")
  sf, cf = saved.get("model_fields", {}) or {}, current.get("model_fields", {}) or {}
  for k in sorted((set(sf) | set(cf)) - COMPUTE_ONLY_FIELDS):
    if sf.get(k, "<unset>") != cf.get(k, "<unset>"):
      diffs.append(
        f"model_fields.{k}: checkpoint {sf.get(k, '<unset>')!r}, this run {cf.get(k, '<unset>')!r}"
      )
  return diffs


def _shape_differences(saved_tree: Any, target: Any) -> list[str]:
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  def flat(tree):
    # Saved trees are plain dicts/lists; the target has dataclasses and namedtuples.
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out["/".join(name(k) for k in path)] = tuple(getattr(leaf, "shape", ()) or ())
    return out

  a, b = flat(saved_tree), flat(target)
  diffs = [f"{k}: only in the checkpoint {a[k]}" for k in sorted(set(a) - set(b))]
  diffs += [f"{k}: only in this model {b[k]}" for k in sorted(set(b) - set(a))]
  diffs += [
    f"{k}: checkpoint {a[k]}, this model {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]
  ]
  return diffs


class _FrozenState:
  """Hands grain's orbax handler an iterator state captured at save time."""

  def __init__(self, state: Any):
    self._data = json.dumps(state).encode() if not isinstance(state, bytes) else state

  def get_state(self) -> bytes:
    return self._data


class _StateCatcher:
  """Receives the iterator state from grain's orbax handler on restore."""

  def __init__(self):
    self.state = None

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


def _set_iter_state(it: Any, raw: bytes) -> None:
  try:
    it.set_state(json.loads(raw.decode()))
  except (TypeError, ValueError, AttributeError):
    it.set_state(raw)


def _get_iter_state(it: Any) -> Any:
  if not hasattr(it, "get_state"):
    raise TypeError(
      f"the training iterator {type(it).__name__} has no get_state(); it cannot be checkpointed"
    )
  return it.get_state()


def checkpoint_manager(
  directory: epath.Path, *, keep: int, async_save: bool, read_only: bool = False
):
  import grain
  import orbax.checkpoint as ocp

  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
  }
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=not read_only,
    enable_async_checkpointing=async_save,
    read_only=read_only,
  )
  return ocp.CheckpointManager(os.fspath(directory), item_handlers=handlers, options=options)


def _checkpoint_root(path: epath.Path) -> epath.Path:
  """A run's workdir or its checkpoints folder -> the checkpoints folder."""
  return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path


def restore_checkpoint(
  mngr,
  step: int,
  abstract_state: Any,
  meta: Mapping[str, Any],
  *,
  where: str,
  data_iter: Any = None,
  with_data: bool = True,
):
  """Restores (state, data state) of ``step`` after checking meta and shapes.

  Raises:
    WorkdirMismatchError: other model / fields / setting / shapes.
  """
  import grain
  import orbax.checkpoint as ocp

  saved_meta = (
    mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
  )
  diffs = _meta_differences(saved_meta, meta)
  if not diffs:
    md = mngr.item_metadata(step)
    tree = md["state"].tree if md is not None and hasattr(md["state"], "tree") else None
    if tree is not None:
      diffs = _shape_differences(tree, abstract_state)
  if diffs:
    raise WorkdirMismatchError(
      f"refusing to resume from {where} (step {step}): it holds a checkpoint of model "
      f"{saved_meta.get('model')!r} that does not match this run:\n  "
      + "\n  ".join(diffs[:30])
      + "\nUse another --workdir for this configuration (or delete that checkpoint folder)."
    )
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  catcher = _StateCatcher()
  if with_data and data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(catcher)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:
    if "process_" in str(e):
      raise WorkdirMismatchError(
        f"{where} step {step} has no data-iterator state for process {jax.process_index()} of "
        f"{jax.process_count()} (saved with another process count?): {e}"
      ) from None
    raise
  if catcher.state is not None:
    _set_iter_state(data_iter, catcher.state)
  return restored["state"]


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


def _eval_batch_size(config, mesh) -> int:
  bs = int(config.eval.batch_size)
  d = parallel.data_size(mesh)
  if bs <= 0:
    bs = d
  return bs


def _score_mode(config) -> metrics_lib.Scoring:
  return protocol_lib.scoring(config)


def _compute_dtype(config) -> str:
  """``config.compute_dtype`` (float32 for configs written before the field existed), checked
  here so that a wrong name stops the run before the model and data are built."""
  name = str(config.get("compute_dtype", "float32"))
  precision.compute_dtype(name)
  return name


def _host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return evaluate_lib.model_inputs(batch)


def _log_devices(mesh) -> None:
  """The run's first line about hardware: processes, devices and the mesh over them."""
  d = jax.devices()
  logging.info(
    "%d process(es), %d %s device(s) (%s; %d on this process); mesh %s (%d device(s))",
    jax.process_count(),
    len(d),
    d[0].platform,
    d[0].device_kind,
    jax.local_device_count(),
    dict(mesh.shape),
    mesh.size,
  )


def _writer(config, workdir: epath.Path):
  just_logging = jax.process_index() > 0 or not config.tensorboard
  return workdir_lib.metric_writer(workdir, just_logging=just_logging)


def _write_episode_images(
  config, writer, step: int, state, predict_step, batches, mesh, local_batch_size: int
) -> None:
  """Query/support/prediction panels of the first stored test episodes -> TensorBoard.

  Always the first batch of the same stored list, so panels line up across steps.
  Collective (every process calls it); only process 0's writer records images.
  """
  from fss_jax.eval import visualize

  num = int(config.eval.get("num_images", 0))
  if num <= 0 or predict_step is None:
    return
  batch = evaluate_lib.pad_batch(evaluate_lib.model_inputs(next(iter(batches))), local_batch_size)
  inputs = {k: v for k, v in batch.items() if k != "valid"}
  pred = parallel.to_host(predict_step(state, parallel.to_global(inputs, mesh)))
  panels = visualize.panels_from_batch(
    batch, np.asarray(pred)[:local_batch_size], max_panels=num, valid=batch.get("valid")
  )
  visualize.write_image_summaries(writer, step, panels, prefix="val/episode")


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
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for step in steps:  # the latest readable checkpoint; a damaged one falls back to the previous
    try:
      state = restore_checkpoint(
        mngr, step, abstract, meta, where=f"workdir {workdir}", data_iter=it
      )
    except WorkdirMismatchError:
      raise
    except Exception as e:  # orbax / tensorstore read errors
      damaged.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      logging.warning(
        "checkpoint %d in %s cannot be read (%s); trying the previous one",
        step,
        workdir / CHECKPOINT_DIR,
        damaged[-1],
      )
      continue
    if damaged:
      logging.warning(
        "resumed from step %d: the later checkpoint(s) were damaged: %s", step, "; ".join(damaged)
      )
    return state, "workdir", None
  if damaged:
    raise CheckpointDamagedError(
      f"no checkpoint in {workdir / CHECKPOINT_DIR} can be read ({'; '.join(damaged)}). Move "
      f"that folder away to start again, or use another --workdir."
    )
  if config.resume:
    src = _checkpoint_root(fss_io.user_path(config.resume))
    other = checkpoint_manager(src, keep=1, async_save=False, read_only=True)
    try:
      step = other.latest_step()
      if step is None:
        raise FileNotFoundError(
          f"config.resume={config.resume!r} holds no checkpoint (looked in {src})"
        )
      state = restore_checkpoint(
        other, step, abstract, meta, where=f"config.resume {src}", data_iter=it
      )
    finally:
      other.close()
    return state, "resume", None
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
  check_init_folds(config, inits, mode="train")
  state = state_lib.create(model, opt.tx, first, rng=rng, sharding=repl)
  state = _set_derived_params(config, state)  # data-derived parameters (JC²A's FP_base)
  if inits:
    state = load_init(config, state, inits, opt.tx, sharding=repl)
    return state, "init", first
  return state, "scratch", first


def load_init(config, state, inits: list[tuple[str, str]], tx, *, sharding):
  """`state_lib.load_init` of config.init's weights; a mismatch names this run's model."""
  return state_lib.load_init(
    state,
    inits,
    tx,
    sharding=sharding,
    model=config.model,
    fields=model_fields(config),
    entries=not config.init_prefix and any(p for p, _ in inits),
  )


class OtherFoldError(ValueError):
  """config.init's weights were trained on another fold of this run's dataset."""


def check_init_folds(config, inits: list[tuple[str, str]], *, mode: str) -> None:
  """Refuses config.init weights trained on another fold of the run's dataset.

  Their training saw this fold's test classes (a base learner trained on fold 2 knows
  the classes fold 0 holds out), so the scores of this run would not be a result on
  this fold. ``config.eval.allow_other_fold`` turns the error into a warning (a study
  of that leak). Weights of another dataset get a warning (cross-dataset evaluation);
  weights without a recorded fold (ImageNet backbones, older conversions) pass.

  Raises:
    OtherFoldError: trained on another fold of this dataset, and not allowed.
  """
  for _, path in inits:
    info = state_lib.weights_info(path)
    if info.get("fold") is None or not info.get("dataset"):
      continue
    trained = f"{info['dataset']} fold {info['fold']}"
    if info["dataset"] != config.dataset:
      logging.warning(
        "checkpoint %s was trained on %s; this run %s %s fold %d (another dataset)",
        path,
        trained,
        "evaluates" if mode == "eval" else "trains on",
        config.dataset,
        config.fold,
      )
      continue
    if int(info["fold"]) == int(config.fold):
      continue
    doing = "evaluating" if mode == "eval" else "training"
    message = (
      f"checkpoint {path} was trained on {trained}; {doing} fold {config.fold} with it "
      f"scores classes it was trained on"
    )
    if config.eval.get("allow_other_fold", False):
      logging.warning("%s (config.eval.allow_other_fold=true)", message)
      continue
    raise OtherFoldError(
      f"{message}. Use fold {config.fold}'s own checkpoint, run this config with "
      f"fold={info['fold']}, or pass --config.eval.allow_other_fold=true to run it anyway "
      f"(the scores are then not a fold-{config.fold} result)"
    )


def train_and_evaluate(config, workdir: str | os.PathLike, *, data: Data | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming when possible); returns a summary.

  Returns:
    {"step", "train": last averaged train metrics, "history": [{"step", metrics...}]
    per log interval of this invocation, "val": last validation result (or None),
    "best_miou", "resumed_from": "workdir"|"resume"|"init"|"scratch", "total_steps"}.

  Raises:
    NonFiniteLossError, WorkdirMismatchError, registry.UnsupportedModelError,
    source.DatasetNotReadyError (with the build command), ValueError for bad config.
  """
  with _stop_requests() as stop_signals:
    return _train_and_evaluate(config, workdir, data, stop_signals)


def _train_and_evaluate(config, workdir, data: Data | None, stop_signals: list[int]) -> dict:
  import grain
  import orbax.checkpoint as ocp

  config = protocol_lib.apply(config)  # the protocol's training lists and validation episodes
  workdir = fss_io.user_path(workdir)
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  _log_devices(mesh)
  local_bs = parallel.local_batch_size(config.batch_size, mesh)
  eval_bs = _eval_batch_size(config, mesh)
  local_eval_bs = parallel.local_batch_size(eval_bs, mesh)
  spec, model = build_model(config, sizes=("train_size", "test_size"))
  if spec.loss_fn is None:
    raise ValueError(f"model {config.model!r} has no loss_fn; it cannot be trained")
  if data is None:
    data = make_data(config, workdir, eval_batch_size=eval_bs)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_run_record(config, workdir, mode="train")

  # -- data and sizes --------------------------------------------------------------------
  loader = data.train()
  it = iter(loader)
  first = _host_batch(next(it))
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
    frozen=spec.frozen_patterns(model_fields(config)),
  )
  logging.info("optimiser labels (tensors per label): %s", opt.summary)
  abstract = state_lib.abstract(model, opt.tx, first, sharding=repl)
  meta = checkpoint_meta(config)
  if jax.process_index() == 0:
    if workdir_lib.holds_lock(workdir):  # else a live run's save in progress could be removed
      workdir_lib.remove_unfinished_saves([workdir / CHECKPOINT_DIR, workdir / BEST_DIR])
    workdir_lib.check_room(workdir, workdir_lib.tree_nbytes(abstract))

  mngr = checkpoint_manager(
    workdir / CHECKPOINT_DIR,
    keep=int(config.checkpoint.keep),
    async_save=bool(config.checkpoint.async_save),
  )
  best_mngr = checkpoint_manager(workdir / BEST_DIR, keep=1, async_save=False)
  try:
    state, resumed_from, unused_first = _initial_state(
      config, mngr, abstract, meta, it, first, model, opt, rng, repl, workdir
    )
  except BaseException:
    mngr.close()
    best_mngr.close()
    raise
  start = int(jax.device_get(parallel.to_host(state.step)))
  best_miou = _best_so_far(best_mngr)
  logging.info(
    "state from %s at step %d of %d (best val mIoU so far: %s)",
    resumed_from,
    start,
    total_steps,
    best_miou,
  )

  # -- steps -------------------------------------------------------------------------------
  dtype = _compute_dtype(config)
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
    step_lib.make_eval_step(model=model, mesh=mesh, score=_score_mode(config), compute_dtype=dtype)
    if eval_data is not None
    else None
  )
  predict_step = (
    step_lib.make_predict_step(model=model, mesh=mesh, compute_dtype=dtype)
    if eval_step is not None and int(config.eval.get("num_images", 0)) > 0
    else None
  )
  from clu import periodic_actions  # imports TensorFlow

  writer = _writer(config, workdir)
  # Reports only at logging steps (no time trigger), each after that step's metrics reached
  # the host: the rate and ETA are of completed steps, not of the asynchronous dispatch.
  report = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=log_every, every_secs=None
  )
  pending = _Pending()
  last_good = mngr.latest_step()
  saver = _Saver(mngr, workdir / CHECKPOINT_DIR)
  val_result = None

  def save(step_done: int) -> None:
    nonlocal last_good
    pending.flush(last_good=last_good, workdir=workdir)
    if mngr.latest_step() == step_done:
      return
    data_state = _FrozenState(_get_iter_state(it))
    saver.save(
      step_done,
      ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({**meta, "step": step_done}),
        data=grain.checkpoint.CheckpointSave(data_state),
      ),
    )
    last_good = step_done

  try:
    if stop_signals:  # a signal during the set-up: nothing was trained
      raise TrainingInterrupted(stop_signals[0], start, workdir, saved=False)
    t_first = time.time()
    for step in range(start, total_steps):
      batch = unused_first if unused_first is not None else _host_batch(next(it))
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
          acc = evaluate_lib.evaluate_episodes(
            eval_step,
            state,
            eval_data(int(config.eval.val_seed), int(config.eval.val_episodes)),
            classes=data.classes,
            mesh=mesh,
            local_batch_size=local_eval_bs,
            class_names=data.class_names,
            progress=evaluate_lib.ProgressLog(f"step {done} validation"),
          )
        val_result = acc.result()
        writer.write_scalars(
          done, {"val/miou": val_result["miou"], "val/fb_iou": val_result["fb_iou"]}
        )
        _write_episode_images(
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
          _save_best(best_mngr, done, state, meta, val_result, resume_step=saver.committed)
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
  mngr.wait_until_finished()
  ruined = [s for s in mngr.all_steps() if s >= error.first_ruined]
  if jax.process_index() == 0:
    for s in ruined:
      mngr.delete(s)
  good = mngr.latest_step()
  dropped = (
    f" (checkpoint{'s' if len(ruined) > 1 else ''} {', '.join(map(str, ruined))} "
    f"removed: {'their' if len(ruined) > 1 else 'its'} weights give the non-finite loss)"
    if ruined
    else ""
  )
  if good is not None:
    kept = (
      f"the last good checkpoint (step {good}) in {workdir / CHECKPOINT_DIR} is kept"
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


def _best_so_far(best_mngr) -> float | None:
  import orbax.checkpoint as ocp

  step = best_mngr.latest_step()
  if step is None:
    return None
  meta = best_mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
  return meta.get("val", {}).get("miou")


def _save_best(
  best_mngr,
  step: int,
  state,
  meta: Mapping[str, Any],
  val: Mapping[str, Any],
  *,
  resume_step: int | None = None,
) -> None:
  import orbax.checkpoint as ocp

  try:
    best_mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({**meta, "step": step, "val": _jsonable(dict(val))}),
      ),
      force=True,
    )
    best_mngr.wait_until_finished()
  except Exception as e:  # OSError, orbax, tensorstore
    raise _save_error(step, fss_io.user_path(best_mngr.directory), e, resume_step) from e


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # in tensorstore's messages


def _reason(error: BaseException) -> str:
  """One line saying why an OS / orbax / tensorstore call failed."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror + (f": {error.filename}" if error.filename else "")
  text = str(error).strip()
  code = _OS_ERROR_CODE.search(text)
  if code:  # 'RESOURCE_EXHAUSTED: Error writing "<array>" in OCDBT ...: No space left on device'
    return os.strerror(int(code.group(1)))
  lines = text.splitlines()
  return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _save_error(
  step: int, directory: epath.Path, error: BaseException, resume_step: int | None
) -> CheckpointSaveError:
  then = (
    f"a rerun resumes from checkpoint {resume_step}"
    if resume_step is not None
    else "no checkpoint is complete yet, a rerun starts again"
  )
  return CheckpointSaveError(
    f"saving checkpoint of step {step} to {directory} failed: "
    f"{_reason(error)}; free disk space (or fix {directory}) and rerun: "
    f"{then}"
  )


class _Saver:
  """Writes the checkpoints of ``mngr``. A failed save becomes one `CheckpointSaveError`: raised
  by the save itself, or, for an async save, found by `check` at a step boundary.

  Attributes:
    committed: the step of the newest checkpoint known to be complete (None: none yet).
  """

  def __init__(self, mngr, directory: epath.Path):
    self._mngr, self._directory = mngr, directory
    self._in_flight: int | None = None  # an async save not yet known to be complete
    self.committed: int | None = mngr.latest_step()

  def save(self, step: int, args) -> None:
    self.wait()  # a failure of the previous save is reported as that step's
    try:
      saved = self._mngr.save(step, args=args)
    except Exception as e:  # OSError, orbax, tensorstore
      raise _save_error(step, self._directory, e, self.committed) from e
    if not saved:
      return
    self._in_flight = step
    if not self._mngr.is_saving_in_progress():
      self.wait()

  def check(self) -> None:
    """Raises when the async save in flight has failed; never waits for one still writing."""
    if self._in_flight is not None and not self._mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises `CheckpointSaveError` when it failed."""
    if self._in_flight is None:
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # the background save's error
      raise _save_error(step, self._directory, e, self.committed) from e
    self.committed = step


# ---------------------------------------------------------------------------
# Evaluation mode
# ---------------------------------------------------------------------------


def results_path(config, workdir: epath.Path) -> epath.Path:
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
  ``config.eval.checkpoint``), else config.resume, else config.init; else an error."""
  repl = parallel.replicated(mesh)
  abstract = state_lib.abstract(model, tx, example, sharding=repl)
  meta = checkpoint_meta(config)
  order = (
    [BEST_DIR, CHECKPOINT_DIR] if config.eval.checkpoint == "best" else [CHECKPOINT_DIR, BEST_DIR]
  )
  candidates = [(workdir / d, f"workdir {workdir / d}") for d in order]
  if config.resume:
    candidates.append(
      (_checkpoint_root(fss_io.user_path(config.resume)), f"config.resume {config.resume}")
    )
  for path, where in candidates:
    if not path.is_dir():
      continue
    mngr = checkpoint_manager(path, keep=1, async_save=False, read_only=True)
    step = mngr.latest_step()
    if step is not None:
      state = restore_checkpoint(mngr, step, abstract, meta, where=where, with_data=False)
      mngr.close()
      return state, f"{where} step {step}"
    mngr.close()
  if config.init:
    inits = state_lib.parse_inits(config.init, config.init_prefix)
    check_init_folds(config, inits, mode="eval")
    state = state_lib.create(
      model, tx, example, rng=jax.random.PRNGKey(int(config.seed)), sharding=repl
    )
    return load_init(config, state, inits, tx, sharding=repl), f"config.init {config.init}"
  raise FileNotFoundError(
    f"nothing to evaluate: {workdir} has no checkpoint (train first with --mode train) and "
    f"config.init / config.resume are not set (--config.init=<converted weights dir>)"
  )


def evaluate(config, workdir: str | os.PathLike, *, data: Data | None = None) -> dict:
  """``--mode eval``: every seed of ``config.eval.seeds`` -> results JSON; returns the summary.

  The test run's config is `protocol_lib.eval_config(config)` (resolved protocol, eval.shot /
  way / dataset / fold); the checkpoint is checked against ``config``, the training run."""
  train_config, config = config, protocol_lib.eval_config(config)
  workdir = fss_io.user_path(workdir)
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  _log_devices(mesh)
  eval_bs = _eval_batch_size(config, mesh)
  local_eval_bs = parallel.local_batch_size(eval_bs, mesh)
  spec, model = build_model(config, sizes=("test_size",))
  if data is None:
    data = make_data(config, workdir, eval_batch_size=eval_bs)
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
    frozen=spec.frozen_patterns(model_fields(config)),
  )
  state, source = load_for_eval(train_config, workdir, model, opt.tx, example, mesh)
  logging.info("evaluating %s on %d seed(s) x %d episodes", source, len(seeds), num)
  dtype = _compute_dtype(config)
  eval_step = step_lib.make_eval_step(
    model=model, mesh=mesh, score=_score_mode(config), compute_dtype=dtype
  )
  t0 = time.time()
  summary, tables = evaluate_lib.evaluate_seeds(
    eval_step,
    state,
    lambda s: first_loader if s == seeds[0] else eval_data(s, num),
    seeds=seeds,
    classes=data.classes,
    mesh=mesh,
    local_batch_size=local_eval_bs,
    class_names=data.class_names,
  )
  summary.update(
    {
      "model": config.model,
      "dataset": config.dataset,
      "fold": config.fold,
      "shot": config.shot,
      "way": config.way,
      "episodes_per_seed": num,
      "checkpoint": source,
      "score": _score_mode(config).mode,
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
  writer = _writer(
    config, workdir
  )  # TensorBoard: eval/miou, eval/fb_iou (+ _std), eval/iou/<id>_<name>
  try:
    writer.write_scalars(step, evaluate_lib.summary_scalars(summary))
    if int(config.eval.get("num_images", 0)) > 0:
      _write_episode_images(
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


__all__ = [
  "train_and_evaluate",
  "evaluate",
  "Data",
  "make_data",
  "episode_config",
  "ensure_episodes",
  "episodes_path",
  "NonFiniteLossError",
  "TrainingInterrupted",
  "WorkdirMismatchError",
  "CheckpointDamagedError",
  "CheckpointSaveError",
  "check_input_sizes",
  "checkpoint_meta",
  "check_init_folds",
  "OtherFoldError",
  "load_init",
  "results_path",
]
