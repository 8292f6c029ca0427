"""Pictures of predictions: mask overlays, episode panels, TensorBoard images, IoU bar charts.

Host-side numpy / OpenCV / matplotlib (Agg) helpers shared by evaluation
(`fss_jax.eval.evaluate`, `fss_jax.train.loop`) and inference
(`fss_jax.predict`):

* `overlay(image, mask, color, alpha)`: ``uint8 [H, W, 3]`` with the mask's
  foreground tinted: ``rint((1 - alpha) * image + alpha * color)`` on the
  foreground pixels, the other pixels unchanged (255 = ignore, optionally
  tinted with ``ignore_color``).
* `outline(image, mask, color)`: the mask's contour (`boundary` pixels) drawn
  on the image, the inside left as it is (what the episode panels show).
* `denormalize(image)`: an ImageNet-normalised float image (the Episode
  contract) back to ``uint8`` RGB.
* `episode_panel(...)`: one row of captioned tiles ``[support 1 .. support K |
  prediction | ground truth]`` (the last two on the query) as ``uint8 [H', W', 3]``.
* `panels_from_batch(batch, logits, ...)`: panels for the first episodes of an
  eval batch and the model's logits.
* `write_image_summaries(writer, step, panels)`: a clu ``MetricWriter``'s
  ``write_images`` with one stable key per panel (``eval/episode_0`` ...).
* `iou_bar_chart(per_class_iou, path)` / `summary_bar_chart(summary, path)`:
  a per-class IoU bar chart PNG ("3 bird" labels, a title wrapped to fit),
  written atomically (temp file + rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from fss_jax import io as fss_io
from fss_jax.eval import metrics as metrics_lib

IGNORE = 255
# ImageNet statistics x 255 (RGB), as fss_jax.data.transforms.Normalize uses them.
MEAN = tuple(v * 255 for v in (0.485, 0.456, 0.406))
STD = tuple(v * 255 for v in (0.229, 0.224, 0.225))

PRED_COLOR = (230, 25, 75)  # prediction (red)
TARGET_COLOR = (60, 180, 75)  # ground truth / support masks (green)
SUPPORT_COLOR = TARGET_COLOR
IGNORE_COLOR = (128, 128, 128)  # ignore (255) pixels of a target, when shown
ALPHA = 0.5


# ---------------------------------------------------------------------------
# Overlays and panels
# ---------------------------------------------------------------------------


def foreground(mask: np.ndarray) -> np.ndarray:
  """bool [H, W]: True where ``mask`` is foreground (bool True, or an integer label
  that is neither 0 nor 255)."""
  mask = np.asarray(mask)
  if mask.dtype == bool:
    return mask
  return (mask != 0) & (mask != IGNORE)


def _rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] from an RGB or grey ([H, W]) image."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  return image.astype(np.uint8) if image.dtype != np.uint8 else image


def overlay(
  image: np.ndarray,
  mask: np.ndarray,
  color: Sequence[int] = PRED_COLOR,
  alpha: float = ALPHA,
  *,
  ignore_color: Sequence[int] | None = None,
) -> np.ndarray:
  """Tints the foreground of ``mask`` on ``image``.

  Args:
    image: uint8 [H, W, 3] RGB (a [H, W] grey image is repeated to 3 channels).
    mask: [H, W] bool, or integer labels (0 background, 255 ignore, anything else
      foreground).
    color: RGB of the tint.
    alpha: tint opacity in [0, 1].
    ignore_color: when given, pixels with ``mask == 255`` are tinted with it too.

  Returns:
    uint8 [H, W, 3]: ``rint((1 - alpha) * image + alpha * color)`` (float32, clipped
    to 0..255) where the mask is foreground; ``image`` elsewhere.
  """
  image = _rgb(image)
  mask = np.asarray(mask)
  if mask.shape != image.shape[:2]:
    raise ValueError(
      f"overlay: mask {mask.shape} and image {image.shape[:2]} differ in size; "
      "resize the mask to the image first (nearest neighbour)"
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
  out = image.copy()
  regions = [(foreground(mask), color)]
  if ignore_color is not None and mask.dtype != bool:
    regions.append((mask == IGNORE, ignore_color))
  a = np.float32(alpha)
  for region, c in regions:
    if not region.any():
      continue
    px = image[region].astype(np.float32)
    tint = (np.float32(1) - a) * px + a * np.asarray(c, np.float32)
    out[region] = np.clip(np.rint(tint), 0, 255).astype(np.uint8)
  return out


def boundary(region: np.ndarray, thickness: int = 1) -> np.ndarray:
  """bool [H, W]: the pixels of ``region`` within ``thickness`` pixels of its edge.

  A pixel is on the edge when a pixel of its (2t+1)x(2t+1) neighbourhood lies outside
  the region; outside the image counts as outside, so a region touching the border is
  closed there too.
  """
  region = np.asarray(region, bool)
  if thickness < 1:
    raise ValueError(f"boundary thickness must be >= 1, got {thickness}")
  kernel = np.ones((2 * thickness + 1, 2 * thickness + 1), np.uint8)
  inner = cv2.erode(region.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
  return region & (inner == 0)


def outline_thickness(hw: Sequence[int]) -> int:
  """Outline width in pixels for an image of size (H, W): 1 up to 319 px, then 1 per 160 px."""
  return max(1, min(int(hw[0]), int(hw[1])) // 160)


def outline(
  image: np.ndarray,
  mask: np.ndarray,
  color: Sequence[int] = PRED_COLOR,
  *,
  thickness: int | None = None,
  ignore_color: Sequence[int] | None = None,
) -> np.ndarray:
  """Draws the contour of the foreground of ``mask`` on ``image``; the inside keeps its colours.

  Args:
    image: uint8 [H, W, 3] RGB (a [H, W] grey image is repeated to 3 channels).
    mask: [H, W] bool, or integer labels (0 background, 255 ignore, anything else
      foreground).
    color: RGB of the contour (opaque).
    thickness: contour width in pixels (default `outline_thickness` of the image).
    ignore_color: when given, the contour of the ``mask == 255`` pixels is drawn too,
      under the foreground's.

  Returns:
    uint8 [H, W, 3]: ``color`` on the `boundary` pixels of the foreground, ``image``
    everywhere else.
  """
  image = _rgb(image)
  mask = np.asarray(mask)
  if mask.shape != image.shape[:2]:
    raise ValueError(
      f"outline: mask {mask.shape} and image {image.shape[:2]} differ in size; "
      "resize the mask to the image first (nearest neighbour)"
    )
  t = outline_thickness(image.shape) if thickness is None else int(thickness)
  out = image.copy()
  if ignore_color is not None and mask.dtype != bool:
    out[boundary(mask == IGNORE, t)] = np.asarray(ignore_color, np.uint8)
  out[boundary(foreground(mask), t)] = np.asarray(color, np.uint8)
  return out


def caption(text: str, width: int, height: int) -> np.ndarray:
  """uint8 [height, width, 3]: ``text`` in black on white, centred, scaled to fit the band."""
  band = np.full((height, width, 3), 255, np.uint8)
  font = cv2.FONT_HERSHEY_SIMPLEX
  (tw, th), base = cv2.getTextSize(text, font, 1.0, 1)
  scale = min(0.75 * height / (th + base), 0.95 * width / tw)
  (tw, th), base = cv2.getTextSize(text, font, scale, 1)
  org = ((width - tw) // 2, (height + th) // 2)
  cv2.putText(band, text, org, font, scale, (0, 0, 0), 1, cv2.LINE_AA)
  return band


def caption_height(tile_height: int) -> int:
  """Height of the caption band above tiles of ``tile_height`` pixels (at least 12)."""
  return max(12, int(tile_height) // 8)


def panel_captions(num_supports: int, with_target: bool = True) -> list[str]:
  """The captions of an `episode_panel`'s tiles, left to right."""
  supports = (
    ["support"] if num_supports == 1 else [f"support {k}" for k in range(1, num_supports + 1)]
  )
  return supports + ["prediction"] + (["ground truth"] if with_target else [])


