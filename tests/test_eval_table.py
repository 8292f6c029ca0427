"""Issue 19: ``python -m fss_jax.eval.table`` — mean ± std over (run, seed) results per cell,
fold mean, FB-IoU, best-of only on request, refusal of a column under two protocols."""

from __future__ import annotations

import csv
import io
import json
import math

from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.eval import table

PFENET = dict(
  name="pfenet_bam",
  test_size=473,
  test_resize="aspect",
  score="original",
  ignore_255=True,
  novel_filter=True,
  class_split="interleaved",
  episode_rule="pfenet",
  lists="build",
  episodes=1000,
  seeds=[1, 2],
  seed_rule="per_episode",
)
HSNET = dict(
  PFENET,
  name="hsnet",
  test_size=400,
  test_resize="squash",
  score="input",
  novel_filter=False,
  episode_rule="hsnet",
  seeds=[0],
  seed_rule="sequential",
)


def _write(workdir, *, fold, seeds, model="sccan", shot=1, protocol=PFENET, train_shot=1):
  """A results JSON as `fss_jax.eval.run.evaluate` writes it: {seed: (miou, fb_iou)}."""
  per_seed = {
    s: {"miou": m, "fb_iou": f, "per_class": {"1": m}, "episodes": 1000}
    for s, (m, f) in seeds.items()
  }
  summary = evaluate_lib.summarize(per_seed)
  summary.update(
    model=model,
    dataset="pascal5i",
    fold=fold,
    shot=shot,
    way=1,
    episodes_per_seed=1000,
    score="pad_square",
    protocol=dict(protocol, seeds=list(seeds)),
    train_shot=train_shot,
    train_dataset="pascal5i",
    train_fold=fold,
    model_fields={"layers": 50},
  )
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / f"results_pascal5i_f{fold}_{shot}shot.json"
  path.write_text(json.dumps(summary))
  return path


def test_cells_pool_seeds_of_several_runs_and_fold_mean_pairs_seeds(tmp_path, capsys):
  # Run A: seeds 1 and 2; run B: seed 3; folds 0 and 1 each (mIoU, FB-IoU).
  _write(tmp_path / "a0", fold=0, seeds={1: (60.0, 70.0), 2: (62.0, 72.0)})
  _write(tmp_path / "b0", fold=0, seeds={3: (64.0, 74.0)})
  _write(tmp_path / "a1", fold=1, seeds={1: (50.0, 60.0), 2: (56.0, 66.0)})
  _write(tmp_path / "b1", fold=1, seeds={3: (53.0, 63.0)})
  md_path, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
  assert table.main([str(tmp_path), "--markdown", str(md_path), "--csv", str(csv_path)]) == 0
  md = capsys.readouterr().out
  assert md == md_path.read_text()
  # fold 0: mean 62, population std sqrt(8/3); fold 1: mean 53, std sqrt(6); n = 3 results of 1000 episodes.
  assert (
    f"62.00 ± {math.sqrt(8 / 3):.2f} (3×1000)" in md
    and f"53.00 ± {math.sqrt(6):.2f} (3×1000)" in md
  )
  # fold mean per seed: 55, 59, 58.5 -> mean 57.5; FB-IoU: 65, 69, 68.5 -> 67.5.
  per_seed = [55.0, 59.0, 58.5]
  sd = math.sqrt(sum((x - 57.5) ** 2 for x in per_seed) / 3)
  assert (
    f"| sccan | 62.00 ± 1.63 (3×1000) | 53.00 ± 2.45 (3×1000) | – | – | 57.50 ± {sd:.2f} [2/4 folds] "
    f"| 67.50 ± {sd:.2f} |"
  ) in md
  assert (
    "population std, ddof = 0" in md and "Never the best seed" in md and "best-of" not in md.lower()
  )
  assert "## pascal5i · 1-shot · protocol pfenet_bam" in md and '"test_size"=473' not in md
  assert "test_size=473" in md and "seeds=[1, 2, 3]" in md
  rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
  assert [(r["fold"], r["miou_mean"], r["n_results"], r["runs"], r["seeds"]) for r in rows] == [
    ("0", "62.0000", "3", "2", "1 2 3"),
    ("1", "53.0000", "3", "2", "1 2 3"),
    ("mean", "57.5000", "6", "4", "1 2 3"),
  ]
  # Sample std (ddof 1) when asked, said so in the legend; best-of only on request and labelled.
  assert table.main([str(tmp_path), "--std", "sample", "--best-of"]) == 0
  md = capsys.readouterr().out
  assert "62.00 ± 2.00 (3×1000)" in md and "sample std, ddof = 1" in md
  assert (
    "best-of, not a mean" in md
    and "| sccan | 64.00 (of 3) | 56.00 (of 3) | – | – | 59.00 [2/4 folds] |" in md
  )


def test_a_column_under_two_protocols_is_refused(tmp_path, capsys):
  _write(tmp_path / "a", fold=0, seeds={1: (60.0, 70.0)})
  hs = _write(tmp_path / "h", fold=0, seeds={0: (58.0, 69.0)}, model="hdmnet", protocol=HSNET)
  assert table.main([str(tmp_path / "a"), str(hs)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(
    "error: column pascal5i 1-shot mixes protocols"
  )
  assert "test_size 473 vs 400" in err and "--split-protocols" in err
  assert table.main([str(tmp_path), "--split-protocols"]) == 0
  md = capsys.readouterr().out
  assert "protocol pfenet_bam" in md and "protocol hsnet" in md
  # A 1-shot-trained model tested at 5 shots is its own row, labelled with its training shot.
  _write(tmp_path / "k", fold=0, seeds={1: (61.0, 71.0)}, shot=5, train_shot=1)
  assert table.main([str(tmp_path / "a"), str(tmp_path / "k")]) == 0
  assert "| sccan (trained 1-shot) | 61.00 ± 0.00 (1×1000) | – |" in capsys.readouterr().out
  assert table.main([str(tmp_path / "nothing")]) == 2
  assert "neither a workdir nor a results JSON" in capsys.readouterr().err
