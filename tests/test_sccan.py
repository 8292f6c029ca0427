"""SCCAN: parity with the official code, K-shot / size robustness, key map, loss, config.

* Parity runs the same path as ``python -m checkpoints.verify`` on every SCCAN
  fixture under shared/parity/sccan (the shipped 1-shot one is required); window
  indices must match exactly, except at float32 ties of the alignment scores.
* Robustness: 5-shot at a non-square size is traced (shapes only) and the shot
  check fires with a clear message.
* Key map: synthetic state dicts with every official key name (ResNet-50 from the
  fixture json, ResNet-101 built from it; 5-shot has the same keys) convert
  using every key exactly once into exactly the model's variable tree; wrong
  checkpoints get a message naming what they are.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  extra_fixture_paths,
  leaf,
  load_fixture,
  parity_fixture,
  run_train_steps,
)

from checkpoints import fixtures, parity
from checkpoints.verify import model_outputs, verify_fixture
from fss_jax import keymaps
from fss_jax.models import registry, sccan

OFFICIAL = "sccan_1shot_241_b2"


def _check_report(report, meta):
  print("\n".join(report["lines"]))
  assert report["model"] == "sccan"
  out = report["outputs"]["out_logits"]
  assert out["scale"] > 0.5  # real logits were compared
  assert out["max_abs"] <= 1e-4 * max(1.0, out["scale"]), out
  assert out["argmax_agree"] >= 0.999
  assert report["passed"]
  mids = report["intermediates"]
  index_names = [n for n in meta["tensors"] if n.endswith("_window_index")]
  assert len(index_names) == 8
  differing = [n for n in index_names if mids[n]["max_abs"] != 0.0]
  if differing:  # integer window matches: exact, except where two windows tie in float32
    _check_window_ties(report["fixture"], differing)
  for name in ("mid_prior_mask", "mid_meta_logits_64", "mid_transformer_out__c8"):
    e = mids[name]
    assert e["max_abs"] <= 1e-4 * max(1.0, e["scale"]), (name, e)
  # Deep backbone-derived maps: relative 1e-3 (shared/parity/README.md).
  for name, e in mids.items():
    if name in index_names:
      continue
    assert e["max_abs"] is not None and e["max_abs"] <= 1e-3 * max(1.0, e["scale"]), (name, e)


def _check_window_ties(fixture: str, names: list[str]) -> None:
  """Where our window index differs from the official one, both windows must score the same
  to float32 rounding in our alignment (a tie: the argmax is then the rounding's choice)."""
  arrays, meta = fixtures.load_fixture(fixture)
  _, out = model_outputs(arrays, meta)  # the forward verify_fixture ran
  blocks = out["intermediates"]["transformer"]
  for name in names:
    n = int(re.search(r"block(\d+)_window_index", name).group(1))
    ours = np.asarray(blocks[f"blocks_{n}"]["window_index"])
    scores = np.asarray(blocks[f"blocks_{n}"]["window_scores"])  # [B, support, query]
    ref = arrays[name].reshape(ours.shape)
    for b, j in np.argwhere(ours != ref):
      mine, theirs = scores[b, ours[b, j], j], scores[b, ref[b, j], j]
      assert abs(mine - theirs) <= 1e-6 * abs(mine), (name, b, j, mine, theirs)


def test_parity_official_fixture():
  path = parity_fixture("sccan", OFFICIAL)
  _, meta, _ = load_fixture("sccan", OFFICIAL)
  assert parity.for_fixture(meta).model == "sccan"
  _check_report(verify_fixture(path), meta)


@pytest.mark.parametrize(
  "path", extra_fixture_paths("sccan", exclude=(OFFICIAL,)), ids=lambda p: p.stem
)
def test_parity_other_fixtures(path):
  """Unseen fixtures (other shots / sizes / backbones) made with the official code."""
  meta = json.loads(path.with_suffix(".json").read_text())
  _check_report(verify_fixture(path), meta)


# -- robustness -------------------------------------------------------------------------------


def _episode_shapes(b, k, h, w):
  f32, i32 = jnp.float32, jnp.int32
  return {
    "query_image": jax.ShapeDtypeStruct((b, h, w, 3), f32),
    "support_images": jax.ShapeDtypeStruct((b, k, h, w, 3), f32),
    "support_masks": jax.ShapeDtypeStruct((b, k, h, w), i32),
    "query_mask": jax.ShapeDtypeStruct((b, h, w), i32),
    "class_id": jax.ShapeDtypeStruct((b,), i32),
  }


def _variable_shapes(model, episode):
  return jax.eval_shape(lambda e: model.init(jax.random.PRNGKey(0), e, train=False), episode)


@pytest.fixture(scope="module")
def r50_shapes():
  model = sccan.make_model(shot=5, layers=50)
  ep = _episode_shapes(1, 5, 97, 113)
  return model, ep, _variable_shapes(model, ep)


def test_five_shot_non_square_shapes(r50_shapes):
  model, ep, variables = r50_shapes
  out = jax.eval_shape(lambda v, e: model.apply(v, e, train=False), variables, ep)
  assert out["logits"].shape == (1, 97, 113, 2)
  assert out["logits_low"].shape == (1, 64, 64, 2)
  assert out["prior"].shape == (1, 64, 64, 1)
  # Training mode (dropout) and the loss trace too.
  loss = jax.eval_shape(
    lambda v, e: sccan.loss_fn(
      model.apply(v, e, train=True, rngs={"dropout": jax.random.PRNGKey(1)}), e
    )[0],
    variables,
    ep,
  )
  assert loss.shape == ()


def test_shot_mismatch_is_a_clear_error(r50_shapes):
  model, _, variables = r50_shapes
  with pytest.raises(ValueError, match=r"1 supports per query.*5-shot"):
    jax.eval_shape(
      lambda v, e: model.apply(v, e, train=False), variables, _episode_shapes(1, 1, 65, 65)
    )


# -- key map ----------------------------------------------------------------------------------


def _official_keys():
  _, meta, _ = load_fixture("sccan", OFFICIAL)
  return [(e["key"], tuple(e["shape"])) for e in meta["state_dict"]["keys"]]


def _r101_keys(r50):
  """ResNet-101 keys: layer3 has 23 blocks; blocks 6..22 are shaped like block 5."""
  out = []
  for key, shape in r50:
    out.append((key, shape))
    if key.startswith("backbone.body.layer3.5."):
      last_of_block5 = key.endswith("layer3.5.bn3.running_var")
      if last_of_block5:
        block5 = [(k, s) for k, s in r50 if k.startswith("backbone.body.layer3.5.")]
        for b in range(6, 23):
          out += [(k.replace("layer3.5.", f"layer3.{b}."), s) for k, s in block5]
  return out


def _synthetic(keys, prefix=""):
  return {prefix + k: np.zeros(s, np.float32) for k, s in keys}


def _flat_shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(p.key for p in path): tuple(v.shape) for path, v in flat}


