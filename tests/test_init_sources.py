"""config.init with several sources (prefix=path entries): PAHNet trained from scratch."""

import jax
import numpy as np
import optax
import pytest

from bench import run as bench_run
from checkpoints import io as ckpt_io
from configs import hdmnet_pahnet as hdmnet_pahnet_config
from configs import sccan_pahnet as sccan_pahnet_config
from fss_jax.models import registry
from fss_jax.train import state as state_lib


def test_parse_inits():
  assert state_lib.parse_inits("") == []
  assert state_lib.parse_inits("/w/psp", "pspnet") == [("pspnet", "/w/psp")]
  assert state_lib.parse_inits("/data/run=3/ckpt") == [
    ("", "/data/run=3/ckpt")
  ]  # '=' inside a path
  assert state_lib.parse_inits("pspnet=/w/psp, ssp=/w/ssp") == [
    ("pspnet", "/w/psp"),
    ("ssp", "/w/ssp"),
  ]
  assert state_lib.parse_inits("transformer/mix=/w/t") == [("transformer/mix", "/w/t")]
  with pytest.raises(ValueError, match="mixes prefix=path entries"):
    state_lib.parse_inits("pspnet=/w/psp,/w/ssp")
  with pytest.raises(ValueError, match="leave config.init_prefix empty"):
    state_lib.parse_inits("pspnet=/w/psp,ssp=/w/ssp", "pspnet")


