"""Small stand-ins for the mmcv 1.x / mmsegmentation 0.x pieces HDMNet's Transformer imports.

HDMNet (``model/Transformer.py``) and PAHNet (``HDMNet_PAHNet/model/TransformerPlus.py``)
import a handful of building blocks from mmcv 1.x and mmseg 0.x, which pin old torch
versions and need compiled ops. ``install(shims)`` registers local versions in
``sys.modules`` only when the real import fails; they follow mmcv 1.7 / mmseg 0.30
(module and parameter names, ``bias="auto"``, the ConvModule init at construction,
Dropout / DropPath honouring ``drop_prob`` in training mode):

* ``mmcv.cnn``: ``Conv2d``, ``ConvModule``, ``build_activation_layer``, ``build_norm_layer``
  (``mmcv.cnn.bricks.drop.build_dropout``: ``Dropout``, ``DropPath``);
* ``mmcv.cnn.bricks.transformer.MultiheadAttention`` (its members; the references
  override ``forward`` and replace ``attn``);
* ``mmcv.cnn.utils.weight_init``: ``constant_init``, ``normal_init``, ``trunc_normal_init``,
  ``kaiming_init``;
* ``mmcv.runner``: ``BaseModule``, ``ModuleList``, ``Sequential``;
* ``mmseg.models.utils``: ``PatchEmbed`` (integer padding), ``nchw_to_nlc``, ``nlc_to_nchw``;
  ``mmseg.ops.resize``.
"""

from __future__ import annotations

import copy
import importlib
import sys
import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

MMCV_MODULES = (
  "mmcv.cnn",
  "mmcv.cnn.bricks.drop",
  "mmcv.cnn.bricks.transformer",
  "mmcv.cnn.utils.weight_init",
  "mmcv.runner",
)
MMSEG_MODULES = ("mmseg.models.utils", "mmseg.ops")


# ---------------------------------------------------------------------------
# mmcv.cnn.utils.weight_init
# ---------------------------------------------------------------------------


def constant_init(module: nn.Module, val: float, bias: float = 0.0) -> None:
  if getattr(module, "weight", None) is not None:
    nn.init.constant_(module.weight, val)
  if getattr(module, "bias", None) is not None:
    nn.init.constant_(module.bias, bias)


def normal_init(module: nn.Module, mean: float = 0.0, std: float = 1.0, bias: float = 0.0) -> None:
  if getattr(module, "weight", None) is not None:
    nn.init.normal_(module.weight, mean, std)
  if getattr(module, "bias", None) is not None:
    nn.init.constant_(module.bias, bias)


def trunc_normal_init(
  module: nn.Module,
  mean: float = 0.0,
  std: float = 1.0,
  a: float = -2.0,
  b: float = 2.0,
  bias: float = 0.0,
) -> None:
  if getattr(module, "weight", None) is not None:
    nn.init.trunc_normal_(module.weight, mean, std, a, b)
  if getattr(module, "bias", None) is not None:
    nn.init.constant_(module.bias, bias)


