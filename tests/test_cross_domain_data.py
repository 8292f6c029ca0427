"""Cross-domain test sets (FSS-1000, DeepGlobe, ISIC 2018, Chest X-ray): layouts, builders, lists.

Each builder runs once per module on tiny synthetic raw trees in the official
layouts (data_prep.synthetic), and its records are compared with what PATNet's
loaders (slei109/PATNet data/{fss,deepglobe,isic,lung}.py) would read from the
same files: their file order (sorted glob per class) and their mask rule
(PIL ``convert("L")``, then >= 128 -> 1), recomputed here independently.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep import build, cross_domain, raw, synthetic
from fss_jax.data import episodes, source, splits

FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
DATASETS = splits.CROSS_DOMAIN_DATASETS


# ---------------------------------------------------------------------------------------------
# What PATNet's loaders read from a raw tree: [(image_id, class id, image path, mask path)] per split
# ---------------------------------------------------------------------------------------------


def _patnet_mask(path) -> np.ndarray:
  grey = np.array(Image.open(path).convert("L"))
  return (grey >= 128).astype(np.uint8)


def _jpgs(pattern):
  return [p for p in sorted(glob.glob(pattern)) if os.path.basename(p).split(".")[1] == "jpg"]


def _patnet_fss(root):
  info = splits.cross_domain("fss1000")
  out = {}
  for split, listed in (("train", "trn.txt"), ("val", "val.txt"), ("test", "test.txt")):
    names = sorted(
      (splits._ASSET_DIR / "fss1000" / listed).read_text().split("\n")[:-1]
    )  # fss.py:22-24
    offset = {"train": 0, "val": 520, "test": 760}[split]  # fss.py:83-87, 98-105
    rows = []
    for cat in names:
      for img in _jpgs(f"{root}/{cat}/*"):
        cid = names.index(cat) + offset + 1
        assert info.class_names[cid - 1] == cat
        rows.append((f"{cat}/{pathlib.Path(img).stem}", cid, img, img[:-4] + ".png"))
    out[split] = rows
  return out


def _patnet_deepglobe(root):
  rows = []
  for cid, cat in enumerate("123456", 1):
    for img in _jpgs(f"{root}/{cat}/test/origin/*"):
      stem = pathlib.Path(img).stem
      rows.append((f"{cat}/{stem}", cid, img, f"{root}/{cat}/test/groundtruth/{stem}.png"))
  return {"test": rows}


def _patnet_isic(root):
  rows = []
  for cid, cat in enumerate("123", 1):
    for img in _jpgs(f"{root}/ISIC2018_Task1-2_Training_Input/{cat}/*"):
      stem = pathlib.Path(img).stem
      rows.append(
        (stem, cid, img, f"{root}/ISIC2018_Task1_Training_GroundTruth/{stem}_segmentation.png")
      )
  return {"test": rows}


def _patnet_lung(root):
  rows = []
  for mask in sorted(glob.glob(f"{root}/masks/*")):
    name = os.path.basename(mask)
    stem = (
      name[:-9] if name.endswith("_mask.png") else name[:-4]
    )  # lung.py:64; Montgomery: same name
    rows.append((stem, 1, f"{root}/CXR_png/{stem}.png", mask))
  return {"test": rows}


def _isic_sorted_copy(manual, dest):
  """The flat official ISIC tree sorted into class folders 1/2/3 by class_id.csv (PATNet's reading)."""
  shutil.copytree(manual, dest)
  inp = dest / "ISIC" / cross_domain.ISIC_INPUT
  classes = splits.isic2018_image_classes()
  for jpg in sorted(inp.glob("*.jpg")):
    (inp / str(classes[jpg.stem])).mkdir(exist_ok=True)
    jpg.rename(inp / str(classes[jpg.stem]) / jpg.name)
  return dest


# ---------------------------------------------------------------------------------------------
# Fixtures: one synthetic tree and one build per dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = {}
  for dataset in DATASETS:
    tmp = tmp_path_factory.mktemp(dataset)
    manual = synthetic.write_cross_domain(tmp / "raw", dataset, seed=3)
    build.build(dataset, manual, tmp / "tfds", progress=False)
    out[dataset] = (manual, tmp / "tfds")
  return out


def _expected(dataset, manual, tmp):
  if dataset == "fss1000":
    return _patnet_fss(manual / "FSS-1000")
  if dataset == "deepglobe":
    return _patnet_deepglobe(manual / "Deepglobe")
  if dataset == "isic2018":
    return _patnet_isic(_isic_sorted_copy(manual, tmp / "isic_sorted") / "ISIC")
  return _patnet_lung(manual / "Lung Segmentation")


# ---------------------------------------------------------------------------------------------
# Class lists
# ---------------------------------------------------------------------------------------------


def test_fss1000_official_class_splits():
  sizes = {s: len(splits.fss1000_split_classes(s)) for s in ("train", "val", "test")}
  assert sizes == {"train": 520, "val": 240, "test": 240}
  names = [set(splits.fss1000_split_classes(s)) for s in ("train", "val", "test")]
  assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
  info = splits.cross_domain("fss")
  assert info.name == "fss1000" and info.num_classes == 1000 and len(set(info.class_names)) == 1000
  assert info.classes("train") == tuple(range(1, 521))
  assert info.classes("val") == tuple(range(521, 761))
  assert info.classes("test") == tuple(range(761, 1001))
  # PATNet's test class c (0-based 760 + position in the sorted test list) is our c + 1
  test = sorted(splits.fss1000_split_classes("test"))
  assert info.class_names[760] == test[0] and info.class_names[999] == test[-1]
  assert "thor's_hammer" in names[1] and all(
    n == n.strip() for n in info.class_names
  )  # CRLF lists stripped


def test_test_only_class_lists():
  assert splits.cross_domain("deepglobe").splits == {"test": (1, 2, 3, 4, 5, 6)}
  assert (
    splits.class_names("deepglobe")[1] == "agriculture"
    and splits.class_names("deepglobe")[6] == "barren"
  )
  assert splits.cross_domain("isic").splits == {"test": (1, 2, 3)}
  assert splits.cross_domain("lung").class_names == ("lung",)
  counts = np.bincount(list(splits.isic2018_image_classes().values()))
  assert counts.tolist() == [
    0,
    1867,
    519,
    208,
  ]  # PATNet's class_id.csv: 2594 task-1 training images
  assert (
    splits.dataset_kind("chest_xray") == "cross_domain" and splits.dataset_kind("pascal") == "folds"
  )
  with pytest.raises(ValueError, match="splits"):
    splits.cross_domain("isic2018").classes("train")
  with pytest.raises(ValueError):
    splits.fold_classes("fss1000", 0)  # no folds


# ---------------------------------------------------------------------------------------------
# Builds against PATNet's reading of the same files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
def test_build_matches_patnet_reading(built, dataset, tmp_path):
  manual, data_dir = built[dataset]
  expected = _expected(dataset, manual, tmp_path)
  report = source.read_build_report(data_dir, dataset)
  assert report["label_encoding"] == "binary" and report["empty_masks"] == {}
  assert list(report["splits"]) == list(raw.DATASET_SPLITS[dataset]) == list(expected)
  c = splits.cross_domain(dataset).num_classes
  for split, rows in expected.items():
    src = source.open_split(data_dir, dataset, split)
    assert src.index.image_ids.tolist() == [r[0] for r in rows]  # PATNet's metadata order
    assert report["splits"][split] == {"listed": len(rows), "records": len(rows), "skipped": 0}
    assert src.index.class_pixels.shape == (len(rows), c + 1)
    for i, (image_id, cid, image, mask) in enumerate(rows):
      want = _patnet_mask(mask)
      ex = src[i]
      assert ex["image_id"] == image_id
      np.testing.assert_array_equal(ex["label"], want)  # binary, PATNet's >= 128
      rgb = cv2.cvtColor(cv2.imread(image, FLAGS), cv2.COLOR_BGR2RGB)
      np.testing.assert_array_equal(ex["image"], rgb)
      counts = np.zeros(c + 1, np.int64)
      counts[0], counts[cid] = want.size - want.sum(), want.sum()
      np.testing.assert_array_equal(src.index.class_pixels[i], counts)
      assert src.index.ignore_pixels[i] == 0
    assert set(np.unique(src.index.class_pixels[:, 1:].argmax(1) + 1)) == {r[1] for r in rows}
  assert build.is_complete(data_dir, dataset)


def test_soft_mask_borders_follow_patnets_threshold(built):
  manual, data_dir = built["fss1000"]
  src = source.open_split(data_dir, "fss1000", "test")
  image_id = src.index.image_ids[0]
  grey = np.array(Image.open(manual / "FSS-1000" / f"{image_id}.png").convert("L"))
  assert {127, 128} <= set(np.unique(grey).tolist())  # the synthetic masks have soft borders
  label = src[0]["label"]
  assert (label[grey == 127] == 0).all() and (label[grey == 128] == 1).all()
  assert set(np.unique(label).tolist()) == {0, 1}


def test_read_binary_mask_is_pil_luma_at_128(tmp_path):
  rgb = np.zeros((2, 4, 3), np.uint8)
  rgb[0] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]  # luma 76, 150, 29, 128
  rgb[1] = [[127, 127, 127], [255, 255, 255], [200, 100, 90], [0, 0, 0]]
  Image.fromarray(rgb, "RGB").save(tmp_path / "m.png")
  np.testing.assert_array_equal(
    raw.read_binary_mask(os.fspath(tmp_path / "m.png")), [[0, 1, 0, 1], [0, 1, 1, 0]]
  )
  pal = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), "P")
  pal.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 255] + [0] * 759)
  pal.save(tmp_path / "p.png")
  np.testing.assert_array_equal(
    raw.read_binary_mask(os.fspath(tmp_path / "p.png")), [[0, 1], [1, 0]]
  )
  (tmp_path / "bad.png").write_bytes(raw.PNG_SIGNATURE + b"garbage")
  with pytest.raises(raw.CorruptFile):
    raw.read_binary_mask(os.fspath(tmp_path / "bad.png"))


