"""Computes JC²A's FP_base (CKMM base-class prototypes) once per fold and writes it next to the dataset.

jc2a.md §5.1: for every base class c of the fold and every training image that
can serve as a support of c (≥ 2048 pixels of c, PFENet lists: no intersection
filter), take the frozen backbone's layer4 feature of the deterministically
resized image (§9.1 aspect + pad, no augmentation), the Weighted-GAP of it under
``bilinear_ac(1[label == c], feature size)`` (eps 5e-4), and average over the
pairs of c. Rows are the base classes in ascending id order.

Usage::

  python -m fss_jax.train.jc2a_prior --data_dir ~/tensorflow_datasets --dataset pascal5i \\
      --fold 0 --layers 50 --backbone_init W0

writes ``<data_dir>/pascal5i/1.0.0/jc2a_fp_base_fold0_resnet50.npz`` (never
overwriting an existing file unless ``--overwrite``). ``--backbone_init`` takes converted
weights holding the deep-stem ResNet (W0: ``initmodel/resnet50_v2.pth`` or a PSPNet/BAM
``best.pth`` converted with ``python -m checkpoints.convert --model jc2a``, the weights the
JC²A run starts from, ``--config.init=W0``); a state-dict file is refused with that command.

FP_base is a frozen parameter of `fss_jax.models.jc2a.JC2A` (``params/fp_base``): a run
that starts from scratch fills it from this file (`fp_base_params`, the registry's
``derived_params``), and every checkpoint carries it, so evaluation and
``fss_jax.predict`` never read the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fss_jax import io as fss_io
from fss_jax.nn.backbones.resnet import ResNetDeepStem
from fss_jax.ops.resize import resize_bilinear

FP_BASE_FORMAT = 1
PRIOR_MODULE = "fss_jax.train.jc2a_prior"


# ---------------------------------------------------------------------------
# The FP_base file
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FPBase:
  """Base-class feature prototypes of one fold, as stored in the file.

  Attributes:
    value: float32 [|C_base|, D] (15 × 2048 PASCAL, 60 × 2048 COCO), rows in ``classes`` order.
    classes: the fold's base class ids, ascending.
    counts: int [|C_base|], instance pairs averaged per class.
    meta: provenance (dataset, fold, layers, image size, backbone weights).
  """

  value: np.ndarray
  classes: tuple[int, ...] = ()
  counts: np.ndarray | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class FPBaseMissingError(FileNotFoundError):
  """The FP_base file of a fold does not exist; the message holds the command that writes it."""


def fp_base_filename(fold: int, layers: int) -> str:
  return f"jc2a_fp_base_fold{int(fold)}_resnet{int(layers)}.npz"


def fp_base_path(data_dir: str | os.PathLike, dataset: str, fold: int, layers: int) -> epath.Path:
  """Where the prior command writes FP_base: next to the built dataset."""
  from fss_jax.data.source import dataset_dir

  return dataset_dir(data_dir, dataset) / fp_base_filename(fold, layers)


def prior_command(data_dir, dataset: str, fold: int, layers: int) -> str:
  return (
    f"python -m {PRIOR_MODULE} --data_dir {os.fspath(data_dir)} --dataset {dataset} "
    f"--fold {fold} --layers {layers} --backbone_init <resnet{layers}_v2.pth converted with "
    f"python -m checkpoints.convert --model jc2a>"
  )


def save_fp_base(path: str | os.PathLike, fp: FPBase, *, overwrite: bool = False) -> os.PathLike:
  """Writes `fp` atomically (`fss_jax.io.atomic_write`, local or gs://); never replaces a file
  unless ``overwrite``."""
  try:
    return fss_io.atomic_write(
      path,
      lambda f: np.savez(
        f,
        fp_base=np.asarray(fp.value, np.float32),
        classes=np.asarray(fp.classes, np.int64),
        counts=np.asarray(fp.counts if fp.counts is not None else [], np.int64),
        meta=np.str_(json.dumps(dict(fp.meta), sort_keys=True)),
        format=np.int64(FP_BASE_FORMAT),
      ),
      overwrite=overwrite,
    )
  except FileExistsError:
    raise FileExistsError(
      f"{path} exists; pass overwrite=True (--overwrite) to replace it"
    ) from None


def load_fp_base(path: str | os.PathLike, *, command: str | None = None) -> FPBase:
  """Reads a file written by `save_fp_base`.

  Raises:
    FPBaseMissingError: the file does not exist (the message names the command).
    ValueError: the file is not an FP_base file or is damaged.
  """
  file = fss_io.user_path(path)
  if not file.is_file():
    how = command or f"python -m {PRIOR_MODULE} --help"
    raise FPBaseMissingError(
      f"JC²A's CKMM needs the fold's base-class prototypes FP_base, but {file} does not exist.\n"
      f"Compute it once per fold (frozen backbone, base-class training pairs) with:\n  {how}\n"
      f"or disable CKMM (model.use_ckmm=False, the Table 3 ablations)."
    )
  try:
    with file.open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
      value = z["fp_base"].astype(np.float32)
      fp = FPBase(
        value=value,
        classes=tuple(int(c) for c in z["classes"]),
        counts=z["counts"],
        meta=json.loads(str(z["meta"])),
      )
  except Exception as e:
    raise ValueError(
      f"{path} is not a readable JC²A FP_base file ({type(e).__name__}: {e}); "
      f"delete it and run the prior command again"
    ) from e
  if value.ndim != 2 or not np.all(np.isfinite(value)):
    raise ValueError(f"{path}: FP_base must be a finite [n_base, D] array, got {value.shape}")
  return fp


def fp_base_params(config) -> dict[str, np.ndarray]:
  """``{"fp_base": [n_base, D]}`` of the run's fold (`ModelSpec.derived_params` of JC²A).

  Called once, when a training run starts from scratch; the value then lives in every
  checkpoint. Reads ``fp_base_path(config.data.data_dir, config.dataset, config.fold,
  config.model_fields.layers)``; {} when CKMM is off.

  Raises:
    FPBaseMissingError: the file does not exist (the message names the prior command).
    ValueError: the file belongs to another backbone depth, dataset, fold or split, or its
      row count differs from ``model_fields.num_base_classes``.
  """
  from fss_jax.data import splits

  fields = config.model_fields
  if not fields.get("use_ckmm", True):
    return {}
  layers = int(fields.get("layers", 50))
  data_dir, dataset, fold = config.data.data_dir, config.dataset, int(config.fold)
  path = fp_base_path(data_dir, dataset, fold, layers)
  fp = load_fp_base(path, command=prior_command(data_dir, dataset, fold, layers))
  if fp.meta.get("layers") not in (None, layers):
    raise ValueError(
      f"{path} was computed with ResNet-{fp.meta.get('layers')} but the "
      f"model uses ResNet-{layers}; run the prior command for --layers {layers}"
    )
  if fp.meta.get("fold") not in (None, fold):
    raise ValueError(f"{path} belongs to fold {fp.meta.get('fold')}, not fold {fold}")
  coco_split = config.data.get("coco_split", "interleaved")
  base = splits.fold_classes(dataset, fold, coco_split=coco_split).base
  if fp.classes and tuple(fp.classes) != tuple(base):
    raise ValueError(
      f"{path} holds the base classes {list(fp.classes)}, but {dataset} fold {fold} "
      f"trains on {list(base)} (another dataset or COCO split); run the prior "
      f"command again with --overwrite"
    )
  n = int(fields.get("num_base_classes", len(base)))
  if fp.value.shape[0] != n:
    raise ValueError(
      f"{path} holds {fp.value.shape[0]} base-class prototypes but "
      f"model_fields.num_base_classes={n}; set it to {fp.value.shape[0]}"
    )
  return {"fp_base": fp.value}


def _backbone_tree(variables: Mapping[str, Any]) -> dict:
  """{"params", "batch_stats"} of the ResNet, from a full-model or a bare-backbone tree."""
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  if "backbone" in params:
    params, stats = params["backbone"], stats.get("backbone", {})
  if "layer4_0" not in params:
    raise ValueError(
      "the weights hold no deep-stem ResNet (no layer4_0); give the ImageNet / "
      "PSPNet backbone or a converted JC²A checkpoint"
    )
  return {"params": params, "batch_stats": stats}


def load_backbone(path: str | os.PathLike, layers: int) -> tuple[dict, str]:
  """Reads converted backbone weights for `ResNetDeepStem(depth=layers)`.

  Args:
    path: converted weights (``python -m checkpoints.convert --model jc2a``: an ImageNet
      ``resnet{layers}_v2.pth`` or a PSPNet ``best.pth``), a JC²A training workdir or step.
    layers: 50 or 101.

  Returns:
    (ResNet variables, description of the source).

  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: a state-dict file (convert it first)
      or weights without the deep-stem ResNet.
  """
  from fss_jax.train import state as state_lib

  root = fss_io.user_path(path)
  if root.is_file():
    raise ValueError(
      f"--backbone_init {path} is a state-dict file; convert it first: python -m "
      f"checkpoints.convert --model jc2a --model-arg layers={layers} --src {path} "
      f"--dst W0, then pass --backbone_init W0 (the --config.init of the JC²A run)"
    )
  if not root.is_dir():
    raise FileNotFoundError(f"backbone weights {path} not found")
  return _backbone_tree(state_lib.read_variables(root)), f"orbax:{path}"


def random_backbone(layers: int, seed: int = 0) -> dict:
  """A randomly initialised backbone (smoke tests only: the prior is then meaningless)."""
  net = ResNetDeepStem(depth=layers)
  return jax.jit(lambda k: net.init(k, jnp.zeros((1, 33, 33, 3), jnp.float32)))(
    jax.random.key(seed)
  )


def _make_pair_fn(layers: int, classes: tuple[int, ...], eps: float):
  net = ResNetDeepStem(depth=layers)
  cls = jnp.asarray(classes, jnp.int32)

  @jax.jit
  def fn(variables, images, labels):
    """images [n, S, S, 3] normalised, labels [n, S, S] -> wGAP [n, |C|, D]."""
    f = net.apply(variables, images, train=False)["layer4"]  # [n, h, w, D]
    onehot = (labels[..., None] == cls).astype(jnp.float32)  # [n, S, S, |C|]
    m = resize_bilinear(onehot, f.shape[1:3], align_corners=True)  # [n, h, w, |C|]
    num = jnp.einsum("nhwc,nhwd->ncd", m, f)
    return num / (m.sum((1, 2))[..., None] + eps)

  return fn


def compute_fp_base(
  source,
  dataset: str,
  fold: int,
  *,
  backbone: Mapping[str, Any],
  layers: int = 50,
  size: int = 473,
  batch_size: int = 4,
  coco_split: str = "interleaved",
  max_images: int = 0,
  eps: float = 5e-4,
  meta: Mapping[str, Any] | None = None,
  log: Callable[[str], None] = print,
) -> FPBase:
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
    `FPBase` with value [|C_base|, 2048].
  """
  from fss_jax.data import splits, transforms

  dataset = splits.canonical_dataset(dataset)
  fc = splits.fold_classes(dataset, fold, coco_split=coco_split)
  lists = splits.fold_lists(
    source.index, dataset, fold, "train", protocol="pfenet", coco_split=coco_split
  )
  classes = fc.base
  pair = np.zeros((len(source), len(classes)), bool)
  for j, c in enumerate(classes):
    pair[lists.support_positions[c], j] = True
  images = np.flatnonzero(pair.any(1))
  if max_images:
    images = images[:max_images]
  if not len(images):
    raise ValueError(
      f"{dataset} fold {fold}: no training image has ≥ {splits.MIN_PIXELS} pixels "
      "of a base class; is the dataset built completely?"
    )
  fn = _make_pair_fn(layers, classes, eps)
  resize, normalize = transforms.AspectResizePad(size=size), transforms.Normalize()
  total = None
  counts = np.zeros(len(classes), np.int64)
  start = time.time()
  for i in range(0, len(images), batch_size):
    pos = images[i : i + batch_size]
    ims, lbs = [], []
    for p in pos:
      ex = source[int(p)]
      im, (lb,) = resize.apply(ex["image"].astype(np.float32), [ex["label"]])
      im, _ = normalize.apply(im, [])
      ims.append(im)
      lbs.append(lb.astype(np.int32))
    valid = pair[pos]  # [n, |C|]
    while len(ims) < batch_size:  # fixed shapes
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
  info = {
    "dataset": dataset,
    "fold": int(fold),
    "layers": int(layers),
    "size": int(size),
    "coco_split": coco_split,
    "images": int(len(images)),
    "empty_classes": empty,
    "eps": eps,
    **dict(meta or {}),
  }
  return FPBase(value=value, classes=tuple(classes), counts=counts, meta=info)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=f"python -m {PRIOR_MODULE}", description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", required=True, help="the --data_dir of python -m data_prep.build")
  p.add_argument("--dataset", required=True, help="pascal5i | coco20i")
  p.add_argument("--fold", type=int, required=True)
  p.add_argument("--layers", type=int, default=50, choices=(50, 101))
  p.add_argument(
    "--backbone_init",
    default="",
    help="converted weights with the deep-stem ResNet (checkpoints.convert --model "
    "jc2a of resnet*_v2.pth or a PSPNet best.pth)",
  )
  p.add_argument(
    "--random_init",
    action="store_true",
    help="random backbone (smoke tests only; the prior is then meaningless)",
  )
  p.add_argument("--size", type=int, default=473, help="test-time resize target (§9.1)")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--coco_split", default="interleaved", choices=("interleaved", "contiguous"))
  p.add_argument("--max_images", type=int, default=0, help="0: all candidate images")
  p.add_argument("--output", default="", help="default: next to the dataset")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)

  from fss_jax.data import source as source_lib
  from fss_jax.data.splits import canonical_dataset

  dataset = canonical_dataset(args.dataset)
  out = (
    fss_io.user_path(args.output)
    if args.output
    else fp_base_path(args.data_dir, dataset, args.fold, args.layers)
  )
  if out.exists() and not args.overwrite:
    print(f"error: {out} exists; pass --overwrite to recompute it", file=sys.stderr)
    return 1
  if bool(args.backbone_init) == bool(args.random_init):
    print(
      "error: give exactly one of --backbone_init PATH (the backbone JC²A is trained with) or "
      "--random_init (smoke tests)",
      file=sys.stderr,
    )
    return 2
  if args.random_init:
    backbone, desc = random_backbone(args.layers), "random"
  else:
    backbone, desc = load_backbone(args.backbone_init, args.layers)
  src = source_lib.open_split(args.data_dir, dataset, "train")
  print(f"FP_base for {dataset} fold {args.fold}, ResNet-{args.layers} ({desc}) -> {out}")
  fp = compute_fp_base(
    src,
    dataset,
    args.fold,
    backbone=backbone,
    layers=args.layers,
    size=args.size,
    batch_size=args.batch_size,
    coco_split=args.coco_split,
    max_images=args.max_images,
    meta={"backbone": desc},
  )
  save_fp_base(out, fp, overwrite=args.overwrite)
  print(
    f"wrote {out}: {fp.value.shape[0]} classes x {fp.value.shape[1]}, pairs per class "
    f"{fp.counts.tolist() if fp.counts is not None else []}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
