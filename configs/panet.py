"""PANet (ICCV'19, VGG-16, prototype alignment) on PASCAL-5i / COCO-20i, 1-way K-shot.

  python -m checkpoints.convert --model panet --model-arg source=imagenet \\
      --src vgg16-397923af.pth --dst ~/fss_init/vgg16_panet
  python -m fss_jax.main --config configs/panet.py:dataset=pascal5i,fold=0,shot=1 \\
      --workdir ~/runs/panet_f0_1shot --config.init=~/fss_init/vgg16_panet
  python -m fss_jax.main --config configs/panet.py:dataset=pascal5i,fold=0,shot=1 \\
      --workdir ~/runs/panet_f0_1shot --mode eval
  python -m fss_jax.main --config configs/panet.py:smoke --workdir /tmp/panet_smoke \\
      --config.data.data_dir=<synthetic tfds dir>

The paper's recipe (shared/reference/panet.md §7, kaixin96/PANet ``config.py``):

* SGD, momentum 0.9, weight decay 5e-4 (coupled, all 26 tensors), lr 1e-3 ×0.1 at
  iterations 10k and 20k (``MultiStepLR`` stepped every iteration), 30k iterations,
  batch 1 episode; loss = CE(ignore 255) + 1 · PAR; nothing frozen; seed 1234;
  training starts from the ImageNet VGG-16 (``config.init``, converted as above).
* Input: squash resize to 417 × 417 and random horizontal flip, PANet's resize +
  mirror: the pipeline's §8 chain with its RandScale, RandRotate and Gaussian blur
  left out (``data.scale=(1, 1)``, ``data.rotate=(0, 0)``, ``data.blur=0``).

Deliberate protocol choice: PANet's own test protocol (trainaug images, labels
resized to 417, class-balanced episodes) is not comparable with the other methods.
This config trains on the BAM fold lists and tests on the stored PFENet/BAM-style
episodes (data_protocol.md §7.3) like every other model here, with PANet's squash
resize at test time scored at the original label resolution (§9.2), 5 seeds ×
1000 episodes (PANet runs 5 × 1000). Set ``--config.data.test_resize=aspect`` for
the §9.1 transform.

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/panet/train: CE + PAR terms, 26 tensors, SGD + MultiStepLR; PAR labels support 255
pixels as background (official alignLoss).
"""

from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, dataset="pascal5i", fold=0, shot=1, way=1, smoke=False)
  c = common.base_config(arg, model="panet")
  c.seed = 1234

  c.model_fields.align = True
  c.model_fields.ways = c.get_ref("way")
  c.model_fields.shots = c.get_ref("shot")

  c.data.train_size = 417
  # PANet's own chain (dataloaders/transforms.py): PIL resize of the uint8 image, then mirror
  # (transforms.train_ops resize="panet"; tests/test_augment_official.py).
  c.data.train_resize = "panet"
  c.data.scale = (1.0, 1.0)  # no RandScale, no rotation, no blur: resize + mirror
  c.data.rotate = (0.0, 0.0)
  c.data.blur = 0.0
  c.data.test_size = 417
  c.data.test_resize = "squash"

  c.batch_size = 1
  c.total_steps = 30_000
  c.log_every_steps = 100

  c.optim.lr = 1e-3
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "multistep"
  c.optim.milestones = (10_000, 20_000)

  c.eval.seeds = common.BAM_SEEDS
  c.eval.every_steps = 10_000  # PANet has no validation; this only tracks progress
  c.eval.checkpoint = "latest"  # PANet tests its last snapshot
  c.checkpoint.every_steps = 10_000

  return common.finalize(c)
