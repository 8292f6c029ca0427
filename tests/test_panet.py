"""PANet: parity with kaixin96/PANet, N-way / K-shot forwards, PAR loss, key maps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import parity_fixture

from checkpoints import fixtures, parity, verify
from fss_jax import keymaps
from fss_jax.models import panet, registry
from fss_jax.nn.backbones import vgg

FIXTURE = ("panet", "panet_1shot_241_b2")


# ---------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------


def test_parity_fixture():
  report = verify.verify_fixture(parity_fixture(*FIXTURE))
  assert report["model"] == "panet"
  outs = report["outputs"]
  assert set(outs) == {"out_pred", "out_align_loss"}
  for name, e in outs.items():
    assert e["max_abs"] is not None, name
    assert e["max_abs"] <= 1e-4 * max(1.0, e["scale"]), (name, e)
  assert outs["out_pred"]["scale"] > 1.0  # real numbers were compared
  assert outs["out_pred"]["argmax_agree"] >= 0.999
  assert outs["out_align_loss"]["max_abs"] == 0.0  # eval mode: no PAR
  mids = report["intermediates"]
  for name in [
    "mid_vgg_block1__chmean",
    "mid_vgg_block4__chmean",
    "mid_vgg_block5__c32",
    "mid_prototype_epi0_fg",
    "mid_prototype_epi0_bg",
    "mid_prototype_epi1_fg",
    "mid_prototype_epi1_bg",
    "mid_dist_epi0_proto0",
    "mid_dist_epi1_proto1",
  ]:
    e = mids[name]
    assert e["max_abs"] is not None and e["max_abs"] <= 1e-4 * max(1.0, e["scale"]), (name, e)
  assert report["passed"]


def test_registry_finds_panet_for_fixture():
  _, meta = fixtures.load_fixture(parity_fixture(*FIXTURE))
  adapter = parity.for_fixture(meta)
  assert registry.get(adapter.model) is registry.get("panet")
  assert adapter.model_fields(meta)["shots"] == 1


def test_keymap_uses_every_fixture_key_once():
  _, meta = fixtures.load_fixture(parity_fixture(*FIXTURE))
  sd = keymaps.strip_prefixes(fixtures.regenerate(meta))
  rules = panet.keymap()
  srcs = [r.src for r in rules]
  assert sorted(srcs) == sorted(sd) and len(set(srcs)) == len(srcs) == 26
  variables = keymaps.convert(sd, rules, model="panet")
  _assert_tree_matches_model(variables)
  # A DataParallel snapshot ("module." prefixes) converts the same way.
  sd2 = keymaps.strip_prefixes({"module." + k: v for k, v in sd.items()})
  keymaps.convert(sd2, rules)


def _assert_tree_matches_model(variables):
  model = panet.PANet()
  ep = _episode(np.random.default_rng(0), b=1, n=None, k=1, size=9)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ep, train=False))
  want = jax.tree_util.tree_map(lambda s: s.shape, shapes)
  got = jax.tree_util.tree_map(lambda a: a.shape, variables)
  assert got == want
  n = sum(
    math.prod(s) for s in jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple))
  )
  assert n == 14_714_688  # the paper's 14.7M


def test_imagenet_keymap():
  # torchvision vgg16 key layout: features.{0,2,5,...,28} convs + classifier.
  shapes = [
    (64, 3),
    (64, 64),
    (128, 64),
    (128, 128),
    (256, 128),
    (256, 256),
    (256, 256),
    (512, 256),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
  ]
  sd = {}
  for j, (o, i) in zip(vgg.TORCHVISION_VGG16_CONV_INDICES, shapes):
    sd[f"features.{j}.weight"] = np.zeros((o, i, 3, 3), np.float32)
    sd[f"features.{j}.bias"] = np.zeros((o,), np.float32)
  for j in (0, 3, 6):  # stand-ins: ignored keys are never read
    sd[f"classifier.{j}.weight"] = np.zeros((1,), np.float32)
    sd[f"classifier.{j}.bias"] = np.zeros((1,), np.float32)
  variables = keymaps.convert(sd, panet.keymap(source="imagenet"))
  _assert_tree_matches_model(variables)
  assert panet.imagenet_keymap() == panet.keymap(source="imagenet")
  with pytest.raises(ValueError, match="'panet' or 'imagenet'"):
    panet.keymap(source="resnet")


# ---------------------------------------------------------------------------
# Forward on tiny episodes + numpy re-computation of prototypes / scores
# ---------------------------------------------------------------------------


def _episode(rng, *, b, n, k, size):
  way = () if n is None else (n,)
  masks = rng.integers(0, 2, (b, *way, k, size, size)).astype(np.int32)
  masks[..., 0, 0] = 255  # an ignore pixel in every support (counts as background)
  return {
    "query_image": jnp.asarray(rng.standard_normal((b, size, size, 3)), jnp.float32),
    "query_mask": jnp.asarray(rng.integers(0, 1 + (n or 1), (b, size, size)), jnp.int32),
    "support_images": jnp.asarray(rng.standard_normal((b, *way, k, size, size, 3)), jnp.float32),
    "support_masks": jnp.asarray(masks),
    "class_id": jnp.zeros((b,), jnp.int32),
  }


def _np_bilinear_matrix(n_in, n_out):
  """Half-pixel bilinear interpolation matrix in float64 (torch's rule)."""
  w = np.zeros((n_out, n_in))
  for o in range(n_out):
    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(src), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    w[o, i0] += 1 - lam
    w[o, i1] += lam
  return w


def _np_reference(feats, masks, b, n, k):
  """Steps 2-4 of FewShotSeg.forward in float64 numpy from block5 features."""
  f = feats.astype(np.float64)
  h, c = f.shape[1], f.shape[-1]
  size = masks.shape[-1]
  supp = f[: b * n * k].reshape(b, n, k, h, h, c)
  qry = f[b * n * k :]
  r = _np_bilinear_matrix(h, size)
  up = np.einsum("yh,bnkhwc,xw->bnkyxc", r, supp, r)  # features at mask size
  fore, back = (masks == 1).astype(np.float64), (masks != 1).astype(np.float64)
  pool = lambda m: np.einsum("bnkyxc,bnkyx->bnkc", up, m) / (m.sum(axis=(-1, -2))[..., None] + 1e-5)
  fg, bg = pool(fore), pool(back)
  protos = np.concatenate([bg.mean(axis=(1, 2))[:, None], fg.mean(axis=2)], axis=1)
  qn = qry / np.maximum(np.linalg.norm(qry, axis=-1, keepdims=True), 1e-8)
  pn = protos / np.maximum(np.linalg.norm(protos, axis=-1, keepdims=True), 1e-8)
  scores = 20 * np.einsum("bhwc,bjc->bhwj", qn, pn)
  logits = np.einsum("yh,bhwj,xw->byxj", r, scores, r)
  return protos, scores, logits


@pytest.mark.parametrize("n,k", [(None, 5), (2, 1)])
def test_forward_shapes_and_numpy_prototypes(n, k):
  b, size = 2, 17  # features 3x3
  ep = _episode(np.random.default_rng(1), b=b, n=n, k=k, size=size)
  model = panet.PANet(return_intermediates=True)
  with jax.default_matmul_precision("highest"):
    variables = jax.jit(lambda e: model.init(jax.random.PRNGKey(0), e, train=False))(ep)
    out = jax.jit(lambda v, e: model.apply(v, e, train=False))(variables, ep)
  ways = n or 1
  assert out["logits"].shape == (b, size, size, 1 + ways)
  assert out["scores"].shape == (b, 3, 3, 1 + ways)
  assert out["prototypes"].shape == (b, 1 + ways, 512)
  assert float(out["align_loss"]) == 0.0
  masks = np.asarray(ep["support_masks"])
  if n is None:
    masks = masks[:, None]
  protos, scores, logits = _np_reference(np.asarray(out["blocks"]["block5"]), masks, b, ways, k)
  np.testing.assert_allclose(
    np.asarray(out["prototypes"]), protos, rtol=1e-4, atol=1e-5 * np.abs(protos).max()
  )
  np.testing.assert_allclose(np.asarray(out["scores"]), scores, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["logits"]), logits, atol=1e-4)


