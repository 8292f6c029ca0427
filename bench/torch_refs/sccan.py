"""Sam1224/SCCAN: ``model.SCCAN.OneModel`` and its training iteration (train_sccan.py)."""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable

from bench.torch_refs import common

REFERENCE = "Sam1224/SCCAN model.SCCAN.OneModel"


def make_steps(model, optimizers, args, ep: dict, final: Callable):
  """(train_iter, eval_fwd) of train_sccan.py / test_sccan.py for SCCAN-style models.

  Train: ``fix_bn``, ``main + aux_weight1 * aux1 + aux_weight2 * aux2``, every optimiser
  (SGD + AdamW) zeroed and stepped. Eval: argmax of ``final(model output)``.
  """
  fix_bn = common.batchnorm_eval_in_train(model, bool(getattr(args, "fix_bn", False)))
  inputs = {
    "s_x": ep["support_images"],
    "s_y": ep["support_masks"].long(),
    "x": ep["query_image"],
    "y_m": ep["query_mask"].long(),
    "cat_idx": [ep["class_index"].long()],
  }
  aux1, aux2 = float(getattr(args, "aux_weight1", 1.0)), float(getattr(args, "aux_weight2", 1.0))

  def train_iter():
    fix_bn()  # model.train(); model.apply(fix_bn)
    _, main_loss, aux_loss1, aux_loss2 = model(**inputs)
    loss = main_loss + aux1 * aux_loss1 + aux2 * aux_loss2
    for opt in optimizers:
      opt.zero_grad()
    loss.backward()
    for opt in optimizers:
      opt.step()
    return loss

  def eval_fwd():
    return final(model(**inputs)).argmax(dim=1)

  return train_iter, eval_fwd


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """``args = load_cfg_from_cfg_file(config/pascal/pascal_split0_resnet50[_5s].yaml); OneModel(args)``."""
  del train
  common.use_repo(repo, ("model", "util"), "model/SCCAN.py")
  common.shim_torchvision_utils(shims)
  common.shim_timm(shims)
  k = ep["support_images"].shape[1]
  yaml = repo / "config" / "pascal" / f"pascal_split0_resnet50{'_5s' if k == 5 else ''}.yaml"
  args = common.load_yaml_cfg(repo, yaml)
  args.shot = int(k)
  requested: list[str] = []
  sccan = importlib.import_module("model.SCCAN")
  with common.no_checkpoint_files(requested):
    model = sccan.OneModel(args)
  optimizer, optimizer_swin = model.get_optim(
    model, args, LR=args.base_lr
  )  # train_sccan.py get_model()
  if hasattr(model, "freeze_modules"):
    model.freeze_modules(model)
  model = model.to(device)
  train_iter, eval_fwd = make_steps(model, (optimizer, optimizer_swin), args, ep, lambda out: out)
  info = {
    "construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
    f"OneModel(args); model.get_optim(...); model.freeze_modules(model); "
    f"fix_bn={bool(getattr(args, 'fix_bn', False))}",
    "optimizer": "model.get_optim(model, args, LR=args.base_lr) (SGD + AdamW for the transformer)",
    "checkpoint_files_skipped": requested,
  }
  return common.Reference(model, train_iter, eval_fwd, info)
