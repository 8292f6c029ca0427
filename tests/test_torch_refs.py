"""bench/torch_ref.py and its builders (bench/torch_refs/) without the official checkouts.

The official repositories are not vendored (and not on the CI machine), so the harness
is tested end to end on a small stand-in checkout with PANet's interface, and each
builder's own logic (its checkout check, the shims, the CUDA-to-CPU proxy, Sym-Net's
pyramid bins) in isolation. Timings are never asserted.
"""

from __future__ import annotations

import json
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import (
  compare,
  torch_ref,
  torch_refs,
)
from bench.torch_refs import common, cuda_proxy, mmcv_standins, symnet

# A checkout with PANet's interface (models/fewshot.py: FewShotSeg(in_channels, pretrained_path,
# cfg); forward(supp_imgs, fore_mask, back_mask, qry_imgs) -> (logits [B, 2, H, W], align_loss)).
FAKE_PANET = textwrap.dedent("""
    import torch
    from torch import nn

    class FewShotSeg(nn.Module):
      def __init__(self, in_channels=3, pretrained_path=None, cfg=None):
        super().__init__()
        self.encoder = nn.Conv2d(in_channels, 4, 3, padding=1)       # 3*4*9 + 4 = 112 params

      def forward(self, supp_imgs, fore_mask, back_mask, qry_imgs):
        assert len(supp_imgs) == 1 and len(fore_mask[0]) == len(supp_imgs[0])
        s = self.encoder(supp_imgs[0][0])
        fg = (s * fore_mask[0][0][:, None]).mean((2, 3))               # [B, 4]
        bg = (s * back_mask[0][0][:, None]).mean((2, 3))
        q = self.encoder(qry_imgs[0])                                  # [B, 4, H, W]
        logits = torch.stack([(q * bg[:, :, None, None]).sum(1), (q * fg[:, :, None, None]).sum(1)], 1)
        return logits, logits.new_zeros(())
""")


@pytest.fixture
def fake_panet(tmp_path, monkeypatch):
  repo = tmp_path / "PANet"
  (repo / "models").mkdir(parents=True)
  (repo / "models" / "__init__.py").write_text("")
  (repo / "models" / "fewshot.py").write_text(FAKE_PANET)
  # use_repo puts the checkout on sys.path and forgets other "models" packages: undo both.
  monkeypatch.setattr(sys, "path", list(sys.path))
  with mock.patch.dict(sys.modules):
    yield repo


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_runner_record_on_a_checkout_with_panets_interface(fake_panet, capsys, mode):
  rec = torch_ref.main(
    [
      "--repo",
      str(fake_panet),
      "--model",
      "panet",
      "--mode",
      mode,
      "--size",
      "17",
      "--batch",
      "2",
      "--steps",
      "2",
      "--warmup",
      "1",
      "--device",
      "cpu",
    ]
  )
  printed = json.loads([l for l in capsys.readouterr().out.splitlines() if l.startswith("{")][-1])
  assert printed["steps_per_s"] == rec["steps_per_s"] > 0
  assert rec["impl"] == "torch" and rec["mode"] == mode and rec["backend"] == "cpu"
  assert rec["episodes_per_s"] == pytest.approx(2 * rec["steps_per_s"], rel=1e-3)
  assert rec["images_per_s"] == pytest.approx(2 * rec["episodes_per_s"], rel=1e-3)
  assert rec["params_total"] == rec["params_trainable"] == 112
  assert rec["reference"] == "kaixin96/PANet models.fewshot.FewShotSeg"
  assert rec["repo_commit"] is None  # not a git work tree of its own
  assert ("final_loss" in rec) == (mode == "train")
  if mode == "train":
    assert np.isfinite(rec["final_loss"])


def test_compare_runs_both_sides_and_reports_the_ratio(fake_panet, tmp_path):
  out = tmp_path / "cmp.jsonl"
  rec = compare.main(
    [
      "--repo",
      str(fake_panet),
      "--model",
      "panet",
      "--mode",
      "eval",
      "--size",
      "33",
      "--steps",
      "1",
      "--warmup",
      "1",
      "--torch-arg=--device=cpu",
      "--out",
      str(out),
    ]
  )
  assert "error" not in rec["jax"] and "error" not in rec["torch"], rec
  assert rec["jax"]["impl"] != "torch" and rec["torch"]["impl"] == "torch"
  assert rec["speedup"] == pytest.approx(
    rec["jax"]["steps_per_s"] / rec["torch"]["steps_per_s"], rel=1e-2
  )
  assert json.loads(out.read_text().splitlines()[-1])["speedup"] == rec["speedup"]


