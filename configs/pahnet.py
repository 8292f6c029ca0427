"""PAHNet (ICCV'25) on SCCAN (``variant=sccan``) or HDMNet (``variant=hdmnet``),
PASCAL-5i / COCO-20i, 1 or 5 shots, ResNet-50.

  python -m fss_jax.main --config configs/pahnet.py:variant=sccan,dataset=pascal,fold=0,shot=1 \\
      --workdir W --config.init=INIT
  python -m fss_jax.main --config configs/pahnet.py:variant=hdmnet,dataset=coco,fold=2,shot=5 \\
      --workdir W --config.init=INIT --mode eval
  python -m fss_jax.main --config configs/pahnet.py:variant=hdmnet,smoke --workdir /tmp/pah

Frozen parts (``SPEC.frozen``): the SSP predictor (``ssp/``, trained per fold with
configs/ssp.py) and the fold's PSPNet base learner (``pspnet/``, BAM ``best.pth`` or
configs/pspnet.py). A released PAHNet checkpoint holds both: ``python -m checkpoints.convert
--model sccan_pahnet|hdmnet_pahnet --src best.pth --dst INIT`` and ``init_prefix=""`` (default).
To train PAHNet from scratch, load the two parts from their own files::

  --config.init=pspnet=PSP_DIR,ssp=SSP_DIR

(PSP_DIR: a configs/pspnet.py workdir's ``checkpoints`` or ``checkpoints.convert --model
pspnet``; SSP_DIR: a configs/ssp.py workdir's ``checkpoints`` or ``checkpoints.convert
--model ssp``). Training refuses to start without them (``init_required``).

Recipes (shared/reference/pahnet.md §6-§7):

* SCCAN variant: SGD (momentum 0.9, weight decay 1e-4), base lr 0.005 with every group
  at 10x, poly(0.9) per iteration, over down_*, init_merge_*, the decoder and the
  ensemble (+ ``kshot_rw``); AdamW lr 6e-5 constant, weight decay 0.01 over every
  ``transformer/`` tensor (PFE and ASC projections included). Batch PASCAL 8 / 6
  (1 / 5-shot), COCO 1-shot 8 (fold 3: 6), 5-shot 2, 2, 8, 8; 200 / 50 epochs; SCCAN's
  augmentation with random crop 473 for both datasets. Test: squash 473, 1000 / 4000
  episodes, seed 321, prediction resized to the original label size.
* HDMNet variant: one AdamW (betas (0.9, 0.999), eps 1e-8, weight decay 0.01), base lr
  1e-4 for the transformer and 10x for down_*, *_merge, gram/cls_merge and ``kshot_rw``,
  poly(0.9); batch PASCAL 4, COCO 6 / 2 (1 / 5-shot); 300 / 75 epochs; squash resize
  473 / 633, base annotations. Test: squash 473 / 633, 1000 / 4000 episodes, seed 321.
* Validation every epoch on the test episodes of seed 321 (model selection on the
  novel-class mIoU, as the reference).

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/{sccan,hdmnet}_pahnet/train: the base model's terms + mean CE of the pseudo masks (8
/ 3), 406 / 290 tensors.
"""

from __future__ import annotations

from configs import common, sccan

_SCCAN_COCO_5SHOT_BATCH = (2, 2, 8, 8)


def frozen_parts_help(model: str, dataset: str, fold: int) -> str:
  """How to provide PAHNet's frozen PSPNet base learner and SSP predictor (error messages)."""
  short = "coco" if common.canonical_dataset(dataset) == "coco20i" else "pascal"
  return (
    f"{model} needs its frozen parts for {short} fold {fold}: the PSPNet base learner and the SSP "
    f"predictor. Either convert a released PAHNet checkpoint (it holds both):\n"
    f"  python -m checkpoints.convert --model {model} --src best.pth --dst <dir>\n"
    f"and run with --config.init=<dir>, or give the two parts separately:\n"
    f"  --config.init=pspnet=<psp_dir>,ssp=<ssp_dir>\n"
    f"with <psp_dir> from configs/pspnet.py:dataset={short},fold={fold} (<workdir>/checkpoints) or "
    f"`checkpoints.convert --model pspnet` of BAM's initmodel/PSPNet/{short}/split{fold}/resnet50/"
    f"best.pth, and <ssp_dir> from configs/ssp.py:dataset={short},fold={fold} (<workdir>/checkpoints) "
    f"or `checkpoints.convert --model ssp` of initmodel/SSPNet/{short}/split{fold}/resnet50/best.pth."
  )


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="sccan", dataset="pascal", fold=0, shot=1, smoke=False)
  if arg.variant not in ("sccan", "hdmnet"):
    raise ValueError(f"variant must be 'sccan' or 'hdmnet', got {arg.variant!r}")
  c = common.base_config(arg, model=f"{arg.variant}_pahnet")
  coco = c.dataset == "coco20i"
  c.variant = arg.variant
  c.model_fields.shot = c.get_ref("shot")
  c.model_fields.num_base_classes = 61 if coco else 16
  c.model_fields.remat = False  # nn.remat the attention blocks (same params)
  c.data.scale = (0.8, 1.25) if coco else (0.9, 1.1)
  episodes = 4000 if coco else 1000
  c.eval.episodes = episodes
  c.eval.val_episodes = episodes
  c.eval.seeds = (common.VAL_SEED,)
  c.eval.val_seed = common.VAL_SEED

  if arg.variant == "sccan":
    c.data.test_resize = "squash"
    if coco:
      c.batch_size = (6 if c.fold == 3 else 8) if c.shot == 1 else _SCCAN_COCO_5SHOT_BATCH[c.fold]
    else:
      c.batch_size = 8 if c.shot == 1 else 6
    c.epochs = 50 if coco else 200
    sccan.set_optimizers(c)  # SCCAN's SGD + the transformer's AdamW
  else:
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
  c.init_required = not c.smoke
  c.init_help = frozen_parts_help(c.model, c.dataset, c.fold)

  if c.smoke and arg.variant == "sccan":
    c.model_fields.grid = 32
    c.model_fields.blocks = 2
  return common.finalize(c)
