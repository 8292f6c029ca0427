"""fss_jax.predict end to end on synthetic images with a freshly initialised PANet.

The checkpoint is random weights (fan-in scaled normals in the shapes of
``PANet.init``) written as a converted checkpoint (``checkpoints.io.write_orbax``
+ metadata) and as a training workdir (``fss_jax.train.checkpointing``
manager); the model input is 64 x 64.
"""

from __future__ import annotations

import json
import shutil

import cv2
import jax
import numpy as np
import pytest
import random_weights
from PIL import Image

from checkpoints import io as ckpt_io
from fss_jax import predict
from fss_jax.eval import visualize
from fss_jax.models import registry
from fss_jax.train import state as state_lib

SIZE = 64


def _random_variables(model, size: int) -> dict:
  """Host-drawn weights (`random_weights.draw`) in the shapes of ``model.init`` at ``size``
  (no compilation of the init)."""
  ep = {
    "query_image": np.zeros((1, size, size, 3), np.float32),
    "query_mask": np.zeros((1, size, size), np.int32),
    "support_images": np.zeros((1, 1, size, size, 3), np.float32),
    "support_masks": np.zeros((1, 1, size, size), np.int32),
    "class_id": np.zeros((1,), np.int32),
  }
  shapes = jax.eval_shape(lambda k: state_lib.init_variables(model, ep, k), jax.random.PRNGKey(0))
  return random_weights.draw(shapes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  variables = _random_variables(registry.get("panet").make_model(), SIZE)
  ckpt = ckpt_io.write_orbax(
    variables,
    root / "panet_ckpt",
    metadata={"model": "panet", "fields": {}, "input": {"size": SIZE, "resize": "aspect"}},
  )
  rng = np.random.default_rng(1)
  files = {}
  # Support 1: 50x60 JPEG + palette PNG (VOC style: class index 15, border 255 = ignore).
  s1 = rng.integers(0, 256, (50, 60, 3), np.uint8)
  m1 = np.zeros((50, 60), np.uint8)
  m1[10:30, 15:45] = 15
  m1[9, 15:45] = 255
  cv2.imwrite(str(root / "s1.jpg"), cv2.cvtColor(s1, cv2.COLOR_RGB2BGR))
  pm = Image.fromarray(m1, mode="P")
  pm.putpalette([0, 0, 0] * 15 + [192, 128, 128] + [0, 0, 0] * 239 + [224, 224, 192])
  pm.save(root / "s1_mask.png")
  # Support 2: 40x40 PNG + a black/white 0/255 grayscale mask.
  s2 = rng.integers(0, 256, (40, 40, 3), np.uint8)
  m2 = np.zeros((40, 40), np.uint8)
  m2[5:25, 5:25] = 255
  cv2.imwrite(str(root / "s2.png"), cv2.cvtColor(s2, cv2.COLOR_RGB2BGR))
  cv2.imwrite(str(root / "s2_mask.png"), m2)
  # Queries of different sizes.
  for name, (h, w) in {"q1": (70, 90), "q2": (45, 80), "q3": (96, 33)}.items():
    cv2.imwrite(str(root / f"{name}.jpg"), rng.integers(0, 256, (h, w, 3), np.uint8))
    files[name] = root / f"{name}.jpg"
  files.update(
    s1=root / "s1.jpg", m1=root / "s1_mask.png", s2=root / "s2.png", m2=root / "s2_mask.png"
  )
  return {
    "root": root,
    "ckpt": ckpt,
    "variables": variables,
    "files": files,
    "arrays": {"s1": s1, "m1": m1, "s2": s2, "m2": m2},
  }


@pytest.fixture(scope="module")
def predictor(setup):
  return predict.Predictor("panet", setup["ckpt"], size=SIZE, resize="pad", batch_size=4)


def test_cli_end_to_end(setup, capsys):
  f, out = setup["files"], setup["root"] / "out"
  argv = [
    "--model",
    "panet",
    "--checkpoint",
    str(setup["ckpt"]),
    "--support",
    f"{f['s1']}:{f['m1']}",
    "--support",
    f"{f['s2']}:{f['m2']}",
    "--query",
    str(f["q1"]),
    str(f["q2"]),
    str(f["q3"]),
    "--out",
    str(out),
    "--size",
    str(SIZE),
    "--resize",
    "pad",
  ]
  assert predict.main(argv) == 0
  doc = json.loads((out / "predictions.json").read_text())
  assert doc["model"] == "panet" and doc["input_size"] == SIZE and doc["resize"] == "pad"
  assert doc["shots"] == 2 and doc["checkpoint_kind"] == "converted"
  assert [q["name"] for q in doc["queries"]] == ["q1", "q2", "q3"]
  for q, (h, w) in zip(doc["queries"], [(70, 90), (45, 80), (96, 33)]):
    assert (q["height"], q["width"]) == (h, w)
    assert q["image"].endswith(f"{q['name']}.jpg")
    mask = np.asarray(Image.open(out / q["mask"]))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}
    assert Image.open(out / q["mask"]).mode == "P"
    assert q["foreground_fraction"] == pytest.approx(float(mask.mean()), abs=1e-6)
    assert q["confidence"] is None or 0.5 <= q["confidence"] <= 1.0
    assert 0.5 <= q["confidence_all"] <= 1.0
    ov = cv2.imread(str(out / q["overlay"]))
    assert ov.shape == (h + visualize.caption_height(h), w, 3)  # caption band on top
    assert cv2.imread(str(out / q["panel"])).shape[0] == h + visualize.caption_height(h)
  assert [s["overlay"] for s in doc["supports"]] == [
    "support0_s1_overlay.png",
    "support1_s2_overlay.png",
  ]
  assert cv2.imread(str(out / doc["supports"][0]["overlay"])).shape == (
    50 + visualize.caption_height(50),
    60,
    3,
  )
  assert doc["trained_on"] is None
  # Palette index 15 is the object, the 255 border is ignored; 0/255 grey: 255 is the object.
  assert doc["supports"][0]["foreground_fraction"] == pytest.approx(20 * 30 / (50 * 60))
  assert doc["supports"][1]["foreground_fraction"] == pytest.approx(20 * 20 / (40 * 40))
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
  printed = capsys.readouterr().out
  assert "wrote 3 prediction(s)" in printed
  assert (
    f"checkpoint {setup['ckpt']}: panet, fold not recorded (convert it again with --dataset and --fold)"
    in printed
  )

  # An existing output is never replaced without --overwrite; nothing is touched.
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  assert predict.main(argv) == 2
  err = capsys.readouterr().err
  assert "already has" in err and "q1_mask.png" in err and "--overwrite" in err
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_one_compilation_for_queries_of_different_sizes(setup, predictor):
  a = setup["arrays"]
  rng = np.random.default_rng(2)
  queries = [rng.integers(0, 256, hw + (3,), np.uint8) for hw in [(70, 90), (31, 64), (128, 20)]]
  preds = predictor.segment(np.stack([a["s1"]]), np.stack([a["m1"]]), queries)  # arrays [K, ...]
  assert predictor.traces == 1
  assert [p.mask.shape for p in preds] == [(70, 90), (31, 64), (128, 20)]
  assert [p.name for p in preds] == ["image_0", "image_1", "image_2"]
  preds2 = predictor.segment(
    [a["s1"]], [a["m1"]], queries[::-1] + [queries[0]]
  )  # 4 queries, bucket 4
  assert predictor.traces == 1
  np.testing.assert_array_equal(preds2[0].mask, preds[2].mask)  # batching changes nothing
  np.testing.assert_array_equal(preds2[3].mask, preds[0].mask)
  for p in preds:
    fg = p.mask.astype(bool)
    top = np.maximum(p.probability, 1 - p.probability)
    assert p.foreground_fraction == pytest.approx(fg.mean())
    assert p.confidence_all == pytest.approx(top.mean(), rel=1e-5)
    if fg.any():
      assert p.confidence == pytest.approx(top[fg].mean(), rel=1e-5)
      np.testing.assert_array_equal(fg, p.probability > 0.5)
  # Squash resizing is host-side only: the same compiled function.
  predictor.resize = "squash"
  try:
    sq = predictor.segment([a["s1"]], [a["m1"]], queries[:3])
  finally:
    predictor.resize = "aspect"
  assert predictor.traces == 1 and [p.mask.shape for p in sq] == [(70, 90), (31, 64), (128, 20)]


