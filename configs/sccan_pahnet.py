"""PAHNet (ICCV'25) on SCCAN, PASCAL-5i / COCO-20i, 1 or 5 shots, ResNet-50 (registry
``sccan_pahnet``; frozen parts and what both PAHNet recipes share: configs/pahnet.py).

  python -m fss_jax.main --config configs/sccan_pahnet.py:dataset=pascal,fold=0,shot=1 \\
      --workdir W --config.init=INIT
  python -m fss_jax.main --config configs/sccan_pahnet.py:smoke --workdir /tmp/pah

Recipe (shared/reference/pahnet.md §6-§7): SCCAN's two optimisers (configs/sccan.py
``set_optimizers``): SGD (momentum 0.9, weight decay 1e-4), base lr 0.005 with every group at
10x, poly(0.9) per iteration, over down_*, init_merge_*, the decoder and the ensemble
(+ ``kshot_rw``); AdamW lr 6e-5 constant, weight decay 0.01 over every ``transformer/``
tensor (PFE and ASC projections included). Batch PASCAL 8 / 6 (1 / 5-shot), COCO 1-shot 8
(fold 3: 6), 5-shot 2, 2, 8, 8; 200 / 50 epochs; SCCAN's augmentation with random crop 473
for both datasets. Test: squash 473.

Training step: one step of the engine with this config equals the official train script's
(``python -m checkpoints.verify --fixture ../shared/parity/sccan_pahnet/train/...``,
WORKSPACE §9): the base model's terms + mean CE of the 8 pseudo masks, 406 tensors.
"""

from __future__ import annotations

from configs import common, pahnet, sccan

_COCO_5SHOT_BATCH = (2, 2, 8, 8)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal", fold=0, shot=1, smoke=False)
  c = pahnet.base_config(arg, model="sccan_pahnet")
  coco = c.dataset == "coco20i"
  c.data.test_resize = "squash"
  if coco:
    c.batch_size = (6 if c.fold == 3 else 8) if c.shot == 1 else _COCO_5SHOT_BATCH[c.fold]
  else:
    c.batch_size = 8 if c.shot == 1 else 6
  c.epochs = 50 if coco else 200
  sccan.set_optimizers(c)  # SCCAN's SGD + the transformer's AdamW
  if c.smoke:
    c.model_fields.grid = 32
    c.model_fields.blocks = 2
  return common.finalize(c)
