"""Issue 19 part 3: a PASCAL-trained checkpoint evaluated on a cross-domain test set under
PATNet's protocol (``--config.eval.dataset=isic2018 --config.protocol=patnet_cd``), end to end on
a synthetic ISIC-2018 build; PATNet's episode draws replayed; N-way refused (binary masks)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fss_jax.data import episodes, pipeline, source, splits
from fss_jax.eval import protocol

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGES_PER_CLASS = (4, 3, 3)  # nevus, melanoma, seborrheic keratosis


def _config(arg: str = "smoke"):
  spec = importlib.util.spec_from_file_location("_panet_cfg", REPO / "configs" / "panet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
  """(data_dir, manual_dir) of a synthetic ISIC-2018 build, images in PATNet's class folders."""
  from data_prep import synthetic

  tmp = tmp_path_factory.mktemp("isic")
  data_dir = synthetic.make_built_cross_domain(
    tmp, "isic2018", seed=0, class_folders=True, images_per_class=IMAGES_PER_CLASS
  )
  manual = next(tmp.glob("raw_isic2018_*"))
  return data_dir, manual


def _patnet_isic_episodes(manual: pathlib.Path, shot: int, num: int) -> list[dict]:
  """PATNet's ISIC test episodes: test.py:18 ``fix_randseed(0)``, then ``DatasetISIC.sample_episode``
  for idx = 0..num-1 in order (isic.py:78-87, lists of isic.py:100-110), as PATNet runs them."""
  np.random.seed(0)
  base = manual / "ISIC" / "ISIC2018_Task1-2_Training_Input"
  categories = ["1", "2", "3"]
  classwise = {
    cat: [
      p for p in sorted(glob.glob(f"{base / cat}/*")) if os.path.basename(p).split(".")[1] == "jpg"
    ]
    for cat in categories
  }
  out = []
  for idx in range(num):
    class_id = idx % len(categories)
    cat = categories[class_id]
    query_name = np.random.choice(classwise[cat], 1, replace=False)[0]
    support_names = []
    while True:
      support_name = np.random.choice(classwise[cat], 1, replace=False)[0]
      if query_name != support_name:
        support_names.append(support_name)
      if len(support_names) == shot:
        break
    stem = lambda p: pathlib.Path(p).stem
    out.append(
      {
        "query": stem(query_name),
        "supports": [stem(s) for s in support_names],
        "class_id": class_id + 1,
      }
    )
  return out


def _eval_config(data_dir, **eval_fields):
  c = _config("smoke")
  c.data.data_dir = data_dir
  c.eval.dataset = "isic"  # an alias: canonicalised to isic2018
  c.protocol = "patnet_cd"
  for k, v in eval_fields.items():
    c.eval[k] = v
  return c


def test_patnet_cd_episodes_are_patnets_isic_draws(isic, tmp_path):
  """The stored episodes of --mode eval (`train.data.ensure_episodes`) = PATNet's own ISIC draws: class
  idx mod 3, a query uniform over the class, 5 supports drawn independently (repeats allowed)."""
  from fss_jax.train import data as data_lib

  data_dir, manual = isic
  c = _eval_config(data_dir, shot=5)
  with c.unlocked():
    c.protocol_fields.episodes = c.protocol_fields.seeds = c.protocol_fields.test_size = (
      None  # PATNet's
    )
  ec = protocol.eval_config(c)
  r = protocol.resolve(ec)
  assert (ec.dataset, ec.shot, r["episodes"], r["seeds"], r["score"], r["test_size"]) == (
    "isic2018",
    5,
    600,
    [0],
    "input",
    400,
  )
  path = data_lib.ensure_episodes(ec, tmp_path, 0, 600)
  assert path.name == "isic2018_5shot_s0_n600_hsnet-seq.jsonl"
  got = episodes.read_episodes(path)
  want = _patnet_isic_episodes(manual, 5, 600)
  assert got == want
  assert any(len(set(e["supports"])) < 5 for e in got)  # independent draws repeat
  assert [e["class_id"] for e in got[:6]] == [1, 2, 3, 1, 2, 3]
  # Every record of the class is a query, as in PATNet (no pixel threshold).
  assert {e["query"] for e in got} == {
    pathlib.Path(p).stem for p in glob.glob(f"{manual}/ISIC/*Input/*/*.jpg")
  }


def test_n_way_is_refused_on_binary_masks(isic):
  data_dir, _ = isic
  msg = "isic2018 has binary masks .* 1-way only, not 2-way; set --config.eval.way=1"
  with pytest.raises(ValueError, match=msg):
    protocol.eval_config(_eval_config(data_dir, way=2))
  with pytest.raises(ValueError, match=msg):
    pipeline.EpisodeConfig(dataset="isic2018", data_dir=data_dir, way=2)
  index = source.open_split(data_dir, "isic2018", "test").index
  with pytest.raises(ValueError, match=msg):
    episodes.generate(index, "isic2018", 0, "test", shot=1, num_episodes=3, seed=0, way=2)


