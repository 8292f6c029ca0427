"""Train-step fixtures from the official PyTorch train scripts, at other shots / sizes / seeds.

Writes ``tests/parity_extra/<model>/train/<model>_train_<K>shot_<H>_b<B>.{npz,json}`` in the format
of ``shared/parity/README.md`` ("Train-step fixtures"): ONE training step of the official code
(its ``get_optim`` and freezing, ``model.train()`` then ``fix_bn``, its poly schedule at the
recorded iteration, its loss combination), with every dropout / drop-path probability set to 0.

The official model is built by the bench builders (``bench/torch_refs/<model>.py``, which also
hold the CPU stand-ins for mmcv / timm and the CUDA-to-CPU proxy); nothing of the reference is
copied here: ``poly_learning_rate`` and ``fix_bn`` are compiled from the checkout's own
``util/util.py`` source. Weights follow the README's rule (``checkpoints.fixtures.regenerate``
rebuilds them from the written json), inputs are synthetic (normalised images exactly
representable in float16, uint8 labels with 255 borders).

Tolerances are derived as the shipped fixtures': the same step is replayed in float64 and with one
CPU thread, the optimizer alone in float64 on the float32 parameters and gradients; per array
``limit = max(floor, 10 x gap)`` rounded up to 1 / 2 / 5 x 10^k (``--no-replay``: the shipped
fixture's ``rtol`` per category for every array instead). A second float32 step from a fresh
model must reproduce every array bit for bit (``self_check``).

Usage (one heavy process at a time; the official checkouts unpacked under /tmp/ref)::

  .venv/bin/python tests/parity_extra/make_train_fixtures.py --model hdmnet --shot 5 --size 97 \
      --batch 2 --global-seed 20251211 --input-seed 2221 --repo /tmp/ref/HDMNet
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import copy
import datetime
import functools
import gc
import json
import math
import os
import pathlib
import sys
import time
import types
import zlib
from typing import Any, Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
if os.fspath(REPO) not in sys.path:
  sys.path.insert(0, os.fspath(REPO))

from checkpoints import fixtures  # noqa: E402

SHARED = REPO.parent / "shared" / "parity"
if not SHARED.is_dir():
  SHARED = pathlib.Path("/work/shared/parity")

GRAD_WHOLE_MAX = 16384
DELTA_WHOLE_MAX = 4096
N_SAMPLE = 4096
# PASCAL-5i fold-0 training pairs implied by the shipped fixtures (len(train_loader) 1052 at batch 4,
# 526 at batch 8, drop_last=True in every train script).
N_TRAIN_PAIRS = 4208
FLOORS = {"losses": 1e-5, "grads": 1e-4, "deltas": 1e-4, "stats": 1e-5}
SAFETY = 10.0
ZERO_ABS = 1e-12
FUNCTIONAL_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                       "feature_alpha_dropout")


# ---------------------------------------------------------------------------
# Per-model description
# ---------------------------------------------------------------------------

def _args_hdmnet(root: pathlib.Path, k: int):
  from bench.torch_refs import hdmnet
  yaml = hdmnet.config_yaml(root / "config" / "pascal", hdmnet.YAML_STEM, k)
  return hdmnet.load_args(root, yaml, k), yaml


def _args_sccan_pahnet(root: pathlib.Path, k: int):
  from bench.torch_refs import common
  yaml = root / "config" / "pascal" / ("5-shot" if k == 5 else "") / "pascal_split0_resnet50.yaml"
  args = common.load_yaml_cfg(root, yaml)
  args.shot = k
  return args, yaml


def _args_sccan(root: pathlib.Path, k: int):
  from bench.torch_refs import common
  yaml = root / "config" / "pascal" / f"pascal_split0_resnet50{'_5s' if k == 5 else ''}.yaml"
  args = common.load_yaml_cfg(root, yaml)
  args.shot = k
  return args, yaml


def symnet_scales(size: int) -> list[int]:
  """Sym-Net pyramid bins for input side ``size``: ``[s, ceil(s/2), ceil(s/4), ceil(s/8)]`` with
  ``s`` the stride-8 feature side (the rule of the shipped 161 fixture, [21, 11, 6, 3], and of
  tests/parity_extra/symnet: 97 -> [13, 7, 4, 2], 113 -> [15, 8, 4, 2]; 473 -> the yaml's
  [60, 30, 15, 8])."""
  side = (size - 1) // 8 + 1
  return [max(1, int(math.ceil(side / 2 ** level))) for level in range(4)]


def _args_symnet(root: pathlib.Path, k: int, size: int):
  from bench.torch_refs import common
  yaml = root / "config" / "pascal" / "pascal_split0_resnet50.yaml"
  args = common.load_yaml_cfg(root, yaml)
  args.shot = k
  args.nlp = "word2vec"
  args.scales = symnet_scales(size)
  return args, yaml


def _fwd_hdm(model, t):
  return model(s_x=t["in_supp_img"], s_y=t["in_supp_label"].long(), x=t["in_query_img"],
               y_m=t["in_query_label"].long(), y_b=t["in_query_label_base"].long(),
               cat_idx=[t["in_cat_idx"]])


def _fwd_sccan(model, t):
  return model(s_x=t["in_supp_img"], s_y=t["in_supp_label"].long(), x=t["in_query_img"],
               y_m=t["in_query_label"].long(), cat_idx=[t["in_cat_idx"]])


def _fwd_symnet(model, t, repo):
  with contextlib.chdir(repo):
    return model(s_x=t["in_supp_img"], s_y=t["in_supp_label"].long(), x=t["in_query_img"],
                 y=t["in_query_label"].long(), y_b=t["in_query_label_base"].long(),
                 cat_idx=[t["in_cat_idx"]], class_chosen=t["in_class_chosen"])


def _total_aux12(out, args, t):
  """main + aux_weight1 * aux1 + aux_weight2 * aux2 (train.py / train_*_PAHNet.py / train_sccan.py)."""
  _, main, aux1, aux2 = out
  terms = {"main": main, "aux1": aux1, "aux2": aux2}
  return terms, main + args.aux_weight1 * aux1 + args.aux_weight2 * aux2


def _total_symnet(out, args, t):
  _, main, a1, a2, a3, a4 = out
  w = args.aux_weight
  terms = {"main": main, "aux1": a1, "aux2": a2, "aux3": a3, "aux4": a4}
  return terms, main + w * a1 + w * a2 + w * a3 + w * a4


def _args_none(fix_bn: bool):
  return types.SimpleNamespace(fix_bn=fix_bn), None


def _fwd_panet(model, t):
  """train.py: ``query_pred, align_loss = model(support_images, support_fg_mask, support_bg_mask,
  query_images)`` with way x shot lists of [B, ...] tensors and one query."""
  s, fore, back = t["in_supp_imgs"], t["in_fore_mask"], t["in_back_mask"]
  wa, sh = s.shape[:2]
  return model([[s[w, k] for k in range(sh)] for w in range(wa)],
               [[fore[w, k] for k in range(sh)] for w in range(wa)],
               [[back[w, k] for k in range(sh)] for w in range(wa)],
               [t["in_qry_imgs"][q] for q in range(t["in_qry_imgs"].shape[0])])


def _total_panet(out, args, t):
  import torch
  query_pred, align_loss = out
  label = torch.cat([t["in_qry_label"][q] for q in range(t["in_qry_label"].shape[0])], dim=0).long()
  query_loss = torch.nn.CrossEntropyLoss(ignore_index=255)(query_pred, label)
  return {"query": query_loss, "align": align_loss}, query_loss + align_loss * 1


def _ep_panet(t):
  """The bench builder's episode (way 0; the forward above passes every way)."""
  s, lab = t["in_supp_imgs"], t["in_supp_label"]
  return {"support_images": s[0].transpose(0, 1), "support_masks": lab[0].transpose(0, 1),
          "query_image": t["in_qry_imgs"][0], "query_mask": t["in_qry_label"][0]}


def _fwd_ssp(model, t):
  k = t["in_supp_img"].shape[1]
  return model([t["in_supp_img"][:, i] for i in range(k)], [t["in_supp_label"][:, i].long() for i in range(k)],
               t["in_query_img"], t["in_query_label"].long())


def _total_ssp(out, args, t):
  import torch
  k = t["in_supp_img"].shape[1]
  crit = torch.nn.CrossEntropyLoss(ignore_index=255)
  mask_q = t["in_query_label"].long()
  mask_s = torch.cat([t["in_supp_label"][:, i].long() for i in range(k)], dim=0)
  q, sf, sp = crit(out[0], mask_q), crit(out[1], mask_q), crit(out[2], mask_s)
  return {"query": q, "self": sf, "support": sp}, q + sf + sp * 0.2


