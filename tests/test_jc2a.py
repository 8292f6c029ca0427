"""JC²A (fss_jax.models.jc2a): P2B block selection, HPAM / CKMM formulas, parameter counts
(jc2a.md §11), shapes at 473 (eval_shape, no compute), FP_base file handling (jc2a_prior) and
FP_base as a checkpointed parameter, configs."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fss_jax.models import jc2a
from fss_jax.nn.attention import linear
from fss_jax.ops import similarity, windows
from fss_jax.train import jc2a_prior

N_BASE = 15
# jc2a.md §11 (ResNet-50): backbone 23,631,808 + trainable 11,285,364.
BACKBONE_R50 = 23_631_808
FULL_R50 = 34_917_172
FULL_R101 = 53_909_300
POS_EMBED = 2 * (60 * 60 + 30 * 30 + 15 * 15 + 8 * 8)  # 9,578
QKV = 3 * 256 * 256  # 196,608


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _fp(n=N_BASE, d=2048, seed=0):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _episode_spec(b, k, size):
  return {
    "query_image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
    "support_images": jax.ShapeDtypeStruct((b, k, size, size, 3), jnp.float32),
    "support_masks": jax.ShapeDtypeStruct((b, k, size, size), jnp.int32),
  }


@functools.cache
def _shapes(**fields):
  model = jc2a.JC2A(**fields)
  return jax.eval_shape(lambda e: model.init(jax.random.key(0), e), _episode_spec(1, 1, 473))


def _count(tree) -> int:
  """Parameters as jc2a.md §11 counts them: the FP_base constant (params/fp_base) excluded."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sum(
    int(np.prod(x.shape)) for path, x in leaves if "fp_base" not in jax.tree_util.keystr(path)
  )


def _block_importance(mask, m):
  """Eq. 6 with fss_jax.ops.windows: [B, H, W] -> [B, n_b] coverage of the zero-padded blocks."""
  return windows.window_mean(windows.pad_to_windows(mask[..., None], m), m)[..., 0]


def _block_tokens(x, m):
  return windows.window_partition(windows.pad_to_windows(x, m), m)


# ---------------------------------------------------------------------------
# P2B block selection vs a direct numpy implementation
# ---------------------------------------------------------------------------