def test_bfloat16_prediction_agrees_with_float32(setup):
  a = setup["arrays"]
  query = np.random.default_rng(3).integers(0, 256, (70, 90, 3), np.uint8)
  f32 = predict.Predictor("panet", setup["ckpt"], size=SIZE, resize="pad", batch_size=4)
  ref = f32.segment([a["s1"]], [a["m1"]], [query])[0]
  bf16 = predict.Predictor(
    "panet", setup["ckpt"], size=SIZE, resize="pad", batch_size=4, compute_dtype="bfloat16"
  )
  got = bf16.segment([a["s1"]], [a["m1"]], [query])[0]
  assert got.probability.dtype == ref.probability.dtype
  assert np.abs(got.probability - ref.probability).max() < 0.1
  assert (got.mask == ref.mask).mean() > 0.9
  with pytest.raises(predict.PredictInputError, match="float16"):
    predict.Predictor("panet", setup["ckpt"], compute_dtype="float16")


def test_bad_inputs_name_the_file(setup, predictor, tmp_path):
  a, f = setup["arrays"], setup["files"]
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"this is not a jpeg")
  with pytest.raises(
    predict.PredictInputError, match=r"query image .*broken\.jpg is not a readable image"
  ):
    predictor.segment([a["s1"]], [a["m1"]], [bad])
  with pytest.raises(predict.PredictInputError, match=r"image .*missing\.jpg not found"):
    predictor.segment([a["s1"]], [a["m1"]], [tmp_path / "missing.jpg"])
  # Mask of another size than its image: both files named, and the fix.
  with pytest.raises(
    predict.PredictInputError,
    match=r"mask .*s2_mask\.png is 40x40 .*image .*s1\.jpg is 60x50.*same size",
  ):
    predictor.load_supports([f["s1"]], [f["m2"]])
  empty = tmp_path / "empty_mask.png"
  cv2.imwrite(str(empty), np.zeros((50, 60), np.uint8))
  with pytest.raises(predict.PredictInputError, match=r"mask .*empty_mask\.png has no foreground"):
    predictor.load_supports([f["s1"]], [empty])
  not_png = tmp_path / "mask.png"
  not_png.write_bytes(b"garbage")
  with pytest.raises(
    predict.PredictInputError, match=r"support mask .*mask\.png is not a readable image"
  ):
    predictor.load_supports([f["s1"]], [not_png])
  with pytest.raises(predict.PredictInputError, match=r"NaN/Inf scores for query q\.jpg"):
    predictor._postprocess(a["s1"], "q", "q.jpg", np.full((SIZE, SIZE, 2), np.nan, np.float32))
  assert predictor.traces <= 1  # nothing ran


