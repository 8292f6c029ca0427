"""Train-step parity: one training step of the engine against the official train script.

`checkpoints.verify` sends a fixture whose json says ``kind: "train_step"`` here
(shared/parity/README.md, "Train-step fixtures"). What runs is what ``fss_jax.main``
runs for the model's paper config, nothing written for the check:

1. the reference weights are rebuilt from the json (plus ``state_dict_aliases``), the
   model comes from the registry with the fixture's fields (`train_adapters`), every
   ``nn.Dropout`` off (`no_dropout`; the fixtures set every dropout probability to 0);
2. the paper config (``configs/<method>.py`` at the fixture's shot) gives the optimiser:
   `fss_jax.train.optim.build(config.optim, params, total_steps, frozen=spec.frozen_patterns())`
   with T = the fixture's ``max_iter`` (the engine derives it from epochs x loader length);
3. losses and gradients: `fss_jax.train.step.loss_and_grads` with the registry's
   ``loss_fn`` and the optimiser's trainable mask, float32, highest matmul precision;
4. ONE update of ``opt.tx`` at the fixture's iteration (the schedules' step counts set to
   it, the optimiser moments fresh as in the reference's first step), applied to the
   REFERENCE gradients (README step 5; a summarised tensor is stepped on its stride
   sample: the first SGD / AdamW step is elementwise);
5. BatchNorm: the running statistics after the training forward vs ``stat_`` arrays; a
   fixture without them requires every statistic to stay unchanged (fix_bn);
6. the trainable set and hyper-parameters: every tensor the engine trains must be held by
   an official optimiser and every tensor the reference updates must be trained here,
   with the same optimiser type, lr (at the iteration and at the json's ``lr_samples``),
   weight decay, momentum / betas / eps.

Report (`verify_train_fixture`)::

  {"fixture", "model", "kind": "train_step", "config",
   "outputs": {"out_loss_*": {"max_abs", "scale", "limit"}},
   "grads": {key: {...}}, "deltas": {key: {...}}, "stats": {key: {...}},
   "trainable": {"ours", "reference", "errors": [...]}, "hparams": {"errors": [...]},
   "schedule": {"errors": [...]}, "worst": {category: err / limit}, "passed"}

``max_abs = max|ours - ref|``, ``scale = max|ref|``, ``limit`` = the fixture's
``tolerance_suggestion.per_array`` entry; an entry passes when ``max_abs / scale <=
limit`` (``max_abs <= zero_abs`` for an exactly-zero reference).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints import fixtures, train_adapters

ZERO_ABS = 1e-12
LR_RTOL = 1e-5


class TrainFixtureError(ValueError):
  """A train-step fixture this checker cannot use (names what is missing)."""


@contextlib.contextmanager
def no_dropout():
  """Every ``flax.linen.Dropout`` call returns its input (traced inside this context)."""
  import flax.linen as nn

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
      return args[0] if args else kwargs["inputs"]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


# ---------------------------------------------------------------------------
# Layout: our parameter paths <-> official keys
# ---------------------------------------------------------------------------

_TO_TORCH = {
  "copy": lambda a: a,
  "conv": lambda a: np.transpose(a, (3, 2, 0, 1)),  # HWIO -> OIHW
  "linear": lambda a: np.transpose(a),  # (in, out) -> (out, in)
}


def _key_index(rules) -> tuple[dict, dict]:
  """Key map -> ({params path: (torch key, transform)}, {batch_stats path: torch key})."""
  from fss_jax import keymaps

  params, stats = {}, {}
  for r in rules:
    if not isinstance(r, keymaps.Rule):
      continue
    if r.dst[0] == "params":
      params[r.dst[1:]] = (r.src, r.transform)
    elif r.dst[0] == "batch_stats":
      stats[r.dst[1:]] = r.src
  return params, stats


def _flat(tree) -> dict[tuple, Any]:
  from flax import traverse_util

  return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _summaries(g: np.ndarray, stride: int) -> dict[str, np.ndarray]:
  """The README's gradient summaries of a torch-layout array (float64)."""
  g = np.asarray(g, np.float64)
  out = {"__stride": g.reshape(-1)[::stride]}
  if g.ndim >= 2:
    out["__rownorm"] = np.sqrt((g.reshape(g.shape[0], -1) ** 2).sum(1))
    m = np.moveaxis(g, 1, 0)
    out["__colnorm"] = np.sqrt((m.reshape(m.shape[0], -1) ** 2).sum(1))
  return out


