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
import pathlib
import re
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


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
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                      batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]),
                      rng=train_rng)

  return jax.jit(_init, out_shardings=sharding)(init_rng)


def abstract(model, tx, example: Mapping[str, Any], *, sharding=None) -> TrainState:
  """The state's ShapeDtypeStructs (with shardings), without allocating it."""
  zeros = zeros_like_episode(example)

  def _init(key):
    init_rng, train_rng = jax.random.split(key)
    v = init_variables(model, zeros, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                      batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]),
                      rng=train_rng)

  shapes = jax.eval_shape(_init, jax.random.PRNGKey(0))
  if sharding is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


# ---------------------------------------------------------------------------
# Converted weights
# ---------------------------------------------------------------------------

class InitMismatchError(ValueError):
  """Converted weights do not fit the model; lists keys missing on each side."""


def _resolve_pytree_dir(path: pathlib.Path) -> pathlib.Path:
  """An orbax pytree directory: ``path`` itself, its latest step, or its only item."""
  if (path / "_METADATA").is_file():
    return path
  steps = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()),
                 key=lambda p: int(p.name)) if path.is_dir() else []
  if steps:
    return _resolve_pytree_dir(steps[-1])
  items = [p for p in path.iterdir() if p.is_dir() and (p / "_METADATA").is_file()] \
      if path.is_dir() else []
  for name in ("params", "variables", "default", "state"):
    for p in items:
      if p.name == name:
        return p
  if len(items) == 1:
    return items[0]
  raise FileNotFoundError(
      f"{path} is not an orbax checkpoint of converted weights (no _METADATA found). Write one with "
      f"`python -m checkpoints.convert --model <name> --src <file.pth> --dst {path}`.")


def read_variables(path: str | os.PathLike) -> dict:
  """Reads converted weights (orbax pytree) as numpy: {"params": ..., "batch_stats": ...}."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(os.path.expanduser(os.fspath(path)))
  if not root.exists():
    raise FileNotFoundError(
        f"config.init={os.fspath(path)!r} does not exist. Convert the PyTorch weights first: "
        f"`python -m checkpoints.convert --model <name> --src <file.pth> --dst {os.fspath(path)}`.")
  d = _resolve_pytree_dir(root)
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(d)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  values = ckptr.restore(d, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  values = dict(values)
  if "params" not in values:  # a bare params tree
    values = {"params": values}
  values.setdefault("batch_stats", {})
  return values


def _flat(tree: Any) -> dict[tuple, Any]:
  if not tree:
    return {}
  return traverse_util.flatten_dict(flax.core.unfreeze(tree) if hasattr(tree, "unfreeze") else tree)


def merge_variables(target: Mapping[str, Any], loaded: Mapping[str, Any], *,
                    prefix: str = "", source: str = "converted weights") -> dict:
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
  pre = tuple(p for p in prefix.split("/") if p)
  missing, unexpected, shapes = [], [], []
  out = {}
  for coll in ("params", "batch_stats"):
    tgt = _flat(target.get(coll))
    src = {pre + k: v for k, v in _flat(loaded.get(coll)).items()}
    under = {k for k in tgt if k[:len(pre)] == pre}
    for k in sorted(under - set(src)):
      missing.append(f"{coll}/{'/'.join(k)} {tuple(tgt[k].shape)}")
    for k in sorted(set(src) - set(tgt)):
      unexpected.append(f"{coll}/{'/'.join(k)} {tuple(np.shape(src[k]))}")
    merged = dict(tgt)
    for k in sorted(set(src) & set(tgt)):
      if tuple(np.shape(src[k])) != tuple(tgt[k].shape):
        shapes.append(f"{coll}/{'/'.join(k)}: {source} {tuple(np.shape(src[k]))}, "
                      f"model {tuple(tgt[k].shape)}")
      else:
        merged[k] = np.asarray(src[k]).astype(tgt[k].dtype)
    out[coll] = traverse_util.unflatten_dict(merged) if merged else {}
  if missing or unexpected or shapes:
    lines = [f"{source} do not match the model" + (f" under {prefix!r}" if prefix else "") + ":"]
    for title, items in (("missing in the checkpoint (the model has them)", missing),
                         ("unexpected in the checkpoint (the model lacks them)", unexpected),
                         ("shape mismatches", shapes)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {x}" for x in items[:40]]
        if len(items) > 40:
          lines.append(f"    ... and {len(items) - 40} more")
    lines.append("  Convert weights for this model/config (checkpoints.convert) or set "
                 "config.init_prefix to the sub-module they belong to.")
    raise InitMismatchError("\n".join(lines))
  return out


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
    return [(init_prefix or "", os.path.expanduser(init))]
  bad = [p for p, m in zip(parts, matches) if m is None]
  if bad:
    raise ValueError(f"config.init={init!r} mixes prefix=path entries with {bad}; write every entry as "
                     f"prefix=path (e.g. pspnet=DIR,ssp=DIR) or give one path")
  if init_prefix:
    raise ValueError(f"config.init_prefix={init_prefix!r} applies to a single config.init path; with "
                     f"prefix=path entries ({init!r}) leave config.init_prefix empty")
  return [(m.group(1).strip("/"), os.path.expanduser(m.group(2).strip())) for m in matches]


def _unwrap(loaded: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
  """Weights saved by a model that wraps the prefix's sub-module, e.g. the ``ssp`` model
  (params ``ssp/...``) loaded under prefix ``ssp``: drops that one top-level name."""
  name = [p for p in prefix.split("/") if p][-1:] or [None]
  params = loaded.get("params") or {}
  if name[0] is None or set(params) != {name[0]}:
    return loaded
  stats = loaded.get("batch_stats") or {}
  if stats and set(stats) != {name[0]}:
    return loaded
  return {"params": params[name[0]], "batch_stats": stats.get(name[0], {}) if stats else {}}


def load_init(state: TrainState, path: str | os.PathLike | Sequence[tuple[str, str]], tx, *,
              prefix: str = "", sharding=None) -> TrainState:
  """``state`` with params/batch_stats from converted weights and a fresh opt_state.

  Args:
    state: a freshly created state (shapes/dtypes define what must match).
    path: orbax directory written by ``checkpoints.convert``, or a list of
      (prefix, directory) pairs (`parse_inits`) merged in order.
    tx: the optax transformation (opt_state is re-initialised for the new params).
    prefix: see `merge_variables` (single-path form only).
    sharding: placement of the result (e.g. replicated).
  """
  sources = [(prefix, path)] if isinstance(path, (str, os.PathLike)) else list(path)
  merged = {"params": state.params, "batch_stats": state.batch_stats}
  for pre, src in sources:
    merged = merge_variables(merged, _unwrap(read_variables(src), pre), prefix=pre,
                             source=f"weights in {os.fspath(src)}")

  def _place(p, b, step, rng):
    return TrainState(step=step, params=p, batch_stats=b, opt_state=tx.init(p), rng=rng)

  return jax.jit(_place, out_shardings=sharding)(merged["params"], merged["batch_stats"],
                                                 state.step, state.rng)


__all__ = ["TrainState", "create", "abstract", "init_variables", "zeros_like_episode",
           "read_variables", "merge_variables", "load_init", "parse_inits", "InitMismatchError"]
