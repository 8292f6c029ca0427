"""Sam1224/SCCAN: ``model.SCCAN.OneModel`` and its training iteration (train_sccan.py)."""

from __future__ import annotations

import importlib
import pathlib

from bench.torch_refs import common

REFERENCE = "Sam1224/SCCAN model.SCCAN.OneModel"


def build(repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]) -> common.Reference:
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
  optimizer, optimizer_swin = model.get_optim(model, args, LR=args.base_lr)   # train_sccan.py get_model()
  if hasattr(model, "freeze_modules"):
    model.freeze_modules(model)
  model = model.to(device)
  fix_bn = common.batchnorm_eval_in_train(model) if getattr(args, "fix_bn", False) else (lambda: None)
  x, s_x, s_y = ep["query_image"], ep["support_images"], ep["support_masks"].long()
  y_m = ep["query_mask"].long()
  cat_idx = [ep["class_index"].long()]
  aux1, aux2 = float(getattr(args, "aux_weight1", 1.0)), float(getattr(args, "aux_weight2", 1.0))

  def train_iter():
    fix_bn()                              # train_sccan.py: model.train(); model.apply(fix_bn)
    _, main_loss, aux_loss1, aux_loss2 = model(s_x=s_x, s_y=s_y, x=x, y_m=y_m, cat_idx=cat_idx)
    loss = main_loss + aux1 * aux_loss1 + aux2 * aux_loss2
    optimizer.zero_grad()
    optimizer_swin.zero_grad()
    loss.backward()
    optimizer.step()
    optimizer_swin.step()
    return loss

  def eval_fwd():
    out = model(s_x=s_x, s_y=s_y, x=x, y_m=y_m, cat_idx=cat_idx)
    return out.argmax(dim=1)

  info = {"construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
                          f"OneModel(args); model.get_optim(...); model.freeze_modules(model); "
                          f"fix_bn={bool(getattr(args, 'fix_bn', False))}",
          "optimizer": "model.get_optim(model, args, LR=args.base_lr) (SGD + AdamW for the transformer)",
          "checkpoint_files_skipped": requested}
  return common.Reference(model, train_iter, eval_fwd, info)