def _fix_bn_ssp(model):
  """main.py: ``model.train()``, then every ``torch.nn.BatchNorm2d`` module ``.eval()``."""
  import torch
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.eval()


BAM_REPO = "/tmp/ref/BAM"      # chunbolang/BAM checkout: the base-learner recipe (train_base.py + yaml)


def _args_pspnet(root: pathlib.Path, k: int, size: int):
  """BAM's ``config/pascal/pascal_split0_resnet50_base.yaml`` read by the HDMNet checkout's loader."""
  from bench.torch_refs import common
  yaml = pathlib.Path(BAM_REPO) / "config" / "pascal" / "pascal_split0_resnet50_base.yaml"
  return common.load_yaml_cfg(root, yaml), yaml


def _build_pspnet(root: pathlib.Path, args, shims: list[str]):
  """BAM train_base.py get_model(): ``model = PSPNet.OneModel(args); optimizer =
  model.get_optim(model, args, LR=args.base_lr)`` with HDMNet's model/PSPNet.py (no freezing)."""
  import importlib
  from bench.torch_refs import common
  common.use_repo(root, ("model", "util"), "model/PSPNet.py")
  requested: list[str] = []
  pspnet = importlib.import_module("model.PSPNet")
  with common.no_checkpoint_files(requested), contextlib.redirect_stdout(sys.stderr):
    model = pspnet.OneModel(args)
  optimizer = model.get_optim(model, args, LR=args.base_lr)
  info = {"construction": "model.PSPNet.OneModel(args) (HDMNet's copy; args = BAM's "
                          "pascal_split0_resnet50_base.yaml); model.get_optim(model, args, LR=args.base_lr)",
          "checkpoint_files_skipped": requested}
  del shims
  return model, [optimizer], info


def _fwd_pspnet(model, t):
  return model(t["in_img"], t["in_label"].long())   # train_base.py: model(x=input, y=target); HDMNet names it y_m


def _total_main(out, args, t):
  return {"main": out[1]}, out[1]


MODELS: dict[str, dict[str, Any]] = {
    "hdmnet": {
        "builder": "hdmnet", "repo": "/tmp/ref/HDMNet", "sub": "", "util": "util/util.py",
        "args": lambda root, k, size: _args_hdmnet(root, k),
        "forward": lambda model, t, root: _fwd_hdm(model, t), "total": _total_aux12,
        # (attribute of the model, kind, part names in call order; a trailing "*" numbers the rest)
        "parts": [("criterion", "module", ["ce_final", "ce_meta", "ce_base"]),
                  ("disstil_loss", "method", ["distil_stage*"])],
        "optimizers": ("optimizer",), "scheduled": "optimizer", "index_split": None,
        "inputs": ("base", "cat"),
    },
    "hdmnet_pahnet": {
        "builder": "hdmnet_pahnet", "repo": "/tmp/ref/PAHNet", "sub": "HDMNet_PAHNet",
        "util": "HDMNet_PAHNet/util/util.py",
        "args": lambda root, k, size: _args_hdmnet(root, k),
        "forward": lambda model, t, root: _fwd_hdm(model, t), "total": _total_aux12,
        "parts": [("criterion", "module", ["ce_final", "ce_meta", "ce_base", "ce_pseudo*"]),
                  ("disstil_loss", "method", ["distil_stage*"])],
        "optimizers": ("optimizer",), "scheduled": "optimizer", "index_split": None,
        "inputs": ("base", "cat"),
    },
    "sccan_pahnet": {
        "builder": "sccan_pahnet", "repo": "/tmp/ref/PAHNet", "sub": "SCCAN_PAHNet",
        "util": "SCCAN_PAHNet/util/util.py",
        "args": lambda root, k, size: _args_sccan_pahnet(root, k),
        "forward": lambda model, t, root: _fwd_sccan(model, t), "total": _total_aux12,
        "parts": [("criterion_ce", "module", ["ce_final", "ce_pseudo*"]),
                  ("criterion_dice", "module", ["dice_meta"])],
        "optimizers": ("optimizer", "optimizer_swin"), "scheduled": "optimizer", "index_split": None,
        "inputs": ("cat",),
    },
    "sccan": {
        "builder": "sccan", "repo": "/tmp/ref/SCCAN", "sub": "", "util": "util/util.py",
        "args": lambda root, k, size: _args_sccan(root, k),
        "forward": lambda model, t, root: _fwd_sccan(model, t), "total": _total_aux12,
        "parts": [],
        "optimizers": ("optimizer", "optimizer_swin"), "scheduled": "optimizer", "index_split": None,
        "inputs": ("cat0",),
    },
    "panet": {
        "builder": "panet", "repo": "/tmp/ref/PANet", "sub": "", "util": None,
        "args": lambda root, k, size: _args_none(False), "ep": _ep_panet,
        "forward": lambda model, t, root: _fwd_panet(model, t), "total": _total_panet,
        "parts": [("alignLoss", "method", ["align_epi*"])],
        "optimizers": ("optimizer",), "schedule": "template", "inputs": ("panet",),
    },
    "ssp": {
        "builder": "ssp", "repo": "/tmp/ref/SSP", "sub": "", "util": None,
        "args": lambda root, k, size: _args_none(True), "fix_bn": _fix_bn_ssp,
        "forward": lambda model, t, root: _fwd_ssp(model, t), "total": _total_ssp,
        "parts": [], "optimizers": ("optimizer",), "schedule": "template", "inputs": (),
    },
    "pspnet": {
        "builder": None, "build": _build_pspnet, "repo": "/tmp/ref/HDMNet", "sub": "", "util": "util/util.py",
        "args": lambda root, k, size: _args_pspnet(root, k, size),
        "forward": lambda model, t, root: _fwd_pspnet(model, t), "total": _total_main,
        "parts": [], "optimizers": ("optimizer",), "scheduled": "optimizer", "index_split": None,
        "inputs": ("pspnet",), "bn_train": True,
    },
    "symnet": {
        "builder": "symnet", "repo": "/tmp/ref/Sym-Net", "sub": "", "util": "util/util.py",
        "args": _args_symnet,
        "forward": _fwd_symnet, "total": _total_symnet,
        "parts": [("criterion", "module", ["ce_final", "ce_meta", "ce_base", "ce_inner*"])],
        "optimizers": ("optimizer",), "scheduled": "optimizer", "index_split": -1,   # train.py hard-codes it
        "inputs": ("base", "cat", "class"),
    },
}


def template_json(model: str) -> dict:
  files = sorted((SHARED / model / "train").glob("*.json"))
  if not files:
    raise FileNotFoundError(f"no shipped train-step json under {SHARED / model / 'train'}")
  return json.loads(files[0].read_text())


# ---------------------------------------------------------------------------
# Reference helpers compiled from the checkout (no copy of its code)
# ---------------------------------------------------------------------------

def reference_functions(path: pathlib.Path, names: tuple[str, ...]) -> dict[str, Callable]:
  """The module-level functions ``names`` of a reference file, compiled from its source alone
  (util/util.py imports plotting libraries that are not needed for these two functions)."""
  tree = ast.parse(path.read_text())
  ns: dict[str, Any] = {}
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name in names:
      exec(compile(ast.Module([node], []), os.fspath(path), "exec"), ns)
  missing = [n for n in names if n not in ns]
  if missing:
    raise LookupError(f"{path} defines no {missing}")
  return ns


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _f16(a: np.ndarray) -> np.ndarray:
  """Rounded to a 1/64 grid: exactly representable in float16 (|x| < 4) and compresses well."""
  return (np.round(np.asarray(a, np.float64) * 64) / 64).astype(np.float16).astype(np.float32)


def _ellipse(rng, h: int, w: int):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  cy, cx = rng.uniform(0.3, 0.7) * (h - 1), rng.uniform(0.3, 0.7) * (w - 1)
  a, b = rng.uniform(0.14, 0.3) * h, rng.uniform(0.14, 0.3) * w
  th = rng.uniform(0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = (dx * np.cos(th) + dy * np.sin(th)) / a
  v = (-dx * np.sin(th) + dy * np.cos(th)) / b
  r = np.sqrt(u * u + v * v)
  label = (r < 1.0).astype(np.uint8)
  border = np.abs(r - 1.0) * min(a, b) < 0.9          # ~2 px wide ignore contour (PASCAL-like)
  label[border] = 255
  return label


def _texture(rng, h: int, w: int, params) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) / max(h - 1, 1)
  mean, fy, fx, ph, amp = params
  img = mean[:, None, None] + amp * np.sin(2 * np.pi * (fy[:, None, None] * yy + fx[:, None, None] * xx)
                                           + ph[:, None, None])
  return img + 0.25 * rng.standard_normal((3, h, w))


