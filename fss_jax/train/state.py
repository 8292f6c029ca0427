"""Train state (params, batch_stats, opt_state, step, rng), its creation and weight loading.

`TrainState` is a plain pytree (a flax struct dataclass): the optax
transformation and the model are static arguments of the step, not fields,
so the state is all arrays and orbax can save/restore it as is.

`create` initialises the model from an example episode (zeros of the right
shapes, identical on every process) directly into its sharding.
`load_init` replaces params / batch_stats with converted weights
(``python -m checkpoints.convert`` writes ``{"params": ..., "batch_stats": ...}``
as an orbax pytree) with strict key matching: every key of the checkpoint must
exist in the model (under ``prefix``) with the same shape and vice versa; the
error lists what is missing on each side.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from fss_jax import io as fss_io


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, number of optimiser steps done.
    params: the model's ``params`` collection.
    batch_stats: the ``batch_stats`` collection ({} for models without BatchNorm).
    opt_state: the optax state.
    rng: uint32 [2] raw PRNG key; step ``s`` uses ``fold_in(rng, s)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  def variables(self) -> dict:
    """The flax variables dict for ``model.apply``."""
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v


def zeros_like_episode(example: Mapping[str, Any], batch: int = 1) -> dict[str, np.ndarray]:
  """Zeros with the dtypes of ``example`` and leading size ``batch`` (init input)."""
  out = {}
  for k, v in example.items():
    v = np.asarray(v)
    out[k] = np.zeros((batch,) + v.shape[1:], v.dtype)
  return out


def init_variables(model, example: Mapping[str, Any], rng: jax.Array) -> dict:
  """``model.init`` on ``example`` (train=False); returns {"params", "batch_stats"}."""
  p_rng, d_rng = jax.random.split(rng)
  variables = model.init({"params": p_rng, "dropout": d_rng}, dict(example), train=False)
  variables = flax.core.unfreeze(variables) if hasattr(variables, "unfreeze") else dict(variables)
  return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}


def create(model, tx, example: Mapping[str, Any], *, rng: jax.Array, sharding=None) -> TrainState:
  """A fresh `TrainState` (random init), placed with ``sharding`` (e.g. replicated).

  Args:
    model: the flax module.
    tx: the optax transformation (opt_state is initialised from it).
    example: an Episode dict (only shapes/dtypes are used; batch axis first).
    rng: PRNG key; split into init and training keys.
    sharding: a sharding (or pytree prefix of shardings) for the state; None = default device.
  """
  shapes = {k: (v.shape, v.dtype) for k, v in zeros_like_episode(example).items()}
  init_rng, train_rng = jax.random.split(rng)

  def _init(key):
    # Zeros built inside the graph: no large constants, identical on every process.
    zeros = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
    v = init_variables(model, zeros, key)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      batch_stats=v["batch_stats"],
      opt_state=tx.init(v["params"]),
      rng=train_rng,
    )

  return jax.jit(_init, out_shardings=sharding)(init_rng)


def abstract(model, tx, example: Mapping[str, Any], *, sharding=None) -> TrainState:
  """The state's ShapeDtypeStructs (with shardings), without allocating it."""
  zeros = zeros_like_episode(example)

  def _init(key):
    init_rng, train_rng = jax.random.split(key)
    v = init_variables(model, zeros, init_rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      batch_stats=v["batch_stats"],
      opt_state=tx.init(v["params"]),
      rng=train_rng,
    )

  shapes = jax.eval_shape(_init, jax.random.PRNGKey(0))
  if sharding is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


# ---------------------------------------------------------------------------
# Converted weights
# ---------------------------------------------------------------------------


class InitMismatchError(ValueError):
  """Converted weights do not fit the model; lists keys missing on each side.

  Attributes:
    missing, unexpected, shapes: the keys missing in the checkpoint, the keys the model
      lacks, and the shape mismatches (one text line each).
    details: the full listing when the message is a one-line diagnosis (`load_init`), else "".
  """

  def __init__(self, message: str, *, missing=(), unexpected=(), shapes=(), details: str = ""):
    super().__init__(message)
    self.missing, self.unexpected, self.shapes = list(missing), list(unexpected), list(shapes)
    self.details = details

  def counts(self) -> str:
    """ "275 missing, 489 unexpected keys" (the kinds that occur)."""
    parts = [
      f"{len(items)} {name}"
      for name, items in (
        ("missing", self.missing),
        ("unexpected", self.unexpected),
        ("shape mismatches", self.shapes),
      )
      if items
    ]
    return ", ".join(parts) + (" keys" if not self.shapes else "")


