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

Supported: ``panet`` (kaixin96/PANet ``models.fewshot.FewShotSeg``) and ``sccan``
(Sam1224/SCCAN ``model.SCCAN.OneModel``); other names get a "not supported" message.
The episode is `bench.run.synthetic_episode` (same seed, same numbers), transposed to
NCHW and placed on the device once. Train mode runs the reference's own training
iteration (``model.train()``, forward with labels, its loss, ``zero_grad``,
``backward``, its optimiser(s) ``step``); eval mode ``model.eval()`` +
``torch.no_grad()`` forward + argmax. ``--device`` defaults to CUDA when available
(timed with ``torch.cuda.synchronize``). The JSON fields are those of bench/run.py;
``compile_s`` is null and ``first_step_s`` is the first (untimed) iteration.

Shims used only when the import is missing (the references pin old libraries):
``torchvision.models.utils`` (SCCAN imports it; removed in torchvision 0.13) and
``timm.models.layers`` (DropPath, to_2tuple, trunc_normal_: small local versions of
these three helpers); both are listed under ``shims`` in the output. During SCCAN's
construction ``torch.load`` of ``initmodel/resnet50_v2.pth`` is answered with an empty
marker and the matching ``load_state_dict`` is skipped (the weights stay random).
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys
import time
import types
from typing import Any, Callable, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if os.fspath(REPO) not in sys.path:
  sys.path.insert(0, os.fspath(REPO))

from bench import run as jax_run  # noqa: E402  pylint: disable=wrong-import-position  (no jax import)

SUPPORTED = {"panet": "kaixin96/PANet models.fewshot.FewShotSeg",
             "sccan": "Sam1224/SCCAN model.SCCAN.OneModel"}


class NotSupportedError(ValueError):
  pass


# ---------------------------------------------------------------------------
# Import helpers
# ---------------------------------------------------------------------------

def _use_repo(repo: pathlib.Path, packages: Sequence[str], marker: str) -> None:
  """Puts ``repo`` first on sys.path and forgets same-named modules imported from elsewhere."""
  if not (repo / marker).is_file():
    raise FileNotFoundError(f"--repo {repo} does not look like the checkout (no {marker}); clone the "
                            f"official repository and pass its root")
  for name in list(sys.modules):
    if name.split(".")[0] in packages:
      del sys.modules[name]
  sys.path.insert(0, os.fspath(repo))


def _shim_torchvision_utils(shims: list[str]) -> None:
  try:
    importlib.import_module("torchvision.models.utils")
  except ImportError:
    import torch  # pylint: disable=g-import-not-at-top
    m = types.ModuleType("torchvision.models.utils")
    m.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = m
    shims.append("torchvision.models.utils -> torch.hub.load_state_dict_from_url")


def _shim_timm(shims: list[str]) -> None:
  try:
    importlib.import_module("timm.models.layers")
    return
  except ImportError:
    pass
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or for p = 0)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
      super().__init__()
      self.drop_prob, self.scale_by_keep = float(drop_prob or 0.0), scale_by_keep

    def forward(self, x):
      if self.drop_prob == 0.0 or not self.training:
        return x
      keep = 1.0 - self.drop_prob
      mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
      return x * mask / keep if self.scale_by_keep else x * mask

  def to_2tuple(x):
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
      return tuple(x)
    return (x, x)

  def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
  timm.models, models.layers = models, layers
  sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
  shims.append("timm.models.layers (DropPath, to_2tuple, trunc_normal_) local versions")


@contextlib.contextmanager
def _no_checkpoint_files(requested: list[str]):
  """``torch.load`` returns an empty marker; ``load_state_dict(marker)`` is skipped."""
  import torch  # pylint: disable=g-import-not-at-top
  marker = type("_NoCheckpoint", (dict,), {})()
  load, load_sd = torch.load, torch.nn.Module.load_state_dict

  def fake_load(f, *a, **k):
    del a, k
    requested.append(os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f))
    return marker

  def fake_load_sd(self, state_dict, *a, **k):
    if state_dict is marker:
      return None
    return load_sd(self, state_dict, *a, **k)

  torch.load, torch.nn.Module.load_state_dict = fake_load, fake_load_sd
  try:
    yield
  finally:
    torch.load, torch.nn.Module.load_state_dict = load, load_sd


