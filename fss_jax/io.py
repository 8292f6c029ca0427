"""Paths a user gives, on a local disk or an object store, and writes that never leave a partial file.

Every path a user passes (workdir, data_dir, episodes_dir, init / resume sources, predict
inputs and outputs, converter src / dst) goes through `user_path`: an `etils.epath.Path`, so
``gs://bucket/x`` stays a bucket path (``pathlib`` would make it the local folder ``gs:/bucket/x``)
and ``~`` expands on local paths. gs:// is served by ``gcsfs`` through etils' fsspec backend
(`fss_jax/__init__.py` sets ``EPATH_USE_TF=false`` unless the user chose otherwise), orbax's
array data by tensorstore, and TFDS array_record files by array_record's own GCS reader: every
client honours the standard emulator variables, which is how tests run against a real local
GCS server (tests/test_gcs.py).

Atomic writes (`atomic_write`): on a local disk, a temporary file in the destination's folder is
flushed and renamed over the destination, so readers see either the old file or the complete
new one; files and the folders made for them get the permissions the process's umask gives
(``tempfile`` alone would make them 0600 / 0700). On an object store an object appears only
when its upload completes, so the content is built in memory and uploaded in one request: a
failed or killed write leaves the old object (or none), never a partial one.

Files that a library can only read from a local disk (``torch.load`` of a ``.pth``) are copied
to a temporary local file first (`local_copy`); files that are appended to (``log.txt``,
TensorBoard event files) are kept in a local mirror folder and uploaded whole at each flush
(`LocalMirror`), as TensorFlow's own GCS writer does at each flush.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from etils import epath

# A converted checkpoint (``python -m checkpoints.convert``): DIR/variables (orbax pytree) +
# DIR/metadata.json. Here, in a module without jax, so that the converter and verify CLIs can
# name them before jax starts (verify sets XLA_FLAGS first).
CONVERTED_VARIABLES_DIR = "variables"
CONVERTED_METADATA_FILE = "metadata.json"

# URI schemes served by an object store (no rename, no append, no file locks, no disk usage).
REMOTE_SCHEMES = ("gs://", "s3://", "az://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` names an object in a store (``gs://...``) rather than a local file."""
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def user_path(path: str | os.PathLike) -> epath.Path:
  """A path the user gave -> `epath.Path`: ``gs://`` kept, ``~`` expanded on local paths."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.expanduser(text))


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
  """Points file descriptor 2 (where C / C++ libraries print) at a scratch file for the block;
  the yielded list receives the lines printed meanwhile when the block ends. For one thread at
  a time (fd 2 belongs to the process)."""
  lines: list[str] = []
  sys.stderr.flush()
  with tempfile.TemporaryFile() as sink:
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def current_umask() -> int:
  """The process umask (read without changing it for longer than the call)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def default_mode(directory: bool = False) -> int:
  """Permissions a plain ``open()`` / ``mkdir()`` would give under the current umask."""
  return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(
  path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *, overwrite: bool = True
) -> epath.Path:
  """Writes ``data`` to ``path`` so that no reader ever sees a partial file.

  Args:
    path: destination (local or ``gs://``); its folder is created when missing.
    data: bytes, a str (written as UTF-8), or a function that writes into the
      open binary file (e.g. ``lambda f: np.savez_compressed(f, ...)``).
    overwrite: False refuses to replace an existing ``path``.

  Returns:
    ``path`` as an `epath.Path` (its ``stat()`` is etils' ``StatResult``; use ``os.stat``
    for a local file's mode or inode).

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False (nothing written).
  """
  dest = user_path(path)
  if not overwrite and dest.exists():
    raise FileExistsError(f"{dest} already exists; pass --overwrite (overwrite=True) to replace it")
  if callable(data):
    buf = io.BytesIO()
    data(buf)
    data = buf.getvalue()
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(dest):
    dest.write_bytes(payload)  # one upload: the object appears whole or not at all
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
  try:
    os.fchmod(fd, default_mode())
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, dest)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return dest


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, chunk_bytes: int = 8 << 20) -> None:
  """Copies one file between any two places (local, gs://), streamed in chunks."""
  target = user_path(dst)
  if not is_remote(target):
    target.parent.mkdir(parents=True, exist_ok=True)
  with user_path(src).open("rb") as f, target.open("wb") as g:
    shutil.copyfileobj(f, g, chunk_bytes)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """A local file name holding ``path``'s bytes: ``path`` itself when local, else a temporary
  download removed on exit (for readers that need a real file, e.g. ``torch.load``)."""
  source = user_path(path)
  if not is_remote(source):
    yield os.fspath(source)
    return
  with tempfile.TemporaryDirectory(prefix="fss_jax-") as tmp:
    local = os.path.join(tmp, source.name or f"download{suffix}")
    with source.open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 8 << 20)
    yield local


