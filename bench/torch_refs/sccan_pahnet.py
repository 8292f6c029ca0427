"""tianyu-zou/PAHNet (SCCAN variant): ``SCCAN_PAHNet.model.SCCANPlus.OneModel`` and its training
iteration (train_SCCAN_PAHNet.py)."""

from __future__ import annotations

import importlib
import pathlib

from bench.torch_refs import common, cuda_proxy, sccan

REFERENCE = "tianyu-zou/PAHNet SCCAN_PAHNet.model.SCCANPlus.OneModel"
SUBDIR = "SCCAN_PAHNet"


def _check_root(repo: pathlib.Path) -> None:
  """``--repo`` is the PAHNet root (the scripts import the package ``SCCAN_PAHNet``)."""
  if (repo / SUBDIR / "model" / "SCCANPlus.py").is_file():
    return
  hint = (
    f"; {repo} looks like the {SUBDIR}/ subdirectory itself: pass its parent"
    if (repo / "model" / "SCCANPlus.py").is_file()
    else ""
  )
  raise FileNotFoundError(
    f"--repo {repo} is not the PAHNet checkout root: expected the subdirectory "
    f"{SUBDIR}/ with {SUBDIR}/model/SCCANPlus.py (clone tianyu-zou/PAHNet and pass "
    f"its root){hint}"
  )


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """``args = load_cfg_from_cfg_file(SCCAN_PAHNet/config/pascal/[5-shot/]pascal_split0_resnet50.yaml);
  OneModel(args)``, then train_SCCAN_PAHNet.py get_model(): get_optim, freeze_modules."""
  del train
  _check_root(repo)
  common.use_repo(repo, (SUBDIR,), f"{SUBDIR}/model/SCCANPlus.py")
  common.shim_timm(shims)
  k = int(ep["support_images"].shape[1])
  sub = repo / SUBDIR
  yaml = sub / "config" / "pascal" / ("5-shot" if k == 5 else "") / "pascal_split0_resnet50.yaml"
  args = common.load_yaml_cfg(sub, yaml)
  args.shot = k
  requested: list[str] = []
  sccan_plus = importlib.import_module(f"{SUBDIR}.model.SCCANPlus")
  cuda_proxy.patch_module(
    sccan_plus, device, shims
  )  # training branch: torch.arange(..., device='cuda')
  with common.no_checkpoint_files(requested):
    model = sccan_plus.OneModel(args)
  optimizer, optimizer_swin = model.get_optim(model, args, LR=args.base_lr)
  model.freeze_modules(model)
  model = model.to(device)
  train_iter, eval_fwd = sccan.make_steps(
    model, (optimizer, optimizer_swin), args, ep, lambda out: out[0]
  )  # (final_out, meta_out, base_out)
  info = {
    "construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
    f"OneModel(args); model.get_optim(...); model.freeze_modules(model); "
    f"fix_bn={bool(args.fix_bn)}",
    "optimizer": f"model.get_optim(model, args, LR=args.base_lr) (SGD lr={args.base_lr}, momentum="
    f"{args.momentum}, weight_decay={args.weight_decay} + AdamW lr=6e-5 for the transformer)",
    "loss": f"main CE + {args.aux_weight1:g} * dice(meta) + {args.aux_weight2:g} * mean CE(pseudo masks) "
    "(train_SCCAN_PAHNet.py)",
    "checkpoint_files_skipped": requested,
  }
  return common.Reference(model, train_iter, eval_fwd, info)
