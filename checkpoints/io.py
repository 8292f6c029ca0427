"""Reading PyTorch-side weight files and writing/reading converted orbax checkpoints.

* `read_state_dict(path)`: ``.pth`` / ``.pt`` (via torch, a dev dependency),
  ``.npz``, ``.safetensors`` -> {key: numpy array}. Truncated or corrupt files
  raise `ValueError` naming the file.
* `write_orbax(variables, dst, overwrite=False, metadata=None)`: writes the
  Flax variables (numpy pytree) as an orbax checkpoint in ``dst/variables``
  plus ``dst/metadata.json``. It writes into a temporary directory beside
  `dst` (``.<dst name>.tmp-<pid>@<host>-<random>``) and renames it into place, so
  a failed run leaves nothing behind, and never replaces an existing `dst`
  unless ``overwrite=True``. A run that was killed does leave its temporary
  directory; the next `write_orbax` into the same folder removes it
  (`remove_stale_temps`).
* `read_orbax(dst)` -> variables (numpy), `read_metadata(dst)` -> dict.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fss_jax import io as fss_io

# No jax at import time: checkpoints.verify sets XLA_FLAGS before jax starts.
VARIABLES_DIR = fss_io.CONVERTED_VARIABLES_DIR  # the library reads what we write
METADATA_FILE = fss_io.CONVERTED_METADATA_FILE
STATE_DICT_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
# Temporary / replaced directories of `write_orbax`, named after the writing process.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)@(?P<host>[^/]*)-[a-z0-9_]+$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)@(?P<host>[^/]*)$")
# Temporary directories of versions before the pid was in the name (tempfile.mkdtemp's
# 8 random characters): removed when older than this and holding only what write_orbax
# writes (variables*, metadata.json).
_LEGACY_TEMP_RE = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")
LEGACY_TEMP_AGE_S = 24 * 3600


def _corrupt(path, what: str, err: BaseException) -> ValueError:
  return ValueError(
    f"{path}: cannot read {what} - the file is truncated or corrupt "
    f"({type(err).__name__}: {err}). Download or export it again."
  )


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
    raise ValueError(
      f"{path}: holds a {type(obj).__name__}, not a state dict "
      "(save model.state_dict(), not the model)"
    )
  return obj


def _torch_container(head: bytes) -> str | None:
  """ "zip" / "pickle" / "tar": how torch.save stored a file starting with `head`, else None."""
  if head.startswith(b"PK\x03\x04"):
    return "zip"  # torch >= 1.6
  if head[:1] == b"\x80":
    return "pickle"  # legacy format (pickle protocol >= 2)
  if len(head) >= 262 and head[257:262] == b"ustar":
    return "tar"  # torch < 0.4
  return None


def _describe(head: bytes) -> str:
  """What a file that is not a checkpoint looks like, from its first bytes."""
  return fss_io.describe_text_head(head) or f"it starts with {head[:8]!r}"


def check_torch_file(path: str | os.PathLike) -> None:
  """Raises ValueError when `path` is not a file torch.save could have written (a zip or
  pickle file), e.g. a text file or web page named ``.pth``."""
  with open(path, "rb") as f:
    head = f.read(512)
  if _torch_container(head) is None:
    raise ValueError(
      f"{path} is not a PyTorch checkpoint: not a zip or pickle file as "
      f"torch.save writes ({_describe(head)}). Pass the .pth file itself, "
      f"downloaded again if needed."
    )


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch ``.pth``/``.pt`` state dict (weights_only) as numpy arrays."""
  check_torch_file(path)
  try:
    import torch
  except ImportError:
    raise ImportError(
      f"reading {path} needs PyTorch, which is not installed. Install the dev "
      "extra (pip install -r requirements-dev.txt), or export the state dict "
      "to .npz / .safetensors on a machine that has torch."
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/...
    if "Weights only load failed" in str(e):
      raise ValueError(
        f"{path}: contains Python objects that torch.load(weights_only=True) "
        f"refuses to unpickle ({e}). Re-save only the state dict."
      ) from None
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
  if path.is_dir():
    raise ValueError(_directory_message(path))
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} not found")
  if path.stat().st_size == 0:
    raise ValueError(f"{path} is empty (0 bytes); download or export the checkpoint again")
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt", ".bin", ".tar"):
    return read_pth(path)
  if suffix == ".npz":
    return read_npz(path)
  if suffix == ".safetensors":
    return read_safetensors(path)
  raise ValueError(
    f"{path}: unsupported checkpoint format {suffix!r}; use one of {', '.join(STATE_DICT_SUFFIXES)}"
  )


def _directory_message(path: pathlib.Path) -> str:
  """The error for a directory given as the state-dict file: what to pass instead."""
  if (path / VARIABLES_DIR).is_dir():
    return (
      f"{path} is a directory holding an already converted checkpoint; use it as it is "
      f"(e.g. python -m fss_jax.predict --checkpoint {path})"
    )
  inside = sorted(
    p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in STATE_DICT_SUFFIXES
  )
  found = (
    f" (it holds {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''})"
    if inside
    else f" (it holds no {'/'.join(STATE_DICT_SUFFIXES)} file at its top level)"
  )
  return f"{path} is a directory; pass the .pth file inside it{found}"


def _to_numpy_tree(tree):
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _owner_tag() -> str:
  """``<pid>@<host>``: which process writes a temporary directory."""
  return f"{os.getpid()}@{_host()}"


