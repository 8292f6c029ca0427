"""Few-shot segmentation of your own images with a trained or converted checkpoint.

  python -m fss_jax.predict --model sccan --checkpoint DIR \\
      --support dog1.jpg:dog1_mask.png [--support dog2.jpg:dog2_mask.png ...] \\
      --query a.jpg [b.jpg ...] --out OUT/ [--size 473] [--resize {pad,squash}] \\
      [--batch-size 4] [--class NAME|ID] [--max-pixels 50] [--overwrite]

Python API::

  p = Predictor("sccan", "DIR")                # or Predictor(None, "DIR"): model from the metadata
  preds = p.segment([img1, img2], [mask1, mask2], [query_a, query_b])   # arrays or paths
  preds[0].mask                                # uint8 [H, W] 0/1 at the query's size
  supports = p.load_supports([img1, img2], [mask1, mask2])
  preds = p.segment(supports, None, [query_a, query_b])
  write_outputs(p, supports, preds, "OUT/")    # what the command line writes

``--checkpoint`` is either a converted checkpoint (``DIR/variables`` +
``DIR/metadata.json``, from ``python -m checkpoints.convert``) or a training
workdir of ``python -m fss_jax.main`` (its ``best/`` checkpoint, else the latest
of ``checkpoints/``; a ``best``/``checkpoints`` folder or one step folder works
too). The model name and fields come from the checkpoint's metadata; a
checkpoint of another model is refused.

Inputs. Images: anything OpenCV decodes (EXIF orientation ignored, as in the data
pipeline); grey images become RGB. Images and masks up to ``--max-pixels``
megapixels (width x height; default 50, 0 = no limit), checked from the file
header before any pixel is decoded; an empty, truncated or non-image file is an
error naming it. Masks (``--support IMAGE:MASK``, same size as the image; PNG
recommended: a JPEG mask is read with a warning, its compression noise around the
object counts as foreground):

* any non-zero pixel is foreground: grey / 16-bit / 1-bit PNGs by value, palette
  PNGs by palette *index* (VOC style), colour (RGB) masks by colour (not black);
  an RGBA mask with transparency uses its alpha channel (alpha > 0 = foreground);
* 255 means *ignore* (left out of the prototypes, as in the datasets) only in a
  label map: a grey mask whose values are exactly {0, 1, 255} with 1s present,
  or a palette PNG with index 255 and another non-zero index (the VOC border).
  Otherwise 255 is foreground (a 0/255 black-and-white mask);
* a mask without foreground is an error.

Method (data_protocol.md §9): every image is resized to the model's square input
(``--resize pad``: aspect-preserving resize + top-left zero padding, §9.1;
``squash``: plain resize, §9.2) with the ops of `fss_jax.data.transforms`, and
ImageNet-normalised. The size and resize the model was trained for come from the
checkpoint (``input`` in its metadata; a training workdir's config.json for older
ones); a checkpoint that records neither needs ``--size`` and ``--resize``. Queries are run in batches (padded to a power of two
up to ``--batch-size``) of one compiled function, so many queries of any sizes
compile once per batch bucket. The logits are resized back on the host with the
evaluation's rule (align_corners=True bilinear; §9.1: to the padded L x L square,
L = max(H, W), then cropped), then arg-maxed.

Outputs in OUT/ (written atomically; an existing file is never replaced without
``--overwrite``, checked before anything runs):

* ``<query>_mask.png``: palette PNG, index 0 background / 1 foreground, the
  query's original size;
* ``<query>_overlay.png``: the query under a "prediction" caption, the predicted
  region's outline drawn in red (the pixels inside keep their colours);
* ``<query>_panel.png``: one captioned row ``support 1 .. support K | prediction``
  (`fss_jax.eval.visualize.episode_panel`), every mask as an outline;
* ``support<k>_<image>_overlay.png``: each support under a "support k" caption with
  its mask as read outlined (green; ignore pixels grey);
* ``predictions.json``: per query the original size, ``foreground_fraction``
  (predicted foreground pixels / all pixels), ``confidence`` (mean largest class
  probability over the predicted-foreground pixels: the softmax of the logits, or the
  model's own output for models that return probabilities, `ModelSpec.output`; null
  when nothing is predicted), ``confidence_all`` (the same over all pixels) and the file names;
  plus the model, checkpoint, the dataset and fold it was trained on (when its
  metadata records them), input size and resize mode.

The last lines printed name each query's result and the fold the checkpoint was
trained on (a class of that fold's test split is new to the model; the others were
its training classes).

Exit status: 0 written; 2 bad input (missing, empty, unreadable or truncated image
or mask, one above --max-pixels, mask of another size, empty mask, checkpoint of
another model, existing output files).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import pathlib
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from etils import epath

from fss_jax import io as fss_io
from fss_jax.data import transforms
from fss_jax.eval import visualize
from fss_jax.train import precision

IGNORE = 255
RESIZE_MODES = {"pad": "aspect", "aspect": "aspect", "squash": "squash"}
_IMAGE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
# Largest image or mask read (width x height, megapixels; --max-pixels). 50 MP takes the
# full-resolution photos of current cameras and phones (45-50 MP), while reading, resizing
# and scoring one such query already takes ~1.7 GB of host memory beyond the model's
# (decoded image, float32 copy, full-size logits and probabilities; measured), and the
# model sees a 473 px square of it anyway.
DEFAULT_MAX_MEGAPIXELS = 50.0
LOSSY_FORMATS = ("JPEG", "MPO")  # PIL format names of masks that get a warning
_PIL_LIMIT_LOCK = threading.Lock()  # guards the swap of PIL's global pixel limit
CONFIDENCE = (
  "mean over the predicted-foreground pixels of the largest class probability "
  "(softmax of the logits, or the model's own probabilities for models that output "
  "them); null when no pixel is predicted foreground; confidence_all: the same over "
  "all pixels"
)


class PredictInputError(ValueError):
  """Bad user input (image, mask, checkpoint, output folder); the message names the file."""


# ---------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------


def _print_warning(message: str) -> None:
  """The default ``warn`` of the readers: one ``warning: ...`` line on stderr."""
  print(f"warning: {message}", file=sys.stderr)


def _check_file(path: pathlib.Path, what: str) -> None:
  """Raises PredictInputError when ``path`` is missing, a folder or empty."""
  if path.is_dir():
    raise PredictInputError(f"{what} {path} is a folder, not an image file; pass the file")
  if not path.is_file():
    raise PredictInputError(f"{what} {path} not found; check the path")
  if path.stat().st_size == 0:
    raise PredictInputError(f"{what} {path} is empty (0 bytes); copy or export the file again")


def _open_header(path: pathlib.Path):
  """``PIL.Image.open(path)``: reads the header only (size, format), no pixels.

  PIL's own decompression-bomb check (a warning above 89 megapixels, an error
  above 179) is off here: the caller applies ``--max-pixels`` to the size instead,
  so the one limit the user sets is the one that counts.
  """
  from PIL import Image

  with _PIL_LIMIT_LOCK:
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
      return Image.open(path)
    finally:
      Image.MAX_IMAGE_PIXELS = limit


def check_pixels(
  path: pathlib.Path, what: str, size: tuple[int, int], max_megapixels: float | None
) -> None:
  """Raises PredictInputError when a (width, height) image is above ``max_megapixels``."""
  w, h = int(size[0]), int(size[1])
  if max_megapixels and w * h > max_megapixels * 1e6:
    raise PredictInputError(
      f"{what} {path} is {w}x{h} = {w * h / 1e6:.3g} megapixels, above --max-pixels "
      f"{max_megapixels:g}; downscale it or raise --max-pixels"
    )


def _what_it_is(path: pathlib.Path) -> str:
  """What an unidentified file looks like (for the error message)."""
  with open(path, "rb") as f:
    head = f.read(64)
  return (
    fss_io.describe_text_head(head)
    or "truncated, corrupt, or not an image format OpenCV or PIL reads"
  )


@contextlib.contextmanager
def _quiet_opencv():
  """Silences OpenCV's log lines while decoding (a failure is reported in one line)."""
  level = cv2.utils.logging.getLogLevel()
  cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
  try:
    yield
  finally:
    cv2.utils.logging.setLogLevel(level)