def _entry(ours, ref, limit: float | None) -> dict[str, Any]:
  ref = np.asarray(ref, np.float64)
  ours = np.asarray(ours, np.float64)
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  if ours.shape != ref.shape:
    return {
      "max_abs": None,
      "scale": scale,
      "limit": limit,
      "passed": False,
      "error": f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}",
    }
  max_abs = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
  finite = bool(np.all(np.isfinite(ours)))
  if limit is None or scale == 0.0:
    ok = finite and max_abs <= ZERO_ABS
    err = None
  else:
    err = max_abs / scale
    ok = finite and err <= limit
  return {"max_abs": max_abs, "scale": scale, "limit": limit, "err": err, "passed": bool(ok)}


def _missing(name: str, ref, why: str) -> dict[str, Any]:
  scale = float(np.max(np.abs(np.asarray(ref, np.float64)))) if np.size(ref) else 0.0
  return {"max_abs": None, "scale": scale, "limit": None, "passed": False, "error": why}


# ---------------------------------------------------------------------------
# The paper config and its optimiser
# ---------------------------------------------------------------------------


def paper_config(config_arg: str):
  """``"sccan_pahnet.py:shot=1"`` -> the ConfigDict of ``configs/sccan_pahnet.py``."""
  module, _, arg = config_arg.partition(":")
  mod = importlib.import_module(f"configs.{pathlib.Path(module).stem}")
  return mod.get_config(arg or None)


def _schedule_count(schedule: Mapping[str, Any], iteration: int | None = None) -> int:
  """The optax step count at the reference's iteration (poly / step: 1-based; MultiStepLR:
  ``i_iter`` is the number of completed steps)."""
  kind = schedule.get("type")
  if kind == "MultiStepLR":
    return int(schedule.get("i_iter", 0) if iteration is None else iteration)
  it = schedule.get("curr_iter", schedule.get("iteration", 1)) if iteration is None else iteration
  return int(it) - 1


def _set_schedule_counts(opt_state, count: int):
  import jax
  import jax.numpy as jnp
  import optax

  def fix(s):
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=jnp.asarray(count, s.count.dtype))
    return s

  return jax.tree.map(fix, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))


_TORCH_OPT = {
  "torch.optim.sgd.SGD": "sgd",
  "torch.optim.adamw.AdamW": "adamw",
  "torch.optim.adam.Adam": "adam",
}


def _hparam_errors(
  key: str, ours: Mapping[str, Any], group: Mapping[str, Any], opt_type: str
) -> list[str]:
  """Differences between our label's hyper-parameters and the official param group."""
  errs = []
  want = _TORCH_OPT.get(opt_type, opt_type)
  if ours["optimizer"] != want:
    return [f"{key}: optimizer {ours['optimizer']} here, {want} in the reference"]
  h = group["hparams"]

  def close(a, b):
    return abs(float(a) - float(b)) <= 1e-7 * max(1.0, abs(float(b)))

  if not close(ours["weight_decay"], h.get("weight_decay", 0.0)):
    errs.append(
      f"{key}: weight decay {ours['weight_decay']} here, {h.get('weight_decay')} in the reference"
    )
  if want == "sgd":
    if not close(ours["momentum"], h.get("momentum", 0.0)):
      errs.append(f"{key}: momentum {ours['momentum']} here, {h.get('momentum')} in the reference")
    if bool(ours["nesterov"]) != bool(h.get("nesterov", False)):
      errs.append(f"{key}: nesterov {ours['nesterov']} here, {h.get('nesterov')} in the reference")
    if float(h.get("dampening", 0.0)):
      errs.append(f"{key}: the reference uses dampening {h['dampening']} (not supported here)")
  else:
    betas = h.get("betas", (0.9, 0.999))
    for name, a, b in (
      ("b1", ours["b1"], betas[0]),
      ("b2", ours["b2"], betas[1]),
      ("eps", ours["eps"], h.get("eps", 1e-8)),
    ):
      if not close(a, b):
        errs.append(f"{key}: {name} {a} here, {b} in the reference")
    if h.get("amsgrad"):
      errs.append(f"{key}: the reference uses amsgrad (not supported here)")
  return errs