def test_checkpoint_of_another_model(setup, tmp_path):
  other = tmp_path / "sccan_ckpt"
  shutil.copytree(setup["ckpt"], other)
  (other / "metadata.json").write_text(json.dumps({"model": "sccan", "fields": {}}))
  with pytest.raises(
    predict.PredictInputError,
    match=r"holds weights of model 'sccan' \(says .*metadata\.json\), "
    r"not 'panet'.*--model sccan",
  ):
    predict.Predictor("panet", other)
  with pytest.raises(predict.PredictInputError, match=r"holds no checkpoint"):
    predict.Predictor("panet", tmp_path)
  # A model built for 1 shot whose weights do not depend on it accepts 2 supports.
  p = predict.Predictor("panet", setup["ckpt"], size=SIZE, resize="pad", fields={"shots": 1})
  module, _, _ = p._build(2)
  assert module.shots == 2 and p.traces == 0
  f = setup["files"]
  rc = predict.main(
    [
      "--model",
      "panet",
      "--checkpoint",
      str(other),
      "--support",
      f"{f['s1']}:{f['m1']}",
      "--query",
      str(f["q1"]),
      "--out",
      str(tmp_path / "o"),
    ]
  )
  assert rc == 2 and not (tmp_path / "o").exists()


def test_training_workdir_checkpoint(setup, tmp_path):
  """A `fss_jax.main` workdir (best/<step>/{state,meta}) gives the same predictions."""
  import orbax.checkpoint as ocp

  from fss_jax.train import checkpointing

  v = setup["variables"]
  state = state_lib.TrainState(
    step=np.int32(7), params=v["params"], batch_stats={}, opt_state={}, rng=np.zeros(2, np.uint32)
  )
  mngr = checkpointing.checkpoint_manager(
    tmp_path / "wd" / checkpointing.BEST_DIR, keep=1, async_save=False
  )
  mngr.save(
    7,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({"model": "panet", "model_fields": {}}),
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  p = predict.Predictor(None, tmp_path / "wd", size=SIZE, resize="pad")
  assert p.model_name == "panet" and p.ckpt.kind == "workdir" and p.ckpt.step == 7
  f = setup["files"]
  got = p.segment([f["s1"]], [f["m1"]], [f["q1"]])
  ref = predict.Predictor("panet", setup["ckpt"], size=SIZE, resize="pad").segment(
    [f["s1"]], [f["m1"]], [f["q1"]]
  )
  np.testing.assert_array_equal(got[0].mask, ref[0].mask)
  np.testing.assert_allclose(got[0].probability, ref[0].probability, atol=1e-6)
  with pytest.raises(predict.PredictInputError, match="not 'sccan'"):
    predict.Predictor("sccan", tmp_path / "wd")


def test_mask_rule():
  v = predict.mask_from_values
  np.testing.assert_array_equal(v(np.array([[0, 1, 255]], np.uint8)), [[0, 1, 255]])  # label map
  np.testing.assert_array_equal(v(np.array([[0, 255, 255]], np.uint8)), [[0, 1, 1]])  # 0/255 b&w
  np.testing.assert_array_equal(v(np.array([[0, 128, 255]], np.uint8)), [[0, 1, 1]])  # soft edges
  np.testing.assert_array_equal(v(np.array([[0, 15, 255]]), palette=True), [[0, 1, 255]])
  np.testing.assert_array_equal(v(np.array([[0, 255]]), palette=True), [[0, 1]])
  rgb = np.array([[[0, 0, 0], [0, 128, 0], [255, 255, 255]]], np.uint8)
  np.testing.assert_array_equal(v(rgb), [[0, 1, 1]])
  np.testing.assert_array_equal(v(rgb, alpha=np.array([[0, 0, 255]], np.uint8)), [[0, 0, 1]])
  np.testing.assert_array_equal(v(np.array([[True, False]])), [[1, 0]])


def test_logits_to_original_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, 16, 2)).astype(np.float32)
  t = torch.from_numpy(x.transpose(2, 0, 1)[None])
  # squash: straight to (H, W).
  got = predict.logits_to_original(x, (30, 45), "squash")
  want = torch.nn.functional.interpolate(t, size=(30, 45), mode="bilinear", align_corners=True)
  np.testing.assert_allclose(got, want[0].numpy().transpose(1, 2, 0), atol=1e-5)
  # pad (§9.1): to L x L with L = max(H, W), then the top-left H x W.
  got = predict.logits_to_original(x, (30, 45), "aspect")
  want = torch.nn.functional.interpolate(t, size=(45, 45), mode="bilinear", align_corners=True)
  np.testing.assert_allclose(got, want[0].numpy().transpose(1, 2, 0)[:30, :45], atol=1e-5)