def test_keymap_uses_every_official_key_once(r50_shapes):
  keys = _official_keys()
  assert len(keys) == 489
  rules = sccan.keymap(shot=1, layers=50)
  assert sorted(r.src for r in rules if isinstance(r, keymaps.Rule)) == sorted(k for k, _ in keys)
  sd = keymaps.strip_prefixes(_synthetic(keys, prefix="module."))  # COCO DDP checkpoints
  variables = keymaps.convert(sd, registry.get("sccan").keymap(shot=5, layers=50), model="sccan")
  _, _, want = r50_shapes  # a 5-shot model: same keys
  assert _flat_shapes(variables) == _flat_shapes(want)
  n_train = sum(
    int(np.prod(s))
    for p, s in _flat_shapes(variables).items()
    if p[0] == "params" and p[1] != "backbone"
  )
  assert n_train == 11_373_314  # sccan.md §9.3


def test_keymap_resnet101():
  keys = _r101_keys(_official_keys())
  assert len(keys) == 744
  model = sccan.make_model(shot=1, layers=101)
  want = _variable_shapes(model, _episode_shapes(1, 1, 65, 65))
  variables = keymaps.convert(_synthetic(keys), sccan.keymap(layers=101), model="sccan")
  assert _flat_shapes(variables) == _flat_shapes(want)


