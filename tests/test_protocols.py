"""Issue 19: protocol presets (resolved fields, one-field overrides), HSNet scoring and episode
draws against the reference rules, K-shot testing of a 1-shot model end to end."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from fss_jax.data import episodes
from fss_jax.eval import metrics, protocol
from fss_jax.models import registry
from fss_jax.ops import losses

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(path: str, arg: str = "") -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("_cfg", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


# -- presets -------------------------------------------------------------------------------------

PFENET_BAM_SCCAN_PASCAL = dict(
  name="pfenet_bam",
  test_size=473,
  test_resize="aspect",
  score="original",
  ignore_255=True,
  novel_filter=True,
  class_split="interleaved",
  episode_rule="pfenet",
  lists="build",
  episodes=1000,
  seeds=[321],
  seed_rule="per_episode",
)
HSNET_PASCAL = dict(
  name="hsnet",
  test_size=400,
  test_resize="squash",
  score="input",
  ignore_255=True,
  novel_filter=False,
  class_split="interleaved",
  episode_rule="hsnet",
  lists="build",
  episodes=1000,
  seeds=[0],
  seed_rule="sequential",
)


def test_presets_resolve_to_the_documented_fields():
  c = _config("configs/sccan.py")
  assert protocol.resolve(c) == PFENET_BAM_SCCAN_PASCAL
  c.protocol = "hsnet"
  assert protocol.resolve(c) == HSNET_PASCAL
  c.protocol = "patnet_cd"
  assert protocol.resolve(c) == {**HSNET_PASCAL, "name": "patnet_cd"}  # PASCAL: HSNet's loader
  # HSNet COCO maps 255 to background (coco.py:92-93); PATNet's cross-domain sets are binarised.
  coco = _config("configs/sccan.py", "dataset=coco")
  assert protocol.PRESETS["hsnet"](coco, "coco20i")["ignore_255"] is False
  assert protocol.PRESETS["patnet_cd"](c, "isic2018") == {
    **{k: v for k, v in HSNET_PASCAL.items() if k != "name"},
    "seeds": (0,),
    "ignore_255": False,
    "episodes": 600,
  }
  assert protocol.PRESETS["patnet_cd"](c, "fss1000")["episodes"] == 0  # every test image
  # The HDMNet config's own departures stay the pfenet_bam values of that method.
  h = protocol.resolve(_config("configs/hdmnet.py", "dataset=coco"))
  assert (h["test_size"], h["test_resize"], h["episodes"], len(h["seeds"])) == (
    633,
    "squash",
    10000,
    10,
  )


def test_one_overridden_field_wins_and_apply_writes_the_loop_fields():
  c = _config("configs/sccan.py")
  c.protocol = "hsnet"
  c.protocol_fields.ignore_255 = False
  r = protocol.resolve(c)
  assert r == {**HSNET_PASCAL, "ignore_255": False}
  applied = protocol.apply(c)
  assert (
    applied.data.test_size,
    applied.data.test_resize,
    applied.data.protocol,
    applied.eval.episodes,
    applied.eval.seeds,
  ) == (400, "squash", "pfenet", 1000, (0,))
  assert protocol.resolve(applied) == r and protocol.resolve(protocol.apply(applied)) == r
  assert protocol.scoring(applied) == metrics.Scoring("input", size=400, ignore_255=False)
  assert protocol.episode_kwargs(applied) == {
    "rule": "hsnet",
    "seed_rule": "sequential",
    "lists": "build",
  }
  assert protocol.episodes_tag(applied) == "_hsnet-seq"
  assert protocol.results_tag(applied).startswith("_hsnet-")  # preset + a hash of the override
  assert protocol.results_tag(_config("configs/sccan.py")) == ""  # the default keeps today's names
  # The method config's own field still counts under pfenet_bam.
  d = _config("configs/sccan.py")
  d.data.test_size = 417
  assert protocol.resolve(d)["test_size"] == 417
  with pytest.raises(
    ValueError, match="unknown protocol 'hsn'; use one of pfenet_bam, hsnet, patnet_cd"
  ):
    d.protocol = "hsn"
    protocol.resolve(d)
  d.protocol, d.protocol_fields.score = "pfenet_bam", "input"
  with pytest.raises(ValueError, match="score='input'.*squash"):
    protocol.resolve(d)


def test_eval_shot_is_checked_against_the_model():
  hdm = _config("configs/hdmnet.py", "smoke")
  hdm.eval.shot = 5
  with pytest.raises(ValueError, match=r"^model hdmnet trained 1-shot evaluates at K = 1 only"):
    protocol.eval_config(hdm, registry.ModelSpec("hdmnet", None, None))  # the default: training K
  sccan = _config("configs/sccan.py", "smoke")
  sccan.eval.shot = 5
  e = protocol.eval_config(sccan, registry.ModelSpec("sccan", None, None, any_shot=True))
  assert (e.shot, e.model_fields.shot, sccan.shot, sccan.model_fields.shot) == (5, 5, 1, 1)
  panet = _config("configs/panet.py", "smoke")
  panet.eval.way = 2
  e = protocol.eval_config(
    panet,
    registry.ModelSpec(
      "panet", None, None, any_shot=True, any_way=True, shot_field="shots", way_field="ways"
    ),
  )
  assert (e.way, e.model_fields.ways, e.model_fields.shots) == (2, 2, 1)


# -- HSNet scoring and episodes against the reference code ---------------------------------------


def _hsnet_counts(logits: np.ndarray, label: np.ndarray, size: int, ignore: bool):
  """hsnet: query mask -> S×S nearest (data/pascal.py:38-40), logits -> S×S bilinear
  align_corners (model/hsnet.py), Evaluator.classify_prediction (common/evaluation.py)."""
  import torch
  import torch.nn.functional as F

  lab = F.interpolate(
    torch.tensor(label, dtype=torch.float32)[None, None], (size, size), mode="nearest"
  )[0, 0]
  lg = F.interpolate(
    torch.tensor(logits).permute(2, 0, 1)[None], (size, size), mode="bilinear", align_corners=True
  )[0]
  pred = lg.argmax(0).float()
  boundary = (lab / 255).floor()
  gt = lab.clone()
  gt[gt != 1] = 0
  if ignore:
    gt = gt + boundary * 255
    pred[gt == 255] = 255
  inter = pred[pred == gt]
  hist = lambda x: torch.histc(x, bins=2, min=0, max=1).numpy()
  i, p, t = hist(inter), hist(pred), hist(gt)
  return i, p + t - i


@pytest.mark.parametrize("ignore", [True, False])
def test_input_scoring_matches_hsnet(ignore):
  rng = np.random.default_rng(0)
  sizes = [(23, 31), (37, 19)]
  hb = wb = 40
  labels = np.full((2, hb, wb), 255, np.int32)
  for b, (h, w) in enumerate(sizes):
    lab = (rng.random((h, w)) < 0.4).astype(np.int32)
    lab[rng.random((h, w)) < 0.1] = 255
    labels[b, :h, :w] = lab
  logits = rng.standard_normal((2, 9, 9, 2)).astype(np.float32)
  out = metrics.episode_counts(
    jnp.asarray(logits),
    jnp.asarray(labels),
    jnp.asarray(sizes),
    score=metrics.Scoring("input", size=29, ignore_255=ignore),
  )
  for b, (h, w) in enumerate(sizes):
    i, u = _hsnet_counts(logits[b], labels[b, :h, :w], 29, ignore)
    np.testing.assert_array_equal(np.asarray(out["intersection"][b]), i)
    np.testing.assert_array_equal(np.asarray(out["union"][b]), u)


class _Index:
  def __init__(self, ids):
    self.image_ids = np.asarray(ids)


def _hsnet_reference_pascal(entries, shot, n):
  """hsnet data/pascal.py:32-34 + 96-105 after test.py:20 fix_randseed(0): global numpy state."""
  classwise = {}
  for name, c in entries:
    classwise.setdefault(c, []).append(name)
  np.random.seed(0)
  out = []
  for idx in range(n):
    name, c = entries[idx % len(entries)]
    supports = []
    while True:
      s = np.random.choice(classwise[c], 1, replace=False)[0]
      if name != s:
        supports.append(s)
      if len(supports) == shot:
        break
    out.append({"query": name, "supports": supports, "class_id": c})
  return out


def _hsnet_reference_coco(classwise, classes, shot, n):
  """hsnet data/coco.py:84-99 (class, then query, then supports) after fix_randseed(0)."""
  np.random.seed(0)
  out = []
  for _ in range(n):
    c = np.random.choice(classes, 1, replace=False)[0]
    q = np.random.choice(classwise[c], 1, replace=False)[0]
    supports = []
    while True:
      s = np.random.choice(classwise[c], 1, replace=False)[0]
      if q != s:
        supports.append(s)
      if len(supports) == shot:
        break
    out.append({"query": q, "supports": supports, "class_id": int(c)})
  return out


def test_hsnet_rule_draws_hsnets_episodes_from_its_list_files(tmp_path):
  rng = np.random.default_rng(1)
  ids = [f"2008_{i:06d}" for i in range(30)]
  entries = sorted(
    {(ids[i], int(c)) for i, c in zip(rng.integers(0, 30, 40), rng.integers(6, 11, 40))}
  )
  (tmp_path / "pascal" / "val").mkdir(parents=True)
  (tmp_path / "pascal" / "val" / "fold1.txt").write_text(
    "".join(f"{n}__{c:02d}\n" for n, c in entries)
  )
  got = episodes.generate(
    _Index(ids),
    "pascal5i",
    1,
    "test",
    shot=3,
    num_episodes=50,
    seed=0,
    rule="hsnet",
    seed_rule="sequential",
    lists=str(tmp_path),
  )
  assert got == _hsnet_reference_pascal(entries, 3, 50)

  coco_ids = [f"COCO_val2014_{i:012d}" for i in range(40)]
  classes = [2 + 4 * v + 1 for v in range(20)]  # fold 2 (coco.py:62), 1-based
  classwise = {c: rng.choice(coco_ids, 3, replace=False).tolist() for c in classes}
  import pickle

  (tmp_path / "coco" / "val").mkdir(parents=True)
  with open(tmp_path / "coco" / "val" / "fold2.pkl", "wb") as f:
    pickle.dump({c - 1: [f"val2014/{n}.jpg" for n in v] for c, v in classwise.items()}, f)
  got = episodes.generate(
    _Index(coco_ids),
    "coco20i",
    2,
    "test",
    shot=2,
    num_episodes=30,
    seed=0,
    rule="hsnet",
    seed_rule="sequential",
    lists=str(tmp_path),
  )
  assert got == _hsnet_reference_coco(classwise, classes, 2, 30)


def _patnet_reference(rows, shot, n, *, every_image):
  """PATNet after test.py:18 fix_randseed(0): deepglobe.py:79-88 (class idx % n, query, supports)
  or fss.py:81-94 (query = image idx, supports = choice(range(1, 11)) in the query's folder)."""
  np.random.seed(0)
  classes = sorted({c for _, c in rows})
  classwise = {c: [i for i, k in rows if k == c] for c in classes}
  out = []
  for idx in range(n):
    if every_image:
      q, c = rows[idx]
      draw = lambda: f"{q.rsplit('/', 1)[0]}/{np.random.choice(range(1, 11), 1, replace=False)[0]}"  # noqa: B023
    else:
      c = classes[idx % len(classes)]
      q = np.random.choice(classwise[c], 1, replace=False)[0]
      draw = lambda: np.random.choice(classwise[c], 1, replace=False)[0]  # noqa: B023
    supports = []
    while len(supports) < shot:
      s = str(draw())
      if s != q:
        supports.append(s)
    out.append({"query": str(q), "supports": supports, "class_id": int(c)})
  return out


def test_hsnet_rule_draws_patnets_cross_domain_episodes(tmp_path):
  import glob

  from data_prep import build, synthetic
  from fss_jax.data import source, splits

  jpgs = lambda pattern: [pathlib.Path(p) for p in sorted(glob.glob(pattern)) if p.endswith(".jpg")]
  for dataset in ("deepglobe", "fss1000"):
    raw = synthetic.write_cross_domain(tmp_path / dataset, dataset, seed=3)
    build.build(dataset, raw, tmp_path / dataset / "tfds", progress=False)
    index = source.open_split(tmp_path / dataset / "tfds", dataset, "test").index
    if dataset == "deepglobe":  # PATNet reads class folders 1..6 (deepglobe.py:21, 109)
      rows = [
        (f"{k}/{p.stem}", k)
        for k in range(1, 7)
        for p in jpgs(f"{raw}/Deepglobe/{k}/test/origin/*")
      ]
      n = 40
    else:  # sorted test classes, sorted files (fss.py:24, 110)
      names = splits.cross_domain("fss1000").class_names
      rows = [
        (f"{cat}/{p.stem}", names.index(cat) + 1)
        for cat in splits.fss1000_split_classes("test")
        for p in jpgs(f"{raw}/FSS-1000/{cat}/*")
      ]
      n = len(rows)
    got = episodes.generate(
      index,
      dataset,
      0,
      "test",
      shot=3,
      num_episodes=0 if dataset == "fss1000" else n,
      seed=0,
      rule="hsnet",
      seed_rule="sequential",
    )
    assert got == _patnet_reference(rows, 3, n, every_image=dataset == "fss1000"), dataset


# -- K-shot testing of a 1-shot model, end to end ---------------------------------------------


class TinyKShot(nn.Module):
  """conv -> ReLU, masked-average prototype per shot, mean over the K shots, 1x1 head."""

  features: int = 4
  shot: int = 1

  @nn.compact
  def __call__(self, episode, *, train: bool):
    del train
    q, s = episode["query_image"], episode["support_images"]
    b, k = s.shape[:2]
    if k != self.shot:
      raise ValueError(f"built for {self.shot} shots, got {k}")
    m = (episode["support_masks"] == 1).astype(jnp.float32)[..., None]  # [B, K, H, W, 1]
    f = nn.relu(
      nn.Conv(self.features, (3, 3), name="enc")(
        jnp.concatenate([q, s.reshape(b * k, *s.shape[2:])], axis=0)
      )
    )
    fq, fs = f[:b], f[b:].reshape(b, k, *f.shape[1:])
    proto = jnp.mean(jnp.sum(fs * m, axis=(2, 3)) / (jnp.sum(m, axis=(2, 3)) + 1e-5), axis=1)
    return {
      "logits": nn.Conv(2, (1, 1), name="head")(
        jnp.concatenate([fq, fq * proto[:, None, None]], -1)
      )
    }


def _tiny_loss(outputs, episode):
  return losses.weighted_sum(
    {"ce": losses.cross_entropy(outputs["logits"], episode["query_mask"])}, {}
  )


SPEC = registry.ModelSpec(
  name="tiny_kshot", make_model=TinyKShot, keymap=lambda **kw: [], loss_fn=_tiny_loss, any_shot=True
)


def test_one_shot_model_evaluates_at_five_shots_under_hsnet(tmp_path, monkeypatch):
  from data_prep import synthetic
  from fss_jax.eval import run as eval_run
  from fss_jax.train import loop

  monkeypatch.setitem(registry._MODULES, "tiny_kshot", __name__)
  data_dir = synthetic.make_built_dataset(tmp_path / "data", "voc", num_images=32, seed=0)
  c = common.base_config(
    common.parse_arg("", dataset="pascal5i", fold=0, shot=1), model="tiny_kshot"
  )
  c.model_fields = ml_collections.ConfigDict(dict(features=4, shot=c.get_ref("shot")))
  c.data.data_dir, c.data.train_size, c.data.test_size, c.data.label_bucket = data_dir, 33, 33, 256
  c.batch_size, c.total_steps, c.eval.every_steps, c.eval.batch_size = 2, 2, 0, 2
  c.checkpoint.every_steps, c.checkpoint.async_save, c.tensorboard, c.eval.num_images = (
    2,
    False,
    False,
    0,
  )
  c.mesh.num_devices = 1
  c.lock()
  loop.train_and_evaluate(c, tmp_path / "w")

  c.protocol, c.eval.shot = "hsnet", 5
  c.protocol_fields.test_size, c.protocol_fields.episodes = 33, 6  # small, as a smoke run
  summary = eval_run.evaluate(c, tmp_path / "w")
  assert (summary["shot"], summary["train_shot"], summary["episodes_per_seed"]) == (5, 1, 6)
  assert summary["protocol"] == {**HSNET_PASCAL, "test_size": 33, "episodes": 6}
  assert set(summary["seeds"]) == {"0"} and np.isfinite(summary["miou_mean"])
  written = json.loads(eval_run.results_path(protocol.eval_config(c), tmp_path / "w").read_text())
  assert set(written["protocol"]) == {"name", *protocol.FIELDS}
  stored = episodes.read_episodes(
    next((tmp_path / "w" / "episodes").glob("*5shot_s0_n6_hsnet-seq.jsonl"))
  )
  assert len(stored) == 6 and all(len(r["supports"]) == 5 for r in stored)
