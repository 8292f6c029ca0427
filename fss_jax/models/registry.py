"""Model registry: name -> (module factory, loss, key map, training and evaluation facts).

Every method module (``fss_jax/models/<name>.py``) defines a module-level
``SPEC = ModelSpec(...)``. The registry imports it lazily, so importing the
registry never pulls in every model.

Contracts (see docs/DESIGN.md):
* ``make_model(**fields) -> flax.linen.Module`` whose ``__call__(episode, *,
  train: bool) -> dict`` returns at least ``logits [B, h, w, C]``.
* ``loss_fn(outputs, episode) -> (scalar loss, dict of scalar metrics)``.
* ``keymap(**fields) -> list[Rule | Ignore]`` (fss_jax.keymaps) mapping the
  official PyTorch state dict to the Flax variables of ``make_model(**fields)``.

How a model meets the official code's parity fixtures is no concern of the library: the
adapters live in ``checkpoints/parity`` (looked up by registry name).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# name -> module path. A name may be registered before its module exists; then
# `get` says it is not supported yet.
_MODULES: dict[str, str] = {
  "panet": "fss_jax.models.panet",
  "sccan": "fss_jax.models.sccan",
  "pspnet": "fss_jax.models.pspnet",
  "hdmnet": "fss_jax.models.hdmnet",
  "ssp": "fss_jax.models.ssp",
  "sccan_pahnet": "fss_jax.models.pahnet",
  "hdmnet_pahnet": "fss_jax.models.pahnet",
  "jc2a": "fss_jax.models.jc2a",
  "symnet": "fss_jax.models.symnet",
  # Backbones alone (ImageNet weight conversion; checkpoints/parity runs their fixtures).
  "resnet_torchvision": "fss_jax.models.backbones",
  "resnet_deep_stem": "fss_jax.models.backbones",
  "resnet_sccan": "fss_jax.models.backbones",
  "pspnet_backbone": "fss_jax.models.pspnet",
  "vgg16_panet": "fss_jax.models.backbones",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  make_model: Callable[..., Any]
  keymap: Callable[..., list]
  loss_fn: Callable | None = None
  # Parameter-path regexes frozen during training (optax-masked).
  frozen: tuple[str, ...] = ()
  # Optional (**fields) -> parameter-path regexes of tensors that exist (official
  # checkpoints hold them) but never reach the loss: the engine keeps them out of the
  # optimiser, as torch skips a parameter whose .grad stays None (no weight decay, no
  # AdamW step). See `frozen_patterns`.
  unused: Callable[..., tuple[str, ...]] | None = None
  # Optional (state_dict, *, source: str, **fields) -> None that raises a
  # ValueError saying what a checkpoint is (other depth, shot count, dataset)
  # when it does not fit the model asked for; the converter calls it first.
  check_checkpoint: Callable[..., None] | None = None
  # The smallest input side (pixels, square) the model is built for: below it the coarsest
  # feature map or a fixed-size operation on it (pyramid bins, a top-k over positions) has no
  # real pixels to work on. An int, or (**fields) -> int when the fields decide it. Config
  # validation refuses smaller ``data.train_size`` / ``data.test_size``. None: undeclared
  # (test-only models); every registered model declares it.
  min_input_size: int | Callable[..., int] | None = None
  # What ``outputs["logits"]`` holds: "logits" (a softmax gives the class probabilities) or
  # "probabilities" (already probability-like, e.g. BAM's ensemble of the meta and base
  # learners: argmax as usual, no second softmax). Recorded in checkpoints (``output``) for
  # readers without the code; `fss_jax.predict` uses this declaration (the code that runs)
  # for the confidence and the foreground probability map.
  output: str = "logits"
  # The forward reads the episode's ``class_id`` (Sym-Net: the class's word embedding), so
  # predicting needs the support's class, by name or id (`fss_jax.predict`).
  class_conditioned: bool = False
  # Evaluation at another support / way count than training (``config.eval.shot`` /
  # ``config.eval.way``; docs/protocols.md). ``any_shot``: the K supports are fused by a rule
  # without K-dependent parameters, so a model trained at one K evaluates at every K >= 1;
  # False: only at the K it was trained with (e.g. a learned K x K shot-weighting layer).
  # ``shot_field`` / ``way_field``: the model field that holds K / N ("" when the model takes
  # it from the episode's shapes), set to the evaluation value when it differs from training.
  any_shot: bool = False
  any_way: bool = False
  shot_field: str = "shot"
  way_field: str = ""
  # Optional (config) -> {'/'-joined params path: array}: parameters computed from the training
  # data (JC²A's base-class prototypes FP_base), set when a training run starts from scratch
  # (or from config.init) and then carried by every checkpoint, so evaluation and prediction
  # never recompute or read them. Declare them frozen (``frozen``) so the optimiser never
  # changes them.
  # Named "module:function" (resolved by the loop, `derived_params_fn`): computing them reads
  # the dataset, which is train-layer work the model layer must not import.
  derived_params: str | None = None
  # Optional (**fields) -> `fss_jax.models.frozen.FrozenEncoder`: the part of the model that
  # sees one image at a time, run alone so that evaluation encodes each test image once
  # (`fss_jax.eval.cached`); the model's forward then reads ``episode["query_features"]`` /
  # ``["support_features"]`` in its place. None: evaluation runs the whole forward per
  # episode (`encoder_missing` says why).
  encoder: Callable[..., Any] | None = None
  encoder_missing: str = "the model declares no frozen encoder"

  def derived_params_fn(self) -> Callable[[Any], Mapping[str, np.ndarray]] | None:
    """The function `derived_params` names, imported now (None when the model has none)."""
    if not self.derived_params:
      return None
    module, _, name = self.derived_params.partition(":")
    return getattr(importlib.import_module(module), name)

  def eval_shots(self, train_shot: int) -> tuple[int, ...] | None:
    """The K this model evaluates at when trained with ``train_shot``: None for any K >= 1."""
    return None if self.any_shot else (int(train_shot),)

  def eval_ways(self, train_way: int) -> tuple[int, ...] | None:
    """The N-way episodes this model evaluates when trained with ``train_way``: None for any."""
    return None if self.any_way else (int(train_way),)

  def min_size(self, fields: Mapping[str, Any] | None = None) -> int | None:
    """`min_input_size` of a model built with ``fields``."""
    m = self.min_input_size
    return int(m(**dict(fields or {}))) if callable(m) else m

  def frozen_patterns(self, fields: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Every parameter-path regex the optimiser must leave unchanged for a model built
    with ``fields``: ``frozen`` plus ``unused(**fields)``."""
    extra = self.unused(**dict(fields or {})) if self.unused is not None else ()
    return tuple(self.frozen) + tuple(extra)


class UnsupportedModelError(ValueError):
  pass


def names() -> list[str]:
  return sorted(_MODULES)


def get(name: str) -> ModelSpec:
  """Returns the ModelSpec of `name`; clear errors for unknown / unbuilt models."""
  if name not in _MODULES:
    close = difflib.get_close_matches(name, _MODULES, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnsupportedModelError(f"unknown model {name!r}{hint}; known: {', '.join(names())}")
  try:
    module = importlib.import_module(_MODULES[name])
  except ModuleNotFoundError as e:
    if e.name and _MODULES[name].startswith(e.name):
      raise UnsupportedModelError(f"model {name} is not supported yet") from None
    raise
  specs = getattr(module, "SPECS", None) or {module.SPEC.name: module.SPEC}
  if name not in specs:
    raise UnsupportedModelError(f"model {name} is not supported yet")
  return specs[name]
