"""Engine mechanics on a tiny test-only model: sharding, resume, eval tracing, NaN stop, strict loading.

`TinySeg` (2 convs + BatchNorm + dropout + a masked-average prototype) is registered
only in these tests (``registry._MODULES["tiny_test"]``); `FakeLoader` feeds
synthetic Episode dicts with ``get_state`` / ``set_state`` like the grain loaders.
tests/test_multiprocess.py imports both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from fss_jax import parallel
from fss_jax.eval import run as eval_run
from fss_jax.models import registry
from fss_jax.ops import losses
from fss_jax.train import checkpointing, loop, optim
from fss_jax.train import data as data_lib
from fss_jax.train import state as state_lib
from fss_jax.train import step as step_lib

SIZE = 16
BUCKET = 24
CLASSES = (1, 2, 3, 4, 5)


# -- the tiny model --------------------------------------------------------------------------


class TinySeg(nn.Module):
  """conv -> BN -> ReLU (shared by query and support), prototype, 1x1 head over [f, f * proto]."""

  features: int = 4
  dropout: float = 0.1

  @nn.compact
  def __call__(self, episode, *, train: bool):
    q = episode["query_image"]  # [B, H, W, 3]
    s = episode["support_images"][:, 0]  # [B, H, W, 3]
    m = (episode["support_masks"][:, 0] == 1).astype(jnp.float32)[..., None]
    conv = nn.Conv(self.features, (3, 3), name="enc")
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")
    b = q.shape[0]
    f = nn.relu(bn(conv(jnp.concatenate([q, s], axis=0))))
    fq, fs = f[:b], f[b:]
    proto = jnp.sum(fs * m, axis=(1, 2)) / (jnp.sum(m, axis=(1, 2)) + 1e-5)  # [B, C]
    x = jnp.concatenate([fq, fq * proto[:, None, None, :]], axis=-1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return {"logits": nn.Conv(2, (1, 1), name="head")(x)}


def tiny_loss(outputs, episode):
  ce = losses.cross_entropy(outputs["logits"], episode["query_mask"])
  dice = losses.weighted_dice_loss(outputs["logits"], episode["query_mask"])
  return losses.weighted_sum({"ce": ce, "dice": dice}, {"ce": 1.0, "dice": 0.5})


SPEC = registry.ModelSpec(
  name="tiny_test", make_model=TinySeg, keymap=lambda **kw: [], loss_fn=tiny_loss
)


@pytest.fixture(autouse=True)
def _register(monkeypatch):
  monkeypatch.setitem(registry._MODULES, "tiny_test", __name__)


# -- fake data ----------------------------------------------------------------------------------


def fake_batch(
  rng: np.random.Generator, n: int, *, size: int = SIZE, eval_mode: bool = False
) -> dict:
  """n synthetic 1-shot episodes: a bright square (fg) on noise, in query and support."""

  def image_and_mask():
    img = rng.standard_normal((n, size, size, 3)).astype(np.float32) * 0.5
    mask = np.zeros((n, size, size), np.int32)
    for i in range(n):
      h, w = rng.integers(3, size // 2, 2)
      y, x = rng.integers(0, size - h), rng.integers(0, size - w)
      mask[i, y : y + h, x : x + w] = 1
      img[i, y : y + h, x : x + w] += 1.5
    mask[rng.random(mask.shape) < 0.02] = 255
    return img, mask

  q, qm = image_and_mask()
  s, sm = image_and_mask()
  batch = {
    "query_image": q,
    "query_mask": qm,
    "support_images": s[:, None],
    "support_masks": sm[:, None],
    "class_id": rng.choice(CLASSES, n).astype(np.int32),
  }
  if eval_mode:
    lab = np.full((n, BUCKET, BUCKET), 255, np.int32)
    sizes = np.zeros((n, 2), np.int32)
    for i in range(n):
      h, w = rng.integers(5, BUCKET + 1, 2)
      sizes[i] = h, w
      small = qm[i, (np.arange(h) * size) // h][:, (np.arange(w) * size) // w]
      lab[i, :h, :w] = small
    batch.update(label_original=lab, label_size=sizes, valid=np.ones(n, np.int32))
  return batch


class FakeIter:
  """Deterministic stream: batch t is a function of (seed, t); this process's slice."""

  def __init__(self, *, seed, global_bs, shard_index, shard_count, nan_at=None, interrupt_at=None):
    self.seed, self.global_bs = seed, global_bs
    self.p, self.n = shard_index, shard_count
    self.nan_at, self.interrupt_at = nan_at, interrupt_at
    self.pos = 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.interrupt_at is not None and self.pos == self.interrupt_at:
      raise KeyboardInterrupt("simulated preemption")
    full = fake_batch(np.random.default_rng([self.seed, self.pos]), self.global_bs)
    if self.nan_at is not None and self.pos == self.nan_at:
      full["query_image"][:] = np.nan
    self.pos += 1
    b = self.global_bs // self.n
    return {k: v[self.p * b : (self.p + 1) * b] for k, v in full.items()}

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = int(state["pos"])


