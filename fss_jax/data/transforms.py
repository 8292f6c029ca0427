"""Episode transforms: small named grain ops (data_protocol.md §8 training, §9 test).

Every op maps one *episode element* (a dict, before batching) and moves images and
their labels together::

  query_image        f32 [H, W, 3]   RGB in 0..255 until `Normalize`
  query_mask         u8  [H, W]      0 / 1 / 255 (N-way: 0..N / 255)
  query_base_label   u8  [H, W]      optional: base classes 1..|base|, novel 0, 255 kept (§6)
  support_images     list of f32 [h, w, 3]   (way-major: way 0 shots 0..K-1, way 1 ...)
  support_masks      list of u8 [h, w]       0 / 1 / 255
  ... scalars (class_id, class_index, episode_index) pass through untouched.

The query and its labels share one set of random draws; each support draws its own
(independently, from the same Generator, after the query). Random ops are
``grain.transforms.RandomMap`` (``op.random_map(ep, rng)``), deterministic ones
``grain.transforms.Map`` (``op.map(ep)``), so they run the same directly and inside a
grain pipeline (``ds.random_map(op)`` / ``ds.map(op)``). A random op separates its
random numbers from their use, per image group: ``params = op.draw(rng, labels)``,
``op.apply(image, labels, params)``; ``random_map`` is apply(draw) on the query group,
then on each support.

All arithmetic follows the reference (OpenCV on float32 images, no uint8 rounding;
PANet's PIL resize on uint8):

* training (§8): `RandScale` -> `RandRotate` -> `RandomGaussianBlur` ->
  `RandomHorizontalFlip` -> `RandomCrop` (PFENet/BAM/SCCAN) or `SquashResize`
  (HDMNet) -> `Normalize` -> `ToArrays`; PANet: `SquashResize` (PIL) -> flip; SSP:
  `RandomCrop` (bottom/right zero padding, one draw) -> flip;
* test (§9): `KeepOriginalLabel` -> `AspectResizePad` (§9.1) or `SquashResize` (§9.2)
  -> `Normalize` -> `ToArrays`.

Use `train_ops` / `test_ops` to get these chains and `batch_episodes` to stack
episodes into a batch. The loaders run the chains through `fused_ops`: its last op
leaves each image as a `Paste` that `batch_episodes` normalises straight into the batch
(a crop reads the unpadded image), with the same numbers and uint8 labels.

Official behaviour reproduced (tests/test_augment_official.py replays the official
code's draws: SCCAN's ``util/transform*.py`` = BAM's, PAHNet's, Sym-Net's; HDMNet's;
PANet's ``dataloaders/transforms.py``; SSP's ``dataset/transform.py``):

* probabilities are ``u < p`` (u = 0.5 neither rotates, blurs nor flips); RandRotate
  draws the angle only when it rotates (1 or 2 numbers);
* the official ``SemData`` runs the whole chain on the query, then on each support;
  our ops run one op over the episode, then the next: each (image, op) gets its own
  draws either way, only their interleaving in the one stream differs;
* RandScale: one factor for both axes, output size rounded by OpenCV;
* RandRotate: centre (W/2, H/2), not ((W-1)/2, (H-1)/2); image INTER_LINEAR with the
  mean colour, labels INTER_NEAREST with 255 (BORDER_CONSTANT);
* blur: ``cv2.GaussianBlur(image, (5, 5), 0)`` (the official ``radius`` is the kernel
  size): OpenCV's fixed [1, 4, 6, 4, 1] / 16 kernel, reflect-101 border, image only;
  probability 0.5 hard-coded there;
* crop: symmetric padding (top ⌊pad/2⌋) with the mean colour / 255; top offset drawn
  before left, ``randint`` inclusive; 85 % rule on the label-1 pixels of the padded
  mask, at most 31 redraws, the last kept; no label-1 pixel: the first draw is kept;
* test resize (§9.1): zero canvas (not the mean), sides floored to multiples of 8;
* PANet: PIL (uint8) bilinear with antialiasing and PIL nearest for labels, resize
  before the mirror;
* SSP: pad bottom/right only, image 0 (black), labels 255; one draw, no 85 % rule;
  crop before the flip (SSP draws the left offset before the top one, ours top first:
  the same distribution).

Official quirks not reproduced: Crop's final ``cv2.resize`` to size[0] x size[0] when
the output is not that shape (non-square crops only) and its dead ``crop_cnt >= 50``
branch; HDMNet's ``Resize`` passing (h, w) as OpenCV's (w, h) (transposes non-square
sizes); the unused centre crop. Every config here uses square sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import cast

import cv2
import grain
import numpy as np
from grain.multiprocessing import SharedMemoryArray
from PIL import Image

IGNORE = 255
# ImageNet statistics x 255, computed as the reference does (Python doubles, RGB).
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_LABELS = ("query_mask", "query_base_label")


# -- group plumbing -------------------------------------------------------------------


def _apply(
  ep: dict, fn: Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]
) -> dict:
  """Applies ``fn(image, labels) -> (image, labels)`` to the query group, then to each
  support; ``labels[0]`` is always the (binary) mask. Returns a new dict."""
  out = dict(ep)
  keys = [k for k in _LABELS if k in ep]
  image, labels = fn(ep["query_image"], [ep[k] for k in keys])
  out["query_image"] = image
  out.update(zip(keys, labels))
  if "support_images" in ep:
    s_img, s_msk = [], []
    for image, mask in zip(ep["support_images"], ep["support_masks"]):
      image, (mask,) = fn(image, [mask])
      s_img.append(image)
      s_msk.append(mask)
    out["support_images"], out["support_masks"] = s_img, s_msk
  return out


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


# -- training augmentation (§8) ---------------------------------------------------------


class _GroupRandomMap(grain.transforms.RandomMap):
  """A random op split into ``draw`` (the random numbers, per group) and ``apply``
  (deterministic given them); ``random_map`` runs ``apply(draw)`` on the query group,
  then on each support, all from the one Generator (in that order)."""

  def draw(self, rng, labels: list[np.ndarray]) -> dict:
    """The op's random parameters for one group (``labels[0]`` the mask, [H, W])."""
    raise NotImplementedError

  def apply(self, image: np.ndarray, labels: list[np.ndarray], params: dict):
    """[H, W, 3] image and [H, W] labels -> the transformed pair, given ``params``."""
    raise NotImplementedError

  def random_map(self, ep, rng):
    return _apply(ep, lambda i, l: self.apply(i, l, self.draw(rng, l)))


