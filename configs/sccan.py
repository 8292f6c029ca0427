"""SCCAN (ICCV'23) on PASCAL-5i / COCO-20i, 1 or 5 shots, ResNet-50 or ResNet-101.

  python -m fss_jax.main --config configs/sccan.py:dataset=pascal,fold=0,shot=1 --workdir W
  python -m fss_jax.main --config configs/sccan.py:dataset=coco,fold=2,shot=5,layers=101 ...
  python -m fss_jax.main --config configs/sccan.py:smoke --workdir /tmp/sccan_smoke

The official recipe (shared/reference/sccan.md §7, ``train_sccan.py``):

* two optimisers on one loss, both stepping every iteration — expressed for
  ``fss_jax.train.optim.build`` (``optax.multi_transform``):
  - default group (down_query, down_supp, init_merge_*, the ASPP decoder): SGD,
    momentum 0.9, coupled weight decay 1e-4, base lr 0.005 with ``index_split: -1``
    = every group at 10x -> ``lr_mults=((".*", 10.0),)``, poly(0.9) per iteration;
  - ``groups.transformer`` (every ``transformer/...`` tensor, LayerNorms and biases
    included): AdamW lr 6e-5 constant, betas (0.9, 0.999), eps 1e-8, decoupled
    weight decay 0.01;
  - the backbone is frozen by the model's ``SPEC.frozen``.
* batch 8, 473x473 random crops with RandScale [0.9, 1.1] (PASCAL) / [0.8, 1.25]
  (COCO), rotate +-10, blur, flip; 200 epochs (PASCAL) / 50 (COCO).
* validation / model selection after every epoch on 1000 (PASCAL) / 4000 (COCO)
  episodes with seed 321, aspect-preserving resize to 473 + pad, scored at the
  original label size (§8). The reference also validates at half epochs when
  epochs <= 100 (COCO) and stops after 75 epochs without a new best; set
  ``--config.eval.every_steps`` for the former (the engine has no early stop).
* the ImageNet deep-stem backbone (``initmodel/resnet{50,101}_v2.pth``) is loaded
  from a converted checkpoint: ``python -m checkpoints.convert --model resnet_sccan
  --src initmodel/resnet50_v2.pth --dst W0 [--model-arg depth=101]`` then
  ``--config.init=W0`` (``init_prefix`` is "backbone"). A released SCCAN model
  converts with ``--model sccan [--model-arg layers=101]`` and is evaluated with
  ``--config.init=DIR --config.init_prefix=""``.

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/sccan/train: Dice alone (the two aux terms are zeros), 204 tensors; the last SCCA
block's support stream is held by the official AdamW but never gets a gradient, so it is
left out here too (``SPEC.unused``).
"""

from __future__ import annotations

from configs import common


def set_optimizers(c) -> None:
  """SCCAN's two optimisers (module docstring): SGD at 0.005 x 10 for everything trainable
  (momentum 0.9, weight decay 1e-4, poly 0.9: the defaults) and AdamW at a constant 6e-5 for
  the transformer. PAHNet on SCCAN trains with the same (configs/sccan_pahnet.py)."""
  c.optim.lr = 0.005
  c.optim.lr_mults = ((".*", 10.0),)
  c.optim.groups.transformer = dict(
    pattern=r"transformer/.*",
    optimizer="adamw",
    lr=6e-5,
    schedule="constant",
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.01,
  )


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal", fold=0, shot=1, layers=50, smoke=False)
  c = common.base_config(arg, model="sccan")
  coco = c.dataset == "coco20i"

  c.layers = int(arg.layers)
  if c.layers not in (50, 101):
    raise ValueError(f"SCCAN has ResNet-50 and ResNet-101 configs, got layers={c.layers}")
  c.model_fields.shot = c.get_ref("shot")
  c.model_fields.layers = c.get_ref("layers")
  c.model_fields.remat = False  # nn.remat the attention blocks (same params)

  # Data: the common defaults (BAM lists, random crop 473 / aspect + pad 473 for both datasets;
  # SCCAN's COCO also uses 473).

  # Schedule (batch 8: the default).
  c.epochs = 50 if coco else 200

  set_optimizers(c)

  # Test protocol (§8): one seed, 1000 / 4000 episodes, validated every epoch.
  episodes = 4000 if coco else 1000
  c.eval.episodes = episodes
  c.eval.val_episodes = episodes
  c.eval.seeds = (common.VAL_SEED,)
  c.eval.val_seed = common.VAL_SEED

  c.init_prefix = "backbone"
  # The backbone is frozen: without ImageNet weights SCCAN would train on a random ResNet.
  c.init_required = not c.smoke
  c.init_help = (
    "Convert the ImageNet backbone of the official repository (initmodel/resnet50_v2.pth, or "
    "resnet101_v2.pth with layers=101) and pass it: python -m checkpoints.convert --model "
    "resnet_sccan --src initmodel/resnet50_v2.pth --dst W0 [--model-arg depth=101], then "
    "--config.init=W0. A released SCCAN model: --config.init=DIR --config.init_prefix=''."
  )

  if c.smoke:
    # Same code path, a small transformer grid and two blocks.
    c.model_fields.grid = 32
    c.model_fields.depth = 2
  return common.finalize(c)