class FakeLoader:
  def __init__(self, **kw):
    self.kw = kw
    self.steps_per_epoch = 3

  def __iter__(self):
    return FakeIter(**self.kw)


def fake_data(config, **kw) -> data_lib.Data:
  p, n = jax.process_index(), jax.process_count()
  eval_bs = config.eval.batch_size if config.eval.batch_size > 0 else jax.device_count()

  def evaluate(seed, num):
    rng = np.random.default_rng([seed, 12345])
    steps = math.ceil(num / eval_bs)
    out = []
    for t in range(steps):
      full = fake_batch(rng, eval_bs, eval_mode=True)
      full["valid"] = (t * eval_bs + np.arange(eval_bs) < num).astype(np.int32)
      b = eval_bs // n
      out.append({k: v[p * b : (p + 1) * b] for k, v in full.items()})
    return out

  return data_lib.Data(
    train=lambda: FakeLoader(
      seed=config.seed, global_bs=config.batch_size, shard_index=p, shard_count=n, **kw
    ),
    eval=evaluate,
    classes=CLASSES,
  )


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  arg = common.parse_arg("", dataset="pascal5i", fold=0, shot=1, smoke=False)
  c = common.base_config(arg, model="tiny_test")
  c.model_fields = ml_collections.ConfigDict(dict(features=4, dropout=0.1))
  c.batch_size = 8
  c.total_steps = 6
  c.log_every_steps = 1
  c.optim.lr = 0.05
  c.optim.schedule = "poly"
  c.optim.groups = ml_collections.ConfigDict(
    {
      "head": dict(
        pattern="head/.*", optimizer="adamw", lr=1e-3, schedule="constant", weight_decay=0.01
      )
    }
  )
  c.eval.every_steps = 3
  c.eval.val_episodes = 10
  c.eval.episodes = 10
  c.eval.seeds = (1, 2)
  c.eval.batch_size = 4
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = True
  c.tensorboard = False
  c.mesh.num_devices = 1  # the sharded paths are covered above and in test_multiprocess.py
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  c.lock()
  return c


# -- sharding -------------------------------------------------------------------------------------


def _setup(mesh, batch, lr=1.0):
  model = TinySeg(features=4, dropout=0.1)
  cfg = ml_collections.ConfigDict(
    dict(optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant")
  )
  params = jax.eval_shape(
    lambda k: state_lib.init_variables(model, batch, k)["params"], jax.random.PRNGKey(0)
  )
  opt = optim.build(cfg, params)
  st = state_lib.create(
    model,
    opt.tx,
    batch,
    rng=jax.random.PRNGKey(0),
    sharding=None if mesh is None else parallel.replicated(mesh),
  )
  return model, opt, st


def test_one_step_8_devices_equals_1_device():
  assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
  batch = fake_batch(np.random.default_rng(0), 8)
  model, opt, host_state = _setup(None, batch)
  host_state = jax.tree.map(np.asarray, host_state)
  results = {}
  for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
    mesh = parallel.make_mesh(None, devices=devices)
    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    st = jax.device_put(host_state, repl)
    grads_fn = jax.jit(
      functools.partial(step_lib.loss_and_grads, model=model, loss_fn=tiny_loss),
      in_shardings=(repl, repl, data, repl),
      out_shardings=repl,
    )
    gbatch = parallel.to_global(batch, mesh)
    assert gbatch["query_image"].sharding.spec == jax.sharding.PartitionSpec("data")
    (loss, (_, new_bs)), grads = grads_fn(st.params, st.batch_stats, gbatch, jax.random.PRNGKey(3))
    train_step = step_lib.make_train_step(model=model, loss_fn=tiny_loss, tx=opt.tx, mesh=mesh)
    new_state, metrics = train_step(st, gbatch)
    results[name] = jax.tree.map(
      np.asarray, (loss, grads, new_bs, metrics, new_state.params, new_state.batch_stats)
    )
  (l8, g8, bs8, m8, p8, s8), (l1, g1, bs1, m1, p1, s1) = results["8"], results["1"]
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g8, g1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), bs8, bs1)
  for k in ("loss", "ce", "dice", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p8, p1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), s8, s1)
  assert float(np.abs(np.asarray(jax.tree.leaves(g8)[0])).sum()) > 0


