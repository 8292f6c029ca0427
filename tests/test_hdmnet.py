"""HDMNet: parity with the official fixture (outputs and intermediates), the transformer's
attention rules, the distillation loss and the BAM ensemble against direct numpy / torch,
the official key names, and a 5-shot, batch-2 training forward at another size."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import extra_fixture_paths, load_fixture
from flax import traverse_util

from checkpoints import fixtures, parity
from checkpoints.verify import verify_fixture
from fss_jax import keymaps
from fss_jax.models import hdmnet
from fss_jax.nn import ensemble
from fss_jax.nn.attention import hdm
from fss_jax.ops.softmax import softmax_dot_backward


@pytest.fixture(scope="module")
def fixture():
  arrays, meta, path = load_fixture("hdmnet")
  return arrays, meta, path, fixtures.regenerate(meta)


# ---------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------


def test_verify_hdmnet_fixture(fixture):
  arrays, meta, path, _ = fixture
  assert parity.for_fixture(meta).model == "hdmnet"
  report = verify_fixture(path)
  print("\n".join(report["lines"]))
  out = report["outputs"]
  assert set(out) == {"out_final", "out_meta", "out_base"}
  for name in ("out_meta", "out_base"):  # kept tight (parity README)
    assert out[name]["scale"] > 10.0
    assert out[name]["max_abs"] <= 1e-4 * out[name]["scale"], (name, out[name])
  assert out["out_final"]["max_abs"] <= 1e-3, out["out_final"]
  for name, e in out.items():
    assert e["argmax_agree"] >= 0.999, (name, e)
  assert report["passed"]
  # Every recorded intermediate is reproduced (1e-3 relative: deep backbone maps).
  mids = report["intermediates"]
  assert set(mids) == {k for k in arrays if k.startswith("mid_")}
  for name, e in mids.items():
    assert e["max_abs"] <= 1e-3 * max(1.0, e["scale"]), (name, e)
  # est_val (channel 1 of the gram_merge input): ~1e-2 relative.
  est_ref = float(arrays["mid_gram_merge_in_bg"][0, 1, 0, 0])
  assert est_ref > 0
  assert mids["mid_gram_merge_in_bg"]["max_abs"] <= 1e-2 * est_ref


@pytest.mark.parametrize(
  "path", extra_fixture_paths("hdmnet", exclude=("hdmnet_1shot_241_b1",)), ids=lambda p: p.stem
)
def test_parity_other_fixtures(path):
  """Unseen fixtures (other shots / sizes / batches / seeds) made with the official code."""
  report = verify_fixture(path)
  assert report["passed"], "\n".join(report["lines"])
  assert set(report["outputs"]) == {"out_final", "out_meta", "out_base"}


# ---------------------------------------------------------------------------
# Blocks against direct numpy / torch
# ---------------------------------------------------------------------------


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def test_attention_rules_match_numpy():
  rng = np.random.default_rng(0)
  b, lq, lk, h, d = 2, 7, 11, 2, 4
  q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
  mask = (rng.random((b, lk)) > 0.4).astype(np.float32)
  mask[1] = 0.0  # an empty support mask gives zero output and a zero map
  with jax.default_matmul_precision("highest"):
    y_self = np.asarray(hdm.self_attention(*map(jnp.asarray, (q, k, v))))
    y_cross, corr = map(np.asarray, hdm.cross_attention(*map(jnp.asarray, (q, k, v, mask))))
  qh, kh, vh = (np.transpose(t, (0, 2, 1, 3)).astype(np.float64) for t in (q, k, v))
  s = qh @ np.swapaxes(kh, -1, -2) / (np.sqrt(d) + 1e-9)
  ref_self = np.transpose(_softmax(s, -1) @ vh, (0, 2, 1, 3))
  np.testing.assert_allclose(y_self, ref_self, atol=1e-5)
  qn = qh / np.maximum(np.linalg.norm(qh, axis=-1, keepdims=True), 1e-12)
  kn = kh / np.maximum(np.linalg.norm(kh, axis=-1, keepdims=True), 1e-12)
  s = qn @ np.swapaxes(kn, -1, -2) / 0.1
  m = mask[:, None, None, :]
  a = _softmax(s, -2) * m  # softmax over QUERIES, then mask
  ref_cross = np.transpose(a @ vh, (0, 2, 1, 3))
  ref_corr = ((s * m).sum(-1) / (m.sum(-1) + 1e-9)).mean(1)
  np.testing.assert_allclose(y_cross, ref_cross, atol=1e-5)
  np.testing.assert_allclose(corr, ref_corr, atol=1e-5)
  assert np.all(y_cross[1] == 0) and np.all(corr[1] == 0)


def test_encoder_layer_structure():
  """Cross mode reuses norm1 for the source; sr > 1 adds the reduction conv + LN (shapes only:
  the numbers are checked by the fixture)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 9, 8)).astype(np.float32))
  src = jnp.asarray(rng.standard_normal((1, 18, 8)).astype(np.float32))
  kw = {"source": src, "attn_kwargs": {"key_mask": jnp.ones((1, 18))}}
  layer = hdm.EncoderLayer(dim=8, heads=2, sr=1, mlp_ratio=2)
  v = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, (3, 3), **kw))
  names = set(traverse_util.flatten_dict(v["params"], sep="/"))
  assert {"norm1/scale", "norm2/scale", "attn/attn/linear_q/kernel", "ffn/pe_conv/kernel"} <= names
  assert not any(n.startswith("attn/sr") or n.startswith("attn/norm") for n in names)
  assert v["params"]["ffn"]["pe_conv"]["kernel"].shape == (3, 3, 1, 16)  # depthwise
  y, corr = jax.eval_shape(lambda p: layer.apply(p, x, (3, 3), **kw), v)
  assert y.shape == (1, 9, 8) and corr.shape == (1, 9)
  sr = hdm.EncoderLayer(dim=8, heads=2, sr=3, mlp_ratio=2)
  v2 = jax.eval_shape(lambda: sr.init(jax.random.PRNGKey(0), x, (3, 3)))
  assert v2["params"]["attn"]["sr"]["kernel"].shape == (3, 3, 8, 8)
  assert v2["params"]["attn"]["norm"]["scale"].shape == (8,)


