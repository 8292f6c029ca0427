"""Parity adapters: how `checkpoints.verify` runs a forward fixture of the official code.

A forward fixture (``shared/parity/<model>/<name>.{npz,json}``) holds the official PyTorch
model's inputs (``in_*``, NCHW), outputs (``out_*``) and intermediates (``mid_*``, NCHW /
NC / token layouts, ``__chmean`` channel means, ``__c<n>`` first channels). One
`ParityAdapter` per registered model says how to build that model from the json, feed it
the ``in_`` arrays (NHWC), and lay its outputs out as the fixture does. The library
(`fss_jax`) knows nothing of fixtures: the adapters live here, one module per model
(`checkpoints.parity.<model>`, each with ``ADAPTERS = {registry name: ParityAdapter}``), the
shared layout helpers in `checkpoints.parity.common`.

This module imports neither jax nor the adapter modules: `get` / `for_fixture` import them
when asked, so `checkpoints.verify` can set XLA flags before jax starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# registry name -> adapter module; one module may hold several adapters.
_MODULES: dict[str, str] = {
  "panet": "checkpoints.parity.panet",
  "sccan": "checkpoints.parity.sccan",
  "hdmnet": "checkpoints.parity.hdmnet",
  "sccan_pahnet": "checkpoints.parity.pahnet",
  "hdmnet_pahnet": "checkpoints.parity.pahnet",
  "symnet": "checkpoints.parity.symnet",
  "pspnet_backbone": "checkpoints.parity.pspnet",
  "resnet_torchvision": "checkpoints.parity.backbones",
  "resnet_sccan": "checkpoints.parity.backbones",
}


@dataclasses.dataclass(frozen=True)
class ParityAdapter:
  """How `checkpoints.verify` runs a fixture of the official code.

  Attributes:
    model: registry name of the model run (`fss_jax.models.registry.get`).
    model_classes: values of the fixture json's ``model_class`` handled here.
    model_fields: fixture json -> keyword fields for ``make_model``/``keymap``
      (shots, ways, sizes... read from the json, nothing hard-coded).
    inputs: (npz arrays, fixture json) -> the model's input (an Episode dict,
      or whatever ``apply`` expects), NHWC.
    outputs: (model outputs, fixture json) -> {"out_...": array, "mid_...":
      array} in the fixture's (PyTorch) layout. ``out_`` names are compared for
      pass/fail; ``mid_`` names are reported to locate a mismatch.
    apply: optional (module, variables, inputs) -> outputs; defaults to
      ``module.apply(variables, inputs, train=False)``.
    logit_outputs: ``out_`` names whose class axis (axis 1, NCHW) is compared
      by argmax agreement.
    tolerances: ``out_`` name -> absolute tolerance overriding the default
      1e-4 * max(1, max|ref|) (the fixture's tolerance_suggestion).
  """

  model: str
  model_classes: tuple[str, ...]
  model_fields: Callable[[Mapping[str, Any]], dict]
  inputs: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], Any]
  outputs: Callable[[Any, Mapping[str, Any]], dict]
  apply: Callable | None = None
  logit_outputs: tuple[str, ...] = ()
  tolerances: Mapping[str, float] = dataclasses.field(default_factory=dict)


def names() -> list[str]:
  """Registry names that have a parity adapter."""
  return sorted(_MODULES)


def get(model: str) -> ParityAdapter | None:
  """The parity adapter of a registered model, None when it has none."""
  if model not in _MODULES:
    return None
  return importlib.import_module(_MODULES[model]).ADAPTERS[model]


def for_fixture(meta: Mapping[str, Any]) -> ParityAdapter:
  """The adapter whose ``model_classes`` hold the fixture json's ``model_class``.

  An adapter module that fails to import (a missing optional dependency, work in
  progress) does not prevent finding the others; it is named in the error when no
  adapter handles the fixture.

  Raises:
    registry.UnsupportedModelError: no adapter handles the fixture.
  """
  from fss_jax.models.registry import UnsupportedModelError

  model_class = meta.get("model_class", "")
  broken = []
  for name in _MODULES:
    try:
      adapter = get(name)
    except Exception as e:  # reported below
      broken.append(f"{name}: {type(e).__name__}: {e}")
      continue
    if adapter is not None and model_class in adapter.model_classes:
      return adapter
  label = meta.get("fixture") or model_class
  hint = f" (modules that failed to import: {'; '.join(broken)})" if broken else ""
  raise UnsupportedModelError(f"model {label} ({model_class}) is not supported yet{hint}")


__all__ = ["ParityAdapter", "names", "get", "for_fixture"]