def kaiming_init(
  module: nn.Module,
  a: float = 0.0,
  mode: str = "fan_out",
  nonlinearity: str = "relu",
  bias: float = 0.0,
  distribution: str = "normal",
) -> None:
  if getattr(module, "weight", None) is not None:
    init = nn.init.kaiming_uniform_ if distribution == "uniform" else nn.init.kaiming_normal_
    init(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
  if getattr(module, "bias", None) is not None:
    nn.init.constant_(module.bias, bias)


# ---------------------------------------------------------------------------
# mmcv.runner
# ---------------------------------------------------------------------------


class BaseModule(nn.Module):
  """``nn.Module`` with ``init_cfg``; ``init_weights()`` recurses into the children (init_cfg None)."""

  def __init__(self, init_cfg: Any = None):
    super().__init__()
    self._is_init = False
    self.init_cfg = copy.deepcopy(init_cfg)

  def init_weights(self) -> None:
    if self.init_cfg is not None:
      raise NotImplementedError("mmcv stand-in: init_cfg initialisers are not implemented")
    for m in self.children():
      if hasattr(m, "init_weights"):
        m.init_weights()
    self._is_init = True


class Sequential(BaseModule, nn.Sequential):
  def __init__(self, *args, init_cfg: Any = None):
    BaseModule.__init__(self, init_cfg)
    nn.Sequential.__init__(self, *args)


class ModuleList(BaseModule, nn.ModuleList):
  def __init__(self, modules=None, init_cfg: Any = None):
    BaseModule.__init__(self, init_cfg)
    nn.ModuleList.__init__(self, modules)


# ---------------------------------------------------------------------------
# mmcv.cnn bricks
# ---------------------------------------------------------------------------


class Conv2d(nn.Conv2d):
  """``mmcv.cnn.bricks.wrappers.Conv2d`` (a plain Conv2d for non-empty inputs)."""


def _drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
  if drop_prob == 0.0 or not training:
    return x
  keep = 1.0 - drop_prob
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  random = keep + torch.rand(shape, dtype=x.dtype, device=x.device)
  return x.div(keep) * random.floor()


class DropPath(nn.Module):
  """Stochastic depth per sample (mmcv.cnn.bricks.drop.DropPath)."""

  def __init__(self, drop_prob: float = 0.1):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    return _drop_path(x, self.drop_prob, self.training)


class Dropout(nn.Dropout):
  """mmcv.cnn.bricks.drop.Dropout (``drop_prob`` instead of ``p``)."""

  def __init__(self, drop_prob: float = 0.5, inplace: bool = False):
    super().__init__(p=drop_prob, inplace=inplace)


def _pop_type(cfg: dict, what: str) -> tuple[str, dict]:
  if not isinstance(cfg, dict) or "type" not in cfg:
    raise TypeError(f"mmcv stand-in: {what} cfg must be a dict with 'type', got {cfg!r}")
  cfg = dict(cfg)
  return cfg.pop("type"), cfg


def build_dropout(cfg: dict, default_args: dict | None = None) -> nn.Module:
  kind, kw = _pop_type(cfg, "dropout")
  kw = {**(default_args or {}), **kw}
  layers = {"Dropout": Dropout, "DropPath": DropPath}
  if kind not in layers:
    raise KeyError(f"mmcv stand-in: dropout type {kind!r} not implemented (have {sorted(layers)})")
  return layers[kind](**kw)


_ACTIVATIONS = {
  "ReLU": nn.ReLU,
  "GELU": nn.GELU,
  "LeakyReLU": nn.LeakyReLU,
  "PReLU": nn.PReLU,
  "ReLU6": nn.ReLU6,
  "ELU": nn.ELU,
  "Sigmoid": nn.Sigmoid,
  "Tanh": nn.Tanh,
  "SiLU": nn.SiLU,
}


def build_activation_layer(cfg: dict) -> nn.Module:
  kind, kw = _pop_type(cfg, "activation")
  if kind not in _ACTIVATIONS:
    raise KeyError(
      f"mmcv stand-in: activation {kind!r} not implemented (have {sorted(_ACTIVATIONS)})"
    )
  return _ACTIVATIONS[kind](**kw)


# norm type -> (abbreviation used as the module name, class)
_NORMS = {
  "BN": ("bn", nn.BatchNorm2d),
  "BN2d": ("bn", nn.BatchNorm2d),
  "BN1d": ("bn", nn.BatchNorm1d),
  "SyncBN": ("bn", nn.SyncBatchNorm),
  "LN": ("ln", nn.LayerNorm),
  "GN": ("gn", nn.GroupNorm),
  "IN": ("in", nn.InstanceNorm2d),
}


def build_norm_layer(
  cfg: dict, num_features: int, postfix: int | str = ""
) -> tuple[str, nn.Module]:
  """``(name, layer)`` as mmcv.cnn.build_norm_layer (eps defaults to 1e-5, ``requires_grad``)."""
  kind, kw = _pop_type(cfg, "norm")
  if kind not in _NORMS:
    raise KeyError(f"mmcv stand-in: norm {kind!r} not implemented (have {sorted(_NORMS)})")
  abbr, cls = _NORMS[kind]
  requires_grad = kw.pop("requires_grad", True)
  kw.setdefault("eps", 1e-5)
  layer = cls(num_channels=num_features, **kw) if kind == "GN" else cls(num_features, **kw)
  for p in layer.parameters():
    p.requires_grad = requires_grad
  return abbr + str(postfix), layer


class ConvModule(nn.Module):
  """conv / norm / activation block (mmcv.cnn.ConvModule, order conv-norm-act, 2-D conv only)."""

  def __init__(
    self,
    in_channels,
    out_channels,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    bias="auto",
    conv_cfg=None,
    norm_cfg=None,
    act_cfg=None,
    inplace=True,
    order=("conv", "norm", "act"),
    **kwargs,
  ):
    super().__init__()
    if (
      conv_cfg not in (None, {"type": "Conv2d"})
      or kwargs.get("with_spectral_norm")
      or kwargs.get("padding_mode", "zeros") != "zeros"
      or tuple(order) != ("conv", "norm", "act")
    ):
      raise NotImplementedError(
        "mmcv stand-in ConvModule: only Conv2d, zero padding, order conv-norm-act"
      )
    act_cfg = {"type": "ReLU"} if act_cfg is None else act_cfg  # mmcv default dict(type='ReLU')
    self.with_norm, self.with_activation = norm_cfg is not None, bool(act_cfg)
    if bias == "auto":
      bias = not self.with_norm
    self.conv = Conv2d(
      in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias
    )
    if self.with_norm:
      self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
      self.add_module(self.norm_name, norm)
    if self.with_activation:
      act_cfg = dict(act_cfg)
      if act_cfg["type"] not in ("Tanh", "PReLU", "Sigmoid", "HSigmoid", "Swish", "GELU"):
        act_cfg.setdefault("inplace", inplace)
      self.activate = build_activation_layer(act_cfg)
    self.init_weights()

  @property
  def norm(self):
    return getattr(self, self.norm_name) if self.with_norm else None

  def init_weights(self) -> None:
    leaky = self.with_activation and isinstance(self.activate, nn.LeakyReLU)
    kaiming_init(
      self.conv,
      a=self.activate.negative_slope if leaky else 0,
      nonlinearity="leaky_relu" if leaky else "relu",
    )
    if self.with_norm:
      constant_init(self.norm, 1, bias=0)

  def forward(self, x, activate: bool = True, norm: bool = True):
    x = self.conv(x)
    if norm and self.with_norm:
      x = self.norm(x)
    if activate and self.with_activation:
      x = self.activate(x)
    return x


_DEFAULT_DROPOUT = {"type": "Dropout", "drop_prob": 0.0}  # mmcv's default (never mutated)


class MultiheadAttention(BaseModule):
  """mmcv.cnn.bricks.transformer.MultiheadAttention's members (``attn``, ``proj_drop``, ``dropout_layer``)."""

  def __init__(
    self,
    embed_dims,
    num_heads,
    attn_drop=0.0,
    proj_drop=0.0,
    dropout_layer=_DEFAULT_DROPOUT,
    init_cfg=None,
    batch_first=False,
    **kwargs,
  ):
    super().__init__(init_cfg)
    if "dropout" in kwargs:  # mmcv's deprecated argument
      attn_drop = kwargs["dropout"]
      dropout_layer = {**(dropout_layer or {"type": "Dropout"}), "drop_prob": kwargs.pop("dropout")}
    self.embed_dims, self.num_heads, self.batch_first = embed_dims, num_heads, batch_first
    self.attn = nn.MultiheadAttention(embed_dims, num_heads, attn_drop, **kwargs)
    self.proj_drop = nn.Dropout(proj_drop)
    self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()

  def forward(self, *args, **kwargs):
    raise NotImplementedError(
      "mmcv stand-in: MultiheadAttention.forward is not used by the references"
    )


# ---------------------------------------------------------------------------
# mmseg
# ---------------------------------------------------------------------------


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
  """[N, C, H, W] -> [N, H*W, C]."""
  return x.flatten(2).transpose(1, 2).contiguous()


def nlc_to_nchw(x: torch.Tensor, hw_shape) -> torch.Tensor:
  """[N, H*W, C] -> [N, C, H, W]."""
  h, w = hw_shape
  b, length, c = x.shape
  if length != h * w:
    raise ValueError(f"nlc_to_nchw: sequence length {length} != {h} * {w}")
  return x.transpose(1, 2).reshape(b, c, h, w).contiguous()


def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
  """mmseg.ops.resize = F.interpolate (mmseg's align_corners warning is left out)."""
  del warning
  if isinstance(size, torch.Size):
    size = tuple(int(v) for v in size)
  return F.interpolate(input, size, scale_factor, mode, align_corners)


class PatchEmbed(BaseModule):
  """Conv patch embedding, then an optional norm: [N, C, H, W] -> ([N, h*w, D], (h, w))."""

  def __init__(
    self,
    in_channels=3,
    embed_dims=768,
    conv_type="Conv2d",
    kernel_size=16,
    stride=None,
    padding="corner",
    dilation=1,
    bias=True,
    norm_cfg=None,
    input_size=None,
    init_cfg=None,
  ):
    super().__init__(init_cfg)
    if conv_type != "Conv2d" or not isinstance(padding, int) or input_size is not None:
      raise NotImplementedError(
        "mmseg stand-in PatchEmbed: Conv2d with integer padding and no input_size only"
      )
    self.embed_dims = embed_dims
    self.adap_padding = None
    self.projection = Conv2d(
      in_channels,
      embed_dims,
      kernel_size,
      kernel_size if stride is None else stride,
      padding,
      dilation,
      bias=bias,
    )
    self.norm = build_norm_layer(norm_cfg, embed_dims)[1] if norm_cfg is not None else None

  def forward(self, x):
    x = self.projection(x)
    out_size = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)
    if self.norm is not None:
      x = self.norm(x)
    return x, out_size


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

