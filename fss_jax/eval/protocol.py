"""Evaluation protocols as config values: presets resolved into fields (docs/protocols.md).

``config.protocol`` names a preset and ``config.protocol_fields.<field>`` overrides one field
of it (None: the preset's value)::

  python -m fss_jax.main --mode eval --config configs/sccan.py:smoke --workdir W \\
      --config.protocol=hsnet --config.protocol_fields.ignore_255=false

Presets (every value and its source in docs/protocols.md):

* ``pfenet_bam`` (default): the PFENet → BAM lineage as the method config states it —
  ``data.test_size`` / ``data.test_resize``, ``eval.episodes``, ``eval.seeds``, the novel-image
  filter of ``data.protocol`` — scored at the original label size, 255 ignored, episodes drawn
  per (seed, index) from the build's §5.1 lists (data_protocol.md §7.3, §9, §10).
* ``hsnet``: the HSNet test harness (juhongm999/hsnet ``test.py``, ``data/*.py``,
  ``common/evaluation.py``): 400×400 squash input scored at 400×400, its episode rules and
  ``fix_randseed(0)`` (one numpy RandomState drawn in episode order), 1000 episodes, no
  novel-image filter; 255 ignored on PASCAL only.
* ``patnet_cd``: PATNet's cross-domain harness (slei109/PATNet, built on HSNet's): the hsnet
  values, 255 never ignored on the cross-domain sets (their masks are binarised), 600 episodes
  (Deepglobe, ISIC, Chest X-ray) or one per test image (FSS-1000), seed 0. With
  ``eval.dataset`` one of those sets, a PASCAL-trained checkpoint is tested on it (its "test"
  split, every class, 1-way; docs/protocols.md "Cross-domain evaluation").

`resolve` gives every field; `apply` writes them into the fields the loop and pipeline read
(``data.test_size``, ``data.test_resize``, ``data.protocol``, ``data.coco_split``,
``eval.episodes``, ``eval.seeds``); `eval_config` also sets the evaluation shot / way /
dataset (``eval.shot``, ``eval.way``, ``eval.dataset``, ``eval.fold``) after checking that
the model supports them; `scoring` and `episode_kwargs` are what the eval step and the
episode generator take; `results_fields` is what a results JSON records.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from absl import logging

from fss_jax import io as fss_io
from fss_jax.data import episodes as episodes_lib
from fss_jax.eval import metrics as metrics_lib

DEFAULT = "pfenet_bam"
# Every field of a resolved protocol, in record order (docs/protocols.md, field by field).
FIELDS = (
  "test_size",
  "test_resize",
  "score",
  "ignore_255",
  "novel_filter",
  "class_split",
  "episode_rule",
  "lists",
  "episodes",
  "seeds",
  "seed_rule",
)
TEST_RESIZES = ("aspect", "squash")
SCORES = ("original", "input")
CLASS_SPLITS = ("interleaved", "contiguous")
HSNET_SEED = 0  # hsnet test.py:20 and PATNet test.py:18: utils.fix_randseed(0)
HSNET_SIZE = 400  # hsnet test.py:88, PATNet test.py:73: FSSDataset.initialize(img_size=400)
HSNET_EPISODES = 1000  # hsnet data/pascal.py:30, data/coco.py:30: __len__ = 1000 when testing
PATNET_EPISODES = 600  # PATNet data/deepglobe.py:13, isic.py:13, lung.py:13: num=600
FSS1000 = ("fss1000", "fss", "fss_1000", "fss-1000")


def _pfenet_bam(config, dataset: str) -> dict[str, Any]:
  """The method config's own values (it states where it departs from PFENet / BAM)."""
  del dataset
  d, e = config.data, config.eval
  return {
    "test_size": int(d.test_size),
    "test_resize": str(d.test_resize),
    "score": "original",
    "ignore_255": True,
    "novel_filter": str(d.get("protocol", "bam")) == "bam",
    "class_split": str(d.get("coco_split", "interleaved")),
    "episode_rule": "pfenet",
    "lists": "build",
    "episodes": int(e.episodes),
    "seeds": tuple(int(s) for s in e.seeds),
    "seed_rule": "per_episode",
  }


