"""Pbihao/HDMNet: ``model.HDMNet.OneModel`` and its training iteration (train.py)."""

from __future__ import annotations

import importlib
import pathlib

from bench.torch_refs import common, cuda_proxy, mmcv_standins

REFERENCE = "Pbihao/HDMNet model.HDMNet.OneModel"
YAML_STEM = "pascal_split0_resnet50_manet"


def config_yaml(config_dir: pathlib.Path, stem: str, shot: int) -> pathlib.Path:
  """``<stem>_5s.yaml`` for 5 shots where the checkout has one, else ``<stem>.yaml`` (shot set to K)."""
  five = config_dir / f"{stem}_5s.yaml"
  return five if shot == 5 and five.is_file() else config_dir / f"{stem}.yaml"


def load_args(util_root: pathlib.Path, yaml: pathlib.Path, shot: int):
  """The checkout's ``load_cfg_from_cfg_file(yaml)`` with ``shot`` = K and ``zoom_factor`` (PSPNet reads it)."""
  args = common.load_yaml_cfg(util_root, yaml)
  args.shot = int(shot)
  if not hasattr(args, "zoom_factor"):
    args.zoom_factor = (
      8  # HDMNet's yaml lacks it; model/PSPNet.py reads it in __init__ (fixture: 8)
    )
  return args


def episode_inputs(ep: dict) -> dict:
  """The keyword arguments train.py / test.py pass: ``cat_idx`` = [subcls] stays on the CPU as the loader gives it."""
  return {
    "s_x": ep["support_images"],
    "s_y": ep["support_masks"].long(),
    "x": ep["query_image"],
    "y_m": ep["query_mask"].long(),
    "y_b": ep["query_base_label"].long(),
    "cat_idx": [ep["class_index"].long().cpu()],
  }


def make_steps(model, optimizer, args, inputs: dict):
  """(train_iter, eval_fwd) of train.py / test.py for HDMNet-style models (losses main, aux1, aux2)."""
  fix_bn = common.batchnorm_eval_in_train(model, bool(getattr(args, "fix_bn", False)))
  aux1, aux2 = float(args.aux_weight1), float(args.aux_weight2)

  def train_iter():
    fix_bn()  # train.py: model.train(); model.apply(fix_bn)
    _, main_loss, aux_loss1, aux_loss2 = model(**inputs)
    loss = main_loss + aux1 * aux_loss1 + aux2 * aux_loss2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  def eval_fwd():
    output = model(**inputs)[0]  # test.py: output, meta_out, base_out = model(...)
    return output.max(1)[1]

  return train_iter, eval_fwd


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """``args = load_cfg_from_cfg_file(config/pascal/pascal_split0_resnet50_manet.yaml); OneModel(args, cls_type="Base")``.

  The checkout has no 5-shot yaml: K shots set ``args.shot = K`` on the same yaml. As in
  train.py ``get_model``: ``model.get_optim(model, args, LR=args.base_lr)`` (AdamW), then
  ``model.freeze_modules(model)`` (backbone, PPM, cls, base learner frozen).
  """
  del train
  common.use_repo(repo, ("model", "util"), "model/HDMNet.py")
  mmcv_standins.install(shims)
  k = int(ep["support_images"].shape[1])
  yaml = config_yaml(repo / "config" / "pascal", YAML_STEM, k)
  args = load_args(repo, yaml, k)
  requested: list[str] = []
  hdmnet = importlib.import_module("model.HDMNet")
  with common.no_checkpoint_files(requested):
    model = hdmnet.OneModel(args, cls_type="Base")
  optimizer = model.get_optim(model, args, LR=args.base_lr)
  model.freeze_modules(model)
  model = model.to(device)
  cuda_proxy.patch_module(
    hdmnet, device, shims
  )  # training branch: torch.arange(..., device='cuda')
  train_iter, eval_fwd = make_steps(model, optimizer, args, episode_inputs(ep))
  info = {
    "construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
    f"args.zoom_factor={args.zoom_factor}; OneModel(args, cls_type='Base'); "
    "model.freeze_modules(model)",
    "optimizer": "model.get_optim(model, args, LR=args.base_lr) (AdamW, weight_decay=args.weight_decay; "
    "the poly lr schedule is not applied)",
    "loss": "main_loss + aux_weight1 * aux_loss1 + aux_weight2 * aux_loss2 (train.py); fix_bn on BatchNorm",
    "checkpoint_files_skipped": requested,
  }
  return common.Reference(model, train_iter, eval_fwd, info)
