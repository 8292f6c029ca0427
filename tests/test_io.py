"""fss_jax.io.atomic_write: complete file or the old one, never a partial file."""

import os
import stat

import numpy as np
import pytest

from fss_jax import io as fss_io


def test_bytes_str_and_writer(tmp_path):
  p = fss_io.atomic_write(tmp_path / "sub" / "a.bin", b"\x00\x01")
  assert p.read_bytes() == b"\x00\x01"
  fss_io.atomic_write(p, "é\n")
  assert p.read_text(encoding="utf-8") == "é\n"
  fss_io.atomic_write(tmp_path / "x.npz", lambda f: np.savez_compressed(f, a=np.arange(3)))
  with np.load(tmp_path / "x.npz") as z:
    np.testing.assert_array_equal(z["a"], [0, 1, 2])
  assert sorted(q.name for q in tmp_path.rglob("*")) == [
    "a.bin",
    "sub",
    "x.npz",
  ]  # no temp files left


def test_failed_write_keeps_the_old_file(tmp_path):
  p = fss_io.atomic_write(tmp_path / "r.json", "old")

  def broken(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    fss_io.atomic_write(p, broken)
  assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["r.json"]
  with pytest.raises(FileExistsError, match="--overwrite"):
    fss_io.atomic_write(p, "new", overwrite=False)
  assert p.read_text() == "old"


@pytest.mark.parametrize("umask,want", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, want):
  old = os.umask(umask)
  try:
    p = fss_io.atomic_write(tmp_path / "shared" / "index.npz", b"x")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(p).st_mode) == want  # tempfile alone gives 0600
  assert fss_io.current_umask() == old


def test_converted_checkpoint_follows_the_umask(tmp_path):
  from checkpoints import io as ckpt_io

  old = os.umask(0o022)
  try:
    dst = ckpt_io.write_orbax(
      {"params": {"w": np.ones((2, 3), np.float32)}}, tmp_path / "ck", metadata={"model": "panet"}
    )
  finally:
    os.umask(old)
  for p in [dst, *dst.rglob("*")]:
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & stat.S_IROTH, (p, oct(mode))  # readable by other users
    if p.is_dir():
      assert mode & stat.S_IXOTH, (p, oct(mode))
