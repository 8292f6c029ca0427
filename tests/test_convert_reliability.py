"""checkpoints.convert: leftovers of killed conversions, and messages that say what to pass.

State dicts are ``.npz`` files with the keys of a registered key map and 1-element
arrays of the right rank (conversion maps keys and layouts, it never builds a model),
so nothing here needs torch or runs a model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO

from checkpoints import convert
from checkpoints import io as ckpt_io
from fss_jax.models import registry

_SHAPES = {"conv": (1, 1, 1, 1), "linear": (1, 1), "copy": (1,)}


def _state_dict(model: str) -> dict[str, np.ndarray]:
  """Every source key of `model`'s key map, with a tiny array its transform accepts."""
  return {
    r.src: np.zeros(_SHAPES[getattr(r, "transform", "copy")], np.float32)
    for r in registry.get(model).keymap()
  }


def _run(argv):
  """convert.main in-process -> (rc, stdout, stderr)."""
  import contextlib
  import io

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = convert.main(argv)
  return rc, out.getvalue(), err.getvalue()


# -- leftovers of killed conversions ----------------------------------------------------------

_KILLED = textwrap.dedent("""
    import os, signal, sys, types
    import numpy as np
    from checkpoints import io as ckpt_io

    class PyTreeCheckpointer:      # stands in for orbax's (not imported: 5 s saved)
      def save(self, path, tree):
        path.mkdir()
        (path / "half_written").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)        # as `kill -9` during the conversion

    sys.modules["orbax"] = types.ModuleType("orbax")
    sys.modules["orbax.checkpoint"] = sys.modules["orbax"].checkpoint = types.ModuleType("ocp")
    sys.modules["orbax.checkpoint"].PyTreeCheckpointer = PyTreeCheckpointer
    ckpt_io.write_orbax({"params": {"w": np.ones(3, np.float32)}}, sys.argv[1])
""")


def _killed_conversion(dst) -> os.PathLike:
  """Runs write_orbax(dst) in a process killed mid-write; returns the temporary it left."""
  proc = subprocess.run(
    [sys.executable, "-c", _KILLED, str(dst)],
    cwd=REPO,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
  )
  assert proc.returncode == -9, proc.stderr.decode()
  (left,) = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp-")]
  return left


def test_next_conversion_removes_what_a_killed_one_left(tmp_path):
  out = tmp_path / "out"
  dst = out / "ck_out"
  stale = _killed_conversion(dst)
  dead = int(stale.name.split("-")[1].split("@")[0])
  host = ckpt_io._host()
  assert not dst.exists() and (stale / "variables" / "half_written").is_file()
  # Kept: a running conversion (this process), one on another host sharing the folder,
  # the only old copy of a checkpoint whose replacement was killed between its renames,
  # a recent temporary of the old naming, and what other tools name ".x.tmp-<pid>".
  running = out / f".ck_out.tmp-{os.getpid()}@{host}-abcd1234"
  elsewhere = out / f".ck_out.tmp-{dead}@other-host.example-abcd1234"
  only_copy = out / f".gone.old-{dead}@{host}"
  recent_legacy = out / ".ck_new.tmp-k2j4h5g6"
  other_tool = out / f".index.npz.tmp-{dead}"
  # Removed too: the old copy of a checkpoint that is back in place, an old-named temporary
  # from before this change (2 days old).
  (out / "ck_prev").mkdir()
  replaced = out / f".ck_prev.old-{dead}@{host}"
  legacy = out / ".ck_old.tmp-x1y2z3w4"
  for d in (running, elsewhere, only_copy, recent_legacy, replaced, legacy):
    (d / "variables").mkdir(parents=True)
  other_tool.write_bytes(b"x")
  two_days_ago = time.time() - 2 * 24 * 3600
  os.utime(legacy, (two_days_ago, two_days_ago))

  src = tmp_path / "panet.npz"
  np.savez(src, **_state_dict("panet"))
  rc, stdout, err = _run(["--model", "panet", "--src", str(src), "--dst", str(dst)])
  assert rc == 0, err
  assert ckpt_io.read_metadata(dst)["model"] == "panet" and "wrote" in stdout
  lines = err.splitlines()
  assert len(lines) == 3, err
  assert (
    f"removed {stale} (0.0 MB): temporary directory of an interrupted conversion, left by "
    f"process {dead}, which has ended" in lines
  ), err
  assert any(line.startswith(f"removed {legacy} ") for line in lines), err
  assert any(line.startswith(f"removed {replaced} ") for line in lines), err
  assert not stale.exists() and not legacy.exists() and not replaced.exists()
  for kept in (running, elsewhere, only_copy, recent_legacy, other_tool):
    assert kept.exists(), kept
  # This run's own temporary is gone, and a second run has nothing to remove.
  assert ckpt_io.remove_stale_temps(out, log=pytest.fail) == []


