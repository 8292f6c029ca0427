"""What a workdir says about the run that made it, and the guards that keep it to one run.

Like the ``exp/`` folders of the reference repositories, a workdir explains itself:

* ``config.json`` -- the resolved config of the last ``--mode train`` run (every field,
  after the command-line overrides), the library versions, host, devices, process count,
  command line and the git commit of the checkout. `fss_jax.predict` reads the test size
  and resize of a workdir checkpoint from it. ``--mode eval`` writes ``config_eval.json``.
* ``log.txt`` -- the plain-text log of every run in the workdir, appended.
* ``.lock`` -- held (``flock``) by the run using the workdir, with its pid and host; the OS
  releases it when that process ends, even by ``kill -9`` (`lock`). A ``gs://`` workdir has no
  lock: an object store has no file locks, and on a pod every host opens the same workdir.

A workdir may be local or ``gs://`` (`fss_jax.io.user_path`): ``log.txt`` is appended in a local
mirror and uploaded every 30 s and at exit (`fss_jax.io.LocalMirror`).

Start-up checks (`WorkdirError` says what to do): the workdir is writable (`check_writable`)
and its disk has room for one checkpoint (`check_room`); saves a killed run left unfinished
are removed (`remove_unfinished_saves`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from etils import epath

from fss_jax import io as fss_io

CONFIG_FILE = "config.json"
EVAL_CONFIG_FILE = "config_eval.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
# orbax-checkpoint (0.12.8) writes a step into ``<step>.orbax-checkpoint-tmp`` (older versions
# add ``-<timestamp>``) and renames it when the save is complete (atomicity.TMP_DIR_SUFFIX).
UNFINISHED_SAVE_MARK = ".orbax-checkpoint-tmp"
# On GCS (no rename) orbax writes a step in place and marks it finished with this file last.
FINISHED_SAVE_MARK_GCS = "commit_success.txt"
_PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "numpy",
  "grain",
  "tensorflow-datasets",
  "ml-collections",
)


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _versions() -> dict[str, str]:
  from importlib import metadata

  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def git_commit(path: str | None = None) -> str | None:
  """HEAD of the checkout holding this package (None outside a git checkout)."""
  root = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run(
      ["git", "-C", os.fspath(root), "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      timeout=10,
      check=False,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_record(config: Any, *, mode: str) -> dict[str, Any]:
  """The document written to ``config.json``: {"mode", "config", "versions", ...}."""
  import jax

  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  devices = jax.devices()
  return _jsonable(
    {
      "mode": mode,
      "config": cfg,
      "versions": _versions(),
      "host": socket.gethostname(),
      "platform": devices[0].platform if devices else None,
      "devices": [str(d) for d in devices],
      "process_count": jax.process_count(),
      "argv": sys.argv,
      "git_commit": git_commit(),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
  )


def write_run_record(config: Any, workdir: epath.Path, *, mode: str) -> epath.Path | None:
  """Writes ``config.json`` (train) / ``config_eval.json`` (eval) on process 0."""
  import jax

  if jax.process_index() != 0:
    return None
  name = CONFIG_FILE if mode == "train" else EVAL_CONFIG_FILE
  return fss_io.atomic_write(workdir / name, json.dumps(run_record(config, mode=mode), indent=1))


def read_run_config(workdir: str | os.PathLike) -> Mapping[str, Any] | None:
  """The ``config`` of a workdir's ``config.json`` (None when absent or unreadable)."""
  try:
    return json.loads((fss_io.user_path(workdir) / CONFIG_FILE).read_text()).get("config")
  except (OSError, ValueError, AttributeError):
    return None


class TextLog:
  """The open ``log.txt`` of a run: ``path``, and `write_exception` for tracebacks that
  belong in the file but not on the console (user mistakes print one line there)."""

  def __init__(self, path: epath.Path, handler: logging.Handler, mirror: fss_io.LocalMirror):
    self.path = path
    self._handler = handler
    self._mirror = mirror

  def sync(self, *unused) -> None:
    """Uploads the log now (a gs:// workdir; nothing to do for a local one). A failed upload is
    logged, never raised: the background upload and the one at exit try again."""
    self._handler.flush()
    try:
      self._mirror.sync()
    except Exception:  # the store's errors (gcsfs, network)
      logging.warning("could not upload %s; trying again later", self.path, exc_info=True)

  def write_exception(self, message: str) -> None:
    record = logging.LogRecord("fss_jax", logging.ERROR, __file__, 0, message, None, sys.exc_info())
    self._handler.handle(record)
    self._handler.flush()
    self._mirror.sync()