def read_image(
  path: str | os.PathLike,
  *,
  what: str = "image",
  max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
) -> np.ndarray:
  """An image file -> uint8 RGB [H, W, 3] (grey / alpha images converted).

  The size is checked from the header (PIL) before OpenCV decodes any pixel; a
  PNG's chunks are checked too (a truncated PNG is refused before decoding). A
  format PIL cannot read but OpenCV can (e.g. OpenEXR) is checked after decoding.

  Args:
    path: the image file.
    what: how messages name it ("query image", "support image").
    max_megapixels: largest width x height accepted, in megapixels (None / 0: no limit).

  Raises:
    PredictInputError: missing, empty, unreadable, truncated or too large file.
  """
  path = pathlib.Path(path)
  _check_file(path, what)
  fmt, size, problem = None, None, None
  try:
    with _open_header(path) as im:
      fmt, size = im.format, im.size
      check_pixels(path, what, size, max_megapixels)
      if fmt == "PNG":
        im.verify()  # chunk CRCs, up to IEND; no decoding
  except PredictInputError:
    raise
  except Exception as e:  # PIL raises many types; OpenCV decides
    problem = f"{e}" if fmt else None
  if problem is None:
    with _quiet_opencv():
      bgr = cv2.imdecode(np.fromfile(path, np.uint8), _IMAGE_FLAGS)
    if bgr is not None:
      check_pixels(path, what, bgr.shape[1::-1], max_megapixels)  # formats PIL cannot open
      return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  reason = (
    f"a truncated or corrupt {fmt} file: {problem or 'OpenCV cannot decode it'}"
    if fmt
    else _what_it_is(path)
  )
  raise PredictInputError(
    f"{what} {path} is not a readable image ({reason}); pass a JPEG/PNG/BMP/TIFF/WebP image"
  )


def mask_from_values(
  values: np.ndarray, *, palette: bool = False, alpha: np.ndarray | None = None
) -> np.ndarray:
  """Decoded mask values -> uint8 [H, W] label with 0 background, 1 foreground, 255 ignore.

  Args:
    values: [H, W] grey / index values, or [H, W, C] colours.
    palette: the values are palette indices (255 is ignore when another non-zero
      index is present, VOC style).
    alpha: optional [H, W] alpha channel; when it has transparency, foreground is
      ``alpha > 0``.

  See the module docstring for the rule.
  """
  values = np.asarray(values)
  if alpha is not None and alpha.size and int(alpha.min()) < int(alpha.max()):
    return (np.asarray(alpha) > 0).astype(np.uint8)
  if values.ndim == 3:
    if values.shape[-1] == 1 or all(
      np.array_equal(values[..., 0], values[..., c]) for c in range(1, values.shape[-1])
    ):
      values = values[..., 0]
    else:
      return np.any(values != 0, axis=-1).astype(np.uint8)
  values = values.astype(np.int64) if values.dtype != bool else values.astype(np.uint8)
  out = (values != 0).astype(np.uint8)
  uniq = np.unique(values)
  has_255 = bool(np.any(uniq == IGNORE))
  if palette:
    ignore = has_255 and bool(np.any((uniq != 0) & (uniq != IGNORE)))
  else:
    ignore = has_255 and set(uniq.tolist()) <= {0, 1, IGNORE} and 1 in uniq
  if ignore:
    out[values == IGNORE] = IGNORE
  return out


def _mask_from_pil(im) -> np.ndarray:
  """A loaded PIL image -> uint8 [H, W] 0 / 1 / 255 (the rule of the module docstring)."""
  mode = im.mode
  if mode == "P":
    if "transparency" in im.info:
      rgba = np.asarray(im.convert("RGBA"))
      alpha = rgba[..., 3]
      if int(alpha.min()) < int(alpha.max()):
        return mask_from_values(rgba[..., :3], alpha=alpha)
    return mask_from_values(np.asarray(im), palette=True)
  if mode in ("RGBA", "LA", "PA") or (mode == "RGB" and "transparency" in im.info):
    rgba = np.asarray(im.convert("RGBA"))
    base = np.asarray(im.convert("L")) if mode == "LA" else rgba[..., :3]
    return mask_from_values(base, alpha=rgba[..., 3])
  if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
    return mask_from_values(np.asarray(im.convert("RGB")))
  return mask_from_values(np.asarray(im))  # L, 1, I, I;16, F


