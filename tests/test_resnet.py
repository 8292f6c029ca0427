"""ResNet backbones: parity with the three backbone fixtures, torch-exact layers.

One forward per fixture: torchvision ResNet-50 (224), SCCAN's backbone (129),
the PSPNet deep-stem backbone's layer0..layer4 (129), and an "unseen"
torchvision fixture built here (96x96, batch 2, another GLOBAL_SEED) to show
that verify reads sizes and batches from the json.
"""

from __future__ import annotations

import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, parity_fixture

from checkpoints import fixtures
from checkpoints.verify import verify_fixture
from fss_jax import keymaps
from fss_jax.nn import layers
from fss_jax.nn.backbones import resnet

torch = pytest.importorskip("torch")


def _rel(pred, ref) -> float:
  return float(np.max(np.abs(pred - ref)) / max(1.0, np.max(np.abs(ref))))


def _assert_report(report, expected_outputs):
  assert set(report["outputs"]) == set(expected_outputs)
  for name, e in report["outputs"].items():
    assert e["max_abs"] is not None, name
    assert e["max_abs"] <= 1e-4 * max(1.0, e["scale"]), (name, e)
    assert e["scale"] > 1.0, (name, e)  # real, non-trivial numbers were compared
  assert report["passed"]


def test_verify_torchvision_fixture():
  report = verify_fixture(parity_fixture("backbone_torchvision_resnet50"))
  print("\n".join(report["lines"]))
  assert report["model"] == "resnet_torchvision"
  _assert_report(report, ["out_logits"])
  assert report["outputs"]["out_logits"]["argmax_agree"] == 1.0
  # The informational stage maps agree as well (1e-3 relative for the deep ones).
  mids = report["intermediates"]
  assert {"mid_stem", "mid_layer1", "mid_layer2", "mid_layer3", "mid_layer4", "mid_avgpool"} <= set(
    mids
  )
  for name, e in mids.items():
    assert e["max_abs"] <= 1e-3 * max(1.0, e["scale"]), (name, e)


def test_verify_sccan_fixture():
  report = verify_fixture(parity_fixture("backbone_sccan_resnet50"))
  print("\n".join(report["lines"]))
  assert report["model"] == "resnet_sccan"
  _assert_report(report, [f"out_layer{i}" for i in range(1, 5)])
  assert report["intermediates"]["mid_stem"]["max_abs"] <= 1e-4 * 8


def test_pspnet_fixture_layer0_to_layer4():
  arrays, meta, _ = load_fixture("backbone_pspnet_resnet50")
  state = {k: v for k, v in fixtures.regenerate(meta).items() if k.startswith("layer")}
  variables = keymaps.convert(state, resnet.resnet_keymap(stem="deep", naming="pspnet"))
  model = resnet.ResNetDeepStem()
  x = jnp.asarray(np.transpose(arrays["in_img"], (0, 2, 3, 1)))
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  for i in range(5):
    ref = arrays[f"out_layer{i}"]
    pred = np.transpose(np.asarray(out[f"layer{i}"]), (0, 3, 1, 2))
    assert pred.shape == ref.shape
    tol = 1e-3 if i >= 3 else 1e-4  # parity README: deep maps compared relatively
    rel = _rel(pred, ref)
    print(f"out_layer{i} rel {rel:.2e} scale {np.abs(ref).max():.1f}")
    assert rel <= tol, (i, rel)


# -- unseen fixtures, written here the way shared/parity/ writes them -----------------------


def _rule(owner, key: str) -> str:
  leaf = key.rsplit(".", 1)[-1]
  if "BatchNorm" in type(owner).__name__:  # BatchNorm2d and FrozenBatchNorm2d
    return {
      "weight": "norm_weight",
      "bias": "norm_bias",
      "running_mean": "running_mean",
      "running_var": "running_var",
      "num_batches_tracked": "num_batches_tracked",
    }[leaf]
  if isinstance(owner, torch.nn.Conv2d):
    return "conv" if leaf == "weight" else "bias"
  if isinstance(owner, torch.nn.Linear):
    return "linear" if leaf == "weight" else "bias"
  raise AssertionError(key)


def _rule_value(rule, key, shape, seed):
  f32 = np.float32
  if rule == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  n = np.random.default_rng(zlib.crc32(key.encode()) ^ seed).standard_normal(shape).astype(f32)
  return {
    "conv": lambda: n * f32(math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))),
    "linear": lambda: n * f32(math.sqrt(1.0 / shape[1])),
    "bias": lambda: n * f32(0.01),
    "norm_weight": lambda: f32(1) + f32(0.1) * n,
    "norm_bias": lambda: f32(0.1) * n,
    "running_mean": lambda: f32(0.1) * n,
    "running_var": lambda: f32(1) + f32(0.1) * np.abs(n),
  }[rule]()


