"""Fold class splits and per-fold image lists of PASCAL-5i and COCO-20i.

Spec: data_protocol.md §4 (folds), §5.1 (list rule), §6 (base-class numbering).

Folds:

* PASCAL-5i fold i: novel = 5i+1 … 5i+5, base = the other 15 (ascending).
* COCO-20i interleaved (default, ``use_split_coco: True`` of every released
  config): novel = {k : (k - 1) mod 4 = i}; contiguous (``coco_split="contiguous"``,
  BAM's "PANet" split): novel = 20i+1 … 20i+20. Base = the other 60, ascending.

Lists (§5.1, ``make_dataset`` of the reference), computed in one vectorised pass
from the build's ``class_pixels`` [N, C+1] (pixel counts at original resolution),
so a single dataset build serves every fold and protocol:

* ``present`` = classes with at least one pixel (0 and 255 are not classes);
* BAM protocol (default for training): drop every image with a present class
  outside the mode's class list (``filter_intersection``); PFENet protocol keeps them;
* ``kept`` = present ∩ S with ≥ 2·32·32 = 2048 pixels; an image with a non-empty
  ``kept`` is a query candidate, and a support candidate of each class in ``kept``.

Usage::

  fc = fold_classes("pascal5i", 0)              # FoldClasses(novel=(1..5), base=(6..20))
  lists = fold_lists(src.index, "pascal5i", 0, "train")
  lists.query_positions                        # int64 [Q] record positions, list order
  lists.support_positions[7]                   # int64 [n_7] record positions for class 7
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

DATASETS = ("pascal5i", "coco20i")
NUM_CLASSES = {"pascal5i": 20, "coco20i": 80}
NUM_FOLDS = 4
COCO_SPLITS = ("interleaved", "contiguous")
PROTOCOLS = ("bam", "pfenet")
MODES = ("train", "test")
# §5.1: 2·32·32 pixels at original resolution (OSLSM's "≥ 2 cells at 1/32").
MIN_PIXELS = 2 * 32 * 32
IGNORE = 255
_ALIASES = {"pascal": "pascal5i", "voc": "pascal5i", "pascal5i": "pascal5i",
            "coco": "coco20i", "coco20i": "coco20i"}


def canonical_dataset(dataset: str) -> str:
  """"pascal5i" / "coco20i" for a dataset name or alias ("pascal", "coco")."""
  try:
    return _ALIASES[dataset.lower()]
  except KeyError:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}") from None


# Class names by class id 1..C (label value k is the k-th name): PASCAL VOC's 20 classes, and
# COCO's 80 instance categories by ascending COCO category id (data_protocol.md §3.3).
PASCAL_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
_NAMES_OF = {"pascal5i": PASCAL_CLASS_NAMES, "coco20i": COCO_CLASS_NAMES}


def class_names(dataset: str) -> dict[int, str]:
  """{class id: name} of a dataset ("pascal5i", "coco20i" or an alias); {} for other datasets.

  Unknown names (a synthetic or custom dataset) give an empty mapping, so tables and
  charts fall back to the bare class ids.
  """
  try:
    names = _NAMES_OF[canonical_dataset(dataset)]
  except ValueError:
    return {}
  return {k: name for k, name in enumerate(names, 1)}


@dataclasses.dataclass(frozen=True)
class FoldClasses:
  """Class ids (1-based original dataset ids) of one fold.

  Attributes:
    dataset: "pascal5i" or "coco20i".
    fold: 0..3.
    novel: the fold's test classes, ascending.
    base: the fold's training classes, ascending (defines the base-label numbering).
  """
  dataset: str
  fold: int
  novel: tuple[int, ...]
  base: tuple[int, ...]

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES[self.dataset]

  def classes(self, mode: str) -> tuple[int, ...]:
    """The mode's class list: base for "train", novel for "test" (§5.1 S)."""
    _check_mode(mode)
    return self.base if mode == "train" else self.novel

  def base_label_lut(self) -> np.ndarray:
    """uint8 [256] look-up table raw label -> base label (§6).

    Base class c -> (position of c in ``base``) + 1, novel classes -> 0, 0 -> 0,
    255 -> 255; other values (not classes of the dataset) -> 255.
    """
    lut = np.full(256, IGNORE, np.uint8)
    lut[: self.num_classes + 1] = 0
    lut[np.asarray(self.base)] = np.arange(1, len(self.base) + 1, dtype=np.uint8)
    return lut


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def fold_classes(dataset: str, fold: int, *, coco_split: str = "interleaved") -> FoldClasses:
  """Novel and base classes of ``fold`` (§4 tables).

  Args:
    dataset: "pascal5i" or "coco20i" (aliases "pascal", "coco").
    fold: 0..3.
    coco_split: "interleaved" (default; fold i tests on k with (k-1) mod 4 = i) or
      "contiguous" (fold i tests on 20i+1 … 20i+20). Ignored for PASCAL.

  Returns:
    `FoldClasses` with ascending novel and base tuples.
  """
  dataset = canonical_dataset(dataset)
  if not (isinstance(fold, (int, np.integer)) and 0 <= fold < NUM_FOLDS):
    raise ValueError(f"fold must be 0..{NUM_FOLDS - 1}, got {fold!r}")
  fold = int(fold)
  n = NUM_CLASSES[dataset]
  if dataset == "pascal5i":
    novel = list(range(5 * fold + 1, 5 * fold + 6))
  elif coco_split == "interleaved":
    novel = [k for k in range(1, n + 1) if (k - 1) % 4 == fold]
  elif coco_split == "contiguous":
    novel = list(range(20 * fold + 1, 20 * fold + 21))
  else:
    raise ValueError(f"coco_split must be one of {COCO_SPLITS}, got {coco_split!r}")
  base = [k for k in range(1, n + 1) if k not in novel]
  return FoldClasses(dataset, fold, tuple(novel), tuple(base))