def _random_variables(model, episode, seed):
  """Random float32 numpy variables with the model's tree (cheap: eval_shape, no compile)."""
  shapes = jax.eval_shape(
    lambda k: state_lib.init_variables(model, episode, k), jax.random.PRNGKey(0)
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _flat(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree) if tree else {}


def test_pahnet_from_a_pspnet_and_an_ssp_file(tmp_path):
  episode = {
    k: v for k, v in bench_run.synthetic_episode(1, 1, 65).items() if k in bench_run.EVAL_KEYS
  }
  pahnet = registry.get("sccan_pahnet").make_model(shot=1, num_base_classes=16, grid=32, blocks=2)
  psp = registry.get("pspnet").make_model(num_classes=16)
  ssp = registry.get("ssp").make_model(shot=1)
  psp_vars, ssp_vars = _random_variables(psp, episode, 1), _random_variables(ssp, episode, 2)
  assert set(ssp_vars["params"]) == {"ssp"}  # the ssp model wraps its predictor
  ckpt_io.write_orbax(psp_vars, tmp_path / "psp")
  ckpt_io.write_orbax(ssp_vars, tmp_path / "ssp")

  target = _random_variables(pahnet, episode, 3)
  tx = optax.identity()
  state = state_lib.TrainState(
    step=np.int32(0),
    params=target["params"],
    batch_stats=target["batch_stats"],
    opt_state=tx.init(target["params"]),
    rng=jax.random.PRNGKey(0),
  )
  inits = state_lib.parse_inits(f"pspnet={tmp_path / 'psp'},ssp={tmp_path / 'ssp'}")
  loaded = state_lib.load_init(state, inits, tx)

  got = {c: _flat(jax.device_get(getattr(loaded, c))) for c in ("params", "batch_stats")}
  before = {c: _flat(target[c]) for c in ("params", "batch_stats")}
  for coll in ("params", "batch_stats"):
    src = {("pspnet",) + k: v for k, v in _flat(psp_vars[coll]).items()}
    src.update(_flat(ssp_vars[coll]))  # already ("ssp", ...)
    assert src, coll
    for k, v in src.items():
      np.testing.assert_array_equal(got[coll][k], v)
    rest = [k for k in before[coll] if k[0] not in ("pspnet", "ssp")]
    for k in rest:  # the affinity learner keeps its init
      np.testing.assert_array_equal(got[coll][k], before[coll][k])
  assert any(k[0] == "transformer" for k in before["params"])

  # A wrong file for a part names the part's keys.
  bad = state_lib.parse_inits(f"pspnet={tmp_path / 'ssp'}")
  with pytest.raises(state_lib.InitMismatchError, match="under 'pspnet'"):
    state_lib.load_init(state, bad, tx)


def test_pahnet_config_requires_its_frozen_parts():
  c = sccan_pahnet_config.get_config()
  assert c.init_required and "--config.init=pspnet=<psp_dir>,ssp=<ssp_dir>" in c.init_help
  assert "checkpoints.convert --model sccan_pahnet" in c.init_help
  assert not hdmnet_pahnet_config.get_config("smoke").init_required


def _sccan_setup():
  episode = {
    k: v for k, v in bench_run.synthetic_episode(1, 1, 65).items() if k in bench_run.EVAL_KEYS
  }
  sccan = registry.get("sccan").make_model(shot=1, grid=32, depth=2)
  full = _random_variables(sccan, episode, 4)
  tx = optax.identity()
  target = _random_variables(sccan, episode, 5)
  state = state_lib.TrainState(
    step=np.int32(0),
    params=target["params"],
    batch_stats=target["batch_stats"],
    opt_state=tx.init(target["params"]),
    rng=jax.random.PRNGKey(0),
  )
  return full, state, tx


def test_a_full_checkpoint_under_the_backbone_prefix_names_itself_and_the_fix(tmp_path):
  """SCCAN's config loads config.init under 'backbone'; a converted full SCCAN passed there
  gets one line from its metadata.json and the prefix that fits, not 275/489 key lines."""
  full, state, tx = _sccan_setup()
  ckpt_io.write_orbax(
    full,
    tmp_path / "sccan",
    metadata={"model": "sccan", "fields": {"layers": 50}, "dataset": "pascal5i", "fold": 1},
  )
  with pytest.raises(state_lib.InitMismatchError) as e:
    state_lib.load_init(state, [("backbone", str(tmp_path / "sccan"))], tx, model="sccan")
  msg = str(e.value)
  assert "\n" not in msg, msg
  assert msg.startswith(
    f"{tmp_path / 'sccan'} holds a converted sccan checkpoint (layers=50; "
    f"pascal5i fold 1): they fit the whole model, not under 'backbone' ("
  ), msg
  assert msg.endswith("; pass --config.init_prefix=''"), msg
  assert "missing, " in msg and "unexpected keys under 'backbone'" in msg
  assert len(e.value.details.splitlines()) > 40 and "missing in the checkpoint" in e.value.details
  # The same file under '' loads.
  loaded = _flat(
    jax.device_get(state_lib.load_init(state, [("", str(tmp_path / "sccan"))], tx).params)
  )
  for k, v in list(_flat(full["params"]).items())[::50]:
    np.testing.assert_array_equal(loaded[k], v)


def test_a_backbone_checkpoint_as_the_whole_model_points_at_the_backbone(tmp_path):
  full, state, tx = _sccan_setup()
  backbone = {"params": full["params"]["backbone"], "batch_stats": full["batch_stats"]["backbone"]}
  ckpt_io.write_orbax(backbone, tmp_path / "r50", metadata={"model": "resnet_sccan", "fields": {}})
  with pytest.raises(
    state_lib.InitMismatchError,
    match=r"holds a converted resnet_sccan checkpoint: they fit the model's "
    r"'backbone' sub-module, not as the whole model \(.*\); pass "
    r"--config.init_prefix=backbone$",
  ):
    state_lib.load_init(state, [("", str(tmp_path / "r50"))], tx, model="sccan")
  # As a prefix=path entry, the hint is the entry.
  with pytest.raises(state_lib.InitMismatchError, match=r"pass backbone=.*r50 in --config.init$"):
    state_lib.load_init(
      state, [("transformer", str(tmp_path / "r50"))], tx, model="sccan", entries=True
    )


def test_weights_of_another_method_say_so(tmp_path):
  full, state, tx = _sccan_setup()
  ckpt_io.write_orbax(
    {"params": {"encoder": {"conv": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}}}},
    tmp_path / "panet",
    metadata={"model": "panet", "fields": {}},
  )
  with pytest.raises(
    state_lib.InitMismatchError,
    match=r"holds a converted panet checkpoint: a panet model, not weights for this "
    r"sccan config's 'backbone' sub-module \(.*\); convert the weights",
  ):
    state_lib.load_init(state, [("backbone", str(tmp_path / "panet"))], tx, model="sccan")
  # Without metadata and nowhere to fit: the key listing as before.
  ckpt_io.write_orbax({"params": {"x": {"kernel": np.zeros((1,), np.float32)}}}, tmp_path / "bare")
  with pytest.raises(
    state_lib.InitMismatchError, match=r"do not match the model under 'backbone':\n"
  ):
    state_lib.load_init(state, [("backbone", str(tmp_path / "bare"))], tx, model="sccan")


