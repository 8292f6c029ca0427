"""Random access to a built PASCAL-5i / COCO-20i split (TFDS array_record).

A dataset built by ``python -m data_prep.build`` lives in
``<data_dir>/<dataset>/1.0.0/``::

  dataset_info.json, features.json        written by TFDS (last, so their presence means complete)
  <dataset>-{train,val}.array_record-*    one record per image, in list-file order
  fss_index_{train,val}.npz               per-split index (this module's DatasetIndex)
  fss_build_report.json                   what the build did (options, skipped files)

Records hold the original JPEG bytes (``image``), an 8-bit single-channel index PNG
(``label``: 0 background, 1..C classes, 255 ignore), ``image_id``, ``height``,
``width``, ``class_pixels`` [C+1] and ``ignore_pixels``. The index repeats the
last five for every image, so fold lists (the 2·32·32 filter, the BAM
intersection filter) are computed without decoding a single image.

`SplitSource` reads records through ``tfds`` with image decoding skipped and
decodes with OpenCV (no TensorFlow in the hot path):

* image: ``cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION`` then BGR -> RGB, so
  grayscale JPEGs come out as 3 equal channels, as in the reference
  (``cv2.imread(path, IMREAD_COLOR)``). EXIF orientation is ignored: the labels
  are drawn on the stored pixel grid.
* label: ``cv2.IMREAD_UNCHANGED`` on a PNG the build guarantees to be 8-bit
  grayscale, i.e. the raw class indices.

Usage::

  src = open_split("~/tensorflow_datasets", "pascal5i", "train")
  ex = src[0]      # {"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W], "image_id": str}
  src.index.class_pixels  # int64 [N, C + 1]
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import threading
from typing import Any, Sequence

import cv2
import numpy as np

from fss_jax import io as fss_io

DATASET_VERSION = "1.0.0"
NUM_CLASSES = {"pascal5i": 20, "coco20i": 80}
INDEX_FORMAT = 1
REPORT_FILE = "fss_build_report.json"
_IMAGE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
# Records checked against the index when a split is opened (first, middle, last).
_SPOT_CHECKS = 3


def index_filename(split: str) -> str:
  return f"fss_index_{split}.npz"


def dataset_dir(data_dir: str | os.PathLike, dataset: str) -> pathlib.Path:
  """``<data_dir>/<dataset>/<version>``: where a built dataset lives."""
  return pathlib.Path(os.path.expanduser(os.fspath(data_dir))) / dataset / DATASET_VERSION


def build_command(data_dir: str | os.PathLike, dataset: str) -> str:
  """The command that builds ``dataset`` into ``data_dir``."""
  return (f"python -m data_prep.build --dataset {dataset} "
          f"--manual_dir <raw {dataset} directory> --data_dir {os.fspath(data_dir)}")


class DatasetNotReadyError(FileNotFoundError):
  """The dataset is missing, incomplete or inconsistent; the message says how to (re)build it."""


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """Per-image metadata of one split, in record order.

  Attributes:
    image_ids: str [N], file stems (e.g. ``2008_000008``).
    heights: int32 [N], original image heights.
    widths: int32 [N], original image widths.
    class_pixels: int64 [N, C + 1], pixels of label value 0..C at original resolution.
    ignore_pixels: int64 [N], pixels of label value 255.
  """
  image_ids: np.ndarray
  heights: np.ndarray
  widths: np.ndarray
  class_pixels: np.ndarray
  ignore_pixels: np.ndarray

  def __len__(self) -> int:
    return len(self.image_ids)

  @property
  def num_classes(self) -> int:
    """C (20 for PASCAL, 80 for COCO): class_pixels has C + 1 columns."""
    return self.class_pixels.shape[1] - 1

  def validate(self) -> None:
    """Raises ValueError when the arrays disagree in length, shape or dtype."""
    n = len(self.image_ids)
    problems = []
    if self.image_ids.ndim != 1 or self.image_ids.dtype.kind != "U":
      problems.append(f"image_ids must be a 1-D str array, got {self.image_ids.dtype} {self.image_ids.shape}")
    for name in ("heights", "widths", "ignore_pixels"):
      a = getattr(self, name)
      if a.shape != (n,) or a.dtype.kind not in "iu":
        problems.append(f"{name} must be an integer array of shape ({n},), got {a.dtype} {a.shape}")
    if self.class_pixels.ndim != 2 or self.class_pixels.shape[0] != n or self.class_pixels.dtype.kind not in "iu":
      problems.append(f"class_pixels must be an integer array [{n}, C+1], got {self.class_pixels.dtype} "
                      f"{self.class_pixels.shape}")
    elif n and not np.array_equal(self.class_pixels.sum(1) + self.ignore_pixels,
                                  self.heights.astype(np.int64) * self.widths):
      problems.append("class_pixels + ignore_pixels do not add up to height * width")
    if problems:
      raise ValueError("; ".join(problems))


def save_index(path: str | os.PathLike, index: DatasetIndex, *, dataset: str, split: str) -> None:
  """Writes ``index`` to ``path`` (.npz) atomically (temporary file + rename)."""
  index.validate()
  fss_io.atomic_write(path, lambda f: np.savez_compressed(
      f, image_ids=index.image_ids, heights=index.heights.astype(np.int32),
      widths=index.widths.astype(np.int32), class_pixels=index.class_pixels.astype(np.int64),
      ignore_pixels=index.ignore_pixels.astype(np.int64), format=np.int64(INDEX_FORMAT),
      dataset=np.str_(dataset), split=np.str_(split)))


def load_index(path: str | os.PathLike) -> tuple[DatasetIndex, dict[str, Any]]:
  """Reads an index written by `save_index`; returns (index, {"dataset", "split", "format"})."""
  with np.load(path, allow_pickle=False) as z:
    missing = {"image_ids", "heights", "widths", "class_pixels", "ignore_pixels", "format"} - set(z.files)
    if missing:
      raise ValueError(f"index file {path} lacks {sorted(missing)}")
    index = DatasetIndex(image_ids=z["image_ids"], heights=z["heights"], widths=z["widths"],
                         class_pixels=z["class_pixels"], ignore_pixels=z["ignore_pixels"])
    meta = {"format": int(z["format"]),
            "dataset": str(z["dataset"]) if "dataset" in z.files else None,
            "split": str(z["split"]) if "split" in z.files else None}
  return index, meta


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3] RGB (cv2, EXIF orientation ignored)."""
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _IMAGE_FLAGS)
  if bgr is None:
    raise ValueError("OpenCV could not decode the image bytes")
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes) -> np.ndarray:
  """8-bit single-channel index PNG bytes -> uint8 [H, W] raw class indices."""
  label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if label is None:
    raise ValueError("OpenCV could not decode the label bytes")
  if label.ndim == 3 and label.shape[2] == 1:
    label = label[..., 0]
  if label.ndim != 2 or label.dtype != np.uint8:
    raise ValueError(f"label is not an 8-bit single-channel PNG (decoded {label.dtype} {label.shape})")
  return label


