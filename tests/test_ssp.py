"""SSP prototype predictor: parity with the official intermediates, the data-dependent
self-support branches against a direct numpy port of ``SSP_func``, key map, config,
and a short training run with the original recipe.

The parity fixtures only reach SSP's top-12 fallback for the foreground (no pixel above
0.7), so the thresholded branch is tested on features built to reach it.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaf, load_fixture, run_train_steps

from fss_jax import keymaps
from fss_jax.models import registry, ssp
from fss_jax.nn import prototype

# ---------------------------------------------------------------------------
# numpy port of fanq15/SSP SSP_matching.py (torch semantics, float64)
# ---------------------------------------------------------------------------


def _np_cos(a, b, eps=1e-8):
  """torch F.cosine_similarity over the last axis (each norm clamped at eps)."""
  a, b = np.broadcast_arrays(a, b)
  na = np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)
  nb = np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), eps)
  return np.sum(a / na * (b / nb), axis=-1)


def _np_match(f, fg, bg):
  as_map = lambda p: p[None, None] if p.ndim == 1 else p
  return np.stack([_np_cos(f, as_map(bg)), _np_cos(f, as_map(fg))], -1) * 10.0


def _np_softmax(x, axis):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _np_ssp_func(feat, out):
  """SSP_func for one episode: feat [h, w, C], out [h, w, 2] -> (fg, bg, bg_local [h, w, C])."""
  h, w, c = feat.shape
  pred = _np_softmax(out, -1).reshape(-1, 2)
  cur = feat.reshape(-1, c).T  # C, N

  def select(p, thr):
    if (p > thr).sum() > 0:
      return cur[:, p > thr]
    return cur[:, np.argsort(-p, kind="stable")[:12]]

  fg_feat, bg_feat = select(pred[:, 1], 0.7), select(pred[:, 0], 0.6)
  bg_norm = bg_feat / np.linalg.norm(bg_feat, axis=0, keepdims=True)
  cur_norm = cur / np.linalg.norm(cur, axis=0, keepdims=True)
  sim = _np_softmax(cur_norm.T @ bg_norm * 2.0, -1)
  local = (sim @ bg_feat.T).reshape(h, w, c)
  return fg_feat.mean(-1), bg_feat.mean(-1), local


def _np_ssp_head(fq, fs, masks, refine):
  """SSP forward after the backbone; masks already at the feature size. fq [B, h, w, C],
  fs [B, K, h, w, C], masks [B, K, h, w] labels."""

  def mapool(f, m):
    return (f * m[..., None]).sum((0, 1)) / (m.sum() + 1e-5)

  outs = {k: [] for k in ("out0", "out1", "out2", "fg", "bg", "local")}
  for b in range(fq.shape[0]):
    fp = np.mean([mapool(fs[b, k], (masks[b, k] == 1) * 1.0) for k in range(fs.shape[1])], 0)
    bp = np.mean([mapool(fs[b, k], (masks[b, k] == 0) * 1.0) for k in range(fs.shape[1])], 0)
    out0 = _np_match(fq[b], fp, bp)
    sfg, sbg, sloc = _np_ssp_func(fq[b], out0)
    fp1, bp1 = fp * 0.5 + sfg * 0.5, sbg * 0.3 + sloc * 0.7
    out1 = _np_match(fq[b], fp1, bp1)
    if refine:
      fg2, bg2, loc2 = _np_ssp_func(fq[b], out1)
      fp2 = fp * 0.5 + fp1 * 0.2 + (fp * 0.5 + fg2 * 0.5) * 0.3
      bp2 = bp * 0.5 + bp1 * 0.2 + (bg2 * 0.3 + loc2 * 0.7) * 0.3
      outs["out2"].append(_np_match(fq[b], fp2, bp2) * 0.7 + out1 * 0.3)
    for k, v in (("out0", out0), ("out1", out1), ("fg", sfg), ("bg", sbg), ("local", sloc)):
      outs[k].append(v)
  return {k: np.stack(v) for k, v in outs.items() if v}


def _crafted_features(rng, c=16, h=8, k=2):
  """Episode 0: a confident query (an FG block along u, the rest along v) -> both
  thresholds reached. Episode 1: every query position halfway between u and v ->
  probabilities near 0.5, both top-12 fallbacks."""
  u, v = np.zeros(c), np.zeros(c)
  u[0], v[1] = 1.0, 1.0
  noise = lambda *s: rng.standard_normal(s) * 0.05
  masks = np.zeros((2, k, h, h), np.int32)
  masks[:, :, 2:6, 2:6] = 1
  masks[:, :, 0, :] = 255  # ignored by both sets
  fs = np.where(masks[..., None] == 1, 3 * u, 3 * v) + noise(2, k, h, h, c)
  fq = np.empty((2, h, h, c))
  block = np.zeros((h, h), bool)
  block[1:5, 3:7] = True
  fq[0] = np.where(block[..., None], 3 * u, 3 * v) + noise(h, h, c)
  fq[1] = 3 * (u + v) / 2 + noise(h, h, c) * 0.1
  return fq, fs, masks


@pytest.mark.parametrize("refine", [False, True])
def test_self_support_branches_match_numpy(refine):
  rng = np.random.default_rng(0)
  fq, fs, masks = _crafted_features(rng)
  ref = _np_ssp_head(fq, fs, masks, refine)
  h = fq.shape[1]
  with jax.default_matmul_precision("highest"):
    out = jax.jit(partial(ssp.ssp_head, refine=refine, image_size=(h, h)))(
      jnp.asarray(fq, jnp.float32), jnp.asarray(fs, jnp.float32), jnp.asarray(masks)
    )
  # Branches: episode 0 takes both thresholded sets, episode 1 both top-12 fallbacks.
  assert int(out["fg_above"][0]) > 0 and int(out["bg_above"][0]) > 0
  assert int(out["fg_above"][1]) == 0 and int(out["bg_above"][1]) == 0
  p0 = _np_softmax(ref["out0"], -1)
  assert int(out["fg_above"][0]) == int((p0[0, ..., 1] > 0.7).sum())
  assert int(out["bg_above"][0]) == int((p0[0, ..., 0] > 0.6).sum())
  pairs = [
    ("out_0_low", "out0"),
    ("out_1_low", "out1"),
    ("ssp_fg", "fg"),
    ("ssp_bg", "bg"),
    ("ssp_bg_local", "local"),
  ]
  if refine:
    pairs.append(("out_2_low", "out2"))
  for ours, theirs in pairs:
    np.testing.assert_allclose(
      np.asarray(out[ours]), ref[theirs], rtol=1e-5, atol=1e-4, err_msg=ours
    )
  # The calibrated prediction separates the block in episode 0.
  assert np.mean(np.argmax(np.asarray(out["out_1_low"])[0], -1)[1:5, 3:7]) == 1.0


def test_selection_is_threshold_or_topk():
  prob = jnp.asarray([[0.9, 0.1, 0.75, 0.2], [0.5, 0.6, 0.4, 0.69]])
  sel = np.asarray(prototype._selection(prob, 0.7, 2))
  np.testing.assert_array_equal(sel, [[1, 0, 1, 0], [0, 1, 0, 1]])


# ---------------------------------------------------------------------------
# parity with the official intermediates (weights of the SCCAN-PAHNet fixture's ssp.*)
# ---------------------------------------------------------------------------


def _ssp_fixture_variables(meta):
  from checkpoints import fixtures

  sd = {k: v for k, v in fixtures.regenerate(meta).items() if k.startswith("ssp.")}
  assert len(sd) == 270
  return keymaps.convert(sd, ssp.ssp_keymap(prefix="ssp.", dst=()), model="ssp")


def test_ssp_matches_official_intermediates():
  arrays, meta, _ = load_fixture("sccan_pahnet", "sccan_pahnet_1shot_241_b2")
  variables = _ssp_fixture_variables(meta)
  net = ssp.SSPMatchingNet(out_size=(64, 64))
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda v, q, s, m: net.apply(v, q, s, m))(
      variables,
      jnp.asarray(arrays["in_query_img"].transpose(0, 2, 3, 1)),
      jnp.asarray(arrays["in_supp_img"].transpose(0, 1, 3, 4, 2)),
      jnp.asarray(arrays["in_supp_label"].astype(np.int32)),
    )
  nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)
  checks = {
    "mid_ssp_sim_out0": nchw(out["out_0_low"]),
    "mid_ssp_sim_out1": nchw(out["out_1_low"]),
    "mid_ssp_out": nchw(out["out_1"]),
    "mid_ssp_func_fg": np.asarray(out["ssp_fg"]),
    "mid_ssp_func_bg": np.asarray(out["ssp_bg"]),
    "mid_ssp_func_bglocal__chmean": np.asarray(out["ssp_bg_local"], np.float64).mean((1, 2)),
  }
  for name, ours in checks.items():
    ref = arrays[name]
    err = float(np.max(np.abs(ours - ref)))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), (name, err)
  # Branch decisions recorded in the fixture notes.
  notes = " ".join(meta["notes"])
  m = re.search(r"fg prob > 0\.7 per batch item (\[[^\]]*\]).*bg prob > 0\.6 (\[[^\]]*\])", notes)
  assert m, notes
  assert np.asarray(out["fg_above"]).tolist() == eval(m.group(1))
  assert np.asarray(out["bg_above"]).tolist() == eval(m.group(2))


# ---------------------------------------------------------------------------
# key map, config, training
# ---------------------------------------------------------------------------


def _model_shapes(model, example):
  """{(collection, *path): shape} of the model's variables, without compiling."""
  tree = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, example, train=False
    )
  )
  return {tuple(k): tuple(v.shape) for k, v in _flat(tree)}


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out.items()