def _tex_params(rng):
  return (rng.normal(0.0, 0.8, 3), rng.uniform(0.5, 4.0, 3), rng.uniform(0.5, 4.0, 3),
          rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.3, 0.8))


def _image(rng, label: np.ndarray, obj) -> np.ndarray:
  h, w = label.shape
  bg = _texture(rng, h, w, _tex_params(rng))
  fg = _texture(rng, h, w, obj)
  img = np.where((label == 1)[None], fg, bg)
  return np.clip(img, -3.4, 3.4)


def make_panet_inputs(ways: int, batch: int, shot: int, size: int, seed: int) -> dict[str, np.ndarray]:
  """PANet's layout: supports way x shot x B, one query whose label is j + 1 on the object of way j
  (fore_mask = label == 1, back_mask = label != 1, as PANet's getMask: 255 counts as background)."""
  rng = np.random.default_rng(seed)
  h = w = size
  s_img = np.zeros((ways, shot, batch, 3, h, w), np.float32)
  s_lab = np.zeros((ways, shot, batch, h, w), np.uint8)
  q_img = np.zeros((1, batch, 3, h, w), np.float32)
  q_lab = np.zeros((1, batch, h, w), np.uint8)
  for b in range(batch):
    objs = [_tex_params(rng) for _ in range(ways)]
    lab = np.zeros((h, w), np.uint8)
    img = _texture(rng, h, w, _tex_params(rng))
    for j in range(ways):
      e = _ellipse(rng, h, w)
      fg = _texture(rng, h, w, objs[j])
      img = np.where((e == 1)[None], fg, img)
      lab[e == 1] = j + 1
      lab[e == 255] = 255
    lab[rng.random((h, w)) < 0.002] = 255
    q_img[0, b], q_lab[0, b] = np.clip(img, -3.4, 3.4), lab
    for j in range(ways):
      for k in range(shot):
        sl = _ellipse(rng, h, w)
        sl[rng.random((h, w)) < 0.002] = 255
        s_lab[j, k, b] = sl
        s_img[j, k, b] = _image(rng, sl, objs[j])
  return {"in_supp_imgs": _f16(s_img), "in_qry_imgs": _f16(q_img), "in_supp_label": s_lab,
          "in_fore_mask": (s_lab == 1).astype(np.float32), "in_back_mask": (s_lab != 1).astype(np.float32),
          "in_qry_label": q_lab}


def make_pspnet_inputs(batch: int, size: int, seed: int) -> dict[str, np.ndarray]:
  """Base-class images: background 0 and two objects of base classes 1..15 (255 contours)."""
  rng = np.random.default_rng(seed)
  imgs, labs = [], []
  for _ in range(batch):
    img = _texture(rng, size, size, _tex_params(rng))
    lab = np.zeros((size, size), np.uint8)
    for c in rng.choice(np.arange(1, 16), size=2, replace=False):
      e = _ellipse(rng, size, size)
      img = np.where((e == 1)[None], _texture(rng, size, size, _tex_params(rng)), img)
      lab[e == 1] = c
      lab[e == 255] = 255
    lab[rng.random((size, size)) < 0.002] = 255
    imgs.append(np.clip(img, -3.4, 3.4))
    labs.append(lab)
  return {"in_img": _f16(np.stack(imgs)), "in_label": np.stack(labs)}


def make_inputs(model: str, batch: int, shot: int, size: int, seed: int, ways: int = 1) -> dict[str, np.ndarray]:
  """Episode arrays as the shipped fixtures (NCHW, labels uint8 {0, 1, 255}); ``in_cat_idx`` are
  fold-0 base-class indices (class id - 6), ``in_class_chosen`` = ``in_cat_idx + 6``."""
  spec = MODELS[model]["inputs"]
  if "panet" in spec:
    return make_panet_inputs(ways, batch, shot, size, seed)
  if "pspnet" in spec:
    return make_pspnet_inputs(batch, size, seed)
  rng = np.random.default_rng(seed)
  h = w = size
  q_img, q_lab, s_img, s_lab, base = [], [], [], [], []
  cat = rng.choice(15, size=batch, replace=False).astype(np.int64)
  for b in range(batch):
    obj = _tex_params(rng)
    lab = _ellipse(rng, h, w)
    lab[rng.random((h, w)) < 0.002] = 255
    q_lab.append(lab)
    q_img.append(_image(rng, lab, obj))
    imgs, labs = [], []
    for _ in range(shot):
      sl = _ellipse(rng, h, w)
      sl[rng.random((h, w)) < 0.002] = 255
      labs.append(sl)
      imgs.append(_image(rng, sl, obj))
    s_img.append(np.stack(imgs))
    s_lab.append(np.stack(labs))
    yb = np.zeros((h, w), np.uint8)
    yb[lab == 1] = cat[b] + 1
    other = int(rng.choice([c for c in range(1, 16) if c != cat[b] + 1]))
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    rect = np.zeros((h, w), bool)
    rect[y0:y0 + rng.integers(h // 6, h // 3), x0:x0 + rng.integers(w // 6, w // 3)] = True
    yb[rect & (lab == 0)] = other
    yb[lab == 255] = 255
    base.append(yb)
  out = {"in_query_img": _f16(np.stack(q_img)), "in_supp_img": _f16(np.stack(s_img)),
         "in_supp_label": np.stack(s_lab).astype(np.uint8),
         "in_query_label": np.stack(q_lab).astype(np.uint8)}
  if "base" in spec:
    out["in_query_label_base"] = np.stack(base).astype(np.uint8)
  if "cat" in spec:
    out["in_cat_idx"] = cat
  if "cat0" in spec:                      # SCCAN: cat_idx is only passed along (shipped: zeros)
    out["in_cat_idx"] = np.zeros(batch, np.int64)
  if "class" in spec:
    out["in_class_chosen"] = cat + 6
  return out


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

_NORM_NAMES = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm")


def _owner(model, key: str):
  prefix, _, _ = key.rpartition(".")
  return model.get_submodule(prefix) if prefix else model


def weight_rule(model, key: str, tensor) -> str:
  from torch import nn
  owner = _owner(model, key)
  is_norm = any(n in type(owner).__name__ for n in _NORM_NAMES)
  leaf = key.rpartition(".")[2]
  if leaf in ("num_batches_tracked", "running_mean", "running_var"):
    return leaf
  if is_norm and leaf == "weight":
    return "norm_weight"
  if is_norm and leaf == "bias":
    return "norm_bias"
  if key.endswith("bias"):
    return "bias"
  if tensor.ndim == 4 and isinstance(owner, nn.Conv2d) and leaf == "weight":
    return "conv"
  if tensor.ndim == 2 and isinstance(owner, nn.Linear) and leaf == "weight":
    return "linear"
  if tensor.ndim >= 2:
    return "other_nd"
  return "override"


def aliases_of(model) -> dict[str, str]:
  """{alias key: key} for state-dict entries that are the same tensor as an earlier key (PSPNet's
  ``encoder.0..4`` = ``layer0..4``)."""
  seen, out = {}, {}
  for key, t in model.state_dict(keep_vars=True).items():
    ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else (id(t),)
    if ident in seen:
      out[key] = seen[ident]
    else:
      seen[ident] = key
  return out


def state_dict_table(model, global_seed: int, template: dict) -> tuple[dict, dict, dict[str, np.ndarray], list[str]]:
  """(state_dict json, overrides, values, notes): every key with its rule / owner / check,
  validated by ``checkpoints.fixtures.regenerate`` and against the shipped json's rules."""
  aliases = aliases_of(model)
  sd = {k: v for k, v in model.state_dict().items() if k not in aliases}
  tmpl = {e["key"]: e for e in template["state_dict"]["keys"]}
  entries, overrides, notes = [], {}, []
  mismatched = []
  for key, t in sd.items():
    rule = weight_rule(model, key, t)
    owner = type(_owner(model, key))
    e = {"key": key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "rule": rule,
         "owner": f"{owner.__module__}.{owner.__qualname__}"}
    if rule == "override":
      overrides[key] = {"shape": list(t.shape), "dtype": e["dtype"],
                        "value": t.detach().cpu().numpy().tolist()}
    if key in tmpl and tmpl[key]["rule"] != rule:
      mismatched.append(f"{key}: {rule} here, {tmpl[key]['rule']} in the shipped json")
    entries.append(e)
  if mismatched:
    raise RuntimeError("weight rules differ from the shipped fixture: " + "; ".join(mismatched[:10]))
  values = {}
  for e in entries:
    key, shape, rule = e["key"], tuple(e["shape"]), e["rule"]
    if rule == "num_batches_tracked":
      v = np.zeros(shape, np.int64)
    elif rule == "override":
      o = overrides[key]
      v = np.asarray(o["value"], dtype=o["dtype"]).reshape(shape)
    else:
      n = np.random.default_rng(zlib.crc32(key.encode("utf-8")) ^ global_seed).standard_normal(shape)
      v = fixtures._rule_value(rule, n.astype(np.float32), shape)
    values[key] = v
    e["check"] = [float(v.astype(np.float64).sum()), float(v.reshape(-1)[0]) if v.size else 0.0]
  meta = {"GLOBAL_SEED": global_seed, "state_dict": {"keys": entries}, "overrides": overrides}
  again = fixtures.regenerate(meta)
  for k, v in values.items():
    if not np.array_equal(again[k], v):
      raise RuntimeError(f"checkpoints.fixtures.regenerate does not reproduce {k}")
  only_here = sorted(set(sd) - set(tmpl))
  only_there = sorted(set(tmpl) - set(sd))
  if only_here:
    notes.append(f"state-dict keys not in the shipped {template['fixture']} train fixture: {only_here}")
  if only_there:
    notes.append(f"shipped-fixture keys absent here: {only_there}")
  table = {"num_keys": len(entries),
           "rule_counts": dict(collections.Counter(e["rule"] for e in entries)), "keys": entries}
  return table, overrides, values, notes


# ---------------------------------------------------------------------------
# Dropout off, functional guards
# ---------------------------------------------------------------------------

def disable_dropout(model) -> dict[str, Any]:
  from torch import nn
  changed, already = [], 0
  for name, m in model.named_modules():
    cls = f"{type(m).__module__}.{type(m).__qualname__}"
    if isinstance(m, nn.modules.dropout._DropoutNd):
      if m.p:
        changed.append({"module": name, "class": cls, "attribute": "p", "original": float(m.p)})
        m.p = 0.0
      else:
        already += 1
    if isinstance(m, nn.MultiheadAttention):
      if m.dropout:
        changed.append({"module": name, "class": cls, "attribute": "dropout", "original": float(m.dropout)})
        m.dropout = 0.0
      else:
        already += 1
    for attr, val in list(vars(m).items()):
      if attr.startswith("_") or isinstance(val, bool) or not isinstance(val, (int, float)):
        continue
      if "drop" in attr.lower() and not isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)):
        if val:
          changed.append({"module": name, "class": cls, "attribute": attr, "original": float(val)})
          setattr(m, attr, 0.0)
        else:
          already += 1
  return {"modules_set_to_zero": changed, "modules_already_zero": already}


