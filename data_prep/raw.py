"""Raw PASCAL VOC / COCO 2014 inputs: layout discovery, list parsing, checks and record generation.

Everything the TFDS builders (`data_prep.pascal5i`, `data_prep.coco20i` and the
cross-domain ones, whose layouts `data_prep.cross_domain` parses) share lives
here, free of TFDS so it can run in worker processes:

* `plan_pascal(manual_dir)` / `plan_coco(manual_dir)` find the raw files, parse
  the image lists and check that every listed file exists (one error naming all
  missing files). They return a `Plan`: per split, the `Entry` list in record
  order.
* `process_entry(entry, num_classes)` reads one image and its label (a label
  PNG, or COCO instance annotations rendered with pycocotools) and returns the
  record dict or the reason the image is skipped (`Skip`, a corrupt
  file). Systematic problems (a colour label, label values outside 0..C and
  255) raise `RawDataError` naming the file. An entry with ``class_id`` (the
  cross-domain sets) holds a mask of that one class instead, binarised as PATNet
  reads masks (`read_binary_mask`).
* Every file is decoded fully and checked (`read_image`, `read_label_png`):
  a JPEG is corrupt when it does not decode, is truncated, or libjpeg warns
  about corrupt data while decoding it (damaged entropy-coded data decodes
  "successfully" into grey or shifted blocks, and a warning on stderr is the
  only sign any decoder gives); a PNG when its chunk CRCs or end marker are
  wrong (PIL's ``load()`` alone returns wrong pixels for a flipped IDAT byte).
  JPEG has no checksum: damage that keeps the Huffman stream in step (a
  changed coefficient) cannot be detected by any decoder.
* `generate(entries, num_classes, ...)` runs `process_entry` over a split, in
  list order (optionally in worker processes), with a progress bar, yielding
  ``(key, record)`` pairs for TFDS and collecting the skipped files.

Record fields (what `fss_jax.data.source` reads): ``image`` the original JPEG
bytes; ``label`` an 8-bit single-channel PNG of the raw class indices (0
background, 1..C, 255 ignore); ``image_id`` the file stem; ``height``,
``width``; ``class_pixels`` int64 [C + 1] = #(label == c) for c in 0..C and
``ignore_pixels`` = #(label == 255), both at the original resolution.
Cross-domain records (`LABEL_ENCODING` "binary") hold the binary mask of their
one class instead (0 background, 1 foreground, no 255); their ``class_pixels``
counts the background in column 0 and the foreground in the record's class column.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from fss_jax.data import splits as class_splits
from fss_jax.data.source import NUM_CLASSES as _FOLD_DATASET_CLASSES

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Classes C of every dataset the builders know: PASCAL-5i / COCO-20i and the cross-domain sets.
NUM_CLASSES = {**_FOLD_DATASET_CLASSES, **class_splits.CROSS_DOMAIN_NUM_CLASSES}
# The TFDS splits of each dataset (record files and fss_index_<split>.npz each).
DATASET_SPLITS = {
  "pascal5i": SPLITS,
  "coco20i": SPLITS,
  "fss1000": tuple(class_splits.FSS1000_SPLITS),
  "deepglobe": ("test",),
  "isic2018": ("test",),
  "chest_xray": ("test",),
}
# What a record's label holds: "class_index" (0 background, 1..C, 255 ignore) or "binary" (the
# mask of the record's one class: 0 background, 1 foreground).
LABEL_ENCODING = {
  d: "binary" if d in class_splits.CROSS_DOMAIN_DATASETS else "class_index" for d in NUM_CLASSES
}
# Mask binarisation of the cross-domain sets, as PATNet's (and HSNet's) read_mask: PIL
# convert("L"), then grey < 128 -> 0, >= 128 -> 1 (PATNet data/fss.py:75-79, same in deepglobe.py,
# isic.py, lung.py).
BINARY_MASK_THRESHOLD = 128
IGNORE = 255
# How many missing files an error message lists before summarising the rest.
MAX_LISTED = 20
# Same flags as fss_jax.data.source (the reader): 3 channels, EXIF orientation ignored.
IMAGE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
# The libjpeg(-turbo) warnings (jerror.h JWRN_*) that mean damaged data; the decoder goes on and
# returns an image, so these lines on stderr are the only sign of the damage.
JPEG_CORRUPT_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------------------------
# COCO rendering choices (data_protocol.md §3.2: not verifiable against the reference archives;
# they change the pixel counts and hence the §5.1 lists slightly).
# ---------------------------------------------------------------------------------------------
# Crowd annotations (iscrowd=1, RLE over a group of objects) are painted with their category,
# as a plain `for ann in anns: label[annToMask(ann) > 0] = k` loop over all annotations does.
COCO_DRAW_CROWD = True
# Painting order: annotations in the order of the json file (ascending position in
# "annotations"); a later instance overwrites an earlier one where they overlap.
COCO_PAINT_ORDER = "json"

VOC_LAYOUT = """\
  <manual_dir>/                      (or <manual_dir>/VOC2012/, <manual_dir>/VOCdevkit/VOC2012/)
    JPEGImages/<id>.jpg              VOC2012 images (VOCtrainval_11-May-2012.tar; holds all SBD images)
    SegmentationClassAug/<id>.png    single-channel index PNGs: 0 background, 1..20 classes, 255 ignore
                                     (SegmentationClassAug.zip, linked from the PFENet README)
    train.txt                        PFENet lists/pascal/voc_sbd_merge_noduplicate.txt (5953 lines;
                                     also found under that name)
    val.txt                          PFENet lists/pascal/val.txt (1449 lines)
  list lines: JPEGImages/<id>.jpg SegmentationClassAug/<id>.png"""

COCO_LAYOUT = """\
  <manual_dir>/
    train2014/COCO_train2014_<12 digits>.jpg   COCO 2014 train images (train2014.zip, cocodataset.org)
    val2014/COCO_val2014_<12 digits>.jpg       COCO 2014 val images (val2014.zip)
    annotations/                               per split, either
      train2014/<stem>.png, val2014/<stem>.png   label PNGs: value k = k-th category by ascending COCO id,
                                                 0 background, 255 ignore (the PFENet/HSNet mask archives)
      instances_train2014.json,                  or the instance annotations (annotations_trainval2014.zip),
      instances_val2014.json                     rendered with pycocotools
    train.txt, val.txt                         optional (PFENet lists/coco/{train,val}.txt): fix the image
                                               order; lines train2014/<stem>.jpg annotations/train2014/<stem>.png
  without a list: the images with at least one annotation (json) / with a label PNG, sorted by file name"""


class RawDataError(ValueError):
  """The raw data is missing, malformed or inconsistent; the message says what and how to fix it."""


def _layout_error(problem: str, layout: str) -> RawDataError:
  return RawDataError(f"{problem}\nExpected layout:\n{layout}")


def _listing(paths: Sequence[Any], what: str) -> str:
  shown = "\n".join(f"  {p}" for p in paths[:MAX_LISTED])
  more = f"\n  ... and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
  return f"{len(paths)} {what}:\n{shown}{more}"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One listed image.

  Attributes:
    image_id: file stem, unique within the dataset (record ``image_id``; cross-domain sets
      whose stems repeat across class folders use ``<class folder>/<stem>``).
    image: path of the JPEG (or PNG).
    label: path of the label PNG, or None when rendered from ``anns``.
    anns: COCO annotations of the image (json order), when rendered.
    size: (height, width) from the COCO json, checked against the JPEG.
    class_id: set for the cross-domain sets: ``label`` is a mask of this one class
      (1..C), binarised by `read_binary_mask`.
  """

  image_id: str
  image: str
  label: str | None = None
  anns: tuple[dict[str, Any], ...] | None = None
  size: tuple[int, int] | None = None
  class_id: int | None = None


