"""TFDS builders (data_prep.pascal5i / coco20i), build CLI and synthetic raw data.

Every layout is built once per module from tiny synthetic raw data and
compared with a direct numpy computation on the raw files.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep import build, raw, synthetic
from fss_jax.data import source

FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


# ---------------------------------------------------------------------------------------------
# Fixtures: one build per layout
# ---------------------------------------------------------------------------------------------


def _build(tmp, layout, num_images, seed, **kwargs):
  manual = synthetic.write_raw(tmp / "raw", layout, num_images, seed, **kwargs)
  name = synthetic.LAYOUT_DATASET[layout]
  build.build(name, manual, tmp / "tfds", progress=False)
  return manual, tmp / "tfds", name


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("voc"), "voc", 24, 1)


@pytest.fixture(scope="module")
def voc_nested(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("voc_nested"), "voc", 8, 2, nested=True)


@pytest.fixture(scope="module")
def coco_json(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("coco_json"), "coco", 16, 3, labels="json", lists=True)


@pytest.fixture(scope="module")
def coco_png(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("coco_png"), "coco", 8, 4, labels="png", lists=False)


# ---------------------------------------------------------------------------------------------
# Direct computations on the raw files
# ---------------------------------------------------------------------------------------------


def _voc_expected(manual):
  """{split: [(image_id, jpeg path, raw label)]} from the list files (PIL raw indices)."""
  root = manual / "VOC2012" if (manual / "VOC2012").is_dir() else manual
  out = {}
  for split in ("train", "val"):
    rows = []
    for line in (root / f"{split}.txt").read_text().splitlines():
      img, lbl = line.split()
      rows.append((pathlib.Path(img).stem, root / img, np.asarray(Image.open(root / lbl))))
    out[split] = rows
  return out


def _coco_expected_json(manual):
  from pycocotools.coco import COCO

  out = {}
  for split in ("train", "val"):
    coco = COCO(os.fspath(manual / "annotations" / f"instances_{split}2014.json"))
    rank = {cid: k for k, cid in enumerate(sorted(coco.getCatIds()), 1)}
    by_name = {im["file_name"]: im for im in coco.dataset["images"]}
    rows = []
    for line in (manual / f"{split}.txt").read_text().splitlines():
      name = pathlib.Path(line.split()[0]).name
      im = by_name[name]
      label = np.zeros((im["height"], im["width"]), np.uint8)
      for ann in coco.imgToAnns[im["id"]]:  # json order, later overwrites, crowd drawn
        assert raw.COCO_DRAW_CROWD
        label[coco.annToMask(ann) > 0] = rank[ann["category_id"]]
      rows.append((name[:-4], manual / f"{split}2014" / name, label))
    out[split] = rows
  return out


def _coco_expected_png(manual):
  out = {}
  for split in ("train", "val"):
    pngs = sorted((manual / "annotations" / f"{split}2014").glob("*.png"))
    out[split] = [
      (
        p.stem,
        manual / f"{split}2014" / f"{p.stem}.jpg",
        cv2.imread(os.fspath(p), cv2.IMREAD_UNCHANGED),
      )
      for p in pngs
    ]
  return out


def _counts(label, c):
  bc = np.bincount(label.ravel(), minlength=256)
  return bc[: c + 1], bc[255]


def _check_dataset(data_dir, name, expected):
  c = source.NUM_CLASSES[name]
  for split, rows in expected.items():
    src = source.open_split(data_dir, name, split)
    assert src.index.image_ids.tolist() == [r[0] for r in rows]  # record order = list order
    for i, (image_id, jpg, label) in enumerate(rows):
      cp, ig = _counts(label, c)
      np.testing.assert_array_equal(src.index.class_pixels[i], cp)
      assert src.index.ignore_pixels[i] == ig
      assert (src.index.heights[i], src.index.widths[i]) == label.shape
      ex = src[i]
      want = cv2.cvtColor(cv2.imdecode(np.fromfile(jpg, np.uint8), FLAGS), cv2.COLOR_BGR2RGB)
      np.testing.assert_array_equal(ex["image"], want)
      np.testing.assert_array_equal(ex["label"], label)
      assert ex["image_id"] == image_id
  report = source.read_build_report(data_dir, name)
  assert report["complete"] and report["skipped"] == []
  assert {s: v["records"] for s, v in report["splits"].items()} == {
    s: len(r) for s, r in expected.items()
  }


# ---------------------------------------------------------------------------------------------
# Builders on the synthetic layouts
# ---------------------------------------------------------------------------------------------


def test_voc_build_matches_raw(voc):
  manual, data_dir, name = voc
  expected = _voc_expected(manual)
  _check_dataset(data_dir, name, expected)
  # The synthetic labels include palette PNGs whose luminance differs from the indices (§2.1 pitfall)
  # and 255 borders; both must have come through as raw indices.
  root = manual
  palette = [p for p in (root / "SegmentationClassAug").glob("*.png") if Image.open(p).mode == "P"]
  assert palette
  lum = cv2.imread(os.fspath(palette[0]), cv2.IMREAD_GRAYSCALE)
  assert not np.array_equal(lum, np.asarray(Image.open(palette[0])))
  assert sum(int((r[2] == 255).any()) for rows in expected.values() for r in rows) > 0


def test_voc_nested_layout(voc_nested):
  manual, data_dir, name = voc_nested
  assert (manual / "VOC2012" / "JPEGImages").is_dir() and not (manual / "JPEGImages").exists()
  _check_dataset(data_dir, name, _voc_expected(manual))


def test_coco_json_build_matches_pycocotools(coco_json):
  manual, data_dir, name = coco_json
  ann = json.loads((manual / "annotations" / "instances_train2014.json").read_text())["annotations"]
  kinds = {
    (
      "poly"
      if isinstance(a["segmentation"], list)
      else "rle_list"
      if isinstance(a["segmentation"]["counts"], list)
      else "rle_str"
    )
    for a in ann
  }
  assert kinds == {"poly", "rle_list", "rle_str"}
  _check_dataset(data_dir, name, _coco_expected_json(manual))
  # the list order is not sorted, and the json's extra image without annotations is not in it
  ids = source.open_split(data_dir, name, "train").index.image_ids.tolist()
  assert ids != sorted(ids)


def test_coco_png_build_sorted_without_lists(coco_png):
  manual, data_dir, name = coco_png
  assert not (manual / "train.txt").exists()
  _check_dataset(data_dir, name, _coco_expected_png(manual))


def test_coco_json_without_lists_uses_annotated_images_sorted(tmp_path):
  manual = synthetic.write_coco(tmp_path / "raw", 8, 5, labels="json", lists=False)
  plan = raw.plan_coco(manual)
  for split in ("train", "val"):
    data = json.loads((manual / "annotations" / f"instances_{split}2014.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"]}
    names = sorted(im["file_name"][:-4] for im in data["images"] if im["id"] in annotated)
    assert len(names) == len(data["images"]) - 1
    assert [e.image_id for e in plan.splits[split]] == names


def test_synthetic_coco_pngs_equal_the_rendered_json(tmp_path):
  manual = synthetic.write_coco(tmp_path / "raw", 8, 15, labels="both")
  for split in ("train", "val"):
    images, by_image = raw.load_coco_json(manual / "annotations" / f"instances_{split}2014.json")
    for name, im in images.items():
      png = manual / "annotations" / f"{split}2014" / f"{name[:-4]}.png"
      if by_image.get(im["id"]):
        np.testing.assert_array_equal(
          raw.read_label_png(os.fspath(png)),
          raw.render_coco(by_image[im["id"]], im["height"], im["width"]),
        )
      else:
        assert not png.exists()


# ---------------------------------------------------------------------------------------------
# Build mechanics: rerun, interruption, overwrite, CLI
# ---------------------------------------------------------------------------------------------


def _mtimes(path):
  path = pathlib.Path(path)
  return {p: os.stat(p).st_mtime_ns for p in [path, *path.rglob("*")]}


def test_rerun_is_noop(voc):
  manual, data_dir, name = voc
  before = _mtimes(data_dir)
  assert build.is_complete(data_dir, name)
  build.build(name, manual, data_dir, progress=False)
  assert _mtimes(data_dir) == before


def test_interrupted_build_leaves_nothing_complete(tmp_path, monkeypatch):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 6)
  data_dir = tmp_path / "tfds"
  real, calls = raw.process_entry, []

  def flaky(entry, num_classes):
    calls.append(entry.image_id)
    if len(calls) == 8:  # in the val split, after the whole train split was written
      raise KeyboardInterrupt("simulated interruption")
    return real(entry, num_classes)

  monkeypatch.setattr(raw, "process_entry", flaky)
  with pytest.raises(KeyboardInterrupt):
    build.build("pascal5i", manual, data_dir, progress=False)
  assert not build.is_complete(data_dir, "pascal5i")
  assert not source.dataset_dir(data_dir, "pascal5i").exists()
  assert list((data_dir / "pascal5i").iterdir()) == []  # staging removed
  for split in ("train", "val"):
    with pytest.raises(source.DatasetNotReadyError):
      source.open_split(data_dir, "pascal5i", split)
  monkeypatch.setattr(raw, "process_entry", real)
  build.build("pascal5i", manual, data_dir, progress=False)
  assert len(source.open_split(data_dir, "pascal5i", "val")) == 4


def test_killed_build_leftovers_are_ignored_and_removed(tmp_path):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 7)
  data_dir = tmp_path / "tfds"
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  )
  leftover = (
    data_dir
    / "pascal5i"
    / f"incomplete.build-{int(dead.stdout)}-deadbeef.1.0.0"
    / "pascal5i"
    / "1.0.0"
  )
  leftover.mkdir(parents=True)
  (leftover / "dataset_info.json").write_text("{}")
  with pytest.raises(source.DatasetNotReadyError, match="interrupted"):
    source.open_split(data_dir, "pascal5i", "train")
  build.build("pascal5i", manual, data_dir, progress=False)
  assert [p.name for p in (data_dir / "pascal5i").iterdir()] == ["1.0.0"]


def test_incomplete_dataset_in_the_way_needs_overwrite(tmp_path):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 8)
  data_dir = tmp_path / "tfds"
  path = source.dataset_dir(data_dir, "pascal5i")
  path.mkdir(parents=True)
  (path / "dataset_info.json").write_text("{}")
  with pytest.raises(build.BuildError, match="--overwrite"):
    build.build("pascal5i", manual, data_dir, progress=False)
  build.build("pascal5i", manual, data_dir, overwrite=True, progress=False)
  assert build.is_complete(data_dir, "pascal5i")


def test_failed_overwrite_keeps_the_old_dataset(voc, tmp_path, monkeypatch):
  manual, _, _ = voc
  data_dir = tmp_path / "tfds"
  build.build("pascal5i", manual, data_dir, progress=False)
  before = _mtimes(source.dataset_dir(data_dir, "pascal5i"))

  def boom(entry, num_classes):
    raise RuntimeError("simulated failure")

  monkeypatch.setattr(raw, "process_entry", boom)
  with pytest.raises(RuntimeError, match="simulated"):
    build.build("pascal5i", manual, data_dir, overwrite=True, progress=False)
  assert _mtimes(source.dataset_dir(data_dir, "pascal5i")) == before
  assert [p.name for p in (data_dir / "pascal5i").iterdir()] == ["1.0.0"]
  assert len(source.open_split(data_dir, "pascal5i", "train")) == 16


_BUCKETS_SCRIPT = """
import sys
import tensorflow_datasets.core.shuffle as shuffle
shuffle.MAX_MEM_BUFFER_SIZE = 20000  # force TFDS's on-disk bucket sort (what > 1 GB splits use)
from data_prep import build, synthetic
from fss_jax.data import source
manual = synthetic.write_voc(sys.argv[1] + "/raw", 24, 1)
build.build("pascal5i", manual, sys.argv[1] + "/tfds", progress=False)  # checks record order == list order
print(",".join(source.open_split(sys.argv[1] + "/tfds", "pascal5i", "train").index.image_ids))
"""


def test_record_order_survives_tfds_on_disk_buckets(voc, tmp_path):
  manual, data_dir, name = voc
  out = subprocess.run(
    [sys.executable, "-c", _BUCKETS_SCRIPT, os.fspath(tmp_path)],
    capture_output=True,
    text=True,
    cwd=pathlib.Path(__file__).parents[1],
  )
  assert out.returncode == 0, out.stderr[-3000:]
  ids = out.stdout.strip().splitlines()[-1].split(",")
  assert ids == source.open_split(data_dir, name, "train").index.image_ids.tolist()
  assert sorted((tmp_path / "tfds" / "pascal5i").iterdir()) == [
    tmp_path / "tfds" / "pascal5i" / "1.0.0"
  ]


def test_cli(tmp_path, capsys):
  manual = tmp_path / "raw"
  assert (
    synthetic.main(
      ["--layout", "voc", "--out", os.fspath(manual), "--num_images", "8", "--seed", "9"]
    )
    == 0
  )
  args = [
    "--dataset",
    "pascal5i",
    "--manual_dir",
    os.fspath(manual),
    "--data_dir",
    os.fspath(tmp_path / "d"),
    "--num_workers",
    "0",
    "--no_progress",
  ]
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "train 4 records (0 skipped)" in out
  # TFDS's "Downloading and preparing dataset Unknown size ..." lines: nothing is downloaded
  assert "Downloading and preparing" not in out and "downloaded and prepared" not in out
  assert build.main(args) == 0  # rerun: no-op
  assert (
    build.main(
      [
        "--dataset",
        "coco20i",
        "--manual_dir",
        os.fspath(tmp_path / "nope"),
        "--data_dir",
        os.fspath(tmp_path / "d"),
      ]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert "does not exist" in err and "instances_train2014.json" in err


def test_workers_give_the_same_records(voc, tmp_path):
  manual, data_dir, name = voc
  build.build(name, manual, tmp_path / "tfds", num_workers=2, progress=False)
  a = source.open_split(data_dir, name, "val")
  b = source.open_split(tmp_path / "tfds", name, "val")
  assert a.index.image_ids.tolist() == b.index.image_ids.tolist()
  np.testing.assert_array_equal(a.index.class_pixels, b.index.class_pixels)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _first_ids(root, split, n=1):
  return [
    pathlib.Path(l.split()[0]).stem for l in (root / f"{split}.txt").read_text().splitlines()[:n]
  ]


def test_corrupt_files_are_skipped_and_reported(tmp_path):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 10)
  bad_jpg, bad_png = _first_ids(manual, "train", 2)
  jpg = manual / "JPEGImages" / f"{bad_jpg}.jpg"
  jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # truncated JPEG
  (manual / "SegmentationClassAug" / f"{bad_png}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  data_dir = tmp_path / "tfds"
  build.build("pascal5i", manual, data_dir, progress=False)
  report = source.read_build_report(data_dir, "pascal5i")
  assert report["splits"]["train"] == {"listed": 4, "records": 2, "skipped": 2}
  skipped = {s["image_id"]: s for s in report["skipped"]}
  assert set(skipped) == {bad_jpg, bad_png}
  assert "decode" in skipped[bad_jpg]["reason"] and skipped[bad_jpg]["file"].endswith(
    f"{bad_jpg}.jpg"
  )
  assert (
    skipped[bad_png]["file"].endswith(f"{bad_png}.png") and "label" in skipped[bad_png]["reason"]
  )
  ids = source.open_split(data_dir, "pascal5i", "train").index.image_ids.tolist()
  assert bad_jpg not in ids and bad_png not in ids and len(ids) == 2


def test_read_image_accepts_trailing_bytes_rejects_truncation(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)
  ok, buf = cv2.imencode(".jpg", rgb)
  data = buf.tobytes()
  (tmp_path / "junk.jpg").write_bytes(data + b"trailing bytes after the end-of-image marker")
  assert raw.read_image(os.fspath(tmp_path / "junk.jpg"))[1:] == (40, 56)
  for n in (len(data) - 2, len(data) // 2, 0):
    (tmp_path / "cut.jpg").write_bytes(data[:n])
    with pytest.raises(raw.CorruptFile):
      raw.read_image(os.fspath(tmp_path / "cut.jpg"))


def test_label_value_out_of_range_names_the_file(tmp_path):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 11)
  (bad,) = _first_ids(manual, "val")
  png = manual / "SegmentationClassAug" / f"{bad}.png"
  label = np.asarray(Image.open(png)).copy()
  label[:3, :3] = 30
  cv2.imwrite(os.fspath(png), label)
  with pytest.raises(raw.RawDataError, match=rf"{bad}\.png.*\[30\]"):
    build.build("pascal5i", manual, tmp_path / "tfds", progress=False)
  assert not build.is_complete(tmp_path / "tfds", "pascal5i")


def test_colour_label_explains_segmentation_class_aug(tmp_path):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 12)
  (bad,) = _first_ids(manual, "train")
  png = manual / "SegmentationClassAug" / f"{bad}.png"
  idx = np.asarray(Image.open(png)).astype(np.int64)
  colour = np.stack([idx * 10 % 256, idx * 3 % 256, np.full_like(idx, 7)], -1).astype(np.uint8)
  Image.fromarray(colour, "RGB").save(png)
  with pytest.raises(raw.RawDataError, match="SegmentationClassAug") as e:
    raw.process_entry(raw.plan_pascal(manual).splits["train"][0], 20)
  assert f"{bad}.png" in str(e.value)


def test_missing_list_entries_are_all_named(tmp_path):
  manual = synthetic.write_voc(tmp_path / "raw", 8, 13)
  with open(manual / "train.txt", "a") as f:
    f.write("JPEGImages/2099_000001.jpg SegmentationClassAug/2099_000001.png\n")
    f.write("JPEGImages/2099_000002.jpg SegmentationClassAug/2099_000002.png\n")
  (ok,) = _first_ids(manual, "val")
  (manual / "SegmentationClassAug" / f"{ok}.png").unlink()
  with pytest.raises(raw.RawDataError) as e:
    build.build("pascal5i", manual, tmp_path / "tfds", progress=False)
  msg = str(e.value)
  assert "4 missing files" in msg and "2099_000001.jpg" in msg and "2099_000002.png" in msg
  assert not (tmp_path / "tfds").exists()  # nothing written
  manual.joinpath("train.txt").write_text("")
  (manual / "SegmentationClassAug" / f"{ok}.png").write_bytes(b"")
  with pytest.raises(raw.RawDataError, match="lists no images"):
    raw.plan_pascal(manual)


def test_missing_inputs_show_the_layout(tmp_path):
  with pytest.raises(raw.RawDataError, match="does not exist") as e:
    raw.plan_pascal(tmp_path / "nowhere")
  assert "SegmentationClassAug/<id>.png" in str(e.value) and "train.txt" in str(e.value)
  (tmp_path / "voc" / "VOC2012" / "JPEGImages").mkdir(parents=True)
  (tmp_path / "voc" / "VOC2012" / "SegmentationClass").mkdir()
  with pytest.raises(raw.RawDataError, match="SegmentationClassAug, train.txt, val.txt") as e:
    raw.plan_pascal(tmp_path / "voc")
  assert "colour-palette" in str(e.value)
  (tmp_path / "coco" / "train2014").mkdir(parents=True)
  (tmp_path / "coco" / "val2014").mkdir()
  with pytest.raises(raw.RawDataError, match="instances_train2014.json") as e:
    raw.plan_coco(tmp_path / "coco")
  assert "Expected layout" in str(e.value)


def test_coco_list_image_unknown_to_json(tmp_path):
  manual = synthetic.write_coco(tmp_path / "raw", 8, 14, labels="json")
  with open(manual / "val.txt", "a") as f:
    f.write(
      "val2014/COCO_val2014_999999999999.jpg annotations/val2014/COCO_val2014_999999999999.png\n"
    )
  with pytest.raises(raw.RawDataError, match="COCO_val2014_999999999999.jpg"):
    raw.plan_coco(manual)


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


def _tree(path):
  return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_synthetic_is_deterministic(tmp_path, layout):
  a = _tree(synthetic.write_raw(tmp_path / "a", layout, 8, 21))
  assert a == _tree(synthetic.write_raw(tmp_path / "b", layout, 8, 21))
  assert a != _tree(synthetic.write_raw(tmp_path / "c", layout, 8, 22))


def test_make_built_dataset_covers_every_fold(tmp_path):
  data_dir = synthetic.make_built_dataset(tmp_path, layout="voc", num_images=24, seed=0)
  assert synthetic.make_built_dataset(tmp_path, layout="voc", num_images=24, seed=0) == data_dir
  pix = {s: source.open_split(data_dir, "pascal5i", s).index.class_pixels for s in ("train", "val")}
  for fold in range(4):
    novel = set(range(5 * fold + 1, 5 * fold + 6))
    present = pix["train"][:, 1:] > 0
    clean = ~present[:, [c - 1 for c in sorted(novel)]].any(1)  # BAM intersection filter
    big = pix["train"][:, 1:] >= 2048
    base_ok = [c for c in range(1, 21) if c not in novel and (big[clean, c - 1]).sum() >= 2]
    novel_ok = [c for c in novel if (pix["val"][:, c] >= 2048).sum() >= 2]
    assert base_ok and novel_ok, (fold, base_ok, novel_ok)


def test_build_follows_the_umask(tmp_path):
  """A dataset built on shared storage is readable by the other users (umask 022)."""
  import stat

  old = os.umask(0o022)
  try:
    _, data_dir, _ = _build(tmp_path, "voc", 8, 5)
  finally:
    os.umask(old)
  paths = [p for p in data_dir.rglob("*")]
  assert any(p.name.startswith("fss_index") for p in paths)
  for p in paths:
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & stat.S_IROTH, (p, oct(mode))
    if p.is_dir():
      assert mode & stat.S_IXOTH, (p, oct(mode))
