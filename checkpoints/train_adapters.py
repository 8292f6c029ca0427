"""How each model meets the train-step fixtures of its official train script.

One `TrainAdapter` per fixture ``model_class`` (shared/parity/<model>/train/): which
registered model and which paper config (``configs/<method>.py``) it is trained with,
the model fields read from the json, the training episode built from the ``in_``
arrays, and the official loss terms (``out_loss_*``) expressed with the metrics the
model's ``loss_fn`` returns. Everything else (optimiser, frozen mask, step) is the
engine's own code, run by `checkpoints.train_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrainAdapter:
  """Attributes:
  model: registry name.
  config: paper config, ``"<file>.py[:args]"`` under configs/; the fixture's shot is
    appended (``shot=K``).
  losses: {``out_loss_`` name: metric names of ``loss_fn`` summed} (``()`` = exactly 0:
    a term the official script adds as zeros), or a callable (metrics, meta) -> dict.
  model_fields: json -> fields; default: the model's parity adapter's
    (`checkpoints.parity.get`).
  keymap_fields: (json, fields) -> keymap keywords; default: the fields.
  inputs: (arrays, json) -> the training episode; default: the parity adapter's inputs
    plus the training labels (`training_episode`).
  cpu_kernels: XLA:CPU float32 kernels the check runs on by default on an AVX-512 CPU
    ("ynnpack", jax's default, or "xla", its own Eigen kernels): there neither computes
    every model's backward within the fixtures' float32 limits (YNNPACK: PANet's conv4,
    SSP's layer2-3; XLA's: the PSPNet base learner's bin-6 PPM branch, HDMNet-PAHNet's
    1x1 merges at 3 shots). Without AVX-512 (AVX2 + FMA, e.g. AMD Zen 3) the kernels
    round differently: XLA's pass every fixture and YNNPACK's fail Sym-Net's (10x its
    limit), so `cpu_kernels` picks "xla" for every model there.
  """

  model: str
  config: str
  losses: Mapping[str, tuple[str, ...]] | Callable[[Mapping[str, Any], Mapping[str, Any]], dict]
  model_fields: Callable[[Mapping[str, Any]], dict] | None = None
  keymap_fields: Callable[[Mapping[str, Any], dict], dict] | None = None
  inputs: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], dict] | None = None
  cpu_kernels: str = "ynnpack"


@dataclasses.dataclass(frozen=True)
class BoundAdapter:
  """A `TrainAdapter` with its defaults resolved against the registry."""

  model: str
  config_arg: Callable[[Mapping[str, Any]], str]
  model_fields: Callable[[Mapping[str, Any]], dict]
  keymap_fields: Callable[[Mapping[str, Any], dict], dict]
  inputs: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], dict]
  losses: Callable[[Mapping[str, Any], Mapping[str, Any]], dict]


def fixture_shot(meta: Mapping[str, Any]) -> int:
  values = (meta.get("config") or {}).get("values") or {}
  if "shot" in values:
    return int(values["shot"])
  task = (meta.get("config") or {}).get("task") or {}
  if "n_shots" in task:
    return int(task["n_shots"])
  args = (meta.get("config") or {}).get("argparse_defaults") or {}
  return int(args.get("shot", 1))


def training_episode(base: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict:
  """``base`` (an NHWC episode) plus the training labels of the fixture: ``query_mask``
  (``in_query_label``), ``query_base_label`` (``in_query_label_base``), ``class_index``
  (``in_cat_idx``) and ``class_id`` (``in_class_chosen``)."""
  import jax.numpy as jnp

  ep = dict(base)
  for src, dst in (
    ("in_query_label", "query_mask"),
    ("in_query_label_base", "query_base_label"),
    ("in_cat_idx", "class_index"),
    ("in_class_chosen", "class_id"),
  ):
    if src in arrays:
      ep[dst] = jnp.asarray(np.asarray(arrays[src]).astype(np.int32))
  return ep


def _summed(mapping: Mapping[str, tuple[str, ...]]):
  def fn(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
    del meta
    out = {}
    for name, parts in mapping.items():
      if all(p in metrics for p in parts):
        out[name] = float(sum(np.asarray(metrics[p], np.float64) for p in parts)) if parts else 0.0
    return out

  return fn


def _pspnet_inputs(arrays, meta):
  import jax.numpy as jnp

  del meta
  return {
    "image": jnp.asarray(np.transpose(np.asarray(arrays["in_img"], np.float32), (0, 2, 3, 1))),
    "label": jnp.asarray(np.asarray(arrays["in_label"]).astype(np.int32)),
  }


def _pspnet_fields(meta):
  values = (meta.get("config") or {}).get("values") or {}
  shapes = {e["key"]: tuple(e["shape"]) for e in meta["state_dict"]["keys"]}
  return {
    "num_classes": int(values.get("classes", shapes["cls.4.weight"][0])),
    "depth": int(values.get("layers", 50)),
    "frozen": False,
  }


def _ssp_fields(meta):
  args = (meta.get("config") or {}).get("argparse_defaults") or {}
  return {
    "shot": fixture_shot(meta),
    "refine": bool(args.get("refine", False)),
    "depth": int(str(args.get("backbone", "resnet50")).replace("resnet", "") or 50),
  }


def _ssp_inputs(arrays, meta):
  import jax.numpy as jnp

  del meta
  f32 = lambda a: np.asarray(a, np.float32)
  return {
    "query_image": jnp.asarray(np.transpose(f32(arrays["in_query_img"]), (0, 2, 3, 1))),
    "support_images": jnp.asarray(np.transpose(f32(arrays["in_supp_img"]), (0, 1, 3, 4, 2))),
    "support_masks": jnp.asarray(np.asarray(arrays["in_supp_label"]).astype(np.int32)),
    "query_mask": jnp.asarray(np.asarray(arrays["in_query_label"]).astype(np.int32)),
  }


# HDMNet's get_loss accumulates ``distil_loss = distil(stage 0)`` then ``distil_loss +=
# distil(stage i)`` IN PLACE: the tensor the first call returned becomes the sum of the three
# calls, and that is what the fixtures hold as ``part_distil_stage0`` (3 x aux1).
_DISTIL_PARTS = {
  "out_loss_part_distil_stage0": ("distil_stage0", "distil_stage1", "distil_stage2"),
  "out_loss_part_distil_stage1": ("distil_stage1",),
  "out_loss_part_distil_stage2": ("distil_stage2",),
}


# model_class -> adapter (the json's ``model_class`` of the train-step fixtures).
ADAPTERS: dict[str, TrainAdapter] = {
  "models.fewshot.FewShotSeg": TrainAdapter(
    model="panet",
    config="panet.py",
    cpu_kernels="xla",
    losses={
      "out_loss_query": ("seg_loss",),
      "out_loss_align": ("align_loss",),
      "out_loss_total": ("loss",),
      "out_loss_part_align_epi0": ("align_epi0",),
      "out_loss_part_align_epi1": ("align_epi1",),
    },
  ),
  "model.SCCAN.OneModel": TrainAdapter(
    model="sccan",
    config="sccan.py",
    losses={
      "out_loss_main": ("dice",),
      "out_loss_aux1": (),
      "out_loss_aux2": (),
      "out_loss_total": ("loss",),
    },
  ),
  "model.HDMNet.OneModel": TrainAdapter(
    model="hdmnet",
    config="hdmnet.py",
    losses={
      "out_loss_main": ("ce_final", "ce_meta"),
      "out_loss_aux1": ("distil",),
      "out_loss_aux2": ("ce_base",),
      "out_loss_total": ("loss",),
      "out_loss_part_ce_final": ("ce_final",),
      "out_loss_part_ce_meta": ("ce_meta",),
      "out_loss_part_ce_base": ("ce_base",),
      **_DISTIL_PARTS,
    },
  ),
  "SCCAN_PAHNet.model.SCCANPlus.OneModel": TrainAdapter(
    model="sccan_pahnet",
    config="sccan_pahnet.py",
    losses={
      "out_loss_main": ("ce_final",),
      "out_loss_aux1": ("dice_meta",),
      "out_loss_aux2": ("ce_pseudo",),
      "out_loss_total": ("loss",),
      "out_loss_part_ce_final": ("ce_final",),
      "out_loss_part_dice_meta": ("dice_meta",),
      **{f"out_loss_part_ce_pseudo{i}": (f"pseudo{i}",) for i in range(8)},
    },
  ),
  "HDMNet_PAHNet.model.HDMNetPlus.OneModel": TrainAdapter(
    model="hdmnet_pahnet",
    config="hdmnet_pahnet.py",
    losses={
      "out_loss_main": ("ce_final", "ce_meta"),
      "out_loss_aux1": ("distil",),
      "out_loss_aux2": ("ce_base", "ce_pseudo"),
      "out_loss_total": ("loss",),
      "out_loss_part_ce_final": ("ce_final",),
      "out_loss_part_ce_meta": ("ce_meta",),
      "out_loss_part_ce_base": ("ce_base",),
      **{f"out_loss_part_ce_pseudo{i}": (f"pseudo{i}",) for i in range(3)},
      **_DISTIL_PARTS,
    },
  ),
  "model.SymNet.SymNet": TrainAdapter(
    model="symnet",
    config="symnet.py",
    losses={
      "out_loss_main": ("main",),
      "out_loss_aux1": ("aux1",),
      "out_loss_aux2": ("aux2",),
      "out_loss_aux3": ("aux_inner",),
      "out_loss_aux4": ("triplet",),
      "out_loss_total": ("loss",),
      "out_loss_part_ce_final": ("main",),
      "out_loss_part_ce_meta": ("aux1",),
      "out_loss_part_ce_base": ("aux2",),
      **{f"out_loss_part_ce_inner{i}": (f"inner{i}",) for i in range(4)},
    },
  ),
  "model.PSPNet.OneModel": TrainAdapter(
    model="pspnet",
    config="pspnet.py",
    losses={"out_loss_main": ("ce",), "out_loss_total": ("loss",)},
    model_fields=_pspnet_fields,
    keymap_fields=lambda meta, fields: {**fields, "naming": "bam"},
    inputs=_pspnet_inputs,
  ),
  "model.SSP_matching.SSP_MatchingNet": TrainAdapter(
    model="ssp",
    config="ssp.py",
    losses={
      "out_loss_query": ("ce_out1",),
      "out_loss_self": ("ce_self",),
      "out_loss_support": ("ce_support",),
      "out_loss_total": ("loss",),
    },
    model_fields=_ssp_fields,
    inputs=_ssp_inputs,
    cpu_kernels="xla",
  ),
}


def has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this CPU has AVX-512 (``avx512f``); False where /proc/cpuinfo is unreadable."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False


def cpu_kernels(meta: Mapping[str, Any], *, avx512: bool | None = None) -> str:
  """The default XLA:CPU kernels of a train-step fixture's model on this CPU (no jax import).

  ``avx512``: whether the CPU has AVX-512 (default: read from /proc/cpuinfo); the
  kernels' float32 rounding depends on it (`TrainAdapter.cpu_kernels`).
  """
  if not (has_avx512() if avx512 is None else avx512):
    return "xla"
  a = ADAPTERS.get(meta.get("model_class", ""))
  return a.cpu_kernels if a is not None else "ynnpack"


def for_fixture(meta: Mapping[str, Any]) -> BoundAdapter:
  """The bound adapter of a train-step fixture json.

  Raises:
    registry.UnsupportedModelError: no adapter for the json's ``model_class``.
  """
  from checkpoints import parity as parity_lib  # the adapter module loads on lookup
  from fss_jax.models import registry

  model_class = meta.get("model_class", "")
  if model_class not in ADAPTERS:
    raise registry.UnsupportedModelError(
      f"no train-step adapter for {model_class!r} (known: {', '.join(sorted(ADAPTERS))})"
    )
  a = ADAPTERS[model_class]
  registry.get(a.model)  # a clear error for an unknown / unbuilt model
  parity = parity_lib.get(a.model)
  fields = a.model_fields or (parity.model_fields if parity else None)
  if fields is None:
    raise registry.UnsupportedModelError(f"model {a.model} has no fixture fields")
  if a.inputs is not None:
    inputs = a.inputs
  elif parity is not None:
    inputs = lambda arrays, meta: training_episode(parity.inputs(arrays, meta), arrays)
  else:
    raise registry.UnsupportedModelError(f"model {a.model} has no fixture inputs")

  def config_arg(meta):
    base = a.config
    sep = "," if ":" in base else ":"
    return f"{base}{sep}dataset=pascal,fold=0,shot={fixture_shot(meta)}"

  return BoundAdapter(
    model=a.model,
    config_arg=config_arg,
    model_fields=fields,
    keymap_fields=a.keymap_fields or (lambda meta, f: f),
    inputs=inputs,
    losses=a.losses if callable(a.losses) else _summed(a.losses),
  )


__all__ = [
  "TrainAdapter",
  "ADAPTERS",
  "for_fixture",
  "training_episode",
  "fixture_shot",
  "cpu_kernels",
]
