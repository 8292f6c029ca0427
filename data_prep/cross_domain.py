"""Raw layouts of the cross-domain test sets -> build plans (`data_prep.raw.Plan`).

PATNet (Lei et al., "Cross-Domain Few-Shot Semantic Segmentation", ECCV 2022, github.com/slei109/PATNet)
trains on PASCAL and tests on four datasets. Each parser here finds the raw files in
the layout PATNet's loader (``data/{fss,deepglobe,isic,lung}.py``) reads, checks
them, and lists one `raw.Entry` per (image, class) pair with ``class_id`` set; the
label file is that class's mask, binarised at build time as PATNet does
(`raw.read_binary_mask`: grey >= 128 -> 1). Records follow PATNet's metadata
order: classes ascending, files sorted by name within a class.

* ``fss1000``: 1000 class folders of ``<n>.jpg`` / ``<n>.png``; splits train / val /
  test = HSNet's 520 / 240 / 240 class lists (shipped, `fss_jax.data.splits`);
  image ids ``<class>/<n>``.
* ``deepglobe``: PATNet's preprocessed 408x408 tiles, one folder per land-cover class
  holding ``test/origin/<tile>.jpg`` and the class's binary ``test/groundtruth/<tile>.png``
  (a tile with several classes is in several folders, one record each); ids
  ``<class>/<tile>``; split "test".
* ``isic2018``: ISIC 2018 task-1 training images and ``<id>_segmentation.png`` lesion
  masks; classes from PATNet's ``class_id.csv`` (shipped) for the official flat folder,
  or from class sub-folders 1/2/3 as PATNet reads them; split "test".
* ``chest_xray``: the Kaggle "Chest X-ray masks and labels" layout; every mask of
  ``masks/`` is a record (``<name>_mask.png`` as PATNet pairs it, or ``<name>.png``,
  the name of Montgomery's masks there); split "test".

Raw-data problems raise `raw.RawDataError` with the expected layout before anything is
written; the parsers never read pixels (that is `raw.process_entry`'s job).
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable, Sequence

from data_prep import raw
from fss_jax.data import splits

log = logging.getLogger(__name__)
# The raw-data error helpers the PASCAL / COCO parsers use (problem line, then the layout).
_layout_error = raw._layout_error
_listing = raw._listing
_check_unique = raw._check_unique

FSS1000_LAYOUT = """\
  <manual_dir>/                      (or <manual_dir>/FSS-1000/, <manual_dir>/fewshot_data/)
    <class>/<n>.jpg                  one folder per class (fewshot_data.zip, github.com/HKUSTCV/FSS-1000):
    <class>/<n>.png                  images 1.jpg .. 10.jpg and their masks 1.png .. 10.png (white = object)
  class folders named as in the official lists (HSNet data/splits/fss/{trn,val,test}.txt, shipped in
  fss_jax/assets/fss1000/): 520 train, 240 val, 240 test classes; masks binarised at grey >= 128"""

DEEPGLOBE_LAYOUT = """\
  <manual_dir>/                      (or <manual_dir>/Deepglobe/)
    1/ 2/ 3/ 4/ 5/ 6/                PATNet's preprocessed DeepGlobe land-cover tiles (408x408; Google Drive link
                                     in PATNet's README), one folder per class: 1 agriculture, 2 urban,
                                     3 rangeland, 4 forest, 5 water, 6 barren
      test/origin/<tile>.jpg         the tiles showing the class
      test/groundtruth/<tile>.png    the class's binary mask of the tile (white = class), same file stem
  the raw Kaggle download (train/<id>_sat.jpg, <id>_mask.png) must first be cut and split by PATNet's
  data/preprocess.py; its released tiles are not what that script gives (PATNet issues #17, #33)"""

ISIC2018_LAYOUT = """\
  <manual_dir>/                      (or <manual_dir>/ISIC/)
    ISIC2018_Task1-2_Training_Input/
      ISIC_<7 digits>.jpg            task-1 training images (2594; challenge.isic-archive.com), classed by
                                     PATNet's data/isic/class_id.csv (shipped in fss_jax/assets/isic2018/)
      or 1/ 2/ 3/ISIC_<7 digits>.jpg the same sorted into class folders, as PATNet reads them:
                                     1 nevus, 2 melanoma, 3 seborrheic_keratosis
    ISIC2018_Task1_Training_GroundTruth/
      ISIC_<7 digits>_segmentation.png   lesion masks (255 lesion, 0 skin)"""

CHEST_XRAY_LAYOUT = """\
  <manual_dir>/                      (or <manual_dir>/LungSegmentation/, <manual_dir>/Lung Segmentation/)
    CXR_png/<name>.png               chest X-rays (Kaggle nikhilpandey360/chest-xray-masks-and-labels: Shenzhen
                                     CHNCXR_<4 digits>_<0|1>.png, Montgomery MCUCXR_<4 digits>_<0|1>.png)
    masks/<name>_mask.png            lung masks (255 = lung); every mask is one record, images without a mask
    masks/<name>.png                 (and test/) are not used. Montgomery's masks carry the image name itself
                                     (PATNet's loader only pairs the _mask.png names)"""

LAYOUTS = {
  "fss1000": FSS1000_LAYOUT,
  "deepglobe": DEEPGLOBE_LAYOUT,
  "isic2018": ISIC2018_LAYOUT,
  "chest_xray": CHEST_XRAY_LAYOUT,
}


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _manual_dir(manual_dir: str | os.PathLike, what: str, layout: str) -> pathlib.Path:
  path = pathlib.Path(os.path.expanduser(os.fspath(manual_dir)))
  if not path.is_dir():
    raise _layout_error(f"{what} manual_dir {path} does not exist.", layout)
  return path


def _find_root(
  manual_dir: pathlib.Path, subdirs: Sequence[str], is_root: Callable[[pathlib.Path], bool]
) -> pathlib.Path | None:
  """``manual_dir`` or the first ``manual_dir/<subdir>`` that ``is_root`` accepts."""
  for candidate in [manual_dir] + [manual_dir / s for s in subdirs]:
    if candidate.is_dir() and is_root(candidate):
      return candidate
  return None


def _files(folder: pathlib.Path, suffix: str) -> list[pathlib.Path]:
  """Files of ``folder`` ending in ``suffix`` (case as PATNet's ``split('.')[1] == 'jpg'`` test), sorted by name."""
  return sorted(
    (p for p in folder.iterdir() if p.suffix == suffix and p.is_file()), key=lambda p: p.name
  )


def _entry(image_id: str, image: pathlib.Path, mask: pathlib.Path, class_id: int) -> raw.Entry:
  return raw.Entry(
    image_id=image_id, image=os.fspath(image), label=os.fspath(mask), class_id=class_id
  )


def _check_pairs(entries: Sequence[raw.Entry], where: pathlib.Path, what: str, layout: str) -> None:
  """RawDataError naming every entry whose image or mask file is missing."""
  missing = [p for e in entries for p in (e.image, e.label) if not os.path.isfile(p)]
  if missing:
    raise _layout_error(f"{where}: {what}. " + _listing(missing, "missing files"), layout)


def _plan(
  dataset: str,
  root: pathlib.Path,
  split_entries: dict[str, list[raw.Entry]],
  sources: dict[str, str],
) -> raw.Plan:
  for split, entries in split_entries.items():
    _check_unique(entries, f"{root} ({split})")
  return raw.Plan(dataset, os.fspath(root), split_entries, sources)


# ---------------------------------------------------------------------------------------------
# FSS-1000
# ---------------------------------------------------------------------------------------------


def plan_fss1000(manual_dir: str | os.PathLike) -> raw.Plan:
  """FSS-1000 class folders -> train / val / test entries (the official class lists).

  Classes of each split in sorted order (class id = position in sorted(train) +
  sorted(val) + sorted(test), + 1), images sorted by file name in each folder, as
  PATNet / HSNet list them (data/fss.py:24, 107-114). A class folder missing from the
  download is logged and left out; a split without any of its classes is an error.

  Raises:
    raw.RawDataError: no class folder found, a split without classes, or images
      without their ``.png`` mask (all named).
  """
  manual_dir = _manual_dir(manual_dir, "FSS-1000", FSS1000_LAYOUT)
  info = splits.cross_domain("fss1000")
  known = set(info.class_names)
  root = _find_root(
    manual_dir,
    ("FSS-1000", "fewshot_data", "fewshot_data/fewshot_data"),
    lambda d: any(c.is_dir() and c.name in known for c in d.iterdir()),
  )
  if root is None:
    folders = sorted(c.name for c in manual_dir.iterdir() if c.is_dir())
    seen = (
      f" (it has {', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''})" if folders else ""
    )
    raise _layout_error(
      f"no FSS-1000 class folder in {manual_dir} (nor in FSS-1000/, fewshot_data/){seen}.",
      FSS1000_LAYOUT,
    )
  split_entries, sources = {}, {}
  for split in splits.FSS1000_SPLITS:
    classes = info.classes(split)
    entries, absent = [], []
    for cid in classes:
      name = info.class_names[cid - 1]
      folder = root / name
      if not folder.is_dir():
        absent.append(name)
        continue
      entries += [
        _entry(f"{name}/{jpg.stem}", jpg, jpg.with_suffix(".png"), cid)
        for jpg in _files(folder, ".jpg")
      ]
    if len(absent) == len(classes):
      raise _layout_error(
        f"{root} has none of the {len(classes)} FSS-1000 {split} class folders (e.g. {absent[0]}/).",
        FSS1000_LAYOUT,
      )
    if absent:
      log.warning(
        "FSS-1000 %s: %d of %d class folders are missing in %s and left out: %s",
        split,
        len(absent),
        len(classes),
        root,
        ", ".join(absent[:10]) + (", ..." if len(absent) > 10 else ""),
      )
    _check_pairs(entries, root, f"{split} images without their .png mask", FSS1000_LAYOUT)
    split_entries[split] = entries
    sources[split] = (
      f"{len(classes) - len(absent)} of {len(classes)} {split} classes (HSNet's "
      f"{splits.FSS1000_SPLITS[split]}) in {root}; masks binarised at grey >= "
      f"{raw.BINARY_MASK_THRESHOLD}"
    )
  unknown = sorted(
    c.name
    for c in root.iterdir()
    if c.is_dir() and c.name not in known and not c.name.startswith((".", "__"))
  )
  if unknown:
    log.warning(
      "%s: %d folders are not FSS-1000 classes and are ignored: %s",
      root,
      len(unknown),
      ", ".join(unknown[:10]),
    )
  return _plan("fss1000", root, split_entries, sources)


# ---------------------------------------------------------------------------------------------
# DeepGlobe (PATNet's preprocessed tiles)
# ---------------------------------------------------------------------------------------------


def plan_deepglobe(manual_dir: str | os.PathLike) -> raw.Plan:
  """PATNet's DeepGlobe class folders -> "test" entries, one per (class, tile).

  Raises:
    raw.RawDataError: class folders without ``test/origin`` / ``test/groundtruth``
      (the raw Kaggle layout is recognised and explained), a class without tiles,
      tiles without their mask (all named).
  """
  manual_dir = _manual_dir(manual_dir, "DeepGlobe", DEEPGLOBE_LAYOUT)
  names = splits.DEEPGLOBE_CLASS_NAMES
  root = _find_root(
    manual_dir, ("Deepglobe", "DeepGlobe", "deepglobe"), lambda d: (d / "1" / "test").is_dir()
  )
  if root is None:
    kaggle = [
      d for d in (manual_dir, manual_dir / "train") if d.is_dir() and any(d.glob("*_sat.jpg"))
    ]
    hint = (
      f" {kaggle[0]} holds the raw Kaggle tiles (*_sat.jpg, *_mask.png): PATNet evaluates on its own "
      f"preprocessed class folders, linked from its README."
      if kaggle
      else ""
    )
    raise _layout_error(
      f"no DeepGlobe class folder 1/test/ in {manual_dir} (nor in Deepglobe/).{hint}",
      DEEPGLOBE_LAYOUT,
    )
  lacking = [
    f"{k}/test/{sub}"
    for k in range(1, len(names) + 1)
    for sub in ("origin", "groundtruth")
    if not (root / str(k) / "test" / sub).is_dir()
  ]
  if lacking:
    raise _layout_error(f"{root} lacks {', '.join(lacking)}.", DEEPGLOBE_LAYOUT)
  entries = []
  for k in range(1, len(names) + 1):
    test = root / str(k) / "test"
    tiles = _files(test / "origin", ".jpg")
    if not tiles:
      raise _layout_error(
        f"{test / 'origin'} (class {k}, {names[k - 1]}) holds no .jpg tile.", DEEPGLOBE_LAYOUT
      )
    entries += [
      _entry(f"{k}/{t.stem}", t, test / "groundtruth" / f"{t.stem}.png", k) for t in tiles
    ]
  _check_pairs(entries, root, "tiles without their groundtruth mask", DEEPGLOBE_LAYOUT)
  source = (
    f"PATNet's class folders 1..6 in {root} ({', '.join(names)}); masks binarised at grey >= "
    f"{raw.BINARY_MASK_THRESHOLD}"
  )
  return _plan("deepglobe", root, {"test": entries}, {"test": source})


# ---------------------------------------------------------------------------------------------
# ISIC 2018 task 1
# ---------------------------------------------------------------------------------------------

ISIC_INPUT = "ISIC2018_Task1-2_Training_Input"
ISIC_GROUND_TRUTH = "ISIC2018_Task1_Training_GroundTruth"


def plan_isic2018(manual_dir: str | os.PathLike) -> raw.Plan:
  """ISIC 2018 task-1 training images + lesion masks -> "test" entries by class.

  With class sub-folders ``1/ 2/ 3/`` under the input folder (PATNet's reading) they
  give the classes (an image whose folder disagrees with ``class_id.csv`` is logged);
  otherwise the flat official folder is classed by the shipped ``class_id.csv``.

  Raises:
    raw.RawDataError: missing folders, images unknown to ``class_id.csv`` (flat
      layout), images without their mask (all named).
  """
  manual_dir = _manual_dir(manual_dir, "ISIC 2018", ISIC2018_LAYOUT)
  root = _find_root(manual_dir, ("ISIC",), lambda d: (d / ISIC_INPUT).is_dir())
  if root is None:
    raise _layout_error(f"no {ISIC_INPUT}/ folder in {manual_dir} (nor in ISIC/).", ISIC2018_LAYOUT)
  if not (root / ISIC_GROUND_TRUTH).is_dir():
    raise _layout_error(
      f"{root} lacks {ISIC_GROUND_TRUTH}/ (the task-1 lesion masks).", ISIC2018_LAYOUT
    )
  inp, gt = root / ISIC_INPUT, root / ISIC_GROUND_TRUTH
  names = splits.ISIC2018_CLASS_NAMES
  csv_class = splits.isic2018_image_classes()
  folders = [inp / str(k) for k in range(1, len(names) + 1)]
  by_class: dict[int, list[pathlib.Path]] = {}
  if any(f.is_dir() for f in folders):
    absent = [f.name for f in folders if not f.is_dir()]
    if absent:
      raise _layout_error(
        f"{inp} has class folders but lacks {', '.join(a + '/' for a in absent)}.", ISIC2018_LAYOUT
      )
    for k, f in enumerate(folders, 1):
      by_class[k] = _files(f, ".jpg")
    disagree = [
      p.stem for k, images in by_class.items() for p in images if csv_class.get(p.stem, k) != k
    ]
    if disagree:
      log.warning(
        "%d images of %s sit in another class folder than PATNet's class_id.csv says (e.g. %s); "
        "the folders are used (classes: %s)",
        len(disagree),
        inp,
        disagree[0],
        ", ".join(f"{k} {n}" for k, n in enumerate(names, 1)),
      )
    source = f"class folders {inp}/{{1,2,3}}"
  else:
    images = _files(inp, ".jpg")
    unknown = [p.name for p in images if p.stem not in csv_class]
    if unknown:
      raise raw.RawDataError(
        f"{inp}: "
        + _listing(
          unknown, "images are not ISIC 2018 task-1 training images of PATNet's class_id.csv"
        )
        + "\nSort the images into class folders 1/ 2/ 3/ (nevus, melanoma, seborrheic_keratosis) to give "
        "their classes, or remove them."
      )
    for k in range(1, len(names) + 1):
      by_class[k] = [p for p in images if csv_class[p.stem] == k]
    source = f"{inp} classed by PATNet's class_id.csv"
  entries = [
    _entry(p.stem, p, gt / f"{p.stem}_segmentation.png", k)
    for k, ims in by_class.items()
    for p in ims
  ]
  if not entries:
    raise _layout_error(f"{inp} holds no ISIC_<id>.jpg image.", ISIC2018_LAYOUT)
  _check_pairs(
    entries,
    root,
    f"images without their {ISIC_GROUND_TRUTH}/<id>_segmentation.png mask",
    ISIC2018_LAYOUT,
  )
  counts = ", ".join(f"{len(by_class[k])} {n}" for k, n in enumerate(names, 1))
  source += f" ({counts}); masks binarised at grey >= {raw.BINARY_MASK_THRESHOLD}"
  return _plan("isic2018", root, {"test": entries}, {"test": source})


# ---------------------------------------------------------------------------------------------
# Chest X-ray (lung masks)
# ---------------------------------------------------------------------------------------------


def chest_xray_image_name(mask_name: str) -> str:
  """The CXR_png file of a mask: ``X_mask.png`` -> ``X.png`` (PATNet's lung.py:64), else the same name."""
  stem = pathlib.Path(mask_name).stem
  return (stem[: -len("_mask")] if stem.endswith("_mask") else stem) + ".png"


def plan_chest_xray(manual_dir: str | os.PathLike) -> raw.Plan:
  """``masks/*.png`` with their ``CXR_png`` image -> "test" entries (class 1, lung), sorted by mask name.

  Raises:
    raw.RawDataError: missing folders, no mask, masks without their image (all named),
      two masks of one image.
  """
  manual_dir = _manual_dir(manual_dir, "Chest X-ray", CHEST_XRAY_LAYOUT)
  root = _find_root(
    manual_dir, ("LungSegmentation", "Lung Segmentation"), lambda d: (d / "CXR_png").is_dir()
  )
  if root is None:
    raise _layout_error(
      f"no CXR_png/ folder in {manual_dir} (nor in LungSegmentation/, Lung Segmentation/).",
      CHEST_XRAY_LAYOUT,
    )
  if not (root / "masks").is_dir():
    raise _layout_error(f"{root} lacks masks/ (the lung masks).", CHEST_XRAY_LAYOUT)
  masks = _files(root / "masks", ".png")
  if not masks:
    raise _layout_error(f"{root / 'masks'} holds no .png mask.", CHEST_XRAY_LAYOUT)
  entries, first = [], {}
  for m in masks:
    image = root / "CXR_png" / chest_xray_image_name(m.name)
    if image.name in first:
      raise raw.RawDataError(
        f"{root / 'masks'}: {first[image.name]} and {m.name} are both masks of "
        f"CXR_png/{image.name}; keep one."
      )
    first[image.name] = m.name
    entries.append(_entry(image.stem, image, m, 1))
  _check_pairs(entries, root, "masks without their CXR_png image", CHEST_XRAY_LAYOUT)
  suffixed = sum(m.stem.endswith("_mask") for m in masks)
  source = (
    f"{len(masks)} masks in {root / 'masks'} ({suffixed} named <image>_mask.png, {len(masks) - suffixed} "
    f"named as their image); masks binarised at grey >= {raw.BINARY_MASK_THRESHOLD}"
  )
  return _plan("chest_xray", root, {"test": entries}, {"test": source})


PLANNERS = {
  "fss1000": plan_fss1000,
  "deepglobe": plan_deepglobe,
  "isic2018": plan_isic2018,
  "chest_xray": plan_chest_xray,
}

__all__ = [
  "PLANNERS",
  "LAYOUTS",
  "FSS1000_LAYOUT",
  "DEEPGLOBE_LAYOUT",
  "ISIC2018_LAYOUT",
  "CHEST_XRAY_LAYOUT",
  "plan_fss1000",
  "plan_deepglobe",
  "plan_isic2018",
  "plan_chest_xray",
  "chest_xray_image_name",
  "ISIC_INPUT",
  "ISIC_GROUND_TRUTH",
]