@dataclasses.dataclass
class Plan:
  """What a build will write: per split, the entries in record order, plus how they were found."""

  dataset: str
  root: str
  splits: dict[str, list[Entry]]
  sources: dict[str, str]  # split -> description of lists / labels used

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES[self.dataset]


# ---------------------------------------------------------------------------------------------
# List parsing
# ---------------------------------------------------------------------------------------------


def _resolve(token: str, root: pathlib.Path, anchors: Sequence[str]) -> pathlib.Path:
  """A list path: relative to root; else re-rooted at its first anchor dir (e.g. BAM's ../data/... lists)."""
  p = pathlib.Path(token)
  if p.is_absolute():
    return p
  direct = root / p
  if direct.exists():
    return direct
  for i, part in enumerate(p.parts):
    if part in anchors:
      candidate = root.joinpath(*p.parts[i:])
      if candidate.exists():
        return candidate
      break
  return direct


def read_list(path: pathlib.Path) -> list[list[str]]:
  """Non-empty, non-comment lines of a list file, split on whitespace."""
  try:
    text = path.read_text()
  except UnicodeDecodeError as e:
    raise RawDataError(f"list file {path} is not a text file ({e})") from None
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    parts = line.split()
    if len(parts) > 2:
      raise RawDataError(f"{path}:{n}: expected 'image_path label_path', got {line!r}")
    rows.append(parts)
  return rows


