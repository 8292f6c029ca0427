"""SSP (ECCV'22) prototype predictor on PASCAL-5i / COCO-20i, 1 or 5 shots, ResNet-50.

  python -m fss_jax.main --config configs/ssp.py:dataset=pascal,fold=0,shot=1 --workdir W \\
      --config.init=R0            # ImageNet layers 0-3, see below
  python -m fss_jax.main --config configs/ssp.py:dataset=coco,fold=2,refine --workdir W
  python -m fss_jax.main --config configs/ssp.py:smoke --workdir /tmp/ssp_smoke

SSP's own recipe (shared/reference/ssp.md §4-§7, ``main.py`` / ``all.sh``), used to train
PAHNet's frozen predictor per fold:

* trainable: the conv weights of layer2 and layer3 only (``SPEC.frozen``: layer0,
  layer1 and every BN affine parameter; BN always in inference mode);
* SGD lr 1e-3, momentum 0.9, weight decay 5e-4; step schedule /10 after T/3 and
  2T/3 iterations, T = 24000 episodes / batch 4 = 6000; fp32, no clipping;
* loss ``CE(out_1) + CE(self_out) + 0.2 CE(supp_out)`` (+ ``CE(out_2)`` with ``refine``);
* data: random crop 473 and horizontal flip only (no scale / rotate / blur);
  training images that contain novel classes are kept (``protocol="pfenet"``);
* class split: ``split=interleaved`` (default) is the split of BAM / SCCAN / HDMNet /
  PAHNet - use it for a leak-free PAHNet predictor (ssp.md §6); ``split=ssp`` gives
  SSP's own contiguous COCO split (the published SSP numbers);
* test (ssp.md §7.1): 1000 (PASCAL) / 4000 (COCO) episodes for each of the seeds 0-4,
  mean reported; validation after each of the 20 "epochs" (300 iterations) on the
  1000 / 4000 test episodes of seed 0 (SSP selects on the test classes). SSP tests
  at the original image size; the engine resizes (aspect + pad to 473) and scores at
  the original label size.

ImageNet initialisation (ssp.md §8.2): SSP's ``pretrained/resnet50.pth`` converts with
``python -m checkpoints.convert --model ssp --model-arg source=imagenet --src resnet50.pth
--dst R0`` (layers 0-3 kept, layer4 / fc dropped); PSPNet's ``resnet50_v2.pth`` with
``--model-arg source=resnet_v2``. A trained SSP ``.pth`` converts with ``--model ssp``.
All three give the whole SSP tree (``init_prefix=""``).

Training step: one step of the engine with this config equals the official train
script's (``python -m checkpoints.verify --fixture ../shared/parity/...``, WORKSPACE §9):
parity/ssp/train: CE(out1) + CE(self) + 0.2 CE(support), 32 conv weights of layer2-3;
augmentation = SSP's own pad (bottom/right) + crop + flip.
"""

from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(
    arg, dataset="pascal", fold=0, shot=1, refine=False, split="interleaved", smoke=False
  )
  c = common.base_config(arg, model="ssp")
  coco = c.dataset == "coco20i"
  if arg.split not in ("interleaved", "ssp"):
    raise ValueError(
      f"split must be 'interleaved' (BAM/PAHNet) or 'ssp' (SSP's contiguous "
      f"COCO split), got {arg.split!r}"
    )

  c.refine = bool(arg.refine)
  c.model_fields.shot = c.get_ref("shot")
  c.model_fields.refine = c.get_ref("refine")

  # Data (§5, §6).
  c.data.protocol = "pfenet"
  c.data.coco_split = "contiguous" if arg.split == "ssp" else "interleaved"
  # SSP's dataset/transform.py: pad bottom/right (image 0, label 255), one random crop, then
  # flip (transforms.train_ops resize="ssp"; tests/test_augment_official.py).
  c.data.train_resize = "ssp"
  c.data.scale = (1.0, 1.0)  # crop + flip only: no RandScale, rotation or blur
  c.data.rotate = (0.0, 0.0)
  c.data.blur = 0.0

  # Schedule and optimiser (§5).
  c.batch_size = 4
  c.total_steps = 6000
  c.optim.lr = 1e-3
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "multistep"
  c.optim.milestones = (c.total_steps // 3, 2 * c.total_steps // 3)

  # Test protocol (§7.1).
  episodes = 4000 if coco else 1000
  c.eval.episodes = episodes
  c.eval.val_episodes = episodes
  c.eval.seeds = (0, 1, 2, 3, 4)
  c.eval.val_seed = 0
  c.eval.every_steps = 300

  # layer0 / layer1 and every BatchNorm are frozen: they must be ImageNet weights.
  c.init_required = not c.smoke
  c.init_help = (
    "Convert an ImageNet ResNet-50 and pass it: python -m checkpoints.convert --model ssp "
    "--model-arg source=imagenet --src pretrained/resnet50.pth --dst R0 (SSP's file; PSPNet's "
    "initmodel/resnet50_v2.pth with --model-arg source=resnet_v2), then --config.init=R0."
  )
  if c.smoke:
    c.optim.milestones = (1, 2)
  return common.finalize(c)