def denormalize(
  image: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> np.ndarray:
  """ImageNet-normalised float [..., H, W, 3] -> uint8 RGB (``x * std + mean``, clipped)."""
  x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _as_uint8(image: np.ndarray) -> np.ndarray:
  """uint8 images are kept; float images are taken as ImageNet-normalised (Episode)."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.floating):
    return denormalize(image)
  return np.clip(image, 0, 255).astype(np.uint8)


def _resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == tuple(hw):
    return image
  return cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape == tuple(hw):
    return mask
  if mask.dtype == bool or (mask.min(initial=0) >= 0 and mask.max(initial=0) <= 255):
    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
  return cv2.resize(
    mask.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST
  ).astype(np.int32)


def episode_panel(
  query_image: np.ndarray,
  support_images: Sequence[np.ndarray] | np.ndarray,
  support_masks: Sequence[np.ndarray] | np.ndarray,
  prediction: np.ndarray,
  target: np.ndarray | None = None,
  *,
  height: int | None = None,
  gap: int = 4,
  captions: bool = True,
) -> np.ndarray:
  """One row of captioned tiles: ``[support 1 .. support K | prediction | ground truth]``.

  Masks are drawn as contours (`outline`), so the image under them stays visible:
  the supports' masks green on the support images, the prediction red and the
  ground truth green (ignore pixels grey) on the query.

  Args:
    query_image: [H, W, 3], uint8 RGB or ImageNet-normalised float (Episode).
    support_images: K images [h, w, 3] (a [K, h, w, 3] array or a list; any sizes).
    support_masks: K masks [h, w] (0 / 1 / 255).
    prediction: [h', w'] predicted labels (any resolution; resized to the tile with
      nearest neighbour).
    target: optional [H, W] ground truth (0 / 1 / 255).
    height: tile height (default: the query's); every tile keeps its aspect ratio.
    gap: white pixels between tiles.
    captions: a white band above each tile names it (`panel_captions`).

  Returns:
    uint8 [height (+ `caption_height`), W_total, 3].
  """
  q = _as_uint8(query_image)
  th = int(height or q.shape[0])

  def fit(img, mask, color, ignore=None):
    img = _as_uint8(img)
    tw = max(1, int(round(img.shape[1] * th / img.shape[0])))
    img = _resize_image(img, (th, tw))
    return outline(img, _resize_mask(mask, (th, tw)), color, ignore_color=ignore)

  if len(support_images) != len(support_masks):
    raise ValueError(
      f"episode_panel: {len(support_images)} support images but {len(support_masks)} support masks"
    )
  tiles = [fit(img, m, SUPPORT_COLOR) for img, m in zip(support_images, support_masks)]
  tiles.append(fit(q, prediction, PRED_COLOR))
  if target is not None:
    tiles.append(fit(q, target, TARGET_COLOR, IGNORE_COLOR))
  if captions:
    ch = caption_height(th)
    names = panel_captions(len(support_images), target is not None)
    tiles = [np.concatenate([caption(n, t.shape[1], ch), t], axis=0) for n, t in zip(names, tiles)]
  sep = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
  row = [tiles[0]]
  for t in tiles[1:]:
    row += [sep, t] if gap > 0 else [t]
  return np.concatenate(row, axis=1)


def panels_from_batch(
  batch: Mapping[str, Any], predictions: Any, *, max_panels: int = 4, valid: Any = None
) -> list[np.ndarray]:
  """Panels for the first ``max_panels`` episodes of a host batch.

  Args:
    batch: an Episode dict (numpy): ``query_image [B, H, W, 3]`` (normalised),
      ``support_images [B, K, H, W, 3]`` (N-way ``[B, N, K, ...]``: the way and shot
      axes are flattened), ``support_masks``, optional ``query_mask [B, H, W]``
      (shown as the target) and ``valid [B]`` (padding episodes are skipped).
    predictions: int labels [B, h, w] (``fss_jax.train.step.make_predict_step``), or
      float logits [B, h, w, C] (their argmax is taken); any resolution.
    max_panels: at most this many panels.
    valid: optional [B] override of ``batch["valid"]``.

  Returns:
    A list of uint8 [H, W', 3] panels (all the same size for one batch).
  """
  pred = np.asarray(predictions)
  if pred.ndim == 4:
    pred = np.argmax(pred, axis=-1)
  pred = pred.astype(np.int32)  # [B, h, w]
  q = np.asarray(batch["query_image"])
  b = q.shape[0]
  si = np.asarray(batch["support_images"])
  sm = np.asarray(batch["support_masks"])
  si = si.reshape(b, -1, *si.shape[-3:])
  sm = sm.reshape(b, -1, *sm.shape[-2:])
  target = batch.get("query_mask")
  ok = np.asarray(valid if valid is not None else batch.get("valid", np.ones(b))).reshape(-1) > 0
  panels: list[np.ndarray] = []
  for i in range(b):
    if len(panels) >= max_panels:
      break
    if not ok[i]:
      continue
    panels.append(
      episode_panel(q[i], si[i], sm[i], pred[i], None if target is None else np.asarray(target[i]))
    )
  return panels


def write_image_summaries(
  writer,
  step: int,
  panels: Sequence[np.ndarray] | Mapping[str, np.ndarray],
  *,
  prefix: str = "eval/episode",
) -> dict[str, np.ndarray]:
  """Writes panels as images with a clu ``MetricWriter`` (``writer.write_images``).

  Each panel gets its own key (``f"{prefix}_{i}"``, or ``f"{prefix}/{name}"`` for a
  mapping) so that the same fixed episodes line up across steps in TensorBoard,
  whatever their sizes.

  Args:
    writer: a clu metric writer (``SummaryWriter``, ``LoggingWriter``,
      ``create_default_writer(...)``).
    step: the training step.
    panels: uint8 [H, W, 3] images (a list, or {name: image}).
    prefix: key prefix.

  Returns:
    The {key: [1, H, W, 3]} dict that was written.
  """
  items = (
    panels.items() if isinstance(panels, Mapping) else ((str(i), p) for i, p in enumerate(panels))
  )
  sep = "/" if isinstance(panels, Mapping) else "_"
  images = {}
  for name, p in items:
    p = np.asarray(p)
    if p.ndim == 2:
      p = p[..., None]
    if p.ndim != 3 or p.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image summary {name!r}: expected [H, W, C] with C in 1/3/4, got {p.shape}")
    images[f"{prefix}{sep}{name}"] = (
      _as_uint8(p)[None] if p.shape[-1] == 3 else p.astype(np.uint8)[None]
    )
  if images:
    writer.write_images(int(step), images)
  return images


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W] or RGB [H, W, 3] -> PNG bytes (RGB order, OpenCV encoder)."""
  image = np.asarray(image)
  if image.ndim == 3:
    image = cv2.cvtColor(np.ascontiguousarray(image, np.uint8), cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
  if not ok:
    raise ValueError(f"could not encode an image of shape {image.shape} as PNG")
  return buf.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = True) -> os.PathLike:
  """Writes an RGB / grey uint8 image as PNG atomically."""
  return fss_io.atomic_write(path, encode_png(image), overwrite=overwrite)


def bar_chart_figure(
  per_class_iou: Mapping[str, float],
  *,
  errors: Mapping[str, float] | None = None,
  title: str | None = None,
  mean: float | None = None,
  dpi: int = 100,
):
  """The per-class IoU bar chart as a matplotlib ``Figure`` (Agg canvas, no pyplot state).

  The title is wrapped at spaces (and shrunk if a word is still too long) to the
  figure's width, the class labels are slanted when they would overlap, and the
  layout is tightened, so that every text lies inside the figure.

  Args:
    per_class_iou: {class name: IoU in percent}, drawn in the given order.
    errors: optional {class name: std} drawn as error bars (e.g. over seeds).
    title: figure title (default "per-class IoU").
    mean: the mIoU line (default: the mean of the values); NaN hides it.
    dpi: resolution.

  Returns:
    The drawn ``matplotlib.figure.Figure``.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not per_class_iou:
    raise ValueError("iou_bar_chart: no classes to draw")
  names = [str(k) for k in per_class_iou]
  values = np.asarray([float(v) for v in per_class_iou.values()], np.float64)
  err = None if errors is None else np.asarray([float(errors.get(k, 0.0)) for k in per_class_iou])
  m = float(np.mean(values)) if mean is None else float(mean)
  fig = Figure(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.6), dpi=dpi)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(names))
  ax.bar(x, values, yerr=err, color="#4c72b0", capsize=3 if err is not None else 0)
  above = values + (err if err is not None else 0.0)
  for xi, v, y in zip(x, values, above):
    ax.text(float(xi), y + 0.5, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
  if not math.isnan(m):
    ax.axhline(m, color="#c44e52", linestyle="--", linewidth=1, label=f"mean {m:.2f}")
    ax.legend(loc="upper right", fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels(names, fontsize=8)
  top = (
    max(100.0, float(np.nanmax(values + (err if err is not None else 0))) * 1.05)
    if np.nanmax(values) > 1.5
    else 1.0
  )
  ax.set_ylim(0, top)
  ax.set_ylabel("IoU (%)" if top > 1.0 else "IoU")
  renderer = canvas.get_renderer()
  if _labels_overlap(ax.get_xticklabels(), renderer):
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
  _fit_title(fig, title or "per-class IoU", renderer)
  fig.tight_layout()
  fig.canvas.draw()
  return fig


def _labels_overlap(labels, renderer, pad: float = 2.0) -> bool:
  """True when neighbouring tick labels (left to right) overlap horizontally."""
  boxes = sorted(
    (t.get_window_extent(renderer) for t in labels if t.get_text()), key=lambda b: b.x0
  )
  return any(a.x1 + pad > b.x0 for a, b in zip(boxes, boxes[1:]))


def _fit_title(
  fig,
  text: str,
  renderer,
  *,
  fontsize: float = 10.0,
  min_fontsize: float = 6.0,
  margin: float = 0.96,
):
  """``fig.suptitle(text)`` wrapped at spaces, then shrunk, until it fits ``margin`` x the width."""
  import textwrap

  limit = margin * fig.bbox.width
  title = fig.suptitle(text, fontsize=fontsize)
  width = len(text)
  while title.get_window_extent(renderer).width > limit and width > 12:
    width = int(width * 0.8)
    title.set_text(textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False))
  while title.get_window_extent(renderer).width > limit and title.get_fontsize() > min_fontsize:
    title.set_fontsize(title.get_fontsize() - 0.5)
  return title


def iou_bar_chart(
  per_class_iou: Mapping[str, float],
  path: str | os.PathLike,
  *,
  errors: Mapping[str, float] | None = None,
  title: str | None = None,
  mean: float | None = None,
  overwrite: bool = True,
  dpi: int = 100,
) -> os.PathLike:
  """Per-class IoU bar chart (`bar_chart_figure`) as a PNG, written atomically.

  Args:
    per_class_iou, errors, title, mean, dpi: see `bar_chart_figure`.
    path: the PNG to write.
    overwrite: replace an existing file.

  Returns:
    The path written.
  """
  import io as io_lib

  fig = bar_chart_figure(per_class_iou, errors=errors, title=title, mean=mean, dpi=dpi)
  buf = io_lib.BytesIO()
  fig.savefig(buf, format="png")
  return fss_io.atomic_write(path, buf.getvalue(), overwrite=overwrite)


def chart_path(results_json: str | os.PathLike) -> os.PathLike:
  """``.../results_pascal5i_f0_1shot.json`` -> ``.../results_pascal5i_f0_1shot_iou.png``."""
  p = fss_io.user_path(results_json)
  return p.with_name(f"{p.stem}_iou.png")


def chart_class_names(
  summary: Mapping[str, Any], class_names: Mapping[Any, str] | None = None
) -> dict[str, str]:
  """{str(id): name}: ``class_names``, else ``summary["class_names"]``, else the dataset's."""
  names = (
    class_names
    or summary.get("class_names")
    or metrics_lib.class_names(str(summary.get("dataset", "")))
  )
  return {str(c): str(n) for c, n in names.items()}


def summary_bar_chart(
  summary: Mapping[str, Any],
  path: str | os.PathLike,
  *,
  class_names: Mapping[Any, str] | None = None,
  title: str | None = None,
) -> os.PathLike:
  """The bar chart of an `fss_jax.eval.evaluate.summarize` result.

  Bars are ``summary["per_class_mean"]`` (percent), error bars the std over
  ``summary["seeds"]`` when there is more than one seed; the title gives the mIoU
  mean ± std. Bars are labelled "3 bird": the names come from ``class_names``
  ({id: name}, ids int or str), else ``summary["class_names"]`` (`evaluate_seeds`),
  else the dataset's names (`metrics.class_names(summary["dataset"])`).
  """
  per_class = dict(summary["per_class_mean"])
  seeds = list((summary.get("seeds") or {}).values())
  errors = None
  if len(seeds) > 1:
    errors = {c: float(np.std([s["per_class"][c] for s in seeds])) for c in per_class}
  names = chart_class_names(summary, class_names)

  def label(c):
    n = names.get(str(c))
    return f"{c} {n}" if n else str(c)

  labelled = {label(c): v for c, v in per_class.items()}
  lab_err = None if errors is None else {label(c): v for c, v in errors.items()}
  if title is None:
    head = " ".join(str(summary[k]) for k in ("model", "dataset") if k in summary)
    fold = f" fold {summary['fold']}" if "fold" in summary else ""
    shot = f" {summary['shot']}-shot" if "shot" in summary else ""
    mi = summary.get("miou_mean")
    score = (
      f": mIoU {mi:.2f} ± {summary.get('miou_std', 0.0):.2f} ({summary.get('num_seeds', 1)} seed(s))"
      if mi is not None
      else ""
    )
    title = f"{head}{fold}{shot}{score}".strip() or None
  return iou_bar_chart(labelled, path, errors=lab_err, title=title, mean=summary.get("miou_mean"))


__all__ = [
  "overlay",
  "outline",
  "boundary",
  "foreground",
  "denormalize",
  "episode_panel",
  "panel_captions",
  "caption",
  "panels_from_batch",
  "write_image_summaries",
  "bar_chart_figure",
  "iou_bar_chart",
  "summary_bar_chart",
  "chart_class_names",
  "chart_path",
  "write_png",
  "encode_png",
  "PRED_COLOR",
  "TARGET_COLOR",
]
