"""Every paper config whose model has a frozen part refuses to train without its weights.

A frozen backbone / base learner / predictor left at its random initialisation trains a
meaningless model without any error; `config.init_required` makes `fss_jax.main` stop with
`config.init_help` instead (tests/test_engine.py checks that stop).
"""

from __future__ import annotations

import importlib

import pytest
from conftest import RUN_CONFIGS

from fss_jax.models import registry


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_frozen_parts_require_init(name):
  mod = importlib.import_module(f"configs.{name}")
  c = mod.get_config()
  spec = registry.get(c.model)
  if spec.frozen:
    assert c.get("init_required", False), f"{name}: frozen {spec.frozen} but no init_required"
    assert "--config.init=" in c.init_help, c.init_help
    assert not mod.get_config("smoke").get("init_required", False)
