"""A tiny synthetic PASCAL VOC / COCO 2014 twin in the exact raw layouts the builders read.

  python -m data_prep.synthetic --layout voc --out /tmp/fss_raw/voc --num_images 40 --seed 0
  python -m data_prep.synthetic --layout coco --out /tmp/fss_raw/coco --num_images 40 --seed 0
  python -m data_prep.build --dataset pascal5i --manual_dir /tmp/fss_raw/voc --data_dir /tmp/fss_tfds

Each image shows 1-4 textured shapes (rectangles, ellipses, noisy polygons);
every class has its own fixed texture (pattern, colours, frequency; the same
for every seed) so a model can learn the classes. Image sizes vary (112..208
px per side, not square).

Class coverage: images come in pairs that share a "cell" of five classes and a
large main object (> 2048 px, the §5.1 support threshold) of the same class.
A cell is a set of classes that are all novel in the same fold under every
fold convention (PASCAL: 5i+1..5i+5; COCO: same (k-1) mod 4 and same
(k-1) // 20), so most images survive the BAM intersection filter for the three
other folds, and cells are visited in an order that covers all four folds
early (train and val). Some images get an extra object of another cell
(exercises the intersection filter). With ``num_images >= 24`` every PASCAL
fold has training and test episodes (K = 1), COCO needs ``>= 40``.

VOC layout (`data_prep.raw.VOC_LAYOUT`): JPEGImages/, SegmentationClassAug/
(8-bit index PNGs; a fraction written as palette PNGs, whose raw indices
must be read, §2.1), 255 borders around most objects, train.txt / val.txt
(not sorted). COCO layout (`data_prep.raw.COCO_LAYOUT`): train2014/,
val2014/ JPEGs named COCO_<split>2014_%012d.jpg (one grayscale), and per
split ``annotations/instances_<split>2014.json`` with polygon (some
multi-part), compressed-RLE and uncompressed-RLE (some crowd) segmentations
over the 80 real COCO category ids, plus one image without annotations;
optionally label PNGs under ``annotations/<split>2014/`` and train/val lists.

Cross-domain twins (`write_fss1000`, `write_deepglobe`, `write_isic2018`,
`write_chest_xray`; layouts of `data_prep.cross_domain`): one large textured object
(FSS-1000, ISIC), land-cover maps of 1-3 classes (DeepGlobe) or two lungs (Chest
X-ray) per image, with real FSS-1000 class names and ISIC ids from the shipped lists,
0 / 255 masks as grey or RGB PNGs, some with grey borders (90, 127, 128, 200) that
PATNet's >= 128 rule splits. `make_built_cross_domain` writes and builds one.

Deterministic for a seed (numpy Generator only). `make_built_dataset` writes
the raw data and builds it in one call (for tests and the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from fss_jax.data import splits

COCO_CATEGORY_IDS = tuple(
  [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
  ]
)
COCO_CATEGORY_NAMES = splits.COCO_CLASS_NAMES
assert len(COCO_CATEGORY_IDS) == len(COCO_CATEGORY_NAMES) == 80

# Smallest pixel count of an image pair's main object (the §5.1 threshold is 2048).
MAIN_OBJECT_MIN_PIXELS = 2600
SIZE_RANGE = (112, 208)
JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------
# Class cells and textures
# ---------------------------------------------------------------------------------------------


def class_cells(num_classes: int) -> list[list[int]]:
  """Groups of 5 classes novel in the same fold under every convention, in fold-covering order.

  PASCAL (20): [1..5], [6..10], [11..15], [16..20]. COCO (80): cells
  {k : (k-1) mod 4 = a, (k-1) // 20 = b}, ordered so that any 4 consecutive cells
  cover all a (interleaved folds) and all b (contiguous folds).
  """
  if num_classes == 20:
    return [list(range(5 * f + 1, 5 * f + 6)) for f in range(4)]
  cells = []
  for shift in range(4):
    for b in range(4):
      a = (b + shift) % 4
      cells.append([k for k in range(1, 81) if (k - 1) % 4 == a and (k - 1) // 20 == b])
  return cells


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
  """float32 [h, w] in [0, 1]: bilinearly upsampled random grid."""
  g = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
  return cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)


def class_texture(c: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """float32 [h, w, 3] RGB 0..255: class c's fixed pattern with a per-image phase and small noise."""
  style = np.random.default_rng([7919, c])
  c1, c2 = style.uniform(0, 255, 3), style.uniform(0, 255, 3)
  if np.abs(c1 - c2).sum() < 150:  # keep enough contrast inside the pattern
    c2 = 255 - c1
  pattern = int(style.integers(0, 5))
  freq = style.uniform(0.06, 0.3)
  angle = style.uniform(0, np.pi)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  u = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0, 50)
  if pattern == 0:  # stripes
    t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
  elif pattern == 1:  # checker
    t = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(np.float32)
  elif pattern == 2:  # gradient
    t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
  elif pattern == 3:  # rings
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2))
  else:  # blobs
    t = (_smooth_noise(rng, h, w, max(2, int(1 / freq))) > 0.5).astype(np.float32)
  img = c1 * (1 - t[..., None]) + c2 * t[..., None]
  return (img + rng.normal(0, 6, img.shape)).astype(np.float32)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  base = rng.uniform(60, 200, 3)
  n = _smooth_noise(rng, h, w, int(rng.integers(8, 32)))
  img = base * (0.75 + 0.5 * n[..., None]) + rng.normal(0, 4, (h, w, 3))
  return img.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def _shape_polygon(
  kind: str, cy: float, cx: float, bh: float, bw: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
  """float [P, 2] (x, y) outline of a rectangle / ellipse / noisy polygon centred at (cy, cx)."""
  if kind == "rectangle":
    pts = np.array([[-bw, -bh], [bw, -bh], [bw, bh], [-bw, bh]], np.float64) / 2
  elif kind == "ellipse":
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    pts = np.stack([bw / 2 * np.cos(t), bh / 2 * np.sin(t)], 1)
  else:
    n = int(rng.integers(5, 10))
    t = (
      np.sort(rng.uniform(0, 2 * np.pi, n))
      if rng.random() < 0.5
      else np.linspace(0, 2 * np.pi, n, endpoint=False)
    )
    r = rng.uniform(0.7, 1.0, n)
    pts = np.stack([bw / 2 * r * np.cos(t), bh / 2 * r * np.sin(t)], 1)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  return pts @ rot.T + np.array([cx, cy])


def _fill(poly: np.ndarray, h: int, w: int) -> np.ndarray:
  m = np.zeros((h, w), np.uint8)
  cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
  return m.astype(bool)


def _random_object(rng, h, w, *, main: bool) -> tuple[str, np.ndarray]:
  kind = str(rng.choice(["rectangle", "ellipse", "polygon"]))
  if main:
    bh, bw = rng.uniform(0.55, 0.85) * h, rng.uniform(0.55, 0.85) * w
  else:
    bh, bw = rng.uniform(0.2, 0.5) * h, rng.uniform(0.2, 0.5) * w
  cy, cx = rng.uniform(bh / 2.5, h - bh / 2.5), rng.uniform(bw / 2.5, w - bw / 2.5)
  angle = rng.uniform(-0.4, 0.4) if kind != "ellipse" else rng.uniform(0, np.pi)
  return kind, _shape_polygon(kind, cy, cx, bh, bw, angle, rng)


def _image_plan(rng: np.random.Generator, j: int, cells: list[list[int]], mixed_p: float):
  """Classes of image j (paint order; the main one last): pairs share the cell and main class."""
  pair = j // 2
  cell = cells[pair % len(cells)]
  main = cell[(pair // len(cells)) % len(cell)]
  others = [
    int(c)
    for c in rng.choice([c for c in cell if c != main], int(rng.integers(0, 3)), replace=False)
  ]
  if rng.random() < mixed_p:
    other_cell = cells[(pair + 1 + int(rng.integers(0, len(cells) - 1))) % len(cells)]
    others.append(int(rng.choice(other_cell)))
  return others, main


def _draw_objects(rng, h, w, others, main):
  """[(class, outline, mask)] in paint order; the main object keeps >= MAIN_OBJECT_MIN_PIXELS visible."""
  objs = []
  for c in others:
    _, poly = _random_object(rng, h, w, main=False)
    objs.append((c, poly, _fill(poly, h, w)))
  for _ in range(20):
    _, poly = _random_object(rng, h, w, main=True)
    m = _fill(poly, h, w)
    if m.sum() >= MAIN_OBJECT_MIN_PIXELS + 4 * (h + w):  # margin for the 255 border band
      break
  objs.append((main, poly, m))
  return objs


def _split_sizes(num_images: int) -> tuple[int, int]:
  if num_images < 8:
    raise ValueError(
      f"num_images must be >= 8 (got {num_images}) so that both splits have image pairs"
    )
  n_val = max(4, int(round(num_images * 0.3)))
  n_val += n_val % 2
  return num_images - n_val, n_val


def _paint(h, w, objs, rng, masks=None) -> np.ndarray:
  img = _background(h, w, rng)
  for i, (c, _, m) in enumerate(objs):
    m = m if masks is None else masks[i]
    img[m] = class_texture(c, h, w, rng)[m]
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_jpeg(path: pathlib.Path, rgb: np.ndarray, gray: bool = False) -> None:
  img = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if gray else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
  if not cv2.imwrite(os.fspath(path), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
    raise OSError(f"cannot write {path}")


def _voc_palette() -> list[int]:
  """The standard VOC colour map (bit-interleaved), 256 RGB triplets flattened."""
  pal = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal += [r, g, b]
  return pal


# ---------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------


def write_voc(
  out: str | os.PathLike,
  num_images: int = 32,
  seed: int = 0,
  *,
  nested: bool = False,
  palette_fraction: float = 0.25,
  border_fraction: float = 0.8,
) -> pathlib.Path:
  """Writes a synthetic SegmentationClassAug-style PASCAL layout; returns the manual_dir (``out``).

  Args:
    out: manual_dir to create (files go to ``out/VOC2012/`` when ``nested``).
    num_images: total listed images (about 70 % train, 30 % val, both even).
    seed: numpy Generator seed; same seed -> identical files.
    nested: put everything under ``VOC2012/`` (the builder accepts both).
    palette_fraction: share of label PNGs written in palette ("P") mode (raw indices).
    border_fraction: share of images whose objects get a 255 border band (VOC style).
  """
  from PIL import Image

  out = pathlib.Path(out)
  root = out / "VOC2012" if nested else out
  (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
  (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  cells = class_cells(20)
  n_train, n_val = _split_sizes(num_images)
  palette = _voc_palette()
  numbers = rng.choice(np.arange(1, 9000), num_images, replace=False)
  kernel = np.ones((3, 3), np.uint8)
  k = 0
  for split, n in (("train", n_train), ("val", n_val)):
    lines = []
    for j in range(n):
      image_id = f"{2007 + int(numbers[k]) % 5}_{int(numbers[k]):06d}"
      k += 1
      h, w = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, 2))
      others, main = _image_plan(rng, j, cells, mixed_p=0.2)
      objs = _draw_objects(rng, h, w, others, main)
      label = np.zeros((h, w), np.uint8)
      inst = np.full((h, w), -1, np.int32)
      for i, (c, _, m) in enumerate(objs):
        label[m] = c
        inst[m] = i
      if rng.random() < border_fraction:  # a band of 255 around every visible instance region
        for i in range(len(objs)):
          vis = (inst == i).astype(np.uint8)
          label[(cv2.dilate(vis, kernel) > 0) & ~(cv2.erode(vis, kernel) > 0)] = 255
      _write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", _paint(h, w, objs, rng))
      png = root / "SegmentationClassAug" / f"{image_id}.png"
      if rng.random() < palette_fraction:
        im = Image.fromarray(label, mode="P")
        im.putpalette(palette)
        im.save(png)
      else:
        cv2.imwrite(os.fspath(png), label)
      lines.append(f"JPEGImages/{image_id}.jpg SegmentationClassAug/{image_id}.png")
    order = rng.permutation(len(lines))
    (root / f"{split}.txt").write_text("".join(lines[i] + "\n" for i in order))
  return out


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------


def _rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
  """COCO uncompressed RLE (column-major run lengths starting with zeros)."""
  flat = mask.astype(np.uint8).ravel(order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0] == 1:
    counts = [0] + counts
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _coco_segmentation(rng, poly, mask, h, w):
  """(segmentation, iscrowd) in one of the COCO encodings."""
  from pycocotools import mask as mask_utils

  r = rng.random()
  if r < 0.5:
    seg = [np.round(poly, 2).ravel().tolist()]
    if rng.random() < 0.3:  # a second part (COCO instances are often multi-polygon)
      cy, cx = rng.uniform(0, h), rng.uniform(0, w)
      seg.append(
        np.round(_shape_polygon("polygon", cy, cx, h * 0.15, w * 0.15, 0.0, rng), 2)
        .ravel()
        .tolist()
      )
    return seg, 0
  if r < 0.75:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}, 0
  return _rle_uncompressed(mask), int(rng.random() < 0.5)


def _decode_segmentation(seg, h, w) -> np.ndarray:
  from pycocotools import mask as mask_utils

  if isinstance(seg, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  elif isinstance(seg["counts"], list):
    rle = mask_utils.frPyObjects(seg, h, w)
  else:
    rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
  return mask_utils.decode(rle).astype(bool)


def write_coco(
  out: str | os.PathLike,
  num_images: int = 40,
  seed: int = 0,
  *,
  labels: str = "json",
  lists: bool = True,
) -> pathlib.Path:
  """Writes a synthetic COCO 2014 layout; returns the manual_dir (``out``).

  Args:
    out: manual_dir to create.
    num_images: total listed (annotated) images, about 70 % train, 30 % val; each
      split's json also describes one extra image without annotations.
    seed: numpy Generator seed; same seed -> identical files.
    labels: "json" (instances_*2014.json only), "png" (label PNGs only) or "both".
    lists: write train.txt / val.txt (in a non-sorted order).
  """
  from data_prep import raw

  if labels not in ("json", "png", "both"):
    raise ValueError(f"labels must be 'json', 'png' or 'both', got {labels!r}")
  out = pathlib.Path(out)
  (out / "annotations").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  cells = class_cells(80)
  n_train, n_val = _split_sizes(num_images)
  categories = [
    {"id": cid, "name": name, "supercategory": "synthetic"}
    for cid, name in zip(COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES)
  ]
  ann_id = int(rng.integers(1, 1000))
  for split, n in (("train", n_train), ("val", n_val)):
    sub = f"{split}2014"
    (out / sub).mkdir(exist_ok=True)
    if labels != "json":
      (out / "annotations" / sub).mkdir(parents=True, exist_ok=True)
    ids = np.sort(rng.choice(np.arange(1, 600000), n + 1, replace=False))
    images, annotations, lines = [], [], []
    gray_at = int(rng.integers(0, n))
    for j in range(n + 1):
      name = f"COCO_{sub}_{int(ids[j]):012d}.jpg"
      h, w = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, 2))
      images.append({"id": int(ids[j]), "file_name": name, "height": h, "width": w})
      if j == n:  # an image without annotations: in the json, not in the lists
        _write_jpeg(out / sub / name, _background(h, w, rng).clip(0, 255).astype(np.uint8))
        continue
      others, main = _image_plan(rng, j, cells, mixed_p=0.25)
      objs = _draw_objects(rng, h, w, others, main)
      masks = []
      label = np.zeros((h, w), np.uint8)
      for c, poly, m in objs:
        seg, crowd = _coco_segmentation(rng, poly, m, h, w)
        inst = _decode_segmentation(seg, h, w)  # what pycocotools renders (the label follows it)
        masks.append(inst)
        if raw.COCO_DRAW_CROWD or not crowd:
          label[inst] = c
        ys, xs = np.nonzero(inst)
        bbox = (
          [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
          if xs.size
          else [0.0, 0.0, 0.0, 0.0]
        )
        annotations.append(
          {
            "id": ann_id,
            "image_id": int(ids[j]),
            "category_id": COCO_CATEGORY_IDS[c - 1],
            "segmentation": seg,
            "iscrowd": crowd,
            "area": float(inst.sum()),
            "bbox": bbox,
          }
        )
        ann_id += int(rng.integers(1, 5))
      _write_jpeg(out / sub / name, _paint(h, w, objs, rng, masks), gray=(j == gray_at))
      stem = name[:-4]
      if labels != "json":
        cv2.imwrite(os.fspath(out / "annotations" / sub / f"{stem}.png"), label)
      lines.append(f"{sub}/{name} annotations/{sub}/{stem}.png")
    if labels != "png":
      data = {
        "info": {"description": "fss-jax synthetic COCO 2014 twin"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "licenses": [],
      }
      (out / "annotations" / f"instances_{sub}.json").write_text(json.dumps(data))
    if lists:
      order = rng.permutation(len(lines))
      (out / f"{split}.txt").write_text("".join(lines[i] + "\n" for i in order))
  return out


def write_raw(
  out: str | os.PathLike, layout: str, num_images: int, seed: int, **kwargs
) -> pathlib.Path:
  """`write_voc` (layout "voc") or `write_coco` (layout "coco")."""
  if layout == "voc":
    return write_voc(out, num_images, seed, **kwargs)
  if layout == "coco":
    return write_coco(out, num_images, seed, **kwargs)
  raise ValueError(f"layout must be 'voc' or 'coco', got {layout!r}")


LAYOUT_DATASET = {"voc": "pascal5i", "coco": "coco20i"}


def make_built_dataset(
  tmp_dir: str | os.PathLike, layout: str = "voc", num_images: int = 32, seed: int = 0, **raw_kwargs
) -> str:
  """Writes synthetic raw data and builds it; returns the TFDS ``data_dir``.

  ``tmp_dir/raw_<tag>/`` receives the raw files and ``tmp_dir/tfds_<tag>/`` (the
  returned data_dir) the dataset, ``pascal5i`` for "voc" and ``coco20i`` for
  "coco": read it with ``fss_jax.data.source.open_split(data_dir, name, split)``
  (``name = LAYOUT_DATASET[layout]``). ``<tag>`` encodes all arguments, so
  calling it again with the same arguments is a no-op (complete build found)
  and different arguments never reuse a build.

  Example::

    data_dir = make_built_dataset(tmp_path, layout="voc", num_images=24, seed=0)
    src = source.open_split(data_dir, "pascal5i", "train")

  Args:
    tmp_dir: scratch folder (e.g. pytest's ``tmp_path_factory.mktemp("data")``).
    layout: "voc" or "coco".
    num_images: total images (train ~70 %, val ~30 %); >= 24 (voc) / 40 (coco)
      give training and test episodes in every fold.
    seed: synthetic data seed.
    **raw_kwargs: passed to `write_voc` / `write_coco` (e.g. ``nested=True``, ``labels="png"``).
  """
  from data_prep import build

  if layout not in LAYOUT_DATASET:
    raise ValueError(f"layout must be 'voc' or 'coco', got {layout!r}")
  tmp_dir = pathlib.Path(tmp_dir)
  tag = "_".join(
    [layout, str(num_images), str(seed)] + [f"{k}-{v}" for k, v in sorted(raw_kwargs.items())]
  )
  data_dir = tmp_dir / f"tfds_{tag}"
  dataset = LAYOUT_DATASET[layout]
  if not build.is_complete(data_dir, dataset):
    manual_dir = tmp_dir / f"raw_{tag}"
    if manual_dir.exists():  # a half-written raw tree from an interrupted call
      import shutil

      shutil.rmtree(manual_dir)
    write_raw(manual_dir, layout, num_images, seed, **raw_kwargs)
    build.build(dataset, manual_dir, data_dir, progress=False)
  return os.fspath(data_dir)


# ---------------------------------------------------------------------------------------------
# Cross-domain test sets (PATNet's layouts; data_prep.cross_domain parses them)
# ---------------------------------------------------------------------------------------------

# Texture ids of the cross-domain classes (class_texture styles), apart from the PASCAL / COCO ones.
_CD_TEXTURE_BASE = {"fss1000": 1000, "deepglobe": 3000, "isic2018": 3100, "chest_xray": 3200}
# Grey values written on some mask borders: PATNet's binarisation (>= 128) keeps 128 and 200.
_SOFT_EDGE_VALUES = (90, 127, 128, 200)


def _object_scene(
  rng: np.random.Generator, h: int, w: int, texture: int
) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [h, w, 3] RGB, bool [h, w] mask): one large textured object on a noisy background."""
  _, poly = _random_object(rng, h, w, main=True)
  mask = _fill(poly, h, w)
  img = _background(h, w, rng)
  img[mask] = class_texture(texture, h, w, rng)[mask]
  return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def _write_mask(
  path: pathlib.Path,
  mask: np.ndarray,
  rng: np.random.Generator,
  *,
  rgb: bool = False,
  soft_edge: bool = False,
) -> None:
  """A 0 / 255 mask PNG (grey "L", or "RGB" with three equal channels); ``soft_edge`` writes grey
  values of `_SOFT_EDGE_VALUES` on the object's border (what PATNet's >= 128 rule decides)."""
  from PIL import Image

  grey = np.where(mask, 255, 0).astype(np.uint8)
  if soft_edge:
    m = mask.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    band = (cv2.dilate(m, kernel) > 0) & ~(cv2.erode(m, kernel) > 0)
    ys, xs = np.nonzero(band)
    grey[ys, xs] = np.asarray(_SOFT_EDGE_VALUES, np.uint8)[
      rng.integers(0, len(_SOFT_EDGE_VALUES), len(ys))
    ]
  im = Image.fromarray(np.repeat(grey[..., None], 3, -1) if rgb else grey, "RGB" if rgb else "L")
  im.save(path)


def write_fss1000(
  out: str | os.PathLike,
  classes_per_split: Sequence[int] = (3, 2, 3),
  images_per_class: int = 10,
  seed: int = 0,
  *,
  top: str = "FSS-1000",
  size_range: tuple[int, int] = (32, 48),
) -> pathlib.Path:
  """Writes a synthetic FSS-1000 (``<top>/<class>/<n>.jpg`` + ``<n>.png``); returns the manual_dir (``out``).

  Classes are real FSS-1000 class names, ``classes_per_split`` of the official train /
  val / test lists (seeded choice); images are square as in FSS-1000 (224 px there);
  masks alternate grey and RGB PNGs with soft borders (values 90, 127, 128, 200).

  Args:
    out: manual_dir to create.
    classes_per_split: class folders of the train, val and test lists.
    images_per_class: images per class (10 in FSS-1000, named 1..n).
    seed: numpy Generator seed; same seed -> identical files.
    top: sub-folder of ``out`` holding the class folders ("FSS-1000" as PATNet reads it,
      "fewshot_data" as the zip unpacks, "" for ``out`` itself).
    size_range: side lengths in pixels.
  """
  out = pathlib.Path(out)
  root = out / top if top else out
  rng = np.random.default_rng(seed)
  info = splits.cross_domain("fss1000")
  for split, k in zip(splits.FSS1000_SPLITS, classes_per_split):
    names = splits.fss1000_split_classes(split)
    for i in np.sort(rng.choice(len(names), int(k), replace=False)):
      name = names[int(i)]
      folder = root / name
      folder.mkdir(parents=True, exist_ok=True)
      texture = _CD_TEXTURE_BASE["fss1000"] + info.class_names.index(name)
      for n in range(1, images_per_class + 1):
        side = int(rng.integers(size_range[0], size_range[1] + 1))
        img, mask = _object_scene(rng, side, side, texture)
        _write_jpeg(folder / f"{n}.jpg", img)
        _write_mask(folder / f"{n}.png", mask, rng, rgb=bool(n % 2), soft_edge=True)
  return out


def write_deepglobe(
  out: str | os.PathLike,
  num_tiles: int = 12,
  seed: int = 0,
  *,
  top: str = "Deepglobe",
  size_range: tuple[int, int] = (32, 48),
) -> pathlib.Path:
  """Writes synthetic DeepGlobe tiles in PATNet's class folders; returns the manual_dir (``out``).

  Each tile is a land-cover map of 1-3 classes (tile t's main class is t mod 6 + 1,
  so ``num_tiles >= 12`` gives every class two tiles); the tile's JPEG goes to
  ``<top>/<k>/test/origin/<tile>.jpg`` and class k's 0 / 255 mask (3 equal channels,
  as PATNet's preprocess.py writes it) to ``<top>/<k>/test/groundtruth/<tile>.png`` for
  every class k it shows.
  """
  out = pathlib.Path(out)
  root = out / top if top else out
  rng = np.random.default_rng(seed)
  n = len(splits.DEEPGLOBE_CLASS_NAMES)
  for k in range(1, n + 1):
    for sub in ("origin", "groundtruth"):
      (root / str(k) / "test" / sub).mkdir(parents=True, exist_ok=True)
  numbers = rng.choice(np.arange(100, 999999), num_tiles, replace=False)
  for t in range(num_tiles):
    side = int(rng.integers(size_range[0], size_range[1] + 1))
    main = t % n + 1
    cover = np.full((side, side), main, np.uint8)
    for c in rng.choice(
      [c for c in range(1, n + 1) if c != main], int(rng.integers(0, 3)), replace=False
    ):
      _, poly = _random_object(rng, side, side, main=False)
      cover[_fill(poly, side, side)] = int(c)
    img = _background(side, side, rng)
    for c in np.unique(cover):
      img[cover == c] = class_texture(_CD_TEXTURE_BASE["deepglobe"] + int(c), side, side, rng)[
        cover == c
      ]
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    stem = f"{int(numbers[t])}_sat_{int(rng.integers(0, 6))}{int(rng.integers(0, 6))}"
    for c in np.unique(cover):
      _write_jpeg(root / str(int(c)) / "test" / "origin" / f"{stem}.jpg", img)
      _write_mask(
        root / str(int(c)) / "test" / "groundtruth" / f"{stem}.png", cover == c, rng, rgb=True
      )
  return out


def write_isic2018(
  out: str | os.PathLike,
  images_per_class: Sequence[int] = (4, 3, 3),
  seed: int = 0,
  *,
  class_folders: bool = False,
  top: str = "ISIC",
  size_range: tuple[int, int] = (40, 64),
) -> pathlib.Path:
  """Writes a synthetic ISIC 2018 task 1 training set; returns the manual_dir (``out``).

  Image ids are real ids of PATNet's class_id.csv (``images_per_class`` nevus, melanoma,
  seborrheic_keratosis ones, seeded choice): ``<top>/ISIC2018_Task1-2_Training_Input/<id>.jpg``
  (or ``.../<class>/<id>.jpg`` with ``class_folders``) and 0 / 255 grey masks
  ``<top>/ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png``, plus the
  ATTRIBUTION.txt / LICENSE.txt files of the official archives. Images are not square.
  """
  from data_prep import cross_domain

  out = pathlib.Path(out)
  root = out / top if top else out
  inp, gt = root / cross_domain.ISIC_INPUT, root / cross_domain.ISIC_GROUND_TRUTH
  for d in (inp, gt):
    d.mkdir(parents=True, exist_ok=True)
    (d / "ATTRIBUTION.txt").write_text(
      "synthetic stand-in of the ISIC 2018 archive's attribution file\n"
    )
    (d / "LICENSE.txt").write_text("synthetic stand-in of the ISIC 2018 archive's licence file\n")
  rng = np.random.default_rng(seed)
  by_class = splits.isic2018_image_classes()
  for k, count in enumerate(images_per_class, 1):
    ids = sorted(i for i, c in by_class.items() if c == k)
    for j in np.sort(rng.choice(len(ids), int(count), replace=False)):
      image_id = ids[int(j)]
      h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
      img, mask = _object_scene(rng, h, w, _CD_TEXTURE_BASE["isic2018"] + k)
      folder = inp / str(k) if class_folders else inp
      folder.mkdir(exist_ok=True)
      _write_jpeg(folder / f"{image_id}.jpg", img)
      _write_mask(gt / f"{image_id}_segmentation.png", mask, rng)
  return out


def write_chest_xray(
  out: str | os.PathLike,
  num_shenzhen: int = 5,
  num_montgomery: int = 3,
  seed: int = 0,
  *,
  top: str = "Lung Segmentation",
  size_range: tuple[int, int] = (40, 64),
) -> pathlib.Path:
  """Writes a synthetic Kaggle "Chest X-ray masks and labels" tree; returns the manual_dir (``out``).

  ``<top>/CXR_png/`` holds grey Shenzhen ``CHNCXR_<4 digits>_<0|1>.png`` and RGB Montgomery
  ``MCUCXR_<4 digits>_<0|1>.png`` X-rays (plus two without a mask); ``<top>/masks/`` the
  0 / 255 lung masks, ``<name>_mask.png`` for Shenzhen and ``<name>.png`` for Montgomery
  (the Kaggle naming); ``<top>/test/`` and ``<top>/ClinicalReadings/`` complete the layout.
  """
  from PIL import Image

  out = pathlib.Path(out)
  root = out / top if top else out
  for d in ("CXR_png", "masks", "test", "ClinicalReadings"):
    (root / d).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = [
    (f"CHNCXR_{int(i):04d}_{int(rng.integers(0, 2))}", True)
    for i in np.sort(rng.choice(np.arange(1, 663), num_shenzhen + 1, replace=False))
  ] + [
    (f"MCUCXR_{int(i):04d}_{int(rng.integers(0, 2))}", False)
    for i in np.sort(rng.choice(np.arange(1, 139), num_montgomery + 1, replace=False))
  ]
  unmasked = {names[num_shenzhen][0], names[-1][0]}  # one of each source without a mask
  for name, shenzhen in names:
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    lungs = np.zeros((h, w), bool)
    for cx in (0.3 * w, 0.7 * w):  # two lungs
      ry, rx = rng.uniform(0.3, 0.4) * h, rng.uniform(0.12, 0.18) * w
      lungs |= ((yy - 0.5 * h) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    grey = np.clip(rng.normal(170, 20, (h, w)) - 90 * lungs, 0, 255).astype(np.uint8)
    Image.fromarray(
      grey if shenzhen else np.repeat(grey[..., None], 3, -1), "L" if shenzhen else "RGB"
    ).save(root / "CXR_png" / f"{name}.png")
    (root / "ClinicalReadings" / f"{name}.txt").write_text(
      "normal\n" if name.endswith("_0") else "tuberculosis\n"
    )
    if name not in unmasked:
      _write_mask(
        root / "masks" / (f"{name}_mask.png" if shenzhen else f"{name}.png"),
        lungs,
        rng,
        rgb=not shenzhen,
      )
  Image.fromarray(rng.integers(0, 255, (size_range[0], size_range[0]), np.uint8), "L").save(
    root / "test" / "CHNCXR_0999_0.png"
  )
  return out


CROSS_DOMAIN_WRITERS = {
  "fss1000": write_fss1000,
  "deepglobe": write_deepglobe,
  "isic2018": write_isic2018,
  "chest_xray": write_chest_xray,
}


def write_cross_domain(
  out: str | os.PathLike, dataset: str, seed: int = 0, **kwargs
) -> pathlib.Path:
  """`write_fss1000` / `write_deepglobe` / `write_isic2018` / `write_chest_xray` by dataset name."""
  if dataset not in CROSS_DOMAIN_WRITERS:
    raise ValueError(f"dataset must be one of {sorted(CROSS_DOMAIN_WRITERS)}, got {dataset!r}")
  return CROSS_DOMAIN_WRITERS[dataset](out, seed=seed, **kwargs)


def make_built_cross_domain(
  tmp_dir: str | os.PathLike, dataset: str, seed: int = 0, **raw_kwargs
) -> str:
  """Writes a synthetic cross-domain raw tree and builds it; returns the TFDS ``data_dir``.

  Like `make_built_dataset`: ``tmp_dir/raw_<tag>/`` and ``tmp_dir/tfds_<tag>/`` with a tag
  of all arguments, so a second call with the same arguments reuses the build. Read it with
  ``source.open_split(data_dir, dataset, "test")``.
  """
  from data_prep import build

  if dataset not in CROSS_DOMAIN_WRITERS:
    raise ValueError(f"dataset must be one of {sorted(CROSS_DOMAIN_WRITERS)}, got {dataset!r}")
  tmp_dir = pathlib.Path(tmp_dir)
  tag = "_".join([dataset, str(seed)] + [f"{k}-{v}" for k, v in sorted(raw_kwargs.items())])
  data_dir = tmp_dir / f"tfds_{tag}"
  if not build.is_complete(data_dir, dataset):
    manual_dir = tmp_dir / f"raw_{tag}"
    if manual_dir.exists():
      import shutil

      shutil.rmtree(manual_dir)
    write_cross_domain(manual_dir, dataset, seed, **raw_kwargs)
    build.build(dataset, manual_dir, data_dir, progress=False)
  return os.fspath(data_dir)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--layout", required=True, choices=["voc", "coco"])
  p.add_argument("--out", required=True, help="manual_dir to write")
  p.add_argument("--num_images", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--voc_nested", action="store_true", help="voc: write under VOC2012/")
  p.add_argument(
    "--coco_labels",
    choices=["json", "png", "both"],
    default="json",
    help="coco: instances json, label PNGs or both",
  )
  p.add_argument("--no_lists", action="store_true", help="coco: no train.txt / val.txt")
  args = p.parse_args(argv)
  if pathlib.Path(args.out).exists() and any(pathlib.Path(args.out).iterdir()):
    print(f"error: {args.out} exists and is not empty; choose a new --out", file=sys.stderr)
    return 2
  if args.layout == "voc":
    out = write_voc(args.out, args.num_images, args.seed, nested=args.voc_nested)
    dataset = "pascal5i"
  else:
    out = write_coco(
      args.out, args.num_images, args.seed, labels=args.coco_labels, lists=not args.no_lists
    )
    dataset = "coco20i"
  print(
    f"wrote {args.num_images} synthetic {args.layout} images to {out}\nbuild with:\n  "
    f"python -m data_prep.build --dataset {dataset} --manual_dir {out} --data_dir <data_dir>"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