def test_isic_class_folders_and_flat_official_layout_agree(built, tmp_path):
  manual, data_dir = built["isic2018"]
  sorted_tree = _isic_sorted_copy(manual, tmp_path / "sorted")
  a, b = raw.plan("isic2018", manual), raw.plan("isic2018", sorted_tree)
  assert [(e.image_id, e.class_id) for e in a.splits["test"]] == [
    (e.image_id, e.class_id) for e in b.splits["test"]
  ]
  assert "class_id.csv" in a.sources["test"] and "class folders" in b.sources["test"]


def test_chest_xray_pairs_both_mask_namings(built):
  manual, _ = built["chest_xray"]
  root = manual / "Lung Segmentation"
  plan = raw.plan("chest_xray", manual)
  entries = plan.splits["test"]
  assert len(entries) == len(list((root / "masks").glob("*.png")))  # every mask, nothing else
  assert {pathlib.Path(e.label).stem.endswith("_mask") for e in entries} == {True, False}
  assert all(pathlib.Path(e.image).parent.name == "CXR_png" for e in entries)
  assert (
    len(list((root / "CXR_png").glob("*.png"))) == len(entries) + 2
  )  # images without a mask are left out
  assert cross_domain.chest_xray_image_name("CHNCXR_0001_0_mask.png") == "CHNCXR_0001_0.png"
  assert cross_domain.chest_xray_image_name("MCUCXR_0001_0.png") == "MCUCXR_0001_0.png"


