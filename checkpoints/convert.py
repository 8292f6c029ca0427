"""Convert a PyTorch checkpoint of a reference model into an orbax checkpoint.

  python -m checkpoints.convert --model NAME --src FILE --dst DIR [--overwrite]
      [--model-arg key=value ...] [--dataset pascal5i|coco20i] [--fold K] [--verbose]

Reads the state dict (``.pth``/``.pt`` via torch, ``.npz``, ``.safetensors``),
strips ``module.`` prefixes, applies ``registry.get(NAME).keymap(**fields)``
(every source key must be used exactly once) and writes ``DIR/variables``
(orbax) + ``DIR/metadata.json`` (model, fields, source file, sha256).
``--model-arg`` values are parsed as JSON when possible (``depth=101``,
``include_head=false``), else kept as strings (``naming=pspnet``).

The dataset and fold the weights were trained on go into metadata.json too:
``--dataset`` / ``--fold``, else guessed from the official file's path
(``PSPNet/pascal/split0/resnet50/best.pth``, ``exp/coco/split2/...``: a folder
named like ``pascal``/``voc``/``coco`` and one named ``split<k>`` / ``fold<k>``).
``fss_jax.main`` then refuses to evaluate or train on another fold with them
(``config.eval.allow_other_fold``), and ``fss_jax.predict`` names the fold.
Weights of no fold (ImageNet backbones) record none.

When the keys do not fit NAME, the key maps of the other registered models are
tried: ``this looks like a sccan checkpoint (546/546 keys match); pass --model
sccan``. The first missing / unexpected keys are shown with their counts;
``--verbose`` lists them all.

A conversion killed before it finishes leaves a hidden temporary directory beside
DIR (``.<DIR name>.tmp-<pid>@<host>-*``); the next conversion into the same folder
removes those of processes that have ended, one line each.

Exit status: 0 written; 2 bad input (unknown/unsupported model, missing, empty,
unreadable or non-checkpoint file, a directory as --src, wrong architecture,
existing DIR without --overwrite). Nothing is written unless the conversion
succeeds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from checkpoints import io as ckpt_io
from fss_jax import io as fss_io

# Least share of keys (matched / union) another model needs for a "pass --model X" hint.
SUGGEST_MIN_MATCH = 0.5
SHOWN_KEYS = 10  # keys listed per kind of mismatch without --verbose


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


class WrongModelError(ValueError):
  """The checkpoint's keys fit other registered model(s) better than the one asked for.

  Attributes:
    models: the best-fitting model names; matched, total: their keys in common with the
      checkpoint, and in the union of both key sets.
    cause: the error of the conversion as asked (a `keymaps.ConversionError` lists the keys).
  """

  def __init__(
    self, src, model: str, models: Sequence[str], matched: int, total: int, cause: Exception
  ):
    self.models, self.matched, self.total, self.cause = list(models), matched, total, cause
    names, flags = _either(models), _either([f"--model {m}" for m in models])
    super().__init__(
      f"{src} is not a {model} checkpoint: this looks like a {names} checkpoint "
      f"({matched}/{total} keys match); pass {flags}"
    )


def _either(items: Sequence[str]) -> str:
  """["a"] -> "a"; ["a", "b", "c"] -> "a, b or c"."""
  return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def key_match(keys: Sequence[str], keymap: Sequence[Any]) -> tuple[int, int]:
  """(keys in common, keys in the union) of a state dict and a key map.

  Optional (`Ignore`) keys count as matched when present and are not missed when absent.
  """
  from fss_jax import keymaps

  keys = set(keys)
  used = {r.src for r in keymap}
  required = {r.src for r in keymap if isinstance(r, keymaps.Rule)}
  return len(keys & used), len(keys | required)


def guess_models(keys: Sequence[str], exclude: str) -> tuple[list[str], int, int]:
  """The registered models (default fields) whose key maps fit `keys` best.

  Returns:
    (names tied at the best match, matched, total); ([], 0, 0) when none matches at
    least `SUGGEST_MIN_MATCH` of the keys. Models that fail to load are skipped.
  """
  from fss_jax.models import registry

  fits = {}
  for name in registry.names():
    if name == exclude:
      continue
    try:
      fits[name] = key_match(keys, registry.get(name).keymap())
    except Exception:  # a broken module must not hide the error
      continue
  fits = {n: (m, t) for n, (m, t) in fits.items() if t and m / t >= SUGGEST_MIN_MATCH}
  if not fits:
    return [], 0, 0
  best = max(fits.values(), key=lambda mt: (mt[0] / mt[1], mt[0]))
  return [n for n, mt in fits.items() if mt == best], *best


_FOLD_PART = re.compile(r"^(?:split|fold)[_-]?(\d+)$", re.I)
_DATASET_PART = re.compile(r"(?:^|[_.-])(pascal|voc|coco)(?:5i|20i|\d{4})?(?:$|[_.-])", re.I)


def guess_trained_on(src: str | pathlib.Path) -> tuple[str | None, int | None]:
  """(dataset, fold) named by the folders of an official checkpoint's path, else (None, None).

  ``PSPNet/pascal/split0/resnet50/best.pth`` -> ("pascal5i", 0); the folder nearest the
  file wins when several match. Only a path with a ``split<k>`` / ``fold<k>`` folder
  names a dataset (official layouts have both; a lone ``coco`` folder says little).
  """
  from fss_jax.data import splits

  dataset, fold = None, None
  for part in (
    fss_io.user_path(src) if fss_io.is_remote(src) else pathlib.Path(src).absolute()
  ).parts[:-1]:
    m = _FOLD_PART.match(part)
    if m:
      fold = int(m.group(1))
    d = _DATASET_PART.search(part)
    if d:
      dataset = splits.canonical_dataset(d.group(1))
  return (dataset, fold) if fold is not None else (None, None)


def trained_on(src: str | pathlib.Path, dataset: str | None, fold: int | None) -> dict[str, Any]:
  """{"dataset", "fold", "trained_on_from"} for metadata.json: the flags, else the path's guess.

  Raises:
    ValueError: an unknown dataset or a fold outside 0..3.
  """
  from fss_jax.data import splits

  if dataset is not None:
    dataset = splits.canonical_dataset(dataset)
  if fold is not None and not 0 <= fold < splits.NUM_FOLDS:
    raise ValueError(f"--fold {fold}: folds are 0..{splits.NUM_FOLDS - 1}")
  g_dataset, g_fold = guess_trained_on(src)
  if g_fold is not None and not 0 <= g_fold < splits.NUM_FOLDS:
    g_fold = None  # "split7": not a fold of these datasets
  out, guessed = {}, []
  for key, given, guess in (("dataset", dataset, g_dataset), ("fold", fold, g_fold)):
    if given is not None:
      out[key] = given
    elif guess is not None:
      out[key] = guess
      guessed.append(key)
  if guessed:
    out["trained_on_from"] = f"path ({', '.join(guessed)})"
  return out


def field_hints_as_flags(message: str) -> str:
  """A model's "pass shot=5" hint (its `check_checkpoint` speaks in fields) as the
  command-line flag: "pass --model-arg shot=5"."""
  return re.sub(r"\bpass (\w+)=", r"pass --model-arg \1=", message)


def _check_fields(fn, fields: Mapping[str, Any], model: str) -> None:
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  unknown = sorted(set(fields) - set(params))
  if unknown:
    known = ", ".join(k for k, p in params.items() if p.kind != p.VAR_POSITIONAL) or "none"
    raise ValueError(f"model {model} has no field(s) {', '.join(unknown)}; its fields: {known}")


def _check_checkpoint(spec, state_dict, src: pathlib.Path, fields: Mapping[str, Any]) -> None:
  """The model's own check (depth, shot count...), its hints spoken as flags."""
  if spec.check_checkpoint is None:
    return
  accepted = inspect.signature(spec.check_checkpoint).parameters
  try:
    spec.check_checkpoint(
      state_dict, source=src.name, **{k: v for k, v in fields.items() if k in accepted}
    )
  except ValueError as e:
    raise ValueError(field_hints_as_flags(str(e))) from None


