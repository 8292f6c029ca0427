"""Reading PyTorch-side weight files and writing/reading converted orbax checkpoints.

* `read_state_dict(path)`: ``.pth`` / ``.pt`` (via torch, a dev dependency),
  ``.npz``, ``.safetensors`` -> {key: numpy array}. Truncated or corrupt files
  raise `ValueError` naming the file.
* `write_orbax(variables, dst, overwrite=False, metadata=None)`: writes the
  Flax variables (numpy pytree) as an orbax checkpoint in ``dst/variables``
  plus ``dst/metadata.json``. It writes into a temporary directory beside
  `dst` and renames it into place, so a failed run leaves nothing behind, and
  never replaces an existing `dst` unless ``overwrite=True``.
* `read_orbax(dst)` -> variables (numpy), `read_metadata(dst)` -> dict.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

VARIABLES_DIR = "variables"
METADATA_FILE = "metadata.json"
STATE_DICT_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")


def _corrupt(path, what: str, err: BaseException) -> ValueError:
  return ValueError(f"{path}: cannot read {what} - the file is truncated or corrupt "
                    f"({type(err).__name__}: {err}). Download or export it again.")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an ``.npz`` file, read eagerly; ValueError when truncated/corrupt."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as e:
    raise _corrupt(path, "the .npz archive", e) from None


def _torch_to_numpy(value):
  import torch
  if isinstance(value, torch.Tensor):
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
      t = t.float()
    return t.numpy()
  return None


def _unwrap(obj: Any, path) -> Mapping:
  """Unwraps training checkpoints ({"state_dict": ...}, {"model": ...}) to the state dict."""
  for _ in range(3):
    if isinstance(obj, Mapping):
      for k in ("state_dict", "model", "model_state_dict", "net"):
        if k in obj and isinstance(obj[k], Mapping):
          obj = obj[k]
          break
      else:
        return obj
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict "
                     "(save model.state_dict(), not the model)")
  return obj


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch ``.pth``/``.pt`` state dict (weights_only) as numpy arrays."""
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch, which is not installed. Install the dev "
                      "extra (pip install -r requirements-dev.txt), or export the state dict "
                      "to .npz / .safetensors on a machine that has torch.") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/...
    if "Weights only load failed" in str(e):
      raise ValueError(f"{path}: contains Python objects that torch.load(weights_only=True) "
                       f"refuses to unpickle ({e}). Re-save only the state dict.") from None
    raise _corrupt(path, "the PyTorch checkpoint", e) from None
  sd = _unwrap(obj, path)
  out = {}
  for k, v in sd.items():
    a = _torch_to_numpy(v)
    if a is None and isinstance(v, np.ndarray):
      a = v
    if a is not None:
      out[str(k)] = a
  if not out:
    raise ValueError(f"{path}: no tensors found in the checkpoint")
  return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return dict(load_file(str(path)))
  except FileNotFoundError:
    raise
  except Exception as e:  # SafetensorError and friends
    raise _corrupt(path, "the .safetensors file", e) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as {key: numpy array} (keys unchanged).

  Supports ``.pth``/``.pt`` (torch.load with weights_only=True; a
  {"state_dict": ...} or {"model": ...} wrapper is unwrapped), ``.npz`` and
  ``.safetensors``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unsupported suffix, truncated or corrupt file.
    ImportError: a .pth/.pt file while torch is not installed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} not found")
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt", ".bin", ".tar"):
    return read_pth(path)
  if suffix == ".npz":
    return read_npz(path)
  if suffix == ".safetensors":
    return read_safetensors(path)
  raise ValueError(f"{path}: unsupported checkpoint format {suffix!r}; "
                   f"use one of {', '.join(STATE_DICT_SUFFIXES)}")


def _to_numpy_tree(tree):
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def write_orbax(variables: Mapping, dst: str | os.PathLike, *, overwrite: bool = False,
                metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes Flax `variables` to the directory `dst` (orbax pytree + metadata.json).

  Raises:
    FileExistsError: `dst` exists and `overwrite` is False (nothing is touched).
  """
  from fss_jax import io as fss_io  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp

  dst = pathlib.Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to "
                          "replace it, or choose another destination")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    os.chmod(tmp, fss_io.default_mode(directory=True))  # mkdtemp's 0700 -> what the umask says
    ocp.PyTreeCheckpointer().save(tmp / VARIABLES_DIR, _to_numpy_tree(variables))
    (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata or {}), indent=1, sort_keys=True))
    if dst.exists():
      old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


def read_orbax(dst: str | os.PathLike) -> dict:
  """Variables written by `write_orbax` (numpy arrays)."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(dst).absolute() / VARIABLES_DIR
  if not path.is_dir():
    raise FileNotFoundError(f"{dst} is not a converted checkpoint (no {VARIABLES_DIR}/ inside)")
  return ocp.PyTreeCheckpointer().restore(path)


def read_metadata(dst: str | os.PathLike) -> dict:
  """The metadata.json written by `write_orbax`."""
  return json.loads((pathlib.Path(dst) / METADATA_FILE).read_text())