def test_fss1000_root_variants_and_partial_download(tmp_path, caplog):
  manual = synthetic.write_fss1000(tmp_path / "raw", (1, 1, 1), 3, seed=5, top="fewshot_data")
  plan = raw.plan("fss1000", manual)
  assert plan.root.endswith("fewshot_data") and {s: len(e) for s, e in plan.splits.items()} == {
    "train": 3,
    "val": 3,
    "test": 3,
  }
  assert "519 of 520 class folders are missing" in caplog.text  # logged, not an error
  assert "1 of 240 test classes" in plan.sources["test"]
  (manual / "fewshot_data" / "not_a_class").mkdir()
  assert raw.plan("fss1000", manual / "fewshot_data").root == os.fspath(manual / "fewshot_data")


# ---------------------------------------------------------------------------------------------
# Episodes from the fold-less lists
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "dataset,shot", [("fss1000", 5), ("deepglobe", 1), ("isic2018", 1), ("chest_xray", 1)]
)
def test_episodes_from_cross_domain_lists(built, dataset, shot):
  _, data_dir = built[dataset]
  src = source.open_split(data_dir, dataset, "test")
  lists = splits.cross_domain_lists(src.index, dataset, "test")
  assert lists.classes == splits.cross_domain(dataset).classes("test") and lists.mode == "test"
  assert len(lists) == len(src)  # every record is a query
  sampler = episodes.EpisodeSampler(lists, shot=shot, seed=0)
  owner = src.index.class_pixels[:, 1:].argmax(1) + 1
  for i in range(2 * len(sampler)):
    ep = sampler.sample(i)
    (c,) = ep.class_ids
    assert ep.query == int(lists.query_positions[i % len(lists)])  # list order, cycling
    assert owner[ep.query] == c and all(owner[s] == c for s in ep.supports[0])
    assert ep.query not in ep.supports[0] and len(set(ep.supports[0])) == shot
  other = "isic2018" if dataset == "fss1000" else "fss1000"
  with pytest.raises(ValueError, match="class columns"):
    splits.cross_domain_lists(src.index, other)  # the index of another dataset


