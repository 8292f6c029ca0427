"""PSPNet base learner: parity with the backbone_pspnet_resnet50 fixture, PPM against
numpy, BAM / HDMNet key maps, base-class training forward, missing-checkpoint message."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, parity_fixture
from flax import traverse_util

from checkpoints import fixtures, parity
from checkpoints.parity import pspnet as pspnet_parity
from checkpoints.verify import verify_fixture
from fss_jax import keymaps
from fss_jax.models import pspnet, registry
from fss_jax.nn.ppm import PPM, ppm_keymap


def _shapes(tree) -> dict:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def backbone_fixture():
  arrays, meta, path = load_fixture("backbone_pspnet_resnet50")
  return arrays, meta, path, fixtures.regenerate(meta)


def test_registry_names():
  assert registry.get("pspnet") is pspnet.SPECS["pspnet"]
  assert parity.get("pspnet_backbone") is pspnet_parity.BACKBONE_PARITY
  _, meta, _ = load_fixture("backbone_pspnet_resnet50")
  assert parity.for_fixture(meta).model == "pspnet_backbone"


def test_verify_backbone_fixture():
  report = verify_fixture(parity_fixture("backbone_pspnet_resnet50"))
  print("\n".join(report["lines"]))
  assert report["model"] == "pspnet_backbone"
  expected = {f"out_layer{i}" for i in range(5)} | {"out_ppm_cls", "out_base_logits"}
  assert set(report["outputs"]) == expected
  for name, e in report["outputs"].items():
    assert e["scale"] > 1.0, (name, e)
    assert e["max_abs"] <= 1e-4 * e["scale"], (name, e)
  assert report["outputs"]["out_base_logits"]["argmax_agree"] == 1.0
  ppm = report["intermediates"]["mid_ppm__chmean"]
  assert ppm["max_abs"] <= 1e-4 * ppm["scale"], ppm
  assert report["passed"]


def _np_adaptive_avg(x, out):
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c), np.float64)
  for i in range(out):
    for j in range(out):
      h0, h1 = (i * h) // out, -((-(i + 1) * h) // out)
      w0, w1 = (j * w) // out, -((-(j + 1) * w) // out)
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


def _np_resize_ac(x, size):
  """bilinear align_corners=True, numpy."""
  b, h, w, c = x.shape

  def axis_w(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
      s = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
      i0 = min(int(np.floor(s)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      m[o, i0] += 1 - (s - i0)
      m[o, i1] += s - i0
    return m

  return np.einsum("oh,bhwc,pw->bopc", axis_w(h, size[0]), x, axis_w(w, size[1]))


def test_ppm_matches_numpy_with_overlapping_bins():
  # 10x10 -> bins 3 and 6 overlap (torch adaptive bins), as COCO's 80x80 maps do.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 10, 10, 8)).astype(np.float32)
  sd = {}
  for i in range(2):
    sd[f"ppm.features.{i}.1.weight"] = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    sd[f"ppm.features.{i}.2.weight"] = (1 + 0.1 * rng.standard_normal(4)).astype(np.float32)
    sd[f"ppm.features.{i}.2.bias"] = (0.1 * rng.standard_normal(4)).astype(np.float32)
    sd[f"ppm.features.{i}.2.running_mean"] = (0.1 * rng.standard_normal(4)).astype(np.float32)
    sd[f"ppm.features.{i}.2.running_var"] = (1 + rng.random(4)).astype(np.float32)
    sd[f"ppm.features.{i}.2.num_batches_tracked"] = np.zeros((), np.int64)
  variables = keymaps.convert(sd, ppm_keymap("ppm", (), num_bins=2))
  with jax.default_matmul_precision("highest"):
    y = np.asarray(PPM(bins=(3, 6), reduction=4).apply(variables, jnp.asarray(x)))
  ref = [x.astype(np.float64)]
  for i, b in enumerate((3, 6)):
    p = _np_adaptive_avg(x.astype(np.float64), b)
    p = np.einsum("bhwc,oc->bhwo", p, sd[f"ppm.features.{i}.1.weight"][:, :, 0, 0])
    p = (p - sd[f"ppm.features.{i}.2.running_mean"]) / np.sqrt(
      sd[f"ppm.features.{i}.2.running_var"] + 1e-5
    )
    p = np.maximum(p * sd[f"ppm.features.{i}.2.weight"] + sd[f"ppm.features.{i}.2.bias"], 0)
    ref.append(_np_resize_ac(p, (10, 10)))
  ref = np.concatenate(ref, -1)
  assert y.shape == (2, 10, 10, 16)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def _bam_state_dict(hdmnet_named: dict) -> dict:
  """BAM best.pth naming from HDMNet's: cls.4 classifier + the `encoder` duplicates."""
  out = {}
  for k, v in hdmnet_named.items():
    k2 = k.replace("base_learnear.2.", "cls.4.")
    out[k2] = v
    if k.startswith("layer"):
      layer, rest = k.split(".", 1)
      out[f"encoder.{int(layer[5:])}.{rest}"] = v
  return out


