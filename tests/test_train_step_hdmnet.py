"""Train-step parity of HDMNet and HDMNet + PAHNet with their official train scripts:
shared/parity/<model>/train (`checkpoints.train_step`)."""

from __future__ import annotations

import pytest
from train_step_cases import run_train_fixture


@pytest.mark.parametrize("folder", ["hdmnet", "hdmnet_pahnet"])
def test_train_step_matches_official(folder, tmp_path):
  report = run_train_fixture(folder, tmp_path)
  # get_loss's in-place `distil_loss +=` makes the recorded first call the sum of all three
  part0 = report["outputs"]["out_loss_part_distil_stage0"]
  assert part0["passed"] and part0["scale"] > 2.9 * report["outputs"]["out_loss_aux1"]["scale"]


@pytest.mark.parametrize("folder", ["hdmnet", "symnet"])
def test_unseen_5shot_train_step(folder, tmp_path):
  """5-shot fixtures made beside the shipped ones (tests/parity_extra/<model>/train): HDMNet's
  kshot_rw requires grad but is in no official optimizer (never updated), Sym-Net's is trained."""
  from conftest import EXTRA_PARITY_DIR

  report = run_train_fixture(folder, tmp_path, root=EXTRA_PARITY_DIR)
  kshot = [k for k in report["grads"] if k.startswith("kshot_rw.")]
  assert bool(kshot) == (folder == "symnet")