# ---------------------------------------------------------------------------------------------
# Broken layouts: one RawDataError naming the problem, then the expected layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
def test_missing_manual_dir_shows_the_layout(dataset, tmp_path):
  with pytest.raises(raw.RawDataError, match="does not exist") as e:
    raw.plan(dataset, tmp_path / "nowhere")
  first, rest = str(e.value).split("\n", 1)
  assert "nowhere" in first and rest.startswith("Expected layout:")
  assert cross_domain.LAYOUTS[dataset] in rest
  (tmp_path / "empty").mkdir()
  with pytest.raises(raw.RawDataError, match="Expected layout"):
    raw.plan(dataset, tmp_path / "empty")


def test_fss1000_image_without_mask_is_named(tmp_path):
  manual = synthetic.write_fss1000(tmp_path / "raw", (1, 1, 1), 2, seed=6)
  cls = sorted(p for p in (manual / "FSS-1000").iterdir())[0]
  (cls / "2.png").unlink()
  with pytest.raises(raw.RawDataError, match="without their .png mask") as e:
    raw.plan("fss1000", manual)
  assert f"{cls.name}/2.png" in str(e.value) and "1 missing files" in str(e.value)
  shutil.rmtree(manual / "FSS-1000")
  (manual / "FSS-1000" / "some_folder").mkdir(parents=True)
  with pytest.raises(raw.RawDataError, match="no FSS-1000 class folder"):
    raw.plan("fss1000", manual)


