"""Parity fixtures: load them and rebuild their weights (shared/parity/README.md).

A fixture is ``<name>.npz`` (inputs ``in_*``, outputs ``out_*``, intermediates
``mid_*``) + ``<name>.json`` (metadata). No weight file is shipped: every
state-dict entry is re-created from its key with a fixed rule, in float32
arithmetic with float32 constants, and validated against the per-key
``check = [float64 sum, first value]`` stored in the json.
"""

from __future__ import annotations

import json
import math
import pathlib
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints import io as ckpt_io


class FixtureError(ValueError):
  """A fixture cannot be read or its weights do not regenerate to the checks."""


def _rule_value(rule: str, n: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  f32 = np.float32
  if rule == "conv":
    return n * f32(math.sqrt(2.0 / (shape[1] * shape[2] * shape[3])))
  if rule == "linear":
    return n * f32(math.sqrt(1.0 / shape[1]))
  if rule == "other_nd":
    return n * f32(0.02)
  if rule == "bias":
    return n * f32(0.01)
  if rule == "norm_weight":
    return f32(1) + f32(0.1) * n
  if rule in ("norm_bias", "running_mean"):
    return f32(0.1) * n
  if rule == "running_var":
    return f32(1) + f32(0.1) * np.abs(n)
  raise FixtureError(f"unknown weight rule {rule!r}")


def _check_ok(value: np.ndarray, check) -> bool:
  total = float(value.astype(np.float64).sum())
  if not abs(total - check[0]) <= 1e-6 * max(1.0, abs(check[0])):
    return False
  if value.size and len(check) > 1:
    first = float(value.reshape(-1)[0])
    if not abs(first - check[1]) <= 1e-6 * max(1.0, abs(check[1])):
      return False
  return True


def regenerate(meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Rebuilds the reference state dict of a fixture json, in the stored key order.

  Args:
    meta: the fixture json (needs ``GLOBAL_SEED``, ``state_dict.keys`` with
      key/shape/rule[/dtype/check], and ``overrides`` for rule "override").

  Returns:
    {torch key: numpy array} (float32; num_batches_tracked int64 scalars).

  Raises:
    FixtureError: unknown rule, missing override, or a regenerated tensor whose
      float64 sum / first value differ from its ``check`` (lists every key).
  """
  try:
    g = int(meta["GLOBAL_SEED"])
    entries = meta["state_dict"]["keys"]
  except (KeyError, TypeError) as e:
    raise FixtureError(f"fixture json lacks {e} (needs GLOBAL_SEED and state_dict.keys)") from None
  overrides = meta.get("overrides") or {}
  out: dict[str, np.ndarray] = {}
  bad = []
  for e in entries:
    key, shape, rule = e["key"], tuple(int(s) for s in e["shape"]), e["rule"]
    if rule == "num_batches_tracked":
      v = np.zeros(shape, np.int64)
    elif rule == "override":
      if key not in overrides:
        raise FixtureError(f"key {key!r} has rule 'override' but no entry in 'overrides'")
      o = overrides[key]
      v = np.asarray(o["value"], dtype=o.get("dtype", e.get("dtype", "float32"))).reshape(shape)
    else:
      seed = zlib.crc32(key.encode("utf-8")) ^ g
      n = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
      v = _rule_value(rule, n, shape)
      dtype = e.get("dtype", "float32")
      if dtype != "float32":
        v = v.astype(dtype)
    if "check" in e and not _check_ok(v, e["check"]):
      bad.append(
        f"{key} (rule {rule}): sum {float(v.astype(np.float64).sum())!r}, "
        f"first {float(v.reshape(-1)[0]) if v.size else None!r}; json check {e['check']}"
      )
    out[key] = v
  if bad:
    listed = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    raise FixtureError(
      f"regenerated weights do not match the fixture's check values for {len(bad)} of "
      f"{len(entries)} keys (wrong GLOBAL_SEED, edited json, or a numpy whose "
      f"default_rng differs):\n  {listed}"
    )
  return out


def load_fixture(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
  """Reads ``X.npz`` and the ``X.json`` beside it -> (arrays, meta).

  Raises:
    FileNotFoundError: either file is missing.
    FixtureError: the npz is truncated/corrupt or the json is not valid JSON.
  """
  path = pathlib.Path(path)
  if path.suffix == ".json":
    path = path.with_suffix(".npz")
  json_path = path.with_suffix(".json")
  if not path.is_file():
    raise FileNotFoundError(f"fixture {path} not found")
  if not json_path.is_file():
    raise FileNotFoundError(
      f"fixture metadata {json_path} not found (it must sit beside {path.name})"
    )
  try:
    arrays = ckpt_io.read_npz(path)
  except ValueError as e:
    raise FixtureError(str(e)) from None
  try:
    meta = json.loads(json_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FixtureError(f"{json_path}: not valid JSON ({e})") from None
  return arrays, meta