def _hsnet(config, dataset: str) -> dict[str, Any]:
  del config
  return {
    "test_size": HSNET_SIZE,
    "test_resize": "squash",
    "score": "input",
    # PASCAL: boundaries (255) ignored (evaluation.py:15-21 with pascal.py:70-75); COCO's
    # loader maps every value but the class, 255 included, to 0 (coco.py:92-93).
    "ignore_255": dataset != "coco20i",
    "novel_filter": False,
    "class_split": "interleaved",
    "episode_rule": "hsnet",
    "lists": "build",
    "episodes": 0 if dataset in FSS1000 else HSNET_EPISODES,
    "seeds": (HSNET_SEED,),
    "seed_rule": "sequential",
  }


def _patnet_cd(config, dataset: str) -> dict[str, Any]:
  out = _hsnet(config, dataset)
  if dataset not in ("pascal5i", "coco20i"):
    # Masks binarised at 128, no ignore index returned (deepglobe.py:73-77 and the same in
    # isic.py, lung.py, fss.py); FSS-1000: one episode per test image (fss.py:31-32).
    out.update(ignore_255=False, episodes=0 if dataset in FSS1000 else PATNET_EPISODES)
  return out


PRESETS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
  "pfenet_bam": _pfenet_bam,
  "hsnet": _hsnet,
  "patnet_cd": _patnet_cd,
}


def eval_dataset(config) -> str:
  """The dataset the test episodes come from: ``eval.dataset`` or the training dataset."""
  name = str(config.eval.get("dataset", "") or "") if "eval" in config else ""
  if not name:
    return str(config.dataset)
  from fss_jax.data import splits

  if (
    getattr(splits, "dataset_kind", None) is not None
    and splits.dataset_kind(name) == "cross_domain"
  ):
    return splits.canonical_cross_domain(name)
  return splits.canonical_dataset(name)


def overrides(config) -> dict[str, Any]:
  """The ``protocol_fields`` set in ``config`` (not None)."""
  fields = config.get("protocol_fields", None)
  if fields is None:
    return {}
  out = {}
  for k in fields.keys():
    if k not in FIELDS:
      raise ValueError(f"unknown protocol field {k!r}; the fields are {', '.join(FIELDS)}")
    v = fields[k]
    if v is not None:
      out[k] = v
  return out


def resolve(config) -> dict[str, Any]:
  """Every protocol field of ``config``: the preset ``config.protocol`` with the set
  ``config.protocol_fields`` on top. Returns {"name", *FIELDS} (JSON-ready values).

  Raises:
    ValueError: an unknown preset or field value, or fields that do not fit together.
  """
  name = str(config.get("protocol", DEFAULT) or DEFAULT)
  if name not in PRESETS:
    raise ValueError(f"unknown protocol {name!r}; use one of {', '.join(PRESETS)}")
  out = {"name": name, **PRESETS[name](config, eval_dataset(config))}
  out.update(overrides(config))
  out["test_size"], out["episodes"] = int(out["test_size"]), int(out["episodes"])
  out["ignore_255"], out["novel_filter"] = bool(out["ignore_255"]), bool(out["novel_filter"])
  out["seeds"] = [int(s) for s in out["seeds"]]
  out["lists"] = str(out["lists"])
  for key, allowed in (
    ("test_resize", TEST_RESIZES),
    ("score", SCORES),
    ("class_split", CLASS_SPLITS),
    ("episode_rule", episodes_lib.RULES),
    ("seed_rule", episodes_lib.SEED_RULES),
  ):
    if out[key] not in allowed:
      raise ValueError(f"protocol field {key}={out[key]!r}; use one of {', '.join(allowed)}")
  if out["score"] == "input" and out["test_resize"] != "squash":
    raise ValueError(
      "protocol field score='input' scores at the square input, which only holds "
      "the whole image with test_resize='squash' (got 'aspect')"
    )
  if out["episodes"] < 0 or not out["seeds"] or out["test_size"] < 1:
    raise ValueError(
      f"protocol fields need episodes >= 0 (0: one per query), at least one seed and "
      f"test_size >= 1; got episodes={out['episodes']}, seeds={out['seeds']}, "
      f"test_size={out['test_size']}"
    )
  if out["lists"] != "build" and out["episode_rule"] != "hsnet":
    raise ValueError(
      f"protocol field lists={out['lists']!r} (HSNet's list files) needs episode_rule='hsnet'"
    )
  return {k: out[k] for k in ("name", *FIELDS)}


