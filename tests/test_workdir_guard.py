"""Issue 20 (reliability) at the training entry point: one run per workdir, start-up checks
(writable, room for a checkpoint, input sizes), leftovers of killed saves, failed saves.

The engine parts run in-process on `test_engine`'s tiny model; the entry-point parts run
``python -m fss_jax.main`` and stop before any training step (fast).
"""

from __future__ import annotations

import collections
import errno
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import test_engine as te

from fss_jax.models import registry
from fss_jax.train import checkpointing, loop, runtime
from fss_jax.train import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(name="tiny_model")
def _tiny_model(monkeypatch):
  """Registers `test_engine`'s tiny model (``tiny_test``) for the in-process engine runs."""
  monkeypatch.setitem(registry._MODULES, "tiny_test", te.__name__)


def _main(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "fss_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


_HOLD = (
  "import pathlib, sys, time\n"
  "from fss_jax.train import workdir\n"
  "with workdir.lock(pathlib.Path(sys.argv[1])):\n"
  "  print('locked', flush=True)\n"
  "  time.sleep(600)\n"
)


# -- one run per workdir ----------------------------------------------------------------------


def test_a_second_run_on_a_locked_workdir_exits_2_and_touches_nothing(tmp_path):
  work = tmp_path / "w"
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    expected = (
      f"error: workdir {work} is in use by pid {holder.pid} on host "
      f"{socket.gethostname()} (another fss_jax run); wait for it or choose another "
      f"--workdir"
    )
    for mode in ("train", "eval"):
      r = _main(
        "--config",
        "configs/panet.py:smoke",
        "--workdir",
        str(work),
        "--mode",
        mode,
        f"--config.data.data_dir={tmp_path / 'no_data'}",
      )
      assert r.returncode == 2, r.stderr[-3000:]
      assert expected in r.stderr and "Traceback" not in r.stderr
      # no log, no config.json, no checkpoint folders, no TensorBoard events
      assert os.listdir(work) == [workdir_lib.LOCK_FILE]
  finally:
    holder.kill()  # SIGKILL: the OS releases the lock
    holder.wait(timeout=60)
    holder.stdout.close()
  with workdir_lib.lock(work):
    assert workdir_lib.holds_lock(work)
    assert str(os.getpid()) in (work / workdir_lib.LOCK_FILE).read_text()
  assert not workdir_lib.holds_lock(work)


def test_the_lock_is_not_shared_within_a_process(tmp_path):
  with workdir_lib.lock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by pid {os.getpid()} on host"):
      with workdir_lib.lock(tmp_path):
        pass


# -- start-up checks --------------------------------------------------------------------------


def test_a_workdir_that_cannot_be_written_exits_2_with_one_line(tmp_path):
  """A real refusal by the OS that holds for root too: the workdir's parent is a file."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  work = blocker / "w"
  r = _main(
    "--config",
    "configs/panet.py:smoke",
    "--workdir",
    str(work),
    f"--config.data.data_dir={tmp_path / 'no_data'}",
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"error: cannot write to workdir {work}: Not a directory; choose a writable" in r.stderr
  assert "Traceback" not in r.stderr
  with pytest.raises(
    workdir_lib.WorkdirError, match=f"cannot write to workdir {blocker}: it is a file"
  ):
    workdir_lib.check_writable(blocker)


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_a_read_only_workdir_is_refused(tmp_path, monkeypatch, err):
  """chmod does not stop root, so the probe write fails as it does on a read-only mount."""

  def refuse(self, data):
    raise OSError(err, os.strerror(err), str(self))

  monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
  with pytest.raises(
    workdir_lib.WorkdirError,
    match=f"cannot write to workdir {tmp_path}: {os.strerror(err)}; choose",
  ):
    workdir_lib.check_writable(tmp_path)


@pytest.mark.usefixtures("tiny_model")
def test_no_room_for_one_checkpoint_stops_before_anything_is_saved(tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 1000))
  cfg = te.tiny_config(**{"eval.every_steps": 0})
  needed = r"\d+\.\d KiB"  # the tiny model's params, optimiser state and batch statistics
  with pytest.raises(
    workdir_lib.WorkdirError,
    match=rf"not enough disk space in {tmp_path} for one checkpoint: the train "
    rf"state \(parameters, optimiser state, batch statistics\) needs about "
    rf"{needed}, 1000 bytes are free; free some space",
  ):
    loop.train_and_evaluate(cfg, tmp_path, data=te.fake_data(cfg))
  assert not (tmp_path / checkpointing.CHECKPOINT_DIR).exists()


def test_check_room_names_both_sizes(tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda path: usage(0, 0, 3 * 2**20))
  workdir_lib.check_room(tmp_path, 2 * 2**20)
  with pytest.raises(workdir_lib.WorkdirError, match=r"needs about 5\.0 MiB, 3\.0 MiB are free"):
    workdir_lib.check_room(tmp_path, 5 * 2**20)


# -- leftovers of killed saves ----------------------------------------------------------------


@pytest.mark.usefixtures("tiny_model")
def test_unfinished_saves_are_removed_at_the_next_start_under_the_lock(tmp_path, caplog):
  """orbax (0.12.8) leaves ``<step>.orbax-checkpoint-tmp`` when a save is killed and removes it
  only when it saves that same step again (CheckpointManagerOptions.cleanup_tmp_directories is
  off by default)."""
  cfg = te.tiny_config(**{"eval.every_steps": 0, "total_steps": 4})
  loop.train_and_evaluate(cfg, tmp_path, data=te.fake_data(cfg))
  leftovers = [
    tmp_path / checkpointing.CHECKPOINT_DIR / "5.orbax-checkpoint-tmp",
    tmp_path / checkpointing.BEST_DIR / "3.orbax-checkpoint-tmp-1733560000",
  ]
  for d in leftovers:
    (d / "state").mkdir(parents=True)
    (d / "state" / "partial").write_bytes(b"\0" * 100)

  loop.train_and_evaluate(cfg, tmp_path, data=te.fake_data(cfg))  # without the lock: kept
  assert all(d.is_dir() for d in leftovers)
  longer = te.tiny_config(**{"eval.every_steps": 0, "total_steps": 6})
  with caplog.at_level("INFO"), workdir_lib.lock(tmp_path):
    summary = loop.train_and_evaluate(longer, tmp_path, data=te.fake_data(longer))
  assert summary["resumed_from"] == "workdir" and summary["step"] == 6
  assert not any(d.exists() for d in leftovers)
  for d in leftovers:
    assert f"removed {d}: the unfinished save of a run that was stopped" in caplog.text


# -- failed saves -----------------------------------------------------------------------------


def _fail_finalize_of_step(monkeypatch, step: int):
  """The save of ``step`` fails where a full disk makes it fail: while its files are written
  (for an async save, in orbax's background thread)."""
  import orbax.checkpoint as ocp

  original = ocp.CompositeCheckpointHandler.finalize

  def finalize(self, directory):
    if pathlib.Path(directory).name.split(".")[0] == str(step):
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, directory)

  monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", finalize)


@pytest.mark.usefixtures("tiny_model")
@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_stops_the_run_with_one_error(tmp_path, monkeypatch, async_save):
  _fail_finalize_of_step(monkeypatch, 4)
  cfg = te.tiny_config(
    **{"eval.every_steps": 0, "total_steps": 8, "checkpoint.async_save": async_save}
  )
  folder = tmp_path / checkpointing.CHECKPOINT_DIR
  with pytest.raises(checkpointing.CheckpointSaveError) as e:
    loop.train_and_evaluate(cfg, tmp_path, data=te.fake_data(cfg))
  assert str(e.value) == (
    f"saving checkpoint of step 4 to {folder} failed: No space left on "
    f"device; free disk space (or fix {folder}) and rerun: a rerun resumes "
    f"from checkpoint 2"
  )
  assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["2"]


class _FakeManager:
  """An async CheckpointManager whose save of step 2 is still writing, then fails as tensorstore
  does on a full disk (the message of a real one, shortened)."""

  def __init__(self):
    self.writing, self.waits = True, 0

  def latest_step(self):
    return None

  def save(self, step, args):
    del step, args
    return True

  def is_saving_in_progress(self):
    return self.writing

  def wait_until_finished(self):
    self.waits += 1
    raise ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.conv1_1.bias/0" in OCDBT database '
      'at local file "/w/checkpoints/2.orbax-checkpoint-tmp/state.orbax-checkpoint-'
      'tmp/ocdbt.process_0/": Failed to write 55074816 bytes to file 8: No space '
      "left on device [os_error_code='28']"
    )


