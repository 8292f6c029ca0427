"""Few-shot segmentation metrics (data_protocol.md §10): per-class IoU sums, mIoU, FB-IoU.

Device side, inside the jitted eval step: `episode_counts` resizes the logits to
each episode's scoring size with a per-episode align_corners=True bilinear
operator (so the shapes are static and nothing recompiles across image
sizes), takes the argmax and counts, per class bin k = 0..C-1 (0 background,
1..Wa the episode's ways), ``I_k = #(P=k ∧ T=k)``, ``U_k = #(P=k) + #(T=k) - I_k``
over pixels whose target is not 255 (padding is 255). Where it scores is a
`Scoring` (docs/protocols.md): at the original label resolution (PFENet / BAM,
"pad_square" / "original"), or at the square input size S with the label resized
there by nearest neighbour (HSNet / PATNet, "input"); with 255 ignored, or
counted as background (``ignore_255=False``).

Host side: `ClassIoU` accumulates the sums (metrics are sums; ratios come last):
``I[c] += I_1, U[c] += U_1`` for the episode's novel class c (per way for
N-way), and ``I_bg, U_bg, I_fg, U_fg`` globally. Then

* mIoU = (1/n) Σ_c I[c] / (U[c] + 1e-10) over the n novel classes of the fold;
  a class that never occurred contributes 0;
* FB-IoU = (I_bg/(U_bg + 1e-10) + I_fg/(U_fg + 1e-10)) / 2.

Results are in percent. For N-way episodes the foreground sums add the way bins.
`class_names(dataset)` gives the {id: name} map (PASCAL VOC's 20, COCO's 80) that the
tables and charts show next to the ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax.data import splits

IGNORE = 255
EPS = 1e-10
SCORES = ("pad_square", "original", "input")


@dataclasses.dataclass(frozen=True)
class Scoring:
  """Where and how an episode is scored (hashable: it is a static argument of the eval step).

  Attributes:
    mode: "pad_square" (logits -> L×L, L = max(H, W): the original label padded to a square,
      data_protocol.md §9.1), "original" (logits -> H×W, §9.2) or "input" (logits -> S×S and
      the original label resized to S×S by torch's nearest rule, src = floor(dst · H / S):
      HSNet without ``--use_original_imgsize``, PATNet).
    size: S of "input" (the test input side); unused otherwise.
    ignore_255: True: label 255 (VOC object boundaries) is left out of every count (PFENet,
      HSNet PASCAL); False: it counts as background (HSNet COCO, PATNet's binarised masks).
      Padding outside the label's H×W is never counted.
  """

  mode: str = "pad_square"
  size: int = 0
  ignore_255: bool = True

  def __post_init__(self):
    if self.mode not in SCORES:
      raise ValueError(f"unknown score mode {self.mode!r}; use one of {', '.join(SCORES)}")
    if self.mode == "input" and int(self.size) < 1:
      raise ValueError(f"score mode 'input' needs the input size (size >= 1), got {self.size}")


def as_scoring(score: str | Scoring) -> Scoring:
  """A `Scoring` from itself or a mode name (255 ignored)."""
  return score if isinstance(score, Scoring) else Scoring(mode=str(score))


class_names = splits.class_names  # {class id: name} of a dataset (fss_jax.data.splits)


# ---------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------


def align_corners_matrix(out_size: jax.Array, in_size: int, bucket: int) -> jax.Array:
  """Per-example 1-D align_corners=True bilinear interpolation operator.

  Row ``y < out_size[b]`` of the result holds the weights with which torch's
  ``F.interpolate(mode="bilinear", align_corners=True)`` from ``in_size`` to
  ``out_size[b]`` mixes the input samples for output index y (source
  ``y * (in - 1) / (out - 1)`` in float32, floor / floor + 1). Rows beyond
  ``out_size[b]`` are valid numbers but meaningless (masked by the caller).

  Args:
    out_size: int [B] target sizes (dynamic).
    in_size: static input size.
    bucket: static number of output rows (>= max out_size).

  Returns:
    float32 [B, bucket, in_size].
  """
  out = jnp.asarray(out_size, jnp.int32)[:, None]
  y = jnp.arange(bucket, dtype=jnp.float32)[None, :]
  scale = jnp.where(
    out > 1, jnp.float32(in_size - 1) / jnp.maximum(out - 1, 1).astype(jnp.float32), 0.0
  )
  src = jnp.clip(scale * y, 0.0, float(in_size - 1))
  i0 = jnp.floor(src).astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  l1 = src - i0.astype(jnp.float32)
  m = (
    jax.nn.one_hot(i0, in_size, dtype=jnp.float32) * (1.0 - l1)[..., None]
    + jax.nn.one_hot(i1, in_size, dtype=jnp.float32) * l1[..., None]
  )
  return m


def resize_to_labels(
  logits: jax.Array, target_hw: jax.Array, bucket_hw: tuple[int, int]
) -> jax.Array:
  """align_corners=True bilinear resize of each episode to its own (h, w), on a fixed canvas.

  Args:
    logits: [B, h, w, C].
    target_hw: int [B, 2] per-episode output size.
    bucket_hw: static canvas (Hb, Wb) >= every target size.

  Returns:
    [B, Hb, Wb, C]; entries outside each episode's target size are meaningless.
  """
  _, h, w, _ = logits.shape
  rh = align_corners_matrix(target_hw[:, 0], h, bucket_hw[0])  # [B, Hb, h]
  rw = align_corners_matrix(target_hw[:, 1], w, bucket_hw[1])  # [B, Wb, w]
  x = jnp.einsum(
    "byi,bijc->byjc", rh, logits.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  return jnp.einsum("bxj,byjc->byxc", rw, x, precision=jax.lax.Precision.HIGHEST)


def nearest_rows(in_size: jax.Array, out: int) -> jax.Array:
  """torch ``F.interpolate(mode="nearest")`` source rows: int32 [B, out], ``min(floor(dst ·
  in / out), in - 1)`` in float32 (the scale is ``(float) in / out``, as torch computes it)."""
  scale = jnp.asarray(in_size, jnp.float32)[:, None] / jnp.float32(out)
  src = jnp.floor(jnp.arange(out, dtype=jnp.float32)[None, :] * scale).astype(jnp.int32)
  return jnp.minimum(src, jnp.asarray(in_size, jnp.int32)[:, None] - 1)


def resize_labels_nearest(label: jax.Array, label_size: jax.Array, out: int) -> jax.Array:
  """Each episode's H×W label (top-left of a padded bucket) -> out×out, torch nearest rule."""
  size = jnp.asarray(label_size, jnp.int32)
  rows = nearest_rows(size[:, 0], out)  # [B, S]
  cols = nearest_rows(size[:, 1], out)  # [B, S]
  x = jnp.take_along_axis(label, rows[:, :, None], axis=1)  # [B, S, Wb]
  return jnp.take_along_axis(x, cols[:, None, :], axis=2)  # [B, S, S]


def episode_counts(
  logits: jax.Array, label: jax.Array, label_size: jax.Array, *, score: str | Scoring = "pad_square"
) -> dict[str, jax.Array]:
  """Per-episode, per-bin intersection / union / target area at the scoring resolution.

  Args:
    logits: [B, h, w, C] model scores (any resolution).
    label: int [B, Hb, Wb] original labels (0..C-1, 255 ignore), padded with 255
      bottom/right to a fixed bucket.
    label_size: int [B, 2] true (H, W) of each label.
    score: a `Scoring` or its mode. "pad_square": logits resized to L×L, L = max(H, W)
      (the original label padded to a square; §9.1); "original": resized to H×W (§9.2).
      Only the H×W region is counted either way. "input": logits and label at S×S.

  Returns:
    {"intersection", "union", "target"} int32 [B, C].
  """
  score = as_scoring(score)
  b, hb, wb = label.shape
  c = logits.shape[-1]
  size = jnp.asarray(label_size, jnp.int32)
  if score.mode == "input":
    s = int(score.size)
    label = resize_labels_nearest(label, size, s)
    scores = resize_to_labels(logits, jnp.full((b, 2), s, jnp.int32), (s, s))
    region = jnp.ones(label.shape, bool)
  else:
    if score.mode == "pad_square":
      side = jnp.max(size, axis=1)
      target_hw = jnp.stack([side, side], axis=1)
    else:
      target_hw = size
    scores = resize_to_labels(logits, target_hw, (hb, wb))
    ys = jnp.arange(hb)[None, :, None]
    xs = jnp.arange(wb)[None, None, :]
    region = (ys < size[:, 0, None, None]) & (xs < size[:, 1, None, None])
  pred = jnp.argmax(scores, axis=-1)
  if score.ignore_255:
    valid = region & (label != IGNORE)
  else:  # 255 inside the label counts as background
    valid = region
    label = jnp.where(label == IGNORE, 0, label)
  bins = jnp.arange(c)
  p = (pred[..., None] == bins) & valid[..., None]
  t = (label[..., None] == bins) & valid[..., None]
  inter = jnp.sum(p & t, axis=(1, 2), dtype=jnp.int32)
  area_p = jnp.sum(p, axis=(1, 2), dtype=jnp.int32)
  area_t = jnp.sum(t, axis=(1, 2), dtype=jnp.int32)
  return {"intersection": inter, "union": area_p + area_t - inter, "target": area_t}


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------


def intersection_and_union(
  pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """numpy ``intersectionAndUnion`` of the references: pred / target int arrays of one shape.

  Returns:
    (intersection [K], union [K], target area [K]) int64.
  """
  pred = np.asarray(pred).reshape(-1).copy()
  target = np.asarray(target).reshape(-1)
  pred[target == ignore_index] = ignore_index
  inter = pred[pred == target]
  hist = lambda a: np.bincount(a[(a >= 0) & (a < num_classes)], minlength=num_classes)[:num_classes]
  i, ap, at = hist(inter), hist(pred), hist(target)
  return i.astype(np.int64), (ap + at - i).astype(np.int64), at.astype(np.int64)


class ClassIoU:
  """Accumulates per-class and foreground/background intersections and unions.

  Args:
    class_ids: the fold's novel classes (global ids); n = len(class_ids) in the mIoU.
    class_names: optional {id: name} for the table (`class_names` of the dataset); ids may
      be ints or digit strings (as read back from a results JSON).
  """

  def __init__(self, class_ids: Sequence[int], class_names: Mapping[Any, str] | None = None):
    self.class_ids = [int(c) for c in class_ids]
    if not self.class_ids:
      raise ValueError("ClassIoU needs at least one class id (the fold's novel classes)")
    self._pos = {c: i for i, c in enumerate(self.class_ids)}
    self.class_names = {int(c): str(n) for c, n in (class_names or {}).items()}
    n = len(self.class_ids)
    self.inter = np.zeros(n, np.int64)
    self.union = np.zeros(n, np.int64)
    self.count = np.zeros(n, np.int64)
    self.fb_inter = np.zeros(2, np.int64)
    self.fb_union = np.zeros(2, np.int64)
    self.episodes = 0

  def add(
    self,
    intersection: np.ndarray,
    union: np.ndarray,
    class_id: np.ndarray,
    valid: np.ndarray | None = None,
  ) -> None:
    """Adds a batch of episodes.

    Args:
      intersection, union: int [B, C] per bin (0 background, w for way w).
      class_id: int [B] (1-way) or [B, Wa] global class ids of the ways.
      valid: bool [B]; False rows (batch padding) are skipped.
    """
    inter = np.asarray(intersection, np.int64)
    uni = np.asarray(union, np.int64)
    cls = np.asarray(class_id).reshape(inter.shape[0], -1)
    if cls.shape[1] != inter.shape[1] - 1:
      raise ValueError(
        f"class_id has {cls.shape[1]} ways per episode but the counts have "
        f"{inter.shape[1]} bins (background + ways)"
      )
    keep = np.ones(inter.shape[0], bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    for b in np.nonzero(keep)[0]:
      for w in range(cls.shape[1]):
        c = int(cls[b, w])
        if c not in self._pos:
          raise ValueError(
            f"episode class {c} is not one of the evaluated classes {self.class_ids}"
          )
        k = self._pos[c]
        self.inter[k] += inter[b, w + 1]
        self.union[k] += uni[b, w + 1]
        self.count[k] += 1
      self.fb_inter += [inter[b, 0], inter[b, 1:].sum()]
      self.fb_union += [uni[b, 0], uni[b, 1:].sum()]
      self.episodes += 1

  def per_class(self) -> dict[int, float]:
    """{class id: cumulative IoU in percent} (0 for classes never seen)."""
    iou = self.inter / (self.union + EPS)
    return {c: float(100.0 * iou[i]) for i, c in enumerate(self.class_ids)}

  def result(self) -> dict[str, Any]:
    """{"miou", "fb_iou", "fg_iou", "bg_iou" (percent), "per_class", "episodes"}."""
    per_class = self.per_class()
    fb = self.fb_inter / (self.fb_union + EPS)
    return {
      "miou": float(np.mean(list(per_class.values()))),
      "fb_iou": float(100.0 * fb.mean()),
      "fg_iou": float(100.0 * fb[1]),
      "bg_iou": float(100.0 * fb[0]),
      "per_class": {str(c): v for c, v in per_class.items()},
      "episodes": int(self.episodes),
    }

  def table(self) -> str:
    """A per-class text table (id, name, IoU %, Σ intersection, Σ union, episodes)."""
    names = [self.class_names.get(c, "") for c in self.class_ids]
    w = max([4] + [len(n) for n in names])
    rows = [
      f"{'class':>5}  {'name':<{w}} {'IoU %':>7} {'Σ inter':>12} {'Σ union':>12} {'episodes':>8}"
    ]
    for i, (c, name) in enumerate(zip(self.class_ids, names)):
      iou = 100.0 * self.inter[i] / (self.union[i] + EPS)
      rows.append(
        f"{c:>5}  {name:<{w}} {iou:>7.2f} {self.inter[i]:>12d} "
        f"{self.union[i]:>12d} {self.count[i]:>8d}"
      )
    r = self.result()
    rows.append(f"mIoU {r['miou']:.2f}   FB-IoU {r['fb_iou']:.2f}   ({self.episodes} episodes)")
    return "\n".join(rows)


__all__ = [
  "episode_counts",
  "resize_to_labels",
  "align_corners_matrix",
  "resize_labels_nearest",
  "intersection_and_union",
  "ClassIoU",
  "class_names",
  "SCORES",
  "IGNORE",
  "Scoring",
  "as_scoring",
]