def _check_unique(entries: Sequence[Entry], list_path: Any) -> None:
  seen, dups = set(), []
  for e in entries:
    if e.image_id in seen:
      dups.append(e.image_id)
    seen.add(e.image_id)
  if dups:
    raise RawDataError(
      f"{list_path}: "
      + _listing(sorted(set(dups)), "image ids listed more than once")
      + "\nRemove the repeated lines (keep the first occurrence)."
    )


def _check_exist(entries: Sequence[Entry], list_path: Any, layout: str) -> None:
  missing = []
  for e in entries:
    for p in (e.image, e.label):
      if p is not None and not os.path.isfile(p):
        missing.append(p)
  if missing:
    raise _layout_error(
      f"{list_path} points at files that do not exist. " + _listing(missing, "missing files"),
      layout,
    )


# ---------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------

VOC_ANCHORS = ("JPEGImages", "SegmentationClassAug")
# List file names per split, first found wins (PFENet's own name accepted for the training pool).
VOC_LISTS = {"train": ("train.txt", "voc_sbd_merge_noduplicate.txt"), "val": ("val.txt",)}


def _voc_list(root: pathlib.Path, split: str) -> pathlib.Path | None:
  for name in VOC_LISTS[split]:
    if (root / name).is_file():
      return root / name
  return None


def find_voc_root(manual_dir: str | os.PathLike) -> pathlib.Path:
  """The folder holding JPEGImages/, SegmentationClassAug/, train.txt, val.txt."""
  manual_dir = pathlib.Path(os.path.expanduser(os.fspath(manual_dir)))
  if not manual_dir.is_dir():
    raise _layout_error(f"PASCAL manual_dir {manual_dir} does not exist.", VOC_LAYOUT)
  candidates = [manual_dir, manual_dir / "VOC2012", manual_dir / "VOCdevkit" / "VOC2012"]
  for c in candidates:
    if (c / "JPEGImages").is_dir():
      root = c
      break
  else:
    raise _layout_error(
      f"no JPEGImages/ folder in {manual_dir} (nor in VOC2012/, VOCdevkit/VOC2012/).", VOC_LAYOUT
    )
  missing = ["SegmentationClassAug"] if not (root / "SegmentationClassAug").is_dir() else []
  missing += [VOC_LISTS[s][0] for s in SPLITS if _voc_list(root, s) is None]
  if missing:
    hint = ""
    if "SegmentationClassAug" in missing and (root / "SegmentationClass").is_dir():
      hint = (
        "\nSegmentationClass/ (VOC colour-palette masks of 2913 images) is not enough: PASCAL-5i "
        "needs the SBD-augmented index masks SegmentationClassAug/."
      )
    raise _layout_error(f"{root} lacks {', '.join(missing)}.{hint}", VOC_LAYOUT)
  return root


def plan_pascal(manual_dir: str | os.PathLike) -> Plan:
  """Finds the VOC layout under ``manual_dir`` and lists train/val entries in list order.

  Raises:
    RawDataError: missing folders/lists (the message shows the expected layout),
      malformed or duplicated list lines, listed files that do not exist (all
      named, up to `MAX_LISTED`).
  """
  root = find_voc_root(manual_dir)
  splits, sources = {}, {}
  for split in SPLITS:
    list_path = _voc_list(root, split)
    entries = []
    for parts in read_list(list_path):
      if len(parts) == 1:  # a bare id
        image = root / "JPEGImages" / f"{parts[0]}.jpg"
        label = root / "SegmentationClassAug" / f"{parts[0]}.png"
      else:
        image, label = (_resolve(t, root, VOC_ANCHORS) for t in parts)
      entries.append(Entry(image_id=image.stem, image=os.fspath(image), label=os.fspath(label)))
    if not entries:
      raise _layout_error(f"{list_path} lists no images.", VOC_LAYOUT)
    _check_unique(entries, list_path)
    _check_exist(entries, list_path, VOC_LAYOUT)
    splits[split] = entries
    sources[split] = f"list {list_path}; labels SegmentationClassAug PNGs"
  return Plan("pascal5i", os.fspath(root), splits, sources)


# ---------------------------------------------------------------------------------------------
# COCO 2014
# ---------------------------------------------------------------------------------------------

COCO_ANCHORS = ("train2014", "val2014", "annotations")