def test_keymaps_use_every_official_key_once(backbone_fixture):
  _, meta, _, state = backbone_fixture
  model = pspnet.make_model(num_classes=16)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), {"query_image": jnp.zeros((1, 33, 33, 3))})
  )
  want = {c: _shapes(abstract[c]) for c in ("params", "batch_stats")}
  for naming, sd in (("hdmnet", state), ("bam", _bam_state_dict(state))):
    rules = pspnet.pspnet_keymap(naming=naming)
    assert len({r.src for r in rules}) == len(rules)
    assert {r.src for r in rules} == set(sd), naming  # every key has exactly one rule
    variables = keymaps.convert(
      keymaps.strip_prefixes({f"module.{k}": v for k, v in sd.items()}), rules, model="pspnet"
    )
    assert {c: _shapes(variables[c]) for c in want} == want, naming
  n_backbone = sum(k.startswith("layer") for k in state)
  assert len(_bam_state_dict(state)) == len(state) + n_backbone  # the encoder.N copies
  # A checkpoint of the wrong dataset / a missing key is reported by name.
  bad = dict(_bam_state_dict(state))
  del bad["cls.0.weight"]
  with pytest.raises(keymaps.ConversionError, match="cls.0.weight"):
    keymaps.convert(bad, pspnet.pspnet_keymap(naming="bam"))


def test_base_training_forward_updates_batch_norm(backbone_fixture):
  model = pspnet.make_model(num_classes=16)
  rng = np.random.default_rng(1)
  image = jnp.asarray(rng.standard_normal((2, 33, 33, 3)).astype(np.float32))
  label = rng.integers(0, 16, (2, 33, 33)).astype(np.int32)
  label[:, :5] = 255
  episode = {"image": image, "label": jnp.asarray(label)}  # make_base_train_loader batch
  # Weights from the fixture's rule (a jitted init would cost another compile).
  variables = keymaps.convert(backbone_fixture[3], pspnet.pspnet_keymap(naming="hdmnet"))

  @jax.jit
  def step(v, e):
    out, new = model.apply(
      v, e, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"]
    )
    loss, metrics = pspnet.loss_fn(out, e)
    return out, new, loss, metrics

  out, new, loss, metrics = step(variables, episode)
  assert out["logits"].shape == (2, 33, 33, 16)
  assert out["base_logits"].shape == (2, 5, 5, 16)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(metrics["ce"]) == float(loss)
  # BatchNorm trains in base-learner training (BAM train_base.py has no fix_bn).
  old = variables["batch_stats"]["ppm"]["features_0"]["bn"]["mean"]
  assert not np.allclose(new["batch_stats"]["ppm"]["features_0"]["bn"]["mean"], old)
  with pytest.raises(KeyError, match="make_base_train_loader"):
    pspnet.loss_fn(out, {"query_image": image})
  # Episodes with a base annotation train it as well (same numbers).
  loss2, _ = pspnet.loss_fn(out, {"query_image": image, "query_base_label": jnp.asarray(label)})
  assert float(loss2) == float(loss)


def test_output_size_rule():
  assert pspnet.output_size(473) == 473
  assert pspnet.output_size(417, 8) == 417
  assert pspnet.output_size(473, 4) == 237
  assert pspnet.num_base_classes("pascal5i") == 16
  assert pspnet.num_base_classes("coco20i") == 61


def test_config_recipe_and_missing_base_learner_message():
  from configs import hdmnet as hdmnet_config
  from configs import pspnet as pspnet_config

  c = pspnet_config.get_config("dataset=pascal,fold=1")
  assert (c.model, c.model_fields.num_classes, c.data.train_size, c.batch_size, c.epochs) == (
    "pspnet",
    16,
    417,
    12,
    100,
  )
  assert c.optim.lr == 2.5e-4 and c.optim.optimizer == "sgd"
  assert c.optim.lr_mults == ((r"(ppm|cls_conv|cls_bn|classifier)/.*", 10.0),)
  coco = pspnet_config.get_config("dataset=coco,fold=3")
  assert (coco.model_fields.num_classes, coco.epochs, coco.optim.lr_mults) == (
    61,
    20,
    ((".*", 10.0),),
  )
  smoke = pspnet_config.get_config("smoke")
  assert smoke.total_steps == 3 and smoke.data.train_size == 65
  # The HDMNet config says how to get the fold's base learner.
  h = hdmnet_config.get_config("dataset=pascal,fold=2,shot=5")
  assert h.init_required and h.init_prefix == "pspnet"
  for text in (
    "python -m fss_jax.main --config configs/pspnet.py:dataset=pascal,fold=2",
    "python -m checkpoints.convert --model pspnet",
    "initmodel/PSPNet/pascal/split2/resnet50/best.pth",
    "pascal5i fold 2",
  ):
    assert text in h.init_help, text
  msg = pspnet_config.base_learner_help("coco", 0, "/nowhere/psp")
  assert "config.init='/nowhere/psp' does not exist" in msg
  assert "configs/pspnet.py:dataset=coco,fold=0" in msg
  assert not hdmnet_config.get_config("smoke").init_required
