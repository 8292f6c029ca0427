"""Atomic file writes: a failed or interrupted write never leaves a partial file.

Every output of fss-jax (episode lists, dataset indexes, results JSON, charts,
predicted masks) is written to a temporary file in the destination's folder,
flushed to disk, then renamed over the destination, so readers see either the
old file or the complete new one. Files and the folders made for them get the
permissions the process's umask gives (``tempfile`` alone would make them 0600 / 0700,
unreadable to the other users of a shared dataset or results folder).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import BinaryIO, Callable


def current_umask() -> int:
  """The process umask (read without changing it for longer than the call)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def default_mode(directory: bool = False) -> int:
  """Permissions a plain ``open()`` / ``mkdir()`` would give under the current umask."""
  return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 overwrite: bool = True) -> pathlib.Path:
  """Writes ``data`` to ``path`` via a temporary file in the same folder + rename.

  Args:
    path: destination; its folder is created when missing.
    data: bytes, a str (written as UTF-8), or a function that writes into the
      open binary file (e.g. ``lambda f: np.savez_compressed(f, ...)``).
    overwrite: False refuses to replace an existing ``path``.

  Returns:
    ``path`` as a `pathlib.Path`.

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False (nothing written).
  """
  path = pathlib.Path(path)
  if not overwrite and path.exists():
    raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    os.fchmod(fd, default_mode())
    with os.fdopen(fd, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


__all__ = ["atomic_write", "default_mode", "current_umask"]


def describe_text_head(head: bytes) -> str | None:
  """What a file that should be binary (an image, a checkpoint) looks like from its first bytes:
  a Git LFS pointer, an HTML / XML page or a text file; None when it does not look like text."""
  text = head.lstrip().lower()
  if text.startswith(b"version https://git-lfs"):
    return "a Git LFS pointer, not the file: run `git lfs pull`"
  if text.startswith((b"<!doctype html", b"<html")):
    return "an HTML page (a web page saved instead of the file?)"
  if text.startswith((b"<?xml", b"<svg")):
    return "an XML / SVG file, not a raster image or a checkpoint"
  if head and all(32 <= c < 127 or c in b"\t\r\n" for c in head[:64]):
    return f"a text file starting with {head[:64].decode('ascii').splitlines()[0][:40]!r}"
  return None


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
  """Hex sha256 of a file's bytes (the same as ``sha256sum``), read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      h.update(chunk)
  return h.hexdigest()