def coco_category_map(categories: Sequence[dict[str, Any]], json_path: Any) -> dict[int, int]:
  """COCO category id -> contiguous class 1..80 by ascending id (data_protocol.md §3.3)."""
  ids = sorted(int(c["id"]) for c in categories)
  if len(ids) != NUM_CLASSES["coco20i"] or len(set(ids)) != len(ids):
    raise RawDataError(
      f"{json_path} has {len(set(ids))} distinct categories; COCO-20i needs the 80 COCO "
      f"instance categories (instances_*2014.json)."
    )
  return {cid: k for k, cid in enumerate(ids, 1)}


def load_coco_json(json_path: pathlib.Path):
  """A COCO instances json -> ({file name: image record}, {image id: [annotation]}).

  Annotations keep the json order (the painting order) as
  ``{"segmentation", "iscrowd", "class"}`` with ``class`` the contiguous 1..80 id.
  """
  try:
    with open(json_path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise RawDataError(f"cannot read COCO annotations {json_path}: {e}") from None
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise RawDataError(f"{json_path} has no {key!r} field; expected a COCO instances json.")
  cat_map = coco_category_map(data["categories"], json_path)
  images = {}
  for im in data["images"]:
    images[pathlib.Path(im["file_name"]).name] = im
  by_image: dict[int, list[dict[str, Any]]] = {}
  unknown = set()
  for ann in data["annotations"]:  # json order = painting order (COCO_PAINT_ORDER)
    if ann["category_id"] not in cat_map:
      unknown.add(ann["category_id"])
      continue
    by_image.setdefault(ann["image_id"], []).append(
      {
        "segmentation": ann["segmentation"],
        "iscrowd": int(ann.get("iscrowd", 0)),
        "class": cat_map[ann["category_id"]],
      }
    )
  if unknown:
    raise RawDataError(
      f"{json_path}: annotations use category ids {sorted(unknown)} that are not in 'categories'."
    )
  return images, by_image


def plan_coco(manual_dir: str | os.PathLike) -> Plan:
  """Finds the COCO 2014 layout under ``manual_dir`` and lists train/val entries in record order.

  Per split, labels come from ``annotations/<split>2014/*.png`` when that folder
  exists, else from ``annotations/instances_<split>2014.json``. The order is the
  optional ``<split>.txt`` list, else sorted file names (images with at least one
  annotation for json labels; images with a label PNG otherwise).

  Raises:
    RawDataError: missing folders/annotations (with the expected layout), listed
      files that do not exist or are not in the json (all named, up to `MAX_LISTED`).
  """
  root = pathlib.Path(os.path.expanduser(os.fspath(manual_dir)))
  if not root.is_dir():
    raise _layout_error(f"COCO manual_dir {root} does not exist.", COCO_LAYOUT)
  splits, sources = {}, {}
  for split in SPLITS:
    sub = f"{split}2014"
    image_dir, png_dir = root / sub, root / "annotations" / sub
    json_path = root / "annotations" / f"instances_{sub}.json"
    if not image_dir.is_dir():
      raise _layout_error(f"{root} has no {sub}/ image folder.", COCO_LAYOUT)
    use_png = png_dir.is_dir()
    if not use_png and not json_path.is_file():
      raise _layout_error(
        f"{root} has neither annotations/{sub}/ (label PNGs) nor annotations/instances_{sub}.json.",
        COCO_LAYOUT,
      )
    list_path = root / f"{split}.txt"
    rows = read_list(list_path) if list_path.is_file() else None
    if use_png:
      if rows is None:
        stems = sorted(p.stem for p in png_dir.glob("*.png"))
        rows = [[f"{sub}/{s}.jpg", f"annotations/{sub}/{s}.png"] for s in stems]
      entries = []
      for parts in rows:
        image = _resolve(parts[0], root, COCO_ANCHORS)
        label = (
          _resolve(parts[1], root, COCO_ANCHORS)
          if len(parts) == 2
          else png_dir / f"{image.stem}.png"
        )
        entries.append(Entry(image_id=image.stem, image=os.fspath(image), label=os.fspath(label)))
      source = f"labels: PNGs in {png_dir}"
    else:
      images, by_image = load_coco_json(json_path)
      if rows is None:
        names = sorted(n for n, im in images.items() if by_image.get(im["id"]))
      else:
        names = [pathlib.Path(parts[0]).name for parts in rows]
        absent = [n for n in names if n not in images]
        if absent:
          raise RawDataError(
            f"{list_path} lists images that {json_path} does not describe. "
            + _listing(absent, "unknown images")
          )
      entries = []
      for n in names:
        im = images[n]
        entries.append(
          Entry(
            image_id=pathlib.Path(n).stem,
            image=os.fspath(image_dir / n),
            label=None,
            anns=tuple(by_image.get(im["id"], ())),
            size=(int(im["height"]), int(im["width"])),
          )
        )
      source = (
        f"labels: {json_path} rendered with pycocotools (crowd drawn: {COCO_DRAW_CROWD}, "
        f"paint order: {COCO_PAINT_ORDER}, later overwrites)"
      )
    where = list_path if list_path.is_file() else f"{root}/{sub} (no {split}.txt)"
    if not entries:
      raise _layout_error(f"{where}: no images to build.", COCO_LAYOUT)
    _check_unique(entries, where)
    _check_exist(entries, where, COCO_LAYOUT)
    splits[split] = entries
    sources[split] = (
      (f"list {list_path}" if list_path.is_file() else "sorted file names") + "; " + source
    )
  return Plan("coco20i", os.fspath(root), splits, sources)


def plan(dataset: str, manual_dir: str | os.PathLike) -> Plan:
  """`plan_pascal`, `plan_coco` or the cross-domain parser (`data_prep.cross_domain`) by dataset name."""
  if dataset in class_splits.CROSS_DOMAIN_DATASETS:
    from data_prep import cross_domain

    return cross_domain.PLANNERS[dataset](manual_dir)
  if dataset == "pascal5i":
    return plan_pascal(manual_dir)
  if dataset == "coco20i":
    return plan_coco(manual_dir)
  raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(NUM_CLASSES)}")


