"""Builders of the official PyTorch implementations for bench/torch_ref.py (one module each).

Each module ``<name>.py`` defines ``REFERENCE`` (``"owner/repo module.Class"``) and
``build(repo, ep, *, train, device, shims) -> Reference``: the model built from the user's
checkout as the parity fixtures' json says, with random weights, and the reference's own
training iteration / eval forward on the NCHW episode ``ep`` (torch tensors on ``device``).
Nothing of the references is vendored; ``shims`` holds the stand-ins for old helper
libraries they import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# registry name -> module under bench/torch_refs
MODULES = {
  "panet": "panet",
  "hdmnet": "hdmnet",
  "hdmnet_pahnet": "hdmnet_pahnet",
  "sccan": "sccan",
  "symnet": "symnet",
  "sccan_pahnet": "sccan_pahnet",
  "ssp": "ssp",
}


def reference(name: str) -> str:
  return importlib.import_module(f"bench.torch_refs.{MODULES[name]}").REFERENCE


def builder(name: str) -> Callable:
  return importlib.import_module(f"bench.torch_refs.{MODULES[name]}").build
