"""Grain loaders on synthetic TFDS builds: batches, sharding, resume, stored eval episodes;
the fused batch writes against the unfused chain (bit for bit); the worker count."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from data_prep import synthetic
from fss_jax.data import episodes, pipeline, source, splits
from fss_jax.data import transforms as T

CROP = 65
# Label keys: uint8 in the batches (int32 after ToArrays, the per-episode chain).
LABELS = {
  "query_mask",
  "support_masks",
  "query_base_label",
  "label_original",
  "query_base_label_original",
}


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
  return synthetic.make_built_dataset(tmp_path_factory.mktemp("pipe_voc"), "voc", 48, 0)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  return synthetic.make_built_dataset(tmp_path_factory.mktemp("pipe_coco"), "coco", 48, 0)


def _cfg(data_dir, **kw):
  kw.setdefault("train_size", CROP)
  kw.setdefault("test_size", CROP)
  kw.setdefault("read_threads", 1)
  kw.setdefault("worker_count", 0)  # in-process unless a test asks for workers
  return pipeline.EpisodeConfig(dataset=kw.pop("dataset", "pascal5i"), data_dir=data_dir, **kw)


def _take(loader, n, it=None):
  it = it or iter(loader)
  return [next(it) for _ in range(n)], it


def _test_file(data_dir, path, *, dataset="pascal5i", fold=0, n=10, seed=321):
  val = source.open_split(data_dir, dataset, "val")
  recs = episodes.generate(val.index, dataset, fold, "test", shot=1, num_episodes=n, seed=seed)
  episodes.write_episodes(path, recs)
  return val, recs


def test_train_batches(voc_dir):
  cfg = _cfg(voc_dir, fold=1, base_label=True)
  loader = pipeline.make_train_loader(cfg, global_batch_size=4)
  (b,), _ = _take(loader, 1)
  assert b["query_image"].shape == (4, CROP, CROP, 3) and b["query_image"].dtype == np.float32
  assert b["query_mask"].shape == (4, CROP, CROP) and b["query_mask"].dtype == np.uint8
  assert b["support_images"].shape == (4, 1, CROP, CROP, 3) and b["support_masks"].shape == (
    4,
    1,
    CROP,
    CROP,
  )
  assert b["class_id"].dtype == np.int32 and b["class_index"].shape == (4,)
  base = splits.fold_classes("pascal5i", 1).base
  assert loader.classes == base
  assert [base[i] for i in b["class_index"]] == b["class_id"].tolist()
  assert set(np.unique(b["query_mask"])) <= {0, 1, 255} and set(np.unique(b["support_masks"])) <= {
    0,
    1,
    255,
  }
  assert (b["support_masks"] == 1).any(axis=(1, 2, 3)).all(), "supports show their class"
  # the base label moves with the query: episode-class pixels carry the class's base number
  for q, bl, ci in zip(b["query_mask"], b["query_base_label"], b["class_index"]):
    assert (bl[q == 1] == ci + 1).all() and (bl[q == 255] == 255).all()
    assert set(np.unique(bl)) <= set(range(16)) | {255}
  # normalised padding of the (small) synthetic images is the mean colour -> 0
  assert np.abs(b["query_image"]).max() < 3
  assert loader.steps_per_epoch == loader.episodes_per_epoch // 4 and loader.num_steps is None


def test_training_episodes_show_no_novel_pixel(voc_dir):
  cfg = _cfg(voc_dir, fold=0)
  src = source.open_split(voc_dir, "pascal5i", "train")
  sampler = episodes.make_sampler(src.index, "pascal5i", 0, "train", shot=1, seed=cfg.seed)
  novel = np.asarray(splits.fold_classes("pascal5i", 0).novel)
  batches, _ = _take(pipeline.make_train_loader(cfg, global_batch_size=4), 3)
  for b in batches:
    for i, c in zip(b["episode_index"], b["class_id"]):
      ep = sampler.sample(int(i))
      assert ep.class_ids == (int(c),)
      for p in (ep.query, *ep.supports[0]):
        assert src.index.class_pixels[p][novel].sum() == 0
      assert (
        src.index.class_pixels[ep.supports[0][0]][c] >= splits.MIN_PIXELS
        and ep.query != ep.supports[0][0]
      )


def test_four_processes_get_disjoint_shards_covering_the_epoch(voc_dir):
  cfg = _cfg(voc_dir, fold=2)
  whole = pipeline.make_train_loader(cfg, global_batch_size=8)
  q = whole.episodes_per_epoch
  steps = -(-q // 8)
  ref, _ = _take(whole, steps)
  seen = []
  for p in range(4):
    shard = pipeline.make_train_loader(cfg, global_batch_size=8, shard_index=p, shard_count=4)
    assert shard.batch_size == 2
    got, _ = _take(shard, steps)
    for t in range(steps):
      seen += got[t]["episode_index"].tolist()
      for k in ref[t]:  # the same episodes as rows 2p..2p+1 of the single-process batch
        assert np.array_equal(got[t][k], ref[t][k][2 * p : 2 * p + 2]), k
  assert sorted(seen) == list(range(steps * 8)) and len(set(seen)) == len(seen)
  src = source.open_split(voc_dir, "pascal5i", "train")
  sampler = episodes.make_sampler(src.index, "pascal5i", 2, "train", shot=1, seed=cfg.seed)
  assert sorted(sampler.sample(i).query for i in range(q)) == sorted(
    sampler.query_positions.tolist()
  )
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.make_train_loader(cfg, global_batch_size=8, shard_index=0, shard_count=3)


def test_iterator_state_restores_the_same_batches(voc_dir):
  loader = pipeline.make_train_loader(_cfg(voc_dir, fold=3, seed=5), global_batch_size=2)
  _, it = _take(loader, 2)
  state = it.get_state()
  json.dumps(state)
  after, _ = _take(loader, 2, it)
  it2 = iter(loader)
  it2.set_state(state)
  again, _ = _take(loader, 2, it2)
  for a, b in zip(after, again):
    assert set(a) == set(b)
    for k in a:
      assert np.array_equal(a[k], b[k]), k
  fresh, _ = _take(loader, 1)
  assert not np.array_equal(fresh[0]["query_image"], after[0]["query_image"])


def test_num_epochs_and_squash(voc_dir):
  cfg = _cfg(voc_dir, fold=0, train_resize="squash", train_size=49)
  loader = pipeline.make_train_loader(cfg, global_batch_size=4, num_epochs=1)
  batches = list(loader)
  assert len(batches) == loader.num_steps == loader.episodes_per_epoch // 4
  assert batches[0]["query_image"].shape == (4, 49, 49, 3)


def test_eval_loader_reads_stored_episodes(voc_dir, tmp_path):
  path = tmp_path / "f0.jsonl"
  val, recs = _test_file(voc_dir, path, n=10)
  cfg = _cfg(voc_dir, fold=0, base_label=True)
  loader = pipeline.make_eval_loader(cfg, path, global_batch_size=4)
  batches = list(loader)
  assert len(batches) == loader.num_steps == 3 and loader.classes == (1, 2, 3, 4, 5)
  valid = np.concatenate([b["valid"] for b in batches])
  idx = np.concatenate([b["episode_index"] for b in batches])
  assert valid.tolist() == [1] * 10 + [0] * 2 and idx[:10].tolist() == list(range(10))
  hb = cfg.bucket[0]
  b = batches[0]
  assert b["query_image"].shape == (4, CROP, CROP, 3) and b["label_original"].shape == (4, hb, hb)
  for i in range(4):
    r = recs[i]
    item = val[val.id_to_position(r["query"])]
    want = np.where(item["label"] == r["class_id"], 1, 0)
    want[item["label"] == 255] = 255
    h, w = item["label"].shape
    assert b["label_size"][i].tolist() == [h, w]
    assert np.array_equal(b["label_original"][i, :h, :w], want)
    assert (b["label_original"][i, h:] == 255).all() and (
      b["label_original"][i, :, w:] == 255
    ).all()
    assert b["class_id"][i] == r["class_id"] and b["class_index"][i] == r["class_id"] - 1
    # §9.1: content top-left, 255 label canvas elsewhere
    nh, nw = pipeline.T.aspect_size(h, w, CROP)
    assert (b["query_mask"][i, nh:] == 255).all() and (b["query_mask"][i, :, nw:] == 255).all()
    assert "query_base_label_original" in b
  # two processes: disjoint valid episodes covering the file
  seen = []
  for p in range(2):
    for bb in pipeline.make_eval_loader(
      cfg, path, global_batch_size=4, shard_index=p, shard_count=2
    ):
      seen += bb["episode_index"][bb["valid"] == 1].tolist()
  assert sorted(seen) == list(range(10))


def test_eval_loader_errors(voc_dir, tmp_path):
  path = tmp_path / "f0.jsonl"
  _, recs = _test_file(voc_dir, path, n=3)
  with pytest.raises(ValueError, match="not one of this fold's classes"):
    pipeline.make_eval_loader(_cfg(voc_dir, fold=1), path, global_batch_size=1)
  with pytest.raises(
    ValueError, match="1-way 1-shot episodes but the config asks for 1-way 5-shot"
  ):
    pipeline.make_eval_loader(_cfg(voc_dir, fold=0, shot=5), path, global_batch_size=1)
  with pytest.raises(ValueError, match="larger than the label bucket 100x100"):
    pipeline.make_eval_loader(_cfg(voc_dir, fold=0, label_bucket=100), path, global_batch_size=1)
  bad = dict(recs[0], query="no_such_image")
  episodes.write_episodes(tmp_path / "bad.jsonl", [bad])
  with pytest.raises(ValueError, match=r"bad.jsonl: episode 0 .*no_such_image"):
    pipeline.make_eval_loader(_cfg(voc_dir, fold=0), tmp_path / "bad.jsonl", global_batch_size=1)


def test_coco_train_and_eval(coco_dir, tmp_path):
  cfg = _cfg(coco_dir, dataset="coco20i", fold=3, test_resize="squash", base_label=True)
  (b,), _ = _take(pipeline.make_train_loader(cfg, global_batch_size=2), 1)
  assert b["query_base_label"].max() <= 255 and set(np.unique(b["query_base_label"])) <= set(
    range(61)
  ) | {255}
  assert all(c % 4 != 0 for c in b["class_id"]), "fold 3 base classes"
  path = tmp_path / "c.jsonl"
  _test_file(coco_dir, path, dataset="coco20i", fold=3, n=3)
  (e,), _ = _take(pipeline.make_eval_loader(cfg, path, global_batch_size=3), 1)
  assert e["label_original"].shape == (3, 640, 640) and e["query_image"].shape == (3, CROP, CROP, 3)
  assert all(c % 4 == 0 for c in e["class_id"])


def test_base_learner_loader(voc_dir):
  cfg = _cfg(voc_dir, fold=0, scale=(0.5, 2.0))
  loader = pipeline.make_base_train_loader(cfg, global_batch_size=2)
  (b,), _ = _take(loader, 1)
  assert b["image"].shape == (2, CROP, CROP, 3) and b["label"].shape == (2, CROP, CROP)
  assert set(np.unique(b["label"])) <= set(range(16)) | {255}
  assert loader.episodes_per_epoch == len(source.open_split(voc_dir, "pascal5i", "train"))


def test_array_source_checks():
  img, lab = np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.uint8)
  with pytest.raises(ValueError, match="do not match"):
    pipeline.ArraySource([img], [lab[:3]], num_classes=20)
  with pytest.raises(ValueError, match=r"label values \[21\]"):
    pipeline.ArraySource([img], [lab + 21], num_classes=20)
  src = pipeline.ArraySource([img], [lab], num_classes=20, image_ids=["a"])
  assert src.index.class_pixels[0, 0] == 20 and src.id_to_position("a") == 0


def test_worker_processes_give_the_same_batches(voc_dir):
  cfg = _cfg(voc_dir, fold=1)
  want, _ = _take(pipeline.make_train_loader(cfg, global_batch_size=2), 2)
  loader = pipeline.make_train_loader(_cfg(voc_dir, fold=1, worker_count=1), global_batch_size=2)
  got, it = _take(loader, 2)
  it.close()
  for a, b in zip(want, got):
    for k in a:
      assert np.array_equal(a[k], np.asarray(b[k])), k


# -- bit-exact with the unfused chain ----------------------------------------------------------


def _unfused_batches(ds, ops, *, steps: int, batch: int) -> list[dict]:
  """The loaders before the fused tail, as the reference: every op of ``ops`` on its own
  (the padded canvas, `Normalize`, `ToArrays`), then ``np.stack`` per key."""
  for op in ops:
    ds = ds.random_map(op) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
  eps = [ds[i] for i in range(steps * batch)]
  out = []
  for s in range(0, len(eps), batch):
    group = eps[s : s + batch]
    out.append(
      {
        k: np.stack([np.stack(e[k]) if isinstance(e[k], list) else e[k] for e in group])
        for k in group[0]
      }
    )
  return out


def _assert_bit_identical(got: dict, want: dict) -> None:
  """Images bit for bit (float32 patterns), labels as values (now uint8), the rest as is."""
  assert set(got) == set(want)
  for k, w in want.items():
    g = np.asarray(got[k])
    if w.dtype == np.float32:
      assert g.dtype == np.float32, k
      np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32), err_msg=k)
    else:
      assert g.dtype == (np.uint8 if k in LABELS else w.dtype), (k, g.dtype)
      np.testing.assert_array_equal(g, w, err_msg=k)


def _tiny_source(n: int = 12) -> pipeline.ArraySource:
  """n images of 40..90 px (a 65 crop both pads and cuts them) showing base classes 1 and 2
  of fold 1 and an ignore strip."""
  rng = np.random.default_rng(0)
  images, labels = [], []
  for _ in range(n):
    h, w = (int(v) for v in rng.integers(40, 91, 2))
    label = np.zeros((h, w), np.uint8)
    label[: h // 2, : w // 2], label[h // 2 :, w // 3 :], label[:, -3:] = 1, 2, 255
    images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    labels.append(label)
  return pipeline.ArraySource(images, labels, num_classes=20)


@pytest.mark.parametrize("shot, resize", [(1, "crop"), (5, "crop"), (1, "squash")])
def test_train_batches_are_bit_identical_to_the_unfused_chain(shot, resize):
  src = _tiny_source()
  cfg = _cfg("unused", fold=1, shot=shot, base_label=True, train_resize=resize, min_pixels=1)
  sampler = episodes.make_sampler(
    src.index, "pascal5i", 1, "train", shot=shot, seed=cfg.seed, min_pixels=1
  )
  ds = pipeline._Range(4).map(pipeline.SampleEpisode(sampler))
  ds = ds.map(pipeline.LoadEpisode(src, base_lut=cfg.fold_classes().base_label_lut()))
  ops = T.train_ops(CROP, scale=cfg.scale, rotate=cfg.rotate, blur=cfg.blur, resize=resize)
  want = _unfused_batches(ds.seed(cfg.seed), ops, steps=2, batch=2)
  got, _ = _take(pipeline.make_train_loader(cfg, global_batch_size=2, source=src), 2)
  assert got[0]["support_images"].shape == (2, shot, CROP, CROP, 3)
  for g, w in zip(got, want):
    _assert_bit_identical(g, w)


def test_eval_batches_are_bit_identical_to_the_unfused_chain(voc_dir, tmp_path):
  path = tmp_path / "f0.jsonl"
  val, _ = _test_file(voc_dir, path, n=4)
  cfg = _cfg(voc_dir, fold=0, base_label=True, test_size=161)
  specs = pipeline.load_episode_specs(path, val, cfg.test_classes())
  ds = pipeline._Range(4).map(pipeline.StoredEpisode(specs))
  lut = cfg.fold_classes().base_label_lut()
  ds = ds.map(pipeline.LoadEpisode(val, base_lut=lut, with_valid=True))
  want = _unfused_batches(ds, T.test_ops(161, bucket=cfg.bucket), steps=2, batch=2)
  got = list(pipeline.make_eval_loader(cfg, path, global_batch_size=2))
  for g, w in zip(got, want, strict=True):
    _assert_bit_identical(g, w)


def test_worker_count_auto_and_eval_in_process(voc_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, "usable_cores", lambda: 2)
  assert pipeline.resolve_worker_count(-1) == 1 and pipeline.resolve_worker_count(3) == 3
  monkeypatch.setattr(pipeline, "usable_cores", lambda: 64)
  assert pipeline.resolve_worker_count(-1) == pipeline.MAX_AUTO_WORKERS
  monkeypatch.setattr(pipeline, "usable_cores", lambda: 1)
  assert pipeline.resolve_worker_count(-1) == 0
  with pytest.raises(ValueError, match="worker_count must be >= 0"):
    _cfg(voc_dir, worker_count=-2)
  path = tmp_path / "f0.jsonl"
  _test_file(voc_dir, path, n=2)
  cfg = _cfg(voc_dir, fold=0, worker_count=2)
  assert pipeline.make_eval_loader(cfg, path, global_batch_size=2).worker_count == 0
  # the loader records the number it resolved to (the workers start only on iter())
  assert pipeline.make_train_loader(cfg, global_batch_size=2).worker_count == 2
  from configs import panet  # the run configs: auto, smoke runs in-process

  assert panet.get_config("").data.worker_count == -1
  assert panet.get_config("smoke").data.worker_count == 0
