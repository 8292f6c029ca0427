"""Config pieces shared by every method config (``configs/<method>.py:get_config(arg)``).

A method config is a short program::

  def get_config(arg=None):
    arg = common.parse_arg(arg, dataset="pascal5i", fold=0, shot=1)
    c = common.base_config(arg, model="panet")
    c.model_fields = dict(shot=c.get_ref("shot"), ...)
    c.optim.lr = 1e-3
    ...
    return common.finalize(c)

A method config sets only what differs from `base_config` (Flax's ``configs/v100_x8.py``
style): a value equal to the default is not restated, so the default is the one place to read
it (``configs/sccan.py`` sets its lr, lr multipliers and the transformer's AdamW group and
inherits SGD momentum 0.9, weight decay 1e-4 and the poly schedule).

``arg`` is the string after ``:`` in ``--config configs/panet.py:dataset=coco20i,fold=2,shot=5``
(big_vision's ``parse_arg``); bare words are booleans (``...:smoke``). Everything a
run needs lives here (paths, sizes, shot, fold, optimiser, mesh, checkpoints) and
can be overridden with ``--config.x.y=value``. Derived fields are references
(``c.get_ref``), so overriding ``--config.shot=5`` also changes the model's shot.

The test protocol defaults follow data_protocol.md §7.3 / §10: 1000 episodes per
seed on PASCAL-5i and COCO-20i, the five BAM seeds for the final test, seed 321
for the validation run inside training (model selection), scoring at the
original label resolution with the §9.1 aspect+pad transform. ``protocol`` picks
another preset (``hsnet``, ``patnet_cd``) and ``protocol_fields.<field>`` overrides
one field of it (fss_jax.eval.protocol; docs/protocols.md).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# data_protocol.md §7.3: numpy legacy RNG seeded with 123, randint(0, 1000, n).
BAM_SEEDS = (510, 365, 382, 322, 988)
HDMNET_SEEDS = (510, 365, 382, 322, 988, 98, 742, 17, 595, 106)
VAL_SEED = 321
DATASETS = ("pascal5i", "coco20i")
_ALIASES = {
  "pascal": "pascal5i",
  "voc": "pascal5i",
  "pascal5i": "pascal5i",
  "coco": "coco20i",
  "coco20i": "coco20i",
}


def _coerce(value: str, like):
  if isinstance(like, bool):
    if value.lower() in ("1", "true", "yes", "y", ""):
      return True
    if value.lower() in ("0", "false", "no", "n"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(like, int):
    return int(value)
  if isinstance(like, float):
    return float(value)
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"dataset=pascal5i,fold=0,shot=1,smoke"`` into a ConfigDict.

  Values are converted to the type of their default; a bare word sets a boolean
  default to True. Unknown names are an error that lists the known ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
        f"unknown config argument {key!r} in {arg!r}; known: {', '.join(sorted(defaults))}"
      )
    like = defaults[key]
    if not eq:
      if not isinstance(like, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      value = "true"
    try:
      out[key] = _coerce(value.strip(), like)
    except ValueError as e:
      raise ValueError(f"config argument {key}={value!r}: {e}") from None
  return out


def canonical_dataset(name: str) -> str:
  try:
    return _ALIASES[name.lower()]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}") from None


def base_config(arg: ml_collections.ConfigDict, *, model: str) -> ml_collections.ConfigDict:
  """The fields every run has, with PFENet/BAM-protocol defaults.

  Args:
    arg: from `parse_arg`; reads dataset, fold, shot and (if present) way, smoke.
    model: registry name of the method.
  """
  c = ml_collections.ConfigDict()
  c.model = model
  # Typed keyword fields for registry.get(model).make_model(**model_fields).
  c.model_fields = ml_collections.ConfigDict()

  c.dataset = canonical_dataset(arg.dataset)
  c.fold = int(arg.fold)
  c.shot = int(arg.shot)
  c.way = int(arg.get("way", 1))
  c.seed = VAL_SEED

  # -- data (fss_jax.data.pipeline.EpisodeConfig) --------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.task = "episodes"  # | "base": base-learner images + base labels (PSPNet)
  c.data.protocol = "bam"  # training lists: "bam" (novel images dropped) | "pfenet"
  c.data.coco_split = "interleaved"  # | "contiguous" (PANet's COCO split)
  c.data.train_size = 473
  c.data.train_resize = "crop"  # PFENet/BAM/SCCAN | "squash" (HDMNet)
  c.data.scale = (0.9, 1.1) if c.dataset == "pascal5i" else (0.8, 1.25)
  c.data.rotate = (-10.0, 10.0)
  c.data.blur = 0.5  # Gaussian blur probability (0: none)
  c.data.test_size = 473
  c.data.test_resize = "aspect"  # §9.1 aspect + pad | "squash" (§9.2)
  c.data.label_bucket = 0  # 0: 512 PASCAL / 640 COCO
  c.data.base_label = False
  # Training loader processes: -1 = auto (usable cores - 1, at most 8: pipeline.
  # resolve_worker_count; resume on the same host or set a number), 0 = in-process.
  # Evaluation always runs in-process.
  c.data.worker_count = -1
  c.data.read_threads = 2
  c.data.prefetch_batches = 2

  # -- schedule ------------------------------------------------------------------------
  c.batch_size = 8  # global, split over the mesh's data axis
  c.total_steps = 10_000  # optimiser steps; if epochs > 0: epochs x steps/epoch
  c.epochs = 0
  c.log_every_steps = 50

  # -- optimiser (fss_jax.train.optim.build) -------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "sgd"  # sgd | adamw | adam
  c.optim.lr = 0.0025
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 1e-4  # torch semantics: SGD coupled L2, AdamW decoupled
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = "poly"  # constant | poly | multistep | cosine
  c.optim.power = 0.9
  c.optim.milestones = ()
  c.optim.gamma = 0.1
  c.optim.warmup_steps = 0  # PFENet warm-up: lr * (0.1 + 0.9 t / warmup)
  c.optim.lr_mults = ()  # ((regex, multiplier), ...), e.g. ((".*head.*", 10.0),)
  c.optim.frozen = ()  # extra regexes; the model's ModelSpec.frozen always applies
  c.optim.groups = ml_collections.ConfigDict()  # name -> {pattern, optimizer, lr, ...}
  c.optim.grad_clip_norm = 0.0

  # -- evaluation (data_protocol.md §7.3, §10) -----------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.episodes = 1000  # per seed; SCCAN/PAHNet COCO 4000, HDMNet COCO 10000
  c.eval.seeds = BAM_SEEDS  # final test (--mode eval): mean ± std over seeds
  c.eval.val_seed = VAL_SEED  # validation during training (model selection)
  c.eval.val_episodes = 1000
  c.eval.every_steps = -1  # -1: once per epoch; 0: never during training
  c.eval.batch_size = -1  # -1: one episode per data-parallel device
  c.eval.episodes_dir = ""  # stored episode lists; "": <workdir>/episodes
  c.eval.checkpoint = "best"  # --mode eval uses: best | latest
  c.eval.num_images = 4  # query/support/prediction panels written to TensorBoard
  c.eval.allow_other_fold = False  # config.init trained on another fold: error unless True
  # Frozen-encoder features computed once per unique test image and reused by every episode
  # and seed (fss_jax/eval/cached.py; exact). False: the whole forward per episode.
  c.eval.cache = True
  c.eval.cache_bytes = 0  # host memory the cache may use; 0: a quarter of the host's
  c.eval.cache_placement = "auto"  # auto (device when it fits 3x over) | host | device
  # Evaluation shape independent of training (docs/protocols.md): K supports, N ways, the test
  # dataset / fold (0, 0, "", -1: the training values). A model refuses a K it cannot fuse.
  # eval.dataset may name a cross-domain test set (fss1000 | deepglobe | isic2018 | chest_xray,
  # docs/cross_domain.md): its "test" split, every class, 1-way; PATNet's protocol with
  # --config.protocol=patnet_cd (docs/protocols.md, "Cross-domain evaluation").
  c.eval.shot = 0
  c.eval.way = 0
  c.eval.dataset = ""
  c.eval.fold = -1

  # -- test protocol (fss_jax.eval.protocol, docs/protocols.md) ------------------------
  # pfenet_bam: the fields above as this config sets them | hsnet | patnet_cd. Each field of
  # protocol_fields overrides the preset's value (None: the preset's).
  c.protocol = "pfenet_bam"
  c.protocol_fields = ml_collections.ConfigDict()
  c.protocol_fields.test_size = config_dict.placeholder(int)  # input side S
  c.protocol_fields.test_resize = config_dict.placeholder(str)  # aspect | squash
  c.protocol_fields.score = config_dict.placeholder(str)  # original | input (S x S)
  c.protocol_fields.ignore_255 = config_dict.placeholder(bool)  # False: 255 counts as background
  c.protocol_fields.novel_filter = config_dict.placeholder(bool)  # training lists drop novel images
  c.protocol_fields.class_split = config_dict.placeholder(str)  # COCO: interleaved | contiguous
  c.protocol_fields.episode_rule = config_dict.placeholder(str)  # pfenet | hsnet
  c.protocol_fields.lists = config_dict.placeholder(str)  # build | hsnet's data/splits dir
  c.protocol_fields.episodes = config_dict.placeholder(int)  # per seed; 0: one per query
  c.protocol_fields.seeds = config_dict.placeholder(tuple)
  c.protocol_fields.seed_rule = config_dict.placeholder(str)  # per_episode | sequential

  # -- checkpoints / init / resume -----------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  c.init = ""  # converted weights (python -m checkpoints.convert --dst DIR)
  c.init_prefix = ""  # sub-module the converted weights belong to ("" = whole model)
  c.resume = ""  # another run's workdir to continue from

  # -- logging -------------------------------------------------------------------------
  c.tensorboard = True

  # -- numerics ------------------------------------------------------------------------
  # bfloat16: convolutions / matmuls / attention in bf16, params, statistics and losses in
  # float32 (fss_jax.train.precision); float32 is what the parity fixtures are checked in.
  c.compute_dtype = "float32"

  # -- devices -------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, num_devices=0))  # 0: all devices
  c.distributed = ml_collections.ConfigDict(
    dict(
      mode="off",  # off | auto (TPU pods, SLURM) | manual
      coordinator_address="",
      num_processes=1,
      process_id=0,
      local_device_ids=(),
      cpu_collectives="gloo",
    )
  )

  c.smoke = bool(arg.get("smoke", False))
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Same code path, tiny sizes (big_vision's ``runlocal``): a few steps on small images."""
  c.data.train_size = 65
  c.data.test_size = 65
  if tuple(c.data.scale) != (1.0, 1.0):  # keep "no RandScale" recipes (PANet, SSP) as they are
    c.data.scale = (0.9, 1.1)
  c.data.label_bucket = 512
  c.data.worker_count = 0
  c.batch_size = 2
  c.total_steps = 3
  c.epochs = 0
  c.log_every_steps = 1
  c.eval.episodes = 4
  c.eval.val_episodes = 4
  c.eval.seeds = (321, 322)
  c.eval.every_steps = 3
  # Under every preset (hsnet's 400 px / 1000 episodes would not be a smoke run); references,
  # so that --config.data.test_size / eval.episodes / eval.seeds still apply to a smoke run.
  c.protocol_fields.test_size = c.data.get_ref("test_size")
  c.protocol_fields.episodes = c.eval.get_ref("episodes")
  c.protocol_fields.seeds = c.eval.get_ref("seeds")
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  # c.tensorboard stays on: a smoke run leaves the event files a real run does.
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies the smoke switch and locks the config (unknown --config keys are errors)."""
  if c.smoke:
    apply_smoke(c)
  c.lock()
  return c


__all__ = [
  "parse_arg",
  "base_config",
  "apply_smoke",
  "finalize",
  "BAM_SEEDS",
  "HDMNET_SEEDS",
  "VAL_SEED",
  "canonical_dataset",
]