def test_distillation_loss_matches_the_reference_formula():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(2)
  y = (rng.random((2, 33, 33)) > 0.6).astype(np.int32)
  y[0, :3] = 255
  maps = [rng.standard_normal((2, n, n)).astype(np.float32) * 3 for n in (5, 9, 17)]
  got = float(
    jax.jit(hdm.correlation_distillation_loss)([jnp.asarray(m) for m in maps], jnp.asarray(y))
  )

  def distil(t, s):  # HDMNet.disstil_loss
    if t.shape[-2:] != s.shape[-2:]:
      t = F.interpolate(t.unsqueeze(1), size=s.shape[-2:], mode="bilinear").squeeze(1)
    t, s = t.flatten(1), s.flatten(1)
    s, t = torch.softmax(s, 1), torch.softmax(t, 1)
    return (t * torch.log(t + 1e-12) - t * torch.log(s + 1e-12)).sum(1).mean()

  t = torch.tensor(y == 1).float()
  t = torch.masked_fill(t, t == 0, -1e9)
  total = 0.0
  for m in maps:
    w = torch.tensor(m)
    total = total + distil(t, w)
    t = w
  assert got == pytest.approx(float(total) / 3, rel=1e-5, abs=1e-6)


def test_scene_difference_and_base_map_match_numpy():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 5, 5, 6)).astype(np.float32)
  s = rng.standard_normal((2, 3, 5, 5, 6)).astype(np.float32)
  s[0, 1] = np.maximum(s[0, 1], 0) * (rng.random((5, 5, 1)) > 0.5)  # masked-image-like

  def gram(f):
    f = f.reshape(-1, f.shape[-1]).T.astype(np.float64)  # C x N
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T / (n @ n.T + 1e-7)

  with jax.default_matmul_precision("highest"):
    e = np.asarray(ensemble.scene_difference(jnp.asarray(q), jnp.asarray(s)))
  ref = np.array(
    [[np.linalg.norm(gram(q[b]) - gram(s[b, k])) / 6 for k in range(3)] for b in range(2)]
  )
  np.testing.assert_allclose(e, ref, rtol=1e-5)

  p = jax.nn.softmax(jnp.asarray(rng.standard_normal((2, 4, 4, 5)).astype(np.float32)), -1)
  full = np.asarray(ensemble.base_foreground(p))
  excl = np.asarray(ensemble.base_foreground(p, jnp.array([2, 4])))
  pn = np.asarray(p)
  np.testing.assert_allclose(full[..., 0], pn[..., 1:].sum(-1), rtol=1e-6)
  np.testing.assert_allclose(excl[0, ..., 0], pn[0][..., [1, 3, 4]].sum(-1), rtol=1e-6)
  np.testing.assert_allclose(excl[1, ..., 0], pn[1][..., [1, 2, 3]].sum(-1), rtol=1e-6)


