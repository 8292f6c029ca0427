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

Cross-domain test sets (PATNet's CD-FSS benchmark; docs/cross_domain.md) have no folds:
``fss1000`` (train / val / test class splits of 520 / 240 / 240 classes), ``deepglobe``
(6 land-cover classes), ``isic2018`` (3 lesion classes) and ``chest_xray`` (1 class, lung),
the last three test-only. Their records hold one class each with a binary label
(0 background, 1 the record's class; no ignore label), the class being the one
``class_pixels`` column besides background that counts pixels::

  info = cross_domain("isic")                  # CrossDomain(name="isic2018", splits={"test": (1, 2, 3)})
  lists = cross_domain_lists(src.index, "isic2018", "test")   # FoldLists over all test classes
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import types
from collections.abc import Mapping

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
_ALIASES = {
  "pascal": "pascal5i",
  "voc": "pascal5i",
  "pascal5i": "pascal5i",
  "coco": "coco20i",
  "coco20i": "coco20i",
}


def canonical_dataset(dataset: str) -> str:
  """ "pascal5i" / "coco20i" for a dataset name or alias ("pascal", "coco")."""
  try:
    return _ALIASES[dataset.lower()]
  except KeyError:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}") from None


# Class names by class id 1..C (label value k is the k-th name): PASCAL VOC's 20 classes, and
# COCO's 80 instance categories by ascending COCO category id (data_protocol.md §3.3).
PASCAL_CLASS_NAMES = (
  "aeroplane",
  "bicycle",
  "bird",
  "boat",
  "bottle",
  "bus",
  "car",
  "cat",
  "chair",
  "cow",
  "diningtable",
  "dog",
  "horse",
  "motorbike",
  "person",
  "pottedplant",
  "sheep",
  "sofa",
  "train",
  "tvmonitor",
)
COCO_CLASS_NAMES = (
  "person",
  "bicycle",
  "car",
  "motorcycle",
  "airplane",
  "bus",
  "train",
  "truck",
  "boat",
  "traffic light",
  "fire hydrant",
  "stop sign",
  "parking meter",
  "bench",
  "bird",
  "cat",
  "dog",
  "horse",
  "sheep",
  "cow",
  "elephant",
  "bear",
  "zebra",
  "giraffe",
  "backpack",
  "umbrella",
  "handbag",
  "tie",
  "suitcase",
  "frisbee",
  "skis",
  "snowboard",
  "sports ball",
  "kite",
  "baseball bat",
  "baseball glove",
  "skateboard",
  "surfboard",
  "tennis racket",
  "bottle",
  "wine glass",
  "cup",
  "fork",
  "knife",
  "spoon",
  "bowl",
  "banana",
  "apple",
  "sandwich",
  "orange",
  "broccoli",
  "carrot",
  "hot dog",
  "pizza",
  "donut",
  "cake",
  "chair",
  "couch",
  "potted plant",
  "bed",
  "dining table",
  "toilet",
  "tv",
  "laptop",
  "mouse",
  "remote",
  "keyboard",
  "cell phone",
  "microwave",
  "oven",
  "toaster",
  "sink",
  "refrigerator",
  "book",
  "clock",
  "vase",
  "scissors",
  "teddy bear",
  "hair drier",
  "toothbrush",
)
_NAMES_OF = {"pascal5i": PASCAL_CLASS_NAMES, "coco20i": COCO_CLASS_NAMES}


def class_names(dataset: str) -> dict[int, str]:
  """{class id: name} of a dataset (PASCAL / COCO, a cross-domain set, or an alias); {} for others.

  Unknown names (a synthetic or custom dataset) give an empty mapping, so tables and
  charts fall back to the bare class ids.
  """
  if str(dataset).lower() in _CD_ALIASES:
    return {k: name for k, name in enumerate(cross_domain(dataset).class_names, 1)}
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


def build_lists(
  class_pixels: np.ndarray,
  classes: tuple[int, ...] | list[int],
  *,
  filter_intersection: bool,
  min_pixels: int = MIN_PIXELS,
  mode: str = "train",
) -> FoldLists:
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
  counts = cp[:, 1:]  # [N, C]
  present = counts > 0
  in_s = np.zeros(num_classes, bool)
  in_s[np.asarray(classes, np.int64) - 1] = True
  keep_image = (
    np.asarray(~(present & ~in_s).any(axis=1)) if filter_intersection else np.ones(len(cp), bool)
  )
  cols = np.asarray(classes, np.int64) - 1
  kept = (counts[:, cols] >= min_pixels) & keep_image[:, None]  # [N, |S|]
  query = np.flatnonzero(kept.any(axis=1)).astype(np.int64)
  support = {c: np.flatnonzero(kept[:, j]).astype(np.int64) for j, c in enumerate(classes)}
  return FoldLists(
    classes=classes,
    query_positions=query,
    support_positions=support,
    candidates=present[query][:, cols],
    mode=mode,
    filter_intersection=bool(filter_intersection),
    min_pixels=int(min_pixels),
  )


def fold_lists(
  index,
  dataset: str,
  fold: int,
  mode: str,
  *,
  protocol: str = "bam",
  coco_split: str = "interleaved",
  min_pixels: int = MIN_PIXELS,
) -> FoldLists:
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
    raise ValueError(
      f"{fc.dataset} has {fc.num_classes} classes but the index has {cp.shape[1] - 1} "
      f"class columns; is it the index of another dataset?"
    )
  return build_lists(
    cp,
    fc.classes(mode),
    filter_intersection=(mode == "train" and protocol == "bam"),
    min_pixels=min_pixels,
    mode=mode,
  )


# ---------------------------------------------------------------------------------------------
# Cross-domain test sets (PATNet, ECCV 2022): no folds, one class per record, binary labels
# ---------------------------------------------------------------------------------------------

CROSS_DOMAIN_DATASETS = ("fss1000", "deepglobe", "isic2018", "chest_xray")
CROSS_DOMAIN_NUM_CLASSES = {"fss1000": 1000, "deepglobe": 6, "isic2018": 3, "chest_xray": 1}
_ASSET_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets"
# FSS-1000 class splits (HSNet's data/splits/fss/{trn,val,test}.txt, identical in PATNet), shipped
# in fss_jax/assets/fss1000/ with line endings normalised to LF.
FSS1000_SPLITS = {"train": "trn.txt", "val": "val.txt", "test": "test.txt"}
# Class folder k of PATNet's DeepGlobe tiles = labelset[k - 1] of its data/preprocess.py:65,
# compared with cv2.imread's BGR pixels: BGR (0,255,255) = DeepGlobe's yellow (agriculture),
# (255,255,0) = cyan (urban), (255,0,255) = magenta (rangeland), (0,255,0) = green (forest),
# (255,0,0) = blue (water), (255,255,255) = white (barren).
DEEPGLOBE_CLASS_NAMES = ("agriculture", "urban", "rangeland", "forest", "water", "barren")
# PATNet reads class folders 1, 2, 3 (data/isic.py:20) without naming them; the classes of its
# data/isic/class_id.csv in order of first appearance (the folder mapping DMTNet and IFA use).
ISIC2018_CLASS_NAMES = ("nevus", "melanoma", "seborrheic_keratosis")
CHEST_XRAY_CLASS_NAMES = ("lung",)
_CD_ALIASES = {
  "fss1000": "fss1000",
  "fss": "fss1000",
  "fss-1000": "fss1000",
  "fss_1000": "fss1000",
  "deepglobe": "deepglobe",
  "isic2018": "isic2018",
  "isic": "isic2018",
  "chest_xray": "chest_xray",
  "chestxray": "chest_xray",
  "lung": "chest_xray",
}


def canonical_cross_domain(dataset: str) -> str:
  """ "fss1000" / "deepglobe" / "isic2018" / "chest_xray" for a name or alias ("fss", "isic", "lung")."""
  try:
    return _CD_ALIASES[str(dataset).lower()]
  except KeyError:
    raise ValueError(
      f"unknown cross-domain dataset {dataset!r}; expected one of {CROSS_DOMAIN_DATASETS}"
    ) from None


def dataset_kind(dataset: str) -> str:
  """ "folds" (PASCAL-5i, COCO-20i) or "cross_domain" (fold-less test sets); ValueError otherwise."""
  if str(dataset).lower() in _CD_ALIASES:
    return "cross_domain"
  if str(dataset).lower() in _ALIASES:
    return "folds"
  raise ValueError(
    f"unknown dataset {dataset!r}; expected one of {DATASETS + CROSS_DOMAIN_DATASETS}"
  )


@functools.cache
def fss1000_split_classes(split: str) -> tuple[str, ...]:
  """FSS-1000 class names of ``split`` ("train" 520, "val" 240, "test" 240), sorted as PATNet /
  HSNet sort them (``sorted`` of the list lines, data/fss.py:24)."""
  if split not in FSS1000_SPLITS:
    raise ValueError(f"FSS-1000 has splits {tuple(FSS1000_SPLITS)}, got {split!r}")
  path = _ASSET_DIR / "fss1000" / FSS1000_SPLITS[split]
  return tuple(
    sorted(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
  )


@functools.cache
def isic2018_image_classes() -> Mapping[str, int]:
  """{ISIC image id: class id} of the 2594 ISIC 2018 task-1 training images (PATNet's
  data/isic/class_id.csv, shipped in fss_jax/assets/isic2018/), ids per `ISIC2018_CLASS_NAMES`."""
  rank = {name: k for k, name in enumerate(ISIC2018_CLASS_NAMES, 1)}
  rows = (_ASSET_DIR / "isic2018" / "class_id.csv").read_text(encoding="utf-8").splitlines()
  out = {}
  for line in rows[1:]:  # header "ID,Class"
    if line.strip():
      image_id, name = (t.strip() for t in line.split(","))
      out[image_id] = rank[name]
  return types.MappingProxyType(out)  # cached: read-only


@dataclasses.dataclass(frozen=True)
class CrossDomain:
  """Classes of one cross-domain dataset.

  Attributes:
    name: "fss1000", "deepglobe", "isic2018" or "chest_xray".
    class_names: name of class id k at position k - 1 (all splits).
    splits: split -> its class ids, ascending (FSS-1000: train 1..520, val 521..760,
      test 761..1000 = PATNet's 0-based ids + 1; the others: "test" only).
  """

  name: str
  class_names: tuple[str, ...]
  splits: Mapping[str, tuple[int, ...]]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def classes(self, split: str = "test") -> tuple[int, ...]:
    """Class ids of ``split`` (PATNet evaluates on "test")."""
    if split not in self.splits:
      raise ValueError(f"{self.name} has splits {tuple(self.splits)}, got {split!r}")
    return self.splits[split]


@functools.cache
def cross_domain(dataset: str) -> CrossDomain:
  """The `CrossDomain` classes of a dataset or alias."""
  name = canonical_cross_domain(dataset)
  if name == "fss1000":
    names: tuple[str, ...] = ()
    splits_: dict[str, tuple[int, ...]] = {}
    for split in FSS1000_SPLITS:
      part = fss1000_split_classes(split)
      splits_[split] = tuple(range(len(names) + 1, len(names) + len(part) + 1))
      names += part
    return CrossDomain(name, names, splits_)
  names = {
    "deepglobe": DEEPGLOBE_CLASS_NAMES,
    "isic2018": ISIC2018_CLASS_NAMES,
    "chest_xray": CHEST_XRAY_CLASS_NAMES,
  }[name]
  return CrossDomain(name, names, {"test": tuple(range(1, len(names) + 1))})


def record_classes(index, dataset: str) -> np.ndarray:
  """int64 [N]: the class of every record of a cross-domain split's index.

  The class column that counts pixels; for a record whose mask is empty, the class its
  image id or file names it by (FSS-1000 ``<class>/<n>``, DeepGlobe ``<k>/<tile>``, the
  ISIC id in ``class_id.csv``, Chest X-ray's only class); 0 where none does.
  """
  info = cross_domain(dataset)
  cp = np.asarray(index.class_pixels)
  if cp.ndim != 2 or cp.shape[1] - 1 != info.num_classes:
    raise ValueError(
      f"{info.name} has {info.num_classes} classes but the index has {cp.shape[-1] - 1} class "
      f"columns; is it the index of another dataset?"
    )
  fg = cp[:, 1:] > 0
  multi = np.flatnonzero(fg.sum(1) > 1)
  if multi.size:
    raise ValueError(
      f"{multi.size} records of this index have pixels of several classes (first: record "
      f"{int(multi[0])}); a {info.name} record holds one class; rebuild the dataset"
    )
  classes = np.where(fg.any(1), fg.argmax(1) + 1, 0).astype(np.int64)
  ids = np.asarray(index.image_ids)
  for i in np.flatnonzero(classes == 0):
    image_id = str(ids[i])
    if info.name == "chest_xray":
      classes[i] = 1
    elif info.name == "isic2018":
      classes[i] = isic2018_image_classes().get(image_id, 0)
    elif info.name == "fss1000":
      name = image_id.rsplit("/", 1)[0]
      classes[i] = info.class_names.index(name) + 1 if name in info.class_names else 0
    else:
      folder = image_id.split("/", 1)[0]
      classes[i] = int(folder) if folder.isdigit() and 1 <= int(folder) <= info.num_classes else 0
  return classes


def cross_domain_lists(
  index, dataset: str, split: str = "test", *, min_pixels: int = 0, mode: str | None = None
) -> FoldLists:
  """Query / support lists of a cross-domain split: every class of the split, no folds, no filter.

  By default (``min_pixels=0``) every record of a class is a query candidate and a
  support of its class, as in PATNet (whose loaders list the files of a class folder,
  masks unseen; an empty mask included). ``min_pixels >= 1`` keeps only records with
  that many foreground pixels. The result feeds `fss_jax.data.episodes.EpisodeSampler`
  like a fold's lists; its ``query_positions`` and ``support_positions[c]`` are in
  record order, which is PATNet's file order.

  Args:
    index: the split's `DatasetIndex` (class_pixels [N, C + 1], one class column per record).
    dataset: a cross-domain dataset or alias.
    split: "test" (all four), or "train" / "val" (FSS-1000).
    min_pixels: foreground pixels a record needs (0: none, PATNet).
    mode: recorded in the lists ("train" -> shuffled query order in the sampler); default
      "train" for the train split, else "test".
  """
  info = cross_domain(dataset)
  classes = info.classes(split)
  owner = record_classes(index, dataset)
  if min_pixels > 0:
    cp = np.asarray(index.class_pixels)
    owner = np.where(cp[np.arange(len(owner)), owner] >= min_pixels, owner, 0)
  member = np.zeros(
    (len(owner), info.num_classes + 1), np.int64
  )  # 0 / 1 "pixel counts": membership
  member[np.arange(len(owner)), owner] = 1
  member[:, 0] = 0
  lists = build_lists(
    member,
    classes,
    filter_intersection=False,
    min_pixels=1,
    mode=mode or ("train" if split == "train" else "test"),
  )
  return dataclasses.replace(lists, min_pixels=int(min_pixels))


__all__ = [
  "DATASETS",
  "NUM_CLASSES",
  "MIN_PIXELS",
  "COCO_SPLITS",
  "PROTOCOLS",
  "FoldClasses",
  "FoldLists",
  "canonical_dataset",
  "fold_classes",
  "build_lists",
  "fold_lists",
  "CROSS_DOMAIN_DATASETS",
  "CROSS_DOMAIN_NUM_CLASSES",
  "CrossDomain",
  "cross_domain",
  "canonical_cross_domain",
  "dataset_kind",
  "cross_domain_lists",
  "record_classes",
  "fss1000_split_classes",
  "isic2018_image_classes",
  "FSS1000_SPLITS",
  "DEEPGLOBE_CLASS_NAMES",
  "ISIC2018_CLASS_NAMES",
  "CHEST_XRAY_CLASS_NAMES",
]