def read_mask(
  path: str | os.PathLike,
  *,
  what: str = "mask",
  max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
  warn: Callable[[str], None] = _print_warning,
) -> np.ndarray:
  """A mask file -> uint8 [H, W] 0 / 1 / 255 (the rule of the module docstring).

  The size is checked from the header before any pixel is decoded. A JPEG mask is
  read, with a warning: its compression noise turns background pixels non-zero.

  Args:
    path: the mask file.
    what: how messages name it ("support mask").
    max_megapixels: largest width x height accepted, in megapixels (None / 0: no limit).
    warn: called with a one-line warning (default: printed on stderr).

  Raises:
    PredictInputError: missing, empty, unreadable, truncated or too large file.
  """
  from PIL import UnidentifiedImageError

  path = pathlib.Path(path)
  _check_file(path, what)
  try:
    im = _open_header(path)
  except UnidentifiedImageError:
    raise _unreadable_mask(path, what, _what_it_is(path)) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise _unreadable_mask(path, what, f"{type(e).__name__}: {e}") from None
  with im:
    check_pixels(path, what, im.size, max_megapixels)
    try:
      im.load()
      mask = _mask_from_pil(im)
    except (OSError, SyntaxError, ValueError) as e:
      raise _unreadable_mask(path, what, f"a truncated or corrupt {im.format} file: {e}") from None
    if im.format in LOSSY_FORMATS:
      warn(
        f"{what} {path} is a {im.format} (lossy): its compression noise makes background "
        f"pixels near the object non-zero, and any non-zero pixel counts as foreground; "
        f"save masks as PNG"
      )
  return mask


def _unreadable_mask(path: pathlib.Path, what: str, reason: str) -> PredictInputError:
  return PredictInputError(
    f"{what} {path} is not a readable image ({reason}); pass a PNG mask "
    f"(non-zero pixels = the object)"
  )