# ---------------------------------------------------------------------------------------------
# Reading one image
# ---------------------------------------------------------------------------------------------


class CorruptFile(Exception):
  """A file that cannot be decoded: the image is skipped and reported, never silently."""


@functools.cache
def _stderr_sink():
  """A scratch file of this process that receives file descriptor 2 during `imdecode_with_warnings`."""
  return tempfile.TemporaryFile()


def imdecode_with_warnings(data: bytes, flags: int) -> tuple[np.ndarray | None, list[str]]:
  """``cv2.imdecode`` plus the warnings its C decoder printed to stderr meanwhile (libjpeg's).

  File descriptor 2 points at a scratch file for the call (so this is for one
  thread at a time: the build decodes one image at a time per process); lines
  that are not `JPEG_CORRUPT_WARNINGS` are written back to stderr.
  """
  sink = _stderr_sink().fileno()
  os.ftruncate(sink, 0)
  os.lseek(sink, 0, os.SEEK_SET)
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(sink, 2)
  try:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  finally:
    os.dup2(saved, 2)
    os.close(saved)
  size = os.lseek(sink, 0, os.SEEK_CUR)
  lines = os.pread(sink, size, 0).decode("utf-8", "replace").splitlines() if size else []
  warnings = [line for line in lines if line.startswith(JPEG_CORRUPT_WARNINGS)]
  others = [line for line in lines if not line.startswith(JPEG_CORRUPT_WARNINGS)]
  if others:
    print("\n".join(others), file=sys.stderr)
  return img, warnings


def _verify_png(data: bytes, what: str) -> None:
  """CorruptFile unless every chunk CRC of the PNG ``data`` (an image or label) matches and it ends with IEND."""
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as im:
      im.verify()
  except Exception as e:
    raise CorruptFile(f"damaged {what} PNG ({e})") from None


def read_image(path: str) -> tuple[bytes, int, int]:
  """Reads an image file -> (original bytes, height, width); CorruptFile if it does not decode fully.

  Corrupt: undecodable, truncated, libjpeg warned about corrupt data
  (`JPEG_CORRUPT_WARNINGS`), or a PNG with a bad chunk CRC.
  """
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise CorruptFile(f"cannot read image: {e}") from None
  if not data:
    raise CorruptFile("empty image file")
  img, warnings = imdecode_with_warnings(data, IMAGE_FLAGS)
  if img is None:
    raise CorruptFile("OpenCV cannot decode the image")
  if warnings:
    raise CorruptFile(
      f"JPEG does not decode cleanly, its data is damaged (libjpeg: "
      f"{'; '.join(dict.fromkeys(warnings))})"
    )
  if data.startswith(PNG_SIGNATURE):
    _verify_png(data, "image")
  # libjpeg decodes a truncated JPEG with a warning (grey rest); make sure the stream is whole.
  if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
    from PIL import Image

    try:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
    except Exception as e:
      raise CorruptFile(f"truncated or damaged JPEG ({e})") from None
  return data, int(img.shape[0]), int(img.shape[1])