def test_weights_info_of_converted_and_trained_checkpoints(tmp_path):
  import orbax.checkpoint as ocp

  from fss_jax.train import checkpointing

  v = {"params": {"w": np.ones((2,), np.float32)}}
  ckpt_io.write_orbax(
    v,
    tmp_path / "conv",
    metadata={"model": "pspnet", "fields": {}, "dataset": "coco20i", "fold": 3},
  )
  info = state_lib.weights_info(tmp_path / "conv")
  assert (info["kind"], info["model"], info["dataset"], info["fold"]) == (
    "converted",
    "pspnet",
    "coco20i",
    3,
  )
  assert state_lib.weights_info(tmp_path / "conv" / "variables")["fold"] == 3
  assert state_lib.describe_weights(info) == "a converted pspnet checkpoint (coco20i fold 3)"
  st = state_lib.TrainState(
    step=np.int32(4), params=v["params"], batch_stats={}, opt_state={}, rng=np.zeros(2, np.uint32)
  )
  mngr = checkpointing.checkpoint_manager(
    tmp_path / "wd" / checkpointing.CHECKPOINT_DIR, keep=1, async_save=False
  )
  mngr.save(
    4,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(st),
      meta=ocp.args.JsonSave(
        {"model": "pspnet", "model_fields": {"num_classes": 16}, "dataset": "pascal5i", "fold": 2}
      ),
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  info = state_lib.weights_info(tmp_path / "wd" / checkpointing.CHECKPOINT_DIR)
  assert (info["kind"], info["dataset"], info["fold"], info["fields"]) == (
    "trained",
    "pascal5i",
    2,
    {"num_classes": 16},
  )
  assert state_lib.weights_info(tmp_path / "nothing") == {}


def _fold_config(fold=0, allow=False):
  import ml_collections

  return ml_collections.ConfigDict(
    {"dataset": "pascal5i", "fold": fold, "eval": {"allow_other_fold": allow}}
  )


def test_init_of_another_fold_is_refused_unless_allowed(tmp_path):
  from fss_jax.train import checkpointing

  v = {"params": {"w": np.ones((2,), np.float32)}}
  path = str(
    ckpt_io.write_orbax(
      v,
      tmp_path / "psp_f2",
      metadata={"model": "pspnet", "fields": {}, "dataset": "pascal5i", "fold": 2},
    )
  )
  inits = [("pspnet", path)]
  with pytest.raises(
    checkpointing.OtherFoldError,
    match=rf"^checkpoint {path} was trained on pascal5i fold 2; evaluating fold 0 "
    rf"with it scores classes it was trained on\. .*allow_other_fold=true",
  ):
    checkpointing.check_init_folds(_fold_config(0), inits, mode="eval")
  with pytest.raises(checkpointing.OtherFoldError, match="training fold 1 with it"):
    checkpointing.check_init_folds(_fold_config(1), inits, mode="train")
  checkpointing.check_init_folds(_fold_config(2), inits, mode="eval")  # its own fold
  checkpointing.check_init_folds(_fold_config(0, allow=True), inits, mode="eval")  # a warning
  coco = _fold_config(0)
  coco.dataset = "coco20i"
  checkpointing.check_init_folds(coco, inits, mode="eval")  # another dataset: a warning
  ckpt_io.write_orbax(v, tmp_path / "r50", metadata={"model": "resnet_sccan", "fields": {}})
  checkpointing.check_init_folds(
    _fold_config(0), [("backbone", str(tmp_path / "r50"))], mode="train"
  )
