"""What every reference builder shares: the result type, repository import and shims."""

from __future__ import annotations

import collections.abc
import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Reference(NamedTuple):
  """A built reference: ``train_iter()`` returns the loss, ``eval_fwd()`` the [B, H, W] prediction."""

  model: Any  # torch.nn.Module (parameters counted by the runner)
  train_iter: Callable[[], Any]
  eval_fwd: Callable[[], Any]
  info: dict[str, Any]  # construction, optimiser, skipped checkpoint files, ...


def use_repo(repo: pathlib.Path, packages: Sequence[str], marker: str) -> None:
  """Puts ``repo`` first on sys.path and forgets same-named modules imported from elsewhere."""
  if not (repo / marker).is_file():
    raise FileNotFoundError(
      f"--repo {repo} does not look like the checkout (no {marker}); clone the "
      f"official repository and pass its root"
    )
  for name in list(sys.modules):
    if name.split(".")[0] in packages:
      del sys.modules[name]
  sys.path.insert(0, os.fspath(repo))


def load_module_file(path: pathlib.Path, name: str):
  """Imports one file under a private name (e.g. a repo's util/config.py)."""
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_yaml_cfg(repo: pathlib.Path, yaml: pathlib.Path):
  """``util.config.load_cfg_from_cfg_file(yaml)`` of the checkout (SCCAN, HDMNet, PAHNet, Sym-Net)."""
  if not yaml.is_file():
    raise FileNotFoundError(f"{yaml} not found in the checkout --repo {repo}")
  cfg = load_module_file(repo / "util" / "config.py", "_torch_ref_util_config")
  return cfg.load_cfg_from_cfg_file(os.fspath(yaml))


def shim_torchvision_utils(shims: list[str]) -> None:
  """``torchvision.models.utils`` (removed in torchvision 0.13) -> torch.hub."""
  try:
    importlib.import_module("torchvision.models.utils")
  except ImportError:
    import torch

    m = types.ModuleType("torchvision.models.utils")
    m.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = m
    shims.append("torchvision.models.utils -> torch.hub.load_state_dict_from_url")


def shim_timm(shims: list[str]) -> None:
  """Small local DropPath / to_2tuple / trunc_normal_ when timm is not installed."""
  try:
    importlib.import_module("timm.models.layers")
    return
  except ImportError:
    pass
  import torch
  from torch import nn

  class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or for p = 0)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
      super().__init__()
      self.drop_prob, self.scale_by_keep = float(drop_prob or 0.0), scale_by_keep

    def forward(self, x):
      if self.drop_prob == 0.0 or not self.training:
        return x
      keep = 1.0 - self.drop_prob
      mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
      return x * mask / keep if self.scale_by_keep else x * mask

  def to_2tuple(x):
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
      return tuple(x)
    return (x, x)

  def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
  timm.models, models.layers = models, layers
  sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
  shims.append("timm.models.layers (DropPath, to_2tuple, trunc_normal_) local versions")


@contextlib.contextmanager
def no_checkpoint_files(requested: list[str]):
  """``torch.load`` returns an empty marker; ``load_state_dict(marker)`` is skipped.

  The references load ImageNet / PSPNet weights in their constructors; speed does
  not depend on the weights, so the files are never read (their paths are recorded).
  """
  import torch

  # An empty dict whose every key is itself (``torch.load(f)["state_dict"]`` is the marker too).
  marker = type("_NoCheckpoint", (dict,), {"__missing__": lambda self, key: self})()
  load, load_sd = torch.load, torch.nn.Module.load_state_dict

  def fake_load(f, *a, **k):
    del a, k
    requested.append(os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f))
    return marker

  def fake_load_sd(self, state_dict, *a, **k):
    if state_dict is marker:
      return None
    return load_sd(self, state_dict, *a, **k)

  torch.load, torch.nn.Module.load_state_dict = fake_load, fake_load_sd
  try:
    yield
  finally:
    torch.load, torch.nn.Module.load_state_dict = load, load_sd


def batchnorm_eval_in_train(model, enabled: bool = True) -> Callable[[], None]:
  """A callable that puts every BatchNorm in inference mode once the model is in training mode
  (a no-op when not ``enabled``, e.g. a yaml's ``fix_bn: False``).

  The training scripts do ``model.train()`` and then ``fix_bn`` / ``module.eval()`` for the
  BatchNorm layers (SSP main.py; Sym-Net and PAHNet with ``fix_bn: True``); the runner sets
  ``model.train()`` before the first iteration, so the iteration calls this first (it only
  acts when ``model.train()`` has switched the BatchNorm layers back, i.e. once).
  """
  bns = [m for m in model.modules() if "BatchNorm" in type(m).__name__] if enabled else []

  def fix():
    if any(m.training for m in bns):
      for m in bns:
        m.eval()

  return fix
