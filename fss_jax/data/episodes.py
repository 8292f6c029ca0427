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
import sys
from typing import Iterable, Sequence

import numpy as np

from fss_jax import io as fss_io
from fss_jax.data import splits

_LOG = logging.getLogger(__name__)
# Stream tags: the first word of every SeedSequence entropy, so streams never collide.
_EPISODE_STREAM = 0
_ORDER_STREAM = 1
SPLIT_OF_MODE = {"train": "train", "test": "val"}


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

  def __init__(self, lists: splits.FoldLists, *, shot: int, seed: int, way: int = 1,
               order: str | None = None):
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
      raise ValueError(f"the {where} is empty: no image has one of these classes with >= {lists.min_pixels} "
                       f"pixels; check the dataset and fold")
    counts = lists.counts()
    short = {c: n for c, n in counts.items() if 0 < n < self.shot}
    if short:
      raise ValueError("shot K={} exceeds the support images of {}: {} (>= {} px of the class); use a smaller "
                       "shot or a larger dataset".format(
                           self.shot, "class" if len(short) == 1 else "classes",
                           ", ".join(f"class {c} has {n}" for c, n in short.items()), lists.min_pixels))
    qpos = lists.query_positions
    elig = np.zeros(lists.candidates.shape, bool)
    for j, c in enumerate(lists.classes):
      avail = counts[c] - np.isin(qpos, lists.support_positions[c])
      elig[:, j] = lists.candidates[:, j] & (avail >= self.shot)
    keep = elig.any(axis=1)
    if not keep.any():
      raise ValueError(f"no query of the {where} has a class with {self.shot} support image(s) besides itself "
                       f"(support counts {counts}); use a smaller shot or a larger dataset")
    if not keep.all():
      _LOG.warning("%d of %d queries of the %s have no class with %d support image(s) besides themselves "
                      "and are left out (a reference run would fail on them)", int((~keep).sum()), len(keep),
                      where, self.shot)
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

  # -- sampling ----------------------------------------------------------------

  def available(self, class_id: int, query: int) -> np.ndarray:
    """int64 [n] support positions of ``class_id`` usable with query position ``query``."""
    pos = self.lists.support_positions[class_id]
    return pos[pos != query] if query in self._support_sets[class_id] else pos

  def _draw_supports(self, rng: np.random.Generator, class_id: int, query: int) -> tuple[int, ...]:
    avail = self.available(class_id, query)
    pick = rng.choice(len(avail), size=self.shot, replace=False)
    return tuple(int(avail[k]) for k in pick)

  def sample(self, index: int) -> Episode:
    """The episode of ``index`` (>= 0): a pure function of (seed, index)."""
    index = int(index)
    if index < 0:
      raise IndexError(f"episode index must be >= 0, got {index}")
    slot = self.query_slot(index)
    query = int(self.query_positions[slot])
    rng = self.rng(index)
    classes = self.lists.classes
    cand = np.flatnonzero(self.eligible[slot])
    first = int(cand[rng.integers(len(cand))])
    chosen = [first]
    if self.way > 1:
      others = [j for j in range(len(classes))
                if j != first and len(self.available(classes[j], query)) >= self.shot]
      if len(others) < self.way - 1:
        raise ValueError(f"{self.way}-way {self.shot}-shot episode {index}: only {len(others)} other classes "
                         f"have {self.shot} support image(s); use fewer ways or shots")
      chosen += [others[k] for k in rng.choice(len(others), size=self.way - 1, replace=False)]
    supports = tuple(self._draw_supports(rng, classes[j], query) for j in chosen)
    return Episode(index=index, query=query, class_ids=tuple(int(classes[j]) for j in chosen),
                   class_indices=tuple(int(j) for j in chosen), supports=supports)

  __getitem__ = sample


# -- stored episode lists (JSON lines) ----------------------------------------------


def episode_record(ep: Episode, image_ids: Sequence[str]) -> dict:
  """The JSON-lines record of ``ep``; ``image_ids`` maps record positions to ids."""
  if len(ep.class_ids) == 1:
    return {"query": str(image_ids[ep.query]), "supports": [str(image_ids[p]) for p in ep.supports[0]],
            "class_id": ep.class_ids[0]}
  return {"query": str(image_ids[ep.query]),
          "supports": [[str(image_ids[p]) for p in way] for way in ep.supports],
          "class_id": list(ep.class_ids)}


