"""Sunbaoquan/Sym-Net: ``model.SymNet.SymNet`` and its training iteration (train.py)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import pathlib

from bench.torch_refs import common, cuda_proxy

REFERENCE = "Sunbaoquan/Sym-Net model.SymNet.SymNet"


def pyramid_scales(size: int) -> list[int]:
  """``args.scales`` for input side ``size``: SymNet asserts ``scales[0]`` = the feature side.

  Feature side ``(size - 1) // 8 + 1`` (stride 8), then ``round(side / 2^l)`` (half to even),
  the rule of fss-jax's ``scales=()`` (``fss_jax.models.symnet.default_scales``), so both sides
  use the same bins at any size: 473 -> [60, 30, 15, 8] (the yaml), 641 -> [81, 40, 20, 10]
  (the COCO yaml), 241 -> [31, 16, 8, 4] (parity fixture).
  """
  side = (size - 1) // 8 + 1
  return [max(1, int(round(side / 2**level))) for level in range(4)]


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """``args = load_cfg_from_cfg_file(config/pascal/pascal_split0_resnet50.yaml); args.nlp = 'word2vec';
  args.scales = pyramid_scales(H); SymNet(args, cls_type='Base')`` as train.py get_model()."""
  del train
  common.use_repo(repo, ("model", "util"), "model/SymNet.py")
  h, w = ep["query_image"].shape[-2:]
  if h != w:
    raise ValueError(f"Sym-Net needs square inputs (pyramid bins are square), got {h}x{w}")
  k = int(ep["support_images"].shape[1])
  yaml = (
    repo / "config" / "pascal" / "pascal_split0_resnet50.yaml"
  )  # the checkout's only PASCAL yaml
  args = common.load_yaml_cfg(repo, yaml)
  args.shot = k
  args.nlp = "word2vec"  # train.py / test.py --nlp default
  args.scales = pyramid_scales(int(h))
  in_repo = functools.partial(
    contextlib.chdir, repo
  )  # forward reads ./embeddings/word2vec_pascal.pkl
  requested: list[str] = []
  symnet = importlib.import_module("model.SymNet")
  cuda_proxy.patch_module(symnet, device, shims)
  with common.no_checkpoint_files(requested), in_repo():
    model = symnet.SymNet(args, cls_type="Base")
  optimizer = model.get_optim(model, args)  # train.py: get_optim, then freeze_modules
  model.freeze_modules(model)
  model = model.to(device)
  x, s_x, s_y = ep["query_image"], ep["support_images"], ep["support_masks"].long()
  y, y_b = ep["query_mask"].long(), ep["query_base_label"].long()
  cat_idx = [ep["class_index"].long()]
  class_chosen = ep["class_id"].long()
  aux = float(args.aux_weight)
  fix_bn = common.batchnorm_eval_in_train(model, bool(args.fix_bn))

  def train_iter():
    fix_bn()
    with in_repo():
      _, main_loss, aux_loss1, aux_loss2, aux_loss3, aux_loss4 = model(
        s_x=s_x, s_y=s_y, x=x, y=y, y_b=y_b, cat_idx=cat_idx, class_chosen=class_chosen
      )
    loss = main_loss + aux * aux_loss1 + aux * aux_loss2 + aux * aux_loss3 + aux * aux_loss4
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  def eval_fwd():
    with in_repo():
      out = model(s_x=s_x, s_y=s_y, x=x, y=y, y_b=y_b, cat_idx=cat_idx, class_chosen=class_chosen)
    return out[0].argmax(dim=1)

  info = {
    "construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
    f"args.nlp='word2vec'; args.scales={args.scales}; SymNet(args, cls_type='Base'); "
    f"model.freeze_modules(model); fix_bn={bool(args.fix_bn)}; cwd = the checkout",
    "optimizer": f"model.get_optim(model, args) (SGD lr={args.base_lr}, momentum={args.momentum}, "
    f"weight_decay={args.weight_decay})",
    "loss": f"main + {aux:g} * (meta CE + base CE + mean inner-bin CE + triplet) (train.py)",
    "checkpoint_files_skipped": requested,
  }
  return common.Reference(model, train_iter, eval_fwd, info)
