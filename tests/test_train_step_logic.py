"""checkpoints.train_step's own logic on tiny inputs: the trainable-set and hyper-parameter
verdicts, the dropout switch and the schedule count, without a fixture."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from checkpoints import train_step
from fss_jax.train import optim


def _meta(params, no_grad=(), not_in_opt=()):
  return {
    "params": {k: {} for k in params},
    "frozen": {
      "in_optimizer_without_grad": list(no_grad),
      "trainable_not_in_optimizer": list(not_in_opt),
    },
  }


def test_trainable_set_errors_name_each_key_and_side():
  meta = _meta(
    ["a.weight", "b.weight", "unused.weight"],
    no_grad=["unused.weight"],
    not_in_opt=["kshot_rw.0.weight"],
  )
  ours_all = {"a.weight", "b.weight", "unused.weight", "kshot_rw.0.weight", "backbone.w"}
  assert train_step.trainable_set_errors({"a.weight", "b.weight"}, ours_all, meta) == []
  # a tensor torch holds but never updates may be trained or not (its delta decides)
  assert (
    train_step.trainable_set_errors({"a.weight", "b.weight", "unused.weight"}, ours_all, meta) == []
  )
  errs = train_step.trainable_set_errors(
    {"a.weight", "kshot_rw.0.weight", "backbone.w"}, ours_all, meta
  )
  assert errs == [
    "backbone.w: trained here, frozen in the reference",
    "kshot_rw.0.weight: trained here, requires grad but is in no official "
    "optimizer: the reference never updates it",
    "b.weight: updated by the reference optimiser, frozen here",
  ]
  errs = train_step.trainable_set_errors({"a.weight"}, {"a.weight"}, meta)
  assert errs == ["b.weight: updated by the reference optimiser, missing in this model"]


def test_hparam_errors_compare_optimizer_decay_momentum_betas():
  sgd = {
    "optimizer": "sgd",
    "lr": 0.05,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "nesterov": False,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
  }
  group = {
    "hparams": {
      "lr": 0.05,
      "weight_decay": 1e-4,
      "momentum": 0.9,
      "nesterov": False,
      "dampening": 0,
    }
  }
  assert train_step._hparam_errors("k", sgd, group, "torch.optim.sgd.SGD") == []
  wrong = dict(sgd, weight_decay=5e-4, momentum=0.0)
  errs = train_step._hparam_errors("k", wrong, group, "torch.optim.sgd.SGD")
  assert len(errs) == 2 and "weight decay" in errs[0] and "momentum" in errs[1]
  assert train_step._hparam_errors("k", sgd, group, "torch.optim.adamw.AdamW") == [
    "k: optimizer sgd here, adamw in the reference"
  ]
  adamw = dict(sgd, optimizer="adamw", weight_decay=0.01)
  agroup = {"hparams": {"weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1e-8}}
  errs = train_step._hparam_errors("k", adamw, agroup, "torch.optim.adamw.AdamW")
  assert errs == ["k: b2 0.999 here, 0.99 in the reference"]


def test_no_dropout_turns_every_dropout_into_identity():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dropout(0.5)(x, deterministic=False) + nn.Dropout(0.9, broadcast_dims=(1,))(
        x, deterministic=False
      )

  x = jnp.ones((4, 8))
  rngs = {"dropout": jax.random.PRNGKey(0)}
  assert not np.allclose(M().apply({}, x, rngs=rngs), 2.0)
  with train_step.no_dropout():
    y = jax.jit(lambda v: M().apply({}, v, rngs=rngs))(x)
  np.testing.assert_array_equal(y, 2.0 * np.ones((4, 8)))


def test_schedule_count_sets_the_lr_but_keeps_adam_fresh():
  params = {"w": jnp.ones((3,))}
  opt = optim.build(
    {"optimizer": "adamw", "lr": 1e-3, "schedule": "poly", "power": 0.9, "weight_decay": 0.0},
    params,
    total_steps=10,
  )
  state = train_step._set_schedule_counts(opt.tx.init(params), 4)
  g = {"w": jnp.asarray([1e-3, -2.0, 5.0])}
  updates, _ = opt.tx.update(g, state, params)
  # first Adam step (bias-corrected: -lr * sign(g)) at the lr of iteration 5
  lr5 = 1e-3 * (1 - 5 / 10) ** 0.9
  np.testing.assert_allclose(updates["w"], -lr5 * np.sign(np.asarray(g["w"])), rtol=1e-4)
  assert train_step._schedule_count({"type": "poly", "curr_iter": 7}) == 6
  assert train_step._schedule_count({"type": "MultiStepLR", "i_iter": 0}) == 0
  assert train_step._schedule_count({"type": "step", "iteration": 1}) == 0
  assert isinstance(optax.ScaleByScheduleState(count=0), tuple)


def test_cpu_kernels_follow_the_cpu(tmp_path):
  """AVX-512 CPUs: each model's measured kernels; AVX2-only CPUs: XLA's own for every model."""
  from checkpoints import train_adapters

  panet, symnet = (
    {"model_class": "models.fewshot.FewShotSeg"},
    {"model_class": "model.SymNet.SymNet"},
  )
  assert train_adapters.cpu_kernels(panet, avx512=True) == "xla"
  assert train_adapters.cpu_kernels(symnet, avx512=True) == "ynnpack"
  assert train_adapters.cpu_kernels(symnet, avx512=False) == "xla"
  zen3 = tmp_path / "zen3"
  zen3.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
  zen4 = tmp_path / "zen4"
  zen4.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n")
  assert not train_adapters.has_avx512(str(zen3)) and train_adapters.has_avx512(str(zen4))
  assert not train_adapters.has_avx512(str(tmp_path / "absent"))