def test_shape_errors():
  ep = _episode(np.random.default_rng(2), b=1, n=None, k=2, size=9)
  model = panet.PANet(shots=1)
  with pytest.raises(ValueError, match="built for 1-shot"):
    model.init(jax.random.PRNGKey(0), ep, train=False)
  bad = dict(ep, support_masks=ep["support_masks"][:, 0])
  with pytest.raises(ValueError, match=r"support_images \[B, K, H, W, 3\]"):
    panet.PANet().init(jax.random.PRNGKey(0), bad, train=False)


# ---------------------------------------------------------------------------
# PAR loss
# ---------------------------------------------------------------------------


def _par_inputs(n):
  # Query features at 2x2 (= mask size, so the resize is the identity), C = 2.
  qf = np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], np.float32)[None]  # [1, 2, 2, 2]
  scores = np.zeros((1, 2, 2, 1 + n), np.float32)
  scores[0, 0, :, 0] = 1  # top row -> background
  scores[0, 1, :, 1] = 1  # bottom row -> way 1 (way 2, if any, is never predicted)
  # way 1 support pixels: [1,0] [0,1] / [1,1] [-1,0]
  sf = np.array([[[1, 0], [0, 1]], [[1, 1], [-1, 0]]], np.float32)
  sf = np.broadcast_to(sf, (1, n, 1, 2, 2, 2)).copy()
  fore = np.broadcast_to(np.array([[0, 1], [0, 0]], np.float32), (1, n, 1, 2, 2)).copy()
  back = np.broadcast_to(np.array([[1, 0], [0, 1]], np.float32), (1, n, 1, 2, 2)).copy()
  return [jnp.asarray(a) for a in (qf, scores, sf, fore, back)]