@contextlib.contextmanager
def text_log(workdir: epath.Path, level: int = logging.INFO) -> Iterator[TextLog]:
  """Appends every log record of the run (absl and python logging) to ``workdir/log.txt``
  (for a ``gs://`` workdir: to a local copy uploaded every 30 s and at exit)."""
  workdir.mkdir(parents=True, exist_ok=True)
  mirror = fss_io.LocalMirror(workdir, files=(LOG_FILE,), every_s=30.0)
  handler = logging.FileHandler(os.path.join(mirror.local, LOG_FILE), encoding="utf-8")
  handler.setLevel(level)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = logging.getLogger()
  old_level = root.level
  root.addHandler(handler)
  if root.level > level or root.level == logging.NOTSET:
    root.setLevel(level)
  try:
    yield TextLog(workdir / LOG_FILE, handler, mirror)
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
    handler.close()
    mirror.close()


# ---------------------------------------------------------------------------
# One run per workdir, and start-up checks
# ---------------------------------------------------------------------------


class WorkdirError(Exception):
  """The workdir cannot take this run: another run holds it, it is not writable, or its disk
  has no room for a checkpoint. The message says what to do."""


_HELD: dict[str, int] = {}  # realpath of a workdir -> the fd of its lock, held by this process


def _close_locks_in_child() -> None:
  """A forked child (a data worker) drops its copy of the lock, so that a kill -9 of the run
  releases the workdir even while such a child lives on."""
  for fd in _HELD.values():
    try:
      os.close(fd)
    except OSError:
      pass
  _HELD.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def _not_writable(workdir: epath.Path, error: OSError) -> WorkdirError:
  reason = "it is a file" if workdir.is_file() else (error.strerror or str(error))
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    todo = "free some space or choose another --workdir"
  else:
    todo = "choose a writable --workdir (or fix its permissions)"
  return WorkdirError(f"cannot write to workdir {workdir}: {reason}; {todo}")


def check_writable(workdir: epath.Path) -> None:
  """Creates ``workdir`` and writes and removes a probe file in it.

  Raises:
    WorkdirError: the workdir cannot be created or written (read-only, permissions, a file,
      a full disk).
  """
  probe = workdir / f".write_probe.{os.getpid()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      probe.write_bytes(b"fss_jax")
    finally:
      if probe.exists():
        probe.unlink()
  except OSError as e:
    raise _not_writable(workdir, e) from e


