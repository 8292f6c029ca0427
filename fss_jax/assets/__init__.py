"""Data files shipped inside the package, checked by SHA-256 on load.

Sym-Net's word2vec class embeddings (symnet.md §8): ``symnet/word2vec_pascal.npy``
float32 [21, 300] and ``symnet/word2vec_coco.npy`` float32 [81, 300], row = the
original class id (row 0 = background), converted unchanged from the official
``embeddings/word2vec_{pascal,coco}.pkl`` of Sunbaoquan/Sym-Net (byte-identical to
MIANet's). The source word2vec model and its averaging rule are undocumented, so the
arrays cannot be regenerated: they are data, not code.

  table = load_class_embeddings("pascal5i")          # np.ndarray [21, 300], verified
  check_class_ids([3, 7], "pascal5i")                # raises for ids outside 0..20

Errors say what is wrong and how to fix it: a corrupted or replaced file
(`AssetError` with the expected and the found SHA-256), the table of the other
dataset, a custom table of the wrong size, a class id outside the table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pathlib
from collections.abc import Iterable

import numpy as np

from fss_jax import io as fss_io

ASSET_DIR = pathlib.Path(__file__).resolve().parent


class AssetError(ValueError):
  """A shipped data file is missing, corrupted, or does not fit its use."""


@dataclasses.dataclass(frozen=True)
class EmbeddingTable:
  """One class-embedding table: file (relative to this package), checksum, shape."""

  file: str
  sha256: str
  shape: tuple[int, int]


# SHA-256 of the .npy files (the official .pkl files hash to eebb9c29... / 226bd025...,
# symnet.md §8; the arrays inside are the same: element sums -24.234728 / -75.020577).
WORD2VEC: dict[str, EmbeddingTable] = {
  "pascal5i": EmbeddingTable(
    "symnet/word2vec_pascal.npy",
    "5f0172bc5e466940b37f20aa0c3e998ef05d637e82ba931618bc892b528aa928",
    (21, 300),
  ),
  "coco20i": EmbeddingTable(
    "symnet/word2vec_coco.npy",
    "ac2768bfb8928f43edba7a3e3e8b47d438f4b22c1e436967c457e2f25bfe8505",
    (81, 300),
  ),
}
_ALIASES = {
  "pascal": "pascal5i",
  "voc": "pascal5i",
  "pascal5i": "pascal5i",
  "coco": "coco20i",
  "coco20i": "coco20i",
}


def canonical_dataset(dataset: str) -> str:
  """``"pascal"`` / ``"pascal5i"`` -> ``"pascal5i"``; ``"coco"`` / ``"coco20i"`` -> ``"coco20i"``."""
  try:
    return _ALIASES[str(dataset).lower()]
  except KeyError:
    raise AssetError(
      f"no class embeddings for dataset {dataset!r}; Sym-Net ships word2vec "
      f"tables for {', '.join(WORD2VEC)}"
    ) from None


def num_class_rows(dataset: str) -> int:
  """Rows of the dataset's embedding table: classes + background (21 PASCAL, 81 COCO)."""
  return WORD2VEC[canonical_dataset(dataset)].shape[0]


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with fss_io.user_path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _dataset_of_sha(sha: str) -> str | None:
  for name, t in WORD2VEC.items():
    if t.sha256 == sha:
      return name
  return None


@functools.lru_cache(maxsize=8)
def _load(dataset: str, path: str | None) -> np.ndarray:
  want = WORD2VEC[dataset]
  packaged = path is None
  file = ASSET_DIR / want.file if path is None else fss_io.user_path(path)
  if not file.is_file():
    if packaged:
      raise AssetError(
        f"the packaged class embeddings {file} are missing; reinstall fss-jax "
        f"(the .npy files are package data of fss_jax.assets) or copy "
        f"{pathlib.Path(want.file).name} from Sym-Net's embeddings/ "
        f"(converted to .npy) to {file.parent}"
      )
    raise AssetError(f"class embedding file {file} not found")
  sha = sha256_file(file)
  other = _dataset_of_sha(sha)
  if other is not None and other != dataset:
    raise AssetError(
      f"{file} holds the {other} class embeddings, but the model is built for "
      f"{dataset}; use the {dataset} table ({WORD2VEC[dataset].file}) or set the "
      f"model's dataset to {other}"
    )
  if packaged and sha != want.sha256:
    raise AssetError(
      f"{file} is corrupted or was replaced: SHA-256 {sha}, expected "
      f"{want.sha256}; reinstall fss-jax or restore the file from the "
      f"repository"
    )
  try:
    with file.open("rb") as f:
      table = np.load(io.BytesIO(f.read()), allow_pickle=False)
  except (ValueError, OSError) as e:
    raise AssetError(
      f"cannot read class embeddings {file}: {e} (expected a .npy float array "
      f"[{want.shape[0]}, D], row = class id)"
    ) from None
  if table.ndim != 2 or table.shape[0] != want.shape[0]:
    guess = [n for n, t in WORD2VEC.items() if table.ndim == 2 and t.shape[0] == table.shape[0]]
    hint = f" (that is the row count of {guess[0]})" if guess else ""
    raise AssetError(
      f"class embeddings {file} have shape {tuple(table.shape)}{hint}; {dataset} "
      f"needs [{want.shape[0]}, D] (row = class id, row 0 = background)"
    )
  if packaged and tuple(table.shape) != want.shape:
    raise AssetError(f"{file}: shape {tuple(table.shape)}, expected {want.shape}")
  table = np.asarray(table, np.float32)
  table.setflags(write=False)
  return table


def load_class_embeddings(dataset: str, path: str | os.PathLike | None = None) -> np.ndarray:
  """The class-embedding table of a dataset, verified.

  Args:
    dataset: "pascal5i" / "pascal" or "coco20i" / "coco".
    path: optional custom table (.npy [rows, D], e.g. GloVe or CLIP text features,
      symnet.md §8); None = the packaged word2vec table, checked against its SHA-256.
      A custom file that is byte-identical to the *other* dataset's table is rejected.

  Returns:
    float32 ``[21 | 81, D]`` read-only array, row = original class id.

  Raises:
    AssetError: missing / corrupted file, table of the wrong dataset, wrong row count.
  """
  return _load(canonical_dataset(dataset), None if path is None else os.fspath(path))


def check_class_ids(
  class_ids: Iterable[int] | np.ndarray, dataset: str, num_rows: int | None = None
) -> None:
  """Raises `AssetError` when a class id cannot index the dataset's embedding table.

  Args:
    class_ids: original dataset class ids (1..20 PASCAL, 1..80 COCO; 0 = background is
      a valid row but not an episode class).
    dataset: the table's dataset.
    num_rows: rows of the table (default: the dataset's 21 / 81).
  """
  ids = np.asarray(class_ids).reshape(-1)
  rows = num_class_rows(dataset) if num_rows is None else int(num_rows)
  bad = ids[(ids < 0) | (ids >= rows)]
  if bad.size:
    raise AssetError(
      f"class id(s) {sorted(set(int(i) for i in bad))} outside the "
      f"{canonical_dataset(dataset)} embedding table (rows 0..{rows - 1}, "
      f"episode classes 1..{rows - 1}); episodes must carry the original "
      f"dataset class id in 'class_id' (not the fold-local index), and the "
      f"model's dataset must match the data"
    )


__all__ = [
  "AssetError",
  "EmbeddingTable",
  "WORD2VEC",
  "ASSET_DIR",
  "load_class_embeddings",
  "check_class_ids",
  "num_class_rows",
  "sha256_file",
  "canonical_dataset",
]