def apply(config) -> ml_collections.ConfigDict:
  """A copy of ``config`` with its resolved protocol written into the fields the loop reads
  and into ``protocol_fields`` (so the run record names every value). Idempotent."""
  r = resolve(config)
  c = copy.deepcopy(config)
  writes = {
    ("data", "test_size"): r["test_size"],
    ("data", "test_resize"): r["test_resize"],
    ("data", "protocol"): "bam" if r["novel_filter"] else "pfenet",
    ("data", "coco_split"): r["class_split"],
    ("eval", "episodes"): r["episodes"],
    ("eval", "seeds"): tuple(r["seeds"]),
  }
  changed = []
  for (group, key), value in writes.items():
    old = c[group].get(key)
    if old is not None and (tuple(old) if isinstance(old, (list, tuple)) else old) != value:
      changed.append(f"{group}.{key} {old!r} -> {value!r}")
    c[group][key] = value
  if "protocol_fields" in c:
    for k in FIELDS:
      if k in c.protocol_fields:
        c.protocol_fields[k] = tuple(r[k]) if k == "seeds" else r[k]
  if changed:
    logging.info(
      "protocol %s: %s (set config.protocol_fields.<field> to keep a value)",
      r["name"],
      ", ".join(changed),
    )
  return c


def check_eval_shape(
  spec, model: str, *, train_shot: int, train_way: int, shot: int, way: int
) -> None:
  """Refuses an evaluation K / N the model cannot run, naming the supported ones (one line)."""
  if shot < 1 or way < 1:
    raise ValueError(
      f"eval.shot and eval.way must be >= 1 (0: the training value), got {shot}, {way}"
    )
  shots = spec.eval_shots(train_shot)
  if shots is not None and shot not in shots:
    raise ValueError(
      f"model {model} trained {train_shot}-shot evaluates at K = "
      f"{', '.join(map(str, shots))} only (its shot fusion has K-dependent parameters; "
      f"docs/protocols.md), not eval.shot={shot}"
    )
  ways = spec.eval_ways(train_way)
  if ways is not None and way not in ways:
    raise ValueError(
      f"model {model} evaluates {', '.join(map(str, ways))}-way episodes only, not eval.way={way}"
    )


def eval_config(config, spec=None) -> ml_collections.ConfigDict:
  """The config of a test run: `apply`, then shot / way / dataset / fold = ``eval.shot`` /
  ``eval.way`` / ``eval.dataset`` / ``eval.fold`` (0, 0, "", -1: the training values).

  The model fields keep their training values except the model's shot / way field
  (`ModelSpec.shot_field` / ``way_field``), set to the evaluation K / N; the checkpoint's
  metadata must still be checked against ``config`` (the training run), not this one.

  A cross-domain ``eval.dataset`` (``isic2018``, ...; docs/cross_domain.md) takes its episodes
  from that set's "test" split over all its classes; the fold stays the training run's.

  Raises:
    ValueError: the model does not evaluate at that K / N (`check_eval_shape`), or N > 1 on a
      cross-domain set (binary masks: `episodes.check_way`).
  """
  if spec is None:
    from fss_jax.models import registry

    spec = registry.get(config.model)
  e = config.eval
  train_shot, train_way = int(config.shot), int(config.get("way", 1))
  shot = int(e.get("shot", 0) or train_shot)
  way = int(e.get("way", 0) or train_way)
  fold = int(e.get("fold", -1))
  fold = int(config.fold) if fold < 0 else fold
  check_eval_shape(
    spec, config.model, train_shot=train_shot, train_way=train_way, shot=shot, way=way
  )
  episodes_lib.check_way(eval_dataset(config), way)  # cross-domain masks are binary: 1-way only
  c = apply(config)
  fields = (
    config.model_fields.copy_and_resolve_references()
    if hasattr(config.model_fields, "copy_and_resolve_references")
    else ml_collections.ConfigDict(dict(config.model_fields))
  )
  with fields.unlocked():
    if shot != train_shot and spec.shot_field and spec.shot_field in fields:
      fields[spec.shot_field] = shot
    if way != train_way and spec.way_field and spec.way_field in fields:
      fields[spec.way_field] = way
  c.model_fields = fields  # plain values: changing shot / dataset below does not reach them
  c.shot, c.way, c.fold, c.dataset = shot, way, fold, eval_dataset(config)
  return c


