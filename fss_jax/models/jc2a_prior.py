"""Computes JC²A's FP_base (CKMM base-class prototypes) once per fold and writes it next to the dataset.

jc2a.md §5.1: for every base class c of the fold and every training image that
can serve as a support of c (≥ 2048 pixels of c, PFENet lists: no intersection
filter), take the frozen backbone's layer4 feature of the deterministically
resized image (§9.1 aspect + pad, no augmentation), the Weighted-GAP of it under
``bilinear_ac(1[label == c], feature size)`` (eps 5e-4), and average over the
pairs of c. Rows are the base classes in ascending id order.

Usage::

  python -m fss_jax.models.jc2a_prior --data_dir ~/tensorflow_datasets --dataset pascal5i \\
      --fold 0 --layers 50 --backbone_init initmodel/resnet50_v2.pth

writes ``<data_dir>/pascal5i/1.0.0/jc2a_fp_base_fold0_resnet50.npz`` (never
overwriting an existing file unless ``--overwrite``). ``--backbone_init`` takes an
ImageNet ``resnet{50,101}_v2.pth`` (or .npz / .safetensors), a PSPNet/BAM
``best.pth`` or an orbax directory written by ``python -m checkpoints.convert``;
it must be the backbone the JC²A model is trained with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax import io as fss_io
from fss_jax import keymaps as km
from fss_jax.models import jc2a
from fss_jax.nn.backbones.resnet import ResNetDeepStem
from fss_jax.ops.resize import resize_bilinear


def _backbone_tree(variables: Mapping[str, Any]) -> dict:
  """{"params", "batch_stats"} of the ResNet, from a full-model or a bare-backbone tree."""
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  if "backbone" in params:
    params, stats = params["backbone"], stats.get("backbone", {})
  if "layer4_0" not in params:
    raise ValueError("the weights hold no deep-stem ResNet (no layer4_0); give the ImageNet / "
                     "PSPNet backbone or a converted JC²A checkpoint")
  return {"params": params, "batch_stats": stats}


def load_backbone(path: str | os.PathLike, layers: int) -> tuple[dict, str]:
  """Reads backbone weights for `ResNetDeepStem(depth=layers)`.

  Args:
    path: a state-dict file (.pth / .pt / .npz / .safetensors; ImageNet ``conv1, bn1, ...``
      or PSPNet ``layer0.N`` naming, detected from the keys) or an orbax directory.
    layers: 50 or 101.

  Returns:
    (ResNet variables, description of the source).
  """
  from checkpoints import io  # pylint: disable=g-import-not-at-top
  path = fss_io.user_path(path)
  if path.is_dir():
    return _backbone_tree(io.read_orbax(path)), f"orbax:{path}"
  if not path.is_file():
    raise FileNotFoundError(f"backbone weights {path} not found")
  with fss_io.local_copy(path) as local:
    sd = km.strip_prefixes(io.read_state_dict(local))
  source = "pspnet" if "layer0.0.weight" in sd else "imagenet"
  rules = jc2a.keymap(layers=layers, source=source, dst=("backbone",))
  if source == "pspnet":
    # Drop everything that is not the backbone (PSPNet heads, or a full PFENet-style model).
    wanted = {r.src for r in rules}
    sd = {k: v for k, v in sd.items() if k in wanted}
  variables = km.convert(sd, rules, model=f"jc2a backbone ({source})")
  return _backbone_tree(variables), f"{source}:{path}"


def random_backbone(layers: int, seed: int = 0) -> dict:
  """A randomly initialised backbone (smoke tests only: the prior is then meaningless)."""
  net = ResNetDeepStem(depth=layers)
  return jax.jit(lambda k: net.init(k, jnp.zeros((1, 33, 33, 3), jnp.float32)))(jax.random.key(seed))


def _make_pair_fn(layers: int, classes: tuple[int, ...], eps: float):
  net = ResNetDeepStem(depth=layers)
  cls = jnp.asarray(classes, jnp.int32)

  @jax.jit
  def fn(variables, images, labels):
    """images [n, S, S, 3] normalised, labels [n, S, S] -> wGAP [n, |C|, D]."""
    f = net.apply(variables, images, train=False)["layer4"]                  # [n, h, w, D]
    onehot = (labels[..., None] == cls).astype(jnp.float32)                   # [n, S, S, |C|]
    m = resize_bilinear(onehot, f.shape[1:3], align_corners=True)             # [n, h, w, |C|]
    num = jnp.einsum("nhwc,nhwd->ncd", m, f)
    return num / (m.sum((1, 2))[..., None] + eps)
  return fn


def compute_fp_base(source, dataset: str, fold: int, *, backbone: Mapping[str, Any],
                    layers: int = 50, size: int = 473, batch_size: int = 4,
                    coco_split: str = "interleaved", max_images: int = 0, eps: float = 5e-4,
                    meta: Mapping[str, Any] | None = None,
                    log: Callable[[str], None] = print) -> jc2a.FPBase:
  """FP_base of one fold (jc2a.md §5.1).

  Args:
    source: the train split (`fss_jax.data.source.SplitSource` or any sequence of
      {"image" uint8 [H, W, 3], "label" uint8 [H, W]} with an ``index.class_pixels``).
    dataset, fold, coco_split: which base classes.
    backbone: ResNet variables (`load_backbone`).
    layers: backbone depth.
    size: test-time resize target (§9.1; 473).
    batch_size: images per backbone call.
    max_images: use only the first N candidate images (0: all) — for quick checks.
    eps: Weighted-GAP eps.
    meta: extra provenance stored in the file.
    log: progress printer.

  Returns:
    `jc2a.FPBase` with value [|C_base|, 2048].
  """
  from fss_jax.data import splits, transforms  # pylint: disable=g-import-not-at-top
  dataset = splits.canonical_dataset(dataset)
  fc = splits.fold_classes(dataset, fold, coco_split=coco_split)
  lists = splits.fold_lists(source.index, dataset, fold, "train", protocol="pfenet",
                            coco_split=coco_split)
  classes = fc.base
  pair = np.zeros((len(source), len(classes)), bool)
  for j, c in enumerate(classes):
    pair[lists.support_positions[c], j] = True
  images = np.flatnonzero(pair.any(1))
  if max_images:
    images = images[:max_images]
  if not len(images):
    raise ValueError(f"{dataset} fold {fold}: no training image has ≥ {splits.MIN_PIXELS} pixels "
                     "of a base class; is the dataset built completely?")
  fn = _make_pair_fn(layers, classes, eps)
  resize, normalize = transforms.AspectResizePad(size=size), transforms.Normalize()
  total = None
  counts = np.zeros(len(classes), np.int64)
  start = time.time()
  for i in range(0, len(images), batch_size):
    pos = images[i:i + batch_size]
    ims, lbs = [], []
    for p in pos:
      ex = source[int(p)]
      im, (lb,) = resize.apply(ex["image"].astype(np.float32), [ex["label"]])
      im, _ = normalize.apply(im, [])
      ims.append(im)
      lbs.append(lb.astype(np.int32))
    valid = pair[pos]                                                        # [n, |C|]
    while len(ims) < batch_size:                                             # fixed shapes
      ims.append(ims[0])
      lbs.append(lbs[0])
      valid = np.concatenate([valid, np.zeros((1, len(classes)), bool)])
    w = np.asarray(fn(backbone, np.stack(ims), np.stack(lbs)), np.float64)  # [n, |C|, D]
    if total is None:
      total = np.zeros((len(classes), w.shape[2]), np.float64)
    total += np.einsum("nc,ncd->cd", valid.astype(np.float64), w)
    counts += valid.sum(0)
    done = min(i + batch_size, len(images))
    if done == len(images) or (i // batch_size) % 50 == 0:
      log(f"  {done}/{len(images)} images, {time.time() - start:.0f}s")
  empty = [c for c, n in zip(classes, counts) if n == 0]
  if len(empty) == len(classes):
    raise ValueError(f"{dataset} fold {fold}: no instance pair found")
  if empty:
    log(f"warning: base classes {empty} have no instance pair; their FP_base rows are 0")
  value = (total / np.maximum(counts, 1)[:, None]).astype(np.float32)
  info = {"dataset": dataset, "fold": int(fold), "layers": int(layers), "size": int(size),
          "coco_split": coco_split, "images": int(len(images)), "empty_classes": empty,
          "eps": eps, **dict(meta or {})}
  return jc2a.FPBase(value=value, classes=tuple(classes), counts=counts, meta=info)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=f"python -m {jc2a.PRIOR_MODULE}", description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", required=True, help="the --data_dir of python -m data_prep.build")
  p.add_argument("--dataset", required=True, help="pascal5i | coco20i")
  p.add_argument("--fold", type=int, required=True)
  p.add_argument("--layers", type=int, default=50, choices=(50, 101))
  p.add_argument("--backbone_init", default="",
                 help="ImageNet resnet*_v2.pth / PSPNet best.pth / .npz / .safetensors / orbax dir")
  p.add_argument("--random_init", action="store_true",
                 help="random backbone (smoke tests only; the prior is then meaningless)")
  p.add_argument("--size", type=int, default=473, help="test-time resize target (§9.1)")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--coco_split", default="interleaved", choices=("interleaved", "contiguous"))
  p.add_argument("--max_images", type=int, default=0, help="0: all candidate images")
  p.add_argument("--output", default="", help="default: next to the dataset")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)

  from fss_jax.data import source as source_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.data.splits import canonical_dataset  # pylint: disable=g-import-not-at-top
  dataset = canonical_dataset(args.dataset)
  out = fss_io.user_path(args.output) if args.output else jc2a.fp_base_path(
      args.data_dir, dataset, args.fold, args.layers)
  if out.exists() and not args.overwrite:
    print(f"{out} exists; pass --overwrite to recompute it", file=sys.stderr)
    return 1
  if bool(args.backbone_init) == bool(args.random_init):
    print("give exactly one of --backbone_init PATH (the backbone JC²A is trained with) or "
          "--random_init (smoke tests)", file=sys.stderr)
    return 2
  if args.random_init:
    backbone, desc = random_backbone(args.layers), "random"
  else:
    backbone, desc = load_backbone(args.backbone_init, args.layers)
  src = source_lib.open_split(args.data_dir, dataset, "train")
  print(f"FP_base for {dataset} fold {args.fold}, ResNet-{args.layers} ({desc}) -> {out}")
  fp = compute_fp_base(src, dataset, args.fold, backbone=backbone, layers=args.layers,
                       size=args.size, batch_size=args.batch_size, coco_split=args.coco_split,
                       max_images=args.max_images, meta={"backbone": desc})
  jc2a.save_fp_base(out, fp, overwrite=args.overwrite)
  print(f"wrote {out}: {fp.value.shape[0]} classes x {fp.value.shape[1]}, pairs per class "
        f"{fp.counts.tolist()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
