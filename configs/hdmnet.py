"""HDMNet (CVPR'23) on PASCAL-5i (473) / COCO-20i (633), 1 or 5 shots, ResNet-50.

  python -m fss_jax.main --config configs/hdmnet.py:dataset=pascal,fold=0,shot=1 \\
      --workdir W --config.init=PSP0      # the fold's frozen PSPNet base learner
  python -m fss_jax.main --config configs/hdmnet.py:dataset=coco,fold=2,shot=5 --workdir W \\
      --config.init=PSP2 --mode eval      # after training; or a converted HDMNet model
  python -m fss_jax.main --config configs/hdmnet.py:smoke --workdir /tmp/hdmnet_smoke

The official recipe (shared/reference/hdmnet.md §7-8, ``config/*/*_manet.yaml``):

* the PSPNet base learner of the fold (backbone, PPM, cls, classifier) is
  frozen (``SPEC.frozen``) and loaded from ``config.init`` under
  ``init_prefix="pspnet"``: convert BAM's ``initmodel/PSPNet/{pascal,coco}/split{k}/
  resnet50/best.pth`` with ``python -m checkpoints.convert --model pspnet``, or
  train one with ``configs/pspnet.py`` (``init_help`` says how). A released
  HDMNet checkpoint converts with ``--model hdmnet`` and is used with
  ``--config.init=DIR --config.init_prefix=""``;
* AdamW, betas (0.9, 0.999), eps 1e-8, decoupled weight decay 0.01 on every
  trainable tensor; base lr 1e-4 for the transformer, 10x for down_supp,
  down_query, supp_merge, query_merge, gram_merge, cls_merge; poly(0.9) per
  iteration, no warm-up; ``kshot_rw`` (K > 1) is in no optimiser group of the
  reference and stays at its initial values (frozen);
* training images squash-resized to 473 / 633 after RandScale [0.9, 1.1] /
  [0.8, 1.25], rotate +-10, blur, flip (the scale has no effect, as in the
  reference); query base annotations for the logged base CE and the ensemble's
  base map (which drops the episode class channel in training);
* batch 16 (PASCAL: 4 per GPU, the GPU count is not stated; 4 assumed) / 24
  (COCO: 6 per GPU x 4); 200 / 50 epochs, validation after every epoch on 1000
  episodes (seed 321), best novel-class mIoU kept (the reference also stops
  after 80 / 75 epochs without improvement; the engine has no early stop);
* test: squash resize to 473 / 633, prediction bilinearly (align_corners=True)
  resized to the original label size; 1000 (PASCAL) / 10000 (COCO) episodes
  for each of the 10 seeds [510, 365, 382, 322, 988, 98, 742, 17, 595, 106].

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/hdmnet/train: CE(final) + CE(meta) + distillation + CE(base), 221 tensors, AdamW
groups at 1e-4 / 1e-3; the probability-like final map goes through cross entropy as in the
official code.
"""

from __future__ import annotations

from configs import common
from configs import pspnet as pspnet_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal", fold=0, shot=1, smoke=False)
  c = common.base_config(arg, model="hdmnet")
  coco = c.dataset == "coco20i"
  size = 633 if coco else 473

  c.model_fields.shot = c.get_ref("shot")
  c.model_fields.num_base_classes = 61 if coco else 16
  c.model_fields.remat = False  # nn.remat the attention blocks (same params)

  # Data (§7): BAM training lists, squash resize, base annotations.
  c.data.train_size = size
  c.data.train_resize = "squash"
  c.data.scale = (0.8, 1.25) if coco else (0.9, 1.1)
  c.data.test_size = size
  c.data.test_resize = "squash"
  c.data.base_label = True

  c.batch_size = 24 if coco else 16
  c.epochs = 50 if coco else 200

  c.optim.optimizer = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.lr_mults = (
    (r"(down_supp|down_query|supp_merge|query_merge)/.*", 10.0),
    (r"ensemble/(gram_merge|cls_merge)/.*", 10.0),
  )

  # Test protocol (§8) and validation (§7).
  c.eval.episodes = 10000 if coco else 1000
  c.eval.seeds = common.HDMNET_SEEDS
  c.eval.val_seed = common.VAL_SEED

  # The frozen base learner: without it HDMNet would train on a random PSPNet.
  c.init_prefix = "pspnet"
  c.init_required = not c.smoke
  c.init_help = pspnet_config.base_learner_help(c.dataset, c.fold)
  return common.finalize(c)