def _np_blocks(mask, m):
  """numpy: pad bottom/right, m×m blocks in raster order, coverage, stable descending order."""
  b, h, w = mask.shape
  hp, wp = -(-h // m) * m, -(-w // m) * m
  padded = np.zeros((b, hp, wp), mask.dtype)
  padded[:, :h, :w] = mask
  imp = np.zeros((b, (hp // m) * (wp // m)), np.float64)
  for i in range(imp.shape[1]):
    r, c = divmod(i, wp // m)
    imp[:, i] = padded[:, r * m : (r + 1) * m, c * m : (c + 1) * m].sum((1, 2)) / (m * m)
  order = np.stack([np.argsort(-imp[j], kind="stable") for j in range(b)])
  return imp, order


@pytest.mark.parametrize("side,k", [(60, 60), (30, 20), (15, 5), (8, 3), (11, 4)])
def test_block_selection_equals_numpy(side, k):
  rng = np.random.default_rng(side)
  # Sparse masks (many zero-coverage ties), a dense one, an empty one and a full one.
  masks = [(rng.random((side, side)) < p).astype(np.float32) for p in (0.02, 0.1, 0.6)]
  masks += [np.zeros((side, side), np.float32), np.ones((side, side), np.float32)]
  mask = np.stack(masks)
  imp_np, order_np = _np_blocks(mask, 3)
  imp = np.asarray(_block_importance(jnp.asarray(mask), 3))
  np.testing.assert_allclose(imp, imp_np, rtol=1e-6, atol=0)
  idx = np.asarray(windows.top_windows(jnp.asarray(imp_np.astype(np.float32)), k))
  np.testing.assert_array_equal(idx, order_np[:, :k])
  # Ties at zero coverage (empty mask): the lowest block indices, in order.
  np.testing.assert_array_equal(idx[3], np.arange(k))
  # The gathered blocks are the masked support values of those blocks.
  feat = rng.standard_normal((5, side, side, 2)).astype(np.float32)
  got = np.asarray(windows.gather_windows(_block_tokens(jnp.asarray(feat), 3), jnp.asarray(idx)))
  hp = -(-side // 3) * 3
  pad = np.zeros((5, hp, hp, 2), np.float32)
  pad[:, :side, :side] = feat
  for bi in range(5):
    for j, blk in enumerate(idx[bi]):
      r, c = divmod(int(blk), hp // 3)
      want = pad[bi, r * 3 : (r + 1) * 3, c * 3 : (c + 1) * 3].reshape(9, 2)
      np.testing.assert_array_equal(got[bi, j], want)


def test_block_selection_ties_are_stable_for_soft_masks():
  imp = jnp.asarray([[0.5, 1.0, 0.5, 0.0, 1.0, 0.5]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(windows.top_windows(imp, 4)), [[1, 4, 0, 2]])
  # k beyond the number of blocks is clipped.
  assert windows.top_windows(imp, 60).shape == (1, 6)


# ---------------------------------------------------------------------------
# HPAM (Eq. 3, 4, 9, 10) and CKMM (Eq. 13) against direct numpy formulas
# ---------------------------------------------------------------------------


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def test_hpam_equals_direct_formulas():
  rng = np.random.default_rng(0)
  b, s, c, k = 2, 7, 8, 4
  q = rng.standard_normal((b, s, s, c)).astype(np.float32)
  m = (rng.random((b, s, s)) < 0.3).astype(np.float32)
  sp = rng.standard_normal((b, s, s, c)).astype(np.float32) * m[..., None]
  hpam = linear.HPAM(dim=c, top_k=(k,), block_size=3)
  variables = hpam.init(jax.random.key(1), [q], [sp], [m])
  got = np.asarray(hpam.apply(variables, [q], [sp], [m])[0])
  p = jax.tree.map(np.asarray, variables["params"])
  wq, wk, wv = (p["attn"][n]["kernel"] for n in ("w_q", "w_k", "w_v"))
  pq, ps = p["pos_q_0"], p["pos_s_0"]
  assert pq.shape == ps.shape == (s, s)
  want = np.zeros((b, s * s, c))
  _, order = _np_blocks(m, 3)
  for i in range(b):
    # P2P: ReLU(Q) (softmax_positions(K)ᵀ V).
    xq, xs = q[i].reshape(-1, c), sp[i].reshape(-1, c)
    pd = np.maximum(xq @ wq, 0) @ (_softmax(xs @ wk, 0).T @ (xs @ wv))
    # P2B: position embeddings, top-k 3×3 blocks, per-offset softmax over blocks, mean.
    qp = (q[i] + pq[..., None]).reshape(-1, c)
    spp = np.zeros((9, 9, c), np.float32)
    spp[:s, :s] = sp[i] + ps[..., None]
    blocks = np.stack(
      [
        spp[(t // 3) * 3 : (t // 3) * 3 + 3, (t % 3) * 3 : (t % 3) * 3 + 3].reshape(9, c)
        for t in order[i, :k]
      ]
    )  # [k, 9, c]
    ctx = sum(_softmax(blocks[:, j] @ wk, 0).T @ (blocks[:, j] @ wv) for j in range(9)) / 9
    ps_ = np.maximum(qp @ wq, 0) @ ctx
    want[i] = pd + ps_
  np.testing.assert_allclose(got.reshape(b, -1, c), want, rtol=2e-4, atol=2e-5)


def test_ckmm_prior_equals_formula():
  rng = np.random.default_rng(2)
  feat = np.maximum(rng.standard_normal((2, 5, 6, 16)), 0).astype(np.float32)
  fp = rng.standard_normal((3, 16)).astype(np.float32)
  got = np.asarray(similarity.ckmm_prior(jnp.asarray(feat), jnp.asarray(fp)))
  cos = np.einsum("bhwd,nd->bhwn", feat, fp) / (
    np.linalg.norm(feat, axis=-1, keepdims=True) * np.linalg.norm(fp, axis=-1) + 1e-7
  )
  raw = cos.mean(-1, keepdims=True)
  lo, hi = raw.min((1, 2), keepdims=True), raw.max((1, 2), keepdims=True)
  np.testing.assert_allclose(got, (raw - lo) / (hi - lo + 1e-7), rtol=1e-5, atol=1e-6)
  assert got.shape == (2, 5, 6, 1) and got.min() >= 0 and got.max() <= 1
  dot = np.asarray(
    similarity.ckmm_prior(jnp.asarray(feat), jnp.asarray(fp), similarity="dot", minmax=False)
  )
  np.testing.assert_allclose(
    dot, np.einsum("bhwd,nd->bhwn", feat, fp).mean(-1, keepdims=True), rtol=1e-5, atol=1e-4
  )


def test_shot_fusion_averages_probabilities():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2 * 5, 4, 4, 2)).astype(np.float32)
  fused = np.asarray(jc2a.JC2A()._fuse_shots(jnp.asarray(logits), 2, 5))
  probs = _softmax(logits, -1).reshape(2, 5, 4, 4, 2).mean(1)
  np.testing.assert_allclose(np.exp(fused), probs, rtol=1e-5, atol=1e-6)
  mean = np.asarray(jc2a.JC2A(shot_fusion="logit")._fuse_shots(jnp.asarray(logits), 2, 5))
  np.testing.assert_allclose(mean, logits.reshape(2, 5, 4, 4, 2).mean(1), rtol=1e-6)


# ---------------------------------------------------------------------------
# Parameter counts (jc2a.md §11) via eval_shape — no compute at 473
# ---------------------------------------------------------------------------


def test_full_model_parameter_count():
  v = _shapes()
  assert _count(v["params"]["backbone"]) == BACKBONE_R50
  assert _count(v["params"]) == FULL_R50
  assert _count(v["params"]["hpam"]) == QKV + POS_EMBED
  # FP_base: a frozen parameter (checkpointed, never optimised), not counted above.
  assert v["params"]["fp_base"].shape == (N_BASE, 2048)
  assert "fp_base" not in _shapes(use_ckmm=False)["params"]
  assert _count(_shapes(layers=101)["params"]) == FULL_R101


# Table 3 rows (34.45 / 34.91 / 34.92 / 34.92 / 34.45 / 34.92 M in jc2a.md §11).
TABLE3 = [
  (dict(use_p2p=False, use_p2b=False, use_ckmm=False), 34_447_818),  # baseline: init_merge 512 in
  (dict(use_p2b=False, use_ckmm=False), 34_906_570),  # + P2P: + QKV, 768 in
  (dict(use_p2p=False, use_ckmm=False), 34_916_148),  # + P2B: + QKV + PE
  (dict(use_ckmm=False), 34_916_148),  # + P2P + P2B (shared W)
  (dict(use_p2p=False, use_p2b=False), 34_448_842),  # + CKMM: 513 in
  (dict(), FULL_R50),
]
# Table 4 / 6 rows.
OTHERS = [
  (dict(pos_embed="none"), FULL_R50 - POS_EMBED),  # ours w/o PE
  (dict(alignment="softmax"), FULL_R50),
  (dict(alignment="cosine"), FULL_R50),
  (dict(alignment="linear"), FULL_R50 + 2 * 256),  # Φ = BatchNorm
  (dict(hpam_fusion="concat"), FULL_R50 + 4 * 256 * 256),  # init_merge 1025 in
  (dict(mia_fusion="add"), FULL_R50 - 4 * 256),  # init_merge 768 in
  (dict(share_projections=False), FULL_R50 + QKV),
]


@pytest.mark.parametrize(
  "fields,expected", TABLE3 + OTHERS, ids=[str(f) for f, _ in TABLE3 + OTHERS]
)
def test_ablation_parameter_counts(fields, expected):
  assert _count(_shapes(**fields)["params"]) == expected


@pytest.mark.parametrize("shot", [1, 5])
def test_shapes_at_473(shot):
  model = jc2a.JC2A(shot=shot)
  spec = _episode_spec(2, shot, 473)
  variables = _shapes()
  out = jax.eval_shape(lambda v, e: model.apply(v, e), variables, spec)
  assert out["logits"].shape == (2, 473, 473, 2)
  assert [a.shape for a in out["aux"]] == [(2, s, s, 2) for s in (60, 30, 15, 8)]
  assert out["prior"].shape == (2, 60, 60, 1)
  # Training mode (dropout) traces as well.
  out = jax.eval_shape(
    lambda v, e: model.apply(v, e, train=True, rngs={"dropout": jax.random.key(0)}), variables, spec
  )
  assert out["logits"].shape == (2, 473, 473, 2)


def test_loss_is_pfenet_main_plus_mean_aux():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 2, (2, 16, 16)).astype(np.int32)
  y[0, :3] = 255
  outputs = {
    "logits": jnp.asarray(rng.standard_normal((2, 16, 16, 2)), jnp.float32),
    "aux": tuple(jnp.asarray(rng.standard_normal((2, s, s, 2)), jnp.float32) for s in (8, 4)),
  }
  loss, metrics = jc2a.loss_fn(outputs, {"query_mask": jnp.asarray(y)})
  from fss_jax.ops.losses import cross_entropy
  from fss_jax.ops.resize import resize_bilinear

  aux = [cross_entropy(resize_bilinear(a, (16, 16), align_corners=True), y) for a in outputs["aux"]]
  want = cross_entropy(outputs["logits"], y) + (aux[0] + aux[1]) / 2
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  assert set(metrics) == {"loss", "main_loss", "aux_loss"}


# ---------------------------------------------------------------------------
# FP_base file, factory, key map, config
# ---------------------------------------------------------------------------


def _config(data_dir, arg: str = ""):
  from configs import jc2a as cfg

  c = cfg.get_config(arg or None)
  c.data.data_dir = str(data_dir)
  return c


def test_missing_fp_base_names_the_command(tmp_path):
  with pytest.raises(jc2a_prior.FPBaseMissingError, match="python -m fss_jax.train.jc2a_prior"):
    jc2a.SPEC.derived_params_fn()(_config(tmp_path, "fold=2"))
  # The model reads no file: FP_base is a (zero-initialised) parameter the checkpoint carries.
  assert jc2a.make_model().num_base_classes == N_BASE
  # Without CKMM no file is needed and nothing is derived.
  assert jc2a.SPEC.derived_params_fn()(_config(tmp_path, "fold=2,variant=p2p_p2b")) == {}


def test_fp_base_round_trip_and_no_overwrite(tmp_path):
  from fss_jax.data import splits

  path = jc2a_prior.fp_base_path(tmp_path, "pascal5i", 1, 50)
  fp = jc2a_prior.FPBase(
    _fp(),
    classes=splits.fold_classes("pascal5i", 1).base,
    counts=np.arange(15),
    meta={"fold": 1, "layers": 50},
  )
  jc2a_prior.save_fp_base(path, fp)
  with pytest.raises(FileExistsError):
    jc2a_prior.save_fp_base(path, fp)
  derived = jc2a.SPEC.derived_params_fn()(_config(tmp_path, "fold=1"))
  assert set(derived) == {"fp_base"}
  np.testing.assert_array_equal(derived["fp_base"], fp.value)
  assert jc2a_prior.load_fp_base(path).classes == fp.classes
  # A file of another depth, fold or row count is refused, naming what differs.
  jc2a_prior.save_fp_base(jc2a_prior.fp_base_path(tmp_path, "pascal5i", 1, 101), fp)
  with pytest.raises(ValueError, match="ResNet-50"):
    jc2a.SPEC.derived_params_fn()(_config(tmp_path, "fold=1,layers=101"))
  jc2a_prior.save_fp_base(jc2a_prior.fp_base_path(tmp_path, "pascal5i", 2, 50), fp)
  with pytest.raises(ValueError, match="fold 1, not fold 2"):
    jc2a.SPEC.derived_params_fn()(_config(tmp_path, "fold=2"))
  c = _config(tmp_path, "fold=1")
  c.model_fields.num_base_classes = 16
  with pytest.raises(ValueError, match="num_base_classes=16"):
    jc2a.SPEC.derived_params_fn()(c)
  hash(jc2a.make_model())  # fields only: the module stays hashable
  with pytest.raises(TypeError, match="no field"):
    jc2a.make_model(use_ckmm=False, nonsense=1)


def test_backbone_keymaps_cover_the_backbone():
  from fss_jax import keymaps as km

  params = _shapes(use_p2p=False, use_p2b=False, use_ckmm=False)
  want = {("params", "backbone", *k) for k in _paths(params["params"]["backbone"])}
  want |= {("batch_stats", "backbone", *k) for k in _paths(params["batch_stats"]["backbone"])}
  for source in jc2a.BACKBONE_SOURCES:
    rules = [r for r in jc2a.keymap(source=source, dst=("backbone",)) if isinstance(r, km.Rule)]
    assert {r.dst for r in rules} == want, source
    bare = {r.dst for r in jc2a.keymap(source=source) if isinstance(r, km.Rule)}
    assert bare == {(d[0], *d[2:]) for d in want}
  with pytest.raises(ValueError, match="backbone source"):
    jc2a.keymap(source="nope")


def _paths(tree):
  return [tuple(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_spec_and_configs():
  from fss_jax.models import registry

  spec = registry.get("jc2a")
  assert spec.frozen == (r"backbone/.*|fp_base",)
  assert spec.derived_params_fn() is jc2a_prior.fp_base_params
  assert spec.loss_fn is jc2a.loss_fn
  from configs import jc2a as cfg

  c = cfg.get_config("dataset=coco,fold=3,layers=101")
  assert (c.dataset, c.fold, c.batch_size, c.data.train_size, c.optim.lr) == (
    "coco20i",
    3,
    4,
    473,
    2.5e-3,
  )
  assert c.model_fields.layers == 101 and c.model_fields.num_base_classes == 60
  assert c.epochs == 50 and c.data.protocol == "pfenet"
  fields = c.model_fields.to_dict()
  for variant, (p2p, p2b, ckmm) in cfg.VARIANTS.items():
    f = cfg.get_config(f"variant={variant}").model_fields
    assert (f.use_p2p, f.use_p2b, f.use_ckmm) == (p2p, p2b, ckmm)
  f = cfg.get_config("align=cosine,pe=false,hpam_fusion=concat,mia_fusion=add").model_fields
  assert (f.alignment, f.pos_embed, f.hpam_fusion, f.mia_fusion) == (
    "cosine",
    "none",
    "concat",
    "add",
  )
  assert cfg.get_config("pfenet_lr=false").optim.lr_mults == ()
  # Every model field is a JC2A field; no path is a model field (checkpoints stay portable).
  names = {f.name for f in jc2a.dataclasses.fields(jc2a.JC2A)}
  assert set(fields) <= names
  with pytest.raises(ValueError, match="variant"):
    cfg.get_config("variant=nope")
  smoke = cfg.get_config("smoke")
  assert smoke.smoke and smoke.model_fields.pyramid_bins == (1.0, 0.5, 0.25, 0.125)


# ---------------------------------------------------------------------------
# The FP_base command and a training run through fss_jax.main (synthetic data)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voc_with_prior(tmp_path_factory):
  """A synthetic PASCAL build plus the fold-0 FP_base written by the prior command."""
  from data_prep import synthetic

  data_dir = synthetic.make_built_dataset(tmp_path_factory.mktemp("jc2a_voc"), "voc", 24, 0)
  argv = [
    "--data_dir",
    str(data_dir),
    "--dataset",
    "pascal",
    "--fold",
    "0",
    "--random_init",
    "--size",
    "65",
    "--batch_size",
    "4",
  ]
  assert jc2a_prior.main(argv) == 0
  assert jc2a_prior.main(argv) == 1  # an existing file is never replaced silently
  return data_dir


@pytest.mark.slow
def test_prior_command_equals_direct_wgap(voc_with_prior):
  from fss_jax.data import source, splits, transforms
  from fss_jax.nn.backbones.resnet import ResNetDeepStem
  from fss_jax.ops.resize import resize_bilinear

  fp = jc2a_prior.load_fp_base(jc2a_prior.fp_base_path(voc_with_prior, "pascal5i", 0, 50))
  assert fp.classes == splits.fold_classes("pascal5i", 0).base and fp.value.shape == (15, 2048)
  assert fp.meta["backbone"] == "random" and fp.counts.sum() > 0
  src = source.open_split(voc_with_prior, "pascal5i", "train")
  lists = splits.fold_lists(src.index, "pascal5i", 0, "train", protocol="pfenet")
  net = ResNetDeepStem(depth=50)
  variables = jc2a_prior.random_backbone(50)
  layer4 = jax.jit(lambda x: net.apply(variables, x)["layer4"])
  cache = {}

  def feature(p):  # layer4 and the resized label of record p, once per image
    if p not in cache:
      ex = src[int(p)]
      im, (lb,) = transforms.AspectResizePad(size=65).apply(
        ex["image"].astype(np.float32), [ex["label"]]
      )
      im, _ = transforms.Normalize().apply(im, [])
      cache[p] = np.asarray(layer4(im[None]))[0], lb
    return cache[p]

  want = np.zeros((15, 2048))
  for j, c in enumerate(fp.classes):
    pos = lists.support_positions[c]
    assert fp.counts[j] == len(pos)
    for p in pos:
      f, lb = feature(int(p))
      msk = np.asarray(
        resize_bilinear(
          jnp.asarray(lb == c, jnp.float32)[None, ..., None], f.shape[:2], align_corners=True
        )
      )[0]
      want[j] += (f * msk).sum((0, 1)) / (msk.sum() + 5e-4) / len(pos)
  np.testing.assert_allclose(fp.value, want, rtol=2e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


REPO = pathlib.Path(__file__).resolve().parents[1]


# A random backbone gives badly scaled features: Adam keeps 16 steps stable.
ADAM = ("--config.optim.optimizer=adamw", "--config.optim.lr=1e-3", "--config.optim.weight_decay=0")


def _main(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  return subprocess.run(
    [sys.executable, "-m", "fss_jax.main", "--config", "configs/jc2a.py:smoke", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.fixture(scope="module")
def trained(voc_with_prior, tmp_path_factory):
  """(summary, workdir) of a 16-step smoke run through fss_jax.main (one CPU device)."""
  workdir = tmp_path_factory.mktemp("jc2a_run") / "run"
  run = _main(
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={voc_with_prior}",
    "--config.total_steps=16",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=100",
    *ADAM,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1]), workdir


@pytest.mark.slow
def test_training_run_through_main_lowers_the_loss(trained):
  summary, _ = trained
  losses = [h["loss"] for h in summary["history"]]
  assert summary["step"] == 16 and len(losses) == 16 and np.all(np.isfinite(losses))
  assert np.mean(losses[-6:]) < 0.8 * losses[0], losses
  assert {"main_loss", "aux_loss"} <= set(summary["history"][0])


@pytest.mark.slow
def test_checkpoint_carries_fp_base_for_eval_and_predict(
  trained, voc_with_prior, tmp_path, monkeypatch
):
  """FP_base is set from the file when training starts, then lives in the checkpoint: the
  workdir evaluates on a moved copy of the dataset without the file, and predicts."""
  from fss_jax import predict
  from fss_jax.train import state as state_lib

  _, workdir = trained
  fp = jc2a_prior.load_fp_base(jc2a_prior.fp_base_path(voc_with_prior, "pascal5i", 0, 50))
  saved = state_lib.read_variables(workdir / "checkpoints" / "16" / "state")
  np.testing.assert_array_equal(saved["params"]["fp_base"], fp.value)  # frozen: never updated
  # The dataset moved, without its FP_base file: evaluation reads the checkpoint only.
  moved = tmp_path / "moved"
  shutil.copytree(voc_with_prior, moved, ignore=shutil.ignore_patterns("jc2a_fp_base_*"))
  assert not list(moved.rglob("jc2a_fp_base_*"))
  run = _main(
    "--workdir",
    str(workdir),
    "--mode",
    "eval",
    f"--config.data.data_dir={moved}",
    "--config.eval.checkpoint=latest",
    *ADAM,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert np.isfinite(summary["miou_mean"]), summary

  # predict: no dataset at all (reading an FP_base file would fail).
  def no_file(*_, **__):
    raise AssertionError("predict read an FP_base file")

  monkeypatch.setattr(jc2a_prior, "load_fp_base", no_file)
  p = predict.Predictor(None, workdir)
  assert p.model_name == "jc2a"
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (70, 80, 3), np.uint8)
  mask = np.zeros((70, 80), np.uint8)
  mask[20:50, 25:60] = 1
  (pred,) = p.segment([image], [mask], [image])
  assert pred.mask.shape == (70, 80) and np.all(np.isfinite(pred.probability))
  _, variables, _ = p._build(1)
  np.testing.assert_array_equal(np.asarray(variables["params"]["fp_base"]), fp.value)


@pytest.mark.parametrize("source", jc2a.BACKBONE_SOURCES)
def test_backbone_conversion_loads_under_init_prefix(source):
  """A synthetic ImageNet / PSPNet state dict with every key converts and fits `backbone`."""
  from fss_jax import keymaps as km
  from fss_jax.train import state as state_lib

  target = _shapes(use_p2p=False, use_p2b=False, use_ckmm=False)
  flat = {}
  for coll in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(target[coll]["backbone"])[0]:
      flat[(coll, *(p.key for p in path))] = leaf.shape
  rng = np.random.default_rng(0)
  sd = {}
  for r in jc2a.keymap(source=source):
    if isinstance(r, km.Ignore):
      sd[r.src] = np.zeros((), np.int64) if r.src.endswith("num_batches_tracked") else np.zeros(3)
      continue
    shape = flat[r.dst]
    shape = (shape[3], shape[2], shape[0], shape[1]) if r.transform == "conv" else shape
    sd[r.src] = rng.standard_normal(shape).astype(np.float32)
  variables = km.convert(sd, jc2a.keymap(source=source), model="jc2a")
  merged = state_lib.merge_variables(target, variables, prefix="backbone")
  k = np.asarray(merged["params"]["backbone"]["layer1_0"]["conv1"]["kernel"])
  src = "layer1.0.conv1.weight"
  np.testing.assert_array_equal(k, sd[src].transpose(2, 3, 1, 0))


def test_pfenet_keymap_covers_the_reusable_parts():
  from fss_jax import keymaps as km

  target = _shapes(use_p2p=False, use_p2b=False, use_ckmm=False)
  have = {("params", *k) for k in _paths(target["params"])}
  have |= {("batch_stats", *k) for k in _paths(target["batch_stats"])}
  reusable = {p for p in have if not p[1].startswith("init_merge")}
  got = {r.dst for r in jc2a.pfenet_keymap() if isinstance(r, km.Rule)}
  assert got == reusable