def test_scoring_at_the_input_size_fits_any_image(isic, tmp_path):
  """score="input": the label is resized to S×S on the host (no label bucket), exactly as the
  eval step's torch-nearest resize of the original label would; 1 = the record's class."""
  from fss_jax.eval import metrics

  data_dir, _ = isic
  src = source.open_split(data_dir, "isic2018", "test")
  recs = episodes.generate(
    src.index,
    "isic2018",
    0,
    "test",
    shot=1,
    num_episodes=3,
    seed=0,
    rule="hsnet",
    seed_rule="sequential",
  )
  episodes.write_episodes(tmp_path / "e.jsonl", recs)
  s = 33
  kw = dict(dataset="isic2018", data_dir=data_dir, test_size=s, test_resize="squash")
  at_input = next(
    iter(
      pipeline.make_eval_loader(
        pipeline.EpisodeConfig(**kw, score_size=s, label_bucket=16),
        tmp_path / "e.jsonl",
        global_batch_size=3,
      )
    )
  )
  original = next(
    iter(
      pipeline.make_eval_loader(
        pipeline.EpisodeConfig(**kw), tmp_path / "e.jsonl", global_batch_size=3
      )
    )
  )
  assert at_input["label_original"].shape == (3, s, s) and (at_input["label_size"] == s).all()
  q = [src.id_to_position(r["query"]) for r in recs]  # no default bucket: the largest query
  assert original["label_original"].shape[1] == int(
    max(src.index.heights[q].max(), src.index.widths[q].max())
  )
  resized = np.asarray(
    metrics.resize_labels_nearest(original["label_original"], original["label_size"], s)
  )
  np.testing.assert_array_equal(at_input["label_original"], resized)
  for i, r in enumerate(recs):
    raw = src[src.id_to_position(r["query"])]["label"]
    assert set(np.unique(raw)) <= {0, 1}
    h, w = raw.shape
    np.testing.assert_array_equal(original["label_original"][i, :h, :w], raw)
  assert at_input["class_id"].tolist() == [1, 2, 3]


def _random_panet(dst: pathlib.Path) -> pathlib.Path:
  """Random weights of the smoke PANet as a converted checkpoint "trained" on PASCAL fold 0."""
  import jax

  from checkpoints import io as ckpt_io
  from fss_jax.models import registry
  from fss_jax.train import state as state_lib

  c = _config("smoke")
  model = registry.get("panet").make_model(**c.model_fields)
  s = c.data.test_size
  ep = {
    "query_image": np.zeros((1, s, s, 3), np.float32),
    "query_mask": np.zeros((1, s, s), np.int32),
    "support_images": np.zeros((1, 1, s, s, 3), np.float32),
    "support_masks": np.zeros((1, 1, s, s), np.int32),
    "class_id": np.zeros((1,), np.int32),
  }
  shapes = jax.eval_shape(lambda k: state_lib.init_variables(model, ep, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: (0.01 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
  return ckpt_io.write_orbax(
    variables, dst, metadata={"model": "panet", "fields": {}, "dataset": "pascal5i", "fold": 0}
  )


def test_main_evaluates_a_pascal_checkpoint_on_isic_under_patnet_cd(isic, tmp_path):
  data_dir, _ = isic
  ckpt = _random_panet(tmp_path / "panet_pascal_f0")
  work = tmp_path / "w"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "fss_jax.main",
      "--mode",
      "eval",
      "--config",
      "configs/panet.py:smoke",
      "--workdir",
      str(work),
      f"--config.data.data_dir={data_dir}",
      f"--config.init={ckpt}",
      "--config.eval.dataset=isic2018",
      "--config.protocol=patnet_cd",
      "--config.protocol_fields.seeds=(0,)",
      "--config.protocol_fields.episodes=6",
      "--config.data.label_bucket=16",  # unused: scored at input
      "--config.eval.num_images=0",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  (path,) = work.glob("results_isic2018_1shot_patnet_cd*.json")
  res = json.loads(path.read_text())
  assert (res["dataset"], res["train_dataset"], res["shot"], res["way"]) == (
    "isic2018",
    "pascal5i",
    1,
    1,
  )
  assert res["protocol"] == dict(
    name="patnet_cd",
    test_size=65,
    test_resize="squash",
    score="input",
    ignore_255=False,
    novel_filter=False,
    class_split="interleaved",
    episode_rule="hsnet",
    lists="build",
    episodes=6,
    seeds=[0],
    seed_rule="sequential",
  )
  assert res["score"] == "input" and res["episodes_per_seed"] == 6
  assert res["class_names"] == {"1": "nevus", "2": "melanoma", "3": "seborrheic_keratosis"}
  assert list(res["seeds"]) == ["0"] and res["seeds"]["0"]["episodes"] == 6
  assert set(res["per_class_mean"]) == {"1", "2", "3"} and np.isfinite(res["miou_mean"])
  assert "seborrheic_keratosis" in res["tables"]["0"]
  stored = episodes.read_episodes(work / "episodes" / "isic2018_1shot_s0_n6_hsnet-seq.jsonl")
  assert [e["class_id"] for e in stored] == [1, 2, 3, 1, 2, 3]
  assert splits.cross_domain("isic2018").classes("test") == (1, 2, 3)
