"""Sym-Net on PASCAL-5i (473) / COCO-20i (641), 1 or 5 shots, ResNet-50 (symnet.md §7, §9).

  python -m fss_jax.main --config configs/symnet.py:dataset=pascal,fold=0,shot=1 \\
      --workdir W --config.init=PSP0      # the fold's frozen PSPNet base learner
  python -m fss_jax.main --config configs/symnet.py:dataset=coco,fold=2,shot=5 --workdir W \\
      --config.init=PSP2 --mode eval      # after training
  python -m fss_jax.main --config configs/symnet.py:smoke --workdir /tmp/symnet_smoke

The official recipe (``config/{pascal,coco}/*_split0_resnet50.yaml``, ``train.py``,
``train.sh``, ``test.py``):

* the PSPNet base learner of the fold (backbone, PPM, cls, classifier) is frozen
  (``SPEC.frozen``), all its BatchNorms in eval mode, and loaded from ``config.init``
  under ``init_prefix="pspnet"``: convert BAM's ``initmodel/PSPNet/{pascal,coco}/
  split{k}/resnet50/best.pth`` with ``python -m checkpoints.convert --model pspnet``
  (or train one with ``configs/pspnet.py``). A released Sym-Net checkpoint converts
  with ``--model symnet`` and is used with ``--config.init=DIR --config.init_prefix=""``;
* trainable: TDC, down_query, down_supp, init_merge, the PFENet decoder (alpha, beta,
  inner_cls, res1, res2, cls), gram_merge, cls_merge, kshot_rw (K > 1) and APA;
* SGD, momentum 0.9, weight decay 1e-4 on every trainable tensor; the yaml's base_lr
  0.005 is multiplied by 10 for every group by ``poly_learning_rate(index_split=-1)``:
  **effective lr 0.05**, poly(0.9) per iteration, no warm-up;
* BAM augmentation: RandScale [0.9, 1.1] (COCO [0.8, 1.25]), rotate +-10, blur, flip,
  random crop 473 / 641 with the foreground retry; base annotations for the logged base
  CE; the class index for the training base map;
* batch 8 (one GPU; ``train.sh`` with N GPUs uses 8 per process: set
  ``--config.batch_size=8N``); 200 epochs (PASCAL) / 50 (COCO), validation after
  every epoch on the test fold (1000 / 5000 episodes, seed 321), best mIoU kept
  (the reference also stops after 80 epochs without improvement; the engine has no
  early stop);
* model: ``scales`` = (60, 30, 15, 8) / (81, 40, 20, 10) — the first bin must equal the
  feature size, so a changed input size needs ``scales=()`` (follow the input);
* test (§9): aspect-preserving resize (long side 473 / 641) + padding; 1000 (PASCAL) /
  **5000 (COCO)** episodes for each of BAM's five seeds (the reference's seed list is
  unseeded, so its runs differ; BAM's [510, 365, 382, 322, 988] reproduce the protocol).
  The reference scores against the resized, padded label (``ori_resize: False``); the
  engine scores at the original label resolution (``pad_square``), which the reference
  does not do — numbers can differ slightly (see the report of the Sym-Net issue).

``smoke``: same code path at 65 px (features 9 x 9, bins (9, 4, 2, 1)), 2 episodes per
batch, 3 steps, no base learner required.

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/symnet/train: CE(final) + CE(meta) + CE(base) + mean inner CE + triplet, 58 tensors,
13 SGD groups all at 0.05 (train.py hard-codes index_split=-1).
"""

from __future__ import annotations

from configs import common
from configs import pspnet as pspnet_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal", fold=0, shot=1, smoke=False)
  c = common.base_config(arg, model="symnet")
  coco = c.dataset == "coco20i"
  size = 641 if coco else 473

  c.model_fields.shot = c.get_ref("shot")
  c.model_fields.dataset = c.dataset
  c.model_fields.num_base_classes = 61 if coco else 16
  c.model_fields.depth = 50
  c.model_fields.scales = (81, 40, 20, 10) if coco else (60, 30, 15, 8)
  c.model_fields.kshot_hidden = 2
  c.model_fields.embedding_path = ""  # "": the packaged word2vec table

  # Data (§7): BAM training lists and augmentation, crop, base annotations.
  c.data.train_size = size
  c.data.scale = (0.8, 1.25) if coco else (0.9, 1.1)
  c.data.test_size = size
  c.data.base_label = True

  c.epochs = 50 if coco else 200

  c.optim.lr = 0.05  # 0.005 x 10 (index_split = -1), see above

  # Test protocol (§9) and validation (§7).
  c.eval.episodes = 5000 if coco else 1000
  c.eval.seeds = common.BAM_SEEDS
  c.eval.val_seed = common.VAL_SEED
  c.eval.val_episodes = 5000 if coco else 1000

  # The frozen base learner: without it Sym-Net would train on a random PSPNet.
  c.init_prefix = "pspnet"
  c.init_required = not c.smoke
  c.init_help = pspnet_config.base_learner_help(c.dataset, c.fold).replace(
    "HDMNet needs", "Sym-Net needs", 1
  )

  if c.smoke:
    c.model_fields.scales = ()  # follow the smoke input size (65 -> 9 x 9)
  return common.finalize(c)
