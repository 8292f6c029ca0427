"""kaixin96/PANet: ``models.fewshot.FewShotSeg`` and its training iteration (train.py)."""

from __future__ import annotations

import importlib
import pathlib

from bench.torch_refs import common

REFERENCE = "kaixin96/PANet models.fewshot.FewShotSeg"


def build(
  repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]
) -> common.Reference:
  """FewShotSeg(in_channels=3, pretrained_path=None, cfg={'align': train}) (fixture construction;
  PANet trains with align=True)."""
  del shims
  import torch

  common.use_repo(repo, ("models", "util", "dataloaders", "config"), "models/fewshot.py")
  fewshot = importlib.import_module("models.fewshot")
  model = fewshot.FewShotSeg(in_channels=3, pretrained_path=None, cfg={"align": bool(train)}).to(
    device
  )
  k = ep["support_images"].shape[1]
  supp = ep["support_images"]  # [B, K, 3, H, W]
  smask = ep["support_masks"]  # [B, K, H, W]
  supp_imgs = [[supp[:, s] for s in range(k)]]  # way x shot x [B, 3, H, W]
  fore = [[(smask[:, s] == 1).float() for s in range(k)]]
  back = [[(smask[:, s] != 1).float() for s in range(k)]]
  qry = [ep["query_image"]]
  label = ep["query_mask"].long()
  # config.py: SGD lr 1e-3, momentum 0.9, weight decay 5e-4; CE(ignore 255) + align loss * 1.
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=255)

  def train_iter():
    out, align_loss = model(supp_imgs, fore, back, qry)
    loss = criterion(out, label) + align_loss * 1.0
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  def eval_fwd():
    out, _ = model(supp_imgs, fore, back, qry)
    return out.argmax(dim=1)

  info = {
    "construction": f"FewShotSeg(in_channels=3, pretrained_path=None, cfg={{'align': {bool(train)}}})",
    "optimizer": "SGD(lr=1e-3, momentum=0.9, weight_decay=5e-4)",
  }
  return common.Reference(model, train_iter, eval_fwd, info)