@pytest.mark.parametrize("unsort", [False, True])
def test_kshot_reweighting_permutation(unsort):
  """HDMNet keeps the weights in sorted order (its un-sort index composes to the identity);
  BAM / Sym-Net scatter them back to the shot order."""
  rng = np.random.default_rng(4)
  e = jnp.asarray(rng.random((3, 5)).astype(np.float32))
  module = ensemble.KShotReweight(shot=5, hidden=2, unsort=unsort)
  v = module.init(jax.random.PRNGKey(0), e)
  w = np.asarray(module.apply(v, e))
  p = v["params"]
  w0, b0 = np.asarray(p["conv_0"]["kernel"])[0, 0], np.asarray(p["conv_0"]["bias"])
  w1, b1 = np.asarray(p["conv_1"]["kernel"])[0, 0], np.asarray(p["conv_1"]["bias"])
  en = np.asarray(e, np.float64)
  order = np.argsort(en, axis=1)
  logits = np.maximum(np.take_along_axis(en, order, 1) @ w0 + b0, 0) @ w1 + b1
  if unsort:
    logits = np.take_along_axis(logits, np.argsort(order, axis=1), 1)
  np.testing.assert_allclose(w, _softmax(logits, 1), rtol=1e-5)


def test_episode_base_channel():
  ep = {
    "query_mask": jnp.array([[[0, 1], [1, 255]], [[1, 0], [0, 0]]]),
    "query_base_label": jnp.array([[[3, 7], [7, 255]], [[2, 5], [0, 0]]]),
  }
  np.testing.assert_array_equal(hdmnet.episode_base_channel(ep), [7, 2])
  np.testing.assert_array_equal(
    hdmnet.episode_base_channel({**ep, "class_index": jnp.array([4, 0])}), [5, 1]
  )
  assert hdmnet.episode_base_channel({"query_mask": ep["query_mask"]}) is None


# ---------------------------------------------------------------------------
# Key maps and a 5-shot, batch-2 training forward at another size
# ---------------------------------------------------------------------------


def _five_shot_state(state: dict) -> dict:
  rng = np.random.default_rng(5)
  sd = dict(state)
  sd["kshot_rw.0.weight"] = rng.uniform(-0.4, 0.4, (2, 5, 1, 1)).astype(np.float32)
  sd["kshot_rw.0.bias"] = rng.uniform(-0.4, 0.4, (2,)).astype(np.float32)
  sd["kshot_rw.2.weight"] = rng.uniform(-0.7, 0.7, (5, 2, 1, 1)).astype(np.float32)
  sd["kshot_rw.2.bias"] = rng.uniform(-0.7, 0.7, (5,)).astype(np.float32)
  return sd


def _episode(b: int, k: int, size: int) -> dict:
  rng = np.random.default_rng(6)
  yy, xx = np.mgrid[:size, :size]

  def blob(n):
    out = np.zeros((n, size, size), np.int32)
    for i in range(n):
      cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 4]
      out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
      out[i][:2] = 255
    return out

  q_mask = blob(b)
  return {
    "query_image": rng.standard_normal((b, size, size, 3)).astype(np.float32),
    "support_images": rng.standard_normal((b, k, size, size, 3)).astype(np.float32),
    "support_masks": blob(b * k).reshape(b, k, size, size),
    "query_mask": q_mask,
    "query_base_label": np.where(q_mask == 1, 3, 0).astype(np.int32),
    "class_index": np.array([2, 2], np.int32),
  }


