"""Parity check of a Flax model against a fixture of the official PyTorch code.

  python -m checkpoints.verify --fixture X.npz [--json OUT] [--compute-dtype bfloat16]

1. reads ``X.npz`` + ``X.json``; 2. rebuilds the reference weights from the
json (`checkpoints.fixtures.regenerate`, every key's check verified);
3. finds the parity adapter that handles the json's ``model_class``
(`checkpoints.parity.for_fixture`) and its registered model; 4. fields =
``adapter.model_fields(meta)`` (shots, sizes... from the json); 5. converts the
weights with the model's key map;
6. runs the model in float32 under ``jax.default_matmul_precision("highest")``;
7. prints ``name max_abs scale`` per ``out_`` array (and the ``mid_`` arrays
the adapter returns, marked informational) and optionally writes OUT as::

  {"fixture": str, "model": str,
   "outputs": {"out_x": {"max_abs": float, "scale": float, "argmax_agree": float|null}},
   "passed": bool}

(plus "intermediates" with the same fields for ``mid_`` arrays). scale =
max|reference|; argmax_agree = fraction of positions whose argmax over the
class axis (axis 1, NCHW / NC) agrees, for the adapter's logit outputs. An
output passes when max_abs <= 1e-4 * max(1, scale), or the adapter's
tolerance for it.

``--compute-dtype bfloat16`` runs the model under the mixed-precision policy of
`fss_jax.train.precision` (bf16 inputs and compute, float32 parameters) and
reports the drift from the float32 reference instead of judging it: every
entry gains ``rel`` = max_abs / max(1, scale), and the run passes when all
outputs are finite and have the reference's shapes.

A train-step fixture (json ``kind: "train_step"``) is checked by
`checkpoints.train_step`: one training step of the engine (the model's paper config,
loss, frozen mask and optimiser) against the official train script; its report has
``outputs`` (loss terms), ``grads``, ``deltas``, ``stats``, ``trainable``, ``hparams``
and ``schedule`` (see that module).

Exit status: 0 passed, 1 a mismatch, 2 bad input (missing/corrupt fixture,
unsupported model, weights that do not fit the key map).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints import fixtures

DEFAULT_RTOL = 1e-4


def _compare(pred, ref, logit: bool) -> dict[str, Any]:
  pred = np.asarray(pred)
  ref = np.asarray(ref)
  scale = float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 0.0
  if pred.shape != ref.shape:
    return {
      "max_abs": None,
      "scale": scale,
      "argmax_agree": None,
      "error": f"shape {tuple(pred.shape)} != reference {tuple(ref.shape)}",
    }
  diff = np.abs(pred.astype(np.float64) - ref.astype(np.float64))
  max_abs = float(np.max(diff)) if diff.size else 0.0
  agree = None
  if logit and ref.ndim >= 2:
    agree = float(np.mean(np.argmax(pred, axis=1) == np.argmax(ref, axis=1)))
  return {"max_abs": max_abs, "scale": scale, "argmax_agree": agree}


def _fmt(v) -> str:
  return "nan" if v is None else f"{v:.3e}"


def model_outputs(
  arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, compute_dtype: str = "float32"
) -> tuple[Any, dict[str, Any]]:
  """(the fixture's parity adapter, our model's outputs as numpy, intermediates included) for
  a forward fixture: weights regenerated from its rule and converted with the key map, its
  inputs through the adapter, float32 matmuls at "highest" (inputs cast to ``compute_dtype``
  when that is not float32)."""
  import jax

  from checkpoints import parity  # the adapter modules (they import jax) load on lookup
  from fss_jax import keymaps
  from fss_jax.models import registry
  from fss_jax.train import precision

  adapter = parity.for_fixture(meta)
  spec = registry.get(adapter.model)
  state_dict = keymaps.strip_prefixes(fixtures.regenerate(meta))
  fields = adapter.model_fields(meta)
  variables = keymaps.convert(state_dict, spec.keymap(**fields), model=spec.name)
  model = spec.make_model(**fields)
  with jax.default_matmul_precision("highest"):
    inputs = adapter.inputs(arrays, meta)
    if not precision.is_float32(compute_dtype):
      inputs = precision.cast_floating(inputs, precision.compute_dtype(compute_dtype))
    if adapter.apply is not None:
      outputs = adapter.apply(model, variables, inputs)
    else:
      outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, inputs)
    outputs = jax.tree.map(np.asarray, jax.device_get(precision.to_float32(outputs)))
  return adapter, outputs


def verify_fixture(
  path: str | pathlib.Path,
  *,
  verbose: bool = False,
  compute_dtype: str = "float32",
  train_dtype: str = "float32",
) -> dict[str, Any]:
  """Runs one fixture; returns the report dict (see module docstring).

  ``compute_dtype`` other than float32 measures the mixed-precision drift (no tolerances).

  Raises:
    FileNotFoundError / fixtures.FixtureError: unreadable fixture.
    registry.UnsupportedModelError: no parity adapter handles the fixture.
    keymaps.ConversionError: the regenerated weights do not fit the key map.
  """
  from fss_jax.models import registry
  from fss_jax.train import precision

  drift_only = not precision.is_float32(compute_dtype)
  path = pathlib.Path(path)
  arrays, meta = fixtures.load_fixture(path)
  if meta.get("kind") == "train_step":
    if drift_only:
      raise fixtures.FixtureError(
        "--compute-dtype applies to forward fixtures; a train-step fixture is checked in float32"
      )
    from checkpoints import train_step

    return train_step.verify_train_fixture(path, arrays, meta, verbose=verbose, dtype=train_dtype)
  adapter, outputs = model_outputs(arrays, meta, compute_dtype=compute_dtype)
  spec = registry.get(adapter.model)
  preds = adapter.outputs(outputs, meta)

  report: dict[str, Any] = {
    "fixture": str(path),
    "model": spec.name,
    "outputs": {},
    "passed": True,
    "intermediates": {},
    "compute_dtype": compute_dtype,
  }
  lines = []
  for name in sorted(k for k in arrays if k.startswith("out_")):
    if name not in preds:
      entry = {
        "max_abs": None,
        "scale": float(np.max(np.abs(arrays[name]))),
        "argmax_agree": None,
        "error": "not returned by the model's parity adapter",
      }
    else:
      entry = _compare(preds[name], arrays[name], name in adapter.logit_outputs)
    tol = adapter.tolerances.get(name, DEFAULT_RTOL * max(1.0, entry["scale"]))
    finite = entry["max_abs"] is not None and math.isfinite(entry["max_abs"])
    ok = finite and (drift_only or entry["max_abs"] <= tol)
    report["passed"] &= ok
    note = entry.pop("error", None)
    if finite:
      entry["rel"] = entry["max_abs"] / max(1.0, entry["scale"])
    report["outputs"][name] = entry
    verdict = (
      (f"drift {entry['rel']:.3e}" if finite else "FAIL")
      if drift_only
      else ("ok" if ok else "FAIL")
    )
    lines.append(
      f"{name} {_fmt(entry['max_abs'])} {_fmt(entry['scale'])} "
      f"{verdict} (tol {tol:.3e}"
      + (f", argmax {entry['argmax_agree']:.4f}" if entry["argmax_agree"] is not None else "")
      + (f"; {note}" if note else "")
      + ")"
    )
  for name in sorted(k for k in preds if k.startswith("mid_") and k in arrays):
    entry = _compare(preds[name], arrays[name], False)
    note = entry.pop("error", None)
    report["intermediates"][name] = entry
    lines.append(
      f"{name} {_fmt(entry['max_abs'])} {_fmt(entry['scale'])} informational"
      + (f" ({note})" if note else "")
    )
  unknown = sorted(k for k in preds if k.startswith("out_") and k not in arrays)
  if unknown:
    lines.append(f"# the adapter returned outputs absent from the fixture: {', '.join(unknown)}")
  if not report["outputs"]:
    report["passed"] = False
    lines.append("# the fixture holds no out_ arrays: nothing to compare")
  report["lines"] = lines
  if verbose:
    print("\n".join(lines))
  return report


# XLA:CPU (jax 0.10.2) runs convolutions and dots through YNNPACK by default; some of their
# backward passes lose precision (PANet's conv4 block: 6e-3 of the gradient's scale, SSP's
# layer2/3: up to 1e-2, where torch float32 and float64 agree to 1e-6 and so does our float64
# gradient). XLA's own (Eigen) kernels give the float32 result there. Neither backend is
# uniformly better: PSPNet's bin-6 PPM branch (BatchNorm in training mode) is within its limit
# with YNNPACK (0.5 % of the scale) and not with XLA's kernels (14 %). `--cpu-kernels` picks
# them for a train-step fixture before jax starts ("auto": the model's measured choice in
# checkpoints/train_adapters.py); an explicit XLA_FLAGS choice of the YNN fusions is kept.
EIGEN_CONVOLUTIONS = (
  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"
)
# A one-step check gains nothing from XLA:CPU's concurrency-optimised scheduler, which keeps
# more buffers live: SCCAN + PAHNet's step (161 px, B=2) needs 9.5 GiB of XLA temp memory with
# it and 7.2 GiB without (peak RSS 12.5 -> 10.1 GB); scheduling does not change any result.
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _cpu_kernels_for_train_steps(fixture: str, kernels: str) -> str | None:
  """Sets XLA_FLAGS for a train-step fixture before jax starts; returns the choice made."""
  import os

  try:
    meta = json.loads(pathlib.Path(fixture).with_suffix(".json").read_text())
  except (OSError, ValueError):
    return None  # reported by verify_fixture
  if meta.get("kind") != "train_step":
    return None
  if kernels == "auto":
    from checkpoints import train_adapters  # no jax

    kernels = train_adapters.cpu_kernels(meta)
  if "jax" in sys.modules:
    return kernels
  flags = os.environ.get("XLA_FLAGS", "")
  if kernels == "xla" and "ynn_fusion_type" not in flags:
    flags = f"{flags} {EIGEN_CONVOLUTIONS}"
  if "concurrency_optimized_scheduler" not in flags:
    flags = f"{flags} {MEMORY_SCHEDULER}"
  os.environ["XLA_FLAGS"] = flags.strip()
  return kernels


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m checkpoints.verify",
    description="Compare a Flax model with a parity fixture of the official PyTorch code.",
  )
  parser.add_argument("--fixture", required=True, help="path of the fixture .npz (json beside it)")
  parser.add_argument("--json", help="write the report to this file")
  parser.add_argument(
    "--compute-dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="bfloat16: report the mixed-precision drift from the float32 reference",
  )
  parser.add_argument(
    "--cpu-kernels",
    default="auto",
    choices=("auto", "xla", "ynnpack"),
    help="XLA:CPU float32 kernels for a train-step fixture: xla (XLA's own "
    "convolutions and dots), ynnpack (jax's default), or auto (the model's "
    "measured choice, checkpoints/train_adapters.py); see WORKSPACE §9",
  )
  parser.add_argument(
    "--float64",
    action="store_true",
    help="train-step fixtures: run the step in float64 (the training logic "
    "without float32 kernel rounding; the fixtures' limits still apply)",
  )
  args = parser.parse_args(argv)
  _cpu_kernels_for_train_steps(args.fixture, args.cpu_kernels)
  if args.float64:
    import jax

    jax.config.update("jax_enable_x64", True)

  from fss_jax.keymaps import ConversionError
  from fss_jax.models.registry import UnsupportedModelError

  try:
    report = verify_fixture(
      args.fixture,
      compute_dtype=args.compute_dtype,
      train_dtype="float64" if args.float64 else "float32",
    )
  except UnsupportedModelError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ConversionError as e:
    print(f"error: the fixture's weights do not fit the model's key map.\n{e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, fixtures.FixtureError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  lines = report.pop("lines")
  kind = "train step" if report.get("kind") == "train_step" else args.compute_dtype
  print(f"# {report['fixture']} -> model {report['model']} ({kind})")
  print("\n".join(lines))
  print("PASSED" if report["passed"] else "FAILED")
  if args.json:
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
