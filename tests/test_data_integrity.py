"""Damaged data: record files (sizes, sha256, read errors) and corrupt raw images/labels at build time.

One synthetic VOC build per module; every test that damages it works on its own copy.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep import build, raw, synthetic
from fss_jax.data import source

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASET = "pascal5i"
TRAIN_FILE = "pascal5i-train.array_record-00000-of-00001"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(manual_dir, data_dir) of a 24-image synthetic VOC build."""
  tmp = tmp_path_factory.mktemp("integrity")
  manual = synthetic.write_voc(tmp / "raw", 24, 0)
  build.build(DATASET, manual, tmp / "tfds", progress=False)
  return manual, tmp / "tfds"


@pytest.fixture
def copy(built, tmp_path):
  """A private copy of the build: data_dir."""
  shutil.copytree(built[1], tmp_path / "tfds")
  return tmp_path / "tfds"


def _record_file(data_dir, name=TRAIN_FILE) -> pathlib.Path:
  return source.dataset_dir(data_dir, DATASET) / name


def _flip_middle_byte(path: pathlib.Path) -> int:
  """XORs one byte in the middle of the file's data (not the zero padding at its end); same size."""
  data = bytearray(path.read_bytes())
  pos = len(data.rstrip(b"\0")) // 2
  data[pos] ^= 0xFF
  with open(path, "r+b") as f:  # in place: same inode, as damage on disk would be
    f.seek(pos)
    f.write(data[pos : pos + 1])
  return pos


def _damage_every_record(path: pathlib.Path) -> None:
  """XORs a byte every 2 KiB of the file's data, so that every record's chunk is damaged."""
  data = bytearray(path.read_bytes())
  for pos in range(100, len(data.rstrip(b"\0")), 2048):
    data[pos] ^= 0xFF
  with open(path, "r+b") as f:
    f.write(data)


def _count_hashes(monkeypatch) -> list[str]:
  calls, real = [], source.file_sha256
  monkeypatch.setattr(source, "file_sha256", lambda p: calls.append(os.fspath(p)) or real(p))
  return calls


# ---------------------------------------------------------------------------------------------
# What the build records
# ---------------------------------------------------------------------------------------------


def test_build_records_size_and_sha256_of_every_record_file(built, monkeypatch):
  _, data_dir = built
  path = source.dataset_dir(data_dir, DATASET)
  report = source.read_build_report(data_dir, DATASET)
  on_disk = sorted(p.name for p in path.glob("*.array_record-*"))
  assert (
    sorted(report["record_files"])
    == on_disk
    == [TRAIN_FILE, "pascal5i-val.array_record-00000-of-00001"]
  )
  for name, entry in report["record_files"].items():
    data = (path / name).read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  # the build stamped its files as verified: opening the untouched build hashes nothing
  calls = _count_hashes(monkeypatch)
  assert len(source.open_split(data_dir, DATASET, "train")) == 16
  assert calls == []


def test_a_copied_build_is_hashed_once(copy, monkeypatch):
  calls = _count_hashes(monkeypatch)
  source.open_split(copy, DATASET, "train")
  assert calls == [
    os.fspath(_record_file(copy))
  ]  # new inode / ctime: verified once, only this split
  source.open_split(copy, DATASET, "train")
  assert len(calls) == 1  # stamped


# ---------------------------------------------------------------------------------------------
# (a) a truncated record file
# ---------------------------------------------------------------------------------------------