def _holder(path: epath.Path) -> tuple[str, str]:
  """(pid, host) written into a lock file by its holder ("?" while unreadable)."""
  for _ in range(20):  # the holder writes right after taking the lock
    try:
      info = json.loads(path.read_text())
      return str(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "?", "?"


@contextlib.contextmanager
def lock(workdir: epath.Path) -> Iterator[None]:
  """Holds ``workdir/.lock`` for one run: an exclusive ``flock`` with the holder's pid and host
  in the file. The OS releases it when the process ends, ``kill -9`` included. A ``gs://``
  workdir is not locked (no file locks on an object store; every host of a pod opens it).

  Raises:
    WorkdirError: another process holds the workdir, or it cannot be written.
  """
  if fss_io.is_remote(workdir):
    logging.info("workdir %s is on an object store: not locked against other runs", workdir)
    _HELD[os.fspath(workdir)] = -1
    try:
      yield
    finally:
      _HELD.pop(os.fspath(workdir), None)
    return
  path = workdir / LOCK_FILE
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise _not_writable(workdir, e) from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if not isinstance(e, BlockingIOError):
      raise WorkdirError(
        f"cannot lock workdir {workdir}: {e.strerror or e}; use a workdir on a "
        f"file system with file locks"
      ) from e
    pid, host = _holder(path)
    raise WorkdirError(
      f"workdir {workdir} is in use by pid {pid} on host {host} (another fss_jax "
      f"run); wait for it or choose another --workdir"
    ) from None
  key = os.path.realpath(workdir)
  _HELD[key] = fd
  try:
    os.ftruncate(fd, 0)
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    yield
  finally:
    _HELD.pop(key, None)
    os.close(fd)


def holds_lock(workdir: epath.Path) -> bool:
  """Whether this process holds ``workdir``'s lock (`lock`)."""
  if fss_io.is_remote(workdir):
    return os.fspath(workdir) in _HELD
  return os.path.realpath(workdir) in _HELD


def metric_writer(workdir: epath.Path, *, just_logging: bool):
  """clu's default writer (TensorBoard event files + the log) for ``workdir``.

  TensorFlow writes the event files; for a ``gs://`` workdir they go to a local mirror that
  every ``flush`` uploads (`fss_jax.io.LocalMirror`), so all our object-store traffic goes
  through one client. ``close`` uploads the last events.
  """
  from clu import metric_writers

  if just_logging or not fss_io.is_remote(workdir):
    return metric_writers.create_default_writer(
      os.fspath(workdir), just_logging=just_logging, asynchronous=True
    )
  mirror = fss_io.LocalMirror(workdir)
  inner = metric_writers.create_default_writer(mirror.local, asynchronous=True)

  class _MirroredWriter(metric_writers.MetricWriter):
    """Delegates every write to ``inner``; flush / close also upload the event files."""

    def write_summaries(self, step, values, metadata=None):
      inner.write_summaries(step, values, metadata)

    def write_scalars(self, step, scalars):
      inner.write_scalars(step, scalars)

    def write_images(self, step, images):
      inner.write_images(step, images)

    def write_videos(self, step, videos):
      inner.write_videos(step, videos)

    def write_audios(self, step, audios, *, sample_rate):
      inner.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
      inner.write_texts(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
      inner.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams):
      inner.write_hparams(hparams)

    def flush(self):
      inner.flush()
      mirror.sync()

    def close(self):
      inner.close()
      mirror.close()

  return _MirroredWriter()


def tree_nbytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
  import jax
  import numpy as np

  return sum(
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
    if hasattr(x, "shape") and hasattr(x, "dtype")
  )


def _bytes(n: int) -> str:
  """1536 -> '1.5 KiB'."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} bytes"


def check_room(workdir: epath.Path, needed: int) -> None:
  """Refuses a workdir whose disk has less than ``needed`` bytes free (one checkpoint); an
  object store (``gs://``) has no such limit to read.

  Raises:
    WorkdirError: naming both numbers.
  """
  if fss_io.is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise WorkdirError(
      f"not enough disk space in {workdir} for one checkpoint: the train state (parameters, "
      f"optimiser state, batch statistics) needs about {_bytes(needed)}, {_bytes(free)} are "
      f"free; free some space or choose another --workdir"
    )


def remove_unfinished_saves(folders: Iterable[epath.Path]) -> list[epath.Path]:
  """Removes the temporary folders of saves a killed run left in ``folders`` (orbax's
  ``<step>.orbax-checkpoint-tmp*``; on gs://, step folders without ``commit_success.txt``),
  logging one line each; returns them.

  Call it only while holding the workdir's `lock`: a live run's save in progress looks the same.
  """
  removed = []
  for folder in folders:
    if not folder.is_dir():
      continue
    for path in sorted(folder.iterdir()):
      if fss_io.is_remote(path):
        unfinished = path.name.isdigit() and not (path / FINISHED_SAVE_MARK_GCS).exists()
      else:
        unfinished = UNFINISHED_SAVE_MARK in path.name and path.is_dir()
      if unfinished:
        path.rmtree()
        logging.info("removed %s: the unfinished save of a run that was stopped", path)
        removed.append(path)
  return removed


__all__ = [
  "write_run_record",
  "read_run_config",
  "run_record",
  "text_log",
  "TextLog",
  "git_commit",
  "CONFIG_FILE",
  "EVAL_CONFIG_FILE",
  "LOG_FILE",
  "LOCK_FILE",
  "WorkdirError",
  "check_writable",
  "lock",
  "holds_lock",
  "metric_writer",
  "tree_nbytes",
  "check_room",
  "remove_unfinished_saves",
]
