"""One results table from many runs: mean ± std over seeds per cell, fold mean, FB-IoU.

  python -m fss_jax.eval.table WORKDIR_OR_RESULTS_JSON... [--markdown OUT.md] [--csv OUT.csv]
      [--best-of] [--std population|sample] [--split-protocols]

Reads every ``results_*.json`` that ``--mode eval`` wrote under the given workdirs (or the given
files) and groups them:

* a **column** is (test dataset, shot, way), one Markdown section each, headed by its protocol
  (every resolved field, `fss_jax.eval.protocol`); results of one column under different
  protocols are refused (exit status 2, one line naming the two runs and the fields that differ)
  unless ``--split-protocols`` makes one column per protocol;
* a **row** is a method: the model, its model fields where runs of that model differ, and the
  training shot / dataset when they differ from the test's (K-shot testing, cross-domain);
* a **cell** is one fold: mean ± std over the n (run, test seed) results it holds — several
  seeds of one run and the seeds of several runs are pooled — with n and the episodes per
  result beside it; then the mean over folds and the FB-IoU of that mean.

Never the best seed: ``--best-of`` adds a separate table of the maximum per cell, labelled so.
Std: population (ddof 0, as `fss_jax.eval.evaluate`) unless ``--std sample`` (ddof 1); the legend
says which. Markdown goes to stdout (and ``--markdown``); ``--csv`` writes one row per cell.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fss_jax import io as fss_io

# Fields of a recorded protocol that make two results comparable; the seeds are what a cell
# pools over, and the preset's name is only a label.
_NOT_IDENTITY = ("name", "seeds")
# Folds of a benchmark: a missing one shows as "–" and the fold mean says how many it averages.
_NUM_FOLDS = {"pascal5i": 4, "coco20i": 4}


class TableError(ValueError):
  """Input the table cannot be made from (printed as one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One (run, test seed) result."""

  path: str
  seed: str
  miou: float
  fb_iou: float
  episodes: int


@dataclasses.dataclass
class Result:
  """One results JSON."""

  path: str
  model: str
  dataset: str
  fold: int
  shot: int
  way: int
  protocol: dict
  train_shot: int
  train_dataset: str
  train_fold: int
  model_fields: dict
  samples: list

  @property
  def column(self) -> tuple:
    return (self.dataset, self.shot, self.way)


def protocol_of(summary: Mapping[str, Any]) -> dict:
  """The recorded protocol; results written before protocols were recorded get
  {"name": "unrecorded", "score", "episodes"} from what they hold."""
  p = summary.get("protocol")
  if isinstance(p, Mapping):
    return dict(p)
  return {
    "name": "unrecorded",
    "score": summary.get("score"),
    "episodes": summary.get("episodes_per_seed"),
  }


def identity(protocol: Mapping[str, Any]) -> tuple:
  return tuple(
    sorted(
      (k, json.dumps(v, sort_keys=True)) for k, v in protocol.items() if k not in _NOT_IDENTITY
    )
  )


def load(path: str | os.PathLike) -> Result | None:
  """A `Result` from a results JSON; None for a JSON that is not one (no per-seed results)."""
  try:
    s = json.loads(fss_io.user_path(path).read_text())
  except (OSError, ValueError) as e:
    raise TableError(f"cannot read {path}: {e}") from None
  if not isinstance(s, dict) or not isinstance(s.get("seeds"), dict) or "model" not in s:
    return None
  try:
    samples = [
      Sample(str(path), str(seed), float(r["miou"]), float(r["fb_iou"]), int(r.get("episodes", 0)))
      for seed, r in s["seeds"].items()
    ]
    shot, way = int(s["shot"]), int(s.get("way", 1))
    return Result(
      path=str(path),
      model=str(s["model"]),
      dataset=str(s["dataset"]),
      fold=int(s["fold"]),
      shot=shot,
      way=way,
      protocol=protocol_of(s),
      train_shot=int(s.get("train_shot", shot)),
      train_dataset=str(s.get("train_dataset", s["dataset"])),
      train_fold=int(s.get("train_fold", int(s["fold"]))),
      model_fields=dict(s.get("model_fields") or {}),
      samples=samples,
    )
  except (KeyError, TypeError, ValueError) as e:
    raise TableError(f"{path} is not a results JSON of fss_jax ({type(e).__name__}: {e})") from None


def collect(paths: Iterable[str | os.PathLike]) -> list[Result]:
  """Results under workdirs (``results_*.json``, recursively; in a ``gs://`` folder, which
  cannot be listed recursively, two levels deep) and results files given directly."""
  out = []
  for p in paths:
    p = fss_io.user_path(p)
    if p.is_dir():
      if fss_io.is_remote(p):
        files = sorted([*p.glob("results_*.json"), *p.glob("*/results_*.json")])
      else:  # epath has no recursive glob; a local folder is walked by pathlib
        files = sorted(pathlib.Path(p).rglob("results_*.json"))
    elif p.is_file():
      files = [p]
    else:
      raise TableError(f"{p} is neither a workdir nor a results JSON")
    for f in files:
      r = load(f)
      if r is not None:
        out.append(r)
  if not out:
    raise TableError(
      f"no results JSON (results_*.json with per-seed results) under {', '.join(map(str, paths))}"
    )
  return out


def std(values: Sequence[float], kind: str) -> float:
  """Population (ddof 0) or sample (ddof 1) standard deviation; 0 for one value under
  "population", NaN for one value under "sample"."""
  v = np.asarray(values, np.float64)
  ddof = 1 if kind == "sample" else 0
  return float(v.std(ddof=ddof)) if len(v) > ddof else float("nan")


# -- grouping --------------------------------------------------------------------------------


def _row_labels(results: list[Result]) -> dict[int, str]:
  """Row label of every result (by id): model, differing model fields, training shot/dataset."""
  fields_by_model = collections.defaultdict(list)
  for r in results:
    fields_by_model[r.model].append(r.model_fields)
  labels = {}
  for r in results:
    variants = fields_by_model[r.model]
    keys = sorted({k for f in variants for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in variants}) > 1]
    parts = [", ".join(f"{k}={r.model_fields.get(k)}" for k in differ)] if differ else []
    if r.train_shot != r.shot:
      parts.append(f"trained {r.train_shot}-shot")
    if r.train_dataset != r.dataset:
      parts.append(f"trained on {r.train_dataset} fold {r.train_fold}")
    labels[id(r)] = r.model + (f" ({'; '.join(parts)})" if parts else "")
  return labels


@dataclasses.dataclass
class Column:
  dataset: str
  shot: int
  way: int
  protocol: dict
  folds: list
  rows: dict  # label -> {fold: [Sample]}

  @property
  def title(self) -> str:
    way = f"{self.way}-way " if self.way > 1 else ""
    return f"{self.dataset} · {way}{self.shot}-shot · protocol {self.protocol.get('name', '?')}"


def columns(results: list[Result], *, split_protocols: bool = False) -> list[Column]:
  """Groups results into columns; refuses one column under several protocols (TableError)."""
  labels = _row_labels(results)
  groups: dict[tuple, list[Result]] = collections.defaultdict(list)
  for r in results:
    key = r.column + ((identity(r.protocol),) if split_protocols else ())
    groups[key].append(r)
  out = []
  for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
    rs = groups[key]
    first = rs[0]
    for r in rs[1:]:
      if identity(r.protocol) != identity(first.protocol):
        raise TableError(_mixed_message(first, r))
    rows: dict[str, dict[int, list]] = collections.defaultdict(
      lambda: collections.defaultdict(list)
    )
    for r in rs:
      rows[labels[id(r)]][r.fold].extend(r.samples)
    folds = sorted({r.fold for r in rs} | set(range(_NUM_FOLDS.get(first.dataset, 0))))
    seeds = sorted({s for r in rs for s in r.protocol.get("seeds", []) or []})
    protocol = (
      dict(first.protocol, seeds=seeds) if "seeds" in first.protocol else dict(first.protocol)
    )
    out.append(
      Column(
        first.dataset,
        first.shot,
        first.way,
        protocol,
        folds,
        {k: dict(v) for k, v in sorted(rows.items())},
      )
    )
  return out


def _mixed_message(a: Result, b: Result) -> str:
  pa, pb = a.protocol, b.protocol
  keys = [k for k in sorted(set(pa) | set(pb)) if k not in _NOT_IDENTITY and pa.get(k) != pb.get(k)]
  diff = ", ".join(f"{k} {pa.get(k)!r} vs {pb.get(k)!r}" for k in keys)
  way = f"{a.way}-way " if a.way > 1 else ""
  return (
    f"column {a.dataset} {way}{a.shot}-shot mixes protocols: {pa.get('name')} ({a.path}) and "
    f"{pb.get('name')} ({b.path}) differ in {diff}; evaluate both under one protocol "
    f"(--config.protocol=...) or pass --split-protocols"
  )


# -- statistics ------------------------------------------------------------------------------


@dataclasses.dataclass
class Stat:
  miou: float
  miou_std: float
  fb: float
  fb_std: float
  n: int
  episodes: tuple  # distinct episode counts of the samples
  runs: int
  seeds: tuple
  best: float
  note: str = ""


def cell_stat(samples: list[Sample], kind: str) -> Stat:
  m = [s.miou for s in samples]
  f = [s.fb_iou for s in samples]
  return Stat(
    float(np.mean(m)),
    std(m, kind),
    float(np.mean(f)),
    std(f, kind),
    len(samples),
    tuple(sorted({s.episodes for s in samples})),
    len({s.path for s in samples}),
    tuple(sorted({s.seed for s in samples}, key=_seed_key)),
    float(np.max(m)),
  )


def _seed_key(s: str):
  return (0, int(s)) if s.lstrip("-").isdigit() else (1, s)


def fold_mean(cells: Mapping[int, list[Sample]], folds: Sequence[int], kind: str) -> Stat | None:
  """Mean over the folds of the cell means; ± over seeds of the per-seed fold mean when every
  fold holds the same seeds (paired by seed, then run), else NaN (no ±)."""
  present = [f for f in folds if f in cells]
  if not present:
    return None
  stats = [cell_stat(cells[f], kind) for f in present]
  miou = float(np.mean([s.miou for s in stats]))
  fb = float(np.mean([s.fb for s in stats]))
  order = {f: sorted(cells[f], key=lambda s: (_seed_key(s.seed), s.path)) for f in present}
  seed_lists = [tuple(s.seed for s in order[f]) for f in present]
  if len(set(seed_lists)) == 1:
    per_m = np.mean([[s.miou for s in order[f]] for f in present], axis=0)
    per_f = np.mean([[s.fb_iou for s in order[f]] for f in present], axis=0)
    ms, fs = std(per_m, kind), std(per_f, kind)
    best = float(np.max(per_m))
  else:
    ms = fs = float("nan")
    best = float(np.mean([s.best for s in stats]))
  note = "" if len(present) == len(folds) else f"{len(present)}/{len(folds)} folds"
  return Stat(
    miou,
    ms,
    fb,
    fs,
    sum(s.n for s in stats),
    tuple(sorted({e for s in stats for e in s.episodes})),
    len({x.path for f in present for x in cells[f]}),
    tuple(sorted({x.seed for f in present for x in cells[f]}, key=_seed_key)),
    best,
    note,
  )


# -- rendering -------------------------------------------------------------------------------


def _pm(mean: float, sd: float) -> str:
  return f"{mean:.2f}" if np.isnan(sd) else f"{mean:.2f} ± {sd:.2f}"


def _behind(st: Stat) -> str:
  eps = "/".join(str(e) for e in st.episodes)
  return f"({st.n}×{eps})"


def _protocol_line(p: Mapping[str, Any]) -> str:
  from fss_jax.eval import protocol as protocol_lib

  order = {k: i for i, k in enumerate(("name", *protocol_lib.FIELDS))}
  keys = sorted(p, key=lambda k: (order.get(k, len(order)), k))
  return ", ".join(f"{k}={json.dumps(p[k])}" for k in keys)


def markdown(cols: list[Column], *, kind: str = "population", best_of: bool = False) -> str:
  ddof = "population std, ddof = 0" if kind == "population" else "sample std, ddof = 1"
  lines = [
    "# Results",
    "",
    f"Each cell: mIoU mean ± std over the n (run, test seed) results of that fold ({ddof}), "
    "then (n×E): n results of E episodes each. *mean*: the mean over folds of the cell means; "
    "its ± is the std over seeds of the per-seed fold mean when every fold was tested on the "
    "same seeds, else omitted. *FB-IoU*: the same for FB-IoU. Never the best seed"
    + (" (best-of tables below are labelled)." if best_of else "."),
    "",
  ]
  for col in cols:
    lines += [f"## {col.title}", "", f"Protocol: {_protocol_line(col.protocol)}", ""]
    lines += _table(col, kind, best=False)
    if best_of:
      lines += [
        "",
        "Best single result per cell (max over runs × seeds; **best-of, not a mean**, "
        "shown because --best-of was given):",
        "",
      ]
      lines += _table(col, kind, best=True)
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def _table(col: Column, kind: str, *, best: bool) -> list[str]:
  head = ["method"] + [f"fold {f}" for f in col.folds] + ["mean"] + ([] if best else ["FB-IoU"])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, cells in col.rows.items():
    out = [label]
    for f in col.folds:
      if f not in cells:
        out.append("–")
        continue
      st = cell_stat(cells[f], kind)
      out.append(
        f"{st.best:.2f} (of {st.n})" if best else f"{_pm(st.miou, st.miou_std)} {_behind(st)}"
      )
    m = fold_mean(cells, col.folds, kind)
    assert m is not None, f"row {label!r} has no fold of {col.folds}"
    note = f" [{m.note}]" if m.note else ""
    if best:
      out.append(f"{m.best:.2f}{note}")
    else:
      out += [f"{_pm(m.miou, m.miou_std)}{note}", _pm(m.fb, m.fb_std)]
    rows.append("| " + " | ".join(out) + " |")
  return rows


CSV_FIELDS = (
  "dataset",
  "shot",
  "way",
  "protocol",
  "method",
  "fold",
  "miou_mean",
  "miou_std",
  "fb_iou_mean",
  "fb_iou_std",
  "n_results",
  "runs",
  "seeds",
  "episodes_per_result",
  "std",
  "best_miou",
  "protocol_fields",
)


def csv_text(cols: list[Column], *, kind: str = "population", best_of: bool = False) -> str:
  buf = io.StringIO()
  fields = [f for f in CSV_FIELDS if best_of or f != "best_miou"]
  w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
  w.writeheader()
  for col in cols:
    for label, cells in col.rows.items():
      stats = [(str(f), cell_stat(cells[f], kind)) for f in col.folds if f in cells]
      m = fold_mean(cells, col.folds, kind)
      assert m is not None, f"row {label!r} has no fold of {col.folds}"
      stats.append(("mean", m))
      for fold, st in stats:
        row = {
          "dataset": col.dataset,
          "shot": col.shot,
          "way": col.way,
          "protocol": col.protocol.get("name", ""),
          "method": label,
          "fold": fold,
          "miou_mean": f"{st.miou:.4f}",
          "miou_std": "" if np.isnan(st.miou_std) else f"{st.miou_std:.4f}",
          "fb_iou_mean": f"{st.fb:.4f}",
          "fb_iou_std": "" if np.isnan(st.fb_std) else f"{st.fb_std:.4f}",
          "n_results": st.n,
          "runs": st.runs,
          "seeds": " ".join(st.seeds),
          "episodes_per_result": "/".join(map(str, st.episodes)),
          "std": kind,
          "protocol_fields": json.dumps(col.protocol, sort_keys=True),
        }
        if best_of:
          row["best_miou"] = f"{st.best:.4f}"
        w.writerow(row)
  return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m fss_jax.eval.table", description=__doc__.split("\n")[0]
  )
  p.add_argument(
    "paths", nargs="+", help="workdirs (searched for results_*.json) or results JSON files"
  )
  p.add_argument("--markdown", help="also write the Markdown table here")
  p.add_argument("--csv", help="write one CSV row per cell here")
  p.add_argument(
    "--best-of",
    action="store_true",
    help="add the best single result per cell, in its own labelled table / CSV column",
  )
  p.add_argument(
    "--std",
    choices=("population", "sample"),
    default="population",
    help="std over results: population (ddof 0, default, as the results JSON) or sample (ddof 1)",
  )
  p.add_argument(
    "--split-protocols",
    action="store_true",
    help="one column per protocol instead of refusing a column that mixes protocols",
  )
  a = p.parse_args(argv)
  try:
    cols = columns(collect(a.paths), split_protocols=a.split_protocols)
  except TableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  md = markdown(cols, kind=a.std, best_of=a.best_of)
  if a.markdown:
    fss_io.atomic_write(a.markdown, md)
  if a.csv:
    fss_io.atomic_write(a.csv, csv_text(cols, kind=a.std, best_of=a.best_of))
  sys.stdout.write(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