def scoring(config) -> metrics_lib.Scoring:
  """The eval step's `metrics.Scoring` of ``config``'s protocol."""
  r = resolve(config)
  if r["score"] == "input":
    return metrics_lib.Scoring("input", size=r["test_size"], ignore_255=r["ignore_255"])
  mode = "pad_square" if r["test_resize"] == "aspect" else "original"
  return metrics_lib.Scoring(mode, ignore_255=r["ignore_255"])


def episode_kwargs(config) -> dict[str, Any]:
  """``rule`` / ``seed_rule`` / ``lists`` for `fss_jax.data.episodes.generate`."""
  r = resolve(config)
  return {"rule": r["episode_rule"], "seed_rule": r["seed_rule"], "lists": r["lists"]}


def _short_hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def episodes_tag(config) -> str:
  """File-name suffix of stored episode lists drawn by other rules than the default
  ("" for the PFENet rule with per-episode seeds; e.g. "_hsnet-seq")."""
  k = episode_kwargs(config)
  parts = [] if k["rule"] == "pfenet" else [k["rule"]]
  if k["seed_rule"] == "sequential":
    parts.append("seq")
  if k["lists"] != "build":
    lists = os.fspath(fss_io.user_path(k["lists"]))
    parts.append(
      "lists" + _short_hash(lists if fss_io.is_remote(lists) else os.path.abspath(lists))
    )
  return "_" + "-".join(parts) if parts else ""


def results_tag(config) -> str:
  """File-name suffix of a results JSON: "" for pfenet_bam as the method config states it,
  "_<preset>" for another preset, plus "-<hash>" when protocol_fields override it."""
  name = str(config.get("protocol", DEFAULT) or DEFAULT)
  preset = resolve(_without_overrides(config))
  resolved = resolve(config)
  diff = {k: resolved[k] for k in FIELDS if resolved[k] != preset[k]}
  if name == DEFAULT and not diff:
    return ""
  return f"_{name}" + (f"-{_short_hash(diff)}" if diff else "")


def _without_overrides(config):
  c = copy.deepcopy(config)
  if "protocol_fields" in c:
    for k in c.protocol_fields.keys():
      c.protocol_fields[k] = None
  return c


def results_fields(train_config, config) -> dict[str, Any]:
  """What a results JSON records beside the scores: the resolved protocol (every field) and
  the training run's shot / way / dataset / fold / model fields."""
  fields = train_config.model_fields
  fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
  return {
    "protocol": resolve(config),
    "train_shot": int(train_config.shot),
    "train_way": int(train_config.get("way", 1)),
    "train_dataset": str(train_config.dataset),
    "train_fold": int(train_config.fold),
    "model_fields": json.loads(json.dumps(fields, default=str)),
  }


def describe(protocol: Mapping[str, Any]) -> str:
  """One line: "hsnet: test 400 squash, scored at input, 255 ignored, ..."."""
  p = protocol
  if "test_size" not in p:
    return str(p.get("name", "unrecorded"))
  where = "input" if p["score"] == "input" else "original label size"
  eps = "one per query" if int(p["episodes"]) == 0 else str(p["episodes"])
  return (
    f"{p['name']}: test {p['test_size']} {p['test_resize']}, scored at {where}, 255 "
    f"{'ignored' if p['ignore_255'] else 'as background'}, novel filter "
    f"{'on' if p['novel_filter'] else 'off'}, {p['class_split']} COCO split, {p['episode_rule']} "
    f"episodes from {p['lists']} lists, {eps} episodes x seeds {list(p['seeds'])} "
    f"({p['seed_rule']})"
  )


__all__ = [
  "DEFAULT",
  "FIELDS",
  "PRESETS",
  "resolve",
  "apply",
  "eval_config",
  "check_eval_shape",
  "scoring",
  "episode_kwargs",
  "episodes_tag",
  "results_tag",
  "results_fields",
  "describe",
  "overrides",
  "eval_dataset",
]