def test_deepglobe_broken_layouts(tmp_path):
  manual = synthetic.write_deepglobe(tmp_path / "raw", 12, seed=7)
  root = manual / "Deepglobe"
  tile = sorted((root / "4" / "test" / "groundtruth").iterdir())[0]
  tile.unlink()
  with pytest.raises(raw.RawDataError, match="tiles without their groundtruth mask") as e:
    raw.plan("deepglobe", manual)
  assert tile.name in str(e.value)
  shutil.rmtree(root / "3" / "test" / "origin")
  with pytest.raises(raw.RawDataError, match=r"lacks 3/test/origin\.\nExpected layout"):
    raw.plan("deepglobe", manual)
  kaggle = tmp_path / "kaggle" / "train"
  kaggle.mkdir(parents=True)
  (kaggle / "119_sat.jpg").write_bytes(b"")
  (kaggle / "119_mask.png").write_bytes(b"")
  with pytest.raises(raw.RawDataError, match="raw Kaggle tiles.*preprocessed"):
    raw.plan("deepglobe", tmp_path / "kaggle")


def test_isic_broken_layouts(tmp_path):
  manual = synthetic.write_isic2018(tmp_path / "raw", (1, 1, 1), seed=8)
  inp = manual / "ISIC" / cross_domain.ISIC_INPUT
  shutil.copy(next(inp.glob("*.jpg")), inp / "ISIC_9999999.jpg")
  with pytest.raises(raw.RawDataError, match="ISIC_9999999.jpg") as e:
    raw.plan("isic2018", manual)
  assert "class_id.csv" in str(e.value)
  (inp / "ISIC_9999999.jpg").unlink()
  (inp / "1").mkdir()
  with pytest.raises(raw.RawDataError, match="lacks 2/, 3/"):
    raw.plan("isic2018", manual)
  (inp / "1").rmdir()
  next((manual / "ISIC" / cross_domain.ISIC_GROUND_TRUTH).glob("*_segmentation.png")).unlink()
  with pytest.raises(raw.RawDataError, match="_segmentation.png mask"):
    raw.plan("isic2018", manual)
  shutil.rmtree(manual / "ISIC" / cross_domain.ISIC_GROUND_TRUTH)
  with pytest.raises(raw.RawDataError, match="lacks ISIC2018_Task1_Training_GroundTruth/"):
    raw.plan("isic2018", manual)


def test_chest_xray_broken_layouts(tmp_path):
  manual = synthetic.write_chest_xray(tmp_path / "raw", 2, 1, seed=9)
  root = manual / "Lung Segmentation"
  shenzhen = sorted((root / "masks").glob("*_mask.png"))[0]
  shutil.copy(shenzhen, root / "masks" / shenzhen.name.replace("_mask", ""))
  with pytest.raises(raw.RawDataError, match="are both masks of"):
    raw.plan("chest_xray", manual)
  (root / "masks" / shenzhen.name.replace("_mask", "")).unlink()
  image = root / "CXR_png" / shenzhen.name.replace("_mask", "")
  image.unlink()
  with pytest.raises(raw.RawDataError, match="masks without their CXR_png image") as e:
    raw.plan("chest_xray", manual)
  assert image.name in str(e.value)
  shutil.rmtree(root / "masks")
  with pytest.raises(raw.RawDataError, match="lacks masks/"):
    raw.plan("chest_xray", manual)


# ---------------------------------------------------------------------------------------------
# Build machinery on a test-only dataset: report, corrupt files, CLI, rerun
# ---------------------------------------------------------------------------------------------


def test_corrupt_and_empty_masks_are_reported(tmp_path):
  manual = synthetic.write_chest_xray(tmp_path / "raw", 3, 1, seed=10)
  masks = sorted((manual / "Lung Segmentation" / "masks").glob("*.png"))
  masks[0].write_bytes(raw.PNG_SIGNATURE + b"garbage")
  Image.fromarray(np.full((8, 8), 127, np.uint8), "L").save(masks[1])  # all below 128: empty
  image = (
    manual / "Lung Segmentation" / "CXR_png" / cross_domain.chest_xray_image_name(masks[1].name)
  )
  h, w = cv2.imread(os.fspath(image)).shape[:2]
  Image.fromarray(np.full((h, w), 127, np.uint8), "L").save(masks[1])
  build.build("chest_xray", manual, tmp_path / "tfds", progress=False)
  report = source.read_build_report(tmp_path / "tfds", "chest_xray")
  assert report["splits"]["test"] == {"listed": 4, "records": 3, "skipped": 1}
  assert (
    report["skipped"][0]["file"].endswith(masks[0].name)
    and "mask" in report["skipped"][0]["reason"]
  )
  assert report["empty_masks"] == {"test": [image.stem]}
  src = source.open_split(tmp_path / "tfds", "chest_xray", "test")
  np.testing.assert_array_equal(splits.record_classes(src.index, "chest_xray"), [1, 1, 1])
  assert (
    len(splits.cross_domain_lists(src.index, "chest_xray")) == 3
  )  # PATNet draws the empty one too
  assert len(splits.cross_domain_lists(src.index, "chest_xray", min_pixels=1)) == 2