class LocalMirror:
  """A local folder whose files are uploaded whole to a remote folder at each `sync`.

  For the files a run appends to (``log.txt``, TensorBoard event files), which an object store
  cannot append: they are written locally and each `sync` uploads every file that changed since
  the last one (a whole-object upload, as TensorFlow's GCS writer does at each flush). With a
  local ``remote`` the mirror is ``remote`` itself and `sync` does nothing.

  Attributes:
    local: the folder to write into (a plain local path string).
  """

  def __init__(
    self, remote: str | os.PathLike, files: tuple[str, ...] = (), every_s: float | None = None
  ):
    """Args:
    remote: the folder the files belong in (local or ``gs://``).
    files: names whose remote copy is downloaded first, to be appended to.
    every_s: also `sync` from a background thread every ``every_s`` seconds.
    """
    self.remote = user_path(remote)
    self._tmp = None
    if not is_remote(self.remote):
      self.local = os.fspath(self.remote)
      return
    self._tmp = tempfile.TemporaryDirectory(prefix="fss_jax-mirror-")
    self.local = self._tmp.name
    self._synced: dict[str, tuple[int, int]] = {}
    self._lock = threading.Lock()
    for name in files:  # appended across runs: start from the remote copy
      src = self.remote / name
      if src.exists():
        with src.open("rb") as f, open(os.path.join(self.local, name), "wb") as dst:
          shutil.copyfileobj(f, dst)
    self._stop = threading.Event()
    self._thread = None
    if every_s:
      self._thread = threading.Thread(
        target=self._sync_every, args=(every_s,), daemon=True, name="fss_jax-mirror"
      )
      self._thread.start()

  def _sync_every(self, seconds: float) -> None:
    while not self._stop.wait(seconds):
      try:
        self.sync()
      except Exception:  # retried at the next tick; a lasting failure shows at close
        logging.debug("upload of %s failed", self.local, exc_info=True)

  def sync(self) -> None:
    """Uploads every local file that changed since the last sync (no-op for a local remote)."""
    if self._tmp is None:
      return
    with self._lock:
      self._sync()

  def _sync(self) -> None:
    for root, _, names in os.walk(self.local):
      for name in names:
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self.local)
        st = os.stat(local)
        if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
          continue
        with open(local, "rb") as f:
          (self.remote / rel).write_bytes(f.read())
        self._synced[rel] = (st.st_size, st.st_mtime_ns)

  def close(self) -> None:
    """Final `sync`, then the local copy is removed."""
    if self._tmp is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      self.sync()
    except Exception:  # a failed upload must not hide the run's own error
      logging.exception("could not upload %s to %s", self.local, self.remote)
    self._tmp.cleanup()
    self._tmp = None


__all__ = [
  "atomic_write",
  "default_mode",
  "current_umask",
  "user_path",
  "is_remote",
  "local_copy",
  "copy_file",
  "LocalMirror",
  "captured_stderr",
  "describe_text_head",
  "file_sha256",
]


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
  with user_path(path).open("rb") as f:
    while chunk := f.read(chunk_bytes):
      h.update(chunk)
  return h.hexdigest()