def test_an_async_save_failure_surfaces_at_the_next_step_boundary(tmp_path):
  mngr = _FakeManager()
  saver = checkpointing.Saver(mngr, tmp_path)
  saver.save(2, args=None)
  saver.check()  # still writing: the step goes on, nothing waits
  assert mngr.waits == 0
  mngr.writing = False  # the background save failed
  with pytest.raises(
    checkpointing.CheckpointSaveError,
    match=rf"^saving checkpoint of step 2 to {tmp_path} failed: No space left "
    rf"on device; .*no checkpoint is complete yet",
  ):
    saver.check()


def test_a_failed_save_exits_3_with_one_line_through_main(tmp_path):
  """main's side of it (the loop's side runs above with real orbax saves)."""
  work = tmp_path / "w"
  code = (
    "import sys\n"
    "from fss_jax.train import checkpointing, loop\n"
    "def train(config, workdir, **kwargs):\n"
    "  raise checkpointing.CheckpointSaveError('saving checkpoint of step 1 to X failed: disk "
    "full')\n"
    "loop.train_and_evaluate = train\n"
    "from fss_jax import main\n"
    "sys.argv[0] = 'fss_jax.main'\n"
    "main.run()\n"
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-c", code, "--config", "configs/panet.py:smoke", "--workdir", str(work)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 3, r.stderr[-3000:]
  assert "error: saving checkpoint of step 1 to X failed: disk full" in r.stderr
  assert "Traceback" not in r.stderr
  log = (work / workdir_lib.LOG_FILE).read_text()
  assert "run stopped" in log and "Traceback" in log


def test_orbax_tracebacks_of_a_failed_save_stay_off_the_console():
  """orbax logs the failed background save with its traceback (twice); the loop reports it in
  one line, and log.txt (another handler) keeps the records."""
  import logging

  quiet = runtime._QuietLibraries()
  path = "/venv/site-packages/orbax/checkpoint/_src/checkpointers/async_checkpointer.py"
  try:
    raise OSError(errno.ENOSPC, "No space left on device")
  except OSError:
    exc_info = sys.exc_info()
  failed = logging.LogRecord(
    "absl", logging.ERROR, path, 1, "Failed to run 4 Handler Commit operations", None, exc_info
  )
  other = logging.LogRecord("absl", logging.ERROR, path, 1, "something else", None, None)
  ours = logging.LogRecord("absl", logging.ERROR, "/fss_jax/train/loop.py", 1, "x", None, exc_info)
  assert not quiet.filter(failed)
  assert quiet.filter(other) and quiet.filter(ours)
  # tensorstore's callbacks into the event loop orbax closed after the failure
  seen = []
  hook = runtime._without_closed_loop_noise(seen.append)
  unraisable = collections.namedtuple(
    "unraisable", "exc_type exc_value exc_traceback err_msg object"
  )
  hook(unraisable(RuntimeError, RuntimeError("Event loop is closed"), None, None, None))
  assert not seen
  hook(unraisable(RuntimeError, RuntimeError("other"), None, None, None))
  assert len(seen) == 1


# -- input sizes ------------------------------------------------------------------------------


def test_every_registered_model_declares_a_positive_minimum_input_size():
  for name in registry.names():
    minimum = registry.get(name).min_size()
    assert isinstance(minimum, int) and minimum > 0, (name, minimum)
  from configs import jc2a

  smoke = jc2a.get_config("smoke").model_fields.to_dict()  # relative pyramid down to 1/8
  assert registry.get("jc2a").min_size(smoke) == 57


def test_ssp_minimum_is_where_its_top_k_starts_to_fit():
  """The declared minimum is real: one pixel less and SSP's self-support top-12 fails."""
  import jax
  import numpy as np

  from fss_jax.train import state as state_lib

  spec = registry.get("ssp")
  model = spec.make_model()

  def forward(size):
    ep = {
      "query_image": np.zeros((1, size, size, 3), np.float32),
      "support_images": np.zeros((1, 1, size, size, 3), np.float32),
      "support_masks": np.ones((1, 1, size, size), np.int32),
    }
    jax.eval_shape(
      lambda e: model.apply(
        state_lib.init_variables(model, e, jax.random.PRNGKey(0)), e, train=False
      ),
      ep,
    )

  forward(spec.min_size())
  with pytest.raises(ValueError, match="top_k"):
    forward(spec.min_size() - 1)


@pytest.mark.parametrize("mode,key", [("train", "train_size"), ("eval", "test_size")])
def test_an_input_size_below_the_model_minimum_exits_2(tmp_path, mode, key):
  r = _main(
    "--config",
    "configs/pspnet.py:smoke",
    "--workdir",
    str(tmp_path / "w"),
    "--mode",
    mode,
    f"--config.data.data_dir={tmp_path / 'no_data'}",
    f"--config.data.{key}=17",
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert (
    f"error: config.data.{key}=17 is below the smallest input model 'pspnet' takes (41 px); "
    f"set --config.data.{key}=41 or larger"
  ) in r.stderr
  assert "Traceback" not in r.stderr
