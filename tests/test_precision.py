"""Mixed precision (config.compute_dtype): casts, norm layers, the train step, the parity drift."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import parity_fixture

from checkpoints import verify
from fss_jax.nn.layers import BatchNorm2d, Conv2d, GroupNorm, LayerNorm
from fss_jax.train import precision
from fss_jax.train import state as state_lib
from fss_jax.train import step as step_lib


def test_compute_dtype_names():
  assert precision.compute_dtype("bfloat16") == jnp.bfloat16
  assert precision.compute_dtype(jnp.float32) == jnp.float32
  assert precision.is_float32("float32") and not precision.is_float32("bfloat16")
  with pytest.raises(
    ValueError, match=r"compute_dtype='float16' is not supported; use one of bfloat16, float32"
  ):
    precision.compute_dtype("float16")


def test_cast_floating_keeps_integers():
  tree = {
    "image": np.ones((2, 3), np.float32),
    "mask": np.ones((2, 3), np.int32),
    "nested": [jnp.zeros(2, jnp.float32), jnp.array([True])],
  }
  out = precision.cast_floating(tree, jnp.bfloat16)
  assert out["image"].dtype == jnp.bfloat16 and out["nested"][0].dtype == jnp.bfloat16
  assert out["mask"].dtype == np.int32 and out["nested"][1].dtype == jnp.bool_
  back = precision.to_float32(out)
  assert back["image"].dtype == jnp.float32 and back["mask"].dtype == np.int32


@pytest.mark.parametrize(
  "mine,ref",
  [
    (LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)),
    (GroupNorm(num_groups=1), nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False)),
    (GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)),
  ],
)
def test_norm_layers_equal_flax_in_float32_and_keep_bfloat16(mine, ref):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 12)) * 3.0 + 1.0
  v = ref.init(jax.random.PRNGKey(1), x)
  v = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), v)
  assert jax.tree.map(jnp.shape, mine.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, v)
  np.testing.assert_array_equal(mine.apply(v, x), ref.apply(v, x))  # same op order: bitwise
  y = mine.apply(v, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16  # flax would promote to f32
  np.testing.assert_allclose(np.asarray(y, np.float32), ref.apply(v, x), atol=0.1)


class _ConvBN(nn.Module):
  """conv -> BN (train mode) -> logits: a tiny model with mutable float32 statistics."""

  @nn.compact
  def __call__(self, episode, *, train):
    x = Conv2d(4, 3, padding=1, name="conv")(episode["query_image"])
    self.sow("intermediates", "dtype", jnp.zeros((), x.dtype))
    x = BatchNorm2d(name="bn")(x, use_running_average=not train)
    return {"logits": Conv2d(2, 1, name="cls")(nn.relu(x))}


def _ce(outputs, batch):
  logits = outputs["logits"]
  assert logits.dtype == jnp.float32  # the loss always sees float32
  labels = batch["query_mask"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}


def test_bfloat16_train_step_keeps_float32_state_and_tracks_float32():
  rng = np.random.default_rng(0)
  batch = {
    "query_image": rng.standard_normal((2, 9, 9, 3)).astype(np.float32),
    "query_mask": rng.integers(0, 2, (2, 9, 9)).astype(np.int32),
  }
  model, tx = _ConvBN(), optax.sgd(0.1)
  state = state_lib.create(model, tx, batch, rng=jax.random.PRNGKey(0))
  _, inter = model.apply(
    state.variables(),
    precision.cast_floating(batch, jnp.bfloat16),
    train=False,
    mutable=["intermediates"],
  )
  assert inter["intermediates"]["dtype"][0].dtype == jnp.bfloat16  # the conv ran in bf16
  outs = {}
  for dtype in ("float32", "bfloat16"):
    new, metrics = step_lib.train_step(
      state, batch, model=model, loss_fn=_ce, tx=tx, compute_dtype=dtype
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(new.batch_stats))
    outs[dtype] = (new, metrics)
  (f32, m32), (b16, m16) = outs["float32"], outs["bfloat16"]
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
  assert float(m16["loss"]) != float(m32["loss"])  # bf16 really ran
  for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(b16.params)):
    np.testing.assert_allclose(b, a, atol=2e-2)
  for a, b in zip(jax.tree.leaves(f32.batch_stats), jax.tree.leaves(b16.batch_stats)):
    np.testing.assert_allclose(b, a, atol=2e-2)


def test_jitted_steps_reject_an_unknown_dtype():
  with pytest.raises(ValueError, match="not supported"):
    step_lib.make_eval_step(model=_ConvBN(), mesh=None, compute_dtype="float16")


def test_panet_fixture_drift_in_bfloat16():
  """The drift the guide quotes: PANet's distances within ~1.2 % of the scale, argmax 94.6 %."""
  report = verify.verify_fixture(parity_fixture("panet"), compute_dtype="bfloat16")
  assert report["passed"] and report["compute_dtype"] == "bfloat16"
  pred = report["outputs"]["out_pred"]
  assert 1e-3 < pred["rel"] < 3e-2  # measured 1.17e-2 (float32: 5.8e-7)
  assert pred["argmax_agree"] > 0.9  # measured 0.9456
  f32 = verify.verify_fixture(parity_fixture("panet"))
  assert (
    f32["outputs"]["out_pred"]["rel"] < 1e-5 and f32["outputs"]["out_pred"]["argmax_agree"] == 1.0
  )


def test_every_registered_model_runs_in_bfloat16():
  """Each model's forward under the policy returns float32 logits of the float32 shape."""
  from bench import run as bench_run

  for name in (
    "panet",
    "sccan",
    "pspnet",
    "hdmnet",
    "ssp",
    "sccan_pahnet",
    "hdmnet_pahnet",
    "symnet",
    "jc2a",
  ):
    fields = {"use_ckmm": False} if name == "jc2a" else {}  # CKMM reads a per-fold file
    spec, model, _, _ = bench_run.build(name, shot=1, config_arg="smoke", field_overrides=fields)
    ep = {
      k: v
      for k, v in bench_run.synthetic_episode(1, 1, 65, num_base_classes=16).items()
      if k in bench_run.EVAL_KEYS
    }
    v = jax.eval_shape(lambda k: state_lib.init_variables(model, ep, k), jax.random.PRNGKey(0))  # noqa: B023 (called in this iteration)
    out = jax.eval_shape(
      lambda v, e: precision.apply(model, v, e, dtype="bfloat16", train=False),  # noqa: B023
      v,
      ep,
    )
    ref = jax.eval_shape(lambda v, e: model.apply(v, e, train=False), v, ep)  # noqa: B023 (called in this iteration)
    assert out["logits"].dtype == jnp.float32, name
    assert out["logits"].shape == ref["logits"].shape, name
    del spec
