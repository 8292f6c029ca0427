"""Optimisers and learning-rate schedules of the reference methods, built from a config.

One config (``config.optim``) describes every recipe of the references:

* PANet: SGD, momentum 0.9, weight decay 5e-4, lr 1e-3 ×0.1 at 10k / 20k iterations.
* PFENet / BAM / SCCAN: SGD + momentum with PyTorch's *coupled* weight decay,
  poly(0.9) decay per iteration, optional PFENet warm-up, 10× lr on head groups.
* SCCAN: a second optimiser (AdamW, constant lr) for every ``.*transformer.*`` tensor.
* HDMNet: AdamW with poly(0.9) decay and 10× lr groups.

Parameters are addressed by their '/'-joined path in the ``params`` tree
(``backbone/layer1_0/conv1/kernel``) and patterns are ``re.fullmatch``-ed. Each
parameter gets exactly one label, first match wins:

1. ``frozen`` (ModelSpec.frozen + config.optim.frozen) -> zero update
   (``optax.set_to_zero``, no optimiser state);
2. ``config.optim.groups.<name>.pattern`` in insertion order -> that group's
   optimiser (fields not set in the group are inherited from ``config.optim``,
   except ``lr_mults``);
3. otherwise the default optimiser of ``config.optim``.

Inside a group, ``lr_mults = ((regex, multiplier), ...)`` scales the learning rate
of matching parameters (first match wins), like the PyTorch param groups whose
lr is ``base_lr * 10``. All labels are combined with ``optax.multi_transform``.

PyTorch semantics matched here (checked against torch in tests/test_optim.py):

* ``torch.optim.SGD(weight_decay=wd, momentum=m)``: ``d = g + wd * p``;
  ``buf = m * buf + d`` (``buf = d`` at the first step); ``p -= lr * buf``. That is
  ``add_decayed_weights -> trace -> scale(-lr)``; the lr is applied after the
  momentum, so a changing lr does not rescale the stored buffer.
* ``torch.optim.AdamW``: ``p *= 1 - lr * wd`` then the Adam step, which equals
  ``optax.adamw`` (``-lr * (adam + wd * p)``), eps outside the square root.
* Schedules count optimiser steps ``count = 0, 1, ...`` (optax) while the
  references count iterations ``t = count + 1`` set before each step (poly,
  warm-up) or step a ``MultiStepLR`` after each step (multistep: factor
  ``gamma ** #(milestones <= count)``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Schedule = Callable[[jax.Array | int], jax.Array]

FROZEN = "frozen"
DEFAULT = "default"
_GROUP_ONLY = ("pattern", "lr_mults")
_OPTIMIZERS = ("sgd", "adamw", "adam")
_SCHEDULES = ("constant", "poly", "multistep", "cosine")


def param_paths(params: Any) -> list[str]:
  """'/'-joined paths of every leaf of a params tree, in flatten order."""
  flat = traverse_util.flatten_dict(_to_dict(params), sep="/")
  return list(flat)


def _to_dict(tree: Any) -> Any:
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  return tree


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _as_dict(cfg: Any) -> dict:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


def make_schedule(
  *,
  lr: float,
  schedule: str = "constant",
  total_steps: int | None = None,
  power: float = 0.9,
  milestones: Sequence[int] = (),
  gamma: float = 0.1,
  warmup_steps: int = 0,
  **unused,
) -> Schedule:
  """Learning rate as a function of the optax step count (0 for the first update).

  Args:
    lr: base learning rate (already multiplied by a group's lr multiplier).
    schedule: "constant"; "poly": ``lr * (1 - t / T) ** power`` with t = count + 1
      (PFENet's ``poly_learning_rate``, set before each iteration t = 1..T);
      "multistep": ``lr * gamma ** #(milestones <= count)`` (torch MultiStepLR
      stepped after every iteration); "cosine": ``lr * (1 + cos(pi * count / T)) / 2``.
    total_steps: T, needed by poly and cosine.
    power, milestones, gamma: schedule parameters.
    warmup_steps: PFENet/SCCAN warm-up: for t = count + 1 < warmup_steps the lr is
      ``lr * (0.1 + 0.9 * t / warmup_steps)`` (replacing the schedule's value).
  """
  # Hand-written, not optax.polynomial / piecewise_constant / cosine_decay / linear + join
  # schedules, which differ in float32 (optax value first; jitted, counts 0..T+5; the train-step
  # fixtures check the lr).
  # poly: 1 - t/T instead of (T - t)/T, lr 0.0025, T 30000: 0.0024991748 vs 0.002499175 at
  # count 10, NaN vs 0.0 at count T - 1; multistep, PANet's 1e-3 x 0.1 at 10k / 20k:
  # 1.0000001e-05 vs 1.0000002e-05 from count 20000; cosine, lr 0.1, T 30000: 4950 counts
  # differ, up to 6553 ulp (count 29865); warm-up, lr 0.01, 7 steps: 0.0022857143 vs
  # 0.0022857145 at count 0.
  del unused
  if schedule not in _SCHEDULES:
    raise ValueError(f"unknown lr schedule {schedule!r}; use one of {', '.join(_SCHEDULES)}")
  if schedule in ("poly", "cosine") and not total_steps:
    raise ValueError(f"schedule {schedule!r} needs total_steps > 0 (config.total_steps)")
  lr = float(lr)
  bounds = jnp.asarray(sorted(int(m) for m in milestones) or [2**31 - 1], jnp.int32)

  def fn(count):
    count = jnp.asarray(count, jnp.int32)
    t = (count + 1).astype(jnp.float32)
    if schedule == "constant":
      value = jnp.full((), lr, jnp.float32)
    elif schedule == "poly":
      # (T - t) / T, not 1 - t / T: the integer difference is exact, so the last
      # iterations keep float32 precision (1 - t/T loses ~3 digits near t = T).
      remaining = jnp.maximum(total_steps - (count + 1), 0).astype(jnp.float32)
      frac = jnp.clip(remaining / float(total_steps), 0.0, 1.0)
      value = lr * frac**power
    elif schedule == "multistep":
      n = jnp.sum(count >= bounds)
      value = lr * jnp.asarray(gamma, jnp.float32) ** n
    else:  # cosine
      frac = jnp.clip(count.astype(jnp.float32) / float(total_steps), 0.0, 1.0)
      value = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if warmup_steps and warmup_steps > 0:
      warm = lr * (0.1 + 0.9 * t / float(warmup_steps))
      value = jnp.where(t < warmup_steps, warm, value)
    return value.astype(jnp.float32)

  return fn


# ---------------------------------------------------------------------------
# Single optimisers
# ---------------------------------------------------------------------------


def make_single(
  *,
  optimizer: str,
  schedule_fn: Schedule,
  weight_decay: float = 0.0,
  momentum: float = 0.0,
  nesterov: bool = False,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  **unused,
) -> optax.GradientTransformation:
  """One optimiser with PyTorch semantics (see the module docstring)."""
  del unused
  if optimizer == "sgd":
    parts = []
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))  # torch: coupled L2 before momentum
    if momentum:
      parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(schedule_fn))
    return optax.chain(*parts)
  if optimizer == "adamw":
    return optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if optimizer == "adam":  # torch Adam: coupled L2 added to the gradient
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.scale_by_learning_rate(schedule_fn)]
    return optax.chain(*parts)
  raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(_OPTIMIZERS)}")


# ---------------------------------------------------------------------------
# The config-driven builder
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Optimizer:
  """What `build` returns.

  Attributes:
    tx: the optax transformation over the whole params tree.
    labels: params-shaped tree of label strings ("frozen", "default", "default*10", ...).
    trainable: params-shaped tree of bools (False where frozen); the train step
      stops gradients there so that XLA skips their backward pass.
    schedules: label -> lr schedule (for logging: ``schedules[l](step)``).
    summary: label -> number of parameter tensors, for a log line.
    hparams: label -> the optimiser of that label and its hyper-parameters
      (``optimizer, lr`` (base x multiplier), ``weight_decay, momentum, nesterov, b1, b2,
      eps``), as built (frozen excluded).
  """

  tx: optax.GradientTransformation
  labels: Any
  trainable: Any
  schedules: dict[str, Schedule]
  summary: dict[str, int]
  hparams: dict[str, dict] = dataclasses.field(default_factory=dict)

  def learning_rates(self, step: int) -> dict[str, float]:
    """{label: lr} at optimiser step ``step`` (frozen excluded)."""
    return {k: float(fn(step)) for k, fn in self.schedules.items()}


def _match_first(path: str, patterns: Sequence[tuple[str, Any]]) -> tuple[int, Any] | None:
  for i, (pattern, value) in enumerate(patterns):
    if re.fullmatch(pattern, path):
      return i, value
  return None


def _unmatched_error(kind: str, pattern: str, paths: Sequence[str]) -> ValueError:
  tops = sorted({p.split("/")[0] for p in paths})
  example = ", ".join(paths[:5])
  return ValueError(
    f"{kind} pattern {pattern!r} matches no parameter (patterns are re.fullmatch-ed against "
    f"'/'-joined paths, e.g. {example}; top-level modules: {', '.join(tops)}). "
    f"Fix the pattern or remove it."
  )


def _format_mult(m: float) -> str:
  return f"{m:g}"


def build(
  optim_cfg: Any, params: Any, *, total_steps: int | None = None, frozen: Sequence[str] = ()
) -> Optimizer:
  """Builds the optimiser for ``params`` from ``config.optim``.

  Args:
    optim_cfg: ConfigDict / mapping with ``optimizer, lr, schedule, momentum,
      nesterov, weight_decay, b1, b2, eps, power, milestones, gamma,
      warmup_steps, lr_mults, frozen, groups, grad_clip_norm``.
    params: the params tree (arrays or ShapeDtypeStructs; only paths are used).
    total_steps: T for poly/cosine schedules (defaults to ``optim_cfg.total_steps``).
    frozen: extra frozen patterns (the model's ``ModelSpec.frozen``).

  Returns:
    An `Optimizer`.

  Raises:
    ValueError: unknown optimizer/schedule or a pattern that matches nothing.
  """
  base = _as_dict(optim_cfg)
  groups_cfg = base.pop("groups", None) or {}
  frozen_patterns = list(frozen) + list(base.pop("frozen", None) or ())
  clip = float(base.pop("grad_clip_norm", 0.0) or 0.0)
  if total_steps is None:
    total_steps = base.get("total_steps")
  base["total_steps"] = total_steps

  group_cfgs: dict[str, dict] = {DEFAULT: base}
  group_patterns: list[tuple[str, str]] = []
  for name, g in _as_dict(groups_cfg).items():
    g = dict(g)
    if not g.get("pattern"):
      raise ValueError(f"config.optim.groups.{name} needs a 'pattern' (regex over parameter paths)")
    merged = {k: v for k, v in base.items() if k not in _GROUP_ONLY}
    merged.update(g)
    group_cfgs[name] = merged
    group_patterns.append((g["pattern"], name))

  flat = traverse_util.flatten_dict(_to_dict(params), sep="/")
  paths = list(flat)
  used_frozen: set[int] = set()
  used_groups: set[int] = set()
  used_mults: dict[str, set[int]] = {}
  label_of: dict[str, str] = {}
  for path in paths:
    hit = _match_first(path, [(p, None) for p in frozen_patterns])
    if hit is not None:
      used_frozen.add(hit[0])
      label_of[path] = FROZEN
      continue
    hit = _match_first(path, group_patterns)
    group = DEFAULT
    if hit is not None:
      used_groups.add(hit[0])
      group = hit[1]
    mults = [(p, float(m)) for p, m in (group_cfgs[group].get("lr_mults") or ())]
    mhit = _match_first(path, mults)
    label = group
    if mhit is not None:
      used_mults.setdefault(group, set()).add(mhit[0])
      if mhit[1] != 1.0:
        label = f"{group}*{_format_mult(mhit[1])}"
    label_of[path] = label

  for i, p in enumerate(frozen_patterns):
    if i not in used_frozen:
      raise _unmatched_error("frozen", p, paths)
  for i, (p, name) in enumerate(group_patterns):
    if i not in used_groups:
      raise _unmatched_error(f"config.optim.groups.{name}", p, paths)
  for group, cfg in group_cfgs.items():
    for i, (p, _) in enumerate(cfg.get("lr_mults") or ()):
      if i not in used_mults.get(group, set()):
        where = "config.optim" if group == DEFAULT else f"config.optim.groups.{group}"
        raise _unmatched_error(f"{where}.lr_mults", p, paths)

  transforms: dict[str, optax.GradientTransformation] = {}
  schedules: dict[str, Schedule] = {}
  summary: dict[str, int] = {}
  hparams: dict[str, dict] = {}
  for label in label_of.values():
    summary[label] = summary.get(label, 0) + 1
    if label in transforms:
      continue
    if label == FROZEN:
      transforms[label] = optax.set_to_zero()
      continue
    group, _, mult = label.partition("*")
    cfg = dict(group_cfgs[group])
    where = "config.optim.lr" if group == DEFAULT else f"config.optim.groups.{group}.lr"
    if not (math.isfinite(float(cfg["lr"])) and float(cfg["lr"]) > 0):
      raise ValueError(
        f"{where} must be a positive finite number, got {cfg['lr']!r} (a negative "
        f"lr trains by gradient ascent; freeze parameters with config.optim.frozen)"
      )
    cfg["lr"] = float(cfg["lr"]) * (float(mult) if mult else 1.0)
    fn = make_schedule(**cfg)
    schedules[label] = fn
    hparams[label] = {
      k: cfg.get(k, d)
      for k, d in (
        ("optimizer", "sgd"),
        ("lr", 0.0),
        ("weight_decay", 0.0),
        ("momentum", 0.0),
        ("nesterov", False),
        ("b1", 0.9),
        ("b2", 0.999),
        ("eps", 1e-8),
      )
    }
    transforms[label] = make_single(schedule_fn=fn, **cfg)

  labels = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in label_of.items()})
  trainable = jax.tree.map(lambda l: l != FROZEN, labels)
  tx = optax.multi_transform(transforms, labels)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return Optimizer(
    tx=tx, labels=labels, trainable=trainable, schedules=schedules, summary=summary, hparams=hparams
  )


__all__ = ["Optimizer", "build", "make_schedule", "make_single", "param_paths", "FROZEN", "DEFAULT"]