# ---------------------------------------------------------------------------
# Models: each returns (model, train_iteration(), eval_forward(), info)
# ---------------------------------------------------------------------------

def _panet(repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]):
  """FewShotSeg(in_channels=3, pretrained_path=None, cfg={'align': train}) (fixture construction;
  PANet trains with align=True)."""
  import torch  # pylint: disable=g-import-not-at-top
  _use_repo(repo, ("models", "util", "dataloaders", "config"), "models/fewshot.py")
  fewshot = importlib.import_module("models.fewshot")
  model = fewshot.FewShotSeg(in_channels=3, pretrained_path=None, cfg={"align": bool(train)}).to(device)
  b, k = ep["support_images"].shape[:2]
  supp = ep["support_images"]                                     # [B, K, 3, H, W]
  smask = ep["support_masks"]                                     # [B, K, H, W]
  supp_imgs = [[supp[:, s] for s in range(k)]]                    # way x shot x [B, 3, H, W]
  fore = [[(smask[:, s] == 1).float() for s in range(k)]]
  back = [[(smask[:, s] != 1).float() for s in range(k)]]
  qry = [ep["query_image"]]
  label = ep["query_mask"].long()
  # config.py: SGD lr 1e-3, momentum 0.9, weight decay 5e-4; CE(ignore 255) + align loss * 1.
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=255)

  def train_iter():
    out, align_loss = model(supp_imgs, fore, back, qry)
    loss = criterion(out, label) + align_loss * 1.0
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  def eval_fwd():
    out, _ = model(supp_imgs, fore, back, qry)
    return out.argmax(dim=1)

  info = {"construction": "FewShotSeg(in_channels=3, pretrained_path=None, cfg={'align': %s})" % bool(train),
          "optimizer": "SGD(lr=1e-3, momentum=0.9, weight_decay=5e-4)"}
  return model, train_iter, eval_fwd, info