def _load_rule_weights(model, seed: int) -> list[dict]:
  """Fills `model` with the parity weight rule; returns the json key entries."""
  owners = dict(model.named_modules())
  entries, state = [], {}
  for key, t in model.state_dict().items():
    owner = owners[key.rsplit(".", 1)[0]]
    rule = _rule(owner, key)
    v = _rule_value(rule, key, tuple(t.shape), seed)
    state[key] = torch.from_numpy(v)
    entries.append(
      {
        "key": key,
        "shape": list(t.shape),
        "dtype": str(v.dtype),
        "rule": rule,
        "owner": type(owner).__name__,
        "check": [float(v.astype(np.float64).sum()), float(v.reshape(-1)[0]) if v.size else 0.0],
      }
    )
  model.load_state_dict(state)
  return entries


def _sccan_like_backbone(torchvision):
  """SCCAN's Backbone rebuilt from torchvision parts: deep stem, FrozenBatchNorm2d,
  replace_stride_with_dilation=[False, True, True], keys ``backbone.body.*``."""
  import collections

  from torchvision.models.resnet import Bottleneck, ResNet
  from torchvision.ops.misc import FrozenBatchNorm2d

  tv = ResNet(
    Bottleneck,
    [3, 4, 6, 3],
    replace_stride_with_dilation=[False, True, True],
    norm_layer=FrozenBatchNorm2d,
  )
  tv.inplanes, tv.dilation = 128, 1
  stages = [
    tv._make_layer(Bottleneck, 64, 3),
    tv._make_layer(Bottleneck, 128, 4, stride=2),
    tv._make_layer(Bottleneck, 256, 6, stride=2, dilate=True),
    tv._make_layer(Bottleneck, 512, 3, stride=2, dilate=True),
  ]
  conv = lambda i, o, s: torch.nn.Conv2d(i, o, 3, s, 1, bias=False)
  body = torch.nn.Sequential(
    collections.OrderedDict(
      conv1=conv(3, 64, 2),
      bn1=FrozenBatchNorm2d(64),
      relu1=torch.nn.ReLU(),
      conv2=conv(64, 64, 1),
      bn2=FrozenBatchNorm2d(64),
      relu2=torch.nn.ReLU(),
      conv3=conv(64, 128, 1),
      bn3=FrozenBatchNorm2d(128),
      relu3=torch.nn.ReLU(),
      maxpool=torch.nn.MaxPool2d(3, 2, 1),
      **{f"layer{i + 1}": s for i, s in enumerate(stages)},
    )
  )
  holder = torch.nn.Module()
  holder.backbone = torch.nn.Module()
  holder.backbone.body = body
  return holder.eval()


@pytest.mark.parametrize("kind", ["torchvision", "sccan"])
def test_verify_unseen_fixture(kind, tmp_path):
  """Other sizes, batch and GLOBAL_SEED than shared/parity: verify reads them from the json."""
  torchvision = pytest.importorskip("torchvision")
  if kind == "torchvision":
    seed, size, batch = 777, 96, 2
    model = torchvision.models.resnet50(weights=None).eval()
    model_class, fixture = (
      "torchvision.models.resnet.ResNet (resnet50)",
      "backbone_torchvision_resnet50",
    )
  else:
    seed, size, batch = 4242, 81, 2
    model = _sccan_like_backbone(torchvision)
    model_class, fixture = "model.backbone_utils.Backbone", "backbone_sccan_resnet50"
  entries = _load_rule_weights(model, seed)
  x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    if kind == "torchvision":
      outputs = {"out_logits": model(torch.from_numpy(x)).numpy()}
    else:
      outputs, y = {}, torch.from_numpy(x)
      for name, child in model.backbone.body.named_children():
        y = child(y)
        if name.startswith("layer"):
          outputs[f"out_{name}"] = y.numpy()
  meta = {
    "fixture": fixture,
    "model_class": model_class,
    "GLOBAL_SEED": seed,
    "state_dict": {"num_keys": len(entries), "keys": entries},
    "overrides": {},
    "input_shapes": {"in_img": list(x.shape)},
  }
  path = tmp_path / f"{fixture}_{size}_b{batch}.npz"
  np.savez_compressed(path, in_img=x, **outputs)
  path.with_suffix(".json").write_text(json.dumps(meta))

  report = verify_fixture(path)
  print("\n".join(report["lines"]))
  _assert_report(report, list(outputs))
  assert report["model"] == f"resnet_{kind}"


# -- structure and layers -------------------------------------------------------------------


def test_block_plans_match_the_references():
  sizes = resnet.stage_sizes(50)
  psp = resnet.block_plan(sizes, 8, "pspnet")
  tv = resnet.block_plan(sizes, 8, "torchvision")
  plain = resnet.block_plan(sizes, 32)
  # hdmnet.md 1.1: every block of layer3 dilation 2, of layer4 dilation 4, stride 1.
  assert psp[2] == [(1, 2)] * 6 and psp[3] == [(1, 4)] * 3 and psp[1][0] == (2, 1)
  # sccan.md 1.1: the first block of a dilated stage keeps the previous dilation.
  assert tv[2] == [(1, 1)] + [(1, 2)] * 5 and tv[3] == [(1, 2)] + [(1, 4)] * 2
  assert [s[0] for s in plain] == [(1, 1), (2, 1), (2, 1), (2, 1)]
  assert resnet.stage_sizes(101) == (3, 4, 23, 3)
  with pytest.raises(ValueError, match="depth"):
    resnet.stage_sizes(34)