def _episode(rng, b, k, h):
  img = rng.standard_normal((b, k + 1, h, h, 3)).astype(np.float32) * 0.3
  masks = np.zeros((b, k + 1, h, h), np.int32)
  for i in range(b):
    for j in range(k + 1):
      y, x = rng.integers(0, h // 2, 2)
      masks[i, j, y : y + h // 2, x : x + h // 2] = 1
  masks[:, :, -2:] = 255
  img += 1.5 * (masks == 1)[..., None]
  return {
    "query_image": jnp.asarray(img[:, 0]),
    "query_mask": jnp.asarray(masks[:, 0]),
    "support_images": jnp.asarray(img[:, 1:]),
    "support_masks": jnp.asarray(masks[:, 1:]),
    "class_id": jnp.zeros((b,), jnp.int32),
  }


def test_keymap_covers_every_parameter_once():
  spec = registry.get("ssp")
  model = spec.make_model(shot=2)
  shapes = _model_shapes(model, _episode(np.random.default_rng(0), 1, 2, 33))
  km = spec.keymap(shot=2)
  rules = [r for r in km if isinstance(r, keymaps.Rule)]
  # 270 state-dict entries: 45 convs, 45 BNs x (weight, bias, mean, var, num_batches_tracked).
  assert len(km) == 270 and len({r.src for r in km}) == 270
  assert len(rules) == 225 and sorted(r.dst for r in rules) == sorted(shapes)
  assert {r.src for r in km} >= {
    "layer0.0.0.weight",
    "layer0.0.6.weight",
    "layer0.1.running_var",
    "layer3.5.conv3.weight",
    "layer1.0.downsample.1.weight",
  }


def test_config_recipe():
  from configs import ssp as cfg

  c = cfg.get_config("dataset=coco,fold=1,shot=5,refine")
  assert (c.model, c.shot, c.model_fields.refine, c.batch_size, c.total_steps) == (
    "ssp",
    5,
    True,
    4,
    6000,
  )
  assert (c.optim.optimizer, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
    "sgd",
    1e-3,
    0.9,
    5e-4,
  )
  assert tuple(c.optim.milestones) == (2000, 4000) and c.optim.schedule == "multistep"
  assert c.data.coco_split == "interleaved" and c.data.protocol == "pfenet"
  assert tuple(c.eval.seeds) == (0, 1, 2, 3, 4) and c.eval.episodes == 4000
  assert cfg.get_config("dataset=coco,split=ssp").data.coco_split == "contiguous"
  with pytest.raises(ValueError, match="split"):
    cfg.get_config("split=pascal")


def test_training_lowers_the_loss_and_freezes_the_recipe_parts():
  from configs import ssp as cfg

  _, meta, _ = load_fixture("sccan_pahnet", "sccan_pahnet_1shot_241_b2")
  c = cfg.get_config("smoke")
  spec = registry.get("ssp")
  model = spec.make_model(**c.model_fields)
  inner = _ssp_fixture_variables(meta)
  variables = jax.tree.map(jnp.asarray, {col: {"ssp": t} for col, t in inner.items()})
  optim_cfg = c.optim.to_dict()
  optim_cfg["lr"] = 2e-3
  batch = _episode(np.random.default_rng(1), 2, 1, 33)
  before, after, losses, metrics = run_train_steps(
    spec, model, variables, optim_cfg, batch, total_steps=c.total_steps
  )
  assert losses[-1] < losses[0], losses
  assert {"ce_out1", "ce_self", "ce_support"} <= set(metrics)
  bb_a, bb_b = after["ssp"]["backbone"], before["ssp"]["backbone"]
  for frozen in (
    ("conv1", "kernel"),
    ("layer1_0", "conv1", "kernel"),
    ("layer2_0", "bn1", "scale"),
  ):
    np.testing.assert_array_equal(leaf(bb_a, frozen), leaf(bb_b, frozen), err_msg=str(frozen))
  for trained in (("layer2_0", "conv2", "kernel"), ("layer3_5", "conv3", "kernel")):
    assert not np.array_equal(leaf(bb_a, trained), leaf(bb_b, trained)), trained


@pytest.mark.parametrize(
  "source,stem",
  [
    ("imagenet", ("conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1")),
    ("resnet_v2", ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")),
  ],
)
def test_imagenet_initialisation_files_convert(source, stem):
  """SSP's pretrained/resnet50.pth (and PSPNet's resnet50_v2.pth): every tensor of layers
  0-3 lands in the SSP tree; layer4 and fc are dropped."""
  spec = registry.get("ssp")
  shapes = _model_shapes(spec.make_model(), _episode(np.random.default_rng(0), 1, 1, 33))
  km = spec.keymap(source=source)
  sd = {}
  for r in km:
    if isinstance(r, keymaps.Rule):
      shp = shapes[r.dst]
      sd[r.src] = np.zeros(
        (shp[3], shp[2], shp[0], shp[1]) if r.transform == "conv" else shp, np.float32
      )
    elif not r.src.endswith("num_batches_tracked"):
      sd[r.src] = np.zeros((1,), np.float32)
  assert {k.rsplit(".", 1)[0] for k in sd if not k.startswith("layer")} == set(stem) | {"fc"}
  assert any(k.startswith("layer4.2.") for k in sd)
  variables = keymaps.convert(sd, km, model="ssp", expected_shapes=shapes)
  assert sorted(_flat_keys(variables)) == sorted(shapes)


def _flat_keys(tree, prefix=()):
  for k, v in tree.items():
    if hasattr(v, "items"):
      yield from _flat_keys(v, prefix + (k,))
    else:
      yield prefix + (k,)
