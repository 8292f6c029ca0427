"""Shared test fixtures: parity fixture lookup, CPU-only jax settings."""

import json
import os
import pathlib

# 8 fake CPU devices for sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the whole run: the xdist workers and every subprocess
# the tests start (fss_jax.main, predict, verify) inherit it, so a program compiled by one of
# them (the smoke configs' steps, mostly) is read back by the others. Fresh per run; the
# process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _jit_cache = tempfile.mkdtemp(prefix="fss_jax_tests_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _jit_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  atexit.register(shutil.rmtree, _jit_cache, ignore_errors=True)

import numpy as np
import pytest

# torch's lazily imported triton segfaults when it is first loaded after TensorFlow (which
# clu's metric writers import); load it first, once, where torch is installed.
try:
  import torch

  torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
except ImportError:
  pass

REPO = pathlib.Path(__file__).resolve().parents[1]
# The run configurations: configs/*.py that define get_config (configs/common.py and
# configs/pahnet.py are shared code).
RUN_CONFIGS = tuple(
  sorted(p.stem for p in (REPO / "configs").glob("*.py") if "\ndef get_config(" in p.read_text())
)
PARITY_DIR = pathlib.Path(os.environ.get("FSS_PARITY_DIR", REPO.parent / "shared" / "parity"))
SHARED_DIR = PARITY_DIR.parent


def parity_fixture(folder: str, name: str | None = None) -> pathlib.Path:
  """Path of a parity fixture .npz; skips locally, fails under CI, when absent."""
  d = PARITY_DIR / folder
  paths = sorted(d.glob(f"{name or '*'}.npz")) if d.is_dir() else []
  if not paths:
    msg = f"parity fixture {folder}/{name or '*'}.npz not found under {PARITY_DIR}"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return paths[0]


def load_fixture(folder: str, name: str | None = None):
  """Returns (npz dict, json meta, npz path)."""
  path = parity_fixture(folder, name)
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  meta = json.loads(path.with_suffix(".json").read_text())
  return arrays, meta, path


# Fixtures made with the official code beyond those in shared/parity (other shots,
# sizes, backbones, seeds): tests/parity_extra/<folder>/<name>.{npz,json}.
EXTRA_PARITY_DIR = REPO / "tests" / "parity_extra"


def extra_fixture_paths(folder: str, exclude: tuple[str, ...] = ()) -> list[pathlib.Path]:
  """Every fixture .npz of `folder` in shared/parity and tests/parity_extra, minus `exclude` stems."""
  paths = []
  for root in (PARITY_DIR, EXTRA_PARITY_DIR):
    d = root / folder
    if d.is_dir():
      paths += [p for p in sorted(d.glob("*.npz")) if p.stem not in exclude]
  return paths


def run_train_steps(spec, model, variables, optim_cfg, batch, *, total_steps: int, steps: int = 3):
  """The engine's jitted train step `steps` times from `variables` on one `batch`.

  Builds the optimiser of `optim_cfg` with the model's frozen patterns, as fss_jax.main
  does. Returns (params before, params after, losses [steps], metrics of the last step);
  every loss is checked to be finite.
  """
  from functools import partial

  import jax
  import jax.numpy as jnp

  from fss_jax.train import optim
  from fss_jax.train import state as state_lib
  from fss_jax.train import step as step_lib

  opt = optim.build(optim_cfg, variables["params"], total_steps=total_steps, frozen=spec.frozen)
  st = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=opt.tx.init(variables["params"]),
    rng=jax.random.PRNGKey(0),
  )
  before = jax.tree.map(np.asarray, st.params)
  train = jax.jit(
    partial(
      step_lib.train_step, model=model, loss_fn=spec.loss_fn, tx=opt.tx, trainable=opt.trainable
    )
  )
  losses, metrics = [], {}
  for _ in range(steps):
    st, metrics = train(st, batch)
    losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[-1]), losses
  return before, jax.tree.map(np.asarray, st.params), losses, metrics


def leaf(tree, path):
  """tree[path[0]][path[1]]...: one leaf of a nested parameter dict."""
  for p in path:
    tree = tree[p]
  return tree


def pytest_collection_modifyitems(config, items):
  """The SCCAN-family train-step checks (5 / 10 GB on CPU) run first among the train-step
  checks, which `make test` runs before the rest of the suite, on fresh workers (a worker holds
  6-8 GB of jit caches by the end); the largest also takes `train_step_cases._memory_slot`."""
  del config
  first = [it for it in items if it.module.__name__.endswith("test_train_step_sccan")]
  if first:
    rest = [it for it in items if it not in first]
    items[:] = first + rest