@pytest.mark.parametrize("model", torch_ref.SUPPORTED)
def test_every_builder_names_the_checkout_it_expects(model, tmp_path):
  assert "/" in torch_refs.reference(model)  # "owner/repo module.Class"
  with pytest.raises(
    FileNotFoundError, match=r"does not look like|is not the PAHNet checkout root"
  ):
    torch_ref.main(["--repo", str(tmp_path), "--model", model, "--size", "33", "--device", "cpu"])


def test_pahnet_subdirectory_passed_by_mistake(tmp_path):
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "SCCANPlus.py").touch()
  with pytest.raises(FileNotFoundError, match="SCCAN_PAHNet/.*pass its parent"):
    torch_ref.main(
      ["--repo", str(tmp_path), "--model", "sccan_pahnet", "--size", "33", "--device", "cpu"]
    )


def test_symnet_bins_are_the_bins_of_fss_jax():
  from fss_jax.models import symnet as jax_symnet

  assert symnet.pyramid_scales(473) == [60, 30, 15, 8]  # the PASCAL yaml
  assert symnet.pyramid_scales(641) == [81, 40, 20, 10]  # the COCO yaml
  assert symnet.pyramid_scales(241) == [31, 16, 8, 4]  # the parity fixture
  for size in range(97, 700, 8):
    assert tuple(symnet.pyramid_scales(size)) == jax_symnet.default_scales(
      jax_symnet.feature_size(size)
    ), size


def test_cpu_proxy_maps_cuda_requests_only():
  t = cuda_proxy.CpuTorch()
  assert t.device("cuda").type == "cpu" and t.device("cpu").type == "cpu"
  assert t.zeros(2, device="cuda").device.type == "cpu"
  assert t.arange(3, device="cuda:0").tolist() == [0, 1, 2]
  assert t.nn is torch.nn and t.float32 is torch.float32
  mod = type(sys)("fake_reference")
  mod.torch = torch
  shims: list[str] = []
  cuda_proxy.patch_module(mod, "cpu", shims)
  assert isinstance(mod.torch, cuda_proxy.CpuTorch) and len(shims) == 1


def test_no_checkpoint_files_answers_every_load_with_a_marker():
  requested: list[str] = []
  net = torch.nn.Linear(2, 2)
  before = net.weight.detach().clone()
  with common.no_checkpoint_files(requested):
    ck = torch.load("initmodel/resnet50_v2.pth")
    assert ck["state_dict"] is ck and len(ck) == 0
    net.load_state_dict(ck["state_dict"])  # skipped
    with pytest.raises(RuntimeError):  # a real state dict still goes through
      net.load_state_dict({"weight": torch.zeros(3, 3)})
  assert requested == ["initmodel/resnet50_v2.pth"]
  assert torch.equal(net.weight, before)
  assert torch.load is not None and "fake" not in torch.load.__name__


def test_batchnorm_eval_in_train_acts_after_model_train():
  model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
  fix = common.batchnorm_eval_in_train(model)
  model.train()
  fix()
  assert model[0].training and not model[1].training


@mock.patch.dict(sys.modules)
def test_mmcv_standins_build_and_follow_training_mode():
  shims: list[str] = []
  mmcv_standins.install(shims)
  import importlib

  try:
    importlib.import_module("mmcv")
    real = not getattr(sys.modules["mmcv"], "_fss_jax_standin", False)
  except ImportError:
    real = False
  if real:
    pytest.skip("a real mmcv is installed; the stand-ins are not used")
  assert any(s.startswith("mmcv") for s in shims) and any(s.startswith("mmseg") for s in shims)
  cnn = importlib.import_module("mmcv.cnn")
  conv = cnn.ConvModule(3, 4, 3, padding=1, norm_cfg={"type": "BN"})
  assert conv.conv.bias is None  # bias="auto" with a norm
  assert conv(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)
  drop = importlib.import_module("mmcv.cnn.bricks.drop").build_dropout(
    {"type": "DropPath", "drop_prob": 0.5}
  )
  x = torch.ones(64, 8)
  assert torch.equal(drop.eval()(x), x)
  y = drop.train()(x)
  assert set(torch.unique(y).tolist()) <= {0.0, 2.0} and (y == 0).any()
  patch = importlib.import_module("mmseg.models.utils").PatchEmbed(
    in_channels=4, embed_dims=8, kernel_size=3, stride=2, padding=1, norm_cfg={"type": "LN"}
  )
  tokens, hw = patch(torch.randn(1, 4, 9, 9))
  assert tokens.shape == (1, 25, 8) and tuple(hw) == (5, 5)
  again: list[str] = []
  mmcv_standins.install(again)  # a second build in the process
  assert len(again) == 2
