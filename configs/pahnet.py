"""What PAHNet's two configs share (configs/sccan_pahnet.py, configs/hdmnet_pahnet.py): PAHNet
(ICCV'25) on SCCAN or on HDMNet, PASCAL-5i / COCO-20i, 1 or 5 shots, ResNet-50.

Frozen parts (``SPEC.frozen``): the SSP predictor (``ssp/``, trained per fold with
configs/ssp.py) and the fold's PSPNet base learner (``pspnet/``, BAM ``best.pth`` or
configs/pspnet.py). A released PAHNet checkpoint holds both: ``python -m checkpoints.convert
--model sccan_pahnet|hdmnet_pahnet --src best.pth --dst INIT`` and ``init_prefix=""`` (default).
To train PAHNet from scratch, load the two parts from their own files::

  --config.init=pspnet=PSP_DIR,ssp=SSP_DIR

(PSP_DIR: a configs/pspnet.py workdir's ``checkpoints`` or ``checkpoints.convert --model
pspnet``; SSP_DIR: a configs/ssp.py workdir's ``checkpoints`` or ``checkpoints.convert
--model ssp``). Training refuses to start without them (``init_required``).

Both recipes (shared/reference/pahnet.md §6-§7) validate every epoch on the test episodes
of seed 321 (model selection on the novel-class mIoU, as the reference) and test 1000 / 4000
episodes (PASCAL / COCO) on seed 321, the prediction resized to the original label size.
"""

from __future__ import annotations

from configs import common


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


def base_config(arg, *, model: str):
  """`common.base_config` plus what both PAHNet recipes set (``model``: ``sccan_pahnet`` or
  ``hdmnet_pahnet``); the caller adds its recipe and calls `common.finalize`."""
  c = common.base_config(arg, model=model)
  coco = c.dataset == "coco20i"
  c.model_fields.shot = c.get_ref("shot")
  c.model_fields.num_base_classes = 61 if coco else 16
  c.model_fields.remat = False  # nn.remat the attention blocks (same params)
  c.data.scale = (0.8, 1.25) if coco else (0.9, 1.1)
  episodes = 4000 if coco else 1000
  c.eval.episodes = episodes
  c.eval.val_episodes = episodes
  c.eval.seeds = (common.VAL_SEED,)
  c.eval.val_seed = common.VAL_SEED
  c.init_required = not c.smoke
  c.init_help = frozen_parts_help(model, c.dataset, c.fold)
  return c
