"""Random access to a built PASCAL-5i / COCO-20i split (TFDS array_record).

A dataset built by ``python -m data_prep.build`` lives in
``<data_dir>/<dataset>/1.0.0/``::

  dataset_info.json, features.json        written by TFDS (last, so their presence means complete)
  <dataset>-{train,val}.array_record-*    one record per image, in list-file order
  fss_index_{train,val}.npz               per-split index (this module's DatasetIndex)
  fss_build_report.json                   what the build did (options, skipped files, and the
                                          size and sha256 of every record file)
  fss_verified.json                       when each record file last matched its sha256 (a cache)

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

Integrity: opening a split compares the sizes of its record files with the
build report (a truncated copy is caught at once) and re-hashes (sha256) only
the files whose size, mtime, ctime or inode differ from the stamp in
``fss_verified.json`` -- written by the build and after every successful
verification -- so a file changed, copied or restored since it was last
verified is checked once, and an untouched 30 GB build opens with a few
``stat`` calls. Damage that leaves the stamp intact (bit rot on the disk) is
caught by Riegeli's own chunk hashes when the record is read: any read error
becomes a `RecordFileError` naming the file and the rebuild command.
``python -m data_prep.build --verify`` re-hashes every file on demand.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from etils import epath

from fss_jax import io as fss_io

DATASET_VERSION = "1.0.0"
NUM_CLASSES = {"pascal5i": 20, "coco20i": 80}
INDEX_FORMAT = 1
REPORT_FILE = "fss_build_report.json"
# Per record file: size, mtime, ctime and inode at which it last matched its sha256.
VERIFIED_FILE = "fss_verified.json"
_IMAGE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
# Records checked against the index when a split is opened (first, middle, last).
_SPOT_CHECKS = 3
# What array_record / Riegeli raise for a damaged, truncated or vanished record file.
_READ_ERRORS = (RuntimeError, OSError, ValueError)

log = logging.getLogger(__name__)


def index_filename(split: str) -> str:
  return f"fss_index_{split}.npz"


def dataset_dir(data_dir: str | os.PathLike, dataset: str) -> epath.Path:
  """``<data_dir>/<dataset>/<version>``: where a built dataset lives."""
  return fss_io.user_path(data_dir) / dataset / DATASET_VERSION


def build_command(data_dir: str | os.PathLike, dataset: str) -> str:
  """The command that builds ``dataset`` into ``data_dir``."""
  return (
    f"python -m data_prep.build --dataset {dataset} "
    f"--manual_dir <raw {dataset} directory> --data_dir {os.fspath(data_dir)}"
  )


class DatasetNotReadyError(FileNotFoundError):
  """The dataset is missing, incomplete or inconsistent; the message says how to (re)build it."""


class RecordFileError(DatasetNotReadyError):
  """A record file is missing, truncated, modified or unreadable; the message names it and how to rebuild."""


# ---------------------------------------------------------------------------------------------
# Record file integrity: sizes and sha256 from the build report, a stamp to skip re-hashing
# ---------------------------------------------------------------------------------------------


file_sha256 = fss_io.file_sha256  # looked up here at each use (tests count the calls)


def _stat_key(file: epath.Path) -> dict[str, int]:
  """What changes when a file is written, truncated, replaced or copied (ctime: even if the mtime
  is set back; an object in a store is replaced whole, with a new mtime).

  Raises:
    OSError: the file is missing.
  """
  if fss_io.is_remote(file):
    st = file.stat()
    return {"size": int(st.length), "mtime": int(st.mtime)}
  st = os.stat(os.fspath(file))
  return {
    "size": st.st_size,
    "mtime_ns": st.st_mtime_ns,
    "ctime_ns": st.st_ctime_ns,
    "inode": st.st_ino,
  }


def read_verified(path: epath.Path) -> dict[str, dict[str, Any]]:
  """``{file name: stat key + sha256}`` of ``<path>/fss_verified.json`` ({} when absent or unreadable)."""
  try:
    files = json.loads((path / VERIFIED_FILE).read_text()).get("files")
  except (OSError, ValueError, AttributeError):
    return {}
  return files if isinstance(files, dict) else {}


def write_verified(path: epath.Path, files: dict[str, dict[str, Any]]) -> bool:
  """Writes the verification stamp; False (and a warning) when ``path`` is not writable."""
  try:
    fss_io.atomic_write(
      path / VERIFIED_FILE, json.dumps({"format": 1, "files": files}, indent=1) + "\n"
    )
  except OSError as e:
    log.warning(
      "cannot record the verified checksums in %s (%s); the next open verifies them again. "
      "Run python -m data_prep.build --verify as a user who can write there.",
      path,
      e,
    )
    return False
  return True


def stamp_verified(path: epath.Path, expected: dict[str, dict[str, Any]]) -> bool:
  """Stamps record files just copied from a verified build with the report's sha256 (their
  stat keys as they are now), so the first open does not hash them again."""
  return write_verified(
    path,
    {name: {**_stat_key(path / name), "sha256": want["sha256"]} for name, want in expected.items()},
  )


def checksum_record_files(path: epath.Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Build time: ``{name: {"size", "sha256"}}`` of the record files, also stamped as verified."""
  entries, stamps = {}, {}
  for name in names:
    key = _stat_key(path / name)
    digest = file_sha256(path / name)
    entries[name] = {"size": key["size"], "sha256": digest}
    stamps[name] = {**key, "sha256": digest}
  write_verified(path, stamps)
  return entries