def _load_cfg_module(repo: pathlib.Path):
  spec = importlib.util.spec_from_file_location("_sccan_util_config", repo / "util" / "config.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _sccan(repo: pathlib.Path, ep: dict, *, train: bool, device, shims: list[str]):
  """``args = load_cfg_from_cfg_file(config/pascal/pascal_split0_resnet50[_5s].yaml); OneModel(args)``."""
  import torch  # pylint: disable=g-import-not-at-top
  _use_repo(repo, ("model", "util"), "model/SCCAN.py")
  _shim_torchvision_utils(shims)
  _shim_timm(shims)
  b, k = ep["support_images"].shape[:2]
  yaml = repo / "config" / "pascal" / f"pascal_split0_resnet50{'_5s' if k == 5 else ''}.yaml"
  args = _load_cfg_module(repo).load_cfg_from_cfg_file(os.fspath(yaml))
  args.shot = int(k)
  requested: list[str] = []
  sccan = importlib.import_module("model.SCCAN")
  with _no_checkpoint_files(requested):
    model = sccan.OneModel(args)
  if hasattr(model, "freeze_modules"):
    model.freeze_modules(model)           # train_sccan.py get_model()
  model = model.to(device)
  optimizer, optimizer_swin = model.get_optim(model, args, LR=args.base_lr)
  x, s_x, s_y = ep["query_image"], ep["support_images"], ep["support_masks"].long()
  y_m = ep["query_mask"].long()
  cat_idx = [ep["class_index"].long()]
  aux1, aux2 = float(getattr(args, "aux_weight1", 1.0)), float(getattr(args, "aux_weight2", 1.0))

  def train_iter():
    _, main_loss, aux_loss1, aux_loss2 = model(s_x=s_x, s_y=s_y, x=x, y_m=y_m, cat_idx=cat_idx)
    loss = main_loss + aux1 * aux_loss1 + aux2 * aux_loss2
    optimizer.zero_grad()
    optimizer_swin.zero_grad()
    loss.backward()
    optimizer.step()
    optimizer_swin.step()
    return loss

  def eval_fwd():
    out = model(s_x=s_x, s_y=s_y, x=x, y_m=y_m, cat_idx=cat_idx)
    return out.argmax(dim=1)

  info = {"construction": f"args = load_cfg_from_cfg_file({yaml.relative_to(repo)}); args.shot={k}; "
                          f"OneModel(args); model.freeze_modules(model)",
          "optimizer": "model.get_optim(model, args, LR=args.base_lr) (SGD + AdamW for the transformer)",
          "checkpoint_files_skipped": requested}
  return model, train_iter, eval_fwd, info


BUILDERS: dict[str, Callable] = {"panet": _panet, "sccan": _sccan}


def _repo_commit(repo: pathlib.Path) -> str | None:
  """The checkout's commit (``git rev-parse HEAD``), or None when it is not a git work tree."""
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    p = subprocess.run(["git", "-C", os.fspath(repo), "rev-parse", "--show-toplevel", "HEAD"],
                       capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = p.stdout.split()
  if p.returncode or len(lines) != 2 or pathlib.Path(lines[0]).resolve() != repo.resolve():
    return None   # not a git work tree of its own (e.g. an exported archive inside another repo)
  return lines[1]


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------

def run(args) -> dict[str, Any]:
  if args.model not in BUILDERS:
    raise NotSupportedError(
        f"bench/torch_ref.py: model {args.model!r} is not supported (supported: "
        + ", ".join(f"{k} = {v}" for k, v in SUPPORTED.items()) + ")")
  if args.dtype != "float32":
    raise NotSupportedError("bench/torch_ref.py runs the references in float32 only (--dtype float32)")
  import torch  # pylint: disable=g-import-not-at-top
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
      v = v.transpose(0, 3, 1, 2)                  # [B, 3, H, W]
    elif v.ndim == 5:
      v = v.transpose(0, 1, 4, 2, 3)               # [B, K, 3, H, W]
    ep[key] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
  shims: list[str] = []
  train = args.mode == "train"
  model, train_iter, eval_fwd, info = BUILDERS[args.model](pathlib.Path(args.repo).resolve(), ep, train=train,
                                                           device=device, shims=shims)
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
      "bench": "torch_ref", "impl": "torch", "model": args.model, "mode": args.mode, "size": args.size,
      "batch": args.batch, "shot": args.shot, "dtype": args.dtype, "devices": 1, "with_pipeline": False,
      "steps": args.steps, "warmup": args.warmup, "steps_per_s": round(rate, 4),
      "episodes_per_s": round(episodes_s, 4), "images_per_s": round(episodes_s * (1 + args.shot), 4),
      "step_ms": round(1000 * elapsed / args.steps, 2), "compile_s": None, "first_step_s": round(first_s, 2),
  }
  if train:
    rec["final_loss"] = float(out.detach().cpu())
  if cuda:
    rec["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    rec["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
  else:
    rec["peak_memory_bytes"] = jax_run.host_peak_rss_bytes()
    rec["peak_memory_kind"] = "host peak RSS"
  rec.update({
      "params_total": int(n_params), "params_trainable": int(n_train), "backend": device.type,
      "device_kind": torch.cuda.get_device_name(device) if cuda else "cpu",
      "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
      "reference": SUPPORTED[args.model], "repo": os.fspath(pathlib.Path(args.repo).resolve()),
      "repo_commit": args.repo_commit or _repo_commit(pathlib.Path(args.repo)),
      "shims": shims, **info,
      "command": "python bench/torch_ref.py " + " ".join(args.argv),
      "host": jax_run.host_info(),
  })
  return rec


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repo", required=True, help="root of your checkout of the official repository")
  p.add_argument("--repo-commit", default="",
                 help="commit of the checkout to record when --repo is not a git work tree (an export)")
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
