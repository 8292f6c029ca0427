"""config.init with several sources (prefix=path entries): PAHNet trained from scratch."""

import jax
import numpy as np
import optax
import pytest

from bench import run as bench_run
from checkpoints import io as ckpt_io
from configs import pahnet as pahnet_config
from fss_jax.models import registry
from fss_jax.train import state as state_lib


def test_parse_inits():
  assert state_lib.parse_inits("") == []
  assert state_lib.parse_inits("/w/psp", "pspnet") == [("pspnet", "/w/psp")]
  assert state_lib.parse_inits("/data/run=3/ckpt") == [("", "/data/run=3/ckpt")]   # '=' inside a path
  assert state_lib.parse_inits("pspnet=/w/psp, ssp=/w/ssp") == [("pspnet", "/w/psp"), ("ssp", "/w/ssp")]
  assert state_lib.parse_inits("transformer/mix=/w/t") == [("transformer/mix", "/w/t")]
  with pytest.raises(ValueError, match="mixes prefix=path entries"):
    state_lib.parse_inits("pspnet=/w/psp,/w/ssp")
  with pytest.raises(ValueError, match="leave config.init_prefix empty"):
    state_lib.parse_inits("pspnet=/w/psp,ssp=/w/ssp", "pspnet")


def _random_variables(model, episode, seed):
  """Random float32 numpy variables with the model's tree (cheap: eval_shape, no compile)."""
  shapes = jax.eval_shape(lambda k: state_lib.init_variables(model, episode, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _flat(tree):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(tree) if tree else {}


def test_pahnet_from_a_pspnet_and_an_ssp_file(tmp_path):
  episode = {k: v for k, v in bench_run.synthetic_episode(1, 1, 65).items() if k in bench_run.EVAL_KEYS}
  pahnet = registry.get("sccan_pahnet").make_model(shot=1, num_base_classes=16, grid=32, blocks=2)
  psp = registry.get("pspnet").make_model(num_classes=16)
  ssp = registry.get("ssp").make_model(shot=1)
  psp_vars, ssp_vars = _random_variables(psp, episode, 1), _random_variables(ssp, episode, 2)
  assert set(ssp_vars["params"]) == {"ssp"}          # the ssp model wraps its predictor
  ckpt_io.write_orbax(psp_vars, tmp_path / "psp")
  ckpt_io.write_orbax(ssp_vars, tmp_path / "ssp")

  target = _random_variables(pahnet, episode, 3)
  tx = optax.identity()
  state = state_lib.TrainState(step=np.int32(0), params=target["params"], batch_stats=target["batch_stats"],
                               opt_state=tx.init(target["params"]), rng=jax.random.PRNGKey(0))
  inits = state_lib.parse_inits(f"pspnet={tmp_path / 'psp'},ssp={tmp_path / 'ssp'}")
  loaded = state_lib.load_init(state, inits, tx)

  got = {c: _flat(jax.device_get(getattr(loaded, c))) for c in ("params", "batch_stats")}
  before = {c: _flat(target[c]) for c in ("params", "batch_stats")}
  for coll in ("params", "batch_stats"):
    src = {("pspnet",) + k: v for k, v in _flat(psp_vars[coll]).items()}
    src.update(_flat(ssp_vars[coll]))                  # already ("ssp", ...)
    assert src, coll
    for k, v in src.items():
      np.testing.assert_array_equal(got[coll][k], v)
    rest = [k for k in before[coll] if k[0] not in ("pspnet", "ssp")]
    for k in rest:                                     # the affinity learner keeps its init
      np.testing.assert_array_equal(got[coll][k], before[coll][k])
  assert any(k[0] == "transformer" for k in before["params"])

  # A wrong file for a part names the part's keys.
  bad = state_lib.parse_inits(f"pspnet={tmp_path / 'ssp'}")
  with pytest.raises(state_lib.InitMismatchError, match="under 'pspnet'"):
    state_lib.load_init(state, bad, tx)


def test_pahnet_config_requires_its_frozen_parts():
  c = pahnet_config.get_config("variant=sccan")
  assert c.init_required and "--config.init=pspnet=<psp_dir>,ssp=<ssp_dir>" in c.init_help
  assert "checkpoints.convert --model sccan_pahnet" in c.init_help
  assert not pahnet_config.get_config("variant=hdmnet,smoke").init_required
