"""The user guide runs as written: WORKSPACE.md's commands, tables and links.

The fenced ``bash`` blocks of WORKSPACE.md are found by their section heading and
run from the repository root as subprocesses, as a user would run them (one CPU
device: the test's fake-device ``XLA_FLAGS`` is not passed on), on synthetic data:

* §3 "Synthetic data": the raw PASCAL / COCO layouts and the PASCAL-5i build that
  the evaluation below reads;
* §6: the conversion commands, each from a stand-in of the official file (the
  official key names, the shapes of the model the converter builds, saved with
  ``torch.save``), which must write ``DST/variables`` + ``DST/metadata.json``; and
  the table of ImageNet backbone files: every row's key map must fit the tree its
  config loads under its ``init_prefix`` (checked with the loader's own
  ``compare_variables``), two rows also through the command line;
* §7: prediction with the §6 SCCAN checkpoint on synthetic images, which must
  write the files §7 names;
* §4: ``--mode eval``, scoring the §6 PANet conversion (``--config.init=DST``, the
  way §9 scores an official release), which must write the results JSON and chart.

A command is changed in two ways only, both listed here: its placeholders are
replaced token by token (`PLACEHOLDERS`; a part of a ``a:b`` token counts as a
token), and `APPENDED` flags shrink a run to CPU test sizes. A placeholder the
guide introduces without a mapping fails the run (`substitute` refuses ``<...>``
and ``...`` left in a command, and every output path must land in the scratch
folder), so the guide cannot drift from the code unnoticed.

The last test checks that the links and the repository paths in README.md,
WORKSPACE.md and tests/parity_extra/README.md point at files of this repository.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO

torch = pytest.importorskip("torch")

GUIDE = REPO / "WORKSPACE.md"
DOCS = ("README.md", "WORKSPACE.md", "tests/parity_extra/README.md")
SIZE = 65  # the smoke configs' input size

# Guide placeholder -> what the test puts there ({R}: the module's scratch folder,
# {python}: this interpreter). Nothing else in a command is changed.
PLACEHOLDERS = {
  "python": "{python}",
  # §3 synthetic data
  "/tmp/raw_voc": "{R}/raw_voc",
  "/tmp/raw_coco": "{R}/raw_coco",
  "/tmp/tfds": "{R}/tfds",
  # §6 official files (stand-ins, see `_write_official`) and destinations
  "exp/.../win8_train_epoch_43_0.6753.pth": "{R}/official/sccan/win8_train_epoch_43_0.6753.pth",
  "best.pth": "{R}/official/hdmnet/best.pth",
  "PSPNet/pascal/split0/resnet50/best.pth": "{R}/official/PSPNet/pascal/split0/resnet50/best.pth",
  "resnet50.pth": "{R}/official/resnet50.pth",
  "ckpt/sccan_f0": "{R}/ckpt/sccan_f0",
  "ckpt/hdmnet_f0": "{R}/ckpt/hdmnet_f0",
  "ckpt/psp_f0": "{R}/ckpt/psp_f0",
  "ckpt/r50": "{R}/ckpt/r50",
  # §7 the user's images (synthetic, see `images`) and output folder
  "cat1.jpg": "{R}/images/cat1.jpg",
  "cat1_mask.png": "{R}/images/cat1_mask.png",
  "cat2.jpg": "{R}/images/cat2.jpg",
  "cat2_mask.png": "{R}/images/cat2_mask.png",
  "q1.jpg": "{R}/images/q1.jpg",
  "q2.jpg": "{R}/images/q2.jpg",
  "out/": "{R}/out/",
  # §4 the method and the workdir
  "configs/<method>.py": "configs/panet.py",
  "W": "{R}/W",
}

# Flags appended to a command (never replacing any of its own) to fit a CPU test.
APPENDED = {
  # §7: the model input at the smoke size instead of SCCAN's 473.
  "fss_jax.predict": ["--size", str(SIZE)],
  # §4 eval: the §3 data, the converted PANet weights (W holds no training run; §9:
  # "convert it and run --mode eval --config.init=DST"), smoke-sized episodes, and no
  # TensorBoard episode images (a second compilation).
  "fss_jax.main": [
    "--config.data.data_dir={R}/tfds",
    "--config.init={R}/ckpt/vgg16_panet",
    f"--config.data.test_size={SIZE}",
    "--config.eval.episodes=4",
    "--config.eval.seeds=(321,)",
    "--config.eval.num_images=0",
  ],
}

# Flags whose value is a file or folder: after substitution it must be in the scratch
# folder (a guide path left unmapped would otherwise be written into the checkout).
_PATH_FLAGS = (
  "--src",
  "--dst",
  "--out",
  "--workdir",
  "--manual_dir",
  "--data_dir",
  "--checkpoint",
  "--support",
  "--query",
)


# ---------------------------------------------------------------------------
# Reading the guide
# ---------------------------------------------------------------------------

_FENCE = re.compile(r"^([ \t]*)```(\w*)[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*$", re.M)


def _without_fences(text: str) -> str:
  """``text`` with its fenced blocks blanked out (same length: offsets stay valid)."""
  return _FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def section(text: str, title: str) -> str:
  """The text under the heading that starts with ``title`` (e.g. "6." or "Synthetic data"),
  up to the next heading of the same or a higher level; fenced blocks are not headings."""
  plain = _without_fences(text)
  heads = [(m.start(), len(m.group(1)), m.group(2)) for m in _HEADING.finditer(plain)]
  for i, (start, level, name) in enumerate(heads):
    if name.startswith(title):
      end = next((s for s, lv, _ in heads[i + 1 :] if lv <= level), len(text))
      return text[start:end]
  raise AssertionError(f"WORKSPACE.md has no heading starting with {title!r}")


def bash_blocks(text: str) -> list[str]:
  """The contents of the ```bash blocks of ``text``, dedented."""
  return [textwrap.dedent(m.group(3)) for m in _FENCE.finditer(text) if m.group(2) == "bash"]


def commands(block: str) -> list[list[str]]:
  """The command lines of a bash block as argv lists (continuations joined, comments dropped)."""
  out = []
  for line in block.replace("\\\n", " ").splitlines():
    argv = shlex.split(line, comments=True)
    if argv:
      out.append(argv)
  return out


def guide_commands(*titles: str) -> list[list[str]]:
  """Every command of the bash blocks under the nested headings ``titles``."""
  text = GUIDE.read_text()
  for title in titles:
    text = section(text, title)
  return [argv for block in bash_blocks(text) for argv in commands(block)]


def _module(argv: list[str]) -> str:
  return argv[argv.index("-m") + 1] if "-m" in argv else ""


def substitute(argv: list[str], root: pathlib.Path) -> list[str]:
  """``argv`` with `PLACEHOLDERS` replaced and `APPENDED` added; refuses leftovers."""
  values = {k: v.format(R=root, python=sys.executable) for k, v in PLACEHOLDERS.items()}
  out = []
  for tok in argv:
    if tok in values:
      tok = values[tok]
    elif ":" in tok:
      tok = ":".join(values.get(part, part) for part in tok.split(":"))
    out.append(tok)
  out += [a.format(R=root) for a in APPENDED.get(_module(argv), [])]
  left = [t for t in out if "<" in t or "..." in t]
  assert not left, f"unmapped placeholders {left} in {shlex.join(argv)}; add them to PLACEHOLDERS"
  for i, tok in enumerate(out[:-1]):
    if tok in _PATH_FLAGS:
      for value in out[i + 1 :]:
        if value.startswith("-"):
          break
        for part in value.split(":"):
          assert part.startswith(str(root)), f"{tok} {part}: map it to the scratch folder"
  return out


def run(argv: list[str], root: pathlib.Path, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs a guide command (leading ``NAME=value`` words set the environment)."""
  argv = substitute(argv, root)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
    key, _, value = argv.pop(0).partition("=")
    env[key] = value
  r = subprocess.run(
    argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )
  assert r.returncode == 0, f"{shlex.join(argv)}\nexit {r.returncode}\n{r.stderr[-4000:]}"
  return r


def _flag(argv: list[str], name: str) -> str:
  return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------
# Stand-ins of official files
# ---------------------------------------------------------------------------

_TORCH_SHAPE = {
  "conv": lambda s: (s[3], s[2], s[0], s[1]),  # HWIO -> OIHW
  "linear": lambda s: s[::-1],
  "copy": lambda s: s,
}


def _leaf(tree, path):
  for p in path:
    if not hasattr(tree, "keys") or p not in tree:
      return None
    tree = tree[p]
  return tree


def official_state_dict(rules, target, rng=None) -> dict[str, np.ndarray]:
  """A state dict with the source keys of ``rules`` (a key map) in the layout of the
  official file, shaped after the Flax variables ``target`` (the tree the rules write).

  Values follow the parity fixtures' rule (fan-in scaled convolutions, BatchNorm
  variance near 1) when ``rng`` is given, else zeros; a rule whose destination is not
  in ``target`` gets a (1,) array, which the comparison with ``target`` then reports.
  """
  from fss_jax import keymaps

  sd = {}
  for r in rules:
    if not isinstance(r, keymaps.Rule):
      if r.src.endswith("num_batches_tracked"):
        sd[r.src] = np.zeros((), np.int64)
      continue
    leaf = _leaf(target, r.dst)
    shape = tuple(_TORCH_SHAPE[r.transform](tuple(leaf.shape))) if leaf is not None else (1,)
    if rng is None:
      sd[r.src] = np.zeros(shape, np.float32)
      continue
    n = rng.standard_normal(shape).astype(np.float32)
    name = r.dst[-1]
    if name == "var":
      v = 1 + 0.1 * np.abs(n)
    elif name == "scale":
      v = 1 + 0.1 * n
    elif name in ("mean", "bias"):
      v = 0.01 * n
    elif len(shape) >= 2:
      v = n * math.sqrt(1.0 / max(1, int(np.prod(shape[1:]))))
    else:
      v = 0.02 * n
    sd[r.src] = v.astype(np.float32)
  return sd


def _write_official(path: pathlib.Path, sd, *, trained: bool) -> pathlib.Path:
  """torch.save as the references do: a trained model as {"state_dict": {"module." + key}}
  (DataParallel), an ImageNet file as the bare state dict."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  if trained:
    tensors = {"epoch": 43, "state_dict": {f"module.{k}": v for k, v in tensors.items()}}
  torch.save(tensors, path)
  return path


def model_variables(name: str, fields: dict | None = None, shot: int = 1):
  """ShapeDtypeStructs of registered model ``name``'s variables (traced, not compiled)."""
  from bench import run as bench_run
  from fss_jax.models import registry
  from fss_jax.train import state as state_lib

  model = registry.get(name).make_model(**(fields or {}))
  episode = {
    k: v for k, v in bench_run.synthetic_episode(1, shot, SIZE).items() if k in bench_run.EVAL_KEYS
  }
  return jax.eval_shape(
    lambda k: state_lib.init_variables(model, episode, k), jax.random.PRNGKey(0)
  )


def _convert_args(argv: list[str]) -> tuple[str, dict]:
  """(--model, fields of its --model-arg flags) of a convert command."""
  from checkpoints import convert

  args = [argv[i + 1] for i, a in enumerate(argv) if a == "--model-arg"]
  return _flag(argv, "--model"), convert.parse_model_args(args)


# ---------------------------------------------------------------------------
# The §6 table of ImageNet backbone files
# ---------------------------------------------------------------------------


def backbone_table() -> list[dict]:
  """Rows of §6's "Which `--model` converts an ImageNet backbone file" table."""
  text = section(section(GUIDE.read_text(), "6."), "Which `--model`")
  rows = [l for l in text.splitlines() if l.startswith("|")][2:]  # after header + rule
  out = []
  for line in rows:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    assert len(cells) == 4, line
    code = [re.findall(r"`([^`]+)`", c) for c in cells]
    out.append(
      {
        "file": code[0][0],
        "argv": shlex.split(code[1][0]),
        "config": code[2][0] if code[2] else None,
        "under": code[3][0] if code[3] else cells[3],
        "line": line,
      }
    )
  return out


@functools.cache
def _config_target(config_file: str):
  """(config, variables of its model, its init_prefix) of ``configs/X.py`` (smoke sizes)."""
  import importlib

  name = pathlib.Path(config_file).stem
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  fields = config.model_fields.to_dict()
  if fields.get("use_ckmm"):  # JC²A: CKMM needs a per-fold prototype file, not the backbone
    fields["use_ckmm"] = False
  return config, model_variables(config.model, fields, shot=config.shot), config.init_prefix


# ---------------------------------------------------------------------------
# Module fixtures: one scratch folder, data, conversions
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("guide")


@pytest.fixture(scope="module")
def data_dir(root):
  """§3 "Synthetic data", run as written: raw VOC / COCO layouts, PASCAL-5i build."""
  cmds = guide_commands("3.", "Synthetic data")
  assert [_module(c) for c in cmds] == [
    "data_prep.synthetic",
    "data_prep.synthetic",
    "data_prep.build",
  ]
  for argv in cmds:
    run(argv, root)
  assert (root / "tfds" / "pascal5i").is_dir()
  return root / "tfds"


def section6_commands() -> list[list[str]]:
  """The ``checkpoints.convert`` commands of §6's first block."""
  return [c for c in guide_commands("6.") if _module(c) == "checkpoints.convert"]


def _run_conversion(argv: list[str], root: pathlib.Path) -> dict:
  """Writes a stand-in of the command's official file, runs the command -> what it did."""
  from fss_jax.models import registry

  model, fields = _convert_args(argv)
  src = pathlib.Path(_flag(substitute(argv, root), "--src"))
  if model == "resnet_torchvision":  # torchvision's own file
    import torchvision

    sd = {k: v.numpy() for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}
    _write_official(src, sd, trained=False)
  else:  # a released model
    assert registry.get(model).loss_fn is not None, f"no stand-in recipe for --model {model}"
    target = model_variables(model, fields, shot=int(fields.get("shot", 1)))
    rng = np.random.default_rng(0) if model == "sccan" else None  # §7 predicts with it
    _write_official(
      src, official_state_dict(registry.get(model).keymap(**fields), target, rng), trained=True
    )
  r = run(argv, root)
  return {
    "argv": argv,
    "model": model,
    "fields": fields,
    "src": src,
    "dst": pathlib.Path(_flag(substitute(argv, root), "--dst")),
    "stdout": r.stdout,
  }


@pytest.fixture(scope="module")
def conversions(root):
  """``conversions("ckpt/sccan_f0")``: that §6 command, run once per module (`_run_conversion`)."""
  done = {}

  def get(dst: str) -> dict:
    if dst not in done:
      done[dst] = _run_conversion(
        next(c for c in section6_commands() if _flag(c, "--dst") == dst), root
      )
    return done[dst]

  return get


@pytest.fixture(scope="module")
def panet_init(root):
  """The §6 table's torchvision VGG-16 row for configs/panet.py, on the command line."""
  from fss_jax.models import registry

  row = next(r for r in backbone_table() if r["config"] == "configs/panet.py")
  model, fields = _convert_args(row["argv"])
  _, target, prefix = _config_target(row["config"])
  assert prefix == ""
  src = _write_official(
    root / "official" / row["file"],
    official_state_dict(registry.get(model).keymap(**fields), target, np.random.default_rng(1)),
    trained=False,
  )
  dst = root / "ckpt" / "vgg16_panet"
  run(
    ["python", "-m", "checkpoints.convert", *row["argv"], "--src", str(src), "--dst", str(dst)],
    root,
  )
  return dst


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_section6_block_converts_each_kind_of_release():
  dsts = [_flag(c, "--dst") for c in section6_commands()]
  assert {"ckpt/sccan_f0", "ckpt/hdmnet_f0", "ckpt/psp_f0", "ckpt/r50"} <= set(dsts), dsts


@pytest.mark.parametrize("dst", [_flag(c, "--dst") for c in section6_commands()])
def test_section6_conversion_command(conversions, dst):
  c = conversions(dst)
  assert f"wrote {c['dst']} (model {c['model']}" in c["stdout"]
  assert (c["dst"] / "variables").is_dir()  # "DST/variables orbax"
  meta = json.loads((c["dst"] / "metadata.json").read_text())  # "+ DST/metadata.json"
  assert meta["model"] == c["model"]
  assert all(meta["fields"].get(k) == v for k, v in c["fields"].items())
  assert meta["source"] == str(c["src"].absolute()) and len(meta["sha256"]) == 64
  assert not [p for p in c["dst"].parent.iterdir() if p.name.startswith(".")]  # no temp folders


def test_section6_converted_values_are_the_files(conversions):
  """The values are the official file's, in Flax layout (a convolution's OIHW -> HWIO)."""
  from checkpoints import io as ckpt_io
  from fss_jax.models import registry

  c = conversions("ckpt/sccan_f0")
  sd = torch.load(c["src"], weights_only=True)["state_dict"]
  rule = next(r for r in registry.get("sccan").keymap() if getattr(r, "transform", "") == "conv")
  np.testing.assert_array_equal(
    _leaf(ckpt_io.read_orbax(c["dst"]), rule.dst),
    sd[f"module.{rule.src}"].numpy().transpose(2, 3, 1, 0),
  )


def test_section6_backbone_table_rows_fit_their_configs():
  """Each row: the file's keys (from the row's key map) convert into exactly the tree the
  config's model has under the config's init_prefix, which the row names."""
  import torchvision

  from fss_jax import keymaps
  from fss_jax.models import registry
  from fss_jax.train import state as state_lib

  rows = backbone_table()
  assert any(r["file"] == "initmodel/resnet50_v2.pth" for r in rows)
  targets = {}
  for row in rows:
    model, fields = _convert_args(row["argv"])
    rules = registry.get(model).keymap(**fields)
    if row["file"].startswith(("vgg16-", "resnet50-")):  # torchvision's files: its keys
      arch = row["file"].split("-")[0]
      with torch.device("meta"):
        keys = set(getattr(torchvision.models, arch)(weights=None).state_dict())
      required = {r.src for r in rules if isinstance(r, keymaps.Rule)}
      assert required <= keys and keys <= {r.src for r in rules}, row["line"]
    if row["config"] is None:
      assert row["under"] == "", row["line"]
      continue
    if row["config"] not in targets:
      targets[row["config"]] = _config_target(row["config"])
    _, target, prefix = targets[row["config"]]
    assert row["under"] == (prefix or "the whole model"), (row["line"], prefix)
    pre = [p for p in prefix.split("/") if p]
    subtree = {c: _leaf(target[c], pre) or {} for c in ("params", "batch_stats")}
    loaded = keymaps.convert(official_state_dict(rules, subtree), rules, model=model)
    missing, unexpected, shapes = state_lib.compare_variables(target, loaded, prefix=prefix)
    assert not (missing or unexpected or shapes), (
      row["line"],
      missing[:5],
      unexpected[:5],
      shapes[:5],
    )


def test_section6_resnet50_v2_row_on_the_command_line(root):
  """``initmodel/resnet50_v2.pth`` -> ``--model resnet_deep_stem`` -> configs/pspnet.py's
  ``backbone``: converted by the CLI and matched against the config's model."""
  from checkpoints import io as ckpt_io
  from fss_jax.models import registry
  from fss_jax.train import state as state_lib

  row = next(
    r
    for r in backbone_table()
    if r["file"] == "initmodel/resnet50_v2.pth" and r["config"] == "configs/pspnet.py"
  )
  model, fields = _convert_args(row["argv"])
  assert model == "resnet_deep_stem"
  _, target, prefix = _config_target(row["config"])
  sub = {c: _leaf(target[c], prefix.split("/")) or {} for c in ("params", "batch_stats")}
  src = _write_official(
    root / "official" / row["file"],
    official_state_dict(registry.get(model).keymap(**fields), sub),
    trained=False,
  )
  dst = root / "ckpt" / "r50_v2"
  r = run(
    ["python", "-m", "checkpoints.convert", *row["argv"], "--src", str(src), "--dst", str(dst)],
    root,
  )
  assert "wrote" in r.stdout and (dst / "metadata.json").is_file()
  loaded = ckpt_io.read_orbax(dst)
  assert state_lib.compare_variables(target, loaded, prefix=prefix) == ([], [], [])


@pytest.fixture(scope="module")
def images(root):
  """§7's cat1/cat2 supports (JPEG + binary PNG mask) and q1/q2 queries, of several sizes."""
  import cv2

  d = root / "images"
  d.mkdir()
  rng = np.random.default_rng(2)
  sizes = {"cat1": (60, 80), "cat2": (50, 50), "q1": (70, 90), "q2": (45, 80)}
  for name, (h, w) in sizes.items():
    cv2.imwrite(str(d / f"{name}.jpg"), rng.integers(0, 256, (h, w, 3), np.uint8))
    if name.startswith("cat"):
      mask = np.zeros((h, w), np.uint8)
      mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
      cv2.imwrite(str(d / f"{name}_mask.png"), mask)
  return sizes


def test_section7_predict_command(root, conversions, images):
  from PIL import Image

  cmds = [c for c in guide_commands("7.") if _module(c) == "fss_jax.predict"]
  assert len(cmds) == 1
  argv = cmds[0]
  conversions(_flag(argv, "--checkpoint"))  # made by its §6 command
  r = run(argv, root)
  out = pathlib.Path(_flag(substitute(argv, root), "--out"))
  doc = json.loads((out / "predictions.json").read_text())
  queries = [pathlib.Path(q).stem for q in argv[argv.index("--query") + 1 : argv.index("--out")]]
  assert [q["name"] for q in doc["queries"]] == queries == ["q1", "q2"]
  for q in doc["queries"]:
    # "<query>_mask.png at the query's original size"
    mask = np.asarray(Image.open(out / f"{q['name']}_mask.png"))
    assert mask.shape == images[q["name"]] and set(np.unique(mask)) <= {0, 1}
    # "foreground fraction and confidence per query"
    assert 0 <= q["foreground_fraction"] <= 1 and "confidence" in q
  # "overlays of queries and supports"
  names = [p.name for p in out.iterdir()]
  for stem in ("q1", "q2", "cat1", "cat2"):
    assert any(stem in n and "overlay" in n for n in names), (stem, names)
  assert "wrote 2 prediction(s)" in r.stdout


def test_section3_synthetic_data_commands(data_dir):
  """§3's synthetic PASCAL layout builds into a dataset with both splits."""
  from fss_jax.data import source

  for split in ("train", "val"):
    assert len(source.open_split(str(data_dir), "pascal5i", split)) > 0


def test_section6_vgg16_row_on_the_command_line(panet_init):
  """``vgg16-397923af.pth`` -> ``--model panet --model-arg source=imagenet``: the whole
  configs/panet.py model (the §4 evaluation below loads it)."""
  from checkpoints import io as ckpt_io
  from fss_jax.train import state as state_lib

  _, target, prefix = _config_target("configs/panet.py")
  loaded = ckpt_io.read_orbax(panet_init)
  assert state_lib.compare_variables(target, loaded, prefix=prefix) == ([], [], [])


def test_section4_eval_command(root, data_dir, panet_init):
  del data_dir, panet_init  # both reached through PLACEHOLDERS / APPENDED
  cmds = [c for c in guide_commands("4.") if _module(c) == "fss_jax.main" and "eval" in c]
  argv = cmds[0]
  assert _flag(argv, "--mode") == "eval" and _flag(argv, "--workdir") == "W"
  r = run(argv, root)
  work = root / "W"
  summary = json.loads(r.stdout.strip().splitlines()[-1])  # "the last stdout line is JSON"
  # "writes W/results_<dataset>_f<fold>_<k>shot.json plus a per-class IoU bar chart PNG beside it"
  results = work / "results_pascal5i_f0_1shot.json"
  doc = json.loads(results.read_text())
  assert doc["miou_mean"] == pytest.approx(summary["miou_mean"]) and 0 <= doc["miou_mean"] <= 100
  assert doc["checkpoint"].startswith("config.init")
  assert list(work.glob("results_pascal5i_f0_1shot*.png"))
  assert (work / "config_eval.json").is_file() and (work / "log.txt").is_file()


# ---------------------------------------------------------------------------
# Links and paths
# ---------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _repo_top() -> set[str]:
  """The top-level names of the repository (tracked files when git knows them)."""
  try:
    files = subprocess.run(
      ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
  except (OSError, subprocess.SubprocessError):
    files = [p.name for p in REPO.iterdir() if not p.name.startswith(".")]
  return {f.split("/")[0] for f in files}


def _path_problems(token: str, top: set[str]) -> str | None:
  """Why ``token`` (a word of a code span) is a broken repository path, or None."""
  token = token.strip("`'\",;()").split(":")[0].split("=")[-1].rstrip(".,")
  if token.startswith("../"):
    return "points outside the repository"
  if any(c in token for c in "<>*{}$|") or "..." in token or "…" in token:
    return None  # a placeholder or a pattern
  first = token.split("/")[0]
  if first not in top or ("/" not in token and "." not in token):
    return None  # not a repository path
  return None if (REPO / token).exists() else "does not exist"


def test_links_and_repository_paths_exist():
  top = _repo_top()
  problems = []
  for doc in DOCS:
    path = REPO / doc
    text = path.read_text()
    code = [m.group(3) for m in _FENCE.finditer(text)]
    prose = _without_fences(text)
    code += _INLINE_CODE.findall(prose)
    for target in _LINK.findall(_INLINE_CODE.sub("", prose)):
      if re.match(r"^[a-z]+:", target):  # https:, mailto:
        continue
      file, _, anchor = target.partition("#")
      dest = (path.parent / file).resolve() if file else path
      if REPO not in dest.parents and dest != REPO:
        problems.append(f"{doc}: link {target} points outside the repository")
      elif not dest.exists():
        problems.append(f"{doc}: link {target} does not exist")
      elif anchor and dest.suffix == ".md":
        heads = {_anchor(m.group(2)) for m in _HEADING.finditer(_without_fences(dest.read_text()))}
        if anchor not in heads:
          problems.append(f"{doc}: link {target}: no heading #{anchor} in {file or doc}")
    for span in code:
      for word in span.split():
        why = _path_problems(word, top)
        if why:
          problems.append(f"{doc}: `{word}` {why}")
  assert not problems, "\n".join(problems)