def test_frozen_params_do_not_move():
  batch = fake_batch(np.random.default_rng(1), 8)
  mesh = parallel.make_mesh(dict(num_devices=1))
  model = TinySeg()
  params = jax.eval_shape(
    lambda k: state_lib.init_variables(model, batch, k)["params"], jax.random.PRNGKey(0)
  )
  opt = optim.build(
    ml_collections.ConfigDict(dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)),
    params,
    frozen=("enc/.*",),
  )
  st = state_lib.create(
    model, opt.tx, batch, rng=jax.random.PRNGKey(0), sharding=parallel.replicated(mesh)
  )
  before = jax.tree.map(np.asarray, st.params)
  train_step = step_lib.make_train_step(
    model=model, loss_fn=tiny_loss, tx=opt.tx, mesh=mesh, trainable=opt.trainable
  )
  st, _ = train_step(st, parallel.to_global(batch, mesh))
  after = jax.tree.map(np.asarray, st.params)
  np.testing.assert_array_equal(after["enc"]["kernel"], before["enc"]["kernel"])
  assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])


# -- evaluation -------------------------------------------------------------------------------------


def test_eval_step_traces_once_over_original_sizes():
  mesh = parallel.make_mesh(dict(num_devices=4))
  rng = np.random.default_rng(2)
  batch = fake_batch(rng, 8, eval_mode=True)
  model, opt, st = _setup(mesh, {k: v for k, v in batch.items() if k != "valid"})

  def fn(state, b):
    return step_lib.eval_step(state, b, model=model, score="pad_square")

  eval_fn = step_lib.jit_eval_step(chex.assert_max_traces(fn, n=1), mesh)
  seen = set()
  for _ in range(3):
    b = fake_batch(rng, 8, eval_mode=True)
    seen |= {tuple(s) for s in b["label_size"]}
    out = parallel.to_host(eval_fn(st, parallel.to_global(b, mesh)))
    assert out["intersection"].shape == (8, 2)
    valid_px = [(b["label_original"][i] != 255).sum() for i in range(8)]
    np.testing.assert_array_equal(out["target"].sum(1), valid_px)
  assert len(seen) > 10  # many different original sizes, one trace


# -- the loop ---------------------------------------------------------------------------------------


def _final_params(workdir):
  import orbax.checkpoint as ocp

  mngr = checkpointing.checkpoint_manager(
    pathlib.Path(workdir) / checkpointing.CHECKPOINT_DIR, keep=1, async_save=False, read_only=True
  )
  step = mngr.latest_step()
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return step, jax.tree.map(np.asarray, out["params"])


