"""Regenerates bench/RESULTS.md from the JSON lines in bench/results/*.jsonl.

Every benchmark script appends its record with ``--out bench/results/<name>.jsonl``;
this script turns all of them into one Markdown page, a section per model (JAX vs
PyTorch comparisons, every single run with its machine and versions, device
scaling, and the exact commands), so the numbers in RESULTS.md are never typed::

  python bench/results.py                 # writes bench/RESULTS.md
  python bench/results.py --check         # exit 1 when RESULTS.md is out of date
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
OUTPUT = HERE / "RESULTS.md"


def load(results_dir: pathlib.Path) -> list[dict[str, Any]]:
  """All records, in file-name then line order; a bad line is an error naming file and line."""
  out = []
  for path in sorted(results_dir.glob("*.jsonl")):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
          f"{path}:{i} is not a JSON line ({e}); fix or delete it and rerun"
        ) from None
      rec["_file"] = path.name
      out.append(rec)
  return out


def _fmt(v: Any, nd: int = 3) -> str:
  if v is None or v == "":
    return "–"
  if isinstance(v, float):
    if v == 0:
      return "0"
    if abs(v) >= 100:
      return f"{v:.0f}"
    if abs(v) >= 10:
      return f"{v:.1f}"
    return f"{v:.{nd}g}"
  return str(v)


def _mib(v: Any) -> str:
  return "–" if v is None else f"{v / 2**20:.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
  return lines


def _device(r: dict) -> str:
  kind = r.get("device_kind") or ""
  backend = r.get("backend") or ""
  return backend if kind in ("", backend) else f"{backend} ({kind})"


def _load(r: dict) -> str:
  la = (r.get("host") or {}).get("load_avg")
  return "–" if not la else f"{la[0]:.1f}"


def _versions(r: dict) -> str:
  if r.get("impl") == "torch":
    return f"torch {r.get('torch_version', '?')} ({r.get('torch_threads', '?')} threads)"
  return f"jax {r.get('jax_version', '?')}, flax {r.get('flax_version', '?')}"


def _rate_name(r: dict) -> str:
  return "steps/s" if r.get("mode") == "train" else "episodes/s"


def _single_rows(runs: list[dict]) -> list[list[Any]]:
  rows = []
  for r in runs:
    mem = _mib(r.get("peak_memory_bytes"))
    kind = r.get("peak_memory_kind") or ""
    mem += " (host RSS)" if "RSS" in kind else (" (device)" if kind else "")
    flops = r.get("flops_per_step")
    params = r.get("params_total")
    trainable = r.get("params_trainable")
    rows.append(
      [
        r.get("impl"),
        r.get("mode"),
        r.get("size"),
        r.get("batch"),
        r.get("shot"),
        r.get("dtype"),
        r.get("devices"),
        ("pipeline" if r.get("with_pipeline") else "synthetic"),
        _device(r),
        r.get("steps_per_s"),
        r.get("episodes_per_s"),
        r.get("images_per_s"),
        r.get("compile_s")
        if r.get("compile_s") is not None
        else (f"first step {r['first_step_s']}" if r.get("first_step_s") is not None else None),
        mem,
        None if flops is None else flops / 1e9,
        r.get("mfu"),
        None
        if params is None
        else f"{params / 1e6:.2f}M"
        + (f" ({trainable / 1e6:.2f}M)" if trainable is not None else ""),
        _versions(r),
        _load(r),
        (r.get("host") or {}).get("time_utc"),
      ]
    )
  return rows


SINGLE_HEADER = (
  "impl",
  "mode",
  "size",
  "B",
  "K",
  "dtype",
  "dev",
  "input",
  "backend (device)",
  "steps/s",
  "episodes/s",
  "images/s",
  "compile s",
  "peak MiB",
  "GFLOP/step",
  "MFU",
  "params (trainable)",
  "versions",
  "load",
  "time (UTC)",
)


# Plug-in models and the base model they extend: their sections get a cost table.
PLUGIN_BASES = {"sccan_pahnet": "sccan", "hdmnet_pahnet": "hdmnet"}


def _latest_jax(runs: list[dict]) -> dict[tuple, dict]:
  """(mode, size, batch, shot, dtype, devices) -> the last float32 JAX record of that key."""
  out = {}
  for r in runs:
    if r.get("impl") == "jax" and not r.get("with_pipeline") and "error" not in r:
      out[
        (
          r.get("mode"),
          r.get("size"),
          r.get("batch"),
          r.get("shot"),
          r.get("dtype"),
          r.get("devices"),
        )
      ] = r
  return out


def _plugin_rows(plus: list[dict], base: list[dict]) -> list[list[Any]]:
  rows = []
  base_by_key = _latest_jax(base)
  for key, r in sorted(_latest_jax(plus).items(), key=str):
    b = base_by_key.get(key)
    if b is None:
      continue
    rows.append(
      [
        key[0],
        key[1],
        key[2],
        key[3],
        key[4],
        b.get("steps_per_s"),
        r.get("steps_per_s"),
        round(r["step_ms"] / b["step_ms"], 2) if b.get("step_ms") and r.get("step_ms") else None,
        _fmt((r.get("flops_per_step") or 0) / 1e9) if r.get("flops_per_step") else None,
        _fmt((b.get("flops_per_step") or 0) / 1e9) if b.get("flops_per_step") else None,
        _load(b) + " / " + _load(r),
      ]
    )
  return rows


def _summary_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
  """The latest JAX-vs-PyTorch comparison of every (model, mode, size, B, K, backend, XLA flags)."""
  latest: dict[tuple, dict] = {}
  for c in records:
    if c.get("bench") != "compare" or "speedup" not in c:
      continue
    j = c.get("jax", {})
    key = (
      c.get("model"),
      c.get("mode"),
      c.get("size"),
      c.get("batch"),
      c.get("shot"),
      _device(j),
      c.get("xla_flags", ""),
    )
    if key not in latest or str((j.get("host") or {}).get("time_utc", "")) >= str(
      (latest[key]["jax"].get("host") or {}).get("time_utc", "")
    ):
      latest[key] = c
  rows = []
  for key in sorted(latest, key=str):
    c = latest[key]
    rows.append(
      list(key[:6])
      + [
        c["jax"].get("steps_per_s"),
        c["torch"].get("steps_per_s"),
        c["speedup"],
        key[6] or "–",
        _load(c["jax"]),
        (c["jax"].get("host") or {}).get("time_utc"),
      ]
    )
  return rows


PROTOCOL_FILE = "eval_protocol"  # bench/results/eval_protocol_*.jsonl: the protocol table


def _protocol_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
  """`--mode eval_protocol` runs (cached, plain) and the official test forward (torch_ref eval
  records of the same file), one row each, grouped by (model, K, size); speed-up vs plain."""
  groups: dict[tuple, dict[str, dict]] = {}
  for r in records:
    if not str(r.get("_file", "")).startswith(PROTOCOL_FILE):
      continue
    if r.get("mode") == "eval_protocol":
      kind = "cached" if r.get("cache") else "plain"
    elif r.get("impl") == "torch" and r.get("mode") == "eval":
      kind = "official (forward only)"
    else:
      continue
    groups.setdefault((r.get("model"), r.get("shot"), r.get("size")), {})[kind] = r
  rows = []
  for (model, shot, size), kinds in sorted(groups.items(), key=lambda kv: str(kv[0])):
    plain = kinds.get("plain", {}).get("episodes_per_s")
    plain_gflop = kinds.get("plain", {}).get("gflop_per_episode")
    for kind in ("cached", "plain", "official (forward only)"):
      r = kinds.get(kind)
      if r is None:
        continue
      rate, gflop = r.get("episodes_per_s"), r.get("gflop_per_episode")
      host = r.get("host") or {}
      episodes = (
        f"{r['episodes_per_seed']} × {len(r['seeds'])}"
        if "episodes_per_seed" in r
        else f"{r.get('steps')} steps"
      )
      rows.append(
        [
          model,
          shot,
          size,
          kind,
          episodes,
          rate,
          None if not (plain and rate) else f"{rate / plain:.2f}×",
          gflop,
          None if not (plain_gflop and gflop) else f"{plain_gflop / gflop:.2f}×",
          r.get("unique_images"),
          r.get("backbone_passes"),
          None if r.get("cache_bytes") is None else _mib(r["cache_bytes"]),
          r.get("peak_mib"),
          r.get("miou"),
          _load(r),
          host.get("time_utc"),
        ]
      )
  return rows


def render(records: list[dict[str, Any]]) -> str:
  """The Markdown page."""
  by_model: dict[str, dict[str, list]] = {}
  for rec in records:
    if rec.get("mode") == "eval_protocol":  # the protocol table only
      continue
    model = rec.get("model") or "?"
    slot = by_model.setdefault(
      model,
      {"compare": [], "runs": [], "scaling": [], "commands": [], "hosts": [], "precision": []},
    )
    kind = rec.get("bench")
    if rec.get("command"):
      slot["commands"].append(rec["command"])
    if kind == "compare":
      slot["compare"].append(rec)
      for side in ("jax", "torch"):
        if "error" not in rec.get(side, {"error": 1}):
          slot["runs"].append(rec[side])
    elif kind == "scaling":
      slot["scaling"].append(rec)
    elif kind == "precision":
      slot["precision"].append(rec)
    else:
      slot["runs"].append(rec)
    host = rec.get("host") or (rec.get("jax") or {}).get("host")
    if host:
      slot["hosts"].append(host)

  out = [
    "# fss-jax benchmark results",
    "",
    "Generated by `python bench/results.py` from `bench/results/*.jsonl` — do not edit by hand;",
    "rerun a benchmark with `--out bench/results/<file>.jsonl` and regenerate.",
    "Rates exclude compilation (`compile s`) and warm-up steps. Episodes are synthetic and",
    "device-resident unless `input` says pipeline. `load` is the host's 1-minute load",
    "average when the run started (CPU figures on a loaded, shared machine are noisy).",
    "`peak MiB` is the device's peak allocation where the backend reports it, else the",
    "process's peak host RSS (which includes the framework itself). GFLOP/step is XLA's",
    "cost analysis of the compiled step (per device).",
    "",
  ]
  if not records:
    out += ["No results yet.", ""]
  summary = _summary_rows(records)
  if summary:
    out += [
      "## Summary: fss-jax vs the official PyTorch code",
      "",
      "Latest `bench/compare.py` run of each configuration (both sides on the same machine, one",
      "after the other, same synthetic inputs); speed-up = JAX steps/s ÷ PyTorch steps/s. JC²A has",
      "no official code to compare with. On a shared CPU the ratio moves with the load (PyTorch",
      "loses more under contention), so compare rows of similar load and time; details and",
      "commands in each model's section.",
      "",
    ]
    out += _table(
      (
        "model",
        "mode",
        "size",
        "B",
        "K",
        "backend",
        "JAX steps/s",
        "PyTorch steps/s",
        "speed-up",
        "XLA_FLAGS",
        "load",
        "time (UTC)",
      ),
      summary,
    )
    out.append("")
  protocol = _protocol_rows(records)
  if protocol:
    out += [
      "## The test protocol end to end: frozen-encoder cache vs the plain path",
      "",
      "`bench/run.py --mode eval_protocol` (bench/eval_protocol.py): stored episode lists of a",
      "synthetic PASCAL-5i fold 0 → decode → §9 transform → model (random weights) → scoring at",
      "the original label size, batch 1, compile excluded. `cached`: the frozen encoder once per",
      "unique image (fss_jax/eval/cached.py); `plain`: the whole forward per episode (its cost per",
      "episode does not depend on the list length, so it may run fewer episodes); `official`:",
      "`bench/torch_ref.py --mode eval` of the reference checkout, its forward alone on",
      "device-resident inputs (no decoding, no scoring: an upper bound on the official loop).",
      "Speed-up is episodes/s ÷ the plain path's. The cache's gain grows with the reuse",
      "(episodes × (1 + K) ÷ unique images); the synthetic fold has 48 test images, a real",
      "PASCAL-5i fold ~350 for 5 × 1000 episodes. `GFLOP/episode` is XLA's count of the model's",
      "arithmetic (HLO cost analysis): plain, the whole forward; cached, the forward on cached",
      "features plus the encoder's passes shared out over the episodes. Their ratio is the",
      "speed-up the arithmetic allows at equal throughput: the cache removes encoder work only,",
      "so a model whose episode head outweighs its encoder gains less (SCCAN's head runs eight",
      "SCCA blocks and an ASPP decoder on a 64 × 64 grid whatever the input size).",
      "",
    ]
    out += _table(
      (
        "model",
        "K",
        "size",
        "path",
        "episodes × seeds",
        "episodes/s",
        "vs plain",
        "GFLOP/episode",
        "plain ÷ this (GFLOP)",
        "unique images",
        "backbone passes",
        "cache MiB",
        "peak MiB",
        "mIoU",
        "load",
        "time (UTC)",
      ),
      protocol,
    )
    out.append("")
  for model in sorted(by_model):
    slot = by_model[model]
    out += [f"## {model}", ""]
    if slot["compare"]:
      out += ["### JAX vs PyTorch (same machine, same run)", ""]
      rows = []
      for c in slot["compare"]:
        j, t = c.get("jax", {}), c.get("torch", {})
        rows.append(
          [
            c.get("mode"),
            c.get("size"),
            c.get("batch"),
            c.get("shot"),
            _device(j) if j else None,
            j.get("steps_per_s"),
            t.get("steps_per_s"),
            c.get("speedup"),
            j.get("compile_s"),
            _mib(j.get("peak_memory_bytes")),
            _mib(t.get("peak_memory_bytes")),
            _load(j),
            j.get("error") or t.get("error"),
          ]
        )
      out += _table(
        (
          "mode",
          "size",
          "B",
          "K",
          "backend",
          "JAX steps/s",
          "PyTorch steps/s",
          "speed-up (JAX/PyTorch)",
          "JAX compile s",
          "JAX peak MiB",
          "PyTorch peak MiB",
          "load",
          "error",
        ),
        rows,
      )
      out.append("")
    if slot["runs"]:
      out += ["### Runs", ""]
      out += _table(SINGLE_HEADER, _single_rows(slot["runs"]))
      out.append("")
    for s in slot["scaling"]:
      out += [
        f"### Scaling over devices ({s.get('mode')}, size {s.get('size')}, global batch "
        f"{s.get('batch')}, K={s.get('shot')})",
        "",
      ]
      rows = []
      for r in s.get("rows", []):
        cm = r.get("compiled_memory_per_device_bytes") or {}
        rows.append(
          [
            r.get("devices"),
            r.get("batch_per_device"),
            r.get("steps_per_s"),
            r.get("relative_steps_per_s"),
            r.get("compile_s"),
            r.get("final_loss"),
            _mib(cm.get("argument")),
            _mib(cm.get("temp")),
            r.get("error"),
          ]
        )
      out += _table(
        (
          "devices",
          "B/device",
          "steps/s",
          "relative",
          "compile s",
          "final loss",
          "args MiB/device",
          "temp MiB/device",
          "error",
        ),
        rows,
      )
      out += [
        "",
        f"Loss spread over device counts: {_fmt(s.get('loss_spread'))}. {s.get('note', '')}",
        "",
      ]
    base_model = PLUGIN_BASES.get(model)
    rows = (
      _plugin_rows(slot["runs"], by_model[base_model]["runs"]) if base_model in by_model else []
    )
    if rows:
      out += [
        f"### Cost of the plug-in over {base_model} (latest runs of each, same configuration)",
        "",
      ]
      out += _table(
        (
          "mode",
          "size",
          "B",
          "K",
          "dtype",
          f"{base_model} steps/s",
          f"{model} steps/s",
          "time ratio",
          f"{model} GFLOP/step",
          f"{base_model} GFLOP/step",
          "load (base / plug-in)",
        ),
        rows,
      )
      out.append("")
    if slot["precision"]:
      out += [
        "### bfloat16 drift from the float32 PyTorch fixtures (`bench/precision_drift.py`)",
        "",
        "bf16 inputs and compute, float32 parameters (`config.compute_dtype=bfloat16`); "
        "rel = max abs / max(1, max |reference|).",
        "",
      ]
      rows = []
      for r in slot["precision"]:
        for name, e in sorted(r.get("outputs", {}).items()):
          rows.append(
            [
              r.get("fixture"),
              name,
              e.get("max_abs"),
              e.get("scale"),
              e.get("rel"),
              e.get("argmax_agree"),
              r.get("compute_dtype"),
            ]
          )
      out += _table(("fixture", "output", "max abs", "scale", "rel", "argmax agree", "dtype"), rows)
      out.append("")
    refs = []
    for r in slot["runs"]:
      if r.get("impl") == "torch":
        ref = (
          f"{r.get('reference')} from `{r.get('repo')}`"
          + (f" @ {r['repo_commit'][:12]}" if r.get("repo_commit") else "")
          + (f"; shims: {', '.join(r['shims'])}" if r.get("shims") else "")
        )
        if ref not in refs:
          refs.append(ref)
    if refs:
      out += ["PyTorch reference: " + " | ".join(refs), ""]
    hosts = {
      (h.get("cpu"), h.get("cpu_count"), h.get("os"), h.get("python")) for h in slot["hosts"]
    }
    if hosts:
      out += [
        "Machine: "
        + "; ".join(f"{c} × {n} cores, {o}, Python {p}" for c, n, o, p in sorted(hosts, key=str)),
        "",
      ]
    if slot["commands"]:
      out += ["Commands:", "", "```"]
      seen = []
      for cmd in slot["commands"]:
        if cmd not in seen:
          seen.append(cmd)
      out += seen + ["```", ""]
  return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results-dir", default=str(RESULTS_DIR))
  p.add_argument("--output", default=str(OUTPUT))
  p.add_argument("--check", action="store_true", help="only check that the output is up to date")
  a = p.parse_args(argv)
  text = render(load(pathlib.Path(a.results_dir)))
  out = pathlib.Path(a.output)
  if a.check:
    ok = out.is_file() and out.read_text() == text
    print(f"{out} is {'up to date' if ok else 'out of date: run python bench/results.py'}")
    return 0 if ok else 1
  out.write_text(text)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