def test_alignment_loss_hand_checked():
  # Query prototypes point along [1,0] (bg) and [0,1] (fg): support scores are
  # 20*(1,0), 20*(0,1), ignored (fore = back = 0), 20*(-1,0) with targets 0, 1, -, 0.
  expected = (2 * math.log1p(math.exp(-20)) + math.log1p(math.exp(20))) / 3
  loss = jax.jit(panet.alignment_loss)(*_par_inputs(1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  # Way 2 never appears in the query prediction: skipped, but the divisor stays N = 2.
  loss2 = jax.jit(panet.alignment_loss)(*_par_inputs(2))
  np.testing.assert_allclose(float(loss2), expected / 2, rtol=1e-6)


def test_train_step_loss_and_gradients():
  ep = _episode(np.random.default_rng(3), b=2, n=None, k=1, size=17)
  model = panet.PANet()
  variables = jax.jit(lambda e: model.init(jax.random.PRNGKey(0), e, train=False))(ep)

  def total(params):
    out = model.apply({"params": params}, ep, train=True)
    return panet.loss_fn(out, ep)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(variables["params"])
  assert set(metrics) == {"loss", "seg_loss", "align_loss", "align_epi0", "align_epi1"}
  assert float(metrics["align_loss"]) == pytest.approx(
    (float(metrics["align_epi0"]) + float(metrics["align_epi1"])) / 2, rel=1e-6
  )
  assert float(metrics["align_loss"]) > 0
  np.testing.assert_allclose(
    float(loss), float(metrics["seg_loss"] + metrics["align_loss"]), rtol=1e-6
  )
  leaves = jax.tree_util.tree_leaves(grads)
  assert len(leaves) == 26 and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert float(jnp.abs(grads["encoder"]["conv5_3"]["kernel"]).sum()) > 0


def test_standalone_encoder_keymap():
  _, meta = fixtures.load_fixture(parity_fixture(*FIXTURE))
  sd = keymaps.strip_prefixes(fixtures.regenerate(meta))
  variables = keymaps.convert(sd, vgg.encoder_keymap(source="panet"))
  enc = vgg.make_encoder()
  x = jnp.zeros((1, 9, 9, 3))
  want = jax.tree_util.tree_map(
    lambda s: s.shape, jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), x))
  )
  assert jax.tree_util.tree_map(lambda a: a.shape, variables) == want
  out = jax.eval_shape(lambda: enc.apply(variables, jnp.zeros((1, 241, 241, 3))))
  assert (
    out["block5"].shape
    == (1, 31, 31, 512)
    == (1, vgg.feature_size(241), vgg.feature_size(241), 512)
  )
  assert [r.src for r in vgg.encoder_keymap()][:2] == ["features.0.weight", "features.0.bias"]


def test_encoder_pool_choice_gives_identical_gradients():
  ep = _episode(np.random.default_rng(4), b=1, n=None, k=1, size=21)
  grads = {}
  for pool in ("taps", "reduce_window"):
    model = panet.PANet(encoder_pool=pool)
    variables = model.init(jax.random.PRNGKey(0), ep, train=False)
    total = lambda p, m=model: panet.loss_fn(m.apply({"params": p}, ep, train=True), ep)[0]
    grads[pool] = jax.jit(jax.grad(total))(variables["params"])
  for a, b in zip(
    jax.tree_util.tree_leaves(grads["taps"]), jax.tree_util.tree_leaves(grads["reduce_window"])
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="pool must be"):
    vgg.PANetVGG16(pool="avg").init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, 3)))
