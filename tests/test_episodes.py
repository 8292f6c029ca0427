"""Episode sampling (data_protocol.md §7) and stored episode lists (JSON lines, CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fss_jax.data import episodes, pipeline, splits

MIN_PX = 200  # toy threshold (real: 2048) so that 30x40 images carry "large" objects


def toy_source(n=60, *, seed=0, num_classes=20, classes=None, small_p=0.5, small_classes=None):
  """Images 30..40 x 36..46: one large object (>= MIN_PX) of classes[i % len], sometimes a small
  (< MIN_PX) object of another class, a row of 255."""
  rng = np.random.default_rng(seed)
  classes = classes or list(range(1, num_classes + 1))
  small_classes = small_classes or list(range(1, num_classes + 1))
  images, labels = [], []
  for i in range(n):
    h, w = int(rng.integers(30, 41)), int(rng.integers(36, 47))
    lab = np.zeros((h, w), np.uint8)
    lab[2 : 2 + 16, 3 : 3 + 16] = classes[i % len(classes)]  # 256 px
    if rng.random() < small_p:
      lab[h - 6 : h - 1, w - 6 : w - 1] = small_classes[
        int(rng.integers(len(small_classes)))
      ]  # 25 px
    lab[0, :] = 255
    images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    labels.append(lab)
  return pipeline.ArraySource(images, labels, num_classes=num_classes)


def _sampler(src, fold=0, mode="train", shot=1, seed=0, way=1, protocol="bam"):
  return episodes.make_sampler(
    src.index,
    "pascal5i",
    fold,
    mode,
    shot=shot,
    seed=seed,
    way=way,
    protocol=protocol,
    min_pixels=MIN_PX,
  )


def _check_episode(ep, src, sampler, *, novel=()):
  labels = src.labels
  assert ep.query in set(sampler.query_positions.tolist())
  assert (labels[ep.query] == ep.class_ids[0]).any(), (
    "the (first) episode class is present in the query"
  )
  for c, j, sup in zip(ep.class_ids, ep.class_indices, ep.supports):
    assert sampler.lists.classes[j] == c
    assert len(set(sup)) == len(sup) == sampler.shot, "K distinct supports"
    assert ep.query not in sup, "the query is never its own support"
    for s in sup:
      assert int((labels[s] == c).sum()) >= MIN_PX, "supports hold >= threshold px of the class"
  for p in (ep.query, *[s for sup in ep.supports for s in sup]):
    assert not np.isin(labels[p], novel).any(), "novel-class pixel in a training episode"


@pytest.mark.parametrize("shot", [1, 3])
def test_training_episode_invariants(shot):
  src = toy_source(80, seed=1)
  sampler = _sampler(src, fold=1, shot=shot)
  novel = splits.fold_classes("pascal5i", 1).novel
  for i in range(200):
    _check_episode(sampler.sample(i), src, sampler, novel=novel)


def test_training_class_drawn_among_all_present_base_classes():
  # Queries hold a large class-6 object and a small (25 px < MIN_PX) class-7 one; the episode
  # class is uniform over both (§7.1: any pixel count), supports still >= MIN_PX.
  src = toy_source(40, classes=[6, 7], small_p=1.0, small_classes=[7, 6])
  sampler = _sampler(src, fold=0)
  both = [i for i in range(len(sampler)) if sampler.eligible[i].sum() == 2]
  assert both
  two = set(sampler.query_positions[both].tolist())
  picks = [e for e in map(sampler.sample, range(400)) if e.query in two]
  small = [e for e in picks if (src.labels[e.query] == e.class_ids[0]).sum() < MIN_PX]
  assert len(picks) > 100 and 0.35 < len(small) / len(picks) < 0.65
  for e in small:
    _check_episode(e, src, sampler)


def test_training_epochs_visit_every_query_once():
  src = toy_source(50, seed=2)
  sampler = _sampler(src, fold=2)
  q = len(sampler)
  for epoch in range(2):
    seen = [sampler.sample(epoch * q + i).query for i in range(q)]
    assert sorted(seen) == sorted(sampler.query_positions.tolist())
  assert [sampler.sample(i).query for i in range(q)] != [
    sampler.sample(q + i).query for i in range(q)
  ]


def test_pfenet_protocol_keeps_images_with_novel_pixels():
  src = toy_source(60, seed=3, small_p=0.5, small_classes=[1, 2])  # fold 0 novel = 1..5
  bam, pfenet = _sampler(src, protocol="bam"), _sampler(src, protocol="pfenet")
  assert len(pfenet) > len(bam)
  for i in range(100):
    ep = pfenet.sample(i)
    assert ep.class_ids[0] not in (1, 2)
    _check_episode(ep, src, pfenet)


def test_same_seed_same_episodes_and_seed_matters():
  src = toy_source(60, seed=4)
  a, b, c = (
    _sampler(src, seed=7, shot=2),
    _sampler(src, seed=7, shot=2),
    _sampler(src, seed=8, shot=2),
  )
  ea = [a.sample(i) for i in range(60)]
  assert ea == [b.sample(i) for i in range(60)]
  assert ea[::-1] == [a.sample(i) for i in reversed(range(60))], (
    "episodes depend on (seed, index) only"
  )
  assert ea != [c.sample(i) for i in range(60)]


def test_test_episodes_cycle_queries_in_list_order():
  src = toy_source(30, seed=5)
  sampler = _sampler(src, mode="test")
  q = sampler.query_positions.tolist()
  n = 2 * len(q) + 3
  assert [sampler.sample(i).query for i in range(n)] == (q * 3)[:n]
  for i in range(n):
    ep = sampler.sample(i)
    assert ep.class_ids[0] in splits.fold_classes("pascal5i", 0).novel
    _check_episode(ep, src, sampler)


def test_n_way_episodes():
  src = toy_source(80, seed=6)
  sampler = _sampler(src, fold=3, way=3, shot=2)
  for i in range(50):
    ep = sampler.sample(i)
    assert len(set(ep.class_ids)) == 3 and len(ep.supports) == 3
    _check_episode(ep, src, sampler, novel=splits.fold_classes("pascal5i", 3).novel)
  rec = episodes.episode_record(ep, src.index.image_ids)
  assert (
    isinstance(rec["class_id"], list) and len(rec["supports"]) == 3 and len(rec["supports"][0]) == 2
  )


def test_too_large_shot_is_a_clear_error():
  src = toy_source(40, seed=7)  # 2 images per class
  with pytest.raises(
    ValueError, match=r"shot K=5 exceeds the support images of classes: class \d+ has 2"
  ):
    _sampler(src, shot=5)


def test_query_without_usable_class_is_left_out():
  # class 6 has a single large-object image: as a query it has no other support -> left out.
  src = toy_source(30, classes=[7, 8, 9] * 9 + [6, 7, 8], small_p=0.0)
  sampler = _sampler(src)
  six = [i for i, l in enumerate(src.labels) if (l == 6).sum() >= MIN_PX]
  assert len(six) == 1 and six[0] in sampler.lists.query_positions
  assert six[0] not in sampler.query_positions
  assert len(sampler) == len(sampler.lists) - 1


# -- JSON lines and the CLI ------------------------------------------------------------------


def test_records_round_trip(tmp_path):
  src = toy_source(40, seed=8)
  recs = episodes.generate(
    src.index, "pascal5i", 0, "test", shot=1, num_episodes=7, seed=3, min_pixels=MIN_PX
  )
  path = episodes.write_episodes(tmp_path / "e.jsonl", recs)
  lines = path.read_text().splitlines()
  assert len(lines) == 7 and json.loads(lines[0]) == recs[0]
  assert list(json.loads(lines[0])) == ["query", "supports", "class_id"]
  assert episodes.read_episodes(path) == recs
  (tmp_path / "bad.jsonl").write_text('{"query": "a"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: not an episode record"):
    episodes.read_episodes(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError, match="generate it with"):
    episodes.read_episodes(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
  from data_prep import synthetic

  return synthetic.make_built_dataset(tmp_path_factory.mktemp("episodes_voc"), "voc", 48, 0)


def test_cli_is_byte_identical_and_uses_val_images(voc_dir, tmp_path, capsys):
  from fss_jax.data import source

  args = [
    "--dataset",
    "pascal5i",
    "--data_dir",
    voc_dir,
    "--fold",
    "0",
    "--shot",
    "1",
    "--split",
    "test",
    "--num_episodes",
    "12",
    "--seed",
    "321",
  ]
  assert episodes.main(args + ["--out", str(tmp_path / "a.jsonl")]) == 0
  assert episodes.main(args + ["--out", str(tmp_path / "b.jsonl")]) == 0
  a = (tmp_path / "a.jsonl").read_bytes()
  assert a == (tmp_path / "b.jsonl").read_bytes()
  assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"
  val, train = (
    source.open_split(voc_dir, "pascal5i", "val"),
    source.open_split(voc_dir, "pascal5i", "train"),
  )
  val_ids, train_ids = set(val.index.image_ids.tolist()), set(train.index.image_ids.tolist())
  recs = [json.loads(l) for l in a.decode().splitlines()]
  assert len(recs) == 12
  lists = splits.fold_lists(val.index, "pascal5i", 0, "test")
  order = [val.index.image_ids[p] for p in lists.query_positions]
  for i, r in enumerate(recs):
    assert r["query"] in val_ids and r["query"] not in train_ids
    assert set(r["supports"]) <= val_ids and r["query"] not in r["supports"]
    assert r["class_id"] in (1, 2, 3, 4, 5)
    label = val[val.id_to_position(r["query"])]["label"]
    assert (label == r["class_id"]).any()
    assert r["query"] == order[i % len(order)]
  # a different seed changes the file; train split: train images, base classes
  assert episodes.main(args[:-1] + ["1", "--out", str(tmp_path / "c.jsonl")]) == 0
  assert (tmp_path / "c.jsonl").read_bytes() != a or len(order) == 1
  targs = [x if x != "test" else "train" for x in args]
  assert episodes.main(targs + ["--out", str(tmp_path / "t.jsonl")]) == 0
  for line in (tmp_path / "t.jsonl").read_text().splitlines():
    r = json.loads(line)
    assert r["query"] in train_ids and r["class_id"] > 5
  # K too large: the message names the class, its count and K
  assert episodes.main(args[:7] + ["4"] + args[8:] + ["--out", str(tmp_path / "d.jsonl")]) == 2
  err = capsys.readouterr().err
  assert "shot K=4 exceeds" in err and "class" in err and not (tmp_path / "d.jsonl").exists()


def test_cli_keeps_an_existing_file_without_overwrite(tmp_path, capsys):
  out = tmp_path / "e.jsonl"
  out.write_text("kept\n")
  args = [
    "--dataset",
    "pascal5i",
    "--data_dir",
    str(tmp_path / "no_data"),
    "--fold",
    "0",
    "--shot",
    "1",
    "--split",
    "test",
    "--num_episodes",
    "4",
    "--seed",
    "321",
    "--out",
    str(out),
  ]
  assert episodes.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert (
    err == f"error: {out} already exists; pass --overwrite to replace it"
  )  # one line, before any work
  assert out.read_text() == "kept\n"


def test_cli_overwrite_replaces_atomically(voc_dir, tmp_path):
  out = tmp_path / "e.jsonl"
  out.write_text("old\n")
  args = [
    "--dataset",
    "pascal5i",
    "--data_dir",
    voc_dir,
    "--fold",
    "0",
    "--shot",
    "1",
    "--split",
    "test",
    "--num_episodes",
    "5",
    "--seed",
    "321",
    "--out",
    str(out),
  ]
  assert episodes.main(args + ["--overwrite"]) == 0
  assert len(episodes.read_episodes(out)) == 5
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]  # no temporary file left
  with pytest.raises(FileExistsError, match="overwrite"):
    episodes.write_episodes(out, [], overwrite=False)
