"""Train-step parity of SCCAN and SCCAN + PAHNet with train_sccan.py / PAHNet's train script:
shared/parity/<model>/train (`checkpoints.train_step`).

One file, so that the two largest steps (SCCA attention backward: ~5 and ~10 GB on CPU)
never run side by side on the two pytest workers.
"""

from __future__ import annotations

import pytest
from train_step_cases import run_train_fixture


@pytest.mark.parametrize("folder", ["sccan", "sccan_pahnet"])
def test_train_step_matches_official(folder, tmp_path):
  report = run_train_fixture(folder, tmp_path)
  # The last SCCA block's support stream never gets a gradient: torch leaves it
  # untouched, so must the engine (ModelSpec.unused), AdamW included.
  blocks7 = [k for k in report["deltas"] if ".blocks.7.attn_s." in k or ".blocks.7.mlp_s." in k]
  assert blocks7 and all(report["deltas"][k]["max_abs"] == 0.0 for k in blocks7)
