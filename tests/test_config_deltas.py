"""Method configs set only what differs from `configs.common.base_config` (configs/common.py).

Reads every top-level ``c.<a>.<b> = <literal>`` statement of each method config (``ast``; not
the ones under an ``if``, which may undo an earlier change) and fails on one that restates the
default of both datasets, so a default is read in one place.
"""

from __future__ import annotations

import ast

import pytest
from conftest import REPO, RUN_CONFIGS

from configs import common

_MISSING = object()


def _base(dataset: str):
  arg = common.parse_arg(f"dataset={dataset}", dataset="pascal", fold=0, shot=1)
  return common.base_config(arg, model="any")


def _value(config, path):
  for part in path:
    if part not in config:
      return _MISSING
    config = config[part]
  return config


def _same(default, value) -> bool:
  if isinstance(default, list | tuple) and isinstance(value, list | tuple):
    return tuple(default) == tuple(value)
  return type(default) is type(value) and default == value


def _restated(source: str, bases) -> list[str]:
  """``line: statement`` of each top-level literal assignment equal to every base's value."""
  tree = ast.parse(source).body
  body = next(n for n in tree if isinstance(n, ast.FunctionDef) and n.name == "get_config").body
  found = []
  for node in body:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    target, path = node.targets[0], []
    while isinstance(target, ast.Attribute):
      path.insert(0, target.attr)
      target = target.value
    if not (isinstance(target, ast.Name) and target.id == "c" and path):
      continue
    try:
      value = ast.literal_eval(node.value)
    except ValueError:
      continue
    if all(_same(_value(b, path), value) for b in bases):
      found.append(f"{node.lineno}: c.{'.'.join(path)} = {value!r}")
  return found


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_config_sets_only_what_differs(name):
  bases = [_base("pascal"), _base("coco")]
  found = _restated((REPO / "configs" / f"{name}.py").read_text(), bases)
  assert not found, f"configs/{name}.py restates defaults of configs/common.py: {found}"


def test_restated_default_is_found():
  src = "def get_config(arg):\n  c = 1\n  c.optim.momentum = 0.9\n  c.optim.lr = 0.5\n"
  assert _restated(src, [_base("pascal")]) == ["3: c.optim.momentum = 0.9"]
