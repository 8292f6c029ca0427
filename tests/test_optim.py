"""Optimisers and schedules against PyTorch (SGD coupled L2 + momentum, AdamW, poly, MultiStepLR)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fss_jax.train import optim

torch = pytest.importorskip("torch")
# torch.optim loads triton lazily, and triton crashes the process when it is loaded after
# TensorFlow (which clu's metric writers import in the loop tests): load it at collection.
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def _cfg(**kw):
  base = dict(
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    nesterov=False,
    weight_decay=5e-4,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    schedule="constant",
    power=0.9,
    milestones=(),
    gamma=0.1,
    warmup_steps=0,
    lr_mults=(),
    frozen=(),
    groups=ml_collections.ConfigDict(),
    grad_clip_norm=0.0,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _params(rng):
  return {
    "backbone": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)}},
    "head": {
      "kernel": rng.standard_normal((4, 2)).astype(np.float32),
      "bias": rng.standard_normal((2,)).astype(np.float32),
    },
    "transformer": {"w": rng.standard_normal((4, 4)).astype(np.float32)},
  }


def _run_optax(opt, params, grads_seq):
  state = opt.tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  for g in grads_seq:
    upd, state = opt.tx.update(g, state, p)
    p = optax.apply_updates(p, upd)
  return jax.tree.map(np.asarray, p)


def _grads(rng, params, n):
  return [
    jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), params)
    for _ in range(n)
  ]


def test_schedules_match_reference_formulas():
  T = 10
  poly = optim.make_schedule(lr=0.05, schedule="poly", total_steps=T, power=0.9)
  # PFENet poly_learning_rate: t = count + 1 set before the step.
  for count in range(T):
    assert float(poly(count)) == pytest.approx(0.05 * (1 - (count + 1) / T) ** 0.9, rel=1e-6)
  # torch MultiStepLR(milestones=[3, 6]) stepped after every optimiser step.
  ms = optim.make_schedule(lr=1e-3, schedule="multistep", milestones=(3, 6), gamma=0.1)
  p = torch.nn.Parameter(torch.zeros(1))
  o = torch.optim.SGD([p], lr=1e-3)
  sch = torch.optim.lr_scheduler.MultiStepLR(o, milestones=[3, 6], gamma=0.1)
  for count in range(9):
    assert float(ms(count)) == pytest.approx(o.param_groups[0]["lr"], rel=1e-6)
    o.step()
    sch.step()
  warm = optim.make_schedule(lr=0.01, schedule="poly", total_steps=100, warmup_steps=5)
  assert float(warm(0)) == pytest.approx(0.01 * (0.1 + 0.9 * 1 / 5), rel=1e-6)
  assert float(warm(4)) == pytest.approx(0.01 * (1 - 5 / 100) ** 0.9, rel=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(lr=1.0, schedule="poly")


def test_sgd_coupled_weight_decay_multistep_matches_torch():
  """PANet recipe: SGD(momentum .9, wd 5e-4) with MultiStepLR, against torch.optim.SGD."""
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = _grads(rng, params, 6)
  opt = optim.build(_cfg(lr=0.1, schedule="multistep", milestones=(2, 4), gamma=0.1), params)
  got = _run_optax(opt, params, grads)

  flat = jax.tree_util.tree_leaves_with_path(params)
  tp = [torch.nn.Parameter(torch.tensor(a)) for _, a in flat]
  o = torch.optim.SGD(tp, lr=0.1, momentum=0.9, weight_decay=5e-4)
  sch = torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 4], gamma=0.1)
  for g in grads:
    for t, gl in zip(tp, jax.tree_util.tree_leaves(g)):
      t.grad = torch.tensor(gl)
    o.step()
    sch.step()
  for (path, _), t in zip(flat, tp):
    leaf = got
    for k in path:
      leaf = leaf[k.key]
    np.testing.assert_allclose(leaf, t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_two_optimisers_poly_lr_mult_frozen_match_torch():
  """SCCAN recipe: SGD (10x on every group, poly) + AdamW (constant) on transformer, frozen backbone."""
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads = _grads(rng, params, 5)
  T = 8
  groups = ml_collections.ConfigDict(
    {
      "transformer": dict(
        pattern=".*transformer.*",
        optimizer="adamw",
        lr=6e-5,
        schedule="constant",
        weight_decay=0.01,
      )
    }
  )
  cfg = _cfg(lr=0.005, weight_decay=1e-4, schedule="poly", lr_mults=((".*", 10.0),), groups=groups)
  opt = optim.build(cfg, params, total_steps=T, frozen=("backbone/.*",))
  assert opt.summary == {"frozen": 1, "default*10": 2, "transformer": 1}
  assert jax.tree.leaves(opt.trainable) == [
    False,
    True,
    True,
    True,
  ]  # backbone, head x2, transformer
  got = _run_optax(opt, params, grads)
  np.testing.assert_array_equal(
    got["backbone"]["conv"]["kernel"], params["backbone"]["conv"]["kernel"]
  )

  head = [torch.nn.Parameter(torch.tensor(params["head"][k])) for k in ("kernel", "bias")]
  tr = torch.nn.Parameter(torch.tensor(params["transformer"]["w"]))
  sgd = torch.optim.SGD([{"params": head}], lr=0.005, momentum=0.9, weight_decay=1e-4)
  adamw = torch.optim.AdamW([tr], lr=6e-5)  # torch defaults: betas (.9, .999), eps 1e-8, wd 0.01
  for i, g in enumerate(grads):
    t = i + 1
    for pg in sgd.param_groups:  # poly_learning_rate(index_split=-1): every group 10x
      pg["lr"] = 0.005 * (1 - t / T) ** 0.9 * 10
    head[0].grad, head[1].grad = torch.tensor(g["head"]["kernel"]), torch.tensor(g["head"]["bias"])
    tr.grad = torch.tensor(g["transformer"]["w"])
    sgd.step()
    adamw.step()
  np.testing.assert_allclose(got["head"]["kernel"], head[0].detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["head"]["bias"], head[1].detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["transformer"]["w"], tr.detach().numpy(), rtol=1e-5, atol=1e-7)
  lrs = opt.learning_rates(0)
  assert lrs["default*10"] == pytest.approx(0.05 * (1 - 1 / T) ** 0.9, rel=1e-6)
  assert lrs["transformer"] == pytest.approx(6e-5)


def test_adamw_poly_groups_match_torch():
  """HDMNet recipe: AdamW(wd .01) with poly decay, 10x lr on the head group."""
  rng = np.random.default_rng(2)
  params = {"transformer": _params(rng)["transformer"], "head": _params(rng)["head"]}
  grads = _grads(rng, params, 4)
  T = 6
  opt = optim.build(
    _cfg(
      optimizer="adamw", lr=1e-4, weight_decay=0.01, schedule="poly", lr_mults=(("head/.*", 10.0),)
    ),
    params,
    total_steps=T,
  )
  got = _run_optax(opt, params, grads)
  tr = torch.nn.Parameter(torch.tensor(params["transformer"]["w"]))
  hd = [torch.nn.Parameter(torch.tensor(params["head"][k])) for k in ("kernel", "bias")]
  o = torch.optim.AdamW([{"params": [tr]}, {"params": hd}], lr=1e-4, weight_decay=0.01)
  for i, g in enumerate(grads):
    lr = 1e-4 * (1 - (i + 1) / T) ** 0.9
    o.param_groups[0]["lr"], o.param_groups[1]["lr"] = lr, lr * 10  # index_split=0
    tr.grad = torch.tensor(g["transformer"]["w"])
    hd[0].grad, hd[1].grad = torch.tensor(g["head"]["kernel"]), torch.tensor(g["head"]["bias"])
    o.step()
  np.testing.assert_allclose(got["transformer"]["w"], tr.detach().numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["head"]["kernel"], hd[0].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_bad_patterns_and_names_are_reported():
  params = _params(np.random.default_rng(3))
  with pytest.raises(
    ValueError, match=r"frozen pattern 'encoder/\.\*' matches no parameter.*backbone"
  ):
    optim.build(_cfg(), params, frozen=("encoder/.*",))
  with pytest.raises(ValueError, match="lr_mults pattern"):
    optim.build(_cfg(lr_mults=(("nothing", 10.0),)), params)
  with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
    optim.build(_cfg(optimizer="sgdd"), params)
  with pytest.raises(ValueError, match="unknown lr schedule"):
    optim.build(_cfg(schedule="linear"), params)


def test_poly_keeps_float32_precision_at_the_last_iterations():
  # SCCAN's schedule (lr 0.05 = 10 x 0.005, T = 200 x 526): 1 - t/T in float32 lost
  # 0.3 % of the lr at t = T - 1 (train-step fixture lr_samples); (T - t) / T does not.
  t_max = 105_200
  fn = optim.make_schedule(lr=0.05, schedule="poly", total_steps=t_max, power=0.9)
  for t in (1, 2, 100, 52_600, t_max - 1):
    want = 0.05 * (1 - t / t_max) ** 0.9
    assert abs(float(fn(t - 1)) - want) <= 1e-6 * want, t
  assert float(fn(t_max - 1)) == 0.0 and float(fn(t_max + 5)) == 0.0


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1e-3, 0.0])
def test_learning_rate_must_be_positive_and_finite(lr):
  params = {"head": {"w": jnp.ones((2,))}, "body": {"w": jnp.ones((2,))}}
  with pytest.raises(ValueError, match=r"config.optim.lr must be a positive finite number"):
    optim.build({"optimizer": "sgd", "lr": lr}, params, total_steps=10)
  groups = {"head": {"pattern": "head/.*", "optimizer": "adamw", "lr": lr}}
  with pytest.raises(ValueError, match=r"config.optim.groups.head.lr must be a positive finite"):
    optim.build({"optimizer": "sgd", "lr": 0.1, "groups": groups}, params, total_steps=10)