def test_wrong_backbone_is_named():
  r101 = _synthetic(_r101_keys(_official_keys()))
  with pytest.raises(keymaps.ConversionError, match=r"(?s)unexpected keys.*layer3\.6"):
    keymaps.convert(r101, sccan.keymap(layers=50), model="sccan")
  with pytest.raises(ValueError, match=r"ResNet-101 backbone.*layers=50.*pass layers=101"):
    sccan.check_checkpoint(r101, shot=1, layers=50)
  sccan.check_checkpoint(r101, shot=1, layers=101)  # fine


def test_wrong_shot_is_named_from_the_released_file_name():
  sd = _synthetic(_official_keys())
  five = "exp/pascal/SCCAN/split0/resnet50/snapshot/win8_train5_epoch_21_0.6987.pth"
  one = "exp/pascal/SCCAN/split0/resnet50/snapshot/win8_train_epoch_43_0.6753.pth"
  assert sccan.describe_checkpoint(list(sd), five) == {"layers": 50, "shot": 5}
  assert sccan.describe_checkpoint(list(sd), one) == {"layers": 50, "shot": 1}
  assert sccan.describe_checkpoint(list(sd), "best.pth")["shot"] is None
  with pytest.raises(ValueError, match=r"5-shot model.*shot=1 was asked"):
    sccan.check_checkpoint(sd, shot=1, layers=50, source=five)
  with pytest.raises(ValueError, match=r"1-shot model.*pass shot=1"):
    sccan.check_checkpoint(sd, shot=5, layers=50, source=one)
  sccan.check_checkpoint(sd, shot=5, layers=50, source=five)
  with pytest.raises(ValueError, match="not an SCCAN checkpoint"):
    sccan.check_checkpoint({"conv1.weight": np.zeros((64, 3, 3, 3))}, shot=1)


def test_convert_cli_names_the_wrong_checkpoint(tmp_path, capsys):
  from checkpoints import convert

  src = tmp_path / "win8_train5_epoch_21_0.6987.npz"  # a released 5-shot name
  np.savez(src, **_synthetic(_r101_keys(_official_keys())))
  dst = tmp_path / "out"
  rc = convert.main(
    [
      "--model",
      "sccan",
      "--src",
      str(src),
      "--dst",
      str(dst),
      "--model-arg",
      "layers=50",
      "--model-arg",
      "shot=1",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and not dst.exists()
  assert "ResNet-101 backbone" in err and "5-shot model" in err


# -- loss -------------------------------------------------------------------------------------


def test_loss_is_sigmoid_dice_with_ce_reported():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 9, 9, 2)).astype(np.float32)
  y = rng.integers(0, 2, (2, 9, 9)).astype(np.int32)
  y[0, 0, :4] = 255
  loss, metrics = sccan.loss_fn({"logits": jnp.asarray(logits)}, {"query_mask": jnp.asarray(y)})
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  t = np.stack([y == 0, y == 1], -1).astype(np.float64)
  dice = 1 - 2 * (t * p).sum((1, 2)) / ((p * p).sum((1, 2)) + (t * t).sum((1, 2)))
  np.testing.assert_allclose(float(loss), dice.sum() / 2, rtol=1e-5)
  assert set(metrics) == {"dice", "ce", "loss"} and float(metrics["ce"]) > 0


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "arg,episodes,epochs", [("", 1000, 200), ("dataset=coco,fold=2,shot=5,layers=101", 4000, 50)]
)
def test_config_recipe(arg, episodes, epochs):
  from configs import sccan as cfg_sccan

  c = cfg_sccan.get_config(arg)
  assert c.model == "sccan" and c.eval.episodes == episodes and c.epochs == epochs
  assert c.eval.seeds == (321,) and c.data.test_resize == "aspect"
  assert c.data.train_size == c.data.test_size == 473
  assert dict(c.model_fields)["shot"] == c.shot and dict(c.model_fields)["layers"] == c.layers
  assert c.optim.optimizer == "sgd" and c.optim.groups.transformer.optimizer == "adamw"