@dataclasses.dataclass(frozen=True)
class FoldLists:
  """Per-fold query and support lists of one split (§5.1 outputs).

  Attributes:
    classes: the class list S (base classes for training, novel for testing), ascending;
      ``class_index`` (the reference's ``subcls``) is a position in this tuple.
    query_positions: int64 [Q], record positions of ``data_list`` in list (record) order.
    support_positions: class id -> int64 [n_c], record positions of
      ``sub_class_file_list[c]`` in list order (may be empty on tiny datasets).
    candidates: bool [Q, |S|], class ``classes[j]`` has ≥ 1 pixel in query ``q`` (§7.1
      candidate classes: any pixel count).
    mode, filter_intersection, min_pixels: how the lists were made.
  """
  classes: tuple[int, ...]
  query_positions: np.ndarray
  support_positions: Mapping[int, np.ndarray]
  candidates: np.ndarray
  mode: str = "train"
  filter_intersection: bool = True
  min_pixels: int = MIN_PIXELS

  def __len__(self) -> int:
    return len(self.query_positions)

  def class_index(self, class_id: int) -> int:
    """Position of ``class_id`` in ``classes`` (``subcls``); ValueError if absent."""
    try:
      return self.classes.index(int(class_id))
    except ValueError:
      raise ValueError(f"class {class_id} is not in this list's classes {self.classes}") from None

  def counts(self) -> dict[int, int]:
    """class id -> number of support images (the §5.4 / §5.5 statistics)."""
    return {c: len(self.support_positions[c]) for c in self.classes}


def build_lists(class_pixels: np.ndarray, classes: tuple[int, ...] | list[int], *,
                filter_intersection: bool, min_pixels: int = MIN_PIXELS,
                mode: str = "train") -> FoldLists:
  """§5.1 for one class list S over all images at once.

  Args:
    class_pixels: int [N, C + 1], pixels of label value 0..C per image (column 0 is
      background, never a class).
    classes: S, class ids in 1..C.
    filter_intersection: drop images with any pixel of a class outside S (BAM training).
    min_pixels: the per-class threshold (2048).
    mode: recorded in the result.

  Returns:
    `FoldLists`.
  """
  cp = np.asarray(class_pixels)
  if cp.ndim != 2 or cp.shape[1] < 2:
    raise ValueError(f"class_pixels must be [N, C + 1], got shape {cp.shape}")
  num_classes = cp.shape[1] - 1
  classes = tuple(int(c) for c in classes)
  bad = [c for c in classes if not 1 <= c <= num_classes]
  if bad:
    raise ValueError(f"classes {bad} are outside 1..{num_classes}")
  counts = cp[:, 1:]                                              # [N, C]
  present = counts > 0
  in_s = np.zeros(num_classes, bool)
  in_s[np.asarray(classes, np.int64) - 1] = True
  keep_image = ~(present & ~in_s).any(axis=1) if filter_intersection else np.ones(len(cp), bool)
  cols = np.asarray(classes, np.int64) - 1
  kept = (counts[:, cols] >= min_pixels) & keep_image[:, None]    # [N, |S|]
  query = np.flatnonzero(kept.any(axis=1)).astype(np.int64)
  support = {c: np.flatnonzero(kept[:, j]).astype(np.int64) for j, c in enumerate(classes)}
  return FoldLists(classes=classes, query_positions=query, support_positions=support,
                   candidates=present[query][:, cols], mode=mode,
                   filter_intersection=bool(filter_intersection), min_pixels=int(min_pixels))


def fold_lists(index, dataset: str, fold: int, mode: str, *, protocol: str = "bam",
               coco_split: str = "interleaved", min_pixels: int = MIN_PIXELS) -> FoldLists:
  """The fold's lists for ``mode`` from a split's `DatasetIndex` (or anything with
  ``class_pixels``).

  Args:
    index: the train split's index for mode "train", the val split's for "test".
    dataset, fold, coco_split: see `fold_classes`.
    mode: "train" (base classes; intersection filter under the BAM protocol) or "test"
      (novel classes; never filtered).
    protocol: "bam" (default; SCCAN/HDMNet/PAHNet) or "pfenet" (no intersection filter:
      training images may show novel-class pixels, which are labelled background).

  Returns:
    `FoldLists`.
  """
  _check_mode(mode)
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  fc = fold_classes(dataset, fold, coco_split=coco_split)
  cp = np.asarray(index.class_pixels)
  if cp.shape[1] - 1 != fc.num_classes:
    raise ValueError(f"{fc.dataset} has {fc.num_classes} classes but the index has {cp.shape[1] - 1} "
                     f"class columns; is it the index of another dataset?")
  return build_lists(cp, fc.classes(mode), filter_intersection=(mode == "train" and protocol == "bam"),
                     min_pixels=min_pixels, mode=mode)


__all__ = ["DATASETS", "NUM_CLASSES", "MIN_PIXELS", "COCO_SPLITS", "PROTOCOLS", "FoldClasses",
           "FoldLists", "canonical_dataset", "fold_classes", "build_lists", "fold_lists"]