@dataclasses.dataclass(frozen=True)
class RandScale(_GroupRandomMap):
  """§8.1: s = lo + (hi - lo)·u; ``cv2.resize(fx=fy=s)``, image bilinear, labels nearest."""

  scale: tuple[float, float] = (0.9, 1.1)

  def __post_init__(self):
    lo, hi = self.scale
    if not 0 < lo < hi:
      raise ValueError(f"RandScale needs 0 < scale_min < scale_max, got {self.scale}")

  def draw(self, rng, labels):
    lo, hi = self.scale
    return {"scale": lo + (hi - lo) * rng.random()}

  def apply(self, image, labels, params):
    s = params["scale"]
    image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    labels = [cv2.resize(l, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST) for l in labels]
    return image, labels


@dataclasses.dataclass(frozen=True)
class RandRotate(_GroupRandomMap):
  """§8.2: with probability p (``u < p``, then a second draw for the angle) rotate by
  lo + (hi - lo)·u degrees about (W/2, H/2); image bilinear with the mean-colour
  border, labels nearest with 255."""

  angle: tuple[float, float] = (-10.0, 10.0)
  p: float = 0.5
  border: tuple[float, float, float] = MEAN
  ignore_label: int = IGNORE

  def draw(self, rng, labels):
    if rng.random() < self.p:
      lo, hi = self.angle
      return {"angle": lo + (hi - lo) * rng.random()}
    return {"angle": None}

  def apply(self, image, labels, params):
    if params["angle"] is None:
      return image, labels
    h, w = labels[0].shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), params["angle"], 1)
    image = cv2.warpAffine(
      image,
      m,
      (w, h),
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=self.border,
    )
    labels = [
      cv2.warpAffine(
        l,
        m,
        (w, h),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=self.ignore_label,
      )
      for l in labels
    ]
    return image, labels


