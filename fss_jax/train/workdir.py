"""What a workdir says about the run that made it: ``config.json`` and ``log.txt``.

Like the ``exp/`` folders of the reference repositories, a workdir explains itself:

* ``config.json`` -- the resolved config of the last ``--mode train`` run (every field,
  after the command-line overrides), the library versions, host, devices, process count,
  command line and the git commit of the checkout. `fss_jax.predict` reads the test size
  and resize of a workdir checkpoint from it. ``--mode eval`` writes ``config_eval.json``.
* ``log.txt`` -- the plain-text log of every run in the workdir, appended.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import platform
import socket
import subprocess
import sys
from typing import Any, Iterator, Mapping

from fss_jax import io as fss_io

CONFIG_FILE = "config.json"
EVAL_CONFIG_FILE = "config_eval.json"
LOG_FILE = "log.txt"
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


__all__ = ["write_run_record", "read_run_config", "run_record", "text_log", "TextLog", "git_commit",
           "CONFIG_FILE", "EVAL_CONFIG_FILE", "LOG_FILE"]