class SplitSource(Sequence):
  """Random-access, picklable view of one split: ``src[i]`` -> decoded example.

  Pickling keeps only the location, so grain worker processes reopen the
  array_record files themselves (no file handles or index arrays are copied).

  Attributes:
    index: the split's `DatasetIndex`.
    num_classes: C (labels hold 0..C and 255).
    dataset, split, path: what was opened.
  """

  def __init__(self, data_dir: str | os.PathLike, dataset: str, split: str, *, _verify: bool = True):
    self.data_dir = os.fspath(data_dir)
    self.dataset = dataset
    self.split = split
    self.path = dataset_dir(data_dir, dataset)
    self._lock = threading.Lock()
    self._records = None
    self._index = None
    self._positions = None
    if _verify:
      self._open(verify=True)

  # -- opening -----------------------------------------------------------------

  def _not_ready(self, problem: str) -> DatasetNotReadyError:
    return DatasetNotReadyError(
        f"{problem}\nRebuild it with:\n  {build_command(self.data_dir, self.dataset)} --overwrite")

  def _open(self, verify: bool) -> None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    path = self.path
    if not (path / "dataset_info.json").is_file():
      incomplete = sorted(p.name for p in path.parent.glob(f"*incomplete*{DATASET_VERSION}*")) \
          if path.parent.is_dir() else []
      hint = (f" (found only the unfinished build {incomplete[0]} — an interrupted build; it is ignored)"
              if incomplete else "")
      raise DatasetNotReadyError(
          f"dataset {self.dataset!r} is not built in {self.data_dir}: {path}/dataset_info.json not found{hint}.\n"
          f"Build it with:\n  {build_command(self.data_dir, self.dataset)}")
    builder = tfds.builder_from_directory(os.fspath(path))
    if self.split not in builder.info.splits:
      raise ValueError(f"split {self.split!r} not in {path} (has {sorted(builder.info.splits)})")
    records = builder.as_data_source(
        self.split, decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    index_path = path / index_filename(self.split)
    if not index_path.is_file():
      raise self._not_ready(f"dataset {path} has no index file {index_path.name} (built by another tool or "
                            f"damaged).")
    try:
      index, meta = load_index(index_path)
      index.validate()
    except Exception as e:  # pylint: disable=broad-except
      raise self._not_ready(f"index file {index_path} is unreadable or inconsistent: {e}.") from e
    if verify:
      self._check(index, meta, records, builder)
    self._records = records
    self._index = index

  def _check(self, index: DatasetIndex, meta: dict[str, Any], records, builder) -> None:
    path = self.path / index_filename(self.split)
    n = len(index)
    if meta["format"] != INDEX_FORMAT or meta["split"] not in (None, self.split):
      raise self._not_ready(f"index file {path} has format {meta['format']} / split {meta['split']!r}; "
                            f"expected format {INDEX_FORMAT} / split {self.split!r}.")
    if n != len(records):
      raise self._not_ready(f"index file {path} lists {n} images but the split has {len(records)} records.")
    cp = builder.info.features["class_pixels"].shape
    if tuple(cp) != (index.class_pixels.shape[1],):
      raise self._not_ready(f"index file {path} has {index.class_pixels.shape[1]} class columns, "
                            f"records have {cp[0]}.")
    expected = NUM_CLASSES.get(self.dataset)
    if expected is not None and index.num_classes != expected:
      raise self._not_ready(f"{self.dataset} has {expected} classes but {path} has {index.num_classes}.")
    for i in sorted({0, n // 2, n - 1} if n else set())[:_SPOT_CHECKS]:
      rec = records[i]
      rid = _to_str(rec["image_id"])
      if (rid != index.image_ids[i] or int(rec["height"]) != index.heights[i]
          or int(rec["width"]) != index.widths[i]
          or not np.array_equal(np.asarray(rec["class_pixels"]), index.class_pixels[i])):
        raise self._not_ready(f"index file {path} disagrees with record {i} ({rid!r} vs "
                              f"{index.image_ids[i]!r}).")

  def _ensure_open(self) -> None:
    if self._records is None:
      with self._lock:
        if self._records is None:
          self._open(verify=False)

  # -- pickling (grain workers) ------------------------------------------------------

  def __getstate__(self):
    return {"data_dir": self.data_dir, "dataset": self.dataset, "split": self.split}

  def __setstate__(self, state):
    self.__init__(state["data_dir"], state["dataset"], state["split"], _verify=False)

  # -- access ------------------------------------------------------------------

  @property
  def index(self) -> DatasetIndex:
    self._ensure_open()
    return self._index

  @property
  def num_classes(self) -> int:
    return self.index.num_classes

  def __len__(self) -> int:
    return len(self.index)

  def id_to_position(self, image_id: str) -> int:
    """Record position of ``image_id``; KeyError if the split has no such image."""
    if self._positions is None:
      self._positions = {str(k): i for i, k in enumerate(self.index.image_ids)}
    try:
      return self._positions[image_id]
    except KeyError:
      raise KeyError(f"image {image_id!r} is not in {self.dataset}/{self.split}") from None

  def _decode(self, i: int, rec: dict[str, Any]) -> dict[str, Any]:
    image_id = _to_str(rec["image_id"])
    image = decode_image(rec["image"])
    label = decode_label(rec["label"])
    h, w = int(self._index.heights[i]), int(self._index.widths[i])
    if image.shape[:2] != (h, w) or label.shape != (h, w):
      raise ValueError(f"{self.dataset}/{self.split} record {i} ({image_id}): decoded image {image.shape[:2]} / "
                       f"label {label.shape} but the index says {(h, w)}; rebuild the dataset.")
    return {"image": image, "label": label, "image_id": image_id}

  def _position(self, i) -> int:
    n = len(self)
    i = int(i.__index__())
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"index {i} out of range for {self.dataset}/{self.split} with {n} images")
    return i

  def __getitem__(self, i):
    """Returns {"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W], "image_id": str}."""
    self._ensure_open()
    i = self._position(i)
    return self._decode(i, self._records[i])

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    """Batched read (fewer file seeks); same items as ``[self[k] for k in keys]``."""
    self._ensure_open()
    pos = [self._position(k) for k in keys]
    return [self._decode(i, r) for i, r in zip(pos, self._records.__getitems__(pos))]

  def __repr__(self) -> str:
    return f"SplitSource({self.dataset}/{self.split}, {self.path})"


def _to_str(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return _to_str(x.item())
  return str(x)


def open_split(data_dir: str | os.PathLike, dataset: str, split: str) -> SplitSource:
  """Opens ``<data_dir>/<dataset>/1.0.0`` split ``split`` for random access.

  Args:
    data_dir: the ``--data_dir`` given to ``python -m data_prep.build``.
    dataset: "pascal5i" or "coco20i".
    split: "train" or "val".

  Returns:
    A verified `SplitSource` (index consistent with the records).

  Raises:
    DatasetNotReadyError (a FileNotFoundError): the dataset is not built, was
      interrupted, or its index is missing/inconsistent; the message holds the
      ``python -m data_prep.build`` command to run.
  """
  return SplitSource(data_dir, dataset, split)


def read_build_report(data_dir: str | os.PathLike, dataset: str) -> dict[str, Any] | None:
  """The build report of a built dataset, or None when absent."""
  p = dataset_dir(data_dir, dataset) / REPORT_FILE
  return json.loads(p.read_text()) if p.is_file() else None


__all__ = ["DatasetIndex", "SplitSource", "open_split", "DatasetNotReadyError", "dataset_dir",
           "index_filename", "save_index", "load_index", "decode_image", "decode_label",
           "read_build_report", "build_command", "DATASET_VERSION", "NUM_CLASSES"]
