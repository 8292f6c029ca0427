"""Sym-Net: parity with the official code, K-shot / size forward, parameter counts, key
map, class embeddings and bad input (symnet.md)."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import fixtures, parity, verify
from fss_jax import assets, keymaps
from fss_jax.models import registry, symnet
from tests.conftest import PARITY_DIR, extra_fixture_paths, parity_fixture

FIXTURE = ("symnet", "symnet_1shot_241_b1")


def _fixture_meta() -> dict:
  path = parity_fixture(*FIXTURE)
  return json.loads(path.with_suffix(".json").read_text())


def _official_entries(shot: int) -> list[dict]:
  """(key, shape, rule) of the official state dict: the fixture's 420 keys, plus
  kshot_rw for K > 1 (424 keys)."""
  entries = [
    dict(key=e["key"], shape=e["shape"], rule=e["rule"])
    for e in _fixture_meta()["state_dict"]["keys"]
  ]
  if shot > 1:
    entries += [
      dict(key="kshot_rw.0.weight", shape=[2, shot, 1, 1], rule="conv"),
      dict(key="kshot_rw.0.bias", shape=[2], rule="bias"),
      dict(key="kshot_rw.2.weight", shape=[shot, 2, 1, 1], rule="conv"),
      dict(key="kshot_rw.2.bias", shape=[shot], rule="bias"),
    ]
  return entries


def _state_dict(shot: int, prefix: str = "") -> dict[str, np.ndarray]:
  """Rule weights (parity/README.md) for the official key names, as a DDP checkpoint."""
  meta = {"GLOBAL_SEED": 7, "state_dict": {"keys": _official_entries(shot)}}
  return {prefix + k: v for k, v in fixtures.regenerate(meta).items()}


def _shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(p.key for p in path): tuple(v.shape) for path, v in flat}


def _abstract_variables(model, size: int = 33, shot: int = 1):
  ep = _episode(np.random.default_rng(0), 1, shot, size)
  return jax.eval_shape(
    lambda e: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, e, train=False
    ),
    ep,
  )


def _episode(rng, b: int, k: int, size: int, class_id: int = 3) -> dict:
  mask = np.zeros((b, k, size, size), np.int32)
  mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
  mask[..., 0, :] = 255
  q = np.zeros((b, size, size), np.int32)
  q[:, size // 3 :, size // 3 :] = 1
  return {
    "query_image": jnp.asarray(rng.standard_normal((b, size, size, 3)), jnp.float32),
    "support_images": jnp.asarray(rng.standard_normal((b, k, size, size, 3)), jnp.float32),
    "support_masks": jnp.asarray(mask),
    "query_mask": jnp.asarray(q),
    "class_id": jnp.full((b,), class_id, jnp.int32),
  }


# ---------------------------------------------------------------------------
# Parity with the official forward
# ---------------------------------------------------------------------------


def test_parity_fixture_through_verify():
  path = parity_fixture(*FIXTURE)
  report = verify.verify_fixture(path)
  outs = report["outputs"]
  assert set(outs) == {"out_final", "out_meta", "out_base"}
  assert report["passed"], "\n".join(report["lines"])
  # logits tight (1e-4 relative), ensembled probabilities within 1e-3 absolute
  for name in ("out_meta", "out_base"):
    assert outs[name]["max_abs"] <= 1e-4 * max(1.0, outs[name]["scale"]), (name, outs[name])
  assert outs["out_final"]["max_abs"] <= 1e-3
  for name in outs:
    assert outs[name]["argmax_agree"] >= 0.999, (name, outs[name])
  mids = report["intermediates"]
  with np.load(path) as z:
    assert sorted(mids) == sorted(k for k in z.files if k.startswith("mid_"))  # all 76
  for name, e in mids.items():
    assert e["max_abs"] is not None, (name, e)
    rel = 1e-2 if "est_val" in name else 1e-3
    assert e["max_abs"] <= rel * max(1.0, e["scale"]), (name, e)


@pytest.mark.parametrize(
  "path", extra_fixture_paths("symnet", exclude=(FIXTURE[1],)), ids=lambda p: p.stem
)
def test_parity_other_fixtures(path):
  """Unseen fixtures (other shots / sizes / batches / seeds) made with the official code."""
  report = verify.verify_fixture(path)
  assert report["passed"], "\n".join(report["lines"])
  assert set(report["outputs"]) == {"out_final", "out_meta", "out_base"}


def test_registry_finds_the_fixture():
  adapter = parity.for_fixture(_fixture_meta())
  assert adapter.model == "symnet"
  fields = adapter.model_fields(_fixture_meta())
  assert fields == dict(
    shot=1, dataset="pascal5i", num_base_classes=16, depth=50, scales=(31, 16, 8, 4)
  )


# ---------------------------------------------------------------------------
# Parameter counts and the key map
# ---------------------------------------------------------------------------


def _counts(spec, variables) -> tuple[int, int]:
  shapes = _shapes(variables["params"])
  total = sum(math.prod(s) for s in shapes.values())
  frozen = sum(
    math.prod(s) for p, s in shapes.items() if any(re.fullmatch(f, p) for f in spec.frozen)
  )
  return total, total - frozen


def test_parameter_counts():
  spec = registry.get("symnet")
  total, trainable = _counts(spec, _abstract_variables(spec.make_model(shot=1)))
  assert (total, trainable) == (57_931_118, 11_217_310)
  total5, trainable5 = _counts(spec, _abstract_variables(spec.make_model(shot=5), shot=5))
  assert (total5 - total, trainable5 - trainable) == (27, 27)  # kshot_rw
  coco, _ = _counts(spec, _abstract_variables(spec.make_model(dataset="coco20i")))
  assert coco == 57_954_203


@pytest.mark.parametrize("shot,num_keys", [(1, 420), (5, 424)])
def test_keymap_uses_every_official_key_once(shot, num_keys):
  spec = registry.get("symnet")
  sd = keymaps.strip_prefixes(_state_dict(shot, prefix="module."))
  assert len(sd) == num_keys
  rules = spec.keymap(shot=shot)
  assert sorted(r.src for r in rules) == sorted(sd)  # each key once
  model = spec.make_model(shot=shot)
  want = _abstract_variables(model, shot=shot)
  expected = {
    tuple(p.split("/")): s
    for c in ("params", "batch_stats")
    for p, s in _shapes({c: want[c]}).items()
  }
  variables = keymaps.convert(sd, rules, model="symnet", expected_shapes=expected)
  got = {c: _shapes({c: variables[c]}) for c in ("params", "batch_stats")}
  assert got == {c: _shapes({c: want[c]}) for c in ("params", "batch_stats")}
  # Raw bilinear matrix copied untransposed; Linear weights transposed.
  np.testing.assert_array_equal(variables["params"]["apa"]["weight"], sd["CrossAttention.weight"])
  np.testing.assert_array_equal(
    variables["params"]["apa"]["w_q"]["kernel"], sd["CrossAttention.w_q.weight"].T
  )
  with pytest.raises(keymaps.ConversionError, match="CrossAttention.proj.bias"):
    keymaps.convert({k: v for k, v in sd.items() if k != "CrossAttention.proj.bias"}, rules)


# ---------------------------------------------------------------------------
# K-shot and another input size
# ---------------------------------------------------------------------------


def test_five_shot_equals_one_shot_on_repeated_supports():
  """5 copies of one support must give the 1-shot result: mean correlations, weighted
  priors / text prototypes and est_val all collapse (weights sum to 1)."""
  size, b = 41, 2  # features 6x6, bins (6, 3, 2, 1)
  spec = registry.get("symnet")
  m1, m5 = spec.make_model(shot=1), spec.make_model(shot=5)
  sd5 = _state_dict(5)
  v5 = keymaps.convert(sd5, spec.keymap(shot=5))
  v1 = keymaps.convert(
    {k: v for k, v in sd5.items() if not k.startswith("kshot_rw")}, spec.keymap(shot=1)
  )
  rng = np.random.default_rng(1)
  ep1 = _episode(rng, b, 1, size, class_id=7)
  ep5 = dict(
    ep1,
    support_images=jnp.repeat(ep1["support_images"], 5, axis=1),
    support_masks=jnp.repeat(ep1["support_masks"], 5, axis=1),
  )
  with jax.default_matmul_precision("highest"):
    run5 = jax.jit(lambda v, e: m5.apply(v, e, train=False))
    o5 = run5(v5, ep5)
    o1 = jax.jit(lambda v, e: m1.apply(v, e, train=False))(v1, ep1)
    # Under jit an id outside the table cannot raise: that episode's outputs are NaN
    # (the engine stops on a NaN loss); the other episodes are unaffected.
    o_bad = run5(v5, dict(ep5, class_id=jnp.asarray([7, 21], jnp.int32)))
  assert o5["logits"].shape == (b, size, size, 2)
  assert o5["meta_logits"].shape == (b, size, size, 2)
  assert o5["base_logits"].shape == (b, size, size, 16)
  assert [a.shape for a in o5["aux_logits"]] == [(b, s, s, 2) for s in (6, 3, 2, 1)]
  w = np.asarray(o5["intermediates"]["shot_weight"])
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
  for name in ("logits", "meta_logits", "base_logits", "est_val", "prior"):
    a, r = np.asarray(o5[name]), np.asarray(o1[name])
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, r, atol=1e-4 * max(1.0, float(np.abs(r).max())), err_msg=name)
  assert np.all(np.isnan(np.asarray(o_bad["logits"][1])))
  np.testing.assert_array_equal(np.asarray(o_bad["logits"][0]), np.asarray(o5["logits"][0]))


# ---------------------------------------------------------------------------
# Blocks whose data-dependent branches the fixture does not take
# ---------------------------------------------------------------------------


def _ref_normalize(v):
  return v / max(np.linalg.norm(v), 1e-12)


def _ref_dist(a, b):
  return np.linalg.norm(a - b + 1e-6)


def _ref_triplet(ts, feats, masks, tq, amb, bg, margin=0.5):
  """Loop form of get_triple_loss / hard_triplet_dig (symnet.md §6.2)."""
  b, k = feats.shape[:2]
  s_loss = 0.0
  for i in range(k):
    shot, count = 0.0, b
    for j in range(b):
      f = feats[j, i].reshape(-1, feats.shape[-1])
      m = masks[j, i].reshape(-1)
      pos, neg = f[m == 1], f[m == 0]
      if len(pos) < 1 or len(neg) < 1:
        count -= 1
        continue
      a = _ref_normalize(ts[j])
      dpos = max(_ref_dist(a, _ref_normalize(p)) for p in pos)
      dneg = _ref_dist(a, np.mean([_ref_normalize(n) for n in neg], axis=0))
      shot += max(0.0, margin + dpos - dneg)
    s_loss += shot / max(count, 1)
  q_loss = np.mean(
    [
      max(
        0.0,
        margin
        + _ref_dist(_ref_normalize(tq[j]), _ref_normalize(amb[j]))
        - _ref_dist(_ref_normalize(tq[j]), _ref_normalize(bg[j])),
      )
      for j in range(b)
    ]
  )
  return s_loss / k + q_loss


def test_hard_triplet_loss_matches_reference_loops():
  from fss_jax.nn import symnet_blocks as blocks

  rng = np.random.default_rng(0)
  b, k, h, w, c = 3, 2, 4, 5, 6
  feats = np.maximum(rng.standard_normal((b, k, h, w, c)), 0).astype(np.float32)
  feats[0, 0, 0, 0] = 0.0  # a zero vector (ReLU output)
  masks = (rng.random((b, k, h, w)) > 0.5).astype(np.float32)
  masks[1, 0] = 0.0  # no positives: skipped
  masks[2, 1] = 1.0  # no negatives: skipped
  ts, tq, amb, bg = (rng.standard_normal((b, c)).astype(np.float32) for _ in range(4))
  amb = tq + 0.1 * amb  # some query terms are zero (hinge)
  got = blocks.hard_triplet_loss(ts, feats, masks, tq, amb, bg)
  np.testing.assert_allclose(float(got), _ref_triplet(ts, feats, masks, tq, amb, bg), rtol=1e-5)
  grads = jax.grad(lambda t, f: blocks.hard_triplet_loss(t, f, masks, tq, amb, bg), (0, 1))(
    jnp.asarray(ts), jnp.asarray(feats)
  )
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  assert float(jnp.abs(grads[0]).sum()) > 0


def test_query_self_prototypes_thresholds_and_fallbacks():
  from fss_jax.nn import symnet_blocks as blocks

  rng = np.random.default_rng(1)
  h = w = 6
  feat = rng.standard_normal((2, h, w, 3)).astype(np.float32)
  f = feat.reshape(2, -1, 3)
  r = np.stack([rng.random(h * w), 0.6 + 0.05 * rng.random(h * w)]).astype(np.float32)
  fg, amb, bg = blocks.query_self_prototypes(jnp.asarray(feat), jnp.asarray(r.reshape(2, h, w, 1)))
  # image 0: every set is non-empty -> plain means
  np.testing.assert_allclose(fg[0], f[0][r[0] > 0.7].mean(0), rtol=1e-5)
  np.testing.assert_allclose(amb[0], f[0][(r[0] > 0.4) & (r[0] < 0.55)].mean(0), rtol=1e-5)
  np.testing.assert_allclose(bg[0], f[0][r[0] < 0.4].mean(0), rtol=1e-5)
  # image 1: r in [0.6, 0.65]: fg -> top-12, ambiguous -> middle ranks 12..23, bg -> top-12 of 1-r
  order = np.argsort(r[1])
  np.testing.assert_allclose(fg[1], f[1][order[-12:]].mean(0), rtol=1e-5)
  np.testing.assert_allclose(amb[1], f[1][order[18 - 6 : 18 + 6]].mean(0), rtol=1e-5)
  np.testing.assert_allclose(bg[1], f[1][order[:12]].mean(0), rtol=1e-5)


def test_block_correlation_empty_support_mask_gives_zero():
  from fss_jax.nn import symnet_blocks as blocks

  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
  s = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
  fg = np.zeros((2, 4, 4), bool)
  fg[1, 1:3, 1:3] = True
  out = np.asarray(blocks.block_correlation(q, s, jnp.asarray(fg)))
  np.testing.assert_array_equal(out[0], 0.0)
  qn = np.asarray(q[1]).reshape(-1, 8)
  qn = qn / (np.linalg.norm(qn, axis=1, keepdims=True) + 1e-5)
  sn = np.asarray(s[1])[1:3, 1:3].reshape(-1, 8)
  sn = sn / (np.linalg.norm(sn, axis=1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(
    out[1].reshape(-1), np.maximum(qn @ sn.T, 0).mean(1), rtol=1e-5, atol=1e-6
  )


# ---------------------------------------------------------------------------
# Class embeddings and bad input
# ---------------------------------------------------------------------------


def test_packaged_embeddings():
  pascal = assets.load_class_embeddings("pascal")
  coco = assets.load_class_embeddings("coco20i")
  assert pascal.shape == (21, 300) and coco.shape == (81, 300)
  assert pascal.dtype == np.float32
  np.testing.assert_allclose(pascal.astype(np.float64).sum(), -24.234728, atol=1e-5)
  np.testing.assert_allclose(coco.astype(np.float64).sum(), -75.020577, atol=1e-5)
  np.testing.assert_array_equal(pascal[0], coco[0])  # shared background row
  np.testing.assert_allclose(np.linalg.norm(pascal, axis=1), 1.0, atol=1e-5)
  for t in assets.WORD2VEC.values():
    assert assets.sha256_file(assets.ASSET_DIR / t.file) == t.sha256
  shared = PARITY_DIR.parent / "assets" / "symnet" / "word2vec_pascal.npy"
  if shared.is_file():
    np.testing.assert_array_equal(np.load(shared), pascal)


def _eager_apply(model, episode):
  """The class-embedding lookup is the first step: bad ids fail before the backbone."""
  v = _abstract_variables(model)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v)
  return model.apply(zeros, episode, train=False)


def test_class_id_outside_table_is_rejected():
  model = symnet.make_model()
  for bad in (21, -1):
    ep = _episode(np.random.default_rng(0), 1, 1, 33, class_id=bad)
    with pytest.raises(assets.AssetError, match=r"outside the pascal5i embedding table"):
      _eager_apply(model, ep)
  with pytest.raises(assets.AssetError, match="rows 0..80"):
    assets.check_class_ids([81], "coco20i")
  assets.check_class_ids([1, 80], "coco20i")


def test_wrong_dataset_embeddings_are_rejected(tmp_path):
  coco_file = assets.ASSET_DIR / assets.WORD2VEC["coco20i"].file
  model = symnet.make_model(embedding_path=str(coco_file))
  ep = _episode(np.random.default_rng(0), 1, 1, 33)
  with pytest.raises(assets.AssetError, match="holds the coco20i class embeddings"):
    _eager_apply(model, ep)
  wrong_rows = tmp_path / "glove_coco.npy"
  np.save(wrong_rows, np.zeros((81, 300), np.float32))
  with pytest.raises(assets.AssetError, match=r"row count of coco20i"):
    assets.load_class_embeddings("pascal5i", wrong_rows)
  with pytest.raises(ValueError, match="num_base_classes=61 does not fit pascal5i"):
    _eager_apply(symnet.make_model(num_base_classes=61), ep)
  with pytest.raises(assets.AssetError, match="no class embeddings for dataset"):
    assets.load_class_embeddings("ade20k")


def test_corrupted_embeddings_fail_the_sha_check(tmp_path, monkeypatch):
  (tmp_path / "symnet").mkdir()
  for t in assets.WORD2VEC.values():
    shutil.copy(assets.ASSET_DIR / t.file, tmp_path / t.file)
  a = np.load(tmp_path / "symnet" / "word2vec_pascal.npy")
  a[3, 0] += 1e-3
  np.save(tmp_path / "symnet" / "word2vec_pascal.npy", a)
  monkeypatch.setattr(assets, "ASSET_DIR", tmp_path)
  assets._load.cache_clear()
  try:
    with pytest.raises(assets.AssetError, match="corrupted or was replaced: SHA-256"):
      assets.load_class_embeddings("pascal5i")
    (tmp_path / "symnet" / "word2vec_coco.npy").unlink()
    with pytest.raises(assets.AssetError, match="packaged class embeddings .* are missing"):
      assets.load_class_embeddings("coco20i")
  finally:
    assets._load.cache_clear()


def test_scales_must_follow_the_input_size():
  assert symnet.default_scales(symnet.feature_size(473)) == (60, 30, 15, 8)
  assert symnet.default_scales(symnet.feature_size(641)) == (81, 40, 20, 10)
  assert symnet.default_scales(symnet.feature_size(241)) == (31, 16, 8, 4)
  model = symnet.make_model(scales=(60, 30, 15, 8))
  with pytest.raises(ValueError, match="first pyramid bin .60. must equal the feature size 5"):
    _abstract_variables(model, size=33)
  with pytest.raises(ValueError, match="2 supports per query but the model was built for 1-shot"):
    _abstract_variables(symnet.make_model(), shot=2)


# ---------------------------------------------------------------------------
# Training through the engine
# ---------------------------------------------------------------------------


def test_configs():
  from configs import symnet as symnet_config

  c = symnet_config.get_config("dataset=pascal,fold=1,shot=5")
  assert (c.model, c.fold, c.model_fields.shot, c.model_fields.scales) == (
    "symnet",
    1,
    5,
    (60, 30, 15, 8),
  )
  assert (c.data.train_size, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
    473,
    0.05,
    0.9,
    1e-4,
  )
  assert (c.epochs, c.batch_size, c.eval.episodes, c.init_prefix) == (200, 8, 1000, "pspnet")
  c = symnet_config.get_config("dataset=coco")
  assert (
    c.dataset,
    c.data.train_size,
    c.model_fields.scales,
    c.model_fields.num_base_classes,
    c.eval.episodes,
    c.epochs,
  ) == ("coco20i", 641, (81, 40, 20, 10), 61, 5000, 50)
  assert c.eval.seeds == (510, 365, 382, 322, 988)
  model = symnet.make_model(**c.model_fields)
  assert model.scales[0] == symnet.feature_size(c.data.train_size)


@pytest.mark.slow
def test_smoke_training_via_main_reports_every_loss_term(tmp_path):
  """3 steps on synthetic VOC data through ``python -m fss_jax.main`` (train + validation)."""
  import os
  import subprocess
  import sys

  from data_prep import synthetic

  data = synthetic.make_built_dataset(tmp_path / "data", "voc", num_images=32, seed=0)
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  work = tmp_path / "symnet"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "fss_jax.main",
      "--config",
      "configs/symnet.py:smoke",
      "--workdir",
      str(work),
      f"--config.data.data_dir={data}",
    ],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["step"] == 3 and len(summary["history"]) == 3
  terms = ("main", "aux1", "aux2", "aux_inner", "triplet")
  for h in summary["history"]:
    assert all(np.isfinite(h[t]) and h[t] > 0 for t in terms), h
    np.testing.assert_allclose(h["loss"], sum(h[t] for t in terms), rtol=1e-5)
    assert np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0
  assert summary["val"]["episodes"] == 4 and 0 <= summary["val"]["miou"] <= 100
  assert (work / "checkpoints" / "3").is_dir()
