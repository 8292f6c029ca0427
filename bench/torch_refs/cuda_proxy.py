"""CPU answers to the CUDA device requests that some references hard-code (used on CPU only).

Sym-Net, HDMNet and both PAHNet variants write ``torch.device('cuda')`` /
``device='cuda'`` in their forward or training branch. On a CUDA device they run unchanged; on the CPU the module global
``torch`` of the reference's model file is replaced by :class:`CpuTorch`, which is
``torch`` except that those requests name the CPU.
"""

from __future__ import annotations

import functools
import types
from typing import Any


def _is_cuda(d: Any) -> bool:
  return str(d).startswith("cuda")


class CpuTorch(types.ModuleType):
  """``torch`` with ``torch.device('cuda')`` and every ``device='cuda'`` keyword mapped to the CPU."""

  def __init__(self):
    super().__init__("torch")

  def __getattr__(self, name: str):
    import torch

    attr = getattr(torch, name)
    if name == "device":

      def device(d, *args):
        return torch.device("cpu") if _is_cuda(d) else torch.device(d, *args)

      attr = device
    elif callable(attr) and not isinstance(attr, type):
      fn = attr

      @functools.wraps(fn)
      def attr(*args, **kwargs):
        if _is_cuda(kwargs.get("device", "")):
          kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    setattr(self, name, attr)  # looked up once per name
    return attr


def patch_module(module, device, shims: list[str]) -> None:
  """Replaces ``module.torch`` by :class:`CpuTorch` when ``device`` is the CPU (else leaves it)."""
  import torch

  if torch.device(device).type != "cpu":
    return
  module.torch = CpuTorch()
  shims.append(
    f"{module.__name__}: module global torch -> proxy mapping torch.device('cuda') / "
    f"device='cuda' to the CPU (device is cpu)"
  )