def read_label_png(path: str) -> np.ndarray:
  """A label PNG -> uint8 [H, W] raw class indices (data_protocol.md §2.1 pitfall).

  Grayscale (``L``) PNGs give their values, palette (``P``) PNGs their raw
  palette indices (not luminance), RGB PNGs with three equal channels their
  value. A colour (RGB) label raises `RawDataError`; an undecodable file raises
  `CorruptFile`, and so does a damaged PNG (bad chunk CRC or no end marker:
  PIL's ``load()`` alone returns wrong pixels for a flipped IDAT byte).
  """
  from PIL import Image

  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise CorruptFile(f"cannot read label: {e}") from None
  if data.startswith(PNG_SIGNATURE):
    _verify_png(data, "label")
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      mode = im.mode
      arr = np.asarray(im)
  except Exception as e:
    raise CorruptFile(f"cannot decode label: {e}") from None
  if mode in ("RGB", "RGBA"):
    if arr.shape[2] == 4 and (arr[..., 3] != 255).any():
      raise RawDataError(
        f"{path}: label PNG has an alpha channel; expected a single-channel index PNG."
      )
    if not ((arr[..., 0] == arr[..., 1]) & (arr[..., 1] == arr[..., 2])).all():
      raise RawDataError(
        f"{path}: label is an RGB colour image (like VOC's SegmentationClass colour masks); the builder needs "
        f"single-channel index PNGs whose value is the class id. For PASCAL use SegmentationClassAug "
        f"(linked from the PFENet README); for COCO render the instance json (see the layout)."
      )
    arr = arr[..., 0]
  elif mode == "LA":
    arr = arr[..., 0]
  elif mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
    raise RawDataError(
      f"{path}: label PNG has unsupported mode {mode!r}; expected 8-bit single-channel."
    )
  if arr.ndim != 2:
    raise RawDataError(
      f"{path}: label has shape {arr.shape}; expected a single-channel [H, W] image."
    )
  if arr.dtype != np.uint8:
    if arr.dtype == bool:
      arr = arr.astype(np.uint8)
    else:
      big = np.unique(arr[(arr < 0) | (arr > 255)])
      if big.size:
        raise RawDataError(f"{path}: label values {big[:10].tolist()} are outside 0..255.")
      arr = arr.astype(np.uint8)
  return arr


def read_binary_mask(path: str) -> np.ndarray:
  """A mask image -> uint8 [H, W] of 0 / 1, binarised as PATNet reads masks.

  PIL ``convert("L")`` (ITU-R 601-2 luma of RGB, a palette's colours for "P", alpha
  dropped), then grey >= `BINARY_MASK_THRESHOLD` (128) -> 1, else 0. A damaged PNG (bad
  chunk CRC, no end marker) or an undecodable file raises `CorruptFile`.
  """
  from PIL import Image

  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise CorruptFile(f"cannot read mask: {e}") from None
  if data.startswith(PNG_SIGNATURE):
    _verify_png(data, "mask")
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      grey = np.asarray(im.convert("L"))
  except Exception as e:
    raise CorruptFile(f"cannot decode mask: {e}") from None
  return (grey >= BINARY_MASK_THRESHOLD).astype(np.uint8)


def render_coco(anns: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
  """COCO instance annotations -> uint8 [H, W] label (0 background, k = contiguous class).

  Polygons, uncompressed RLE (``counts`` a list) and compressed RLE (``counts``
  a string) are decoded with pycocotools; painting follows `COCO_PAINT_ORDER`
  and `COCO_DRAW_CROWD`.
  """
  from pycocotools import mask as mask_utils

  label = np.zeros((height, width), np.uint8)
  for ann in anns:
    if ann["iscrowd"] and not COCO_DRAW_CROWD:
      continue
    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
      polys = [p for p in seg if len(p) >= 6]
      if not polys:
        continue
      rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
      rle = mask_utils.frPyObjects(seg, height, width)
    else:  # compressed RLE
      rle = dict(seg)
      if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    m = mask_utils.decode(rle)
    if m.shape != (height, width):
      raise ValueError(f"annotation mask {m.shape} does not match the image size {(height, width)}")
    label[m > 0] = ann["class"]
  return label


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skip:
  """An image left out of the dataset (corrupt file), for the build report."""

  image_id: str
  file: str
  reason: str


def count_pixels(label: np.ndarray, num_classes: int, path: str) -> tuple[np.ndarray, int]:
  """Label uint8 [H, W] -> (class_pixels int64 [C + 1], ignore_pixels); RawDataError on other values."""
  counts = np.bincount(label.ravel(), minlength=256).astype(np.int64)
  bad = np.nonzero(counts[num_classes + 1 : IGNORE])[0] + num_classes + 1
  if bad.size:
    raise RawDataError(
      f"{path}: label values {bad.tolist()} are outside the dataset's classes 0..{num_classes} "
      f"and {IGNORE} (ignore). Is this the right label set for this dataset?"
    )
  return counts[: num_classes + 1], int(counts[IGNORE])


def encode_label(label: np.ndarray) -> bytes:
  """uint8 [H, W] -> 8-bit single-channel PNG bytes (decoded by source.decode_label)."""
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(label, np.uint8))
  if not ok:
    raise RuntimeError("OpenCV failed to encode a label PNG")
  return buf.tobytes()


