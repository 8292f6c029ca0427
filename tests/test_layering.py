"""The library's layers import downwards only, and the library never imports the repo's tools.

    ops  <-  nn  <-  models, data  <-  train, eval  <-  main, predict

Every ``import`` of every module of ``fss_jax`` is read from its source (``ast``; imports inside
functions included), so a lazy import cannot hide an upward arrow. ``fss_jax.io``,
``fss_jax.parallel``, ``fss_jax.keymaps`` and ``fss_jax.assets`` are utilities any layer may use;
``models`` and ``data`` sit side by side and do not import each other.
"""

import ast
import pathlib
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "fss_jax"
# Subpackage / module of fss_jax -> layer; a module imports from its own layer or below.
LAYERS = {
  "io": 0,
  "parallel": 0,
  "keymaps": 0,
  "assets": 0,
  "ops": 1,
  "nn": 2,
  "models": 3,
  "data": 3,
  "train": 4,
  "eval": 4,
  "main": 5,
  "predict": 5,
}
SIDE_BY_SIDE = {("models", "data"), ("data", "models")}  # same layer, still no arrow between
OUTSIDE = ("configs", "data_prep", "checkpoints", "examples", "bench", "tests")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every absolute import in the file (``from a import b`` -> a.b and a)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out += [(node.lineno, node.module)] + [
        (node.lineno, f"{node.module}.{a.name}") for a in node.names
      ]
  return out


def _part(module: str) -> str | None:
  """The fss_jax subpackage / module a dotted name belongs to (None for the package itself)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "fss_jax" else None


def test_imports_point_downwards_and_stay_inside_the_library():
  problems = []
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 40
  for path in files:
    me = _module_name(path)
    mine = _part(me)
    if mine is None:
      continue
    assert mine in LAYERS, f"{me}: add its part {mine!r} to LAYERS"
    for line, name in _imports(path):
      where = f"{path.relative_to(REPO)}:{line}"
      if name.split(".")[0] in OUTSIDE:
        problems.append(f"{where} {me} imports {name} (outside the library)")
        continue
      theirs = _part(name)
      if theirs is None or theirs not in LAYERS or theirs == mine:
        continue
      if LAYERS[theirs] > LAYERS[mine] or (mine, theirs) in SIDE_BY_SIDE:
        problems.append(f"{where} {me} (layer {mine}) imports {name} (layer {theirs})")
  assert not problems, "\n".join(sorted(set(problems)))


def test_the_check_sees_an_upward_import(tmp_path):
  """The walker finds a lazy (function-level) upward import."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from fss_jax.train import loop\n  import configs.panet\n")
  assert (2, "fss_jax.train.loop") in _imports(f) and (3, "configs.panet") in _imports(f)
  assert _part("fss_jax.train.loop") == "train" and LAYERS["train"] > LAYERS["ops"]


def test_verify_and_convert_start_without_jax():
  """checkpoints.verify picks XLA:CPU kernels through XLA_FLAGS before jax starts; importing
  it (or the converter) must not start jax, or the train-step checks run on other kernels."""
  code = (
    "import sys\n"
    "import checkpoints.verify, checkpoints.train_adapters, checkpoints.io\n"
    "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
