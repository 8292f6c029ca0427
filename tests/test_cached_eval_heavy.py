"""Issue 18: the cached-evaluation logits check of the slowest models (PAHNet's two variants,
Sym-Net, JC²A), in a file of its own so that the suite's two workers share the load; see
tests/test_cached_eval.py."""

from __future__ import annotations

import pytest
from cached_eval_cases import (
  HEAVY,
  build_voc,
  check_logits,
)

voc_dir = pytest.fixture(scope="module")(build_voc)


@pytest.mark.parametrize("name", HEAVY)
def test_cached_logits_equal_plain(voc_dir, name, shot=5):
  check_logits(voc_dir, name, shot)