def _pid_alive(pid: int) -> bool:
  """Whether process `pid` of this host exists (True when unsure)."""
  if os.name != "posix":  # os.kill(pid, 0) is not a probe on Windows
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # PermissionError: it exists, another user's
    return True
  return True


def _size_mb(path: pathlib.Path) -> float:
  files = [path] if path.is_file() else path.rglob("*")
  return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink()) / 1e6


def _stale_reason(path: pathlib.Path, now: float) -> str | None:
  """Why `path` is a leftover of an interrupted `write_orbax`, or None to keep it.

  Only this host's temporaries of ended processes are stale (a folder on a shared
  file system may hold the temporary of a conversion running on another machine);
  a ``.old-`` copy only once its checkpoint is back in place.
  """
  m = _TEMP_RE.match(path.name) or _OLD_RE.match(path.name)
  if m:
    pid = int(m["pid"])
    if m["host"] != _host() or _pid_alive(pid):
      return None
    if m.re is _OLD_RE and not (path.parent / m["name"]).exists():
      return None  # killed between the two renames: the only old copy
    return f"left by process {pid}, which has ended"
  if (
    _LEGACY_TEMP_RE.match(path.name)
    and path.is_dir()
    and not path.is_symlink()
    and now - path.stat().st_mtime > LEGACY_TEMP_AGE_S
    and all(p.name.startswith(VARIABLES_DIR) or p.name == METADATA_FILE for p in path.iterdir())
  ):
    return f"an unfinished conversion older than {LEGACY_TEMP_AGE_S // 3600} h"
  return None


def _print_stderr(message: str) -> None:
  print(message, file=sys.stderr)


def remove_stale_temps(
  folder: str | os.PathLike, *, log: Callable[[str], None] = _print_stderr
) -> list[pathlib.Path]:
  """Removes the temporary directories that killed `write_orbax` runs left in `folder`.

  A temporary directory is removed when the process named in it (``.<name>.tmp-<pid>@<host>-*``)
  ran on this host and has ended; one of a running conversion, or of another host, is
  kept. Each removal is logged in one line.

  Returns:
    The removed paths.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  now, removed = time.time(), []
  for path in sorted(folder.glob(".*")):
    reason = _stale_reason(path, now)
    if reason is None:
      continue
    size = _size_mb(path)
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
      removed.append(path)
      log(
        f"removed {path} ({size:.1f} MB): temporary directory of an interrupted conversion, "
        f"{reason}"
      )
  return removed


def write_orbax(
  variables: Mapping,
  dst: str | os.PathLike,
  *,
  overwrite: bool = False,
  metadata: Mapping[str, Any] | None = None,
  log: Callable[[str], None] = _print_stderr,
) -> pathlib.Path:
  """Writes Flax `variables` to the directory `dst` (orbax pytree + metadata.json).

  First removes what killed earlier runs left beside `dst` (`remove_stale_temps`,
  each removal reported through `log`).

  Raises:
    FileExistsError: `dst` exists and `overwrite` is False (nothing is touched).
  """
  import orbax.checkpoint as ocp

  if fss_io.is_remote(dst):
    return _write_orbax_remote(
      variables, fss_io.user_path(dst), overwrite=overwrite, metadata=metadata
    )
  dst = pathlib.Path(os.path.expanduser(dst)).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(
      f"{dst} already exists; pass --overwrite (overwrite=True) to "
      "replace it, or choose another destination"
    )
  dst.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temps(dst.parent, log=log)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{_owner_tag()}-", dir=dst.parent))
  try:
    os.chmod(tmp, fss_io.default_mode(directory=True))  # mkdtemp's 0700 -> what the umask says
    ocp.PyTreeCheckpointer().save(tmp / VARIABLES_DIR, _to_numpy_tree(variables))
    (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata or {}), indent=1, sort_keys=True))
    if dst.exists():
      old = dst.with_name(f".{dst.name}.old-{_owner_tag()}")
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


def _write_orbax_remote(
  variables: Mapping, dst, *, overwrite: bool, metadata: Mapping[str, Any] | None
):
  """`write_orbax` to an object store (no rename there): an old ``dst`` loses its
  metadata.json first, then the variables are written, and metadata.json (what readers
  take as the mark of a complete conversion) last."""
  import orbax.checkpoint as ocp

  if dst.exists():
    if not overwrite:
      raise FileExistsError(
        f"{dst} already exists; pass --overwrite (overwrite=True) to "
        "replace it, or choose another destination"
      )
    (dst / METADATA_FILE).unlink(missing_ok=True)
    dst.rmtree()
  ocp.PyTreeCheckpointer().save(dst / VARIABLES_DIR, _to_numpy_tree(variables))
  fss_io.atomic_write(
    dst / METADATA_FILE, json.dumps(dict(metadata or {}), indent=1, sort_keys=True)
  )
  return dst


def read_orbax(dst: str | os.PathLike) -> dict:
  """Variables written by `write_orbax` (numpy arrays)."""
  import orbax.checkpoint as ocp

  path = fss_io.user_path(dst) / VARIABLES_DIR
  if not path.is_dir():
    raise FileNotFoundError(f"{dst} is not a converted checkpoint (no {VARIABLES_DIR}/ inside)")
  return ocp.PyTreeCheckpointer().restore(path)


def read_metadata(dst: str | os.PathLike) -> dict:
  """The metadata.json written by `write_orbax`."""
  return json.loads((fss_io.user_path(dst) / METADATA_FILE).read_text())