def check_record_files(
  path: epath.Path,
  expected: dict[str, dict[str, Any]],
  names: Sequence[str],
  *,
  checksum: str = "changed",
) -> list[str]:
  """Compares record files with the build report; returns the problems (empty: all intact).

  Args:
    path: the dataset folder.
    expected: the report's ``record_files`` ({name: {"size", "sha256"}}).
    names: the files to check.
    checksum: "never" (sizes only), "changed" (hash the files whose stat
      differs from the stamp in ``fss_verified.json``) or "always".

  Returns:
    One line per damaged file, naming it. Files that matched their sha256 are
    stamped, so the next "changed" check skips them.
  """
  stamps = read_verified(path)
  problems, verified = [], {}
  for name in names:
    want, file = expected.get(name), path / name
    if want is None:
      problems.append(f"record file {file} is not in the build report {path / REPORT_FILE}")
      continue
    try:
      key = {**_stat_key(file), "sha256": want["sha256"]}
    except OSError:
      problems.append(f"record file {file} is missing")
      continue
    if key["size"] != want["size"]:
      problems.append(
        f"record file {file} has {key['size']} bytes but was built with {want['size']} "
        f"(truncated or replaced)"
      )
      continue
    if checksum == "never" or (checksum == "changed" and stamps.get(name) == key):
      continue
    log.info("checking the sha256 of %s (%.1f MB)", file, key["size"] / 1e6)
    digest = file_sha256(file)
    if digest != want["sha256"]:
      problems.append(
        f"record file {file} does not match its sha256 from the build (damaged or modified)"
      )
      continue
    verified[name] = key
  if verified:
    write_verified(path, {**stamps, **verified})
  return problems


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
      problems.append(
        f"image_ids must be a 1-D str array, got {self.image_ids.dtype} {self.image_ids.shape}"
      )
    for name in ("heights", "widths", "ignore_pixels"):
      a = getattr(self, name)
      if a.shape != (n,) or a.dtype.kind not in "iu":
        problems.append(f"{name} must be an integer array of shape ({n},), got {a.dtype} {a.shape}")
    if (
      self.class_pixels.ndim != 2
      or self.class_pixels.shape[0] != n
      or self.class_pixels.dtype.kind not in "iu"
    ):
      problems.append(
        f"class_pixels must be an integer array [{n}, C+1], got {self.class_pixels.dtype} "
        f"{self.class_pixels.shape}"
      )
    elif n and not np.array_equal(
      self.class_pixels.sum(1) + self.ignore_pixels, self.heights.astype(np.int64) * self.widths
    ):
      problems.append("class_pixels + ignore_pixels do not add up to height * width")
    if problems:
      raise ValueError("; ".join(problems))


def save_index(path: str | os.PathLike, index: DatasetIndex, *, dataset: str, split: str) -> None:
  """Writes ``index`` to ``path`` (.npz) atomically (temporary file + rename)."""
  index.validate()
  fss_io.atomic_write(
    path,
    lambda f: np.savez_compressed(
      f,
      image_ids=index.image_ids,
      heights=index.heights.astype(np.int32),
      widths=index.widths.astype(np.int32),
      class_pixels=index.class_pixels.astype(np.int64),
      ignore_pixels=index.ignore_pixels.astype(np.int64),
      format=np.int64(INDEX_FORMAT),
      dataset=np.str_(dataset),
      split=np.str_(split),
    ),
  )