def _raise_if_other_model(error: Exception, state_dict, keymap, src, model: str) -> None:
  """Raises WrongModelError when another model's key map fits the keys better."""
  matched, total = key_match(list(state_dict), keymap)
  if total and matched == total:
    return  # the keys fit: shapes / depth / shots are the problem
  names, other_matched, other_total = guess_models(list(state_dict), exclude=model)
  if names and other_matched / other_total > (matched / total if total else 0.0):
    raise WrongModelError(src, model, names, other_matched, other_total, error) from None


def paper_description(model: str, dataset: str | None, fold: int | None) -> dict:
  """What predicting / evaluating with converted weights needs (`fss_jax.train.checkpointing.describe`:
  test size and resize, normalisation, label values and class names, output kind), from the
  model's paper config for the dataset it was trained on; {} for a model without a config.

  When the dataset is unknown, only what both datasets' configs agree on is recorded: a model
  whose test transform differs between PASCAL-5i and COCO-20i (HDMNet: 473 / 633 px) gets no
  ``input`` (the reader then asks for it instead of guessing).
  """
  import importlib

  from fss_jax.train import checkpointing

  try:  # a model's paper recipe is configs/<model>.py; backbone key maps have none
    get_config = importlib.import_module(f"configs.{model}").get_config
  except ModuleNotFoundError:
    return {}

  def described(ds: str) -> dict:
    parts = [f"dataset={ds}"] + ([f"fold={fold}"] if fold is not None else [])
    return checkpointing.describe(get_config(",".join(parts)))

  if dataset is not None:
    return described(dataset)
  pascal, coco = described("pascal5i"), described("coco20i")
  out = {"output": pascal["output"]}
  if pascal["input"] == coco["input"]:
    out["input"] = pascal["input"]
  return out