def _resolve_pytree_dir(path: epath.Path) -> epath.Path:
  """An orbax pytree directory: ``path`` itself, its latest step, or its only item."""
  if (path / "_METADATA").is_file():
    return path
  steps = (
    sorted(
      (p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if path.is_dir()
    else []
  )
  if steps:
    return _resolve_pytree_dir(steps[-1])
  items = (
    [p for p in path.iterdir() if p.is_dir() and (p / "_METADATA").is_file()]
    if path.is_dir()
    else []
  )
  for name in ("params", "variables", "default", "state"):
    for p in items:
      if p.name == name:
        return p
  if len(items) == 1:
    return items[0]
  raise FileNotFoundError(
    f"{path} is not an orbax checkpoint of converted weights (no _METADATA found). Write one with "
    f"`python -m checkpoints.convert --model <name> --src <file.pth> --dst {path}`."
  )


def read_variables(path: str | os.PathLike) -> dict:
  """Reads converted weights (orbax pytree) as numpy: {"params": ..., "batch_stats": ...}."""
  import orbax.checkpoint as ocp

  root = fss_io.user_path(path)
  if not root.exists():
    raise FileNotFoundError(
      f"config.init={os.fspath(path)!r} does not exist. Convert the PyTorch weights first: "
      f"`python -m checkpoints.convert --model <name> --src <file.pth> --dst {os.fspath(path)}`."
    )
  d = _resolve_pytree_dir(root)
  ckptr = ocp.PyTreeCheckpointer()
  # The handler's tree metadata: the checkpointer's would also read the step's
  # _CHECKPOINT_METADATA, which a training step's ``state/`` item does not have (a warning).
  meta = ckptr.handler.metadata(d)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  values = ckptr.restore(d, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  values = dict(values)
  if "params" not in values:  # a bare params tree
    values = {"params": values}
  values.setdefault("batch_stats", {})
  return values


# A converted checkpoint (``python -m checkpoints.convert``): DIR/variables + DIR/metadata.json.
CONVERTED_VARIABLES_DIR = fss_io.CONVERTED_VARIABLES_DIR
CONVERTED_METADATA_FILE = fss_io.CONVERTED_METADATA_FILE
_CONVERTED_METADATA = CONVERTED_METADATA_FILE
_STEP_METADATA = ("meta", "metadata")  # a training step's meta item (fss_jax.train.checkpointing)


def weights_info(path: str | os.PathLike) -> dict:
  """What weights record about themselves, {} when nothing is recorded.

  Reads a converted checkpoint's ``metadata.json`` (``checkpoints.convert``) or a
  training step's ``meta/metadata`` (``fss_jax.main``; a workdir, its ``checkpoints``
  or ``best`` folder, or one step).

  Returns:
    {"kind": "converted" | "trained", "file": the metadata file, "model", "fields",
    "dataset", "fold", "source" (the converted file)}, keys absent when not recorded.
  """
  import json

  file, kind = _metadata_file(fss_io.user_path(path))
  if file is None:
    return {}
  try:
    meta = json.loads(file.read_text())
  except (OSError, ValueError):
    return {}
  if not isinstance(meta, dict):
    return {}
  info = {
    "kind": kind,
    "file": str(file),
    "model": meta.get("model"),
    "fields": meta.get("fields" if kind == "converted" else "model_fields"),
    "dataset": meta.get("dataset"),
    "fold": meta.get("fold"),
    "source": meta.get("source"),
  }
  return {k: v for k, v in info.items() if v is not None}


def _metadata_file(root: epath.Path) -> tuple[epath.Path | None, str]:
  """(the metadata file of the weights at ``root``, "converted" | "trained")."""
  if (root / CONVERTED_VARIABLES_DIR).is_dir() and (root / _CONVERTED_METADATA).is_file():
    return root / _CONVERTED_METADATA, "converted"
  if root.name == CONVERTED_VARIABLES_DIR and (root.parent / _CONVERTED_METADATA).is_file():
    return root.parent / _CONVERTED_METADATA, "converted"
  try:
    d = _resolve_pytree_dir(root) if root.is_dir() else None
  except (FileNotFoundError, OSError):
    return None, ""
  step_meta = d.parent.joinpath(*_STEP_METADATA) if d is not None else None
  if step_meta is not None and step_meta.is_file():
    return step_meta, "trained"
  return None, ""


def describe_weights(info: Mapping[str, Any]) -> str:
  """ "a converted sccan checkpoint (layers=101; pascal5i fold 0)" from `weights_info`."""
  fields = ", ".join(f"{k}={v}" for k, v in sorted((info.get("fields") or {}).items()))
  trained = (
    f"{info['dataset']} fold {info['fold']}"
    if info.get("fold") is not None and info.get("dataset")
    else ""
  )
  inside = "; ".join(x for x in (fields, trained) if x)
  kind = "converted" if info.get("kind") == "converted" else "trained"
  return f"a {kind} {info.get('model') or 'unknown-model'} checkpoint" + (
    f" ({inside})" if inside else ""
  )


def _flat(tree: Any) -> dict[tuple, Any]:
  if not tree:
    return {}
  return traverse_util.flatten_dict(flax.core.unfreeze(tree) if hasattr(tree, "unfreeze") else tree)


def merge_variables(
  target: Mapping[str, Any],
  loaded: Mapping[str, Any],
  *,
  prefix: str = "",
  source: str = "converted weights",
) -> dict:
  """Puts ``loaded`` params/batch_stats into ``target``'s tree, strictly.

  Args:
    target: {"params", "batch_stats"} of the model (arrays or ShapeDtypeStructs).
    loaded: the converted {"params", "batch_stats"} (numpy).
    prefix: '/'-path inside each collection where ``loaded`` belongs ("" = the whole
      model; e.g. "backbone" when only the backbone was converted). Everything
      under the prefix must be matched exactly; the rest of ``target`` is kept.
    source: name of the weights for messages.

  Returns:
    {"params", "batch_stats"} with numpy leaves from ``loaded`` where matched, else target's.

  Raises:
    InitMismatchError: missing / unexpected keys or shape mismatches.
  """
  missing, unexpected, shapes = compare_variables(target, loaded, prefix=prefix, source=source)
  if missing or unexpected or shapes:
    lines = [f"{source} do not match the model" + (f" under {prefix!r}" if prefix else "") + ":"]
    for title, items in (
      ("missing in the checkpoint (the model has them)", missing),
      ("unexpected in the checkpoint (the model lacks them)", unexpected),
      ("shape mismatches", shapes),
    ):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {x}" for x in items[:40]]
        if len(items) > 40:
          lines.append(f"    ... and {len(items) - 40} more")
    lines.append(
      "  Convert weights for this model/config (checkpoints.convert) or set "
      "config.init_prefix to the sub-module they belong to."
    )
    raise InitMismatchError("\n".join(lines), missing=missing, unexpected=unexpected, shapes=shapes)
  pre = tuple(p for p in prefix.split("/") if p)
  out = {}
  for coll in ("params", "batch_stats"):
    merged = dict(_flat(target.get(coll)))
    for k, v in _flat(loaded.get(coll)).items():
      merged[pre + k] = np.asarray(v).astype(merged[pre + k].dtype)
    out[coll] = traverse_util.unflatten_dict(merged) if merged else {}
  return out


def compare_variables(
  target: Mapping[str, Any],
  loaded: Mapping[str, Any],
  *,
  prefix: str = "",
  source: str = "converted weights",
) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, shape mismatches) of ``loaded`` put under ``prefix`` of ``target``.

  Keys and shapes only (nothing is copied); empty lists mean `merge_variables` succeeds.
  """
  pre = tuple(p for p in prefix.split("/") if p)
  missing, unexpected, shapes = [], [], []
  for coll in ("params", "batch_stats"):
    tgt = _flat(target.get(coll))
    src = {pre + k: v for k, v in _flat(loaded.get(coll)).items()}
    under = {k for k in tgt if k[: len(pre)] == pre}
    for k in sorted(under - set(src)):
      missing.append(f"{coll}/{'/'.join(k)} {tuple(tgt[k].shape)}")
    for k in sorted(set(src) - set(tgt)):
      unexpected.append(f"{coll}/{'/'.join(k)} {tuple(np.shape(src[k]))}")
    for k in sorted(set(src) & set(tgt)):
      if tuple(np.shape(src[k])) != tuple(tgt[k].shape):
        shapes.append(
          f"{coll}/{'/'.join(k)}: {source} {tuple(np.shape(src[k]))}, model {tuple(tgt[k].shape)}"
        )
  return missing, unexpected, shapes


_PREFIX_ENTRY = re.compile(r"^([A-Za-z_][\w/]*)=(.+)$")


def parse_inits(init: str, init_prefix: str = "") -> list[tuple[str, str]]:
  """``config.init`` (+ ``config.init_prefix``) -> [(prefix, path), ...].

  ``init`` is either one path (loaded under ``init_prefix``; "" = the whole
  model) or comma-separated ``prefix=path`` entries, one per sub-module, e.g.
  ``pspnet=~/w/psp_fold0,ssp=~/w/ssp_fold0`` (PAHNet trained from scratch: the
  frozen base learner and the frozen SSP predictor from two files). Entries are
  loaded in order; a later one overrides what an earlier one wrote. A relative
  path that itself looks like ``name=...`` must be written ``./name=...``.

  Raises:
    ValueError: a mix of plain paths and ``prefix=path`` entries, an empty entry,
      or ``init_prefix`` set together with ``prefix=path`` entries.
  """
  init = (init or "").strip()
  if not init:
    return []
  parts = [p.strip() for p in init.split(",")]
  matches = [_PREFIX_ENTRY.match(p) for p in parts]
  if not any(matches):
    return [(init_prefix or "", os.fspath(fss_io.user_path(init)))]
  bad = [p for p, m in zip(parts, matches) if m is None]
  if bad:
    raise ValueError(
      f"config.init={init!r} mixes prefix=path entries with {bad}; write every entry as "
      f"prefix=path (e.g. pspnet=DIR,ssp=DIR) or give one path"
    )
  if init_prefix:
    raise ValueError(
      f"config.init_prefix={init_prefix!r} applies to a single config.init path; with "
      f"prefix=path entries ({init!r}) leave config.init_prefix empty"
    )
  return [
    (m.group(1).strip("/"), os.fspath(fss_io.user_path(m.group(2).strip())))
    for m in matches
    if m is not None  # every entry matched: `bad` is empty
  ]


def _unwrap(loaded: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
  """Weights saved by a model that wraps the prefix's sub-module, e.g. the ``ssp`` model
  (params ``ssp/...``) loaded under prefix ``ssp``: drops that one top-level name."""
  name = next((p for p in reversed(prefix.split("/")) if p), None)  # the last part
  params = loaded.get("params") or {}
  if name is None or set(params) != {name}:
    return loaded
  stats = loaded.get("batch_stats") or {}
  if stats and set(stats) != {name}:
    return loaded
  return {"params": params[name], "batch_stats": stats.get(name, {}) if stats else {}}


def _candidate_prefixes(target: Mapping[str, Any], depth: int = 2) -> list[str]:
  """ "" (the whole model) and the model's sub-modules down to ``depth`` levels."""
  paths = {
    "/".join(k[:d]) for k in _flat(target.get("params")) for d in range(1, depth + 1) if len(k) > d
  }
  return [""] + sorted(paths)


def fitting_prefixes(target: Mapping[str, Any], loaded: Mapping[str, Any]) -> list[str]:
  """The prefixes (`_candidate_prefixes`) under which ``loaded`` fits ``target`` exactly."""
  return [
    p
    for p in _candidate_prefixes(target)
    if not any(compare_variables(target, _unwrap(loaded, p), prefix=p))
  ]


def _prefix_flag(prefix: str, path: str, entries: bool) -> str:
  if entries:
    return f"{prefix}={path} in --config.init" if prefix else f"--config.init={path} alone"
  return f"--config.init_prefix={prefix or chr(39) * 2}"


def _field_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
  diffs = [
    f"{k}: checkpoint {saved[k]!r}, config {current[k]!r}"
    for k in sorted(set(saved) & set(current))
    if saved[k] != current[k]
  ]
  return "; ".join(diffs)


def explain_mismatch(
  error: InitMismatchError,
  target: Mapping[str, Any],
  loaded: Mapping[str, Any],
  prefix: str,
  path: str,
  *,
  model: str = "",
  fields: Mapping[str, Any] | None = None,
  entries: bool = False,
) -> InitMismatchError:
  """A one-line diagnosis of weights that do not fit under ``prefix``: what the checkpoint is
  (its `weights_info`) and what to pass instead (the prefix where it fits), with the key
  counts; the full listing moves to ``details``. ``error`` itself when nothing is known.

  Args:
    error: `merge_variables`' error for ``loaded`` under ``prefix``.
    target: the model's {"params", "batch_stats"}.
    loaded: the weights as read (`read_variables`, not unwrapped).
    prefix, path: where they were loaded, and from which directory.
    model, fields: this run's model name and fields (for the message).
    entries: config.init is a list of prefix=path entries (the hint names an entry, not
      config.init_prefix).
  """
  info = weights_info(path)
  info = info if info.get("model") else {}
  fits = [p for p in fitting_prefixes(target, loaded) if p != prefix]
  if not info and not fits:
    return error
  what = f"{path} holds {describe_weights(info)}" if info else f"the weights in {path}"
  under = f"under {prefix!r}" if prefix else "as the whole model"
  counts = f"{error.counts()} {under}"
  if fits:
    where = "the whole model" if fits[0] == "" else f"the model's {fits[0]!r} sub-module"
    message = (
      f"{what}: they fit {where}, not {under} ({counts}); pass "
      f"{_prefix_flag(fits[0], path, entries)}"
    )
  elif info.get("model") and model and info["model"] != model:
    part = f"{prefix!r} sub-module" if prefix else "model"
    message = (
      f"{what}: a {info['model']} model, not weights for this {model} config's {part} "
      f"({counts}); convert the weights this config needs (see its docstring) or use a "
      f"{info['model']} config"
    )
  else:
    differ = _field_differences(info.get("fields") or {}, fields or {})
    message = f"{what}: its keys do not fit this {model or 'model'} {under} ({counts})" + (
      f"; the fields differ ({differ}): convert again with --model-arg to match, "
      f"or set them in the config"
      if differ
      else ""
    )
  return InitMismatchError(
    message,
    missing=error.missing,
    unexpected=error.unexpected,
    shapes=error.shapes,
    details=str(error),
  )


def load_init(
  state: TrainState,
  path: str | os.PathLike | Sequence[tuple[str, str]],
  tx,
  *,
  prefix: str = "",
  sharding=None,
  model: str = "",
  fields: Mapping[str, Any] | None = None,
  entries: bool | None = None,
) -> TrainState:
  """``state`` with params/batch_stats from converted weights and a fresh opt_state.

  Args:
    state: a freshly created state (shapes/dtypes define what must match).
    path: orbax directory written by ``checkpoints.convert``, or a list of
      (prefix, directory) pairs (`parse_inits`) merged in order.
    tx: the optax transformation (opt_state is re-initialised for the new params).
    prefix: see `merge_variables` (single-path form only).
    sharding: placement of the result (e.g. replicated).
    model, fields: the run's model name and fields, named by a mismatch's message.
    entries: config.init was written as prefix=path entries (default: more than one source).

  Raises:
    InitMismatchError: the weights do not fit; when the checkpoint says what it is or
      fits elsewhere in the model, a one-line message (`explain_mismatch`).
  """
  sources = [(prefix, path)] if isinstance(path, (str, os.PathLike)) else list(path)
  merged = {"params": state.params, "batch_stats": state.batch_stats}
  for pre, src in sources:
    loaded = read_variables(src)
    try:
      merged = merge_variables(
        merged, _unwrap(loaded, pre), prefix=pre, source=f"weights in {os.fspath(src)}"
      )
    except InitMismatchError as e:
      raise explain_mismatch(
        e,
        merged,
        loaded,
        pre,
        os.fspath(src),
        model=model,
        fields=fields,
        entries=len(sources) > 1 if entries is None else entries,
      ) from None

  def _place(p, b, step, rng):
    return TrainState(step=step, params=p, batch_stats=b, opt_state=tx.init(p), rng=rng)

  return jax.jit(_place, out_shardings=sharding)(
    merged["params"], merged["batch_stats"], state.step, state.rng
  )


__all__ = [
  "TrainState",
  "create",
  "abstract",
  "init_variables",
  "zeros_like_episode",
  "read_variables",
  "merge_variables",
  "compare_variables",
  "load_init",
  "parse_inits",
  "InitMismatchError",
  "weights_info",
  "describe_weights",
  "explain_mismatch",
  "fitting_prefixes",
]