def test_config_two_optimisers(r50_shapes):
  from configs import sccan as cfg_sccan
  from fss_jax.train import optim

  c = cfg_sccan.get_config("shot=5")
  _, _, variables = r50_shapes
  opt = optim.build(c.optim, variables["params"], total_steps=1000, frozen=sccan.SPEC.frozen)
  flat = jax.tree_util.tree_flatten_with_path(opt.labels)[0]
  labels = {"/".join(k.key for k in path): v for path, v in flat}
  for path, label in labels.items():
    if path.startswith("backbone/"):
      assert label == optim.FROZEN, path
    elif path.startswith("transformer/"):
      assert label == "transformer", path
    else:
      assert label == "default*10", path
  lrs = opt.learning_rates(0)
  np.testing.assert_allclose(lrs["default*10"], 0.05 * (1 - 1 / 1000) ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(lrs["transformer"], 6e-5, rtol=1e-6)
  np.testing.assert_allclose(opt.learning_rates(999)["transformer"], 6e-5, rtol=1e-6)
  assert re.fullmatch(sccan.SPEC.frozen[0], "backbone/layer1_0/conv1/kernel")


# -- training ---------------------------------------------------------------------------------


def _synthetic_episode(rng, b, h):
  """Query and support share a bright square: a learnable foreground."""
  img = rng.standard_normal((b, 2, h, h, 3)).astype(np.float32) * 0.3
  masks = np.zeros((b, 2, h, h), np.int32)
  for i in range(b):
    for j in range(2):
      y, x = rng.integers(0, h // 2, 2)
      masks[i, j, y : y + h // 2, x : x + h // 2] = 1
  img += 2.0 * masks[..., None]
  return {
    "query_image": jnp.asarray(img[:, 0]),
    "query_mask": jnp.asarray(masks[:, 0]),
    "support_images": jnp.asarray(img[:, 1:]),
    "support_masks": jnp.asarray(masks[:, 1:]),
    "class_id": jnp.zeros((b,), jnp.int32),
  }


def test_smoke_config_trains_with_both_optimisers():
  """Engine train_step with the smoke config (grid 32, 2 blocks): the loss goes down,
  the backbone stays frozen, SGD and AdamW groups both move."""

  from checkpoints import fixtures
  from configs import sccan as cfg_sccan
  from fss_jax.train import optim

  c = cfg_sccan.get_config("smoke")
  spec = registry.get("sccan")
  fields = dict(c.model_fields, feature_dropout=0.0, classifier_dropout=0.0)  # deterministic
  model = spec.make_model(**fields)
  assert model.grid == 32 and model.depth == 2
  # Weights: the fixture rule (cheaper than compiling a ResNet-50 init), blocks 0-1 only.
  _, meta, _ = load_fixture("sccan", OFFICIAL)
  sd = {
    k: v
    for k, v in fixtures.regenerate(meta).items()
    if not re.match(r"transformer\.layers\.0\.blocks\.[2-9]\.", k)
  }
  variables = jax.tree.map(jnp.asarray, keymaps.convert(sd, spec.keymap(**fields)))
  opt = optim.build(c.optim, variables["params"], total_steps=c.total_steps, frozen=spec.frozen)
  assert set(opt.summary) == {"frozen", "default*10", "transformer"}
  batch = _synthetic_episode(np.random.default_rng(0), 2, 33)
  before, after, losses, metrics = run_train_steps(
    spec, model, variables, c.optim, batch, total_steps=c.total_steps
  )
  assert np.isfinite(float(metrics["ce"]))
  assert losses[-1] < losses[0], losses
  np.testing.assert_array_equal(
    after["backbone"]["conv1"]["kernel"], before["backbone"]["conv1"]["kernel"]
  )  # frozen
  for path in (("transformer", "norm0", "scale"), ("down_query", "kernel")):  # AdamW, SGD
    assert not np.array_equal(leaf(after, path), leaf(before, path)), path
