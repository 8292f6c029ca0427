"""PyTorch state dict -> Flax variables, through explicit per-model key maps.

Pure numpy. A key map is a list of `Rule`s; each rule names one source key of
the PyTorch ``state_dict`` (after stripping ``module.`` prefixes), the path of
the Flax variable it becomes (collection first: ``("params", "backbone",
"conv1", "kernel")`` or ``("batch_stats", ..., "mean")``) and how the array is
transformed. `convert` applies a key map and insists that every source key is
used exactly once and every rule finds its key; otherwise it raises
`ConversionError` listing the missing and unexpected keys.

Models build their key maps from the helpers below (`conv`, `bn`, `linear`,
`layer_norm`, `copy`), with a source prefix and a destination path, so a
block's map is written once and reused under different prefixes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

Path = tuple[str, ...]


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _conv_oihw_to_hwio(a: np.ndarray) -> np.ndarray:
  if a.ndim != 4:
    raise ValueError(f"conv weight must be 4-D OIHW, got shape {a.shape}")
  return np.ascontiguousarray(a.transpose(2, 3, 1, 0))


def _linear_transpose(a: np.ndarray) -> np.ndarray:
  if a.ndim != 2:
    raise ValueError(f"linear weight must be 2-D (out, in), got shape {a.shape}")
  return np.ascontiguousarray(a.T)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "copy": _identity,
  "conv": _conv_oihw_to_hwio,
  "linear": _linear_transpose,
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One source key -> one Flax variable."""

  src: str
  dst: Path
  transform: str = "copy"


@dataclasses.dataclass(frozen=True)
class Ignore:
  """A source key that is deliberately not converted (e.g. num_batches_tracked).

  It counts as used when present and is not reported when absent.
  """

  src: str


KeyMap = list  # list[Rule | Ignore]


class ConversionError(ValueError):
  """A state dict does not fit a key map. Lists every mismatch."""

  def __init__(
    self,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    shape_errors: Sequence[str] = (),
    model: str = "",
  ):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.shape_errors = list(shape_errors)
    lines = [f"checkpoint does not match the {model or 'model'} key map:"]

    def _section(title, items):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {k}" for k in items[:50])
        if len(items) > 50:
          lines.append(f"    ... and {len(items) - 50} more")

    _section("missing keys (expected by the model, absent from the checkpoint)", self.missing)
    _section("unexpected keys (in the checkpoint, unknown to the model)", self.unexpected)
    _section("shape mismatches", self.shape_errors)
    super().__init__("\n".join(lines))


def strip_prefixes(
  state_dict: Mapping[str, np.ndarray], prefixes: Iterable[str] = ("module.",)
) -> dict[str, np.ndarray]:
  """Removes DataParallel/DDP prefixes (repeatedly) from every key."""
  prefixes = tuple(prefixes)
  out = {}
  for k, v in state_dict.items():
    changed = True
    while changed:
      changed = False
      for p in prefixes:
        if k.startswith(p):
          k, changed = k[len(p) :], True
    out[k] = v
  return out


def _set(tree: dict, path: Path, value: np.ndarray) -> None:
  node = tree
  for p in path[:-1]:
    node = node.setdefault(p, {})
  if path[-1] in node:
    raise ValueError(f"key map writes {'/'.join(path)} twice")
  node[path[-1]] = value


def convert(
  state_dict: Mapping[str, np.ndarray],
  keymap: KeyMap,
  *,
  model: str = "",
  expected_shapes: Mapping[Path, tuple] | None = None,
) -> dict[str, dict]:
  """Applies `keymap` to a (prefix-stripped) numpy state dict.

  Args:
    state_dict: torch key -> numpy array.
    keymap: list of `Rule` / `Ignore`.
    model: name used in error messages.
    expected_shapes: optional Flax path -> shape; mismatches are reported.

  Returns:
    Flax variables, e.g. ``{"params": {...}, "batch_stats": {...}}``.

  Raises:
    ConversionError: listing missing keys, unexpected keys and shape errors.
  """
  wanted = {}
  for r in keymap:
    if r.src in wanted:
      raise ValueError(f"key map uses source key {r.src!r} twice")
    wanted[r.src] = r
  # An `Ignore` may be absent (e.g. frozen batch norms carry no num_batches_tracked).
  missing = [k for k, r in wanted.items() if k not in state_dict and isinstance(r, Rule)]
  unexpected = [k for k in state_dict if k not in wanted]
  shape_errors = []
  variables: dict[str, dict] = {}
  for src, rule in wanted.items():
    if src not in state_dict or isinstance(rule, Ignore):
      continue
    value = TRANSFORMS[rule.transform](np.asarray(state_dict[src]))
    if expected_shapes is not None and rule.dst in expected_shapes:
      want = tuple(expected_shapes[rule.dst])
      if tuple(value.shape) != want:
        shape_errors.append(
          f"{src} -> {'/'.join(rule.dst)}: got {tuple(value.shape)}, model expects {want}"
        )
        continue
    _set(variables, rule.dst, value)
  if missing or unexpected or shape_errors:
    raise ConversionError(missing, unexpected, shape_errors, model=model)
  return variables


# ---------------------------------------------------------------------------
# Helpers that build rules for common PyTorch modules.
# `src` is the module's key prefix ("layer1.0.conv1"), `dst` the Flax module
# path without collection (("backbone", "layer1_0", "conv1")).
# ---------------------------------------------------------------------------


def conv(src: str, dst: Path, bias: bool = True) -> list:
  rules = [Rule(f"{src}.weight", ("params", *dst, "kernel"), "conv")]
  if bias:
    rules.append(Rule(f"{src}.bias", ("params", *dst, "bias")))
  return rules


def linear(src: str, dst: Path, bias: bool = True) -> list:
  rules = [Rule(f"{src}.weight", ("params", *dst, "kernel"), "linear")]
  if bias:
    rules.append(Rule(f"{src}.bias", ("params", *dst, "bias")))
  return rules


def bn(src: str, dst: Path, num_batches_tracked: bool = True) -> list:
  """BatchNorm2d -> flax BatchNorm (scale/bias params, mean/var batch_stats)."""
  rules: list[Rule | Ignore] = [
    Rule(f"{src}.weight", ("params", *dst, "scale")),
    Rule(f"{src}.bias", ("params", *dst, "bias")),
    Rule(f"{src}.running_mean", ("batch_stats", *dst, "mean")),
    Rule(f"{src}.running_var", ("batch_stats", *dst, "var")),
  ]
  if num_batches_tracked:
    rules.append(Ignore(f"{src}.num_batches_tracked"))
  return rules


def layer_norm(src: str, dst: Path) -> list:
  return [
    Rule(f"{src}.weight", ("params", *dst, "scale")),
    Rule(f"{src}.bias", ("params", *dst, "bias")),
  ]


def copy(src: str, dst: Path) -> list:
  """A raw tensor (learnable scalar, embedding table...) copied unchanged."""
  return [Rule(src, ("params", *dst))]


def prefixed(prefix: str, rules: Iterable) -> list:
  """Prepends a source prefix (e.g. "backbone.body.") to every rule."""
  out = []
  for r in rules:
    out.append(dataclasses.replace(r, src=prefix + r.src))
  return out