_STANDIN = "_fss_jax_standin"


def _importable(names) -> bool:
  """True when the real modules import (a stand-in registered earlier counts as missing)."""
  if getattr(sys.modules.get(names[0].split(".")[0]), _STANDIN, False):
    return False
  try:
    for name in names:
      importlib.import_module(name)
  except Exception:  # old mmcv/mmseg fail in many ways: ImportError, compiled ops
    return False
  return True


def _register(tree: dict[str, dict[str, Any]]) -> None:
  """Creates the modules ``tree`` names (parents first) and links each to its parent."""
  root = next(iter(tree)).split(".")[0]
  if getattr(sys.modules.get(root), _STANDIN, False):
    return  # registered by an earlier build in this process
  for name in list(sys.modules):
    if name.split(".")[0] == root:
      del sys.modules[name]
  for name, attrs in tree.items():
    m = types.ModuleType(name, f"fss-jax bench stand-in for {name}")
    m.__dict__.update(attrs)
    setattr(m, _STANDIN, True)
    sys.modules[name] = m
    parent, _, leaf = name.rpartition(".")
    if parent:
      setattr(sys.modules[parent], leaf, m)


def install(shims: list[str]) -> None:
  """Registers the stand-ins for mmcv / mmseg when importing their used modules fails."""
  if not _importable(MMCV_MODULES):
    cnn = {
      "Conv2d": Conv2d,
      "ConvModule": ConvModule,
      "build_activation_layer": build_activation_layer,
      "build_norm_layer": build_norm_layer,
    }
    init = {
      "constant_init": constant_init,
      "normal_init": normal_init,
      "trunc_normal_init": trunc_normal_init,
      "kaiming_init": kaiming_init,
    }
    _register(
      {
        "mmcv": {},
        "mmcv.cnn": cnn,
        "mmcv.cnn.bricks": {},
        "mmcv.cnn.bricks.drop": {
          "build_dropout": build_dropout,
          "Dropout": Dropout,
          "DropPath": DropPath,
        },
        "mmcv.cnn.bricks.transformer": {"MultiheadAttention": MultiheadAttention},
        "mmcv.cnn.utils": {},
        "mmcv.cnn.utils.weight_init": init,
        "mmcv.runner": {
          "BaseModule": BaseModule,
          "ModuleList": ModuleList,
          "Sequential": Sequential,
        },
      }
    )
    shims.append(
      "mmcv 1.x (ConvModule, Conv2d, build_norm/activation_layer, build_dropout Dropout/DropPath, "
      "MultiheadAttention members, weight_init, runner BaseModule/ModuleList/Sequential) "
      "bench/torch_refs/mmcv_standins.py"
    )
  if not _importable(MMSEG_MODULES):
    _register(
      {
        "mmseg": {},
        "mmseg.models": {},
        "mmseg.models.utils": {
          "PatchEmbed": PatchEmbed,
          "nchw_to_nlc": nchw_to_nlc,
          "nlc_to_nchw": nlc_to_nchw,
        },
        "mmseg.ops": {"resize": resize},
      }
    )
    shims.append(
      "mmseg 0.x (PatchEmbed, nchw_to_nlc, nlc_to_nchw, ops.resize) bench/torch_refs/mmcv_standins.py"
    )