@contextlib.contextmanager
def dropout_guard(counts: dict[str, int]):
  """Counts the functional dropout calls and raises on any with p > 0 in training."""
  import torch.nn.functional as F
  saved = {}

  def wrap(name, fn):
    @functools.wraps(fn)
    def inner(*a, **k):
      p = k.get("p", a[1] if len(a) > 1 else 0.5)
      training = k.get("training", a[2] if len(a) > 2 else True)
      counts[name] = counts.get(name, 0) + 1
      if training and p:
        raise RuntimeError(f"F.{name} called with p={p} in training: a dropout was not disabled")
      return fn(*a, **k)
    return inner

  def wrap_sdpa(fn):
    @functools.wraps(fn)
    def inner(*a, **k):
      p = k.get("dropout_p", a[4] if len(a) > 4 else 0.0)
      counts["scaled_dot_product_attention"] = counts.get("scaled_dot_product_attention", 0) + 1
      if p:
        raise RuntimeError(f"scaled_dot_product_attention with dropout_p={p}")
      return fn(*a, **k)
    return inner

  for name in FUNCTIONAL_DROPOUTS:
    saved[name] = getattr(F, name)
    setattr(F, name, wrap(name, saved[name]))
  saved["scaled_dot_product_attention"] = F.scaled_dot_product_attention
  F.scaled_dot_product_attention = wrap_sdpa(saved["scaled_dot_product_attention"])
  try:
    yield
  finally:
    for name, fn in saved.items():
      setattr(F, name, fn)


# ---------------------------------------------------------------------------
# Loss-part recorders
# ---------------------------------------------------------------------------

class PartRecorder:
  """Wraps the model's loss modules / methods; keeps every returned tensor in call order.

  Values are read after the forward, so a tensor the reference later changes IN PLACE (HDMNet's
  ``distil_loss += ...`` on the tensor the first ``disstil_loss`` call returned) is recorded as
  the reference leaves it, as in the shipped fixtures.
  """

  def __init__(self, model, parts):
    self.calls: dict[str, list] = {}
    self.names = {}
    for attr, kind, names in parts:
      self.calls[attr] = []
      self.names[attr] = names
      target = getattr(model, attr)
      if kind == "module":
        orig = target.forward

        def fwd(*a, _orig=orig, _attr=attr, **k):
          out = _orig(*a, **k)
          self.calls[_attr].append(out)
          return out
        target.forward = fwd
      else:
        orig = target

        def meth(*a, _orig=orig, _attr=attr, **k):
          out = _orig(*a, **k)
          self.calls[_attr].append(out)
          return out
        setattr(model, attr, meth)

  def values(self) -> dict[str, Any]:
    out = {}
    for attr, calls in self.calls.items():
      names = self.names[attr]
      fixed = [n for n in names if not n.endswith("*")]
      star = [n[:-1] for n in names if n.endswith("*")]
      for i, t in enumerate(calls):
        if i < len(fixed):
          name = fixed[i]
        elif star:
          name = f"{star[0]}{i - len(fixed)}"
        else:
          raise RuntimeError(f"{attr}: {len(calls)} calls, only {len(fixed)} names")
        out[f"part_{name}"] = t.detach().clone()
    return out


# ---------------------------------------------------------------------------
# One official step
# ---------------------------------------------------------------------------

def _closure(fn) -> dict[str, Any]:
  return {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__ or ())}