def process_entry(entry: Entry, num_classes: int) -> dict[str, Any] | Skip:
  """Reads one entry -> the TFDS record dict, or `Skip` when a file is corrupt.

  Raises:
    RawDataError: a colour label or label values outside 0..C and 255 (names the file).
  """
  try:
    data, h, w = read_image(entry.image)
  except CorruptFile as e:
    return Skip(entry.image_id, entry.image, str(e))
  if entry.class_id is not None:  # a cross-domain mask of one class
    try:
      label = read_binary_mask(entry.label)
    except CorruptFile as e:
      return Skip(entry.image_id, entry.label, str(e))
    if label.shape != (h, w):
      return Skip(
        entry.image_id,
        entry.label,
        f"mask is {label.shape[0]}x{label.shape[1]} but the image is {h}x{w}",
      )
    class_pixels = np.zeros(num_classes + 1, np.int64)
    class_pixels[entry.class_id] = int(label.sum())
    class_pixels[0] = h * w - class_pixels[entry.class_id]
    return {
      "image": data,
      "label": encode_label(label),
      "image_id": entry.image_id,
      "height": h,
      "width": w,
      "class_pixels": class_pixels,
      "ignore_pixels": 0,
    }
  if entry.label is not None:
    try:
      label = read_label_png(entry.label)
    except CorruptFile as e:
      return Skip(entry.image_id, entry.label, str(e))
    label_file = entry.label
  else:
    if entry.size != (h, w):
      return Skip(
        entry.image_id,
        entry.image,
        f"image is {h}x{w} but the COCO json says {entry.size[0]}x{entry.size[1]}",
      )
    try:
      label = render_coco(entry.anns, h, w)
    except Exception as e:
      return Skip(entry.image_id, entry.image, f"cannot render its COCO annotations: {e}")
    label_file = f"{entry.image} (COCO annotations)"
  if label.shape != (h, w):
    return Skip(
      entry.image_id,
      label_file,
      f"label is {label.shape[0]}x{label.shape[1]} but the image is {h}x{w}",
    )
  class_pixels, ignore_pixels = count_pixels(label, num_classes, label_file)
  return {
    "image": data,
    "label": encode_label(label),
    "image_id": entry.image_id,
    "height": h,
    "width": w,
    "class_pixels": class_pixels,
    "ignore_pixels": ignore_pixels,
  }


_KEY_SPACE = 2**128  # tfds.core.shuffle.HKEY_SIZE bits