def test_converted_checkpoint_without_fields_takes_the_support_count(tmp_path):
  """A checkpoint converted from an official SCCAN file stores ``"fields": {}``; two
  --support must build a 2-shot SCCAN (its weights do not depend on K), not stop with
  'episode has 2 supports per query but the model was built with shot=1'."""
  variables = _random_variables(registry.get("sccan").make_model(), 65)
  ckpt = ckpt_io.write_orbax(
    variables, tmp_path / "sccan_ckpt", metadata={"model": "sccan", "fields": {}}
  )
  p = predict.Predictor(None, ckpt, size=65, resize="pad")
  module, _, _ = p._build(2)
  assert module.shot == 2 and p.traces == 0
  assert predict._shot_field({}, registry.get("hdmnet").make_model) == ("shot", 1)
  assert predict._shot_field({"shots": 3}, registry.get("panet").make_model) == ("shots", 3)


def test_query_overlay_outlines_the_prediction_under_a_caption(setup, predictor, tmp_path):
  """The written overlay keeps the query's colours inside the predicted region (only its
  boundary is drawn, red) and has the "prediction" caption; the panel names every tile."""
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (60, 80, 3), np.uint8)
  mask = np.zeros((60, 80), np.uint8)
  mask[10:40, 20:60] = 1
  pred = predict.Prediction(
    name="q",
    image=image,
    mask=mask,
    probability=mask.astype(np.float32),
    foreground_fraction=float(mask.mean()),
    confidence=1.0,
    confidence_all=1.0,
  )
  supports = predictor.load_supports([setup["files"]["s1"]], [setup["files"]["m1"]])
  doc = json.loads(predict.write_outputs(predictor, supports, [pred], tmp_path / "o").read_text())
  q = doc["queries"][0]
  ov = cv2.cvtColor(cv2.imread(str(tmp_path / "o" / q["overlay"])), cv2.COLOR_BGR2RGB)
  ch = visualize.caption_height(60)
  np.testing.assert_array_equal(ov[:ch], visualize.caption("prediction", 80, ch))
  body = ov[ch:]
  edge = visualize.boundary(mask.astype(bool))
  assert edge.any() and (edge != mask.astype(bool)).any()
  np.testing.assert_array_equal(body[~edge], image[~edge])  # inside and outside untouched
  assert (body[edge] == visualize.PRED_COLOR).all()
  panel = cv2.imread(str(tmp_path / "o" / q["panel"]))
  assert panel.shape[0] == 60 + ch and panel.shape[1] > 80
  sup = cv2.cvtColor(
    cv2.imread(str(tmp_path / "o" / doc["supports"][0]["overlay"])), cv2.COLOR_BGR2RGB
  )
  np.testing.assert_array_equal(
    sup[: visualize.caption_height(50)],
    visualize.caption("support", 60, visualize.caption_height(50)),
  )