def test_interrupt_and_resume_reproduces_uninterrupted_run(tmp_path):
  cfg = tiny_config()
  full = loop.train_and_evaluate(cfg, tmp_path / "a", data=fake_data(cfg))
  assert full["step"] == 6 and full["resumed_from"] == "scratch"
  assert full["val"] is not None and full["val"]["episodes"] == 10

  with pytest.raises(
    KeyboardInterrupt
  ):  # preempted while fetching batch 3 (after the step-2 checkpoint)
    loop.train_and_evaluate(cfg, tmp_path / "b", data=fake_data(cfg, interrupt_at=3))
  resumed = loop.train_and_evaluate(cfg, tmp_path / "b", data=fake_data(cfg))
  assert resumed["resumed_from"] == "workdir"
  for k in ("loss", "ce", "dice", "grad_norm"):
    assert resumed["train"][k] == pytest.approx(full["train"][k], rel=1e-6, abs=1e-7), k
  assert resumed["val"]["miou"] == pytest.approx(full["val"]["miou"], abs=1e-6)
  assert resumed["best_miou"] == pytest.approx(full["best_miou"], abs=1e-6)
  (sa, pa), (sb, pb) = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
  assert sa == sb == 6
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), pa, pb)

  # A finished run resumes to the end immediately; --mode eval scores the best checkpoint.
  again = loop.train_and_evaluate(cfg, tmp_path / "a", data=fake_data(cfg))
  assert again["step"] == 6 and again["resumed_from"] == "workdir"
  summary = eval_run.evaluate(cfg, tmp_path / "a", data=fake_data(cfg))
  assert summary["num_seeds"] == 2 and set(summary["seeds"]) == {"1", "2"}
  assert "best" in summary["checkpoint"]
  results = eval_run.results_path(cfg, tmp_path / "a")
  assert results.is_file()
  from fss_jax.eval import visualize

  chart = visualize.chart_path(results)  # per-class IoU bar chart
  assert chart.is_file() and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_loss_stops_keeps_last_good_checkpoint_and_other_models_are_refused(tmp_path):
  cfg = tiny_config(**{"eval.every_steps": 0})
  # The loss of step 5 comes from the state after update 4: checkpoint 4 may hold the weights
  # that give it, so it is removed and checkpoint 2 is the one kept (and resumed from).
  with pytest.raises(
    loop.NonFiniteLossError,
    match=r"(?s)loss is nan at step 5.*last good checkpoint \(step 2\).*checkpoint 4 "
    r"removed.*rerun resumes from it",
  ):
    loop.train_and_evaluate(cfg, tmp_path, data=fake_data(cfg, nan_at=4))
  step, params = _final_params(tmp_path)
  assert step == 2
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))

  # The workdir now holds a tiny_test(features=4) 1-shot checkpoint: other runs are refused.
  other = tiny_config(**{"eval.every_steps": 0, "model_fields.features": 8})
  with pytest.raises(
    checkpointing.WorkdirMismatchError, match=r"model_fields.features: checkpoint 4, this run 8"
  ):
    loop.train_and_evaluate(other, tmp_path, data=fake_data(other))
  five = tiny_config(shot=5, **{"eval.every_steps": 0})
  with pytest.raises(checkpointing.WorkdirMismatchError, match=r"shot: checkpoint 1, this run 5"):
    loop.train_and_evaluate(five, tmp_path, data=fake_data(five))
  assert _final_params(tmp_path)[0] == 2  # nothing was overwritten


def test_update_that_makes_parameters_non_finite_is_never_saved(tmp_path):
  """A finite loss is computed before its update: the state after a ruinous update (lr far too
  large) must not become "the last good checkpoint" (issue: 26/26 tensors non-finite)."""
  cfg = tiny_config(
    **{
      "eval.every_steps": 0,
      "checkpoint.every_steps": 1,
      "optim.lr": 1e38,
      "optim.groups.head.lr": 1e38,
      "optim.groups.head.optimizer": "sgd",
    }
  )
  with pytest.raises(
    loop.NonFiniteLossError,
    match=r"training stopped: (update \d+ made parameters "
    r"non-finite|the loss is)",
  ):
    loop.train_and_evaluate(cfg, tmp_path, data=fake_data(cfg))
  # every state after update 1 is ruined (non-finite, or finite weights that give a NaN loss
  # at the next step): none of them may be left as a checkpoint to resume from
  ckpts = tmp_path / "checkpoints"
  assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def test_pending_flush_names_a_non_finite_update():
  pending = loop._Pending()
  pending.add(3, {"loss": np.float32(0.5), "params_finite": np.float32(1.0)})
  pending.add(4, {"loss": np.float32(0.4), "params_finite": np.float32(0.0)})
  with pytest.raises(loop.NonFiniteLossError, match=r"update 4 made parameters non-finite") as e:
    pending.flush()
  assert (e.value.step, e.value.first_ruined) == (4, 4)
  pending.add(5, {"loss": np.float32(np.nan), "params_finite": np.float32(1.0)})
  with pytest.raises(loop.NonFiniteLossError, match=r"the loss is nan at step 5") as e:
    pending.flush()
  assert (e.value.step, e.value.first_ruined) == (5, 4)


