"""Deterministic episode sampling (data_protocol.md §7) and stored episode lists.

An episode is a query image, an episode class and K support images of that class
(N ways: N classes with K supports each). Everything random is a pure function of
``(seed, episode index)`` through ``np.random.default_rng`` — no Python ``random``,
no global state — so any process can compute any episode: loaders shard by index,
and restarting from a step gives the same episodes.

Rules (§7.1), per episode index i:

* query: training walks the fold's ``data_list`` once per epoch in a fresh order
  (epoch e = i // Q uses the permutation seeded by (seed, e)); testing takes
  ``data_list[i mod Q]`` (§7.3: list order, cycling);
* episode class: uniform among the query's candidate classes = classes of the mode's
  list with at least one pixel in the query (any count, so in training also base
  classes below 2048 px);
* supports: K distinct images of the class's support list (≥ 2048 px of the class),
  never the query itself; N-way: the other N-1 classes are drawn uniformly, without
  replacement, among the other classes of the list (each with K supports ≠ query) and
  label the query with their way number (1..N).

Fill-ins where the reference crashes or never terminates (never on the real lists, which
hold ≥ 37 supports per class; they matter for toy data): a candidate class is only drawn
when it has K supports besides the query, and a query without such a class is left out
of the query order (logged). A class with some, but fewer than K, supports is an error.

Two episode rules and two seed rules (docs/protocols.md; ``generate(rule=, seed_rule=)``):

* ``rule="pfenet"`` (default): the rules above (PFENet / BAM, data_protocol.md §7.3).
* ``rule="hsnet"``: the HSNet / PATNet test loaders (github juhongm999/hsnet ``data/pascal.py``,
  ``data/coco.py``; slei109/PATNet ``data/{deepglobe,isic,lung,fss}.py``), 1-way, by dataset:
  PASCAL cycles (image, class) entries in list order (``pascal.py:33,96-105``); COCO draws the
  class uniformly, then the query among the class's images (``coco.py:84-86``); FSS-1000 takes
  every test image once (``fss.py:31-32,81-83``); other cross-domain sets cycle the classes
  (``idx % n_classes``) and draw the query (``deepglobe.py:79-83``). Supports are drawn one at
  a time among the class's images and re-drawn only when equal to the query, so they may repeat
  (``pascal.py:99-103``). Entries / class lists: from the build (the §5.1 2048-px lists), or
  HSNet's own ``data/splits`` files (``lists=<dir>``).
* ``seed_rule="per_episode"`` (default): episode i draws from ``default_rng([0, seed, i])``.
  ``seed_rule="sequential"``: one numpy ``RandomState(seed)`` drawn in episode order with the
  legacy ``choice(n, 1, replace=False)`` calls of the references — HSNet's / PATNet's
  ``fix_randseed(seed)`` before a single-worker test loop (hsnet ``test.py:20``,
  ``data/dataset.py:35``), so with HSNet's lists the episodes are HSNet's own.

Test episodes come from the "val" split (PASCAL-5i, COCO-20i) or, for the fold-less cross-domain
sets, their "test" split (`test_split`), 1-way only there (binary masks: `check_way`).
Test episode lists are generated once and stored as JSON lines, one per episode::

  {"query": "2008_000123", "supports": ["2007_004459"], "class_id": 3}

(N-way: ``"class_id": [c1, …]`` and ``"supports": [[…], …]`` per way.) CLI::

  python -m fss_jax.data.episodes --dataset pascal5i --data_dir D --fold 0 --shot 1 \\
      --split test --num_episodes 1000 --seed 321 --out pascal5i_f0_1shot_s321.jsonl

The same arguments always give a byte-identical file (written atomically). An
existing ``--out`` is kept (exit status 2) unless ``--overwrite`` is given, which
replaces it atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import pickle
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from fss_jax import io as fss_io
from fss_jax.data import splits

_LOG = logging.getLogger(__name__)
# Stream tags: the first word of every SeedSequence entropy, so streams never collide.
_EPISODE_STREAM = 0
_ORDER_STREAM = 1
SPLIT_OF_MODE = {"train": "train", "test": "val"}
RULES = ("pfenet", "hsnet")
SEED_RULES = ("per_episode", "sequential")


def _randint(rng, n: int) -> int:
  """One uniform draw in [0, n): ``Generator.integers`` or the references' legacy
  ``RandomState.choice(n, 1, replace=False)`` (a permutation's first entry)."""
  if isinstance(rng, np.random.RandomState):
    return int(rng.choice(n, 1, replace=False)[0])
  return int(rng.integers(n))


def _distinct(rng, n: int, k: int) -> np.ndarray:
  """k distinct draws in [0, n) (``choice(n, k, replace=False)`` of either generator)."""
  return np.asarray(rng.choice(n, size=k, replace=False))


@dataclasses.dataclass(frozen=True)
class Episode:
  """One sampled episode, by record positions.

  Attributes:
    index: the episode index it was sampled for.
    query: record position of the query image.
    class_ids: [way] original dataset class ids (way 1: one entry).
    class_indices: [way] positions of the classes in the list's classes (``subcls``).
    supports: [way][shot] record positions of the supports.
  """

  index: int
  query: int
  class_ids: tuple[int, ...]
  class_indices: tuple[int, ...]
  supports: tuple[tuple[int, ...], ...]


class EpisodeSampler:
  """Samples `Episode` s of one fold/mode from its `splits.FoldLists`.

  Where the reference cannot run (it crashes or loops forever), the sampler fills in:
  a candidate class is *eligible* for a query only if its support list holds at least
  K images other than the query, and queries without an eligible class are left out of
  the query order (logged). On the real PASCAL/COCO lists (>= 37 supports per class)
  both rules change nothing. A class with some supports but fewer than K is an error.

  Args:
    lists: the fold's lists (train: base classes; test: novel classes).
    shot: K supports per way.
    seed: the sampling seed.
    way: N classes per episode (1 in the PFENet/BAM protocol).
    order: "shuffle" (training: a fresh permutation of the query list every epoch)
      or "list" (testing: list order, cycling). Default: "shuffle" for mode "train".

  Attributes:
    query_positions: int64 [Q] record positions of the queries, list order.
    eligible: bool [Q, |classes|] eligible episode classes per query.
  """

  def __init__(
    self, lists: splits.FoldLists, *, shot: int, seed: int, way: int = 1, order: str | None = None
  ):
    if shot < 1 or way < 1:
      raise ValueError(f"shot and way must be >= 1, got shot={shot}, way={way}")
    if way > len(lists.classes):
      raise ValueError(f"way={way} exceeds the {len(lists.classes)} classes of the list")
    self.lists = lists
    self.shot = int(shot)
    self.way = int(way)
    self.seed = int(seed)
    self.order = order or ("shuffle" if lists.mode == "train" else "list")
    if self.order not in ("shuffle", "list"):
      raise ValueError(f"order must be 'shuffle' or 'list', got {self.order!r}")
    where = f"{lists.mode} list of classes {lists.classes}"
    if len(lists) == 0:
      raise ValueError(
        f"the {where} is empty: no image has one of these classes with >= {lists.min_pixels} "
        f"pixels; check the dataset and fold"
      )
    counts = lists.counts()
    short = {c: n for c, n in counts.items() if 0 < n < self.shot}
    if short:
      raise ValueError(
        "shot K={} exceeds the support images of {}: {} (>= {} px of the class); use a smaller "
        "shot or a larger dataset".format(
          self.shot,
          "class" if len(short) == 1 else "classes",
          ", ".join(f"class {c} has {n}" for c, n in short.items()),
          lists.min_pixels,
        )
      )
    qpos = lists.query_positions
    elig = np.zeros(lists.candidates.shape, bool)
    for j, c in enumerate(lists.classes):
      avail = counts[c] - np.isin(qpos, lists.support_positions[c])
      elig[:, j] = lists.candidates[:, j] & (avail >= self.shot)
    keep = elig.any(axis=1)
    if not keep.any():
      raise ValueError(
        f"no query of the {where} has a class with {self.shot} support image(s) besides itself "
        f"(support counts {counts}); use a smaller shot or a larger dataset"
      )
    if not keep.all():
      _LOG.warning(
        "%d of %d queries of the %s have no class with %d support image(s) besides themselves "
        "and are left out (a reference run would fail on them)",
        int((~keep).sum()),
        keep.size,
        where,
        self.shot,
      )
    self.query_positions = qpos[keep]
    self.eligible = elig[keep]
    self._support_sets = {c: frozenset(map(int, v)) for c, v in lists.support_positions.items()}
    self._perm_cache: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    """Episodes per epoch: one per query image."""
    return len(self.query_positions)

  # -- query order -------------------------------------------------------------

  def _epoch_order(self, epoch: int) -> np.ndarray:
    cached = self._perm_cache
    if cached is not None and cached[0] == epoch:
      return cached[1]
    perm = np.random.default_rng([_ORDER_STREAM, self.seed, epoch]).permutation(len(self))
    self._perm_cache = (epoch, perm)
    return perm

  def query_slot(self, index: int) -> int:
    """Row of ``query_positions`` used by episode ``index``."""
    q = len(self)
    if self.order == "list":
      return index % q
    return int(self._epoch_order(index // q)[index % q])

  def rng(self, index: int) -> np.random.Generator:
    """The Generator of episode ``index`` (class and support draws)."""
    return np.random.default_rng([_EPISODE_STREAM, self.seed, index])

  def rngs(self, num: int, seed_rule: str = "per_episode") -> Iterable:
    """The generators of episodes 0..num-1: one per episode, or one shared `RandomState`."""
    return _rngs(self.seed, num, seed_rule, self.rng)

  # -- sampling ----------------------------------------------------------------

  def available(self, class_id: int, query: int) -> np.ndarray:
    """int64 [n] support positions of ``class_id`` usable with query position ``query``."""
    pos = self.lists.support_positions[class_id]
    return pos[pos != query] if query in self._support_sets[class_id] else pos

  def _draw_supports(self, rng, class_id: int, query: int) -> tuple[int, ...]:
    avail = self.available(class_id, query)
    pick = _distinct(rng, len(avail), self.shot)
    return tuple(int(avail[k]) for k in pick)

  def sample(self, index: int, rng=None) -> Episode:
    """The episode of ``index`` (>= 0): a pure function of (seed, index), or of the state of
    ``rng`` (the shared generator of ``seed_rule="sequential"``)."""
    index = int(index)
    if index < 0:
      raise IndexError(f"episode index must be >= 0, got {index}")
    slot = self.query_slot(index)
    query = int(self.query_positions[slot])
    rng = self.rng(index) if rng is None else rng
    classes = self.lists.classes
    cand = np.flatnonzero(self.eligible[slot])
    first = int(cand[_randint(rng, len(cand))])
    chosen = [first]
    if self.way > 1:
      others = [
        j
        for j in range(len(classes))
        if j != first and len(self.available(classes[j], query)) >= self.shot
      ]
      if len(others) < self.way - 1:
        raise ValueError(
          f"{self.way}-way {self.shot}-shot episode {index}: only {len(others)} other classes "
          f"have {self.shot} support image(s); use fewer ways or shots"
        )
      chosen += [others[k] for k in _distinct(rng, len(others), self.way - 1)]
    supports = tuple(self._draw_supports(rng, classes[j], query) for j in chosen)
    return Episode(
      index=index,
      query=query,
      class_ids=tuple(int(classes[j]) for j in chosen),
      class_indices=tuple(int(j) for j in chosen),
      supports=supports,
    )

  __getitem__ = sample


def _rngs(seed: int, num: int, seed_rule: str, per_episode) -> Iterable:
  if seed_rule not in SEED_RULES:
    raise ValueError(f"seed_rule must be one of {SEED_RULES}, got {seed_rule!r}")
  if seed_rule == "sequential":
    shared = np.random.RandomState(int(seed))  # numpy's legacy global seeding (fix_randseed)
    return (shared for _ in range(num))
  return (per_episode(i) for i in range(num))


# -- the HSNet / PATNet test loaders -------------------------------------------------


# How HSNet / PATNet pick an episode's query and class, by dataset (see the module docstring).
HSNET_KINDS = {"pascal5i": "entries", "coco20i": "class_uniform", "fss1000": "every_image"}


@dataclasses.dataclass(frozen=True)
class HSNetLists:
  """What the HSNet / PATNet loaders sample from.

  Attributes:
    kind: "entries" (cycle ``entries``), "every_image" (the same, over every image of every
      class), "class_uniform" (class drawn uniformly, then the query) or "class_cycle" (class
      ``index % n``, then the query).
    classes: the test classes (global ids), ascending (HSNet's ``class_ids``).
    entries: [(record position, class id)] in list order ("entries", "every_image").
    classwise: class id -> int64 record positions (``img_metadata_classwise``), list order.
  """

  kind: str
  classes: tuple[int, ...]
  entries: tuple[tuple[int, int], ...]
  classwise: Mapping[int, np.ndarray]


def hsnet_lists(
  index,
  dataset: str,
  fold: int,
  *,
  lists: str = "build",
  coco_split: str = "interleaved",
  min_pixels: int = splits.MIN_PIXELS,
) -> HSNetLists:
  """The HSNet-rule lists of (dataset, fold)'s test split.

  Args:
    index: the test split's `DatasetIndex` (``image_ids``, ``class_pixels``).
    lists: "build": from the build's §5.1 lists (an image is an entry of each novel class it
      holds with >= 2048 px; ``classwise`` = the support lists). Otherwise a directory with
      HSNet's ``data/splits`` (``pascal/val/fold{k}.txt`` lines ``<id>__<class>``;
      ``coco/val/fold{k}.pkl`` {class - 1: [image paths]}), or the repository root holding it.
  """
  kind = HSNET_KINDS.get(dataset, "class_cycle")
  if lists != "build":
    return _hsnet_file_lists(index, dataset, fold, fss_io.user_path(lists), kind)
  if _cross_domain(dataset):
    # PATNet keeps every image of a class folder (no pixel threshold) and sorts the file paths
    # (deepglobe.py:109, isic.py:107, lung.py:108, fss.py:110): here the image ids, in which
    # FSS-1000's support draw picks image k + 1 of 1..10 (fss.py:91), a numeric order.
    fl = splits.cross_domain_lists(index, dataset, "test")
    ids = [str(i) for i in index.image_ids]
    classes = tuple(int(c) for c in fl.classes)
    by_id = {c: sorted(map(int, fl.support_positions[c]), key=lambda p: ids[p]) for c in classes}
    if kind != "every_image":
      return HSNetLists(kind, classes, (), {c: np.asarray(v, np.int64) for c, v in by_id.items()})
    entries = tuple((p, c) for c in classes for p in by_id[c])
    numeric = {
      c: np.asarray(sorted(v, key=lambda p: _numeric_name(ids[p])), np.int64)
      for c, v in by_id.items()
    }
    return HSNetLists(kind, classes, entries, numeric)
  fl = splits.fold_lists(index, dataset, fold, "test", coco_split=coco_split, min_pixels=min_pixels)
  classwise = {int(c): np.asarray(fl.support_positions[c], np.int64) for c in fl.classes}
  entries = tuple(sorted((int(p), int(c)) for c, pos in classwise.items() for p in pos))
  return HSNetLists(kind, tuple(int(c) for c in fl.classes), entries, classwise)


def _cross_domain(dataset: str) -> bool:
  """A fold-less cross-domain test set (`splits.dataset_kind`)."""
  kind = getattr(splits, "dataset_kind", None)
  try:
    return kind is not None and kind(dataset) == "cross_domain"
  except ValueError:
    return False


def test_split(dataset: str) -> str:
  """The split test episodes are drawn from: "val" for PASCAL-5i / COCO-20i (§7.3), "test" for
  the cross-domain sets (three have only "test"; PATNet tests FSS-1000 on its test classes,
  ``fss.py:22-24``)."""
  return "test" if _cross_domain(dataset) else SPLIT_OF_MODE["test"]


def check_way(dataset: str, way: int) -> None:
  """Refuses N > 1 ways on a cross-domain set: its masks are binary (1 = the record's one class),
  so a query label cannot show several episode classes (one line)."""
  if _cross_domain(dataset) and int(way) != 1:
    raise ValueError(
      f"{splits.canonical_cross_domain(dataset)} has binary masks (1 = the record's one "
      f"class), so its episodes are 1-way only, not {way}-way; set --config.eval.way=1"
    )


def _numeric_name(image_id: str) -> tuple:
  """Sort key: the number of an id's last path part ("bus/7" -> 7), else after all numbers."""
  last = image_id.rsplit("/", 1)[-1]
  return (0, int(last), image_id) if last.isdigit() else (1, 0, image_id)


def _hsnet_file_lists(index, dataset: str, fold: int, root: epath.Path, kind: str) -> HSNetLists:
  if (root / "data" / "splits").is_dir():
    root = root / "data" / "splits"
  pos = {str(i): p for p, i in enumerate(index.image_ids)}

  def position(name: str, missing: list) -> int | None:
    stem = pathlib.PurePosixPath(name).stem
    if stem not in pos:
      missing.append(stem)
      return None
    return pos[stem]

  missing: list[str] = []
  if dataset == "pascal5i":
    path = root / "pascal" / "val" / f"fold{fold}.txt"
    if not path.is_file():
      raise FileNotFoundError(
        f"HSNet list {path} not found; pass the hsnet repository's data/splits folder"
      )
    entries = []
    for line in path.read_text().split("\n"):
      if line.strip():
        name, _, cls = line.strip().rpartition("__")
        p = position(name, missing)
        if p is not None:
          entries.append((p, int(cls)))
    classes = tuple(range(5 * fold + 1, 5 * fold + 6))  # pascal.py:107-115
    classwise = {c: np.asarray([p for p, k in entries if k == c], np.int64) for c in classes}
  elif dataset == "coco20i":
    path = root / "coco" / "val" / f"fold{fold}.pkl"
    if not path.is_file():
      raise FileNotFoundError(
        f"HSNet list {path} not found; pass the hsnet repository's data/splits folder"
      )
    with path.open("rb") as f:
      raw = pickle.load(f)  # HSNet's own file: {class - 1: [val2014/COCO_val2014_....jpg, ...]}
    classes = tuple(fold + 4 * v + 1 for v in range(20))  # coco.py:60-66
    classwise = {}
    for c in classes:
      ps = [position(n, missing) for n in raw.get(c - 1, [])]
      classwise[c] = np.asarray([p for p in ps if p is not None], np.int64)
    entries = []
  else:
    raise ValueError(
      f"HSNet list files exist for pascal5i and coco20i only; use lists='build' for {dataset}"
    )
  if missing:
    raise ValueError(
      f"{len(missing)} image(s) of {path} are not in the {dataset} build (first: "
      f"{', '.join(missing[:3])}); is it the val split of the same dataset?"
    )
  return HSNetLists(kind, classes, tuple(entries), classwise)


class HSNetSampler:
  """Episodes drawn as the HSNet / PATNet test loaders draw them (1-way, K shots).

  ``sample(index, rng)`` makes the draws of ``__getitem__(index)`` of the reference dataset with
  ``rng`` in place of numpy's global state: per kind, the class and query (see `HSNetLists`),
  then K supports, each ``classwise[class][draw]`` re-drawn while it equals the query.
  """

  def __init__(self, lists: HSNetLists, *, shot: int, seed: int):
    if shot < 1:
      raise ValueError(f"shot must be >= 1, got {shot}")
    self.lists, self.shot, self.seed = lists, int(shot), int(seed)
    if lists.kind in ("entries", "every_image") and not lists.entries:
      raise ValueError(
        "the HSNet test list is empty: no image holds a test class with >= 2048 pixels"
      )
    thin = {
      c: len(v)
      for c, v in lists.classwise.items()
      if len(v) < 2
      and (lists.kind in ("class_uniform", "class_cycle") or any(k == c for _, k in lists.entries))
    }
    if thin:
      # The reference loops forever here (it re-draws until a support differs from the query).
      raise ValueError(
        f"classes with fewer than 2 images cannot give a support besides the query: {thin}"
      )

  def rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([_EPISODE_STREAM, self.seed, index])

  def rngs(self, num: int, seed_rule: str = "per_episode") -> Iterable:
    return _rngs(self.seed, num, seed_rule, self.rng)

  def __len__(self) -> int:
    """One episode per entry ("entries", "every_image"); 0 for the class-drawn kinds."""
    return len(self.lists.entries)

  def sample(self, index: int, rng=None) -> Episode:
    index = int(index)
    rng = self.rng(index) if rng is None else rng
    l = self.lists
    if l.kind in ("entries", "every_image"):
      query, cls = l.entries[index % len(l.entries)]
    else:
      cls = l.classes[
        _randint(rng, len(l.classes)) if l.kind == "class_uniform" else index % len(l.classes)
      ]
      pool = l.classwise[cls]
      query = int(pool[_randint(rng, len(pool))])
    pool = l.classwise[cls]
    supports: list[int] = []
    while len(supports) < self.shot:
      s = int(pool[_randint(rng, len(pool))])
      if s != query:
        supports.append(s)
    return Episode(
      index=index,
      query=int(query),
      class_ids=(int(cls),),
      class_indices=(l.classes.index(cls),),
      supports=(tuple(supports),),
    )


# -- stored episode lists (JSON lines) ----------------------------------------------


def episode_record(ep: Episode, image_ids: Sequence[str]) -> dict:
  """The JSON-lines record of ``ep``; ``image_ids`` maps record positions to ids."""
  if len(ep.class_ids) == 1:
    return {
      "query": str(image_ids[ep.query]),
      "supports": [str(image_ids[p]) for p in ep.supports[0]],
      "class_id": ep.class_ids[0],
    }
  return {
    "query": str(image_ids[ep.query]),
    "supports": [[str(image_ids[p]) for p in way] for way in ep.supports],
    "class_id": list(ep.class_ids),
  }


def format_records(records: Iterable[dict]) -> bytes:
  """JSON lines (one compact-but-readable object per line, fixed key order)."""
  out = []
  for r in records:
    out.append(
      json.dumps(
        {"query": r["query"], "supports": r["supports"], "class_id": r["class_id"]},
        ensure_ascii=True,
      )
    )
  return ("\n".join(out) + "\n").encode("ascii") if out else b""


def write_episodes(
  path: str | os.PathLike, records: Iterable[dict], *, overwrite: bool = True
) -> os.PathLike:
  """Writes the records as JSON lines atomically (temporary file + rename).

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False (nothing written).
  """
  return fss_io.atomic_write(path, format_records(records), overwrite=overwrite)


def read_episodes(path: str | os.PathLike) -> list[dict]:
  """Reads a JSON-lines episode file; errors name the file and line."""
  file = fss_io.user_path(path)
  if not file.is_file():
    raise FileNotFoundError(
      f"episode file {file} not found; generate it with "
      f"`python -m fss_jax.data.episodes ... --split test --out {file}`"
    )
  records = []
  with file.open("r", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        ok = isinstance(r, dict) and {"query", "supports", "class_id"} <= set(r)
      except json.JSONDecodeError:
        ok = False
      if not ok:
        raise ValueError(
          f"{file}:{n}: not an episode record "
          f'(expected {{"query", "supports", "class_id"}}): {line.strip()[:200]}'
        )
      records.append(r)
  if not records:
    raise ValueError(f"episode file {file} is empty")
  return records


def make_sampler(
  index,
  dataset: str,
  fold: int,
  mode: str,
  *,
  shot: int,
  seed: int,
  way: int = 1,
  protocol: str = "bam",
  coco_split: str = "interleaved",
  min_pixels: int = splits.MIN_PIXELS,
) -> EpisodeSampler:
  """Lists of (dataset, fold, mode) from a split's index + a sampler over them (a fold-less
  cross-domain set: every class of its test split, `splits.cross_domain_lists`)."""
  if _cross_domain(dataset) and mode == "test":
    lists = splits.cross_domain_lists(index, dataset, "test")
  else:
    lists = splits.fold_lists(
      index, dataset, fold, mode, protocol=protocol, coco_split=coco_split, min_pixels=min_pixels
    )
  return EpisodeSampler(lists, shot=shot, seed=seed, way=way)


def generate(
  index,
  dataset: str,
  fold: int,
  mode: str,
  *,
  shot: int,
  num_episodes: int,
  seed: int,
  way: int = 1,
  protocol: str = "bam",
  coco_split: str = "interleaved",
  min_pixels: int = splits.MIN_PIXELS,
  rule: str = "pfenet",
  seed_rule: str = "per_episode",
  lists: str = "build",
) -> list[dict]:
  """Episode records 0..num_episodes-1 of (dataset, fold, mode) — what the CLI writes.

  Args:
    index: `DatasetIndex` of the mode's split (train split for "train", val for "test").
    num_episodes: >= 1, or 0 for one episode per query (per list entry under the HSNet rule).
    rule, seed_rule, lists: see the module docstring (`RULES`, `SEED_RULES`, `hsnet_lists`).
  """
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
  check_way(dataset, way)
  if rule == "hsnet":
    if mode != "test" or way != 1:
      raise ValueError(
        f"the HSNet episode rule is for 1-way test episodes (got mode={mode!r}, way={way})"
      )
    sampler: HSNetSampler | EpisodeSampler = HSNetSampler(
      hsnet_lists(index, dataset, fold, lists=lists, coco_split=coco_split, min_pixels=min_pixels),
      shot=shot,
      seed=seed,
    )
  else:
    if lists != "build":
      raise ValueError(
        f"lists={lists!r} needs rule='hsnet'; the PFENet rule reads the build's lists"
      )
    sampler = make_sampler(
      index,
      dataset,
      fold,
      mode,
      shot=shot,
      seed=seed,
      way=way,
      protocol=protocol,
      coco_split=coco_split,
      min_pixels=min_pixels,
    )
  if num_episodes == 0:
    num_episodes = len(sampler)
    if num_episodes == 0:
      raise ValueError(
        f"num_episodes=0 (one per query) needs a query list; the {dataset} HSNet rule "
        f"draws its queries, give a number of episodes"
      )
  if num_episodes < 1:
    raise ValueError(f"num_episodes must be >= 1 (or 0: one per query), got {num_episodes}")
  ids = index.image_ids
  return [
    episode_record(sampler.sample(i, r), ids)
    for i, r in zip(range(num_episodes), sampler.rngs(num_episodes, seed_rule))
  ]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m fss_jax.data.episodes", description=__doc__.split("\n")[0]
  )
  p.add_argument(
    "--dataset", required=True, help="pascal5i, coco20i or a cross-domain test set (isic2018, ...)"
  )
  p.add_argument("--data_dir", required=True, help="the --data_dir of `python -m data_prep.build`")
  p.add_argument("--fold", type=int, required=True)
  p.add_argument("--shot", type=int, required=True)
  p.add_argument("--way", type=int, default=1)
  p.add_argument(
    "--split",
    choices=("train", "test"),
    required=True,
    help="test: val images, novel classes (stored eval episodes); train: train images, base classes",
  )
  p.add_argument("--num_episodes", type=int, required=True)
  p.add_argument("--seed", type=int, required=True)
  p.add_argument(
    "--protocol",
    choices=splits.PROTOCOLS,
    default="bam",
    help="training lists: bam (intersection filter, default) or pfenet",
  )
  p.add_argument("--coco_split", choices=splits.COCO_SPLITS, default="interleaved")
  p.add_argument("--rule", choices=RULES, default="pfenet", help="episode rule (docs/protocols.md)")
  p.add_argument("--seed_rule", choices=SEED_RULES, default="per_episode")
  p.add_argument(
    "--lists", default="build", help="HSNet rule: 'build' or hsnet's data/splits folder"
  )
  p.add_argument("--out", required=True, help="output .jsonl")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out file (atomically); without it an existing file is kept",
  )
  a = p.parse_args(argv)
  if not a.overwrite and fss_io.user_path(a.out).exists():
    print(f"error: {a.out} already exists; pass --overwrite to replace it", file=sys.stderr)
    return 2
  from fss_jax.data import source

  try:
    cross = _cross_domain(a.dataset)  # fold-less test sets: their "test" split (`test_split`)
    dataset = (
      splits.canonical_cross_domain(a.dataset) if cross else splits.canonical_dataset(a.dataset)
    )
    src = source.open_split(
      a.data_dir, dataset, test_split(dataset) if a.split == "test" else SPLIT_OF_MODE[a.split]
    )
    records = generate(
      src.index,
      dataset,
      a.fold,
      a.split,
      shot=a.shot,
      num_episodes=a.num_episodes,
      seed=a.seed,
      way=a.way,
      protocol=a.protocol,
      coco_split=a.coco_split,
      rule=a.rule,
      seed_rule=a.seed_rule,
      lists=a.lists,
    )
    out = write_episodes(a.out, records, overwrite=a.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(records)} episodes to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