def record_key(position: int, n: int) -> int:
  """TFDS key of list position ``position`` of ``n``: increasing, spread over [0, 2**128)."""
  return (position + 1) * ((_KEY_SPACE - 1) // (n + 1))


def _process_star(args):
  return process_entry(*args)


def generate(
  entries: Sequence[Entry],
  num_classes: int,
  *,
  skipped: list[Skip] | None = None,
  num_workers: int = 0,
  progress: bool = True,
  desc: str = "",
) -> Iterator[tuple[int, dict]]:
  """Yields ``(key, record)`` for every readable entry, in list order.

  With shuffling disabled TFDS writes records in ascending key order, so the
  records follow the list (minus the skipped images). Keys are the list
  positions spread evenly over TFDS's 128-bit key space (`record_key`): a split
  larger than TFDS's 1 GB in-memory buffer is sorted in 1000 on-disk buckets by
  key range, and small keys would all land in one bucket (the whole split in
  memory at once).

  Args:
    entries: the split's entries (`Plan.splits[split]`).
    num_classes: C (labels may hold 0..C and 255).
    skipped: receives a `Skip` for every corrupt image/label (also logged).
    num_workers: >1 decodes in that many spawned processes (order kept).
    progress: show a tqdm progress bar.
    desc: progress bar label.
  """
  from tqdm import tqdm

  tasks = ((e, num_classes) for e in entries)
  pool = None
  if num_workers > 1 and len(entries) > 1:
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(num_workers)
    results: Iterable = pool.imap(_process_star, tasks, chunksize=16)
  else:
    results = map(_process_star, tasks)
  try:
    for pos, result in enumerate(
      tqdm(
        results, total=len(entries), desc=desc, disable=not progress, unit="img", dynamic_ncols=True
      )
    ):
      if isinstance(result, Skip):
        log.warning("skipping %s (%s): %s", result.image_id, result.file, result.reason)
        if skipped is not None:
          skipped.append(result)
        continue
      yield record_key(pos, len(entries)), result
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()


# ---------------------------------------------------------------------------------------------
# The part of the TFDS builders both datasets share (tfds imported lazily: workers never need it)
# ---------------------------------------------------------------------------------------------


class FssBuilderMixin:
  """`_split_generators`, `_generate_examples` and the features of every builder of this package.

  Options set on a builder instance before ``download_and_prepare`` (by
  `data_prep.build`): ``fss_num_workers`` (decoding processes), ``fss_progress``
  (tqdm bar). After the build, ``fss_skipped`` holds {split: [Skip]} and
  ``fss_plan`` the `Plan` (entries in record order).
  """

  FSS_DATASET: str = ""
  fss_num_workers: int = 0
  fss_progress: bool = True

  def _log_download_bytes(self) -> None:
    """Silences TFDS's "Downloading and preparing dataset Unknown size ..." (nothing is
    downloaded: the raw files are local, and `data_prep.build` reports what it builds)."""

  def _log_download_done(self) -> None:
    """Silences TFDS's "Dataset ... downloaded and prepared to <incomplete.* folder>"."""

  def _fss_features(self, image_format: str = "jpeg"):
    import tensorflow_datasets as tfds

    c = NUM_CLASSES[self.FSS_DATASET]
    return tfds.features.FeaturesDict(
      {
        # Original image bytes (given encoded, so TFDS needs no TensorFlow to write them).
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
        # 8-bit single-channel PNG: raw class indices (0 background, 1..C, 255 ignore), or for
        # the cross-domain sets the binary mask of the record's class (LABEL_ENCODING).
        "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "image_id": tfds.features.Text(),
        "height": tfds.features.Scalar(dtype=np.int32),
        "width": tfds.features.Scalar(dtype=np.int32),
        "class_pixels": tfds.features.Tensor(shape=(c + 1,), dtype=np.int64),
        "ignore_pixels": tfds.features.Scalar(dtype=np.int64),
      }
    )

  def fss_get_plan(self) -> Plan:
    """The raw-data `Plan` of ``fss_manual_dir`` (computed once, so both splits are checked up front)."""
    plan_ = getattr(self, "fss_plan", None)
    if plan_ is None:
      manual_dir = getattr(self, "fss_manual_dir", None)
      if manual_dir is None:
        raise RawDataError(
          "no manual_dir given; pass DownloadConfig(manual_dir=...) or use "
          "python -m data_prep.build"
        )
      plan_ = self.fss_plan = plan(self.FSS_DATASET, manual_dir)
    return plan_

  def _split_generators(self, dl_manager):
    if getattr(self, "fss_manual_dir", None) is None:
      self.fss_manual_dir = dl_manager.manual_dir
    plan_ = self.fss_get_plan()  # validates both splits before anything is written
    self.fss_skipped = {s: [] for s in plan_.splits}
    return {s: self._generate_examples(s) for s in plan_.splits}

  def _generate_examples(self, split):
    plan_ = self.fss_get_plan()
    yield from generate(
      plan_.splits[split],
      plan_.num_classes,
      skipped=self.fss_skipped[split],
      num_workers=self.fss_num_workers,
      progress=self.fss_progress,
      desc=f"{self.FSS_DATASET} {split}",
    )


__all__ = [
  "RawDataError",
  "CorruptFile",
  "Entry",
  "Plan",
  "Skip",
  "plan",
  "plan_pascal",
  "plan_coco",
  "find_voc_root",
  "read_list",
  "read_image",
  "read_label_png",
  "read_binary_mask",
  "render_coco",
  "count_pixels",
  "DATASET_SPLITS",
  "LABEL_ENCODING",
  "BINARY_MASK_THRESHOLD",
  "encode_label",
  "process_entry",
  "generate",
  "record_key",
  "coco_category_map",
  "load_coco_json",
  "imdecode_with_warnings",
  "JPEG_CORRUPT_WARNINGS",
  "PNG_SIGNATURE",
  "VOC_LAYOUT",
  "COCO_LAYOUT",
  "COCO_DRAW_CROWD",
  "COCO_PAINT_ORDER",
  "NUM_CLASSES",
  "SPLITS",
  "MAX_LISTED",
  "FssBuilderMixin",
]
