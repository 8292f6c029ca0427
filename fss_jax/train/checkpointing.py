"""Checkpoints of a run: orbax managers, metadata, restore checks, best-model and save failures.

A training workdir holds two orbax ``CheckpointManager`` folders (`checkpoint_manager`):

* ``<workdir>/checkpoints`` (`CHECKPOINT_DIR`): items ``state`` (the `TrainState`,
  ``StandardSave``), ``meta`` (JSON: `checkpoint_meta` + ``step``) and ``data`` (the grain
  iterator state of every process), written by `save_args`; keep ``config.checkpoint.keep``,
  async saves;
* ``<workdir>/best`` (`BEST_DIR`): ``state`` and ``meta`` (+ ``val``, the validation result)
  of the best validation mIoU (`save_best` / `best_so_far`), keep 1.

Restoring (`restore_checkpoint`, `restore_latest_readable`, `restore_latest`) first compares
the saved metadata with the run's (`_meta_differences`: model, dataset, fold, shot, way, model
fields but `COMPUTE_ONLY_FIELDS`) and the parameter shapes (`_shape_differences`); a difference
is a `WorkdirMismatchError` naming each one, never a silent fallback. ``config.init`` weights
(converted checkpoints) go through `check_init_folds` and `load_init`.

A save that fails (disk full, I/O error) becomes one `CheckpointSaveError` naming the step, the
folder, the reason and the checkpoint a rerun resumes from (`Saver`, `save_best`).

The order in which a run picks its state (workdir > ``config.resume`` > ``config.init`` >
scratch) is the loop's (`fss_jax.train.loop`); ``--mode eval``'s is `fss_jax.eval.run`'s.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging
from etils import epath

from fss_jax import io as fss_io
from fss_jax.eval import metrics as metrics_lib
from fss_jax.models import registry
from fss_jax.train import state as state_lib

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
# 1: model, model_fields, dataset, fold, shot, way. 2: adds "input", "labels" and "output"
# (`describe`): what evaluating or predicting with the weights needs besides them.
META_FORMAT = 2
# Model fields that change how a step is computed but not the variables or the function
# (rematerialisation): a run may resume with them switched.
COMPUTE_ONLY_FIELDS = frozenset({"remat"})


class CheckpointDamagedError(ValueError):
  """Every checkpoint of the workdir is unreadable (truncated or corrupted files)."""


class CheckpointSaveError(Exception):
  """A checkpoint could not be written (disk full, I/O error); the message names the step, the
  folder, the reason and the checkpoint a rerun resumes from."""


class WorkdirMismatchError(ValueError):
  """The workdir (or config.resume) holds a checkpoint of another model or shape."""


class OtherFoldError(ValueError):
  """config.init's weights were trained on another fold of this run's dataset."""


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def model_fields(config) -> dict:
  """``config.model_fields`` as a plain dict."""
  f = config.model_fields
  return f.to_dict() if hasattr(f, "to_dict") else dict(f)


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
  # jax's path flattening, not flax.traverse_util.flatten_dict: the target is a TrainState
  # (a dataclass holding optax namedtuples), which flatten_dict (mappings only) cannot walk.
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


# ---------------------------------------------------------------------------
# Managers, saving and restoring
# ---------------------------------------------------------------------------


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
  """An orbax ``CheckpointManager`` over ``directory`` with the items ``state``, ``meta`` and
  ``data`` (a best-model folder has no ``data``).

  Its multi-host barriers are named after the folder: orbax reuses the same barrier keys in
  every manager, so the best-model manager saving while the latest one's async save
  finalises would otherwise enter a barrier the other still holds ("already ongoing")."""
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
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix=f"fss_jax_{epath.Path(directory).name}"
    ),
  )
  return ocp.CheckpointManager(os.fspath(directory), item_handlers=handlers, options=options)


def checkpoint_root(path: epath.Path) -> epath.Path:
  """A run's workdir or its checkpoints folder -> the checkpoints folder."""
  return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path


def save_args(state, meta: Mapping[str, Any], step: int, data_iter: Any):
  """The items of a training checkpoint of ``step``: the state, the metadata with its step and
  the iterator state of ``data_iter``, read now (an async save writes it later)."""
  import grain
  import orbax.checkpoint as ocp

  data_state = _FrozenState(_get_iter_state(data_iter))
  return ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    meta=ocp.args.JsonSave({**meta, "step": step}),
    data=grain.checkpoint.CheckpointSave(data_state),
  )


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


