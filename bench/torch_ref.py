"""Throughput of the official PyTorch implementation, same inputs as bench/run.py (prints JSON).

Nothing of the reference is vendored: point ``--repo`` at your checkout of the
official repository; its model class is imported with ``sys.path`` insertion and
built as the parity fixtures' json says (``construction`` / ``config`` of
``shared/parity/<model>/*.json``), with random weights (speed does not depend on
them)::

  git clone https://github.com/kaixin96/PANet /tmp/PANet
  python bench/torch_ref.py --repo /tmp/PANet --model panet --mode train --size 129 --batch 2
  git clone https://github.com/Sam1224/SCCAN /tmp/SCCAN
  python bench/torch_ref.py --repo /tmp/SCCAN --model sccan --mode eval --size 473 --batch 8

Supported: the names in ``bench/torch_refs/__init__.py`` (one builder module per
reference, each names its repository and class); other names get a "not supported" message.
The episode is `bench.run.synthetic_episode` (same seed, same numbers), transposed to
NCHW and placed on the device once. Train mode runs the reference's own training
iteration (``model.train()``, forward with labels, its loss, ``zero_grad``,
``backward``, its optimiser(s) ``step``); eval mode ``model.eval()`` +
``torch.no_grad()`` forward + argmax. ``--device`` defaults to CUDA when available
(timed with ``torch.cuda.synchronize``). The JSON fields are those of bench/run.py;
``compile_s`` is null and ``first_step_s`` is the first (untimed) iteration.

Shims (bench/torch_refs/common.py) are used only when the import is missing (the
references pin old libraries), e.g. ``torchvision.models.utils`` (removed in torchvision
0.13) and ``timm.models.layers`` (DropPath, to_2tuple, trunc_normal_: small local versions
of these helpers); they are listed under ``shims`` in the output. During construction
``torch.load`` of the initial weights (``initmodel/*.pth``) is answered with an empty
marker and the matching ``load_state_dict`` is skipped (the weights stay random); the
paths are listed under ``checkpoint_files_skipped``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if os.fspath(REPO) not in sys.path:
  sys.path.insert(0, os.fspath(REPO))

from bench import run as jax_run
from bench import torch_refs

SUPPORTED = tuple(torch_refs.MODULES)


# Registered fss-jax models without a PyTorch reference to time, and why.
NO_REFERENCE = {
  "jc2a": "JC²A has no public code (shared/reference/jc2a.md: the paper only); fss-jax's JC²A is "
  "specified from the paper with PFENet's choices, so there is nothing official to time",
  "pspnet": "pspnet is the base learner inside HDMNet / PAHNet (time those); the BAM PSPNet training "
  "script is not wired in",
}


class NotSupportedError(ValueError):
  pass


def _repo_commit(repo: pathlib.Path) -> str | None:
  """The checkout's commit (``git rev-parse HEAD``), or None when it is not a git work tree."""
  import subprocess

  try:
    p = subprocess.run(
      ["git", "-C", os.fspath(repo), "rev-parse", "--show-toplevel", "HEAD"],
      capture_output=True,
      text=True,
      timeout=10,
      check=False,
    )
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = p.stdout.split()
  if p.returncode or len(lines) != 2 or pathlib.Path(lines[0]).resolve() != repo.resolve():
    return None  # not a git work tree of its own (e.g. an exported archive inside another repo)
  return lines[1]


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
  if args.model in NO_REFERENCE:
    raise NotSupportedError(
      f"bench/torch_ref.py: no reference for {args.model!r}: {NO_REFERENCE[args.model]}"
    )
  if args.model not in SUPPORTED:
    raise NotSupportedError(
      f"bench/torch_ref.py: model {args.model!r} is not supported (supported: "
      + ", ".join(f"{k} = {torch_refs.reference(k)}" for k in SUPPORTED)
      + ")"
    )
  if args.dtype != "float32":
    raise NotSupportedError(
      "bench/torch_ref.py runs the references in float32 only (--dtype float32)"
    )
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  dev_name = args.device
  if dev_name == "auto":
    dev_name = "cuda" if torch.cuda.is_available() else "cpu"
  device = torch.device(dev_name)
  cuda = device.type == "cuda"
  torch.manual_seed(args.seed)

  host = jax_run.synthetic_episode(args.batch, args.shot, args.size, seed=args.seed)
  ep = {}
  for key, v in host.items():
    if v.ndim == 4 and key == "query_image":
      v = v.transpose(0, 3, 1, 2)  # [B, 3, H, W]
    elif v.ndim == 5:
      v = v.transpose(0, 1, 4, 2, 3)  # [B, K, 3, H, W]
    ep[key] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
  shims: list[str] = []
  train = args.mode == "train"
  build = torch_refs.builder(args.model)
  model, train_iter, eval_fwd, info = build(
    pathlib.Path(args.repo).resolve(), ep, train=train, device=device, shims=shims
  )
  n_params = sum(p.numel() for p in model.parameters())
  n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
  if train:
    model.train()
    fn = train_iter
  else:
    model.eval()

    def fn():
      with torch.no_grad():
        return eval_fwd()

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)
  t0 = time.perf_counter()
  out = fn()
  sync()
  first_s = time.perf_counter() - t0
  for _ in range(max(0, args.warmup - 1)):
    out = fn()
  sync()
  t1 = time.perf_counter()
  for _ in range(args.steps):
    out = fn()
  sync()
  elapsed = time.perf_counter() - t1
  rate = args.steps / elapsed
  episodes_s = rate * args.batch
  rec: dict[str, Any] = {
    "bench": "torch_ref",
    "impl": "torch",
    "model": args.model,
    "mode": args.mode,
    "size": args.size,
    "batch": args.batch,
    "shot": args.shot,
    "dtype": args.dtype,
    "devices": 1,
    "with_pipeline": False,
    "steps": args.steps,
    "warmup": args.warmup,
    "steps_per_s": round(rate, 4),
    "episodes_per_s": round(episodes_s, 4),
    "images_per_s": round(episodes_s * (1 + args.shot), 4),
    "step_ms": round(1000 * elapsed / args.steps, 2),
    "compile_s": None,
    "first_step_s": round(first_s, 2),
  }
  if train:
    rec["final_loss"] = float(out.detach().cpu())
  if cuda:
    rec["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    rec["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
  else:
    rec["peak_memory_bytes"] = jax_run.host_peak_rss_bytes()
    rec["peak_memory_kind"] = "host peak RSS"
  rec.update(
    {
      "params_total": int(n_params),
      "params_trainable": int(n_train),
      "backend": device.type,
      "device_kind": torch.cuda.get_device_name(device) if cuda else "cpu",
      "torch_version": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "reference": torch_refs.reference(args.model),
      "repo": os.fspath(pathlib.Path(args.repo).resolve()),
      "repo_commit": args.repo_commit or _repo_commit(pathlib.Path(args.repo)),
      "shims": shims,
      **info,
      "command": "python bench/torch_ref.py " + " ".join(args.argv),
      "host": jax_run.host_info(),
    }
  )
  return rec


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--repo", required=True, help="root of your checkout of the official repository")
  p.add_argument(
    "--repo-commit",
    default="",
    help="commit of the checkout to record when --repo is not a git work tree (an export)",
  )
  p.add_argument("--model", required=True, help=", ".join(SUPPORTED))
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--size", type=int, default=473)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--shot", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
  p.add_argument("--out", default="", help="also append the JSON line to this .jsonl file")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(argv)
  args.argv = argv
  rec = run(args)
  jax_run.emit(rec, args.out or None)
  return rec


if __name__ == "__main__":
  try:
    main()
  except (NotSupportedError, FileNotFoundError) as e:
    print(f"{e}", file=sys.stderr)
    sys.exit(2)
