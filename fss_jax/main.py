"""Command-line entry point: train or evaluate one configuration.

  python -m fss_jax.main --config configs/panet.py:dataset=pascal5i,fold=0,shot=1 \\
      --workdir /tmp/panet_f0 --mode train [--config.key=value ...]
  python -m fss_jax.main --config configs/panet.py:dataset=pascal5i,fold=0,shot=1 \\
      --workdir /tmp/panet_f0 --mode eval

``--mode train`` resumes from the workdir when it holds a checkpoint; ``--mode eval``
scores the workdir's best checkpoint (or ``--config.init`` converted weights) on
the stored test episodes of every ``config.eval.seeds`` and writes a results JSON.
The last stdout line is a JSON summary. Exit status: 0 done, 1 training stopped
(NaN/Inf loss), 2 bad input (config, data, checkpoint; a workdir in use by another
run, not writable, or without room for a checkpoint), 3 a checkpoint could not be
written (disk full, I/O error; a rerun resumes from the last complete one), with a
message saying what to do; 143 / 130 stopped by SIGTERM (preemption) / SIGINT
(Ctrl-C): during training the interrupted step is saved first, and a rerun resumes
from it. One run at a time per workdir: the run holds ``<workdir>/.lock``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import pathlib
import re
import sys
from typing import NoReturn

# Before TensorFlow (TFDS, clu's writers) and jaxlib load: their C++ INFO lines (oneDNN and
# CPU-feature notes) say nothing to a user of this command; warnings and errors still print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import (
  app,
  flags,
  logging,
)
from etils import epath
from ml_collections import config_flags

from fss_jax import io as fss_io

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file and argument, e.g. configs/panet.py:dataset=pascal5i,fold=0,shot=1.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes) or eval.")

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=.*)?$")


def _fail(message: str, code: int = 2) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _flat_keys(cfg, prefix: str = "", leaves_only: bool = False) -> list[str]:
  keys = []
  for k in cfg.keys():
    v = cfg[k]
    path = f"{prefix}{k}"
    node = hasattr(v, "keys") and hasattr(v, "lock")
    if not (node and leaves_only):
      keys.append(path)
    if node:
      keys += _flat_keys(v, path + ".", leaves_only)
  return keys


def _config_spec(argv: list[str]) -> str | None:
  """The value of ``--config`` in argv ("configs/panet.py:smoke"), or None."""
  spec = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec or None


def missing_config_message(argv: list[str]) -> str | None:
  """'config file X not found; close matches: ...' when ``--config`` names no file (or a file
  without ``get_config``).

  ml_collections defers that error to the first use of the config (a double traceback);
  this checks before the flags are parsed. Close matches are the config files (those that
  define ``get_config``) in the named folder, else in the repository's ``configs/``.
  """
  spec = _config_spec(argv)
  if spec is None:
    return None
  path = pathlib.Path(os.path.expanduser(spec.partition(":")[0]))
  if path.is_file() and _defines_get_config(path):
    return None
  if path.is_dir():
    folder, shown = path, str(path)
  elif path.parent.is_dir():
    folder, shown = path.parent, str(path.parent)
  else:
    folder, shown = pathlib.Path(__file__).parents[1] / "configs", "configs"
  stems = [p.stem for p in sorted(folder.glob("*.py")) if _defines_get_config(p)]
  if path.is_dir():
    return (
      f"--config {path} is a folder; pass a config file, e.g. "
      f"{', '.join(f'{shown}/{s}.py' for s in stems[:4]) or 'configs/panet.py'}"
    )
  within = [s for s in stems if path.stem in s and s != path.stem]  # pahnet -> sccan_pahnet
  close = (
    within
    + [s for s in difflib.get_close_matches(path.stem, stems, n=3, cutoff=0.6) if s not in within]
  )[:3]
  hint = f"; close matches: {', '.join(f'{shown}/{s}.py' for s in close)}" if close else ""
  if path.is_file():  # e.g. configs/pahnet.py: what two configs share
    return f"{path} is not a run configuration (it defines no get_config){hint}"
  return f"config file {path} not found{hint}"


def _defines_get_config(path: pathlib.Path) -> bool:
  try:
    return re.search(r"^def get_config\(", path.read_text(errors="replace"), re.M) is not None
  except OSError:
    return False


def _load_config_file(argv: list[str]):
  spec = _config_spec(argv)
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_fss_config", path)
  if mod_spec is None or mod_spec.loader is None or not pathlib.Path(path).is_file():
    return None
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


def unknown_override_message(argv: list[str]) -> str | None:
  """'unknown config key ...; did you mean ...' for the first bad ``--config.x`` in argv."""
  try:
    cfg = _load_config_file(argv)
  except Exception:
    return None
  if cfg is None:
    return None
  keys = _flat_keys(cfg)
  leaves = _flat_keys(cfg, leaves_only=True)
  for a in argv:
    m = _OVERRIDE.match(a)
    if not m or m.group(1) in keys:
      continue
    key = m.group(1)
    close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
    if not close:  # match on the last component, e.g. 'data.dir' -> 'data.data_dir'
      last = key.rsplit(".", 1)[-1]
      names = difflib.get_close_matches(
        last, [k.rsplit(".", 1)[-1] for k in leaves], n=3, cutoff=0.6
      )
      close = [k for k in leaves if k.rsplit(".", 1)[-1] in names][:3]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return f"unknown config key {key!r}{hint}"
  return None


def _last_error_line(text: str) -> str:
  """The final 'SomeError: message' line of a traceback embedded in a flag error."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  for line in reversed(lines):
    if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line):
      return line.split(": ", 1)[1]
  return lines[0] if lines else text


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with readable errors for config mistakes."""
  missing = missing_config_message(argv)
  if missing:
    _fail(missing)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = unknown_override_message(argv)
    if msg is None and "Error whilst parsing config file" in str(e):
      msg = f"bad --config argument: {_last_error_line(str(e))}"
    _fail(msg or f"{e}\nPass --helpshort for the flags.")
  except (AttributeError, KeyError) as e:
    msg = unknown_override_message(argv)
    _fail(msg or f"bad --config override: {e}")
  except ValueError as e:  # raised by a config's get_config(arg)
    _fail(f"bad --config argument: {e}")
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config configs/panet.py:dataset=pascal5i,fold=0,shot=1")
  if not _WORKDIR.value:
    _fail("--workdir is required (checkpoints, logs and results go there)")
  # Imported here so that flag errors are reported without loading JAX.
  from fss_jax.train import runtime

  runtime.quiet_library_logs()
  config = _CONFIG.value
  workdir = fss_io.user_path(_WORKDIR.value)
  with contextlib.ExitStack() as stack:
    _claim_workdir(config, workdir, stack)
    summary = _run(config, workdir)
  print(json.dumps(summary, default=str))


def _claim_workdir(config, workdir: epath.Path, stack: contextlib.ExitStack) -> None:
  """Before anything is written: the workdir is writable and no other run holds it (process 0
  takes its lock, held until ``stack`` closes)."""
  import jax

  from fss_jax import parallel
  from fss_jax.train import workdir as workdir_lib

  try:
    parallel.initialize(config.distributed)  # process_index() is only right after this
    workdir_lib.check_writable(workdir)
    if jax.process_index() == 0:
      stack.enter_context(workdir_lib.lock(workdir))
  except (ValueError, workdir_lib.WorkdirError) as e:
    _fail(str(e))


def _run(config, workdir: epath.Path) -> dict:
  """``--mode train`` / ``eval`` with the text log; errors become one line and an exit status."""
  from fss_jax.data import source
  from fss_jax.eval import run as eval_run
  from fss_jax.models import registry
  from fss_jax.train import checkpointing, loop
  from fss_jax.train import state as state_lib
  from fss_jax.train import workdir as workdir_lib

  with workdir_lib.text_log(workdir) as log:
    logging.info(
      "fss_jax.main --mode %s --workdir %s (%s)", _MODE.value, workdir, " ".join(sys.argv)
    )
    try:
      if _MODE.value == "train":
        summary = loop.train_and_evaluate(config, workdir, on_checkpoint=log.sync)
      else:
        summary = eval_run.evaluate(config, workdir)
        summary.pop("tables", None)
    except loop.NonFiniteLossError as e:
      log.write_exception("run stopped")
      _fail(str(e), code=1)
    except checkpointing.CheckpointSaveError as e:
      log.write_exception("run stopped")
      _fail(str(e), code=3)
    except loop.TrainingInterrupted as e:
      logging.info("%s", e)
      print(str(e), file=sys.stderr)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, evaluation)
      logging.info("interrupted")
      print(f"interrupted; {workdir} keeps every checkpoint written so far", file=sys.stderr)
      sys.exit(130)
    except state_lib.InitMismatchError as e:
      # A diagnosis on the console; the keys of each side in log.txt (hundreds for a model).
      log.write_exception("run failed" + (f"\n{e.details}" if e.details else ""))
      _fail(f"{e}" + (f"\n  every key is listed in {log.path}" if e.details else ""))
    except (
      source.DatasetNotReadyError,
      checkpointing.WorkdirMismatchError,
      checkpointing.CheckpointDamagedError,
      workdir_lib.WorkdirError,
      registry.UnsupportedModelError,
      FileNotFoundError,
      ValueError,
    ) as e:
      log.write_exception("run failed")  # the traceback goes to log.txt, one line to the console
      _fail(str(e))
  return summary


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
