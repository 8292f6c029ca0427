"""checkpoints/: fixture regeneration, state-dict readers, convert and verify CLIs.

The conversion test saves a random torchvision ResNet-50 (with randomised BN
statistics) through torch.save, converts it with the CLI and compares the
Flax forward (64x64) with torch's. The rest checks the failure modes: wrong
architecture, existing destination, truncated files, unsupported fixtures.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_fixture

from checkpoints import convert, fixtures, verify
from checkpoints import io as ckpt_io
from fss_jax.models import registry

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


# -- fixtures.regenerate ---------------------------------------------------------------------


def test_regenerate_matches_checks_and_rejects_tampering():
  _, meta, _ = load_fixture("backbone_sccan_resnet50")
  small = dict(meta, state_dict={"keys": meta["state_dict"]["keys"][:12]})
  sd = fixtures.regenerate(small)
  assert list(sd) == [e["key"] for e in small["state_dict"]["keys"]]
  first = small["state_dict"]["keys"][0]
  assert sd[first["key"]].dtype == np.float32
  assert float(sd[first["key"]].reshape(-1)[0]) == first["check"][1]  # float32-exact
  bad = json.loads(json.dumps(small))
  bad["state_dict"]["keys"][3]["check"][0] += 1.0
  with pytest.raises(fixtures.FixtureError, match=bad["state_dict"]["keys"][3]["key"]):
    fixtures.regenerate(bad)
  with pytest.raises(fixtures.FixtureError, match="check"):
    fixtures.regenerate(dict(small, GLOBAL_SEED=small["GLOBAL_SEED"] + 1))


def test_regenerate_overrides_and_counters():
  meta = {
    "GLOBAL_SEED": 3,
    "overrides": {"gamma": {"shape": [1], "dtype": "float32", "value": [0.5]}},
    "state_dict": {
      "keys": [
        {"key": "gamma", "shape": [1], "rule": "override", "check": [0.5, 0.5]},
        {
          "key": "bn.num_batches_tracked",
          "shape": [],
          "rule": "num_batches_tracked",
          "dtype": "int64",
          "check": [0.0, 0.0],
        },
      ]
    },
  }
  sd = fixtures.regenerate(meta)
  assert sd["gamma"].tolist() == [0.5] and sd["bn.num_batches_tracked"].dtype == np.int64
  del meta["overrides"]["gamma"]
  with pytest.raises(fixtures.FixtureError, match="override"):
    fixtures.regenerate(meta)


# -- io ----------------------------------------------------------------------------------------


def test_read_state_dict_formats(tmp_path):
  from safetensors.numpy import save_file

  sd = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.ones(2, np.float32)}
  np.savez(tmp_path / "w.npz", **sd)
  save_file(sd, str(tmp_path / "w.safetensors"))
  torch.save(
    {"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.pth"
  )
  for name in ("w.npz", "w.safetensors", "w.pth"):
    got = ckpt_io.read_state_dict(tmp_path / name)
    assert set(got) == set(sd), name
    np.testing.assert_array_equal(got["a.weight"], sd["a.weight"])
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match="unsupported checkpoint format"):
    ckpt_io.read_state_dict(tmp_path / "w.h5")
  with pytest.raises(FileNotFoundError, match="not found"):
    ckpt_io.read_state_dict(tmp_path / "missing.pth")


def _truncate(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  data = src.read_bytes()
  dst.write_bytes(data[: len(data) // 2])
  return dst


def test_truncated_files_give_clear_errors(tmp_path):
  sd = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
  np.savez(tmp_path / "full.npz", **sd)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "full.pth")
  for suffix in (".npz", ".pth"):
    bad = _truncate(tmp_path / f"full{suffix}", tmp_path / f"cut{suffix}")
    with pytest.raises(ValueError, match=rf"cut\{suffix}.*truncated or corrupt"):
      ckpt_io.read_state_dict(bad)
  # A truncated fixture: verify exits 2 with the file named.
  (tmp_path / "cut.json").write_text("{}")
  rc, _, err = _run(verify.main, ["--fixture", str(tmp_path / "cut.npz")])
  assert rc == 2 and "cut.npz" in err and "truncated or corrupt" in err


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  torch.save({"w": torch.zeros(1)}, path)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs PyTorch"):
    ckpt_io.read_state_dict(path)


def test_write_orbax_never_overwrites_and_cleans_up(tmp_path, monkeypatch):
  variables = {"params": {"conv": {"kernel": np.ones((1, 1, 2, 3), np.float32)}}}
  dst = tmp_path / "ckpt"
  ckpt_io.write_orbax(variables, dst, metadata={"model": "x"})
  back = ckpt_io.read_orbax(dst)
  np.testing.assert_array_equal(
    back["params"]["conv"]["kernel"], variables["params"]["conv"]["kernel"]
  )
  assert ckpt_io.read_metadata(dst) == {"model": "x"}
  with pytest.raises(FileExistsError, match="overwrite"):
    ckpt_io.write_orbax(variables, dst)
  # A failure while writing leaves the old checkpoint and no temporary directory.
  import orbax.checkpoint as ocp

  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
  with pytest.raises(RuntimeError):
    ckpt_io.write_orbax(variables, dst, overwrite=True, metadata={"model": "y"})
  assert ckpt_io.read_metadata(dst) == {"model": "x"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- convert -----------------------------------------------------------------------------------


def _run(main, argv):
  """Runs a CLI main(argv) in-process -> (rc, stdout, stderr)."""
  import contextlib
  import io

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main(argv)
  return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory):
  """A random torchvision ResNet-50 (random BN statistics too), saved by torch.save as a
  DataParallel-style {"state_dict": {"module." + key: tensor}} checkpoint."""
  torch.manual_seed(0)
  model = torchvision.models.resnet50(weights=None).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    model.fc.bias.uniform_(-0.5, 0.5)
  path = tmp_path_factory.mktemp("pth") / "resnet50.pth"
  torch.save(
    {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path
  )
  return model, path


def test_convert_torchvision_resnet50_forward_equals_torch(resnet50_pth, tmp_path):
  model, src = resnet50_pth
  dst = tmp_path / "rn50"
  rc, out, err = _run(
    convert.main, ["--model", "resnet_torchvision", "--src", str(src), "--dst", str(dst)]
  )
  assert rc == 0, err
  meta = ckpt_io.read_metadata(dst)
  assert meta["model"] == "resnet_torchvision" and len(meta["sha256"]) == 64
  variables = ckpt_io.read_orbax(dst)
  x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x)).numpy()
  flax_model = registry.get("resnet_torchvision").make_model()
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda v, x: flax_model.apply(v, x))(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1))
    )["logits"]
  scale = float(np.abs(ref).max())
  max_abs = float(np.abs(np.asarray(got) - ref).max())
  print(f"converted resnet50 logits max_abs {max_abs:.2e} scale {scale:.2e}")
  assert scale > 0.1 and max_abs <= 1e-4 * max(1.0, scale)


def test_convert_refuses_existing_destination(resnet50_pth, tmp_path):
  _, src = resnet50_pth
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  argv = ["--model", "resnet_torchvision", "--src", str(src), "--dst", str(dst)]
  rc, _, err = _run(convert.main, argv)
  assert rc == 2 and "already exists" in err and "--overwrite" in err
  assert (dst / "keep.txt").read_text() == "precious"
  rc, _, err = _run(convert.main, argv + ["--overwrite"])
  assert rc == 0, err
  assert not (dst / "keep.txt").exists() and (dst / "metadata.json").exists()


def test_convert_wrong_architecture_lists_keys(tmp_path):
  src = tmp_path / "resnet18.pth"
  sd = torchvision.models.resnet18(weights=None).state_dict()
  sd["aux_head.weight"] = torch.zeros(2, 512)
  torch.save(sd, src)
  dst = tmp_path / "never"
  rc, _, err = _run(
    convert.main, ["--model", "resnet_torchvision", "--src", str(src), "--dst", str(dst)]
  )
  assert rc == 2
  assert "missing keys" in err and "layer1.0.conv3.weight" in err  # bottleneck-only key
  assert "unexpected keys" in err and "aux_head.weight" in err
  assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["resnet18.pth"]
  # A truncated file and an unknown model are refused the same way.
  cut = _truncate(src, tmp_path / "cut.pth")
  rc, _, err = _run(
    convert.main, ["--model", "resnet_torchvision", "--src", str(cut), "--dst", str(dst)]
  )
  assert rc == 2 and "cut.pth" in err and "truncated or corrupt" in err and not dst.exists()
  rc, _, err = _run(
    convert.main, ["--model", "no_such_model", "--src", str(src), "--dst", str(dst)]
  )
  assert rc == 2 and "unknown model" in err
  rc, _, err = _run(
    convert.main,
    [
      "--model",
      "resnet_torchvision",
      "--src",
      str(src),
      "--dst",
      str(dst),
      "--model-arg",
      "colour=blue",
    ],
  )
  assert rc == 2 and "no field(s) colour" in err


def test_trained_on_from_flags_or_the_official_path():
  g = convert.guess_trained_on
  assert g("initmodel/PSPNet/pascal/split0/resnet50/best.pth") == ("pascal5i", 0)
  assert g("/x/exp/coco/SCCAN/split3/resnet101/snapshot/best.pth") == ("coco20i", 3)
  assert g("/runs/VOC2012_fold2/best.pth") == (None, None)  # no split<k>/fold<k> folder
  assert g("/home/advocate/fold1/best.pth") == (None, 1)  # 'advocate' is no dataset
  assert g("initmodel/resnet50_v2.pth") == (None, None)
  assert convert.trained_on("PSPNet/pascal/split0/best.pth", None, None) == {
    "dataset": "pascal5i",
    "fold": 0,
    "trained_on_from": "path (dataset, fold)",
  }
  assert convert.trained_on("PSPNet/pascal/split0/best.pth", "coco", 2) == {
    "dataset": "coco20i",
    "fold": 2,
  }
  assert convert.trained_on("best.pth", None, None) == {}
  with pytest.raises(ValueError, match="folds are 0..3"):
    convert.trained_on("best.pth", None, 4)
  with pytest.raises(ValueError, match="unknown dataset"):
    convert.trained_on("best.pth", "ade20k", 0)


def test_convert_records_the_fold_of_an_official_path(resnet50_pth, tmp_path):
  _, src = resnet50_pth
  official = tmp_path / "PSPNet" / "pascal" / "split2" / "resnet50" / "best.pth"
  official.parent.mkdir(parents=True)
  official.symlink_to(src)
  rc, out, err = _run(
    convert.main,
    ["--model", "resnet_torchvision", "--src", str(official), "--dst", str(tmp_path / "a")],
  )
  assert rc == 0, err
  meta = ckpt_io.read_metadata(tmp_path / "a")
  assert (meta["dataset"], meta["fold"]) == ("pascal5i", 2)
  assert "trained on pascal5i fold 2, guessed from the path: pass --dataset / --fold" in out
  rc, out, err = _run(
    convert.main,
    [
      "--model",
      "resnet_torchvision",
      "--src",
      str(official),
      "--dst",
      str(tmp_path / "b"),
      "--fold",
      "1",
      "--dataset",
      "coco",
    ],
  )
  assert rc == 0, err
  meta = ckpt_io.read_metadata(tmp_path / "b")
  assert (meta["dataset"], meta["fold"]) == ("coco20i", 1) and "trained_on_from" not in meta
  assert "trained on coco20i fold 1)" in out
  rc, _, err = _run(
    convert.main,
    [
      "--model",
      "resnet_torchvision",
      "--src",
      str(src),
      "--dst",
      str(tmp_path / "c"),
      "--fold",
      "7",
    ],
  )
  assert (
    rc == 2 and err.strip() == "error: --fold 7: folds are 0..3" and not (tmp_path / "c").exists()
  )


def test_parse_model_args():
  assert convert.parse_model_args(["depth=101", "include_head=false", "naming=pspnet"]) == {
    "depth": 101,
    "include_head": False,
    "naming": "pspnet",
  }
  with pytest.raises(ValueError, match="key=value"):
    convert.parse_model_args(["depth"])


# -- verify ------------------------------------------------------------------------------------


def test_verify_unsupported_fixture_exits_2(tmp_path):
  path = tmp_path / "mystery_1shot_17_b1.npz"
  np.savez(path, in_img=np.zeros((1, 3, 17, 17), np.float32), out_logits=np.zeros((1, 2)))
  path.with_suffix(".json").write_text(
    json.dumps(
      {
        "fixture": "mystery",
        "model_class": "model.Mystery.OneModel",
        "GLOBAL_SEED": 1,
        "state_dict": {"keys": []},
      }
    )
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "checkpoints.verify",
      "--fixture",
      str(path),
      "--json",
      str(tmp_path / "r.json"),
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  assert "model mystery (model.Mystery.OneModel) is not supported yet" in proc.stderr
  assert not (tmp_path / "r.json").exists()


def test_verify_reports_failure_with_exit_1(tmp_path):
  """A wrong reference value makes verify fail (exit 1) and say which output."""
  arrays, meta, src = load_fixture("backbone_sccan_resnet50")
  arrays["out_layer2"] = arrays["out_layer2"] + 1.0
  path = tmp_path / src.name
  np.savez(path, **arrays)
  path.with_suffix(".json").write_text(json.dumps(meta))
  rc, out, _ = _run(verify.main, ["--fixture", str(path), "--json", str(tmp_path / "r.json")])
  report = json.loads((tmp_path / "r.json").read_text())
  print(out)
  assert rc == 1 and not report["passed"] and "FAILED" in out
  assert report["outputs"]["out_layer2"]["max_abs"] >= 0.99
  assert (
    report["outputs"]["out_layer1"]["max_abs"] <= 1e-4 * report["outputs"]["out_layer1"]["scale"]
  )
  assert set(report) >= {"fixture", "model", "outputs", "passed"}
  assert set(report["outputs"]["out_layer1"]) == {"max_abs", "scale", "argmax_agree", "rel"}