def convert_file(
  model: str,
  src: str | pathlib.Path,
  dst: str | pathlib.Path,
  *,
  fields: Mapping[str, Any] | None = None,
  overwrite: bool = False,
  dataset: str | None = None,
  fold: int | None = None,
) -> pathlib.Path:
  """Converts `src` for `model` and writes `dst`; returns dst.

  ``dataset`` / ``fold``: what the weights were trained on (`trained_on`: else guessed
  from the path), recorded in metadata.json.

  Raises:
    registry.UnsupportedModelError, keymaps.ConversionError, WrongModelError (the keys
    fit another model), FileExistsError, FileNotFoundError, ValueError (unreadable
    file / bad fields / a model's `check_checkpoint`).
  """
  from fss_jax import keymaps
  from fss_jax.models import registry

  fields = dict(fields or {})
  src, dst = fss_io.user_path(src), fss_io.user_path(dst)
  spec = registry.get(model)
  _check_fields(spec.keymap, fields, model)
  trained = trained_on(src, dataset, fold)
  if dst.exists() and not overwrite:  # fail before the (slow) read
    raise FileExistsError(
      f"{dst} already exists; pass --overwrite to replace it, or choose another destination"
    )
  with fss_io.local_copy(src) as local:  # torch.load reads local files; gs:// is downloaded
    state_dict = keymaps.strip_prefixes(ckpt_io.read_state_dict(local))
    digest = fss_io.file_sha256(local)
  keymap = spec.keymap(**fields)
  try:
    _check_checkpoint(spec, state_dict, src, fields)
    variables = keymaps.convert(state_dict, keymap, model=model)
  except ValueError as e:  # keymaps.ConversionError included
    _raise_if_other_model(e, state_dict, keymap, src, model)
    raise
  metadata = {
    **paper_description(model, trained.get("dataset"), trained.get("fold")),
    "model": model,
    "fields": fields,
    "source": os.fspath(src) if fss_io.is_remote(src) else str(src.absolute()),
    "sha256": digest,
    "format": "fss_jax converted checkpoint v1",
    **trained,
  }
  return ckpt_io.write_orbax(variables, dst, overwrite=overwrite, metadata=metadata)