def test_truncated_record_file_is_named_on_open(copy, built, monkeypatch):
  f = _record_file(copy)
  size = os.stat(f).st_size
  os.truncate(f, size // 2)
  calls = _count_hashes(monkeypatch)
  with pytest.raises(source.RecordFileError) as e:
    source.open_split(copy, DATASET, "train")
  msg = str(e.value)
  assert f"{f} has {size // 2} bytes but was built with {size}" in msg and "truncated" in msg
  assert msg.splitlines()[1:] == [
    "Rebuild it with:",
    f"  {source.build_command(copy, DATASET)} --overwrite",
  ]
  assert calls == []  # the size check alone catches it
  assert len(source.open_split(copy, DATASET, "val")) == 8  # the other split is intact
  # a rerun of the build no longer takes the damaged dataset for complete
  assert not build.is_complete(copy, DATASET)
  with pytest.raises(build.BuildError, match=f"{TRAIN_FILE}.*--overwrite"):
    build.build(DATASET, built[0], copy, progress=False)


def _main(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "fss_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_truncated_record_file_via_main_is_one_message(copy, tmp_path):
  f = _record_file(copy)
  os.truncate(f, os.stat(f).st_size - 1000)
  r = _main(
    "--config",
    "configs/panet.py:smoke",
    "--workdir",
    os.fspath(tmp_path / "w"),
    f"--config.data.data_dir={copy}",
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert f"error: record file {f} has" in r.stderr and "--overwrite" in r.stderr
  assert "python -m data_prep.build --dataset pascal5i" in r.stderr


# ---------------------------------------------------------------------------------------------
# (b) a flipped byte (same size)
# ---------------------------------------------------------------------------------------------


def test_flipped_byte_is_caught_by_the_checksum_on_open(copy):
  f = _record_file(copy)
  source.open_split(copy, DATASET, "train")  # verified and stamped
  size, mtime = os.stat(f).st_size, os.stat(f).st_mtime_ns
  _flip_middle_byte(f)
  os.utime(f, ns=(mtime, mtime))  # even with the old mtime put back (ctime still moves)
  assert os.stat(f).st_size == size
  with pytest.raises(source.RecordFileError, match=f"{f} does not match its sha256") as e:
    source.open_split(copy, DATASET, "train")
  assert "Rebuild it with:" in str(e.value) and "--overwrite" in str(e.value)


def test_verify_command(copy, capsys, monkeypatch):
  args = ["--verify", "--dataset", DATASET, "--data_dir", os.fspath(copy)]
  assert build.main(args) == 0
  assert "all 2 record files" in capsys.readouterr().out
  calls = _count_hashes(monkeypatch)
  source.open_split(copy, DATASET, "val")
  assert calls == []  # --verify stamped the files
  f = _record_file(copy)
  _flip_middle_byte(f)
  assert build.main(args) == 2
  err = capsys.readouterr().err
  assert (
    err.startswith(f"error: record file {f} does not match its sha256") and "--overwrite" in err
  )
  assert "pascal5i-val" not in err.splitlines()[0]
  os.truncate(f, 1000)
  assert build.main(args) == 2
  assert f"{f} has 1000 bytes" in capsys.readouterr().err
  assert (
    build.main(["--verify", "--dataset", DATASET, "--data_dir", os.fspath(copy / "nothing")]) == 2
  )
  assert "is not built" in capsys.readouterr().err


def test_damaged_record_read_names_the_file(copy):
  """Damage the open-time check cannot see (a file changed after opening, bit rot): the read names it."""
  src = source.open_split(copy, DATASET, "train")
  f = _record_file(copy)
  _flip_middle_byte(f)
  with pytest.raises(source.RecordFileError) as e:
    for i in range(len(src)):
      src[i]
  msg = str(e.value)
  assert msg.startswith(f"record file {f} is damaged: reading record ") and "hash mismatch" in msg
  assert msg.splitlines()[1:] == [
    "Rebuild it with:",
    f"  {source.build_command(copy, DATASET)} --overwrite",
  ]
  with pytest.raises(source.RecordFileError, match=f"record file {f} is damaged"):
    src.__getitems__(list(range(len(src))))


def test_damaged_record_read_through_the_episode_pipeline(copy):
  from fss_jax.data import pipeline

  src = source.open_split(copy, DATASET, "train")
  _damage_every_record(_record_file(copy))
  cfg = pipeline.EpisodeConfig(
    dataset=DATASET, data_dir=os.fspath(copy), train_size=64, min_pixels=1
  )
  it = iter(pipeline.make_train_loader(cfg, global_batch_size=2, source=src))
  with pytest.raises(source.RecordFileError, match=TRAIN_FILE):
    for _ in range(16):
      next(it)


# ---------------------------------------------------------------------------------------------
# Corrupt raw images / labels at build time
# ---------------------------------------------------------------------------------------------


def _jpeg() -> bytes:
  rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
  rgb = cv2.GaussianBlur(rgb, (5, 5), 0)
  return cv2.imencode(".jpg", rgb)[1].tobytes()


def _scan_middle(data: bytes) -> int:
  sos = data.find(b"\xff\xda")
  return (sos + len(data)) // 2


def _xor_run(data: bytes, n: int) -> bytes:
  d, m = bytearray(data), _scan_middle(data)
  d[m : m + n] = bytes(b ^ 0xFF for b in d[m : m + n])
  return bytes(d)


def _put(data: bytes, at: int, new: bytes) -> bytes:
  return data[:at] + new + data[at + len(new) :]


JPEG_DAMAGE = {
  "truncated_half": lambda d: d[: len(d) // 2],
  "truncated_eoi": lambda d: d[:-2],
  "xor_32_bytes_mid_scan": lambda d: _xor_run(d, 32),
  "garbage_512_bytes_mid_scan": lambda d: _put(d, _scan_middle(d) - 256, bytes(range(256)) * 2),
  "zero_256_bytes_mid_scan": lambda d: _put(d, _scan_middle(d), bytes(256)),
  "early_eoi_marker": lambda d: _put(d, _scan_middle(d), b"\xff\xd9"),
  "bogus_marker": lambda d: _put(d, _scan_middle(d), b"\xff\xc4"),
}


@pytest.mark.parametrize("damage", sorted(JPEG_DAMAGE))
def test_read_image_detects_damaged_jpeg(tmp_path, capfd, damage):
  good = _jpeg()
  (tmp_path / "good.jpg").write_bytes(good)
  assert raw.read_image(os.fspath(tmp_path / "good.jpg"))[1:] == (48, 64)
  bad = JPEG_DAMAGE[damage](good)
  # what the libraries report: OpenCV still returns an image for damaged scan data (libjpeg only warns)
  if not damage.startswith("truncated"):
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None
  (tmp_path / "bad.jpg").write_bytes(bad)
  capfd.readouterr()
  with pytest.raises(raw.CorruptFile, match="decode"):
    raw.read_image(os.fspath(tmp_path / "bad.jpg"))
  os.write(2, b"stderr restored\n")
  err = capfd.readouterr().err
  assert err == "stderr restored\n"  # libjpeg's warning was captured, fd 2 restored


def test_read_label_png_detects_flipped_and_truncated_png(tmp_path):
  label = np.zeros((40, 50), np.uint8)
  label[5:30, 10:40] = 3
  label[0] = 255
  png = cv2.imencode(".png", label)[1].tobytes()
  (tmp_path / "ok.png").write_bytes(png)
  np.testing.assert_array_equal(raw.read_label_png(os.fspath(tmp_path / "ok.png")), label)
  idat = png.find(b"IDAT") + 4
  pos = idat + (png.find(b"IEND") - 4 - idat) // 2
  flipped = _put(png, pos, bytes([png[pos] ^ 0x10]))
  for name, data in [("flipped", flipped), ("no_iend", png[:-12])]:
    (tmp_path / f"{name}.png").write_bytes(data)
    with pytest.raises(raw.CorruptFile, match="damaged label PNG"):
      raw.read_label_png(os.fspath(tmp_path / f"{name}.png"))


def test_build_skips_and_names_damaged_files(tmp_path, capsys):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 10)
  rows = [line.split() for line in (manual / "train.txt").read_text().splitlines()]
  cut, flipped, bad_label = (pathlib.Path(r[0]).stem for r in rows[:3])
  jpg = manual / "JPEGImages"
  (jpg / f"{cut}.jpg").write_bytes((jpg / f"{cut}.jpg").read_bytes()[:-300])
  data = (
    jpg / f"{flipped}.jpg"
  ).read_bytes()  # a 512-byte run of garbage inside the scan data, same size
  garbage = np.random.default_rng(0).integers(0, 256, 512, np.uint8).tobytes()
  (jpg / f"{flipped}.jpg").write_bytes(_put(data, _scan_middle(data) - 256, garbage))
  png = manual / "SegmentationClassAug" / f"{bad_label}.png"
  data = png.read_bytes()
  pos = (data.find(b"IDAT") + data.find(b"IEND")) // 2
  png.write_bytes(_put(data, pos, bytes([data[pos] ^ 0x10])))

  args = [
    "--dataset",
    DATASET,
    "--manual_dir",
    os.fspath(manual),
    "--data_dir",
    os.fspath(tmp_path / "tfds"),
    "--num_workers",
    "0",
    "--no_progress",
  ]
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "train 1 records (3 skipped)" in out and "3 corrupt images/labels were skipped" in out
  report = source.read_build_report(tmp_path / "tfds", DATASET)
  skipped = {s["image_id"]: s for s in report["skipped"]}
  assert set(skipped) == {cut, flipped, bad_label}
  assert skipped[cut]["file"] == os.fspath(jpg / f"{cut}.jpg")
  assert skipped[flipped]["file"] == os.fspath(jpg / f"{flipped}.jpg")
  assert "Corrupt JPEG data" in skipped[flipped]["reason"]
  assert (
    skipped[bad_label]["file"] == os.fspath(png)
    and "damaged label PNG" in skipped[bad_label]["reason"]
  )
  assert source.open_split(tmp_path / "tfds", DATASET, "train").index.image_ids.tolist() == [
    pathlib.Path(rows[3][0]).stem
  ]
