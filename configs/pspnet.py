"""PSPNet base learner on the base classes of one PASCAL-5i / COCO-20i fold (BAM ``train_base.py``).

  python -m fss_jax.main --config configs/pspnet.py:dataset=pascal,fold=0 --workdir W
  python -m fss_jax.main --config configs/pspnet.py:dataset=coco,fold=3 --workdir W \\
      --config.init=W0      # ImageNet backbone, see below
  python -m fss_jax.main --config configs/pspnet.py:smoke --workdir /tmp/pspnet_smoke

HDMNet (and BAM, PAHNet, Sym-Net) freeze a PSPNet trained on the fold's base
classes; this config trains one for folds whose released weights are missing
(shared/reference/hdmnet.md §2, BAM ``config/*/*_base.yaml``):

* data: the **whole** training pool (``make_base_train_loader``, not the
  filtered few-shot list), labels remapped to base classes 1..15 / 1..60 (novel
  classes -> background 0, 255 kept); RandScale [0.5, 2.0], rotate +-10, blur,
  flip, random crop 417 (mean / 255 padding);
* network: deep-stem ResNet-50 (ImageNet ``resnet50_v2.pth``) with dilations,
  PPM, classifier with 16 / 61 outputs; BatchNorm trained (SyncBN over the
  global batch);
* loss: CE with ignore 255 on the logits up-sampled (align_corners=True) to the crop;
* SGD momentum 0.9, weight decay 1e-4, poly(0.9) per iteration, base lr 2.5e-4;
  PASCAL (``index_split: 0``): backbone at 2.5e-4, PPM and classifier at 10x;
  COCO (``index_split: -1``): everything at 10x;
* batch 12 (3 per GPU x 4 GPUs); 100 epochs (PASCAL) / 20 (COCO).

ImageNet initialisation: ``python -m checkpoints.convert --model resnet_deep_stem
--src initmodel/resnet50_v2.pth --dst W0`` then ``--config.init=W0`` (its weights
go under ``init_prefix="backbone"``). A released BAM base learner
(``initmodel/PSPNet/{pascal,coco}/split{k}/resnet50/best.pth``) converts with
``--model pspnet`` and is used as HDMNet's ``config.init``.

The reference validates every epoch with the base-class mIoU on the val list;
the episodic evaluator does not score base learners, so validation is off
(``eval.every_steps = 0``) and the last checkpoint is the result.

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/pspnet/train: CE, every BatchNorm in training mode (running statistics matched),
weight decay on BatchNorm too (checked on YNNPACK's CPU kernels: XLA:CPU's own float32
kernels lose precision in the bin-6 PPM branch, WORKSPACE §9).
"""

from __future__ import annotations

from configs import common


def base_learner_help(dataset: str, fold: int, path: str | None = None) -> str:
  """How to get the frozen PSPNet base learner of ``dataset`` / ``fold`` (error messages)."""
  dataset = common.canonical_dataset(dataset)
  short = "coco" if dataset == "coco20i" else "pascal"
  where = f" (config.init={path!r} does not exist)" if path else ""
  return (
    f"HDMNet needs the frozen PSPNet base learner of {dataset} fold {fold} as config.init"
    f"{where}. Either train one on the fold's base classes:\n"
    f"  python -m fss_jax.main --config configs/pspnet.py:dataset={short},fold={fold} "
    f"--workdir <base_workdir>\n"
    f"and run with --config.init=<base_workdir>/checkpoints, or convert BAM's released "
    f"initmodel/PSPNet/{short}/split{fold}/resnet50/best.pth:\n"
    f"  python -m checkpoints.convert --model pspnet --src best.pth --dst <dir>\n"
    f"and run with --config.init=<dir> (config.init_prefix='pspnet' in both cases)."
  )


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal", fold=0, shot=1, layers=50, smoke=False)
  c = common.base_config(arg, model="pspnet")
  coco = c.dataset == "coco20i"

  c.model_fields.num_classes = 61 if coco else 16
  c.model_fields.depth = int(arg.layers)
  c.model_fields.frozen = False  # BN trained (train_base.py has no fix_bn)

  # Base-learner data (BAM BaseData): the whole train pool with base labels.
  c.data.task = "base"  # fss_jax.data.pipeline.make_base_train_loader
  c.data.base_label = True  # episodic fallback: query_base_label is the target
  c.data.train_size = 417
  c.data.scale = (0.5, 2.0)
  c.data.test_size = 417

  c.batch_size = 12
  c.epochs = 20 if coco else 100

  c.optim.lr = 2.5e-4
  c.optim.lr_mults = ((".*", 10.0),) if coco else ((r"(ppm|cls_conv|cls_bn|classifier)/.*", 10.0),)

  c.init_prefix = "backbone"  # converted ImageNet resnet50_v2 weights
  c = common.finalize(c)
  c.eval.every_steps = 0  # see the module docstring (after the smoke switch too)
  return c