def format_records(records: Iterable[dict]) -> bytes:
  """JSON lines (one compact-but-readable object per line, fixed key order)."""
  out = []
  for r in records:
    out.append(json.dumps({"query": r["query"], "supports": r["supports"], "class_id": r["class_id"]},
                          ensure_ascii=True))
  return ("\n".join(out) + "\n").encode("ascii") if out else b""


def write_episodes(path: str | os.PathLike, records: Iterable[dict], *,
                   overwrite: bool = True) -> pathlib.Path:
  """Writes the records as JSON lines atomically (temporary file + rename).

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False (nothing written).
  """
  return fss_io.atomic_write(path, format_records(records), overwrite=overwrite)


def read_episodes(path: str | os.PathLike) -> list[dict]:
  """Reads a JSON-lines episode file; errors name the file and line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"episode file {path} not found; generate it with "
                            f"`python -m fss_jax.data.episodes ... --split test --out {path}`")
  records = []
  with open(path, "r", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        ok = isinstance(r, dict) and {"query", "supports", "class_id"} <= set(r)
      except json.JSONDecodeError:
        ok = False
      if not ok:
        raise ValueError(f"{path}:{n}: not an episode record "
                         f"(expected {{\"query\", \"supports\", \"class_id\"}}): {line.strip()[:200]}")
      records.append(r)
  if not records:
    raise ValueError(f"episode file {path} is empty")
  return records


def make_sampler(index, dataset: str, fold: int, mode: str, *, shot: int, seed: int, way: int = 1,
                 protocol: str = "bam", coco_split: str = "interleaved",
                 min_pixels: int = splits.MIN_PIXELS) -> EpisodeSampler:
  """Lists of (dataset, fold, mode) from a split's index + a sampler over them."""
  lists = splits.fold_lists(index, dataset, fold, mode, protocol=protocol, coco_split=coco_split,
                            min_pixels=min_pixels)
  return EpisodeSampler(lists, shot=shot, seed=seed, way=way)


def generate(index, dataset: str, fold: int, mode: str, *, shot: int, num_episodes: int, seed: int,
             way: int = 1, protocol: str = "bam", coco_split: str = "interleaved",
             min_pixels: int = splits.MIN_PIXELS) -> list[dict]:
  """Episode records 0..num_episodes-1 of (dataset, fold, mode) — what the CLI writes.

  Args:
    index: `DatasetIndex` of the mode's split (train split for "train", val for "test").
  """
  if num_episodes < 1:
    raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
  sampler = make_sampler(index, dataset, fold, mode, shot=shot, seed=seed, way=way, protocol=protocol,
                         coco_split=coco_split, min_pixels=min_pixels)
  ids = index.image_ids
  return [episode_record(sampler.sample(i), ids) for i in range(num_episodes)]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m fss_jax.data.episodes", description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True, help="pascal5i or coco20i")
  p.add_argument("--data_dir", required=True, help="the --data_dir of `python -m data_prep.build`")
  p.add_argument("--fold", type=int, required=True)
  p.add_argument("--shot", type=int, required=True)
  p.add_argument("--way", type=int, default=1)
  p.add_argument("--split", choices=("train", "test"), required=True,
                 help="test: val images, novel classes (stored eval episodes); train: train images, base classes")
  p.add_argument("--num_episodes", type=int, required=True)
  p.add_argument("--seed", type=int, required=True)
  p.add_argument("--protocol", choices=splits.PROTOCOLS, default="bam",
                 help="training lists: bam (intersection filter, default) or pfenet")
  p.add_argument("--coco_split", choices=splits.COCO_SPLITS, default="interleaved")
  p.add_argument("--out", required=True, help="output .jsonl")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out file (atomically); without it an existing file is kept")
  a = p.parse_args(argv)
  if not a.overwrite and pathlib.Path(a.out).exists():
    print(f"error: {a.out} already exists; pass --overwrite to replace it", file=sys.stderr)
    return 2
  from fss_jax.data import source  # pylint: disable=g-import-not-at-top
  try:
    dataset = splits.canonical_dataset(a.dataset)
    src = source.open_split(a.data_dir, dataset, SPLIT_OF_MODE[a.split])
    records = generate(src.index, dataset, a.fold, a.split, shot=a.shot, num_episodes=a.num_episodes,
                       seed=a.seed, way=a.way, protocol=a.protocol, coco_split=a.coco_split)
    out = write_episodes(a.out, records, overwrite=a.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(records)} episodes to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