def test_empty_masks_keep_their_class_from_the_image_id():
  ids = np.asarray(["1/a", "3/b", "3/c"])
  cp = np.zeros((3, 7), np.int64)
  cp[:, 0] = 16
  cp[0, 1], cp[0, 0] = 4, 12  # record 0: class 1; records 1, 2: empty masks of folder 3
  index = source.DatasetIndex(
    image_ids=ids,
    heights=np.full(3, 4, np.int32),
    widths=np.full(3, 4, np.int32),
    class_pixels=cp,
    ignore_pixels=np.zeros(3, np.int64),
  )
  np.testing.assert_array_equal(splits.record_classes(index, "deepglobe"), [1, 3, 3])
  lists = splits.cross_domain_lists(index, "deepglobe")
  assert lists.counts() == {1: 1, 2: 0, 3: 2, 4: 0, 5: 0, 6: 0} and lists.min_pixels == 0
  assert splits.cross_domain_lists(index, "deepglobe", min_pixels=4).counts()[3] == 0
  fss = splits.cross_domain("fss1000")
  cp = np.zeros((1, 1001), np.int64)
  cp[0, 0] = 16
  index = source.DatasetIndex(
    image_ids=np.asarray([f"{fss.class_names[770]}/3"]),
    heights=np.full(1, 4, np.int32),
    widths=np.full(1, 4, np.int32),
    class_pixels=cp,
    ignore_pixels=np.zeros(1, np.int64),
  )
  assert splits.record_classes(index, "fss1000").tolist() == [771]


def test_cli_builds_a_test_only_dataset(tmp_path, capsys):
  manual = synthetic.write_isic2018(tmp_path / "raw", (2, 1, 1), seed=11, class_folders=True)
  args = [
    "--dataset",
    "isic2018",
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
  assert "isic2018 ready in" in out and "test 4 records (0 skipped)" in out
  assert build.is_complete(tmp_path / "d", "isic2018")
  assert sorted(
    p.name for p in source.dataset_dir(tmp_path / "d", "isic2018").glob("fss_index_*")
  ) == ["fss_index_test.npz"]
  report = os.fspath(source.dataset_dir(tmp_path / "d", "isic2018") / source.REPORT_FILE)
  mtime = os.stat(report).st_mtime_ns
  assert build.main(args) == 0  # rerun: complete build found, nothing rewritten
  assert os.stat(report).st_mtime_ns == mtime
  assert (
    build.main(
      [
        "--dataset",
        "deepglobe",
        "--manual_dir",
        os.fspath(tmp_path / "nope"),
        "--data_dir",
        os.fspath(tmp_path / "d"),
      ]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert err.startswith("error: DeepGlobe manual_dir") and "test/groundtruth/<tile>.png" in err


def test_synthetic_cross_domain_is_deterministic(tmp_path):
  def tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

  a = tree(synthetic.write_deepglobe(tmp_path / "a", 6, seed=1))
  assert a == tree(synthetic.write_deepglobe(tmp_path / "b", 6, seed=1))
  assert a != tree(synthetic.write_deepglobe(tmp_path / "c", 6, seed=2))
