"""tianyu-zou/PAHNet (HDMNet variant): ``HDMNet_PAHNet.model.HDMNetPlus.OneModel`` and train_HDMNet_PAHNet.py."""

from __future__ import annotations

import importlib
import pathlib
import sys
import types

from bench.torch_refs import common, cuda_proxy, hdmnet, mmcv_standins

REFERENCE = "tianyu-zou/PAHNet HDMNet_PAHNet.model.HDMNetPlus.OneModel"
SUBDIR = "HDMNet_PAHNet"


def shim_matplotlib(shims: list[str]) -> None:
  """TransformerPlus.py imports pyplot and LinearSegmentedColormap but never uses them."""
  try:
    importlib.import_module("matplotlib.pyplot")
    importlib.import_module("matplotlib.colors")
    return
  except ImportError:
    pass
  mpl, plt, colors = (
    types.ModuleType(n) for n in ("matplotlib", "matplotlib.pyplot", "matplotlib.colors")
  )
  colors.LinearSegmentedColormap = None
  mpl.pyplot, mpl.colors = plt, colors
  sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": plt, "matplotlib.colors": colors})
  shims.append(
    "matplotlib (pyplot, colors.LinearSegmentedColormap: imported, unused) empty modules"
  )


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """``args = load_cfg_from_cfg_file(HDMNet_PAHNet/config/pascal/pascal_split0_resnet50_manet[_5s].yaml);
  OneModel(args, cls_type="Base")`` (it builds ``SSP_MatchingNet('resnet50', False)`` and puts it in eval
  mode in its forward). ``repo`` is the PAHNet root (it holds train_HDMNet_PAHNet.py and HDMNet_PAHNet/).

  As in train_HDMNet_PAHNet.py ``get_model``: ``model.get_optim(model, args, LR=args.base_lr)``
  (AdamW; kshot_rw too for K > 1), then ``model.freeze_modules(model)`` (SSP, backbone, PPM, cls,
  base learner frozen); loss ``main + aux_weight1 * aux1 + aux_weight2 * aux2`` with fix_bn.
  """
  del train
  # HDMNet_PAHNet is imported as a package from the root; its model/ never clashes with a top-level
  # ``model`` (HDMNet's checkout) or with SCCAN_PAHNet.model.
  common.use_repo(repo, (SUBDIR,), f"{SUBDIR}/model/HDMNetPlus.py")
  mmcv_standins.install(shims)
  shim_matplotlib(shims)
  root = repo / SUBDIR
  k = int(ep["support_images"].shape[1])
  yaml = hdmnet.config_yaml(root / "config" / "pascal", hdmnet.YAML_STEM, k)
  args = hdmnet.load_args(root, yaml, k)
  requested: list[str] = []
  plus = importlib.import_module(f"{SUBDIR}.model.HDMNetPlus")
  with common.no_checkpoint_files(requested):
    model = plus.OneModel(args, cls_type="Base")
  optimizer = model.get_optim(model, args, LR=args.base_lr)
  model.freeze_modules(model)
  model = model.to(device)
  cuda_proxy.patch_module(plus, device, shims)
  # test_HDMNet_PAHNet.py unpacks three outputs, the model returns four: eval_fwd takes output [0].
  train_iter, eval_fwd = hdmnet.make_steps(model, optimizer, args, hdmnet.episode_inputs(ep))
  info = {
    "construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
    "OneModel(args, cls_type='Base'); model.freeze_modules(model)",
    "optimizer": "model.get_optim(model, args, LR=args.base_lr) (AdamW, weight_decay=args.weight_decay; "
    "the poly lr schedule is not applied)",
    "loss": "main_loss + aux_weight1 * aux_loss1 + aux_weight2 * aux_loss2 (train_HDMNet_PAHNet.py); "
    "fix_bn on BatchNorm",
    "checkpoint_files_skipped": requested,
  }
  return common.Reference(model, train_iter, eval_fwd, info)