NOISE = (
  "Unable to initialize backend",
  "oneDNN custom operations",
  "_CHECKPOINT_METADATA",
  "Metadata file does not exist",
  "Traceback",
)


def _predict_cli(setup, ckpt, out):
  import os
  import subprocess
  import sys

  from conftest import REPO

  f = setup["files"]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "fss_jax.predict",
      "--checkpoint",
      str(ckpt),
      "--support",
      f"{f['s1']}:{f['m1']}",
      "--query",
      str(f["q1"]),
      "--out",
      str(out),
      "--size",
      str(SIZE),
      "--resize",
      "pad",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_predict_names_the_fold_and_prints_no_library_noise(setup, tmp_path):
  """A converted checkpoint that records its fold, and a training workdir (orbax's step
  folders): the summary names the fold; stderr has no orbax metadata warning, TPU probe or
  TensorFlow note."""
  import orbax.checkpoint as ocp

  from fss_jax.train import checkpointing

  conv = tmp_path / "conv"
  shutil.copytree(setup["ckpt"], conv)
  (conv / "metadata.json").write_text(
    json.dumps({"model": "panet", "fields": {}, "dataset": "pascal5i", "fold": 2})
  )
  v = setup["variables"]
  state = state_lib.TrainState(
    step=np.int32(7), params=v["params"], batch_stats={}, opt_state={}, rng=np.zeros(2, np.uint32)
  )
  mngr = checkpointing.checkpoint_manager(
    tmp_path / "wd" / checkpointing.BEST_DIR, keep=1, async_save=False
  )
  mngr.save(
    7,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(
        {"model": "panet", "model_fields": {}, "dataset": "coco20i", "fold": 1}
      ),
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  for ckpt, trained in ((conv, "pascal5i fold 2"), (tmp_path / "wd", "coco20i fold 1")):
    r = _predict_cli(setup, ckpt, tmp_path / f"out_{ckpt.name}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
      f"checkpoint {ckpt}: panet trained on {trained}; the classes of that fold's test split"
      in r.stdout
    )
    found = [n for n in NOISE if n in r.stderr]
    assert not found, f"{found} in stderr:\n{r.stderr[-3000:]}"
    doc = json.loads((tmp_path / f"out_{ckpt.name}" / "predictions.json").read_text())
    assert doc["trained_on"]["fold"] == int(trained[-1])


def test_checkpoint_records_what_predict_needs(tmp_path, setup):
  """A COCO-trained HDMNet runs at the size and resize it was trained for (633, squash; read
  from the checkpoint, no flag), and its foreground probability is the model's own output
  (BAM's ensemble gives probabilities: no second softmax); a checkpoint that records no test
  transform is refused naming the field; Sym-Net needs the supports' class by name or id."""
  from checkpoints import convert

  model = registry.get("hdmnet").make_model(num_base_classes=61)
  meta = {
    "model": "hdmnet",
    "fields": {"num_base_classes": 61},
    "dataset": "coco20i",
    "fold": 0,
    **convert.paper_description("hdmnet", "coco20i", 0),
  }
  assert meta["output"] == "probabilities" and meta["labels"]["classes"]["1"] == "person"
  variables = _random_variables(model, 65)  # BatchNorm variances 1
  ckpt = ckpt_io.write_orbax(variables, tmp_path / "hdmnet_coco", metadata=meta)
  p = predict.Predictor(None, ckpt)
  assert (p.size, p.resize, p.output) == (633, "squash", "probabilities")
  # The output check at a smaller side (the recorded resize and output stay): the forward
  # at 633 cost ~30 s on CPU and the probabilities do not depend on the side.
  p = predict.Predictor(None, ckpt, size=97)
  assert (p.size, p.resize, p.output) == (97, "squash", "probabilities")
  a = setup["arrays"]
  supports = p.load_supports([a["s1"]], [a["m1"]])
  got = p.segment(supports, None, [a["s2"]])[0]
  pre = [p.preprocess(s.image, s.mask) for s in supports]
  _, variables, forward = p._build(1)
  raw = np.asarray(
    forward(
      variables,
      p._episode(
        p.preprocess(a["s2"])[0][None],
        np.stack([x[0] for x in pre])[None],
        np.stack([x[1] for x in pre])[None],
      ),
    )
  )[0]
  full = predict.logits_to_original(raw, a["s2"].shape[:2], "squash")
  np.testing.assert_allclose(got.probability, np.clip(full[..., 1], 0, 1), atol=1e-6)

  bare = ckpt_io.write_orbax(
    variables,
    tmp_path / "hdmnet_bare",
    metadata={"model": "hdmnet", "fields": {"num_base_classes": 61}},
  )
  with pytest.raises(
    predict.PredictInputError,
    match=r"does not record input\.size \(--size\) or "
    r"input\.resize \(--resize\)",
  ):
    predict.Predictor(None, bare)

  sym = {
    "model": "symnet",
    "fields": {},
    "dataset": "pascal5i",
    "fold": 0,
    **convert.paper_description("symnet", "pascal5i", 0),
  }
  sym_ckpt = tmp_path / "symnet"  # metadata only: the weights are not read
  (sym_ckpt / "variables").mkdir(parents=True)
  (sym_ckpt / "metadata.json").write_text(json.dumps(sym))
  with pytest.raises(
    predict.PredictInputError, match=r"needs the class of the supports.*15 person"
  ):
    predict.Predictor(None, sym_ckpt)
  with pytest.raises(predict.PredictInputError, match=r"'unicorn' is not a class.*1 aeroplane"):
    predict.Predictor(None, sym_ckpt, class_id="unicorn")
  assert predict.Predictor(None, sym_ckpt, class_id="Person").class_id == 15
  assert predict.Predictor(None, sym_ckpt, class_id="12").class_id == 12