def trainable_set_errors(
  ours_trained: set[str], ours_all: set[str], meta: Mapping[str, Any]
) -> list[str]:
  """Official keys trained on one side only, each named with the reason.

  Args:
    ours_trained: official keys of the tensors our optimiser updates.
    ours_all: official keys of every tensor of our model.
    meta: the fixture json (``params`` = every key an official optimiser holds;
      ``frozen.in_optimizer_without_grad`` = held but never updated by torch, either
      side is fine as long as its delta is 0; ``frozen.trainable_not_in_optimizer``).
  """
  ref_params = set(meta.get("params") or {})
  frozen = meta.get("frozen") or {}
  no_grad = set(frozen.get("in_optimizer_without_grad") or ())
  not_in_opt = set(frozen.get("trainable_not_in_optimizer") or ())
  errors = []
  for k in sorted(ours_trained - ref_params):
    why = (
      "requires grad but is in no official optimizer: the reference never updates it"
      if k in not_in_opt
      else "frozen in the reference"
    )
    errors.append(f"{k}: trained here, {why}")
  for k in sorted((ref_params - no_grad) - ours_trained):
    errors.append(
      f"{k}: updated by the reference optimiser, "
      + ("frozen here" if k in ours_all else "missing in this model")
    )
  return errors


# ---------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------


