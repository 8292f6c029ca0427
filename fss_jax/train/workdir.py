"""What a workdir says about the run that made it, and the guards that keep it to one run.

Like the ``exp/`` folders of the reference repositories, a workdir explains itself:

* ``config.json`` -- the resolved config of the last ``--mode train`` run (every field,
  after the command-line overrides), the library versions, host, devices, process count,
  command line and the git commit of the checkout. `fss_jax.predict` reads the test size
  and resize of a workdir checkpoint from it. ``--mode eval`` writes ``config_eval.json``.
* ``log.txt`` -- the plain-text log of every run in the workdir, appended.
* ``.lock`` -- held (``flock``) by the run using the workdir, with its pid and host; the OS
  releases it when that process ends, even by ``kill -9`` (`lock`).

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
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Iterable, Iterator, Mapping

from fss_jax import io as fss_io

CONFIG_FILE = "config.json"
EVAL_CONFIG_FILE = "config_eval.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
# orbax-checkpoint (0.12.8) writes a step into ``<step>.orbax-checkpoint-tmp`` (older versions
# add ``-<timestamp>``) and renames it when the save is complete (atomicity.TMP_DIR_SUFFIX).
UNFINISHED_SAVE_MARK = ".orbax-checkpoint-tmp"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain",
             "tensorflow-datasets", "ml-collections")


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def git_commit(path: pathlib.Path | None = None) -> str | None:
  """HEAD of the checkout holding this package (None outside a git checkout)."""
  root = path or pathlib.Path(__file__).resolve().parents[2]
  try:
    out = subprocess.run(["git", "-C", os.fspath(root), "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_record(config: Any, *, mode: str) -> dict[str, Any]:
  """The document written to ``config.json``: {"mode", "config", "versions", ...}."""
  import jax  # pylint: disable=g-import-not-at-top
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  devices = jax.devices()
  return _jsonable({
      "mode": mode, "config": cfg, "versions": _versions(), "host": socket.gethostname(),
      "platform": devices[0].platform if devices else None,
      "devices": [str(d) for d in devices], "process_count": jax.process_count(),
      "argv": sys.argv, "git_commit": git_commit(),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def write_run_record(config: Any, workdir: pathlib.Path, *, mode: str) -> pathlib.Path | None:
  """Writes ``config.json`` (train) / ``config_eval.json`` (eval) on process 0."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return None
  name = CONFIG_FILE if mode == "train" else EVAL_CONFIG_FILE
  return fss_io.atomic_write(workdir / name, json.dumps(run_record(config, mode=mode), indent=1))


def read_run_config(workdir: pathlib.Path) -> Mapping[str, Any] | None:
  """The ``config`` of a workdir's ``config.json`` (None when absent or unreadable)."""
  try:
    return json.loads((pathlib.Path(workdir) / CONFIG_FILE).read_text()).get("config")
  except (OSError, ValueError, AttributeError):
    return None


class TextLog:
  """The open ``log.txt`` of a run: ``path``, and `write_exception` for tracebacks that
  belong in the file but not on the console (user mistakes print one line there)."""

  def __init__(self, path: pathlib.Path, handler: logging.Handler):
    self.path = path
    self._handler = handler

  def write_exception(self, message: str) -> None:
    record = logging.LogRecord("fss_jax", logging.ERROR, __file__, 0, message, None,
                               sys.exc_info())
    self._handler.handle(record)


@contextlib.contextmanager
def text_log(workdir: pathlib.Path, level: int = logging.INFO) -> Iterator[TextLog]:
  """Appends every log record of the run (absl and python logging) to ``workdir/log.txt``."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOG_FILE
  handler = logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(level)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = logging.getLogger()
  old_level = root.level
  root.addHandler(handler)
  if root.level > level or root.level == logging.NOTSET:
    root.setLevel(level)
  try:
    yield TextLog(path, handler)
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
    handler.close()


# ---------------------------------------------------------------------------
# One run per workdir, and start-up checks
# ---------------------------------------------------------------------------

class WorkdirError(Exception):
  """The workdir cannot take this run: another run holds it, it is not writable, or its disk
  has no room for a checkpoint. The message says what to do."""


_HELD: dict[str, int] = {}   # realpath of a workdir -> the fd of its lock, held by this process


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


def _not_writable(workdir: pathlib.Path, error: OSError) -> WorkdirError:
  reason = "it is a file" if workdir.is_file() else (error.strerror or str(error))
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    todo = "free some space or choose another --workdir"
  else:
    todo = "choose a writable --workdir (or fix its permissions)"
  return WorkdirError(f"cannot write to workdir {workdir}: {reason}; {todo}")


def check_writable(workdir: pathlib.Path) -> None:
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


def _holder(path: pathlib.Path) -> tuple[str, str]:
  """(pid, host) written into a lock file by its holder ("?" while unreadable)."""
  for _ in range(20):   # the holder writes right after taking the lock
    try:
      info = json.loads(path.read_text())
      return str(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "?", "?"


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds ``workdir/.lock`` for one run: an exclusive ``flock`` with the holder's pid and host
  in the file. The OS releases it when the process ends, ``kill -9`` included.

  Raises:
    WorkdirError: another process holds the workdir, or it cannot be written.
  """
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
      raise WorkdirError(f"cannot lock workdir {workdir}: {e.strerror or e}; use a workdir on a "
                         f"file system with file locks") from e
    pid, host = _holder(path)
    raise WorkdirError(f"workdir {workdir} is in use by pid {pid} on host {host} (another fss_jax "
                       f"run); wait for it or choose another --workdir") from None
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


def holds_lock(workdir: pathlib.Path) -> bool:
  """Whether this process holds ``workdir``'s lock (`lock`)."""
  return os.path.realpath(workdir) in _HELD


def tree_nbytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape") and hasattr(x, "dtype"))


def _bytes(n: int) -> str:
  """1536 -> '1.5 KiB'."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} bytes"


def check_room(workdir: pathlib.Path, needed: int) -> None:
  """Refuses a workdir whose disk has less than ``needed`` bytes free (one checkpoint).

  Raises:
    WorkdirError: naming both numbers.
  """
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise WorkdirError(
        f"not enough disk space in {workdir} for one checkpoint: the train state (parameters, "
        f"optimiser state, batch statistics) needs about {_bytes(needed)}, {_bytes(free)} are "
        f"free; free some space or choose another --workdir")


def remove_unfinished_saves(folders: Iterable[pathlib.Path]) -> list[pathlib.Path]:
  """Removes the temporary folders of saves a killed run left in ``folders`` (orbax's
  ``<step>.orbax-checkpoint-tmp*``), logging one line each; returns them.

  Call it only while holding the workdir's `lock`: a live run's save in progress looks the same.
  """
  removed = []
  for folder in folders:
    if not folder.is_dir():
      continue
    for path in sorted(folder.iterdir()):
      if UNFINISHED_SAVE_MARK in path.name and path.is_dir():
        shutil.rmtree(path)
        logging.info("removed %s: the unfinished save of a run that was stopped", path)
        removed.append(path)
  return removed


__all__ = ["write_run_record", "read_run_config", "run_record", "text_log", "TextLog", "git_commit",
           "CONFIG_FILE", "EVAL_CONFIG_FILE", "LOG_FILE", "LOCK_FILE", "WorkdirError",
           "check_writable", "lock", "holds_lock", "tree_nbytes", "check_room",
           "remove_unfinished_saves"]