def test_keymap_five_shot_and_training_forward(fixture):
  _, meta, _, state = fixture
  sd = _five_shot_state(state)
  rules = hdmnet.keymap(shot=5)
  assert {r.src for r in rules} == set(sd)  # every official key has exactly one rule
  variables = keymaps.convert(
    keymaps.strip_prefixes({f"module.{k}": v for k, v in sd.items()}), rules, model="hdmnet"
  )
  assert len(sd) == 625 + 4  # hdmnet.md §10.3: 625 entries, + kshot_rw (4 tensors here)
  model = hdmnet.make_model(shot=5, num_base_classes=16)
  ep = {k: jnp.asarray(v) for k, v in _episode(2, 5, 65).items()}
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ep))
  shapes = lambda t: {k: v.shape for k, v in traverse_util.flatten_dict(t).items()}
  assert {c: shapes(variables[c]) for c in ("params", "batch_stats")} == {
    c: shapes(abstract[c]) for c in ("params", "batch_stats")
  }
  # As the engine: gradients w.r.t. the trainable parameters only (frozen = SPEC.frozen).
  # (The rbg PRNG only keeps the compile of the ~50 dropout sites short on CPU.)
  flat_params = traverse_util.flatten_dict(variables["params"], sep="/")
  is_frozen = lambda p: any(re.fullmatch(r, p) for r in hdmnet.SPEC.frozen)
  trainable_p = {p: v for p, v in flat_params.items() if not is_frozen(p)}
  frozen_p = {p: v for p, v in flat_params.items() if is_frozen(p)}
  assert sum(v.size for v in trainable_p.values()) == 4_161_734  # hdmnet.md §10.3 (PASCAL)
  assert any(p.startswith("ensemble/kshot_rw/") for p in frozen_p)

  def loss(tp, fp, episode):
    params = traverse_util.unflatten_dict({**fp, **tp}, sep="/")
    out = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      episode,
      train=True,
      rngs={"dropout": jax.random.key(1, impl="rbg")},
    )
    total, metrics = hdmnet.loss_fn(out, episode)
    return total, (out, metrics)

  with jax.default_matmul_precision("highest"):
    (total, (out, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      trainable_p, frozen_p, ep
    )
  assert out["logits"].shape == (2, 65, 65, 2)
  assert out["meta_logits"].shape == (2, 65, 65, 2)
  assert out["base_logits"].shape == (2, 65, 65, 16)
  assert [c.shape for c in out["corr"]] == [(2, 3, 3), (2, 5, 5), (2, 9, 9)]
  assert out["est_val"].shape == (2,)
  assert set(metrics) == {
    "ce_final",
    "ce_meta",
    "distil",
    "ce_base",
    "loss",
    "distil_stage0",
    "distil_stage1",
    "distil_stage2",
  }
  assert float(metrics["distil"]) == pytest.approx(
    sum(float(metrics[f"distil_stage{i}"]) for i in range(3)) / 3, rel=1e-6
  )
  assert np.isfinite(float(total))
  assert float(total) == pytest.approx(
    sum(float(metrics[k]) for k in ("ce_final", "ce_meta", "distil", "ce_base")), rel=1e-5
  )
  assert set(grads) == set(trainable_p)
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  for p in (
    "transformer/match_0/attn/attn/linear_q/kernel",
    "down_supp/conv/kernel",
    "transformer/down_0/layer_0/attn/sr/kernel",
    "query_merge/kernel",
    "ensemble/gram_merge/kernel",
  ):
    assert np.any(grads[p]), p


def test_config_and_optimizer_groups(fixture):
  from configs import hdmnet as hdmnet_config
  from fss_jax.train import optim as optim_lib

  _, _, _, state = fixture
  c = hdmnet_config.get_config("dataset=pascal,fold=0,shot=1")
  assert (c.data.train_size, c.data.train_resize, c.data.test_resize) == (473, "squash", "squash")
  assert (c.batch_size, c.epochs, c.eval.episodes, len(c.eval.seeds)) == (16, 200, 1000, 10)
  coco = hdmnet_config.get_config("dataset=coco,fold=1,shot=5")
  assert (coco.data.train_size, coco.batch_size, coco.epochs, coco.eval.episodes) == (
    633,
    24,
    50,
    10000,
  )
  assert coco.model_fields.shot == 5 and coco.model_fields.num_base_classes == 61
  for cfg, sd in ((c, state), (coco, _five_shot_state(state))):
    fields = dict(cfg.model_fields)
    fields["num_base_classes"] = 16  # the fixture's weights are PASCAL-sized
    params = keymaps.convert(sd, hdmnet.keymap(**fields))["params"]
    opt = optim_lib.build(cfg.optim, params, total_steps=100, frozen=hdmnet.SPEC.frozen)
    labels = traverse_util.flatten_dict(opt.labels, sep="/")
    assert all(l == optim_lib.FROZEN for p, l in labels.items() if p.startswith("pspnet/"))
    assert labels["transformer/cls/conv_2/kernel"] == optim_lib.DEFAULT
    for p in (
      "down_supp/conv/kernel",
      "query_merge/kernel",
      "ensemble/gram_merge/kernel",
      "ensemble/cls_merge/kernel",
    ):
      assert labels[p] == "default*10", p
    if cfg.shot > 1:  # not in any optimiser group of the reference
      assert labels["ensemble/kshot_rw/conv_0/kernel"] == optim_lib.FROZEN
    lrs = {k: float(f(0)) for k, f in opt.schedules.items()}  # poly: t = 1 of 100
    assert lrs["default"] == pytest.approx(1e-4 * 0.99**0.9, rel=1e-5)
    assert lrs["default*10"] == pytest.approx(1e-3 * 0.99**0.9, rel=1e-5)


@pytest.mark.parametrize("axis", [-2, -1, 1])
def test_softmax_with_dot_backward_matches_jax(axis):
  """hdm.softmax (backward sum as a dot, see its docstring) = jax.nn.softmax, value and grad."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 7)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 5, 7)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    ours = jax.value_and_grad(lambda t: jnp.sum(w * softmax_dot_backward(t, axis)))(x)
    ref = jax.value_and_grad(lambda t: jnp.sum(w * jax.nn.softmax(t, axis=axis)))(x)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-7)