def test_variant_shapes_and_keymaps_fit():
  """Every variant's key map covers exactly its parameters (abstract init, no compute)."""
  x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
  cases = [
    (
      resnet.ResNetTorchvision(include_head=True),
      dict(stem="torchvision", include_head=True),
      (17, 17, 9, 5, 3),
    ),
    (resnet.ResNetDeepStem(), dict(stem="deep", naming="pspnet"), (17, 17, 9, 9, 9)),
    (resnet.ResNetSCCAN(), dict(stem="deep", naming="resnet_v2"), (17, 17, 9, 9, 9)),
    (resnet.ResNetDeepStem(depth=101), dict(stem="deep", depth=101), (17, 17, 9, 9, 9)),
    (resnet.ResNetSSP(), dict(stem="deep", naming="ssp", num_stages=3), (17, 17, 9, 9)),
  ]
  for model, km, sizes in cases:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))  # noqa: B023 (called in this iteration)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape)), variables)  # noqa: B023 (called in this iteration)
    assert [out[f"layer{i}"].shape[1] for i in range(len(sizes))] == list(sizes)
    flat = {
      tuple(str(getattr(k, "key", k)) for k in p)
      for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    rules = [r for r in resnet.resnet_keymap(**km) if isinstance(r, keymaps.Rule)]
    assert {r.dst for r in rules} == flat
  # SSP (last case): layers 0-3 only.
  assert out["layer3"].shape == (1, 9, 9, 1024) and "layer4" not in out


def test_keymap_prefix_and_ignored_head():
  km = resnet.resnet_keymap(stem="deep", prefix="backbone.body.", dst=("backbone",))
  srcs = {r.src for r in km}
  assert "backbone.body.conv3.weight" in srcs and "backbone.body.fc.weight" in srcs
  assert all(r.dst[1] == "backbone" for r in km if isinstance(r, keymaps.Rule))
  with pytest.raises(ValueError, match="cannot use"):
    resnet.resnet_keymap(stem="deep", naming="torchvision")


def test_conv2d_matches_torch():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 11, 9)).astype(np.float32)
  for k, s, p, d, g in [(3, 2, 1, 1, 1), (3, 1, 2, 2, 3), (7, 2, 3, 1, 1), (2, 2, 0, 1, 6)]:
    tconv = torch.nn.Conv2d(6, 12, k, s, p, d, g, bias=True)
    with torch.no_grad():
      ref = tconv(torch.from_numpy(x)).numpy()
    v = {
      "params": {
        "kernel": tconv.weight.detach().numpy().transpose(2, 3, 1, 0),
        "bias": tconv.bias.detach().numpy(),
      }
    }
    out = layers.Conv2d(12, k, s, p, d, g).apply(v, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-5)


def test_batchnorm_train_and_eval_match_torch():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((4, 5, 3, 7)) * 3 + 1).astype(np.float32)
  tbn = torch.nn.BatchNorm2d(5)
  with torch.no_grad():
    tbn.weight.uniform_(0.5, 1.5), tbn.bias.uniform_(-1, 1)
    tbn.running_mean.uniform_(-1, 1), tbn.running_var.uniform_(0.5, 2)
  v = {
    "params": {
      "scale": tbn.weight.detach().numpy().copy(),
      "bias": tbn.bias.detach().numpy().copy(),
    },
    "batch_stats": {"mean": tbn.running_mean.numpy().copy(), "var": tbn.running_var.numpy().copy()},
  }
  xh = jnp.asarray(x.transpose(0, 2, 3, 1))
  bn = layers.BatchNorm2d()
  tbn.eval()
  with torch.no_grad():
    ref = tbn(torch.from_numpy(x)).numpy()
  out = bn.apply(v, xh, use_running_average=True)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-5)
  tbn.train()
  with torch.no_grad():
    ref = tbn(torch.from_numpy(x)).numpy()
  out, upd = bn.apply(v, xh, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), atol=1e-6)


def test_frozen_resnet_ignores_train_flag():
  x = jnp.ones((1, 16, 16, 3))
  frozen = resnet.ResNet(depth=50, num_stages=1, frozen=True)
  unfrozen = resnet.ResNet(depth=50, num_stages=1, frozen=False)
  shapes = jax.eval_shape(frozen.init, jax.random.key(0), x)
  v = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)

  @jax.jit
  def run(v):
    a = frozen.apply(v, x, train=True)["layer1"]  # frozen: no mutable batch_stats needed
    b = frozen.apply(v, x, train=False)["layer1"]
    _, upd = unfrozen.apply(v, x, train=True, mutable=["batch_stats"])
    return a, b, upd

  a, b, upd = run(v)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