@dataclasses.dataclass(frozen=True)
class RandomGaussianBlur(_GroupRandomMap):
  """§8.3: with probability p, ``cv2.GaussianBlur(image, (k, k), 0)``, image only (for
  k = 5 OpenCV's fixed kernel [1, 4, 6, 4, 1] / 16, reflect-101 border)."""

  ksize: int = 5
  p: float = 0.5

  def draw(self, rng, labels):
    return {"blur": bool(rng.random() < self.p)}

  def apply(self, image, labels, params):
    if params["blur"]:
      image = cv2.GaussianBlur(image, (self.ksize, self.ksize), 0)
    return image, labels


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(_GroupRandomMap):
  """§8.4: with probability p (``u < p``) mirror image and labels."""

  p: float = 0.5

  def draw(self, rng, labels):
    return {"flip": bool(rng.random() < self.p)}

  def apply(self, image, labels, params):
    if params["flip"]:
      image = cv2.flip(image, 1)
      labels = [cv2.flip(l, 1) for l in labels]
    return image, labels


def _pads(shape: tuple[int, ...], size: tuple[int, int], where: str) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) padding of an [h, w] array up to ``size``."""
  ph, pw = max(size[0] - shape[0], 0), max(size[1] - shape[1], 0)
  if where == "center":
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
  if where == "end":
    return 0, ph, 0, pw
  raise ValueError(f"pad must be 'center' or 'end', got {where!r}")


def pad_to(
  image: np.ndarray,
  labels: list[np.ndarray],
  size: tuple[int, int],
  *,
  value: Sequence[float] = MEAN,
  ignore_label: int = IGNORE,
  where: str = "center",
):
  """Pads up to ``size``: image with ``value``, labels with ``ignore_label``.
  [H, W, 3] -> [≥h, ≥w, 3]. ``where="center"`` (PFENet): top = ⌊pad/2⌋, bottom = the rest,
  same for left/right; ``"end"`` (SSP): bottom and right only."""
  t, b, l, r = _pads(labels[0].shape, size, where)
  if t == b == l == r == 0:
    return image, labels
  args = (t, b, l, r, cv2.BORDER_CONSTANT)
  image = cv2.copyMakeBorder(image, *args, value=tuple(value))
  labels = [cv2.copyMakeBorder(x, *args, value=ignore_label) for x in labels]
  return image, labels


@dataclasses.dataclass(frozen=True)
class RandomCrop(_GroupRandomMap):
  """A uniform random crop to ``size`` after padding up to it (image ``pad_value``,
  labels ``ignore_label``); offsets are inclusive integer ranges, top drawn first.

  §8.5 (PFENet/BAM/SCCAN, the defaults): symmetric padding with the mean colour; if a
  crop keeps fewer than ``min_keep`` of the label-1 pixels of the padded label, redraw
  up to ``retries`` more times, keeping the last. SSP: ``pad="end"`` (bottom/right),
  ``pad_value=(0, 0, 0)``, ``retries=0`` (one draw).
  """

  size: tuple[int, int] = (473, 473)
  pad_value: tuple[float, float, float] = MEAN
  ignore_label: int = IGNORE
  min_keep: float = 0.85
  retries: int = 31
  pad: str = "center"

  def offsets(self, labels0: np.ndarray, rng) -> tuple[int, int]:
    """The (top, left) offset the retry rule settles on for the padded label ``labels0``."""
    ch, cw = _size_hw(self.size)
    h, w = labels0.shape
    raw_pos = np.count_nonzero(labels0 == 1)
    for attempt in range(self.retries + 1):
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      if attempt == self.retries:
        break
      if (
        np.count_nonzero(labels0[top : top + ch, left : left + cw] == 1) >= self.min_keep * raw_pos
      ):
        break
    return top, left

  def draw(self, rng, labels):
    t, b, l, r = _pads(labels[0].shape, _size_hw(self.size), self.pad)
    label0 = labels[0]
    if t or b or l or r:
      label0 = cv2.copyMakeBorder(label0, t, b, l, r, cv2.BORDER_CONSTANT, value=self.ignore_label)
    top, left = self.offsets(label0, rng)
    return {"top": top, "left": left}

  def window(self, shape: tuple[int, ...], params: dict) -> tuple[slice, slice, int, int]:
    """Where the crop of an [h, w] input comes from, without padding it: (rows, cols) of the
    input and their (top, left) in the crop; the rest of the crop is padding."""
    ch, cw = _size_hw(self.size)
    pt, _, pl, _ = _pads(shape, (ch, cw), self.pad)
    top, left = params["top"], params["left"]  # in padded coordinates
    r0, c0 = max(top, pt), max(left, pl)
    r1, c1 = min(top + ch, pt + shape[0]), min(left + cw, pl + shape[1])
    return slice(r0 - pt, r1 - pt), slice(c0 - pl, c1 - pl), r0 - top, c0 - left

  def apply(self, image, labels, params):
    ch, cw = _size_hw(self.size)
    image, labels = pad_to(
      image, labels, (ch, cw), value=self.pad_value, ignore_label=self.ignore_label, where=self.pad
    )
    top, left = params["top"], params["left"]
    image = image[top : top + ch, left : left + cw]
    labels = [l[top : top + ch, left : left + cw] for l in labels]
    return image, labels


# -- deterministic resizes (§8.5 HDMNet, §9) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class SquashResize(grain.transforms.Map):
  """§8.5 HDMNet / §9.2: resize to ``size`` ignoring the aspect ratio.

  ``backend="cv2"`` (HDMNet, PAHNet): ``cv2.resize``, image bilinear, labels nearest
  (source pixel ⌊x·in/out⌋). ``backend="pil"`` (PANet's torchvision ``Resize`` of PIL
  images): the image as uint8 RGB (rounded; PANet's images are uint8 throughout)
  through PIL's bilinear, which widens its triangle filter by the reduction factor when
  shrinking (antialiasing) and rounds after each pass; labels PIL nearest (source pixel
  ⌊(x + 0.5)·in/out⌋). Both return float32 images.
  """

  size: tuple[int, int] = (473, 473)
  backend: str = "cv2"

  def __post_init__(self):
    if self.backend not in ("cv2", "pil"):
      raise ValueError(f"SquashResize backend must be 'cv2' or 'pil', got {self.backend!r}")

  def apply(self, image, labels):
    h, w = _size_hw(self.size)
    if self.backend == "pil":
      rgb = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
      image = np.array(rgb.resize((w, h), Image.Resampling.BILINEAR), np.float32)
      labels = [
        np.array(Image.fromarray(l).resize((w, h), Image.Resampling.NEAREST)) for l in labels
      ]
      return image, labels
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    labels = [cv2.resize(l, (w, h), interpolation=cv2.INTER_NEAREST) for l in labels]
    return image, labels

  def map(self, ep):
    return _apply(ep, self.apply)


def aspect_size(h: int, w: int, size: int) -> tuple[int, int]:
  """§9.1 content size: long side -> ``size``, short side ⌊short·size/long⌋, then each
  side not a multiple of 8 floored to one (500×375 at 473 -> (352, 472))."""
  if h >= w:
    new_h, new_w = size, int(w * (size * 1.0 / h))
  else:
    new_h, new_w = int(h * (size * 1.0 / w)), size
  return (new_h // 8) * 8, (new_w // 8) * 8


@dataclasses.dataclass(frozen=True)
class AspectResizePad(grain.transforms.Map):
  """§9.1 (PFENet/BAM/SCCAN test): resize to `aspect_size` (image bilinear, labels
  nearest) and paste top-left into a size×size canvas of zeros (image) / 255 (labels)."""

  size: int = 473
  ignore_label: int = IGNORE

  def resize(self, image, labels):
    """The content pasted top-left: [H, W, 3] -> [nh, nw, 3] (`aspect_size`), labels too."""
    nh, nw = aspect_size(*labels[0].shape, int(self.size))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    labels = [cv2.resize(l, (nw, nh), interpolation=cv2.INTER_NEAREST) for l in labels]
    return image, labels

  def apply(self, image, labels):
    s = int(self.size)
    image, labels = self.resize(image, labels)
    nh, nw = labels[0].shape
    canvas = np.zeros((s, s, 3), np.float32)
    canvas[:nh, :nw] = image
    out = []
    for l in labels:
      c = np.full((s, s), self.ignore_label, l.dtype)
      c[:nh, :nw] = l
      out.append(c)
    return canvas, out

  def map(self, ep):
    return _apply(ep, self.apply)


def pad_label(
  label: np.ndarray, bucket: tuple[int, int], *, value: int = IGNORE, what: str = "label"
) -> np.ndarray:
  """[h, w] -> [Hb, Wb] padded bottom/right with ``value``; ValueError if it does not fit."""
  hb, wb = bucket
  h, w = label.shape
  if h > hb or w > wb:
    raise ValueError(
      f"{what} is {h}x{w}, larger than the label bucket {hb}x{wb}; raise the eval "
      f"label bucket (EpisodeConfig.label_bucket) to at least {max(h, w)}"
    )
  out = np.full((hb, wb), value, label.dtype)
  out[:h, :w] = label
  return out


@dataclasses.dataclass(frozen=True)
class KeepOriginalLabel(grain.transforms.Map):
  """Test (§7.1.10, §9): keeps the untransformed query mask for scoring at the original
  resolution: ``label_original`` u8 [Hb, Wb] (255-padded) and ``label_size`` i32 [2]
  (true h, w); also ``query_base_label_original`` when a base label is present.
  Run it before any resize."""

  bucket: tuple[int, int] = (512, 512)

  def map(self, ep):
    out = dict(ep)
    mask = ep["query_mask"]
    what = f"query image {ep.get('query_id', '')!s}".strip()
    out["label_original"] = pad_label(mask, _size_hw(self.bucket), what=what)
    out["label_size"] = np.asarray(mask.shape, np.int32)
    if "query_base_label" in ep:
      out["query_base_label_original"] = pad_label(
        ep["query_base_label"], _size_hw(self.bucket), what=what
      )
    return out


# -- normalisation and output arrays ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """§8.6: (x - mean) / std per RGB channel in float32 (bit-exact with torch's
  ``sub_(m).div_(s)`` on float32 tensors)."""

  mean: tuple[float, float, float] = MEAN
  std: tuple[float, float, float] = STD

  def write(self, image: np.ndarray, out: np.ndarray) -> None:
    """Normalises ``image`` [h, w, 3] into ``out``: float32 [h, w, 3], e.g. a window of a
    batch row (its rows may be strided, each row's w·3 values must be contiguous)."""
    h, w, c = image.shape
    # Rows of W·C values against a tiled mean/std row: contiguous inner loops (a
    # broadcast over a trailing axis of 3 is ~10x slower), the same float32 ops.
    mean = np.tile(np.asarray(self.mean, np.float32), w)
    std = np.tile(np.asarray(self.std, np.float32), w)
    rows = out.reshape(h, w * c, copy=False)
    np.subtract(image.reshape(h, w * c), mean, out=rows)
    np.divide(rows, std, out=rows)

  def apply(self, image, labels):
    out = np.empty(image.shape, np.float32)
    self.write(image, out)
    return out, labels

  def pixel(self, value: Sequence[float]) -> np.ndarray:
    """f32 [3]: what a float32 pixel of ``value`` (RGB) normalises to (e.g. the mean -> 0)."""
    out = np.empty((1, 1, 3), np.float32)
    self.write(np.asarray(value, np.float32).reshape(1, 1, 3), out)
    return out[0, 0]

  def map(self, ep):
    return _apply(ep, self.apply)


@dataclasses.dataclass(frozen=True)
class ToArrays(grain.transforms.Map):
  """Final per-episode op: images float32 contiguous, labels int32, scalars as numpy
  arrays; drops bookkeeping (``query_id``). Supports stay lists: `batch_episodes`
  stacks them straight into the batch (one copy). The loaders end their chains with
  `fused_ops` instead (no per-episode image, uint8 labels)."""

  def map(self, ep):
    out = {k: v for k, v in ep.items() if k != "query_id"}
    out["query_image"] = np.ascontiguousarray(ep["query_image"], np.float32)
    for k in ("query_mask", "query_base_label", "label_original", "query_base_label_original"):
      if k in ep:
        out[k] = np.asarray(ep[k], np.int32)
    if "support_images" in ep:
      out["support_images"] = [np.asarray(x, np.float32) for x in ep["support_images"]]
      out["support_masks"] = [np.asarray(x, np.int32) for x in ep["support_masks"]]
    return out


# -- fused tails: rows written straight into the batch ---------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Paste:
  """One batch row, not materialised until `batch_episodes` writes it into the batch.

  The row is a ``shape`` canvas of ``fill`` with ``src`` [h, w(, 3)] pasted at (top, left);
  with ``normalize`` (images) ``src`` is normalised on the way into float32 and ``fill``
  is already in normalised units (f32 [3]); without (labels) ``src`` is copied as is.
  """

  src: np.ndarray
  shape: tuple[int, ...]
  top: int = 0
  left: int = 0
  fill: float | np.ndarray = 0
  normalize: Normalize | None = None

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.float32) if self.normalize is not None else self.src.dtype

  def write(self, out: np.ndarray) -> None:
    """Fills ``out`` (``shape``, ``dtype``: one row of the batch)."""
    h, w = self.src.shape[:2]
    t, l = self.top, self.left
    if (t, l, h, w) != (0, 0, *out.shape[:2]):
      # One canvas line [W(, 3)], copied line by line (a broadcast over a trailing axis
      # of 3 is ~30x slower).
      line = np.empty(out.shape[1:], out.dtype)
      line[...] = self.fill
      out[:t] = line
      out[t + h :] = line
      out[t : t + h, :l] = line[:l]
      out[t : t + h, l + w :] = line[l + w :]
    if self.normalize is not None:
      self.normalize.write(self.src, out[t : t + h, l : l + w])
    else:
      out[t : t + h, l : l + w] = self.src


def _to_rows(ep: dict, fn) -> dict:
  """`_apply` for the last op of a `fused_ops` chain: also drops bookkeeping (``query_id``)."""
  out = _apply(ep, fn)
  out.pop("query_id", None)
  return out


@dataclasses.dataclass(frozen=True)
class NormalizeRow(grain.transforms.Map):
  """`Normalize` + `ToArrays` as one last op: images become `Paste` rows that
  `batch_episodes` normalises straight into the batch; labels stay uint8 arrays."""

  normalize: Normalize

  def apply(self, image, labels):
    return Paste(image, image.shape, normalize=self.normalize), labels

  def map(self, ep):
    return _to_rows(ep, self.apply)


@dataclasses.dataclass(frozen=True)
class RandomCropRow(_GroupRandomMap):
  """`RandomCrop` + `Normalize` + `ToArrays` as one last op, with the crop's draws: the
  crop window of the unpadded image goes straight into the batch row, normalised, and the
  padding is filled in place (the mean colour normalises to 0), so the padded canvas and
  the cropped image are never made. Labels: `Paste` rows (uint8, ``ignore_label`` fill)."""

  crop: RandomCrop
  normalize: Normalize

  def draw(self, rng, labels):
    return self.crop.draw(rng, labels)

  def apply(self, image, labels, params):
    ch, cw = _size_hw(self.crop.size)
    rows, cols, top, left = self.crop.window(labels[0].shape, params)
    fill = self.normalize.pixel(self.crop.pad_value)
    out = Paste(image[rows, cols], (ch, cw, 3), top, left, fill, self.normalize)
    return out, [Paste(l[rows, cols], (ch, cw), top, left, self.crop.ignore_label) for l in labels]

  def random_map(self, ep, rng):
    return _to_rows(ep, lambda i, l: self.apply(i, l, self.draw(rng, l)))


@dataclasses.dataclass(frozen=True)
class AspectResizePadRow(grain.transforms.Map):
  """`AspectResizePad` + `Normalize` + `ToArrays` as one last op: the resized content goes
  straight into the batch row, normalised, and the rest of the row is the normalised zero
  canvas (labels: 255)."""

  resize: AspectResizePad
  normalize: Normalize

  def apply(self, image, labels):
    s = int(self.resize.size)
    image, labels = self.resize.resize(image, labels)
    zero = self.normalize.pixel((0.0, 0.0, 0.0))
    out = Paste(image, (s, s, 3), fill=zero, normalize=self.normalize)
    return out, [Paste(l, (s, s), fill=self.resize.ignore_label) for l in labels]

  def map(self, ep):
    return _to_rows(ep, self.apply)


def fused_ops(ops: Sequence) -> list:
  """The loaders' form of a chain that ends in `Normalize`, `ToArrays` (`train_ops`,
  `test_ops`): that tail, together with a `RandomCrop` or `AspectResizePad` right before
  it, becomes one op (`RandomCropRow`, `AspectResizePadRow`, else `NormalizeRow`) whose
  `Paste` rows `batch_episodes` writes straight into the batch. Bit-identical images and
  label values; labels stay uint8 (0/1/255, N-way 0..N/255)."""
  *head, normalize, last = ops
  # Exact types: a subclass may change what the fused op would leave out.
  if type(normalize) is not Normalize or type(last) is not ToArrays:
    raise ValueError(
      f"fused_ops needs a chain ending in Normalize, ToArrays, got "
      f"{[type(o).__name__ for o in ops[-2:]]}"
    )
  prev = head[-1] if head else None
  if type(prev) is RandomCrop:
    return head[:-1] + [RandomCropRow(prev, normalize)]
  if type(prev) is AspectResizePad:
    return head[:-1] + [AspectResizePadRow(prev, normalize)]
  return head + [NormalizeRow(normalize)]


def _stack(rows: Sequence, empty: Callable, lead: tuple[int, ...]) -> np.ndarray:
  """[*lead, ...] (prod(lead) = len(rows)) from ``rows`` (arrays or `Paste`), allocated
  by ``empty(shape, dtype)`` and returned as allocated (no view of it)."""
  x0 = rows[0] if isinstance(rows[0], Paste) else np.asarray(rows[0])
  shape = tuple(x0.shape)
  out = empty((*lead, *shape), x0.dtype)
  flat = out.reshape(len(rows), *shape, copy=False)
  for i, x in enumerate(rows):
    if isinstance(x, Paste):
      x.write(flat[i])
    elif np.shape(x) != shape:
      raise ValueError(f"episodes of one batch have shapes {shape} and {np.shape(x)}")
    else:
      flat[i] = x
  return out


def batch_episodes(elements: Sequence[dict], empty: Callable = np.empty) -> dict[str, np.ndarray]:
  """Batches episode elements (after `ToArrays`, or a `fused_ops` chain) (docs/DESIGN.md §2).

  Each entry goes straight into its row of an array from ``empty(shape, dtype)``
  (`np.empty`; `BatchEpisodes` allocates shared memory): arrays are copied, `Paste`
  rows written. Supports become [B, K, H, W, 3] / [B, K, H, W], or [B, N, K, ...] when
  ``class_id`` is [N] (N-way; the lists are way-major); every other entry gets a new
  leading axis. All supports of the batch must share one size (true after a crop or
  resize op).
  """
  first, b = elements[0], len(elements)
  supports = ("support_images", "support_masks")
  out = {k: _stack([e[k] for e in elements], empty, (b,)) for k in first if k not in supports}
  if "support_images" in first:
    n = len(first["support_images"])
    way = int(np.size(first["class_id"])) if np.ndim(first["class_id"]) else 1
    for key in supports:
      for e in elements:
        if len(e[key]) != n:
          raise ValueError(f"episodes of one batch have {n} and {len(e[key])} supports")
      lead = (b, way, n // way) if way > 1 else (b, n)
      out[key] = _stack([x for e in elements for x in e[key]], empty, lead)
  return out


class _BatchArray(SharedMemoryArray):
  """A batch array in shared memory that unlinks its segment when it is deleted, unless it
  was handed to another process: grain reads its ``metadata`` to pass it on (and the
  receiving process unlinks it). So batches a worker made but never handed over (its
  prefetch buffer when the loader stops) leave no segment behind."""

  @classmethod
  def empty(cls, shape: tuple[int, ...], dtype) -> _BatchArray:
    out = cls(shape, dtype)
    out.unlink_on_del()
    return out

  @property
  def metadata(self):
    self._unlink_on_del = False
    return super().metadata


@dataclasses.dataclass(frozen=True)
class BatchEpisodes:
  """`batch_episodes` as a grain ``batch_fn``. ``shared_memory``: allocate the batch as
  grain ``SharedMemoryArray`` arrays, which a worker process hands to the main process
  as they are (grain copies any other array into shared memory first)."""

  shared_memory: bool = False

  def __call__(self, elements: Sequence[dict]) -> dict[str, np.ndarray]:
    return batch_episodes(elements, _BatchArray.empty if self.shared_memory else np.empty)


# -- chains ---------------------------------------------------------------------------------


# The training size normalisations (`train_ops`'s ``resize``) and what follows RandScale,
# RandRotate and the blur in each: the official order of flip and resize.
TRAIN_RESIZES = ("crop", "squash", "panet", "ssp")


def train_ops(
  size: int | tuple[int, int],
  *,
  scale: tuple[float, float] = (0.9, 1.1),
  rotate: tuple[float, float] = (-10.0, 10.0),
  blur: float = 0.5,
  resize: str = "crop",
) -> list:
  """The §8 chain: [RandScale] [RandRotate] [blur], then by ``resize``:

  * "crop" (PFENet/BAM/SCCAN): flip, `RandomCrop` (mean padding, 85 % rule);
  * "squash" (HDMNet): flip, `SquashResize` (OpenCV);
  * "panet" (PANet ``Resize`` + ``RandomMirror``): `SquashResize` with PIL, then flip;
  * "ssp" (SSP ``crop`` + ``hflip``): `RandomCrop` padded bottom/right with 0 / 255,
    one draw, then flip;

  then `Normalize`, `ToArrays`. A step that does nothing is left out: ``scale=(1, 1)``
  (no RandScale), ``rotate=(0, 0)`` (no RandRotate), ``blur=0`` (no Gaussian blur; else
  its probability); PANet and SSP use none of the three.
  """
  size = _size_hw(size)
  flip = RandomHorizontalFlip()
  if resize == "crop":
    last = [flip, RandomCrop(size=size)]
  elif resize == "squash":
    last = [flip, SquashResize(size=size)]
  elif resize == "panet":
    last = [SquashResize(size=size, backend="pil"), flip]
  elif resize == "ssp":
    last = [RandomCrop(size=size, pad_value=(0.0, 0.0, 0.0), retries=0, pad="end"), flip]
  else:
    raise ValueError(f"train resize must be one of {TRAIN_RESIZES}, got {resize!r}")
  if not 0.0 <= blur <= 1.0:
    raise ValueError(f"blur is a probability in [0, 1], got {blur}")
  ops = []
  if tuple(float(v) for v in scale) != (1.0, 1.0):
    ops.append(RandScale(scale=cast(tuple[float, float], tuple(scale))))
  if tuple(float(v) for v in rotate) != (0.0, 0.0):
    ops.append(RandRotate(angle=cast(tuple[float, float], tuple(rotate))))
  if blur > 0:
    ops.append(RandomGaussianBlur(p=float(blur)))
  return ops + last + [Normalize(), ToArrays()]


def test_ops(
  size: int, *, resize: str = "aspect", bucket: tuple[int, int] | None = (512, 512)
) -> list:
  """The §9 chain. ``resize``: "aspect" (§9.1, aspect + pad) or "squash" (§9.2).
  ``bucket``: keep the original query label padded to it (None: don't)."""
  if resize == "aspect":
    r = AspectResizePad(size=int(size))
  elif resize == "squash":
    r = SquashResize(size=_size_hw(size))
  else:
    raise ValueError(f"test resize must be 'aspect' or 'squash', got {resize!r}")
  keep = [KeepOriginalLabel(bucket=_size_hw(bucket))] if bucket is not None else []
  return keep + [r, Normalize(), ToArrays()]


def apply_ops(ep: dict, ops: Sequence, rng: np.random.Generator | None = None) -> dict:
  """Runs ``ops`` on one episode outside grain (one Generator for all random ops)."""
  for op in ops:
    if isinstance(op, grain.transforms.RandomMap):
      if rng is None:
        raise ValueError(f"{type(op).__name__} is random: pass rng=np.random.default_rng(...)")
      ep = op.random_map(ep, rng)
    else:
      ep = op.map(ep)
  return ep


__all__ = [
  "MEAN",
  "STD",
  "IGNORE",
  "TRAIN_RESIZES",
  "RandScale",
  "RandRotate",
  "RandomGaussianBlur",
  "RandomHorizontalFlip",
  "RandomCrop",
  "SquashResize",
  "AspectResizePad",
  "KeepOriginalLabel",
  "Normalize",
  "ToArrays",
  "Paste",
  "NormalizeRow",
  "RandomCropRow",
  "AspectResizePadRow",
  "fused_ops",
  "BatchEpisodes",
  "aspect_size",
  "pad_to",
  "pad_label",
  "train_ops",
  "test_ops",
  "apply_ops",
  "batch_episodes",
]
