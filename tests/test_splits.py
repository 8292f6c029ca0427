"""Fold class lists (data_protocol.md §4) and per-fold lists (§5.1)."""

from __future__ import annotations

import numpy as np
import pytest

from fss_jax.data import splits

# §4.1, literally.
PASCAL_NOVEL = {
  0: [1, 2, 3, 4, 5],
  1: [6, 7, 8, 9, 10],
  2: [11, 12, 13, 14, 15],
  3: [16, 17, 18, 19, 20],
}
PASCAL_BASE = {
  0: [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
  1: [1, 2, 3, 4, 5, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
  2: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 18, 19, 20],
  3: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
}
# §4.2 interleaved, literally.
COCO_INTERLEAVED_NOVEL = {
  0: [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77],
  1: [2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 66, 70, 74, 78],
  2: [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63, 67, 71, 75, 79],
  3: [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80],
}
# §4.2 contiguous: fold 0 person … cow, 1 elephant … bottle, 2 wine glass … bed, 3 dining table … toothbrush.
COCO_CONTIGUOUS_NOVEL = {
  0: list(range(1, 21)),
  1: list(range(21, 41)),
  2: list(range(41, 61)),
  3: list(range(61, 81)),
}


@pytest.mark.parametrize("fold", range(4))
def test_pascal_folds_match_the_tables(fold):
  fc = splits.fold_classes("pascal5i", fold)
  assert list(fc.novel) == PASCAL_NOVEL[fold]
  assert list(fc.base) == PASCAL_BASE[fold]
  assert fc.classes("train") == fc.base and fc.classes("test") == fc.novel
  assert splits.fold_classes("pascal", fold) == fc  # alias


@pytest.mark.parametrize("fold", range(4))
def test_coco_folds_match_the_tables(fold):
  fc = splits.fold_classes("coco20i", fold)
  assert list(fc.novel) == COCO_INTERLEAVED_NOVEL[fold]
  assert list(fc.base) == [k for k in range(1, 81) if k not in COCO_INTERLEAVED_NOVEL[fold]]
  assert len(fc.base) == 60 and list(fc.base) == sorted(fc.base)
  fc = splits.fold_classes("coco20i", fold, coco_split="contiguous")
  assert list(fc.novel) == COCO_CONTIGUOUS_NOVEL[fold]
  assert list(fc.base) == [k for k in range(1, 81) if k not in COCO_CONTIGUOUS_NOVEL[fold]]


def test_person_is_novel_in_coco_fold0_only():
  assert [1 in splits.fold_classes("coco20i", f).novel for f in range(4)] == [
    True,
    False,
    False,
    False,
  ]


def test_base_label_numbering():
  lut = splits.fold_classes("pascal5i", 1).base_label_lut()
  # fold 1 base = 1..5, 11..20 -> 1..15 in ascending order; novel 6..10 -> 0; 0 -> 0; 255 -> 255.
  assert lut[[0, 1, 5, 6, 10, 11, 20, 255]].tolist() == [0, 1, 5, 0, 0, 6, 15, 255]
  coco = splits.fold_classes("coco20i", 0).base_label_lut()
  assert coco[2] == 1 and coco[1] == 0 and coco[80] == 60 and coco[77] == 0


def test_bad_arguments_are_explained():
  with pytest.raises(ValueError, match="fold must be 0..3"):
    splits.fold_classes("pascal5i", 4)
  with pytest.raises(ValueError, match="unknown dataset"):
    splits.fold_classes("ade20k", 0)
  with pytest.raises(ValueError, match="coco_split"):
    splits.fold_classes("coco20i", 0, coco_split="panet")
  with pytest.raises(ValueError, match="class columns"):
    splits.fold_lists(
      type("I", (), {"class_pixels": np.zeros((3, 81), np.int64)}), "pascal5i", 0, "train"
    )


# -- §5.1 against a direct, per-image application of the rule -------------------------------


def _direct_make_dataset(labels, sub_list, filter_intersection, min_pixels=splits.MIN_PIXELS):
  """The reference loop of §5.1, one label at a time."""
  data_list, per_class = [], {c: [] for c in sub_list}
  for i, label in enumerate(labels):
    present = [c for c in np.unique(label).tolist() if c not in (0, 255)]
    if filter_intersection and not set(present) <= set(sub_list):
      continue
    kept = [c for c in present if c in sub_list and int((label == c).sum()) >= min_pixels]
    if kept:
      data_list.append(i)
      for c in kept:
        per_class[c].append(i)
  return data_list, per_class


def _random_labels(num_classes, n, seed):
  """Labels with a few rectangles of random classes and sizes around the threshold."""
  rng = np.random.default_rng(seed)
  labels = []
  for _ in range(n):
    h, w = (int(v) for v in rng.integers(40, 120, 2))
    lab = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(0, 4))):
      c = int(rng.integers(1, num_classes + 1))
      bh, bw = int(rng.integers(1, h)), int(rng.integers(1, w))
      y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
      lab[y : y + bh, x : x + bw] = c
    if rng.random() < 0.5:
      lab[int(rng.integers(0, h))] = 255
    labels.append(lab)
  return labels


