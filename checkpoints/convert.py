"""Convert a PyTorch checkpoint of a reference model into an orbax checkpoint.

  python -m checkpoints.convert --model NAME --src FILE --dst DIR [--overwrite]
      [--model-arg key=value ...]

Reads the state dict (``.pth``/``.pt`` via torch, ``.npz``, ``.safetensors``),
strips ``module.`` prefixes, applies ``registry.get(NAME).keymap(**fields)``
(every source key must be used exactly once) and writes ``DIR/variables``
(orbax) + ``DIR/metadata.json`` (model, fields, source file, sha256).
``--model-arg`` values are parsed as JSON when possible (``depth=101``,
``include_head=false``), else kept as strings (``naming=pspnet``).

Exit status: 0 written; 2 bad input (unknown/unsupported model, unreadable
file, wrong architecture: missing/unexpected keys listed, existing DIR without
--overwrite). Nothing is written unless the conversion succeeds.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import pathlib
import sys
from typing import Any, Mapping

from checkpoints import io as ckpt_io


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
  """["depth=101", "naming=pspnet"] -> {"depth": 101, "naming": "pspnet"}."""
  fields = {}
  for item in items or ():
    if "=" not in item:
      raise ValueError(f"--model-arg expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    try:
      fields[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      fields[key.strip()] = value
  return fields


def _check_fields(fn, fields: Mapping[str, Any], model: str) -> None:
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  unknown = sorted(set(fields) - set(params))
  if unknown:
    known = ", ".join(k for k, p in params.items() if p.kind != p.VAR_POSITIONAL) or "none"
    raise ValueError(f"model {model} has no field(s) {', '.join(unknown)}; its fields: {known}")


def convert_file(model: str, src: str | pathlib.Path, dst: str | pathlib.Path, *,
                 fields: Mapping[str, Any] | None = None, overwrite: bool = False
                 ) -> pathlib.Path:
  """Converts `src` for `model` and writes `dst`; returns dst.

  Raises:
    registry.UnsupportedModelError, keymaps.ConversionError, FileExistsError,
    FileNotFoundError, ValueError (unreadable file / bad fields).
  """
  from fss_jax import keymaps
  from fss_jax.models import registry

  fields = dict(fields or {})
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  spec = registry.get(model)
  _check_fields(spec.keymap, fields, model)
  if dst.exists() and not overwrite:  # fail before the (slow) read
    raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it, "
                          "or choose another destination")
  state_dict = keymaps.strip_prefixes(ckpt_io.read_state_dict(src))
  if spec.check_checkpoint is not None:
    accepted = inspect.signature(spec.check_checkpoint).parameters
    spec.check_checkpoint(state_dict, source=src.name,
                          **{k: v for k, v in fields.items() if k in accepted})
  variables = keymaps.convert(state_dict, spec.keymap(**fields), model=model)
  metadata = {"model": model, "fields": fields, "source": str(src.absolute()),
              "sha256": _sha256(src), "format": "fss_jax converted checkpoint v1"}
  return ckpt_io.write_orbax(variables, dst, overwrite=overwrite, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m checkpoints.convert",
      description="Convert a PyTorch state dict of a reference model to an orbax checkpoint.")
  parser.add_argument("--model", required=True, help="registered model name (fss_jax.models.registry)")
  parser.add_argument("--src", required=True, help=".pth / .pt / .npz / .safetensors file")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="model field passed to the key map (repeatable)")
  args = parser.parse_args(argv)

  from fss_jax.keymaps import ConversionError
  from fss_jax.models.registry import UnsupportedModelError

  try:
    fields = parse_model_args(args.model_arg)
    dst = convert_file(args.model, args.src, args.dst, fields=fields, overwrite=args.overwrite)
  except ConversionError as e:
    print(f"error: {args.src} is not a {args.model} checkpoint; nothing was written.\n{e}",
          file=sys.stderr)
    return 2
  except (UnsupportedModelError, FileExistsError, FileNotFoundError, ImportError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {dst} (model {args.model})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