def test_init_from_converted_weights_is_strict(tmp_path):
  import orbax.checkpoint as ocp

  batch = fake_batch(np.random.default_rng(4), 8)
  mesh = parallel.make_mesh(dict(num_devices=1))
  model, opt, st = _setup(mesh, batch)
  host = jax.tree.map(np.asarray, {"params": st.params, "batch_stats": st.batch_stats})
  weights = jax.tree.map(lambda a: a + 1.0, host)
  ocp.PyTreeCheckpointer().save(tmp_path / "conv" / "variables", weights)
  loaded = state_lib.load_init(st, tmp_path / "conv", opt.tx, sharding=parallel.replicated(mesh))
  jax.tree.map(
    np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), weights["params"]
  )

  bad = {
    "params": {"enc": weights["params"]["enc"], "extra": {"kernel": np.zeros((1, 1), np.float32)}},
    "batch_stats": weights["batch_stats"],
  }
  ocp.PyTreeCheckpointer().save(tmp_path / "bad" / "variables", bad)
  with pytest.raises(state_lib.InitMismatchError) as e:
    state_lib.load_init(st, tmp_path / "bad", opt.tx)
  msg = str(e.value)
  assert "missing in the checkpoint" in msg and "params/head/kernel" in msg
  assert "unexpected in the checkpoint" in msg and "params/extra/kernel" in msg
  # A backbone-only conversion goes under a prefix.
  enc_only = {
    "params": {
      "kernel": weights["params"]["enc"]["kernel"],
      "bias": weights["params"]["enc"]["bias"],
    }
  }
  merged = state_lib.merge_variables(host, enc_only, prefix="enc")
  np.testing.assert_array_equal(
    merged["params"]["enc"]["kernel"], weights["params"]["enc"]["kernel"]
  )
  np.testing.assert_array_equal(
    merged["params"]["head"]["kernel"], host["params"]["head"]["kernel"]
  )
  with pytest.raises(FileNotFoundError, match="checkpoints.convert"):
    state_lib.read_variables(tmp_path / "nowhere")


def test_missing_required_init_says_how_to_get_it(tmp_path):
  """Models with a frozen base learner (HDMNet, Sym-Net) refuse to start from random weights."""
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.init_required = True
    cfg.init_help = "Train one with python -m fss_jax.main --config configs/pspnet.py:fold=0"
  with pytest.raises(
    FileNotFoundError, match=r"(?s)config.init is empty.*configs/pspnet.py:fold=0"
  ):
    loop.train_and_evaluate(cfg, tmp_path / "w", data=fake_data(cfg))
  with cfg.unlocked():
    cfg.init = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"does not exist"):
    loop.train_and_evaluate(cfg, tmp_path / "w2", data=fake_data(cfg))
  assert not (tmp_path / "w" / "checkpoints").exists() or not any(
    (tmp_path / "w" / "checkpoints").iterdir()
  )


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  cfg = tiny_config(**{"eval.every_steps": 0, "checkpoint.async_save": False})
  loop.train_and_evaluate(cfg, tmp_path, data=fake_data(cfg))  # checkpoints 4 and 6
  files = [
    p
    for p in (tmp_path / "checkpoints" / "6" / "state").rglob("*")
    if p.is_file() and p.stat().st_size > 64
  ]
  assert files
  for p in files:  # truncated data files
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  more = tiny_config(**{"eval.every_steps": 0, "total_steps": 8})
  summary = loop.train_and_evaluate(more, tmp_path, data=fake_data(more))
  assert summary["resumed_from"] == "workdir" and summary["step"] == 8
  assert [h["step"] for h in summary["history"]] == [5, 6, 7, 8]  # resumed from step 4
  for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):  # break every one
    if p.is_file() and p.stat().st_size > 64:
      p.write_bytes(b"")
  for p in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
    if p.is_file() and p.stat().st_size > 64:
      p.write_bytes(b"")
  with pytest.raises(
    checkpointing.CheckpointDamagedError, match=r"no checkpoint in .* can be read"
  ):
    loop.train_and_evaluate(more, tmp_path, data=fake_data(more))


def test_validation_data_is_checked_before_the_first_step(tmp_path):
  """A shot the test split cannot supply stops the run before any step is spent."""
  cfg = tiny_config()
  data = fake_data(cfg)
  calls = []

  def evaluate(seed, num):
    calls.append(seed)
    raise ValueError("shot K=5 exceeds the support images of class 3: class 3 has 2")

  with pytest.raises(
    ValueError,
    match=r"validation episodes \(test split, seed 321, K=1\) cannot "
    r"be made, nothing was trained: shot K=5 exceeds",
  ):
    loop.train_and_evaluate(cfg, tmp_path / "w", data=dataclasses.replace(data, eval=evaluate))
  assert calls == [321]
  ckpts = tmp_path / "w" / "checkpoints"
  assert not ckpts.exists() or not any(ckpts.iterdir())


def test_resume_ignores_compute_only_fields():
  saved = {"model": "hdmnet", "model_fields": {"shot": 1}}
  assert (
    checkpointing._meta_differences(
      saved, {"model": "hdmnet", "model_fields": {"shot": 1, "remat": True}}
    )
    == []
  )
  diffs = checkpointing._meta_differences(saved, {"model": "hdmnet", "model_fields": {"shot": 5}})
  assert diffs == ["model_fields.shot: checkpoint 1, this run 5"]