# -- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "content,says",
  [
    (b"checkpoint of the 5-shot model\n", "a text file starting with 'checkpoint of the"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "Git LFS pointer"),
  ],
)
def test_non_checkpoint_pth_says_so(tmp_path, content, says):
  src = tmp_path / "best.pth"
  src.write_bytes(content)
  rc, _, err = _run(["--model", "sccan", "--src", str(src), "--dst", str(tmp_path / "o")])
  assert rc == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: {src} is not a PyTorch checkpoint: not a zip or pickle file")
  assert says in err and "Python objects" not in err and "corrupt" not in err


def test_empty_pth(tmp_path):
  src = tmp_path / "best.pth"
  src.write_bytes(b"")
  rc, _, err = _run(["--model", "sccan", "--src", str(src), "--dst", str(tmp_path / "o")])
  assert rc == 2 and err == (
    f"error: {src} is empty (0 bytes); download or export the checkpoint again\n"
  )


def test_directory_as_src_names_the_files_inside(tmp_path):
  folder = tmp_path / "snapshot"
  folder.mkdir()
  (folder / "train_epoch_49_0.6523.pth").write_bytes(b"PK\x03\x04")
  rc, _, err = _run(["--model", "sccan", "--src", str(folder), "--dst", str(tmp_path / "o")])
  assert rc == 2 and err == (
    f"error: {folder} is a directory; pass the .pth file inside it (it "
    f"holds train_epoch_49_0.6523.pth)\n"
  )
  converted = ckpt_io.write_orbax({"params": {"w": np.ones(2, np.float32)}}, tmp_path / "ck")
  rc, _, err = _run(["--model", "sccan", "--src", str(converted), "--dst", str(tmp_path / "o")])
  assert rc == 2 and "already converted checkpoint; use it as it is" in err, err


def test_model_hints_name_the_flag(tmp_path):
  src = tmp_path / "sccan_5shot.npz"  # SCCAN keys; "5shot" in the name: a 5-shot file
  np.savez(src, **_state_dict("sccan"))
  rc, _, err = _run(["--model", "sccan", "--src", str(src), "--dst", str(tmp_path / "o")])
  assert rc == 2 and "5-shot model" in err and "pass --model-arg shot=5" in err, err
  assert "pass shot=" not in err
  assert convert.field_hints_as_flags("pass layers=101; and pass shot=5") == (
    "pass --model-arg layers=101; and pass --model-arg shot=5"
  )


def test_checkpoint_of_another_model_says_which(tmp_path):
  src = tmp_path / "sccan.npz"
  np.savez(src, **_state_dict("sccan"))
  dst = tmp_path / "o"
  n = len(_state_dict("sccan"))
  rc, _, err = _run(["--model", "hdmnet", "--src", str(src), "--dst", str(dst)])
  assert rc == 2 and not dst.exists()
  lines = err.splitlines()
  assert lines[0] == (
    f"error: {src} is not a hdmnet checkpoint: this looks like a sccan "
    f"checkpoint ({n}/{n} keys match); pass --model sccan (nothing was written)"
  )
  assert len(lines) == 2 and "--verbose lists them" in lines[1], err
  rc, _, err = _run(["--model", "hdmnet", "--src", str(src), "--dst", str(dst), "--verbose"])
  assert rc == 2 and len(err.splitlines()) > 1000  # every missing / unexpected key


def test_key_lists_are_cut_without_verbose(tmp_path):
  sd = _state_dict("panet")
  sd.update({f"aux.head{i}.weight": np.zeros(1, np.float32) for i in range(30)})
  src = tmp_path / "panet_plus.npz"
  np.savez(src, **sd)
  rc, _, err = _run(["--model", "panet", "--src", str(src), "--dst", str(tmp_path / "o")])
  assert rc == 2 and "this looks like" not in err
  assert "unexpected keys (in the checkpoint, unknown to the model) (30):" in err
  assert "aux.head9.weight" in err and "aux.head10.weight" not in err
  assert "... and 20 more (--verbose lists them all)" in err and len(err.splitlines()) == 13, err
  rc, _, err = _run(
    ["--model", "panet", "--src", str(src), "--dst", str(tmp_path / "o"), "--verbose"]
  )
  assert rc == 2 and "aux.head29.weight" in err and "more" not in err