def load_index(path: str | os.PathLike) -> tuple[DatasetIndex, dict[str, Any]]:
  """Reads an index written by `save_index`; returns (index, {"dataset", "split", "format"})."""
  with (
    fss_io.user_path(path).open("rb") as f,
    np.load(io.BytesIO(f.read()), allow_pickle=False) as z,
  ):
    missing = {"image_ids", "heights", "widths", "class_pixels", "ignore_pixels", "format"} - set(
      z.files
    )
    if missing:
      raise ValueError(f"index file {path} lacks {sorted(missing)}")
    index = DatasetIndex(
      image_ids=z["image_ids"],
      heights=z["heights"],
      widths=z["widths"],
      class_pixels=z["class_pixels"],
      ignore_pixels=z["ignore_pixels"],
    )
    meta = {
      "format": int(z["format"]),
      "dataset": str(z["dataset"]) if "dataset" in z.files else None,
      "split": str(z["split"]) if "split" in z.files else None,
    }
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
    raise ValueError(
      f"label is not an 8-bit single-channel PNG (decoded {label.dtype} {label.shape})"
    )
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

  def __init__(
    self, data_dir: str | os.PathLike, dataset: str, split: str, *, _verify: bool = True
  ):
    self.data_dir = os.fspath(data_dir)
    self.dataset = dataset
    self.split = split
    self.path = dataset_dir(data_dir, dataset)
    self._lock = threading.Lock()
    self._records: Any = None
    self._index: DatasetIndex | None = None
    self._positions: dict[str, int] | None = None
    # (record file names, cumulative record counts)
    self._shards: tuple[list[str], list[int]] | None = None
    if _verify:
      self._open(verify=True)

  # -- opening -----------------------------------------------------------------

  def _not_ready(self, problem: str, cls: type[DatasetNotReadyError] = DatasetNotReadyError):
    return cls(
      f"{problem}\nRebuild it with:\n  {build_command(self.data_dir, self.dataset)} --overwrite"
    )

  def _open(self, verify: bool) -> None:
    import tensorflow_datasets as tfds

    path = self.path
    if not (path / "dataset_info.json").is_file():
      incomplete = (
        sorted(p.name for p in path.parent.glob(f"*incomplete*{DATASET_VERSION}*"))
        if path.parent.is_dir()
        else []
      )
      hint = (
        f" (found only the unfinished build {incomplete[0]} — an interrupted build; it is ignored)"
        if incomplete
        else ""
      )
      raise DatasetNotReadyError(
        f"dataset {self.dataset!r} is not built in {self.data_dir}: {path}/dataset_info.json not found{hint}.\n"
        f"Build it with:\n  {build_command(self.data_dir, self.dataset)}"
      )
    builder = tfds.builder_from_directory(os.fspath(path))
    if self.split not in builder.info.splits:
      raise ValueError(f"split {self.split!r} not in {path} (has {sorted(builder.info.splits)})")
    split_info = builder.info.splits[self.split]
    self._shards = (
      [os.path.basename(fi.filename) for fi in split_info.file_instructions],
      np.cumsum([fi.take for fi in split_info.file_instructions]).tolist(),
    )
    if verify:
      self._check_record_files(split_info.filenames)
    records = builder.as_data_source(
      self.split,
      decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
    )
    index_path = path / index_filename(self.split)
    if not index_path.is_file():
      raise self._not_ready(
        f"dataset {path} has no index file {index_path.name} (built by another tool or damaged)."
      )
    try:
      index, meta = load_index(index_path)
      index.validate()
    except Exception as e:
      raise self._not_ready(f"index file {index_path} is unreadable or inconsistent: {e}.") from e
    if verify:
      self._check(index, meta, records, builder)
    self._records = records
    self._index = index

  def _check_record_files(self, names: Sequence[str]) -> None:
    """Sizes always, sha256 of the files changed since last verified (`check_record_files`)."""
    try:
      report = json.loads((self.path / REPORT_FILE).read_text())
    except (OSError, ValueError):
      report = {}
    expected = report.get("record_files")
    if expected is None:  # built before checksums were recorded (report format 1)
      log.info(
        "%s records no checksums (an older build); rebuild with --overwrite to check its files",
        self.path / REPORT_FILE,
      )
      return
    problems = check_record_files(self.path, expected, names)
    if problems:
      raise self._not_ready("; ".join(problems) + ".", RecordFileError)

  def _file_of(self, i: int) -> epath.Path:
    """The record file holding record ``i`` of the split."""
    assert self._shards is not None, "split is not open"
    names, ends = self._shards
    return self.path / names[min(bisect.bisect_right(ends, i), len(names) - 1)]

  def _damaged(self, i: int, error: Exception) -> RecordFileError:
    return self._not_ready(
      f"record file {self._file_of(i)} is damaged: reading record {i} of "
      f"{self.dataset}/{self.split} failed ({error}).",
      RecordFileError,
    )

  def _read_one(self, records, i: int):
    """The raw record ``i``; a damaged file raises `RecordFileError` naming it."""
    try:
      return records[i]
    except _READ_ERRORS as e:
      raise self._damaged(i, e) from e

  def _read_many(self, records, positions: Sequence[int]) -> list[Any]:
    """The raw records at ``positions`` (one batched read); errors name the damaged file."""
    try:
      return list(records.__getitems__(positions))
    except _READ_ERRORS as e:
      for i in positions:  # the batch spans files: find the damaged one
        self._read_one(records, i)
      raise self._damaged(positions[0], e) from e

  def _check(self, index: DatasetIndex, meta: dict[str, Any], records, builder) -> None:
    path = self.path / index_filename(self.split)
    n = len(index)
    if meta["format"] != INDEX_FORMAT or meta["split"] not in (None, self.split):
      raise self._not_ready(
        f"index file {path} has format {meta['format']} / split {meta['split']!r}; "
        f"expected format {INDEX_FORMAT} / split {self.split!r}."
      )
    if n != len(records):
      raise self._not_ready(
        f"index file {path} lists {n} images but the split has {len(records)} records."
      )
    cp = builder.info.features["class_pixels"].shape
    if tuple(cp) != (index.class_pixels.shape[1],):
      raise self._not_ready(
        f"index file {path} has {index.class_pixels.shape[1]} class columns, records have {cp[0]}."
      )
    expected = NUM_CLASSES.get(self.dataset)
    if expected is not None and index.num_classes != expected:
      raise self._not_ready(
        f"{self.dataset} has {expected} classes but {path} has {index.num_classes}."
      )
    for i in sorted({0, n // 2, n - 1} if n else set())[:_SPOT_CHECKS]:
      rec = self._read_one(records, i)
      rid = _to_str(rec["image_id"])
      if (
        rid != index.image_ids[i]
        or int(rec["height"]) != index.heights[i]
        or int(rec["width"]) != index.widths[i]
        or not np.array_equal(np.asarray(rec["class_pixels"]), index.class_pixels[i])
      ):
        raise self._not_ready(
          f"index file {path} disagrees with record {i} ({rid!r} vs {index.image_ids[i]!r})."
        )

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
  def index(self) -> DatasetIndex:  # type: ignore[override]  # shadows Sequence.index on purpose
    self._ensure_open()
    assert self._index is not None
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
    try:
      image = decode_image(rec["image"])
      label = decode_label(rec["label"])
    except ValueError as e:
      raise self._not_ready(
        f"record {i} ({image_id}) of {self.dataset}/{self.split} in {self._file_of(i)} does "
        f"not decode: {e}.",
        RecordFileError,
      ) from e
    index = self._index
    assert index is not None, "split is not open"
    h, w = int(index.heights[i]), int(index.widths[i])
    if image.shape[:2] != (h, w) or label.shape != (h, w):
      raise ValueError(
        f"{self.dataset}/{self.split} record {i} ({image_id}): decoded image {image.shape[:2]} / "
        f"label {label.shape} but the index says {(h, w)}; rebuild the dataset."
      )
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
    return self._decode(i, self._read_one(self._records, i))

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    """Batched read (fewer file seeks); same items as ``[self[k] for k in keys]``."""
    self._ensure_open()
    pos = [self._position(k) for k in keys]
    return [self._decode(i, r) for i, r in zip(pos, self._read_many(self._records, pos))]

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
      ``python -m data_prep.build`` command to run. `RecordFileError` (a
      subclass) for a record file that is missing, truncated, modified since the
      build (sha256) or unreadable.
  """
  return SplitSource(data_dir, dataset, split)


def read_build_report(data_dir: str | os.PathLike, dataset: str) -> dict[str, Any] | None:
  """The build report of a built dataset, or None when absent."""
  p = dataset_dir(data_dir, dataset) / REPORT_FILE
  return json.loads(p.read_text()) if p.is_file() else None


__all__ = [
  "DatasetIndex",
  "SplitSource",
  "open_split",
  "DatasetNotReadyError",
  "RecordFileError",
  "dataset_dir",
  "index_filename",
  "save_index",
  "load_index",
  "decode_image",
  "decode_label",
  "read_build_report",
  "build_command",
  "file_sha256",
  "checksum_record_files",
  "check_record_files",
  "read_verified",
  "write_verified",
  "stamp_verified",
  "DATASET_VERSION",
  "NUM_CLASSES",
  "REPORT_FILE",
  "VERIFIED_FILE",
]