def _load(
  item: Any,
  kind: str,
  index: int,
  *,
  what: str | None = None,
  max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
  warn: Callable[[str], None] = _print_warning,
) -> tuple[np.ndarray, str, str | None]:
  """(array, display name, path or None) of an image / mask given as a path or array."""
  if isinstance(item, (str, os.PathLike)):
    what = what or kind
    shown = os.fspath(item)
    try:
      with fss_io.local_copy(item) as local:  # gs:// inputs: read from a downloaded copy
        if kind == "image":
          arr = read_image(local, what=what, max_megapixels=max_megapixels)
        else:
          arr = read_mask(
            local,
            what=what,
            max_megapixels=max_megapixels,
            warn=lambda m: warn(m.replace(local, shown)),
          )
    except PredictInputError as e:
      if local == shown:
        raise
      raise PredictInputError(str(e).replace(local, shown)) from None
    except FileNotFoundError:
      raise PredictInputError(f"{what} {shown} not found; check the path") from None
    return arr, fss_io.user_path(item).stem, shown
  arr = np.asarray(item)
  name = f"{kind}_{index}"
  if kind == "image":
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
      raise PredictInputError(f"{name}: expected an RGB image [H, W, 3], got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
      if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
      arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
  else:
    if arr.ndim not in (2, 3):
      raise PredictInputError(f"{name}: expected a mask [H, W], got shape {arr.shape}")
    arr = mask_from_values(arr)
  return arr, name, None


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Where the weights came from and what they are."""

  path: epath.Path
  kind: str  # "converted" | "workdir"
  model: str | None
  fields: dict
  metadata_file: epath.Path | None
  weights_dir: epath.Path
  step: int | None = None
  dataset: str | None = None  # what the weights were trained on, when recorded
  fold: int | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the whole metadata

  def trained_on(self) -> str | None:
    """ "pascal5i fold 2", or None when the metadata does not record it."""
    if self.fold is None:
      return None
    return f"{self.dataset or 'unknown dataset'} fold {self.fold}"


def _latest_step_dir(folder: epath.Path) -> epath.Path | None:
  steps = (
    [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir()]
    if folder.is_dir()
    else []
  )
  return max(steps, key=lambda p: int(p.name)) if steps else None


def locate_checkpoint(path: str | os.PathLike) -> Checkpoint:
  """Finds the weights and the model metadata under ``path``.

  Accepts a converted checkpoint (``variables/`` + ``metadata.json``), a training
  workdir (``best/`` preferred, else ``checkpoints/``), one of those two folders, or
  a single step folder (``.../checkpoints/1200``).

  Raises:
    PredictInputError: nothing usable under ``path``.
  """
  from fss_jax.train import state as state_lib

  root = fss_io.user_path(path)
  if not root.exists():
    raise PredictInputError(
      f"checkpoint {root} not found. Convert official weights with `python -m "
      f"checkpoints.convert --model <name> --src best.pth --dst {root}` or "
      f"pass a training workdir"
    )
  if (root / state_lib.CONVERTED_VARIABLES_DIR).is_dir():
    meta_file = root / state_lib.CONVERTED_METADATA_FILE
    meta = {}
    if meta_file.is_file():
      try:
        meta = json.loads(meta_file.read_text())
      except (json.JSONDecodeError, OSError) as e:
        raise PredictInputError(
          f"{meta_file} is not valid JSON ({e}); convert the checkpoint "
          f"again with python -m checkpoints.convert"
        ) from None
    return Checkpoint(
      root,
      "converted",
      meta.get("model"),
      dict(meta.get("fields") or {}),
      meta_file if meta_file.is_file() else None,
      root / state_lib.CONVERTED_VARIABLES_DIR,
      dataset=meta.get("dataset"),
      fold=meta.get("fold"),
      meta=meta,
    )
  step_dir = None
  if (root / "state").is_dir():
    step_dir = root
  else:
    for sub in (root / "best", root / "checkpoints", root):
      step_dir = _latest_step_dir(sub)
      if step_dir is not None:
        break
  if step_dir is None:
    raise PredictInputError(
      f"{root} holds no checkpoint: expected a converted checkpoint (variables/ and "
      f"metadata.json, written by `python -m checkpoints.convert`) or a training workdir with "
      f"best/<step>/ or checkpoints/<step>/ (written by `python -m fss_jax.main --mode train`)"
    )
  meta_file = step_dir / "meta" / "metadata"
  meta = {}
  if meta_file.is_file():
    try:
      meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, OSError) as e:
      raise PredictInputError(
        f"{meta_file} is not valid JSON ({e}); the checkpoint is damaged, use another step"
      ) from None
  return Checkpoint(
    root,
    "workdir",
    meta.get("model"),
    dict(meta.get("model_fields") or {}),
    meta_file if meta_file.is_file() else None,
    step_dir / "state",
    int(step_dir.name) if step_dir.name.isdigit() else None,
    dataset=meta.get("dataset"),
    fold=meta.get("fold"),
    meta=meta,
  )


def run_transform(ckpt: Checkpoint) -> tuple[int, str] | None:
  """(test size, "aspect" | "squash") a training workdir was run with (its config.json)."""
  from fss_jax.train import workdir as workdir_lib

  if ckpt.kind != "workdir":
    return None
  root = fss_io.user_path(ckpt.path)
  cfg = next(
    (c for c in (workdir_lib.read_run_config(d) for d in (root, *root.parents[:2])) if c), {}
  )
  data = cfg.get("data") or {}
  if "test_size" not in data or "test_resize" not in data:
    return None
  return int(data["test_size"]), str(data["test_resize"])


def recorded_transform(ckpt: Checkpoint) -> tuple[int | None, str | None]:
  """(test size, "aspect" | "squash") the checkpoint records (its ``input``), else what its
  training workdir's config.json says (checkpoints older than metadata format 2); None where
  neither says."""
  inp = ckpt.meta.get("input") or {}
  size, resize = inp.get("size"), inp.get("resize")
  if size is None or resize is None:
    run = run_transform(ckpt)
    if run is not None:
      size, resize = size or run[0], resize or run[1]
  return (int(size) if size is not None else None), (str(resize) if resize is not None else None)


def check_normalisation(ckpt: Checkpoint) -> None:
  """Refuses weights recorded with another input normalisation than the one predict applies."""
  inp = ckpt.meta.get("input") or {}
  for key, ours in (("mean", transforms.MEAN), ("std", transforms.STD)):
    if key in inp and not np.allclose(inp[key], ours, atol=1e-3):
      raise PredictInputError(
        f"checkpoint {ckpt.path} records input.{key} {inp[key]}, but predict normalises with "
        f"{[round(v, 3) for v in ours]}; these weights expect another preprocessing"
      )


# ---------------------------------------------------------------------------
# Host-side resizing back to the original size
# ---------------------------------------------------------------------------


def _axis_weights(
  out_size: int, in_size: int, keep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """align_corners=True source indices (i0, i1) and weight of i1 for the first ``keep``
  of ``out_size`` outputs (torch's rule, float32)."""
  scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
  src = np.minimum(np.arange(keep, dtype=np.float32) * scale, np.float32(in_size - 1))
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0.astype(np.float32))


def logits_to_original(logits: np.ndarray, hw: tuple[int, int], resize: str) -> np.ndarray:
  """[h, w, C] model logits -> [H, W, C] at the query's original size (host, float32).

  ``resize="squash"``: bilinear (align_corners=True) to (H, W) (§9.2).
  ``resize="aspect"``: bilinear to the padded square L x L, L = max(H, W), then the
  top-left H x W (§9.1, the evaluation's scoring rule).
  """
  h_out, w_out = int(hw[0]), int(hw[1])
  th, tw = (max(hw), max(hw)) if resize == "aspect" else (h_out, w_out)
  x = np.asarray(logits, np.float32)
  i0, i1, l1 = _axis_weights(th, x.shape[0], h_out)
  x = x[i0] * (1 - l1)[:, None, None] + x[i1] * l1[:, None, None]
  j0, j1, m1 = _axis_weights(tw, x.shape[1], w_out)
  return x[:, j0] * (1 - m1)[None, :, None] + x[:, j1] * m1[None, :, None]


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Support:
  """One support as the model sees it: uint8 RGB image [H, W, 3], mask 0/1/255 [H, W]."""

  image: np.ndarray
  mask: np.ndarray
  name: str
  image_path: str | None = None
  mask_path: str | None = None

  @property
  def foreground_fraction(self) -> float:
    return float(np.mean(self.mask == 1))


@dataclasses.dataclass
class Prediction:
  """The segmentation of one query at its original size.

  Attributes:
    name: display name (file stem, or ``image_<i>``).
    image: uint8 RGB [H, W, 3] query.
    mask: uint8 [H, W], 1 = predicted foreground.
    probability: float32 [H, W] probability of the foreground: 1 - softmax(logits)[bg], or
      the model's own foreground probability (clipped to [0, 1]) for a model whose output
      is probabilities (`ModelSpec.output`).
    foreground_fraction: mean of ``mask``.
    confidence: mean largest class probability over predicted-foreground pixels (None if none).
    confidence_all: the same over all pixels.
    path: the query file, when given as a path.
  """

  name: str
  image: np.ndarray
  mask: np.ndarray
  probability: np.ndarray
  foreground_fraction: float
  confidence: float | None
  confidence_all: float
  path: str | None = None

  def summary(self) -> dict:
    h, w = self.mask.shape
    return {
      "name": self.name,
      "image": self.path,
      "height": int(h),
      "width": int(w),
      "foreground_fraction": round(self.foreground_fraction, 6),
      "confidence": None if self.confidence is None else round(self.confidence, 6),
      "confidence_all": round(self.confidence_all, 6),
    }


def _shot_field(fields: Mapping[str, Any], make_model=None) -> tuple[str | None, Any]:
  """(name of the shot field, the shot count the weights were built for).

  A stored field wins; checkpoints converted from an official file store no fields
  (``"fields": {}``), then the factory's own ``shot`` parameter and its default are used,
  so that K supports build a K-shot module (and a model whose weights depend on K says so).
  """
  for k in ("shot", "shots"):
    if fields.get(k) is not None:
      return k, fields[k]
  if make_model is not None:
    try:
      param = inspect.signature(make_model).parameters.get("shot")
    except (TypeError, ValueError):
      param = None
    if param is not None and param.default is not inspect.Parameter.empty:
      return "shot", param.default
  return None, None


class Predictor:
  """Runs a registered model on user images (see the module docstring).

  Args:
    model: registered model name (``fss_jax.models.registry.names()``); None takes it
      from the checkpoint's metadata.
    checkpoint: converted checkpoint dir or training workdir.
    size: model input side (default: the one the checkpoint records, ``input.size``; a
      checkpoint that records none needs it).
    resize: "pad" (= "aspect", §9.1) or "squash" (§9.2) (default: the recorded one).
    batch_size: largest query batch per call of the compiled function.
    class_id: the supports' class, by id or name (a class of the dataset the checkpoint
      records); required by the models whose forward reads it
      (`ModelSpec.class_conditioned`: Sym-Net's word embedding), ignored by the others.
    fields: overrides of the model fields stored in the checkpoint.
    compute_dtype: "float32" (default) or "bfloat16" (`fss_jax.train.precision`).
    max_megapixels: largest image / mask file read (width x height, megapixels;
      checked from the file header before decoding); None or 0: no limit.
    warn: called with one-line warnings about the inputs (a JPEG mask); default:
      ``warning: ...`` on stderr.

  Attributes:
    traces: how many times the forward was traced (= compilations).
  """

  def __init__(
    self,
    model: str | None,
    checkpoint: str | os.PathLike,
    *,
    size: int | None = None,
    resize: str | None = None,
    batch_size: int = 4,
    class_id: int | str | None = None,
    fields: Mapping[str, Any] | None = None,
    compute_dtype: str = "float32",
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    warn: Callable[[str], None] = _print_warning,
  ):
    from fss_jax.models import registry

    try:
      precision.compute_dtype(compute_dtype)
    except ValueError as e:
      raise PredictInputError(str(e)) from None
    self.compute_dtype = compute_dtype
    self.ckpt = locate_checkpoint(checkpoint)
    where = self.ckpt.metadata_file or self.ckpt.path
    saved = self.ckpt.model
    if model is None and saved is None:
      raise PredictInputError(
        f"{where} does not name its model; pass --model ({', '.join(registry.names())})"
      )
    if model is not None and saved is not None and model != saved:
      raise PredictInputError(
        f"checkpoint {self.ckpt.path} holds weights of model {saved!r} (says {where}), not "
        f"{model!r}. Pass --model {saved}, or convert weights of {model} with `python -m "
        f"checkpoints.convert --model {model} --src <file.pth> --dst <dir>`."
      )
    model_name = model or saved
    assert model_name is not None  # both None raised above
    self.model_name = model_name
    self.spec = registry.get(self.model_name)
    self.fields = {**self.ckpt.fields, **dict(fields or {})}
    rsize, rresize = recorded_transform(self.ckpt)
    missing = [
      f"input.{k} (--{k})"
      for k, given, rec in (("size", size, rsize), ("resize", resize, rresize))
      if given is None and rec is None
    ]
    if missing:
      raise PredictInputError(
        f"checkpoint {self.ckpt.path} does not record {' or '.join(missing)}: the test transform "
        f"the model was trained for (converted without --dataset, or by an older version). Pass "
        f"--size and --resize, or convert it again with --dataset"
      )
    size = size or rsize
    assert size is not None  # both None is in `missing` above
    self.size = int(size)
    resize = resize or rresize
    check_normalisation(self.ckpt)
    self.output = self.spec.output
    if resize not in RESIZE_MODES:
      raise PredictInputError(f"resize must be one of pad, squash; got {resize!r}")
    self.resize = RESIZE_MODES[resize]
    if batch_size < 1:
      raise PredictInputError(f"batch size must be >= 1, got {batch_size}")
    self.batch_size = int(batch_size)
    self.class_id = self.resolve_class(class_id) if self.spec.class_conditioned else 0
    if max_megapixels is not None and max_megapixels < 0:
      raise PredictInputError(f"--max-pixels must be >= 0 (0: no limit), got {max_megapixels:g}")
    self.max_megapixels = max_megapixels
    self.warn = warn
    self.traces = 0
    self._loaded: dict | None = None
    self._models: dict[int, tuple[Any, dict, Any]] = {}  # shots -> (module, variables, jitted fn)

  def class_names(self) -> dict[int, str]:
    """{id: name} of the classes of the dataset the checkpoint records ({} when none)."""
    from fss_jax.data import splits

    recorded = (self.ckpt.meta.get("labels") or {}).get("classes")
    if recorded:
      return {int(k): str(v) for k, v in recorded.items()}
    dataset = self.ckpt.dataset or self.fields.get("dataset")
    return splits.class_names(dataset) if dataset else {}

  def resolve_class(self, value: int | str | None) -> int:
    """A class given by id or name -> its id (1..C of the checkpoint's dataset).

    Raises:
      PredictInputError: none given, or not a class of the dataset (the valid ones listed).
    """
    names = self.class_names()
    listing = ", ".join(f"{k} {v}" for k, v in sorted(names.items())) if names else "1..C"
    if value is None or str(value).strip() == "":
      raise PredictInputError(
        f"model {self.model_name} needs the class of the supports: pass "
        f"--class NAME or --class ID ({listing})"
      )
    text = str(value).strip()
    if text.isdigit():
      cid = int(text)
      if names and cid not in names or cid < 1:
        raise PredictInputError(
          f"--class {cid} is not a class id of this checkpoint's dataset; valid: {listing}"
        )
      return cid
    by_name = {v.lower(): k for k, v in names.items()}
    if text.lower() not in by_name:
      raise PredictInputError(
        f"--class {text!r} is not a class of this checkpoint's dataset; valid: {listing}"
      )
    return by_name[text.lower()]

  # -- model for K shots ----------------------------------------------------------------------

  def _read_weights(self) -> dict:
    from fss_jax.train import state as state_lib

    if self._loaded is None:
      try:
        self._loaded = state_lib.read_variables(self.ckpt.weights_dir)
      except FileNotFoundError as e:
        raise PredictInputError(str(e)) from None
      except Exception as e:  # orbax raises many types
        raise PredictInputError(
          f"cannot read the weights in {self.ckpt.weights_dir} "
          f"({type(e).__name__}: {e}); the checkpoint is incomplete or "
          f"corrupt: convert / copy it again"
        ) from None
    return self._loaded

  def _build(self, shots: int):
    """(module, variables, jitted forward) for ``shots`` supports."""
    if shots in self._models:
      return self._models[shots]
    import jax

    from fss_jax.train import state as state_lib

    fields = dict(self.fields)
    key, built_for = _shot_field(fields, self.spec.make_model)
    if key and built_for != shots:
      fields[key] = shots
    try:
      module = self.spec.make_model(**fields)
    except TypeError as e:
      raise PredictInputError(
        f"the model fields stored with {self.ckpt.path} do not fit model {self.model_name!r}: {e}"
      ) from None
    example = self._episode(
      np.zeros((1, self.size, self.size, 3), np.float32),
      np.zeros((1, shots, self.size, self.size, 3), np.float32),
      np.zeros((1, shots, self.size, self.size), np.int32),
    )
    target = jax.eval_shape(
      lambda k: state_lib.init_variables(module, example, k), jax.random.PRNGKey(0)
    )
    try:
      merged = state_lib.merge_variables(
        target, self._read_weights(), source=f"weights in {self.ckpt.weights_dir}"
      )
    except state_lib.InitMismatchError as e:
      if built_for is not None and built_for != shots:
        raise PredictInputError(
          f"checkpoint {self.ckpt.path} is a {built_for}-shot model ({key}={built_for}) whose "
          f"weights depend on the shot count; pass exactly {built_for} --support, or use a "
          f"{shots}-shot checkpoint"
        ) from None
      raise PredictInputError(f"{e}") from None
    variables = {"params": merged["params"]}
    if merged.get("batch_stats"):
      variables["batch_stats"] = merged["batch_stats"]
    variables = jax.device_put(variables)

    def forward(v, episode):
      self.traces += 1  # runs once per trace (= compilation)
      out = precision.apply(module, v, episode, dtype=self.compute_dtype, train=False)
      return jax.numpy.asarray(out["logits"], jax.numpy.float32)

    entry = (module, variables, jax.jit(forward))
    self._models[shots] = entry
    return entry

  def _episode(self, query, s_img, s_msk) -> dict[str, np.ndarray]:
    b = query.shape[0]
    return {
      "query_image": query,
      "query_mask": np.full(query.shape[:3], IGNORE, np.int32),  # unknown
      "support_images": np.repeat(s_img, b, axis=0) if s_img.shape[0] != b else s_img,
      "support_masks": np.repeat(s_msk, b, axis=0) if s_msk.shape[0] != b else s_msk,
      "class_id": np.full((b,), self.class_id, np.int32),
    }

  # -- preprocessing --------------------------------------------------------------------------

  def _resize_op(self):
    if self.resize == "aspect":
      return transforms.AspectResizePad(size=self.size)
    return transforms.SquashResize(size=(self.size, self.size))

  def preprocess(
    self, image: np.ndarray, mask: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB [H, W, 3] (+ mask [H, W]) -> normalised f32 [S, S, 3], mask int32 [S, S]."""
    if mask is None:
      mask = np.zeros(image.shape[:2], np.uint8)
    img, (msk,) = self._resize_op().apply(image.astype(np.float32), [np.asarray(mask, np.uint8)])
    img, _ = transforms.Normalize().apply(img, [msk])
    return img, msk.astype(np.int32)

  def _load(self, item: Any, kind: str, index: int, what: str):
    return _load(item, kind, index, what=what, max_megapixels=self.max_megapixels, warn=self.warn)

  def load_supports(
    self, support_images: Sequence[Any], support_masks: Sequence[Any]
  ) -> list[Support]:
    """Reads / checks the supports (paths or arrays) -> `Support` list.

    Raises:
      PredictInputError: no supports, counts differ, unreadable file, size mismatch,
        empty mask.
    """
    if len(support_images) == 0:
      raise PredictInputError("give at least one support (--support IMAGE:MASK)")
    if len(support_images) != len(support_masks):
      raise PredictInputError(
        f"{len(support_images)} support images but {len(support_masks)} masks"
      )
    out = []
    for k, (im, mk) in enumerate(zip(support_images, support_masks)):
      image, name, ipath = self._load(im, "image", k, "support image")
      mask, mname, mpath = self._load(mk, "mask", k, "support mask")
      iname, mname = ipath or f"support image {k}", mpath or f"support mask {k}"
      if mask.shape != image.shape[:2]:
        raise PredictInputError(
          f"mask {mname} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {iname} is "
          f"{image.shape[1]}x{image.shape[0]}; give the mask made for that image (same size), "
          f"or resize it with nearest-neighbour interpolation"
        )
      if not np.any(mask == 1):
        raise PredictInputError(
          f"mask {mname} has no foreground pixel (all background or ignore); mark the object "
          f"in {iname} with non-zero pixels"
        )
      out.append(Support(image, mask, name, ipath, mpath))
    return out

  # -- inference ----------------------------------------------------------------------------

  def segment(
    self, support_images: Sequence[Any], support_masks: Sequence[Any], queries: Sequence[Any]
  ) -> list[Prediction]:
    """Segments every query with the K supports.

    Args:
      support_images: K images (paths, or uint8 RGB arrays [h, w, 3] of any size).
      support_masks: K masks (paths, or [h, w] arrays; non-zero = foreground, see the
        module docstring for 255). Ignored when ``support_images`` are `Support`s
        (the result of `load_supports`).
      queries: images (paths or arrays) of any sizes.

    Returns:
      One `Prediction` per query, at the query's original size.
    """
    if len(support_images) and all(isinstance(s, Support) for s in support_images):
      supports = list(support_images)  # from `load_supports`
    else:
      supports = self.load_supports(support_images, support_masks)
    items = [self._load(q, "image", i, "query image") for i, q in enumerate(queries)]
    if not items:
      raise PredictInputError("give at least one query image (--query IMAGE)")
    k = len(supports)
    _, variables, fn = self._build(k)
    pre = [self.preprocess(s.image, s.mask) for s in supports]
    s_img = np.stack([p[0] for p in pre])[None]  # [1, K, S, S, 3]
    s_msk = np.stack([p[1] for p in pre])[None]  # [1, K, S, S]
    n = len(items)
    bucket = min(self.batch_size, 1 << max(0, math.ceil(math.log2(n))))
    results = []
    for start in range(0, n, bucket):
      chunk = items[start : start + bucket]
      q = np.stack([self.preprocess(img)[0] for img, _, _ in chunk])
      if len(chunk) < bucket:
        q = np.concatenate([q, np.repeat(q[-1:], bucket - len(chunk), axis=0)])
      logits = np.asarray(fn(variables, self._episode(q, s_img, s_msk)))
      for (img, name, path), lg in zip(chunk, logits):
        results.append(self._postprocess(img, name, path, lg))
    return results

  def _postprocess(self, image, name, path, logits) -> Prediction:
    if not np.all(np.isfinite(logits)):
      raise PredictInputError(
        f"model {self.model_name} produced NaN/Inf scores for query {path or name} with the "
        f"weights in {self.ckpt.weights_dir}; the checkpoint is broken (e.g. negative BatchNorm "
        f"variances or a diverged training run): use another checkpoint"
      )
    full = logits_to_original(logits, image.shape[:2], self.resize)
    if self.output == "probabilities":  # already probability-like (ModelSpec.output): no softmax
      probs = np.clip(full, 0.0, 1.0)
      foreground = np.clip(full[..., 1:].sum(axis=-1), 0.0, 1.0)
    else:
      probs = _softmax(full)
      foreground = 1.0 - probs[..., 0]
    pred = np.argmax(full, axis=-1)
    mask = (pred != 0).astype(np.uint8)
    top = probs.max(axis=-1)
    fg = mask.astype(bool)
    return Prediction(
      name=name,
      image=image,
      mask=mask,
      probability=foreground.astype(np.float32),
      foreground_fraction=float(fg.mean()),
      confidence=float(top[fg].mean()) if fg.any() else None,
      confidence_all=float(top.mean()),
      path=path,
    )


# ---------------------------------------------------------------------------
# Writing outputs
# ---------------------------------------------------------------------------


def _mask_png(mask: np.ndarray) -> bytes:
  """uint8 [H, W] 0/1 -> palette PNG bytes (0 black, 1 red)."""
  import io as io_lib

  from PIL import Image

  im = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
  im.putpalette([0, 0, 0, *visualize.PRED_COLOR] + [0, 0, 0] * 254)
  buf = io_lib.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def _unique_names(names: Sequence[str]) -> list[str]:
  safe = ["".join(c if c.isalnum() or c in "-_." else "_" for c in n) or "image" for n in names]
  if len(set(safe)) == len(safe):
    return safe
  return [f"{i:02d}_{n}" for i, n in enumerate(safe)]


def output_files(supports: Sequence[Support], predictions_or_names: Sequence[Any]) -> dict:
  """{"queries": [(mask, overlay, panel file)], "supports": [overlay file], "json": name}."""
  qnames = [p.name if isinstance(p, Prediction) else str(p) for p in predictions_or_names]
  q = _unique_names(qnames)
  s = _unique_names([s.name for s in supports])
  s_files = {f"support{k}_{n}_overlay.png" for k, n in enumerate(s)}
  if any(f"{n}_overlay.png" in s_files for n in q):  # a query named like a support overlay
    q = [f"query{i}_{n}" for i, n in enumerate(q)]
  return {
    "queries": [(f"{n}_mask.png", f"{n}_overlay.png", f"{n}_panel.png") for n in q],
    "supports": [f"support{k}_{n}_overlay.png" for k, n in enumerate(s)],
    "json": "predictions.json",
  }


def check_outputs(out_dir: str | os.PathLike, files: Mapping[str, Any], *, overwrite: bool) -> None:
  """Raises PredictInputError listing output files that exist (unless ``overwrite``)."""
  out = fss_io.user_path(out_dir)
  if out.exists() and not out.is_dir():
    raise PredictInputError(f"--out {out} is a file, not a folder; choose a folder")
  names = [n for pair in files["queries"] for n in pair] + list(files["supports"]) + [files["json"]]
  existing = [n for n in names if (out / n).exists()]
  if existing and not overwrite:
    shown = ", ".join(existing[:8]) + (
      f" and {len(existing) - 8} more" if len(existing) > 8 else ""
    )
    raise PredictInputError(
      f"{out} already has {shown}; pass --overwrite to replace them or choose another --out folder"
    )


def _captioned(image: np.ndarray, text: str) -> np.ndarray:
  """``image`` under a white band naming it, as the tiles of `visualize.episode_panel`."""
  band = visualize.caption(text, image.shape[1], visualize.caption_height(image.shape[0]))
  return np.concatenate([band, image], axis=0)


def query_overlay(prediction: Prediction) -> np.ndarray:
  """uint8 [caption + H, W, 3]: "prediction" above the query with the predicted region
  outlined in red (`visualize.outline`; the pixels inside keep their colours)."""
  return _captioned(
    visualize.outline(prediction.image, prediction.mask, visualize.PRED_COLOR), "prediction"
  )


def support_overlay(support: Support, text: str = "support") -> np.ndarray:
  """uint8 [caption + H, W, 3]: ``text`` above the support with its mask outlined in green
  (ignore pixels grey)."""
  return _captioned(
    visualize.outline(
      support.image, support.mask, visualize.SUPPORT_COLOR, ignore_color=visualize.IGNORE_COLOR
    ),
    text,
  )


def prediction_panel(supports: Sequence[Support], prediction: Prediction) -> np.ndarray:
  """One captioned row ``support 1 .. support K | prediction`` at the query's height."""
  return visualize.episode_panel(
    prediction.image, [s.image for s in supports], [s.mask for s in supports], prediction.mask
  )


def write_outputs(
  predictor: Predictor,
  supports: Sequence[Support],
  predictions: Sequence[Prediction],
  out_dir: str | os.PathLike,
  *,
  overwrite: bool = False,
) -> epath.Path:
  """Writes masks, overlays and ``predictions.json`` to ``out_dir``; returns the json path.

  Every file goes through a temporary file + rename; nothing is replaced unless
  ``overwrite``.
  """
  out = fss_io.user_path(out_dir)
  files = output_files(supports, predictions)
  check_outputs(out, files, overwrite=overwrite)
  out.mkdir(parents=True, exist_ok=True)
  s_rows = []
  captions = visualize.panel_captions(len(supports), with_target=False)
  for s, name, text in zip(supports, files["supports"], captions):
    visualize.write_png(out / name, support_overlay(s, text), overwrite=overwrite)
    s_rows.append(
      {
        "image": s.image_path,
        "mask": s.mask_path,
        "overlay": name,
        "height": int(s.mask.shape[0]),
        "width": int(s.mask.shape[1]),
        "foreground_fraction": round(s.foreground_fraction, 6),
      }
    )
  q_rows = []
  for p, (mask_name, ov_name, panel_name) in zip(predictions, files["queries"]):
    fss_io.atomic_write(out / mask_name, _mask_png(p.mask), overwrite=overwrite)
    visualize.write_png(out / ov_name, query_overlay(p), overwrite=overwrite)
    visualize.write_png(out / panel_name, prediction_panel(supports, p), overwrite=overwrite)
    q_rows.append({**p.summary(), "mask": mask_name, "overlay": ov_name, "panel": panel_name})
  ck = predictor.ckpt
  doc = {
    "model": predictor.model_name,
    "fields": predictor.fields,
    "checkpoint": os.fspath(ck.path),
    "checkpoint_kind": ck.kind,
    "checkpoint_step": ck.step,
    "trained_on": None if ck.fold is None else {"dataset": ck.dataset, "fold": ck.fold},
    "input_size": predictor.size,
    "resize": "pad" if predictor.resize == "aspect" else predictor.resize,
    "shots": len(supports),
    "mask_png": "palette PNG: index 0 background, 1 foreground",
    "confidence": CONFIDENCE,
    "supports": s_rows,
    "queries": q_rows,
  }
  data = (json.dumps(doc, indent=1, default=str) + "\n").encode()
  return fss_io.atomic_write(out / files["json"], data, overwrite=overwrite)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parse_support(text: str) -> tuple[str, str]:
  """ "IMAGE:MASK" -> (IMAGE, MASK): the last ':' that is not the one of a ``gs://`` scheme."""
  seps = [i for i, c in enumerate(text) if c == ":" and not text.startswith("//", i + 1)]
  if not seps:
    raise PredictInputError(f"--support expects IMAGE:MASK, got {text!r}")
  image, mask = text[: seps[-1]], text[seps[-1] + 1 :]
  if not image or not mask:
    raise PredictInputError(f"--support expects IMAGE:MASK, got {text!r}")
  return image, mask


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m fss_jax.predict",
    description="Segment the object of the support masks in query images.",
  )
  p.add_argument(
    "--model", default=None, help="registered model name (default: from the checkpoint)"
  )
  p.add_argument("--checkpoint", required=True, help="converted checkpoint dir or training workdir")
  p.add_argument(
    "--support",
    action="append",
    required=True,
    metavar="IMAGE:MASK",
    help="a support image and its mask; repeat for K shots",
  )
  p.add_argument("--query", nargs="+", required=True, metavar="IMAGE", help="query images")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--size", type=int, default=None, help="model input side (default: the config's)")
  p.add_argument(
    "--resize",
    choices=("pad", "squash"),
    default=None,
    help="pad: aspect-preserving + zero pad (§9.1); squash: plain resize (§9.2)",
  )
  p.add_argument("--batch-size", type=int, default=4, help="queries per forward call")
  p.add_argument(
    "--class",
    "--class-id",
    dest="class_",
    default=None,
    metavar="NAME_OR_ID",
    help="the supports' class, by name or id (Sym-Net reads it: required there)",
  )
  p.add_argument(
    "--compute-dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="bfloat16: bf16 compute with float32 weights (faster on GPU/TPU)",
  )
  p.add_argument(
    "--max-pixels",
    type=float,
    default=DEFAULT_MAX_MEGAPIXELS,
    metavar="MEGAPIXELS",
    help="largest image or mask read, width x height in megapixels, checked from the "
    "file header before decoding (default %(default)g; 0: no limit)",
  )
  p.add_argument("--overwrite", action="store_true", help="replace existing output files")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from fss_jax.models import registry

  try:
    pairs = [_parse_support(s) for s in args.support]
    predictor = Predictor(
      args.model,
      args.checkpoint,
      size=args.size,
      resize=args.resize,
      batch_size=args.batch_size,
      class_id=args.class_,
      compute_dtype=args.compute_dtype,
      max_megapixels=args.max_pixels,
    )
    supports = predictor.load_supports([a for a, _ in pairs], [b for _, b in pairs])
    # Refuse existing outputs before the (slow) model run.
    check_outputs(
      args.out,
      output_files(supports, [fss_io.user_path(q).stem for q in args.query]),
      overwrite=args.overwrite,
    )
    preds = predictor.segment(supports, (), args.query)  # masks are in `supports`
    path = write_outputs(predictor, supports, preds, args.out, overwrite=args.overwrite)
  except (PredictInputError, registry.UnsupportedModelError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in preds:
    conf = "n/a" if p.confidence is None else f"{p.confidence:.3f}"
    print(f"{p.path}: foreground {100 * p.foreground_fraction:.1f}%, confidence {conf}")
  print(checkpoint_line(predictor.ckpt, predictor.model_name))
  print(f"wrote {len(preds)} prediction(s) to {path.parent} ({path.name})")
  return 0


def checkpoint_line(ckpt: Checkpoint, model: str) -> str:
  """ "checkpoint DIR: sccan trained on pascal5i fold 0 (...)", or that the fold is unknown."""
  trained = ckpt.trained_on()
  if trained is None:
    how = (
      "convert it again with --dataset and --fold"
      if ckpt.kind == "converted"
      else "its metadata is older than the fold record"
    )
    return (
      f"checkpoint {ckpt.path}: {model}, fold not recorded ({how}); a class is new to the "
      f"model only if it is in the test split of the fold it was trained on"
    )
  return (
    f"checkpoint {ckpt.path}: {model} trained on {trained}; the classes of that fold's "
    f"test split are new to it, the others were its training classes"
  )


if __name__ == "__main__":
  sys.exit(main())