def restore_latest_readable(
  mngr, abstract_state: Any, meta: Mapping[str, Any], *, workdir: epath.Path, data_iter: Any
):
  """The state of the workdir's latest checkpoint that reads (its iterator state restored into
  ``data_iter``); a damaged one falls back to the previous (logged). None when there is none.

  Raises:
    WorkdirMismatchError: the checkpoint is of another model / setting / shape.
    CheckpointDamagedError: checkpoints exist and none of them reads.
  """
  damaged: list[str] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore_checkpoint(
        mngr, step, abstract_state, meta, where=f"workdir {workdir}", data_iter=data_iter
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
    return state
  if damaged:
    raise CheckpointDamagedError(
      f"no checkpoint in {workdir / CHECKPOINT_DIR} can be read ({'; '.join(damaged)}). Move "
      f"that folder away to start again, or use another --workdir."
    )
  return None


def restore_latest(
  folder: epath.Path,
  abstract_state: Any,
  meta: Mapping[str, Any],
  *,
  where: str,
  data_iter: Any = None,
  with_data: bool = True,
) -> tuple[Any, int] | None:
  """(state, step) of the latest checkpoint in ``folder`` (a read-only manager; checked by
  `restore_checkpoint`), or None when the folder holds no checkpoint."""
  mngr = checkpoint_manager(folder, keep=1, async_save=False, read_only=True)
  try:
    step = mngr.latest_step()
    if step is None:
      return None
    state = restore_checkpoint(
      mngr, step, abstract_state, meta, where=where, data_iter=data_iter, with_data=with_data
    )
    return state, step
  finally:
    mngr.close()


def remove_steps_from(mngr, first: int) -> list[int]:
  """Deletes the checkpoints of steps >= ``first`` (process 0 deletes; every process waits for
  the saves in flight first) and returns their steps."""
  mngr.wait_until_finished()
  removed = [s for s in mngr.all_steps() if s >= first]
  if jax.process_index() == 0:
    for s in removed:
      mngr.delete(s)
  return removed


# ---------------------------------------------------------------------------
# config.init weights
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# The best checkpoint
# ---------------------------------------------------------------------------


def best_so_far(best_mngr) -> float | None:
  """The validation mIoU recorded with the best checkpoint (None: none yet)."""
  import orbax.checkpoint as ocp

  step = best_mngr.latest_step()
  if step is None:
    return None
  meta = best_mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
  return meta.get("val", {}).get("miou")


def save_best(
  best_mngr,
  step: int,
  state,
  meta: Mapping[str, Any],
  val: Mapping[str, Any],
  *,
  resume_step: int | None = None,
) -> None:
  """Replaces the best checkpoint with ``state`` of ``step`` and its validation result (a
  synchronous save).

  Raises:
    CheckpointSaveError: the save failed (``resume_step``: the checkpoint a rerun resumes from).
  """
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


# ---------------------------------------------------------------------------
# Failed saves
# ---------------------------------------------------------------------------


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


class Saver:
  """Writes the checkpoints of ``mngr``. A failed save becomes one `CheckpointSaveError`: raised
  by the save itself, or, for an async save, found by `check` at a step boundary.

  Attributes:
    committed: the step of the newest checkpoint known to be complete (None: none yet).
    on_committed: called with the step each time a save is known complete (e.g. to upload the
      run's log.txt, so that a gs:// log is never older than the newest checkpoint).
  """

  def __init__(
    self, mngr, directory: epath.Path, on_committed: Callable[[int], None] | None = None
  ):
    self._mngr, self._directory = mngr, directory
    self.on_committed = on_committed
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
    if self.on_committed is not None:
      self.on_committed(step)


__all__ = [
  "BEST_DIR",
  "CHECKPOINT_DIR",
  "COMPUTE_ONLY_FIELDS",
  "META_FORMAT",
  "CheckpointDamagedError",
  "CheckpointSaveError",
  "OtherFoldError",
  "Saver",
  "WorkdirMismatchError",
  "best_so_far",
  "check_init_folds",
  "checkpoint_manager",
  "checkpoint_meta",
  "checkpoint_root",
  "describe",
  "load_init",
  "model_fields",
  "remove_steps_from",
  "restore_checkpoint",
  "restore_latest",
  "restore_latest_readable",
  "save_args",
  "save_best",
]
