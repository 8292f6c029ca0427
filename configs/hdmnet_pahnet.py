"""PAHNet (ICCV'25) on HDMNet, PASCAL-5i / COCO-20i, 1 or 5 shots, ResNet-50 (registry
``hdmnet_pahnet``; frozen parts and what both PAHNet recipes share: configs/pahnet.py).

  python -m fss_jax.main --config configs/hdmnet_pahnet.py:dataset=coco,fold=2,shot=5 \\
      --workdir W --config.init=INIT --mode eval
  python -m fss_jax.main --config configs/hdmnet_pahnet.py:smoke --workdir /tmp/pah

Recipe (shared/reference/pahnet.md §6-§7): one AdamW (betas (0.9, 0.999), eps 1e-8, weight
decay 0.01), base lr 1e-4 for the transformer and 10x for down_*, *_merge, gram/cls_merge and
``kshot_rw``, poly(0.9); batch PASCAL 4, COCO 6 / 2 (1 / 5-shot); 300 / 75 epochs; squash
resize 473 / 633, base annotations. Test: squash 473 / 633.

Training step: one step of the engine with this config equals the official train script's
(``python -m checkpoints.verify --fixture ../shared/parity/hdmnet_pahnet/train/...``,
WORKSPACE §9): the base model's terms + mean CE of the 3 pseudo masks, 290 tensors.
"""

from __future__ import annotations

from configs import common, pahnet


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal", fold=0, shot=1, smoke=False)
  c = pahnet.base_config(arg, model="hdmnet_pahnet")
  coco = c.dataset == "coco20i"
  size = 633 if coco else 473
  c.data.train_size = size
  c.data.train_resize = "squash"
  c.data.test_size = size
  c.data.test_resize = "squash"
  c.data.base_label = True
  c.batch_size = (6 if c.shot == 1 else 2) if coco else 4
  c.epochs = 75 if coco else 300
  c.optim.optimizer = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.lr_mults = (
    (r"(down_supp|down_query|supp_merge|query_merge)/.*", 10.0),
    (r"ensemble/(gram_merge|cls_merge|kshot_rw)/.*", 10.0),
  )
  return common.finalize(c)