def key_report(error, *, verbose: bool = False) -> str:
  """The key lists of a `keymaps.ConversionError`: the first `SHOWN_KEYS` of each with its
  count, or all of them when `verbose`."""
  lines = []
  for title, items in (
    ("missing keys (expected by the model, absent from the checkpoint)", error.missing),
    ("unexpected keys (in the checkpoint, unknown to the model)", error.unexpected),
    ("shape mismatches", error.shape_errors),
  ):
    if not items:
      continue
    shown = items if verbose else items[:SHOWN_KEYS]
    lines.append(f"  {title} ({len(items)}):")
    lines.extend(f"    {k}" for k in shown)
    if len(items) > len(shown):
      lines.append(f"    ... and {len(items) - len(shown)} more (--verbose lists them all)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m checkpoints.convert",
    description="Convert a PyTorch state dict of a reference model to an orbax checkpoint.",
  )
  parser.add_argument(
    "--model", required=True, help="registered model name (fss_jax.models.registry)"
  )
  parser.add_argument("--src", required=True, help=".pth / .pt / .npz / .safetensors file")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  parser.add_argument(
    "--model-arg",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="model field passed to the key map (repeatable)",
  )
  parser.add_argument(
    "--dataset",
    default=None,
    help="dataset the weights were trained on "
    "(pascal5i | coco20i; default: guessed from the --src path)",
  )
  parser.add_argument(
    "--fold",
    type=int,
    default=None,
    help="fold the weights were trained on "
    "(default: guessed from a split<k> / fold<k> folder of the --src path)",
  )
  parser.add_argument(
    "--verbose", action="store_true", help="list every missing / unexpected key of a mismatch"
  )
  args = parser.parse_args(argv)

  from fss_jax.keymaps import ConversionError
  from fss_jax.models.registry import UnsupportedModelError

  try:
    fields = parse_model_args(args.model_arg)
    dst = convert_file(
      args.model,
      args.src,
      args.dst,
      fields=fields,
      overwrite=args.overwrite,
      dataset=args.dataset,
      fold=args.fold,
    )
  except WrongModelError as e:
    print(f"error: {e} (nothing was written)", file=sys.stderr)
    if isinstance(e.cause, ConversionError):
      c = e.cause
      print(
        key_report(c, verbose=True)
        if args.verbose
        else f"  ({len(c.missing)} missing, {len(c.unexpected)} unexpected keys for "
        f"{args.model}; --verbose lists them)",
        file=sys.stderr,
      )
    return 2
  except ConversionError as e:
    print(
      f"error: {args.src} is not a {args.model} checkpoint; nothing was written.\n"
      f"{key_report(e, verbose=args.verbose)}",
      file=sys.stderr,
    )
    return 2
  except (UnsupportedModelError, FileExistsError, FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {dst} (model {args.model}{_trained_on_text(ckpt_io.read_metadata(dst))})")
  return 0


def _trained_on_text(meta: Mapping[str, Any]) -> str:
  """ "; trained on pascal5i fold 0, guessed from the path: pass --dataset / --fold to change"."""
  what = " ".join(
    str(meta[k]) if k == "dataset" else f"fold {meta[k]}" for k in ("dataset", "fold") if k in meta
  )
  if not what:
    return "; no fold recorded: pass --dataset and --fold if the weights are a fold's model"
  guessed = (
    ", guessed from the path: pass --dataset / --fold to change"
    if meta.get("trained_on_from")
    else ""
  )
  return f"; trained on {what}{guessed}"


if __name__ == "__main__":
  sys.exit(main())
