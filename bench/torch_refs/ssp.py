"""fanq15/SSP: ``model.SSP_matching.SSP_MatchingNet`` and its training iteration (main.py)."""

from __future__ import annotations

import importlib
import pathlib

from bench.torch_refs import common

REFERENCE = "fanq15/SSP model.SSP_matching.SSP_MatchingNet"


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """``SSP_MatchingNet('resnet50', refine=False)`` (main.py / test.py defaults: --backbone resnet50,
  --refine off), layer0 / layer1 and every BatchNorm parameter frozen as main.py does."""
  del train, shims
  import torch

  common.use_repo(repo, ("model", "util", "dataset"), "model/SSP_matching.py")
  matching = importlib.import_module("model.SSP_matching")
  requested: list[str] = []
  with common.no_checkpoint_files(
    requested
  ):  # resnet50(pretrained=True): ./pretrained/resnet50.pth
    model = matching.SSP_MatchingNet("resnet50", False)
  for module in (model.layer0, model.layer1):
    for p in module.parameters():
      p.requires_grad = False
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      for p in module.parameters():
        p.requires_grad = False
  model = model.to(device)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
  optimizer = torch.optim.SGD(
    [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=5e-4
  )
  k = ep["support_images"].shape[1]
  img_s_list = [ep["support_images"][:, s] for s in range(k)]  # shot x [B, 3, H, W]
  mask_s_list = [ep["support_masks"][:, s].long() for s in range(k)]  # shot x [B, H, W] (0/1/255)
  img_q, mask_q = ep["query_image"], ep["query_mask"].long()
  mask_s = torch.cat(mask_s_list, dim=0)
  fix_bn = common.batchnorm_eval_in_train(model)

  def train_iter():
    fix_bn()
    out_ls = model(img_s_list, mask_s_list, img_q, mask_q)
    loss = (
      criterion(out_ls[0], mask_q)
      + criterion(out_ls[1], mask_q)
      + criterion(out_ls[2], mask_s) * 0.2
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  def eval_fwd():
    pred = model(img_s_list, mask_s_list, img_q, None)[0]  # test.py
    return torch.argmax(pred, dim=1)

  info = {
    "construction": "SSP_MatchingNet('resnet50', refine=False); layer0, layer1 and BatchNorm "
    "parameters requires_grad=False; BatchNorm in eval mode while training (main.py)",
    "optimizer": "SGD(trainable params, lr=1e-3, momentum=0.9, weight_decay=5e-4) (main.py --lr default; "
    "its /10 steps at 1/3 and 2/3 of the episodes are not reached)",
    "loss": "CE(out_ls[0], mask_q) + CE(out_ls[1], mask_q) + 0.2 * CE(out_ls[2], cat(mask_s))",
    "checkpoint_files_skipped": requested,
  }
  return common.Reference(model, train_iter, eval_fwd, info)