def verify_train_fixture(
  path: str | pathlib.Path,
  arrays: Mapping[str, np.ndarray] | None = None,
  meta: Mapping[str, Any] | None = None,
  *,
  verbose: bool = False,
  dtype: str = "float32",
) -> dict[str, Any]:
  """Runs one train-step fixture; returns the report (module docstring).

  ``dtype="float64"`` runs the same step with every floating array in float64 (needs
  ``jax_enable_x64``, set by the CLI's ``--float64``): it checks the training logic
  (losses, gradients, optimiser, frozen set) free of float32 kernel rounding.

  Raises:
    FileNotFoundError / fixtures.FixtureError: unreadable fixture.
    registry.UnsupportedModelError: no train adapter / registered model for it.
    keymaps.ConversionError: the regenerated weights do not fit the key map.
  """
  import jax
  import optax

  from fss_jax import keymaps
  from fss_jax.models import registry
  from fss_jax.train import optim as optim_lib
  from fss_jax.train import step as step_lib

  path = pathlib.Path(path)
  if arrays is None or meta is None:
    arrays, meta = fixtures.load_fixture(path)
  adapter = train_adapters.for_fixture(meta)
  spec = registry.get(adapter.model)
  tol = meta.get("tolerance_suggestion") or {}
  per_array = tol.get("per_array") or {}
  zero_abs = float(tol.get("zero_abs", ZERO_ABS))

  def limit(name: str) -> float | None:
    if name in per_array:
      return per_array[name]
    cat = {"out": "losses", "grad": "grads", "delta": "deltas", "stat": "stats"}[name.split("_")[0]]
    return (tol.get("rtol") or {}).get(cat, 1e-4)

  # -- model, weights, config, optimiser ------------------------------------------------
  state_dict = fixtures.regenerate(meta)
  for alias, key in (meta.get("state_dict_aliases") or {}).items():
    state_dict[alias] = state_dict[key]
  state_dict = keymaps.strip_prefixes(state_dict)
  fields = adapter.model_fields(meta)
  rules = spec.keymap(**adapter.keymap_fields(meta, fields))
  variables = keymaps.convert(state_dict, rules, model=spec.name)
  model = spec.make_model(**fields)
  param_keys, stat_keys = _key_index(rules)
  config_arg = adapter.config_arg(meta)
  config = paper_config(config_arg)
  schedule = meta.get("schedule") or {}
  total_steps = int(schedule.get("max_iter") or schedule.get("total_iters") or config.total_steps)

  def cast(tree):
    if dtype == "float32":
      return tree
    return jax.tree.map(
      lambda a: np.asarray(a, dtype) if np.asarray(a).dtype.kind == "f" else a, tree
    )

  params = cast(variables["params"])
  batch_stats = cast(variables.get("batch_stats", {}))
  opt = optim_lib.build(
    config.optim, params, total_steps=total_steps, frozen=spec.frozen_patterns(fields)
  )
  count = _schedule_count(schedule)

  report: dict[str, Any] = {
    "fixture": str(path),
    "model": spec.name,
    "kind": "train_step",
    "config": config_arg,
    "total_steps": total_steps,
    "schedule_count": count,
    "dtype": dtype,
    "backend": jax.default_backend(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "outputs": {},
    "grads": {},
    "deltas": {},
    "stats": {},
  }
  errors: list[str] = []

  # -- trainable set ----------------------------------------------------------------------
  labels = {p: l for p, l in _flat(opt.labels).items()}
  unmapped = sorted("/".join(p) for p in labels if p not in param_keys)
  if unmapped:
    raise TrainFixtureError(f"parameters without an official key in the key map: {unmapped[:10]}")
  ours_trained = {param_keys[p][0] for p, l in labels.items() if l != optim_lib.FROZEN}
  ref_params = meta.get("params") or {}
  no_grad = set((meta.get("frozen") or {}).get("in_optimizer_without_grad") or ())
  ref_updated = set(ref_params) - no_grad
  trainable_errors = trainable_set_errors(ours_trained, {v[0] for v in param_keys.values()}, meta)
  report["trainable"] = {
    "ours": len(ours_trained),
    "reference": len(ref_updated),
    "reference_no_grad": len(no_grad),
    "ours_numel": int(
      sum(np.size(v) for p, v in _flat(params).items() if labels[p] != optim_lib.FROZEN)
    ),
    "errors": trainable_errors,
  }
  errors += trainable_errors

  # -- hyper-parameters and schedule per key ---------------------------------------------
  groups = {}
  for o in meta.get("optimizers") or ():
    for g in o["param_groups"]:
      groups[(o.get("label", "optimizer"), g["index"])] = (o["type"], g)
  label_of_key = {param_keys[p][0]: l for p, l in labels.items()}
  hparam_errors, lr_errors = [], []
  for k, info in ref_params.items():
    label = label_of_key.get(k)
    if label is None or label == optim_lib.FROZEN:
      continue
    gkey = (info.get("optimizer", "optimizer"), info.get("group"))
    if gkey not in groups:
      raise TrainFixtureError(
        f"params[{k!r}] names optimizer group {gkey}, which the json's optimizers do not list"
      )
    otype, group = groups[gkey]
    hparam_errors += _hparam_errors(k, opt.hparams[label], group, otype)
    ours_lr = float(opt.schedules[label](count))
    if abs(ours_lr - float(info["lr"])) > LR_RTOL * abs(float(info["lr"])):
      lr_errors.append(
        f"{k}: lr {ours_lr:.6g} here at iteration {count + 1}, "
        f"{float(info['lr']):.6g} in the reference"
      )
  # lr_samples: the reference schedule at other iterations, per group of the scheduled optimiser
  samples = schedule.get("lr_samples") or {}
  by_group: dict[int, str] = {}
  for k, info in ref_params.items():
    label = label_of_key.get(k)
    sched_opt = schedule.get("applies_to", "optimizer")
    if label and label != optim_lib.FROZEN and info.get("optimizer", sched_opt) == sched_opt:
      by_group.setdefault(int(info["group"]), label)
  for it, lrs in samples.items():
    c = _schedule_count(schedule, int(it))
    for gi, ref_lr in enumerate(lrs):
      if gi not in by_group:
        continue
      ours_lr = float(opt.schedules[by_group[gi]](c))
      if abs(ours_lr - float(ref_lr)) > LR_RTOL * max(abs(float(ref_lr)), 1e-12):
        lr_errors.append(
          f"group {gi}: lr {ours_lr:.6g} here at iteration {it}, "
          f"{float(ref_lr):.6g} in the reference"
        )
  report["hparams"] = {"errors": hparam_errors}
  report["schedule"] = {"samples": len(samples), "errors": lr_errors}
  errors += hparam_errors + lr_errors

  # -- losses, gradients, statistics: the engine's training forward + backward ------------
  batch = cast(jax.device_get(adapter.inputs(arrays, meta)))
  with jax.default_matmul_precision("highest"), no_dropout():
    fn = jax.jit(
      lambda p, b, e: step_lib.loss_and_grads(
        p, b, e, jax.random.PRNGKey(0), model=model, loss_fn=spec.loss_fn, trainable=opt.trainable
      )
    )
    (loss, (metrics, new_stats)), grads = fn(params, batch_stats, batch)
  metrics = jax.tree.map(np.asarray, jax.device_get(dict(metrics)))
  metrics.setdefault("loss", np.asarray(loss))
  ours_losses = adapter.losses(metrics, meta)
  for name in sorted(k for k in arrays if k.startswith("out_loss_")):
    if name not in ours_losses:
      report["outputs"][name] = _missing(name, arrays[name], "the loss_fn reports no such term")
    else:
      report["outputs"][name] = _entry(ours_losses[name], arrays[name], limit(name))

  grads_flat = {p: np.asarray(g) for p, g in _flat(jax.device_get(grads)).items()}
  ours_grad = {
    param_keys[p][0]: _TO_TORCH[param_keys[p][1]](g)
    for p, g in grads_flat.items()
    if labels[p] != optim_lib.FROZEN
  }
  for name in sorted(k for k in arrays if k.startswith("grad_")):
    key, _, suffix = name[len("grad_") :].partition("__")
    short = name[len("grad_") :]
    if key not in ours_grad:
      report["grads"][short] = _missing(name, arrays[name], "not trained here")
      continue
    g = ours_grad[key]
    if suffix:
      g = _summaries(g, int(ref_params[key]["stride"]))["__" + suffix]
    report["grads"][short] = _entry(g, arrays[name], limit(name))

  stats_flat = {p: np.asarray(v) for p, v in _flat(jax.device_get(new_stats)).items()}
  old_stats = {p: np.asarray(v) for p, v in _flat(batch_stats).items()}
  ref_stats = sorted(k for k in arrays if k.startswith("stat_"))
  if ref_stats:
    ours_stat = {}
    for p, v in stats_flat.items():
      src = stat_keys.get(p)
      if src is not None:
        ours_stat[src] = v
    for name in ref_stats:
      key = name[len("stat_") :]
      if key not in ours_stat:
        report["stats"][key] = _missing(name, arrays[name], "no such running statistic here")
      else:
        report["stats"][key] = _entry(ours_stat[key], arrays[name], limit(name))
  else:
    moved = sorted(
      stat_keys.get(p, "/".join(p))
      for p, v in stats_flat.items()
      if not np.array_equal(v, old_stats.get(p))
    )
    if moved:
      errors.append(
        f"{len(moved)} running statistics change in the training step, the "
        f"reference keeps every BatchNorm in eval mode (fix_bn): {moved[:5]}"
      )

  # -- one optimiser step on the reference gradients ---------------------------------------
  torch_params = {}
  torch_grads = {}
  sampled = {}
  for p, value in _flat(params).items():
    key, transform = param_keys[p]
    w = _TO_TORCH[transform](np.asarray(value, dtype))
    info = ref_params.get(key) or {}
    if f"grad_{key}" in arrays:
      g = np.asarray(arrays[f"grad_{key}"], dtype)
    elif f"grad_{key}__stride" in arrays:
      stride = int(info["stride"])
      w, g = w.reshape(-1)[::stride], np.asarray(arrays[f"grad_{key}__stride"], dtype)
      sampled[key] = stride
    else:
      g = np.zeros_like(w)
    torch_params[p], torch_grads[p] = w, g
  from flax import traverse_util

  p_tree = traverse_util.unflatten_dict(torch_params)
  g_tree = traverse_util.unflatten_dict(torch_grads)

  def one_step(p, g):
    state = _set_schedule_counts(opt.tx.init(p), count)
    updates, _ = opt.tx.update(g, state, p)
    new = optax.apply_updates(p, updates)
    return jax.tree.map(lambda a, b: a - b, new, p)

  deltas = _flat(jax.device_get(jax.jit(one_step)(p_tree, g_tree)))
  ours_delta = {param_keys[p][0]: np.asarray(d) for p, d in deltas.items()}
  for name in sorted(k for k in arrays if k.startswith("delta_")):
    key, _, suffix = name[len("delta_") :].partition("__")
    short = name[len("delta_") :]
    if key not in ours_delta:
      if not np.any(np.asarray(arrays[name])):  # never updated by the reference, absent here
        report["deltas"][short] = _entry(np.zeros_like(arrays[name]), arrays[name], None)
      else:
        report["deltas"][short] = _missing(name, arrays[name], "no such parameter here")
      continue
    d = ours_delta[key]
    if suffix == "stride" and key not in sampled:
      d = d.reshape(-1)[:: int(ref_params[key]["stride"])]
    report["deltas"][short] = _entry(d, arrays[name], limit(name))
  for e in report["deltas"].values():
    if e["scale"] == 0.0 and e["max_abs"] is not None:
      e["passed"] = bool(e["max_abs"] <= zero_abs)

  # -- verdict -------------------------------------------------------------------------
  worst = {}
  passed = not errors
  for cat in ("outputs", "grads", "deltas", "stats"):
    w = 0.0
    for e in report[cat].values():
      passed &= bool(e["passed"])
      if e.get("err") is not None and e.get("limit"):
        w = max(w, e["err"] / e["limit"])
    worst[cat] = w
  if not report["outputs"]:
    passed = False
    errors.append("the fixture holds no out_loss_ arrays: nothing to compare")
  report["worst"] = worst
  report["errors"] = errors
  report["passed"] = bool(passed)
  report["lines"] = _lines(report)
  if verbose:
    print("\n".join(report["lines"]))
  return report


def _lines(report: Mapping[str, Any]) -> list[str]:
  def fmt(v):
    return "nan" if v is None else f"{v:.3e}"

  lines = [
    f"# config {report['config']}, T={report['total_steps']}, "
    f"step count {report['schedule_count']}; trainable tensors: ours "
    f"{report['trainable']['ours']} ({report['trainable']['ours_numel']:,} values), "
    f"reference {report['trainable']['reference']}"
  ]
  for cat in ("outputs", "grads", "deltas", "stats"):
    entries = report[cat]
    if not entries:
      continue
    bad = [k for k, e in entries.items() if not e["passed"]]
    lines.append(
      f"{cat}: {len(entries) - len(bad)}/{len(entries)} within tolerance, worst "
      f"err/limit {report['worst'][cat]:.3f}"
    )
    shown = entries if cat == "outputs" else {k: entries[k] for k in bad[:20]}
    for k, e in shown.items():
      lines.append(
        f"  {k} {fmt(e['max_abs'])} {fmt(e['scale'])} "
        f"{'ok' if e['passed'] else 'FAIL'} (limit {e['limit']}"
        + (f"; {e['error']}" if e.get("error") else "")
        + ")"
      )
  for e in report["errors"]:
    lines.append(f"FAIL {e}")
  return lines


__all__ = ["verify_train_fixture", "no_dropout", "paper_config", "TrainFixtureError"]