def _json_safe(v):
  if isinstance(v, (list, tuple)):
    return [_json_safe(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _json_safe(x) for k, x in v.items()}
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  try:
    return float(v)
  except (TypeError, ValueError):
    return repr(v)


def _prefix(keys: list[str]) -> str:
  parts = [k.split(".") for k in keys]
  common = []
  for level in zip(*[p[:-1] for p in parts]):
    if len(set(level)) != 1:
      break
    common.append(level[0])
  return ".".join(common)


def len_train_loader(args) -> int:
  return N_TRAIN_PAIRS // int(args.batch_size)


def run_step(model_name: str, root: pathlib.Path, arrays: dict[str, np.ndarray], values: dict | None,
             *, shot: int, size: int, curr_iter: int, dtype: str = "float32", threads: int = 2,
             global_seed: int, template: dict, full: bool = False) -> dict[str, Any]:
  """Builds the official model and runs one step; returns losses / grads / deltas (numpy) and,
  with ``full``, everything the json describes."""
  import torch
  from bench import torch_refs
  from bench.torch_refs import symnet as symnet_ref

  spec = MODELS[model_name]
  torch.set_num_threads(threads)
  torch.use_deterministic_algorithms(True)
  tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
  torch.set_default_dtype(tdtype)
  torch.manual_seed(0)
  tensor_float = torch.Tensor.float
  if dtype == "float64":
    # the references cast masks / predictions with .float(); in the float64 replay that would put
    # float32 tensors into float64 layers: .float() follows the default dtype there (no-op in float32)
    torch.Tensor.float = lambda self, memory_format=torch.preserve_format: self.to(
        torch.float64, memory_format=memory_format)
  try:
    t = {}
    for k, v in arrays.items():
      tv = torch.from_numpy(np.ascontiguousarray(v))
      if v.dtype == np.float32:
        tv = tv.to(tdtype)
      elif v.dtype == np.uint8:
        tv = tv.long()
      t[k] = tv
    if spec.get("build") or "ep" in spec:
      ep = spec["ep"](t) if "ep" in spec else None
    else:
      ep = {"query_image": t["in_query_img"], "support_images": t["in_supp_img"],
            "support_masks": t["in_supp_label"], "query_mask": t["in_query_label"],
            "query_base_label": t.get("in_query_label_base", t["in_query_label"]),
            "class_index": t.get("in_cat_idx"), "class_id": t.get("in_class_chosen")}
    shims: list[str] = []
    sub = root / spec["sub"] if spec["sub"] else root
    if spec.get("build"):
      args, yaml = spec["args"](sub, shot, size)
      model, opts, info = spec["build"](root, args, shims)
    else:
      build = torch_refs.builder(spec["builder"])
      saved_scales = symnet_ref.pyramid_scales
      symnet_ref.pyramid_scales = symnet_scales      # the shipped fixtures' bins (see symnet_scales)
      try:
        ref = build(root, ep, train=True, device=torch.device("cpu"), shims=shims)
      finally:
        symnet_ref.pyramid_scales = saved_scales
      model, info = ref.model, ref.info
      cv = _closure(ref.train_iter)
      opts = cv["optimizers"] if "optimizers" in cv else (cv["optimizer"] if "optimizer" in cv else cv["opt"],)
      args, yaml = spec["args"](sub, shot, size)
    optimizers = list(zip(spec["optimizers"], opts))
    fns = reference_functions(root / spec["util"], ("poly_learning_rate", "fix_bn")) if spec["util"] else {}
    if model_name == "symnet":
      mod = sys.modules["model.SymNet"]
      if not hasattr(mod, "_fixture_load_obj"):
        mod._fixture_load_obj = mod.load_obj
      orig_load = mod._fixture_load_obj
      mod.load_obj = lambda name: orig_load(name).to(torch.get_default_dtype())

    # weights
    if values is None:
      table, overrides, values, sd_notes = state_dict_table(model, global_seed, template)
    else:
      table = overrides = sd_notes = None
    aliases = aliases_of(model)
    full_sd = {k: torch.from_numpy(np.array(v)) for k, v in values.items()}
    full_sd.update({a: full_sd[k] for a, k in aliases.items()})
    missing = model.load_state_dict(full_sd, strict=True)
    del missing
    disabled = disable_dropout(model)

    # training mode as the train script
    model.train()
    if spec.get("fix_bn"):
      spec["fix_bn"](model)
    elif getattr(args, "fix_bn", False):      # BAM's train_base.py: model.train() only (no fix_bn)
      model.apply(fns["fix_bn"])
    disabled2 = disable_dropout(model)          # mode changes never re-enable p, check anyway
    assert not disabled2["modules_set_to_zero"]

    # schedule
    sched_label = spec.get("scheduled", "optimizer")
    sched_opt = dict(optimizers)[sched_label]
    poly = None
    if spec.get("schedule", "poly") == "poly":
      n_loader = len_train_loader(args)
      max_iter = int(args.epochs) * n_loader
      index_split = spec["index_split"] if spec["index_split"] is not None else int(args.index_split)
      poly = functools.partial(fns["poly_learning_rate"], base_lr=args.base_lr, max_iter=max_iter,
                               power=args.power, index_split=index_split, warmup=args.warmup,
                               warmup_step=n_loader // 2)
      with contextlib.redirect_stdout(sys.stderr):
        poly(sched_opt, curr_iter=curr_iter)
    else:      # PANet's MultiStepLR / SSP's step decay: the constructor lr at the first iteration
      n_loader = max_iter = index_split = None

    # step
    recorder = PartRecorder(model, spec["parts"])
    hinges = []
    if model_name == "symnet":
      orig_hinge = model.hard_triplet_dig

      def hinge(*a, **k):
        v = orig_hinge(*a, **k)
        hinges.append(float(v))
        return v
      model.hard_triplet_dig = hinge
    counts: dict[str, int] = {}
    t0 = time.time()
    with dropout_guard(counts):
      out = spec["forward"](model, t, root)
      terms, total = spec["total"](out, args, t)
      for _, opt in optimizers:
        opt.zero_grad()
      total.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    grads, before = {}, {}
    held = []
    for label, opt in optimizers:
      for gi, g in enumerate(opt.param_groups):
        for p in g["params"]:
          k = names[id(p)]
          held.append((label, gi, k, p))
          before[k] = p.detach().clone()
          if p.grad is not None:
            grads[k] = p.grad.detach().clone().numpy()
    for _, opt in optimizers:
      opt.step()
    step_s = time.time() - t0
    deltas = {k: (p.detach() - before[k]).numpy() for _, _, k, p in held}
    stats = {}
    bn_names = {}
    for n, m in model.named_modules():
      if "BatchNorm" in type(m).__name__ and m.training and m.track_running_stats:
        stats[f"{n}.running_mean"] = m.running_mean.detach().clone().numpy()
        stats[f"{n}.running_var"] = m.running_var.detach().clone().numpy()
        bn_names[n] = int(m.num_batches_tracked)
    losses = {**{k: v.detach().clone() for k, v in terms.items()}, "total": total.detach().clone(),
              **recorder.values()}
    losses = {k: np.asarray(v.numpy(), np.float64).reshape(()) if v.numel() == 1 else v.numpy()
              for k, v in losses.items()}
    res = {"losses": losses, "grads": grads, "deltas": deltas, "stats": stats, "step_s": step_s,
           "before": {k: v.numpy() for k, v in before.items()} if full else None}
    if not full:
      return res

    # -- everything the json describes -------------------------------------------------------
    held_ids = {id(p) for *_, p in held}
    all_params = dict(model.named_parameters())
    frozen_keys = [n for n, p in all_params.items() if not p.requires_grad]
    not_in_opt = [n for n, p in all_params.items() if p.requires_grad and id(p) not in held_ids]
    no_grad = [k for _, _, k, p in held if p.grad is None]
    rg_false = [k for _, _, k, p in held if not p.requires_grad]
    opt_json = []
    for step_order, (label, opt) in enumerate(optimizers):
      cls = type(opt)
      groups = []
      for gi, g in enumerate(opt.param_groups):
        keys = [names[id(p)] for p in g["params"]]
        groups.append({"index": gi, "module": _prefix(keys) if len(keys) > 1 else keys[0].rpartition(".")[0],
                       "hparams": _json_safe({k: v for k, v in sorted(g.items()) if k != "params"}),
                       "num_tensors": len(keys), "numel": int(sum(p.numel() for p in g["params"])),
                       "keys": keys})
      opt_json.append({"label": label, "type": f"{cls.__module__}.{cls.__qualname__}",
                       "step_order": step_order, "defaults": _json_safe(opt.defaults),
                       "param_groups": groups})
    # lr samples of the reference schedule
    samples = {}
    its = sorted({1, 2, 100, n_loader, max_iter // 2, max_iter - 1, curr_iter}) if poly else []
    for it in its:
      dummy = types.SimpleNamespace(param_groups=[{"lr": 0.0} for _ in sched_opt.param_groups])
      with contextlib.redirect_stdout(sys.stderr):
        poly(dummy, curr_iter=it)
      samples[str(it)] = [g["lr"] for g in dummy.param_groups]
    bn = [n for n, m in model.named_modules() if "BatchNorm" in type(m).__name__]
    bn_train = [n for n in bn if model.get_submodule(n).training]
    eval_mods = [n for n, m in model.named_modules() if n and not m.training]
    modules = {}
    for n, m in model.named_modules():
      cls = type(m)
      modules[n or "<root>"] = f"{cls.__module__}.{cls.__qualname__}({m.extra_repr()})"
    res.update({
        "table": table, "overrides": overrides, "sd_notes": sd_notes, "values": values,
        "optimizers": opt_json, "held": [(label, gi, k, list(p.shape), int(p.numel()),
                                          float(opt_lr), float(wd))
                                         for (label, gi, k, p), opt_lr, wd in
                                         [((lb, g, k, p), dict(optimizers)[lb].param_groups[g]["lr"],
                                           dict(optimizers)[lb].param_groups[g].get("weight_decay", 0.0))
                                          for lb, g, k, p in held]],
        "frozen": {"requires_grad_false": frozen_keys, "trainable_not_in_optimizer": not_in_opt,
                   "in_optimizer_without_grad": no_grad, "in_optimizer_requires_grad_false": rg_false},
        "schedule": {"max_iter": max_iter, "len_train_loader": n_loader, "index_split": index_split,
                     "warmup_step": n_loader // 2 if n_loader else None, "samples": samples, "poly": bool(poly),
                     "lr_per_group": [g["lr"] for g in sched_opt.param_groups],
                     "other_lr": {lb: [g["lr"] for g in o.param_groups]
                                  for lb, o in optimizers if lb != sched_label}},
        "batchnorm": {"training": bn_train, "eval": len(bn) - len(bn_train), "num_batches_tracked_after": bn_names},
        "aliases": aliases,
        "eval_modules": eval_mods, "modules": modules, "disabled": disabled, "dropout_calls": counts,
        "args": args, "yaml": yaml, "shims": shims, "info": info, "hinges": hinges,
    })
    return res
  finally:
    torch.Tensor.float = tensor_float
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(2)


# ---------------------------------------------------------------------------
# Arrays, gaps, tolerances
# ---------------------------------------------------------------------------

def _is_prime(n: int) -> bool:
  return n >= 2 and all(n % d for d in range(2, int(math.isqrt(n)) + 1))


def stride_for(shape) -> int:
  numel = int(np.prod(shape))
  s = max(5, math.ceil(numel / N_SAMPLE))
  while not (_is_prime(s) and all(d % s for d in shape)):
    s += 1
  return s


def summaries(g: np.ndarray, stride: int) -> dict[str, np.ndarray]:
  flat = g.astype(np.float64).reshape(-1)
  out = {"__stride": flat[::stride]}
  if g.ndim >= 2:
    out["__rownorm"] = np.sqrt((g.astype(np.float64).reshape(g.shape[0], -1) ** 2).sum(1))
    m = np.moveaxis(g.astype(np.float64), 1, 0)
    out["__colnorm"] = np.sqrt((m.reshape(m.shape[0], -1) ** 2).sum(1))
  return out


def npz_arrays(res: dict, held_shapes: dict[str, list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """The out_loss_ / grad_ / delta_ arrays of a step (float32; summaries as the README)."""
  out = {}
  for k, v in res["losses"].items():
    out[f"out_loss_{k}"] = np.asarray(v, np.float32).reshape(())
  strides = {}
  for key, shape in held_shapes.items():
    numel = int(np.prod(shape))
    if numel > GRAD_WHOLE_MAX or numel > DELTA_WHOLE_MAX:
      strides[key] = stride_for(shape)
    if key in res["grads"]:
      g = res["grads"][key]
      if numel <= GRAD_WHOLE_MAX:
        out[f"grad_{key}"] = np.asarray(g, np.float32)
      else:
        for suf, a in summaries(g, strides[key]).items():
          out[f"grad_{key}{suf}"] = np.asarray(a, np.float32)
    d = res["deltas"][key]
    if numel <= DELTA_WHOLE_MAX:
      out[f"delta_{key}"] = np.asarray(d, np.float32)
    else:
      out[f"delta_{key}__stride"] = np.asarray(d.reshape(-1)[::strides[key]], np.float32)
  for key, v in (res.get("stats") or {}).items():
    out[f"stat_{key}"] = np.asarray(v, np.float32)
  return out, strides


def gap(a, b) -> dict[str, float]:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = float(np.max(np.abs(a))) if a.size else 0.0
  max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
  return {"max_abs": max_abs, "scale": scale, "rel": (max_abs / scale) if scale else None}


def nice_up(x: float) -> float:
  e = math.floor(math.log10(x))
  for m in (1, 2, 5, 10):
    v = float(f"{m}e{e}")
    if v >= x * (1 - 1e-9):
      return v
  return float(f"1e{e + 1}")


def category(name: str) -> str:
  return {"out": "losses", "grad": "grads", "delta": "deltas", "stat": "stats"}[name.split("_")[0]]


def short(name: str) -> str:
  for p in ("out_loss_", "grad_", "delta_", "stat_"):
    if name.startswith(p):
      return name[len(p):]
  return name


def optimizer_only_f64(rec: dict, opt_json: list[dict]) -> dict[str, np.ndarray]:
  """The official optimizers applied in float64 to the float32 parameters and gradients."""
  import torch
  out = {}
  for o in opt_json:
    mod, _, cls = o["type"].rpartition(".")
    cls = getattr(sys.modules[mod] if mod in sys.modules else __import__(mod, fromlist=[cls]), cls)
    groups, tensors = [], {}
    for g in o["param_groups"]:
      ps = []
      for k in g["keys"]:
        p = torch.tensor(rec["before"][k], dtype=torch.float64)
        if k in rec["grads"]:
          p.grad = torch.tensor(rec["grads"][k], dtype=torch.float64)
        tensors[k] = (p, p.detach().clone())
        ps.append(p)
      hp = {k: (tuple(v) if isinstance(v, list) else v) for k, v in g["hparams"].items()}
      groups.append({"params": ps, **hp})
    opt = cls(groups)
    opt.step()
    for k, (p, p0) in tensors.items():
      out[k] = (p.detach() - p0).numpy()
  return out


# ---------------------------------------------------------------------------
# The fixture
# ---------------------------------------------------------------------------

TENSOR_DESC = {
    "grad": ".grad after loss.backward() (torch layout of the parameter)",
    "grad__stride": "strided sample flat[::stride] of .grad (C-order flatten of the torch-layout tensor; "
                    "stride in params[key].stride)",
    "grad__rownorm": "L2 norm of .grad over every axis but 0 (one value per output channel / row), float64 "
                     "accumulation",
    "grad__colnorm": "L2 norm of .grad over every axis but 1 (one value per input channel / column), float64 "
                     "accumulation",
    "delta": "parameter after one official optimizer step minus before (float32, torch layout)",
    "delta__stride": "strided sample of the delta at the entries of grad_<key>__stride",
}


def build_json(model_name: str, template: dict, rec: dict, arrays: dict, npz: dict, strides: dict,
               tol: dict, gaps: dict, self_check: dict, a: argparse.Namespace, name: str) -> dict:
  meta = copy.deepcopy(template)
  args = rec["args"]
  root = pathlib.Path(a.repo).resolve()
  meta["fixture"] = model_name
  meta["variant"] = "parity_extra"
  meta["GLOBAL_SEED"] = a.global_seed
  meta["input_seed"] = a.input_seed
  import torch
  import torchvision
  meta["generated_with"] = {"torch": torch.__version__.split("+")[0],
                            "torchvision": torchvision.__version__.split("+")[0],
                            "numpy": np.__version__, "device": "cpu", "dtype": "float32",
                            "date": datetime.date.today().isoformat(),
                            "generator": "tests/parity_extra/make_train_fixtures.py " + " ".join(a.argv)}
  cfg = meta["config"]
  if rec["yaml"] is not None and pathlib.Path(rec["yaml"]).resolve().is_relative_to(root):
    cfg["yaml"] = os.fspath(pathlib.Path(rec["yaml"]).resolve().relative_to(root))   # (else the template's:
                                                                                      # PSPNet's yaml is BAM's)
  vals = {}
  for k in cfg.get("values", {}):
    v = getattr(args, k, cfg["values"][k])
    vals[k] = _json_safe(v)
  vals["shot"] = a.shot
  if model_name == "panet":
    cfg["task"].update({"n_ways": a.ways, "n_shots": a.shot, "n_queries": 1})
    cfg["batch_size"] = a.batch
    cfg["input_size"] = [a.size, a.size]
    vals = None
  elif model_name == "ssp":
    cfg["argparse_defaults"]["shot"] = a.shot
  if vals is not None:
    cfg["values"] = vals
  if model_name == "symnet":
    cfg["changed"]["scales"] = [[60, 30, 15, 8], list(args.scales)]
  if rec["schedule"]["poly"]:
    cfg["len_train_loader"] = rec["schedule"]["len_train_loader"]
    cfg["len_train_loader_rule"] = (f"{N_TRAIN_PAIRS} // batch_size ({N_TRAIN_PAIRS} PASCAL-5i fold-0 training "
                                    "pairs, the count implied by the shipped fixtures; drop_last=True)")
  cfg["input_size_used"] = [a.size, a.size]
  by = (f"bench/torch_refs/{MODELS[model_name]['builder']}.py" if MODELS[model_name]["builder"]
        else "tests/parity_extra/make_train_fixtures.py")
  meta["construction"] = (template["construction"] + f"  (built by {by}: "
                          + rec["info"].get("construction", "") + ")")
  meta["input_shapes"] = {k: list(v.shape) for k, v in arrays.items()}
  st = meta["step"]
  st["modules_in_eval_mode"] = rec["eval_modules"]
  st["threads"] = 2
  meta["optimizers"] = rec["optimizers"]
  sch = meta["schedule"]
  s = rec["schedule"]
  if not s["poly"]:
    sch["lr_per_group"] = s["lr_per_group"]
  else:
    sch.update({"curr_iter": a.curr_iter, "max_iter": s["max_iter"],
                "max_iter_rule": f"epochs * len(train_loader); len(train_loader) = {s['len_train_loader']} "
                                 "here (see config)",
                "base_lr": float(args.base_lr), "power": float(args.power), "index_split": s["index_split"],
                "warmup": bool(args.warmup), "warmup_step": s["warmup_step"],
                "lr_per_group": s["lr_per_group"], "lr_samples": s["samples"]})
    for lb, lrs in s["other_lr"].items():
      sch[f"{lb}_lr"] = lrs
  params = {}
  for label, gi, key, shape, numel, lr, wd in rec["held"]:
    has_grad = key in rec["grads"]
    params[key] = {"optimizer": label, "group": gi, "shape": shape, "numel": numel, "lr": lr,
                   "weight_decay": wd,
                   "grad": ("whole" if numel <= GRAD_WHOLE_MAX else "summary") if has_grad else "none",
                   "delta": "whole" if numel <= DELTA_WHOLE_MAX else "summary",
                   "stride": strides.get(key)}
  meta["params"] = params
  fr = rec["frozen"]
  meta["frozen"] = {
      "requires_grad_false": {"count": len(fr["requires_grad_false"]),
                              "by_top_module": dict(collections.Counter(k.split(".")[0]
                                                                        for k in fr["requires_grad_false"])),
                              "keys": fr["requires_grad_false"]},
      "trainable_not_in_optimizer": fr["trainable_not_in_optimizer"],
      "trainable_not_in_optimizer_note": (
          "requires_grad True and given a gradient by the backward, but held by no optimizer: never "
          "updated (no grad_ / delta_ array, no params entry)" if fr["trainable_not_in_optimizer"] else ""),
      "in_optimizer_requires_grad_false": fr["in_optimizer_requires_grad_false"],
      "in_optimizer_without_grad": fr["in_optimizer_without_grad"],
      "in_optimizer_without_grad_note": template["frozen"].get("in_optimizer_without_grad_note", "")
      if fr["in_optimizer_without_grad"] else "",
  }
  if rec["batchnorm"]["training"]:
    meta["batchnorm"] = {"training": rec["batchnorm"]["training"], "eval": rec["batchnorm"]["eval"],
                         "stats_recorded": True, "note": template["batchnorm"].get("note", ""),
                         "num_batches_tracked_after": rec["batchnorm"]["num_batches_tracked_after"]}
  else:
    meta["batchnorm"] = {"training": [], "eval": rec["batchnorm"]["eval"], "stats_recorded": False,
                         "note": "every BatchNorm is in eval mode during the step (running statistics unchanged, "
                                 "no stat_ arrays)", "num_batches_tracked_after": {}}
  dis = meta["disabled"]
  dis["modules_set_to_zero"] = rec["disabled"]["modules_set_to_zero"]
  dis["modules_already_zero"] = rec["disabled"]["modules_already_zero"]
  dis["functional_dropout_calls_during_step"] = {n: rec["dropout_calls"].get(n, 0)
                                                 for n in FUNCTIONAL_DROPOUTS + ("scaled_dot_product_attention",)}
  meta["summaries"]["grad_whole_max_numel"] = GRAD_WHOLE_MAX
  meta["summaries"]["delta_whole_max_numel"] = DELTA_WHOLE_MAX
  meta["summaries"]["n_sample"] = N_SAMPLE
  meta["state_dict"] = rec["table"]
  meta["overrides"] = rec["overrides"]
  meta["state_dict_aliases"] = rec["aliases"]
  tensors = {}
  for k, v in npz.items():
    if k in template["tensors"] and k.startswith(("in_", "out_")):
      e = dict(template["tensors"][k])
    elif k.startswith("out_loss_part_"):
      e = {"desc": template["loss_terms"].get("part_*", "individual loss call"), "layout": "scalar"}
    elif k.startswith("out_loss_"):
      e = {"desc": template["loss_terms"].get(short(k), ""), "layout": "scalar"}
    elif k.startswith("stat_"):
      like = next((v2 for k2, v2 in template["tensors"].items()
                   if k2.startswith("stat_") and k2.endswith(k.rpartition(".")[2])), {"desc": "", "layout": "C"})
      e = {"desc": like["desc"], "layout": like.get("layout", "C")}
    else:
      cat, _, rest = k.partition("_")
      suf = "__" + rest.partition("__")[2] if "__" in rest else ""
      e = {"desc": TENSOR_DESC[cat + suf],
           "layout": {"": "param", "__stride": "flat", "__rownorm": "axis0", "__colnorm": "axis1"}[suf]}
    e["shape"] = list(v.shape)
    e["dtype"] = str(v.dtype)
    if not k.startswith("in_"):
      e["category"] = category(k)
      e["key"] = short(k).partition("__")[0] if not k.startswith("out_") else None
      e["scale"] = float(np.max(np.abs(v.astype(np.float64)))) if v.size else 0.0
    tensors[k] = e
  meta["tensors"] = tensors
  meta["modules"] = rec["modules"]
  meta["tolerance_suggestion"] = tol
  meta["gap_f32_f64"] = gaps["f64"]
  meta["gap_threads"] = gaps["threads"]
  meta["self_check"] = self_check
  data_dependent = ("hinge values", "pixel counts per episode", "threshold branches per call")
  notes = [n for n in template["notes"] if not any(d in n for d in data_dependent)]
  if rec["hinges"]:
    notes.append("support triplet hinge values per (shot, item) in call order (0 = inactive hinge, no "
                 f"gradient): {[round(h, 6) for h in rec['hinges']]}")
  notes += rec["sd_notes"]
  notes.append(f"parity_extra fixture: {a.shot}-shot, {a.size} px, B={a.batch}, GLOBAL_SEED {a.global_seed}, "
               f"input_seed {a.input_seed}, curr_iter {a.curr_iter}; made by "
               "tests/parity_extra/make_train_fixtures.py from the official checkout built by bench/torch_refs "
               "(stand-ins instead of mmcv / mmseg / timm where the builder uses them).")
  notes.append(tol.get("note", ""))
  meta["notes"] = [n for n in notes if n]
  work = [f"bench/torch_refs shims: {s}" for s in rec["shims"]]
  work.append("poly_learning_rate and fix_bn compiled from the checkout's util/util.py source alone (ast; the "
              "file's plotting imports are not loaded): unmodified reference functions.")
  work.append("torch.load was replaced during model construction by a stub returning an empty mapping "
              f"(Module.load_state_dict ignores it); checkpoint paths requested: "
              f"{', '.join(rec['info'].get('checkpoint_files_skipped', []))}")
  if model_name == "symnet":
    work.append(f"Sym-Net asserts that the first pyramid bin equals the feature size; scales = {list(args.scales)} "
                f"for input {a.size} (ceil rule of the shipped fixture).")
    work.append("model.SymNet.load_obj (word2vec table) is wrapped to return the default dtype: a no-op in "
                "float32, float64 in the float64 replay. cwd = the reference tree during the forward.")
  meta["workarounds"] = work
  meta["files"] = {"npz": f"{name}.npz", "json": f"{name}.json"}
  return meta


def tolerances(npz: dict, gaps_flat: dict[str, float | None], template: dict, use_template: bool,
               proxy_f64: bool = False) -> dict:
  t = template["tolerance_suggestion"]
  shipped = t.get("per_array") or {}
  per_array, rtol = {}, {}
  for k, v in npz.items():
    if k.startswith("in_"):
      continue
    cat = category(k)
    if not np.any(v):
      per_array[k] = None
      continue
    if use_template:
      lim = float(t["rtol"][cat])
    else:
      g = gaps_flat.get(k) or 0.0
      lim = max(FLOORS[cat], nice_up(SAFETY * g) if g > 0 else FLOORS[cat])
      if proxy_f64 and cat in ("losses", "grads", "stats"):
        lim = max(lim, float(shipped.get(k) or t["rtol"][cat]))
    per_array[k] = lim
    rtol[cat] = max(rtol.get(cat, 0.0), lim)
  for cat in ("losses", "grads", "deltas", "stats"):
    rtol.setdefault(cat, FLOORS[cat] if not use_template else float(t["rtol"].get(cat, FLOORS[cat])))
  out = {k: t[k] for k in ("metric", "basis", "grads_from_own_backward", "deltas_from_reference_grads")
         if k in t}
  out.update({"per_array": per_array, "rtol": rtol, "zero_abs": ZERO_ABS, "safety_factor": SAFETY,
              "floors": FLOORS, "rule": t.get("rule", "")})
  if use_template:
    out["note"] = ("per_array = the shipped fixture's rtol of the category for every array (no float64 / "
                   "thread replay was run); null where the reference array is exactly 0")
  elif proxy_f64:
    out["note"] = ("tolerances: one-thread replay and optimizer-only float64 replay (deltas) measured here; NO "
                   "float64 model replay (memory), so a loss / grad limit is max(floor, 10 x one-thread gap, "
                   "the shipped fixture's per_array limit of the same npz name, or its category rtol for "
                   "names it lacks)")
  else:
    out["note"] = ("tolerances measured as the shipped fixtures': float64 replay (default dtype float64, model "
                   "built and stepped in float64), one-thread replay, optimizer-only float64 replay for deltas")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, choices=sorted(MODELS))
  p.add_argument("--shot", type=int, default=1)
  p.add_argument("--size", type=int, default=97)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--ways", type=int, default=1, help="PANet only")
  p.add_argument("--global-seed", type=int, default=20251211)
  p.add_argument("--input-seed", type=int, default=2221)
  p.add_argument("--curr-iter", type=int, default=1)
  p.add_argument("--repo", default="", help="root of the official checkout (default: MODELS[model]['repo'])")
  p.add_argument("--out-dir", default="")
  p.add_argument("--name", default="")
  p.add_argument("--no-replay", action="store_true", help="shipped rtol per category instead of replays")
  p.add_argument("--no-f64", action="store_true",
                 help="no float64 model replay (memory: the SCCAN family needs ~2x its 10 GB float32 peak); "
                      "losses / grads take max(10 x one-thread gap, the shipped fixture's limit of the same "
                      "array or, for arrays it lacks, its category rtol)")
  p.add_argument("--no-self-check", action="store_true")
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  spec = MODELS[a.model]
  a.repo = a.repo or spec["repo"]
  root = pathlib.Path(a.repo).resolve()
  template = template_json(a.model)
  ways = f"{a.ways}way" if a.model == "panet" and a.ways != 1 else ""
  name = a.name or f"{a.model}_train_{ways}{a.shot}shot_{a.size}_b{a.batch}"
  out_dir = pathlib.Path(a.out_dir) if a.out_dir else REPO / "tests" / "parity_extra" / a.model / "train"
  out_dir.mkdir(parents=True, exist_ok=True)

  arrays = make_inputs(a.model, a.batch, a.shot, a.size, a.input_seed, a.ways)
  kw = dict(shot=a.shot, size=a.size, curr_iter=a.curr_iter, global_seed=a.global_seed, template=template)
  t0 = time.time()
  rec = run_step(a.model, root, arrays, None, full=True, **kw)
  print(f"[{a.model}] recorded step: {rec['step_s']:.1f} s (total {time.time() - t0:.1f} s); losses "
        + ", ".join(f"{k}={float(np.asarray(v).reshape(-1)[0]):.6g}" for k, v in rec["losses"].items()),
        file=sys.stderr)
  values = rec["values"]
  held_shapes = {k: shape for _, _, k, shape, *_ in rec["held"]}
  npz, strides = npz_arrays(rec, held_shapes)

  gaps_flat: dict[str, float | None] = {}
  gaps = {"f64": {}, "threads": {}}
  if not a.no_replay:
    def compare(other: dict, label: str):
      o_npz, _ = npz_arrays(other, held_shapes)
      by_cat: dict[str, dict] = {"losses": {}, "grads": {}, "stats": {}}
      for k, v in npz.items():
        cat = category(k)
        if cat == "deltas":
          continue
        gi = gap(v, o_npz[k]) if k in o_npz else {"max_abs": None, "scale": None, "rel": None}
        by_cat[cat][short(k)] = gi
        if gi["rel"] is not None:
          gaps_flat[k] = max(gaps_flat.get(k) or 0.0, gi["rel"])
      d_end = {short(k): gap(v, o_npz[k]) for k, v in npz.items() if category(k) == "deltas"}
      return by_cat, d_end
    gc.collect()
    t1 = time.time()
    one = run_step(a.model, root, arrays, values, threads=1, **kw)
    th, th_d = compare(one, "threads")
    gaps["threads"] = {"threads": [2, 1], **th, "deltas_end_to_end": th_d,
                       "note": "max|other-thread-count step - recorded step| / max|recorded|, per array; the "
                               "tolerance basis is max(gap_f32_f64, gap_threads) for losses, grads and stats"}
    del one
    gc.collect()
    print(f"[{a.model}] one-thread replay {time.time() - t1:.1f} s", file=sys.stderr)
    t1 = time.time()
    if a.no_f64:
      fg, fd = {"losses": {}, "grads": {}, "stats": {}, "note": "no float64 model replay (--no-f64)"}, {}
    else:
      f64 = run_step(a.model, root, arrays, values, dtype="float64", **kw)
      fg, fd = compare(f64, "f64")
      del f64
      gc.collect()
      print(f"[{a.model}] float64 replay {time.time() - t1:.1f} s", file=sys.stderr)
    d64 = optimizer_only_f64(rec, rec["optimizers"])
    d64_npz = {}
    for key, shape in held_shapes.items():
      d = d64[key]
      if int(np.prod(shape)) <= DELTA_WHOLE_MAX:
        d64_npz[f"delta_{key}"] = d
      else:
        d64_npz[f"delta_{key}__stride"] = d.reshape(-1)[::strides[key]]
    dopt = {}
    for k, v in npz.items():
      if category(k) == "deltas":
        gi = gap(v, d64_npz[k])
        dopt[short(k)] = gi
        gaps_flat[k] = gi["rel"]
    gaps["f64"] = {**fg, "deltas_optimizer_only": dopt, "deltas_end_to_end": fd,
                   "deltas_end_to_end_note": "float32 model step vs float64 model step: for AdamW this is "
                   "dominated by entries whose gradient changes sign between the runs (the first Adam step is "
                   "about -lr * sign(g)); informational"}
  tol = tolerances(npz, gaps_flat, template, a.no_replay, proxy_f64=a.no_f64)

  self_check = {"method": "fresh model, weights rebuilt from this json only (checkpoints.fixtures.regenerate), "
                          "strict load, same inputs, same step: every loss, grad and delta array bit-identical",
                "result": "not run"}
  if not a.no_self_check:
    gc.collect()
    t1 = time.time()
    meta_w = {"GLOBAL_SEED": a.global_seed, "state_dict": rec["table"], "overrides": rec["overrides"]}
    again = run_step(a.model, root, arrays, fixtures.regenerate(meta_w), **kw)
    a_npz, _ = npz_arrays(again, held_shapes)
    diff = sorted(k for k in npz if k not in a_npz or not np.array_equal(npz[k], a_npz[k]))
    self_check["result"] = "bit-identical" if not diff else f"DIFFERS: {diff[:20]}"
    print(f"[{a.model}] self-check {time.time() - t1:.1f} s: {self_check['result']}", file=sys.stderr)
    del again

  all_arrays = {**arrays, **npz}
  meta = build_json(a.model, template, rec, arrays, all_arrays, strides, tol, gaps, self_check, a, name)
  npz_path = out_dir / f"{name}.npz"
  np.savez_compressed(npz_path, **all_arrays)
  meta["npz_bytes"] = npz_path.stat().st_size
  (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
  worst = {}
  for k, v in tol["per_array"].items():
    if v is not None:
      worst[category(k)] = max(worst.get(category(k), 0.0), v)
  print(json.dumps({"npz": os.fspath(npz_path), "npz_bytes": meta["npz_bytes"], "arrays": len(all_arrays),
                    "losses": {k: float(np.asarray(v).reshape(-1)[0]) for k, v in rec["losses"].items()},
                    "rtol": tol["rtol"], "self_check": self_check["result"],
                    "trainable_not_in_optimizer": rec["frozen"]["trainable_not_in_optimizer"],
                    "in_optimizer_without_grad": len(rec["frozen"]["in_optimizer_without_grad"])}, indent=1))
  return 0 if self_check["result"] in ("bit-identical", "not run") else 1


if __name__ == "__main__":
  sys.exit(main())
