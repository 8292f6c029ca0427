"""JC²A (arXiv 2211.01310) on PASCAL-5i / COCO-20i, ResNet-50 or ResNet-101, with its ablations.

  # the ImageNet backbone as converted weights (loaded under init_prefix "backbone")
  python -m checkpoints.convert --model jc2a --src initmodel/resnet50_v2.pth --dst W0
  # once per fold, before training: the CKMM base-class prototypes, written next to the
  # dataset (read when training starts; checkpoints carry them)
  python -m fss_jax.train.jc2a_prior --data_dir ~/tensorflow_datasets --dataset pascal5i \\
      --fold 0 --layers 50 --backbone_init W0
  python -m fss_jax.main --config configs/jc2a.py:dataset=pascal,fold=0 --workdir W \\
      --config.init=W0
  # 5-shot = the 1-shot model with decision-level fusion (jc2a.md §9):
  python -m fss_jax.main --config configs/jc2a.py:dataset=pascal,fold=0,shot=5 --workdir W \\
      --mode eval
  # ablations (Tables 3, 4, 6):
  ...:variant=baseline|p2p|p2b|p2p_p2b|ckmm|full   align=ours|softmax|linear|cosine
  ...:pe=false   hpam_fusion=add|multiply|concat   mia_fusion=concat|add|multiply
  python -m fss_jax.main --config configs/jc2a.py:smoke --workdir /tmp/jc2a_smoke

Recipe (paper §4.1 + the PFENet defaults of jc2a.md §8): SGD momentum 0.9, weight
decay 1e-4, base lr 2.5e-3, batch 4, 473×473 crops for both datasets, frozen backbone
(BN in inference mode), poly(0.9) per iteration, 200 epochs (PASCAL) / 50 (COCO),
PFENet data lists (no intersection filter) and augmentation, test on 1000 episodes
with seed 321 at the original label size (aspect resize + pad, §10).

The learning rate (jc2a.md §8 caution): PFENet's script multiplies its configured
``base_lr: 0.0025`` by 10 for every parameter group, and JC²A's hyper-parameters are
exactly PFENet's, so the chosen default trains at an effective 2.5e-2
(``lr_mults=((".*", 10.0),)``); ``pfenet_lr=false`` trains at the literal 2.5e-3.
"""

from __future__ import annotations

from configs import common

# Table 3 rows: (use_p2p, use_p2b, use_ckmm).
VARIANTS = {
  "baseline": (False, False, False),
  "p2p": (True, False, False),
  "p2b": (False, True, False),
  "p2p_p2b": (True, True, False),
  "ckmm": (False, False, True),
  "full": (True, True, True),
}
ALIGNMENTS = ("ours", "softmax", "linear", "cosine")
FUSIONS = ("add", "multiply", "concat")


def get_config(arg: str | None = None):
  arg = common.parse_arg(
    arg,
    dataset="pascal",
    fold=0,
    shot=1,
    layers=50,
    variant="full",
    align="ours",
    pe=True,
    hpam_fusion="add",
    mia_fusion="concat",
    pfenet_lr=True,
    smoke=False,
  )
  c = common.base_config(arg, model="jc2a")
  coco = c.dataset == "coco20i"

  c.layers = int(arg.layers)
  if c.layers not in (50, 101):
    raise ValueError(f"JC²A has ResNet-50 and ResNet-101 configs, got layers={c.layers}")
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {arg.variant!r}")
  for name, value, allowed in (
    ("align", arg.align, ALIGNMENTS),
    ("hpam_fusion", arg.hpam_fusion, FUSIONS),
    ("mia_fusion", arg.mia_fusion, FUSIONS),
  ):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
  use_p2p, use_p2b, use_ckmm = VARIANTS[arg.variant]

  # Model (fss_jax.models.jc2a.JC2A fields; every jc2a.md §14 choice is explicit here).
  f = c.model_fields
  f.shot = c.get_ref("shot")
  f.layers = c.get_ref("layers")
  f.reduce_dim = 256
  f.pyramid_bins = (60, 30, 15, 8)
  f.top_k = (60, 20, 5, 3)
  f.block_size = 3
  f.use_p2p = use_p2p
  f.use_p2b = use_p2b
  f.use_ckmm = use_ckmm
  f.hpam_fusion = arg.hpam_fusion
  f.mia_fusion = arg.mia_fusion
  f.alignment = arg.align
  f.linear_feature_map = "batchnorm"
  f.pos_embed = "spatial" if arg.pe else "none"
  f.pos_embed_std = 0.02
  f.share_projections = True
  f.ckmm_similarity = "cosine"
  f.ckmm_minmax = True
  f.shot_fusion = "prob"
  f.feat_dropout = 0.5
  f.cls_dropout = 0.1
  # Rows of the frozen fp_base parameter (the fold's base classes). A run from scratch fills it
  # from <data_dir>/<dataset>/<version>/jc2a_fp_base_fold<fold>_resnet<layers>.npz (written by
  # python -m fss_jax.train.jc2a_prior); checkpoints carry it, no path is a model field.
  f.num_base_classes = 60 if coco else 15

  # Data: PFENet lists and augmentation, the default 473 crops for both datasets (paper §4.1).
  c.data.protocol = "pfenet"

  # Schedule and optimiser: the default SGD (lr 2.5e-3, momentum 0.9, wd 1e-4, poly 0.9).
  c.batch_size = 4
  c.epochs = 50 if coco else 200
  c.optim.lr_mults = ((".*", 10.0),) if arg.pfenet_lr else ()

  # Test protocol (jc2a.md §10): 1000 episodes, seed 321.
  c.eval.seeds = (common.VAL_SEED,)
  c.eval.val_seed = common.VAL_SEED

  c.init_prefix = "backbone"
  # The backbone is frozen: without ImageNet weights JC²A would train on a random ResNet.
  c.init_required = not c.smoke
  c.init_help = (
    "Convert the ImageNet backbone and pass it: python -m checkpoints.convert --model jc2a "
    "--src initmodel/resnet50_v2.pth --dst W0, then --config.init=W0 (see configs/jc2a.py)."
  )

  if c.smoke:
    # Same code path on 65×65 inputs (9×9 features): relative pyramid, fewer blocks.
    f.pyramid_bins = (1.0, 0.5, 0.25, 0.125)
    f.top_k = (3, 2, 1, 1)
    f.reduce_dim = 32
    c.optim.lr_mults = ()
  return common.finalize(c)