def _class_pixels(labels, num_classes):
  return np.stack(
    [np.bincount(l.ravel(), minlength=256)[: num_classes + 1] for l in labels]
  ).astype(np.int64)


@pytest.mark.parametrize(
  "dataset,num_classes,min_pixels", [("pascal5i", 20, 2048), ("coco20i", 80, 900)]
)
def test_lists_equal_direct_rule(dataset, num_classes, min_pixels):
  labels = _random_labels(num_classes, 150, seed=num_classes)
  index = type("Index", (), {"class_pixels": _class_pixels(labels, num_classes)})
  for fold in range(4):
    fc = splits.fold_classes(dataset, fold)
    for mode, protocol, filt in (
      ("train", "bam", True),
      ("train", "pfenet", False),
      ("test", "bam", False),
    ):
      lists = splits.fold_lists(
        index, dataset, fold, mode, protocol=protocol, min_pixels=min_pixels
      )
      data_list, per_class = _direct_make_dataset(labels, fc.classes(mode), filt, min_pixels)
      assert lists.query_positions.tolist() == data_list
      assert list(lists.support_positions) == list(fc.classes(mode))
      assert {c: v.tolist() for c, v in lists.support_positions.items()} == per_class
      # candidates: any pixel of the class (also below the threshold)
      for row, q in enumerate(lists.query_positions):
        present = set(np.unique(labels[q]).tolist())
        assert [c in present for c in lists.classes] == lists.candidates[row].tolist()
      if mode == "train" and protocol == "bam":
        assert data_list, "the toy labels should leave some training images"


def test_data_list_is_union_of_class_lists():
  labels = _random_labels(20, 80, seed=3)
  lists = splits.build_lists(
    _class_pixels(labels, 20), splits.fold_classes("pascal5i", 2).base, filter_intersection=True
  )
  union = sorted(set(np.concatenate(list(lists.support_positions.values())).tolist()))
  assert lists.query_positions.tolist() == union
  assert lists.class_index(20) == 14
  with pytest.raises(ValueError, match="not in this list"):
    lists.class_index(11)


def test_lists_on_built_synthetic_dataset(tmp_path_factory):
  """§5.1 from the build's pixel counts equals §5.1 on the decoded label PNGs."""
  from data_prep import synthetic
  from fss_jax.data import source

  data_dir = synthetic.make_built_dataset(tmp_path_factory.mktemp("splits_voc"), "voc", 32, 0)
  for split, mode in (("train", "train"), ("val", "test")):
    src = source.open_split(data_dir, "pascal5i", split)
    labels = [src[i]["label"] for i in range(len(src))]
    for fold in range(4):
      fc = splits.fold_classes("pascal5i", fold)
      lists = splits.fold_lists(src.index, "pascal5i", fold, mode)
      data_list, per_class = _direct_make_dataset(labels, fc.classes(mode), mode == "train")
      assert lists.query_positions.tolist() == data_list
      assert {c: v.tolist() for c, v in lists.support_positions.items()} == per_class
