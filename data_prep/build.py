"""Build PASCAL-5i / COCO-20i and the cross-domain test sets as TFDS array_record datasets plus
the fss index and build report.

  python -m data_prep.build --dataset pascal5i --manual_dir ~/data/VOC2012 --data_dir ~/tensorflow_datasets
  python -m data_prep.build --dataset coco20i --manual_dir ~/data/coco2014 --data_dir ~/tensorflow_datasets
  python -m data_prep.build --dataset isic2018 --manual_dir ~/data/ISIC --data_dir ~/tensorflow_datasets
  python -m data_prep.build --dataset coco20i --data_dir ~/tensorflow_datasets --verify

(datasets: ``pascal5i``, ``coco20i`` and the cross-domain test sets ``fss1000``,
``deepglobe``, ``isic2018``, ``chest_xray`` of `data_prep.cross_domain`) writes
``<data_dir>/<dataset>/1.0.0/`` as `fss_jax.data.source` reads it: the TFDS files
(records in list order), ``fss_index_<split>.npz`` for each split (train, val;
FSS-1000 train, val, test; the other cross-domain sets test only; derived from the
records as TFDS reads them back, checked against the list order),
``fss_build_report.json`` (options, counts per split, skipped files and why, the label
encoding, cross-domain records whose mask is empty, size and sha256 of every record
file) and ``fss_verified.json`` (the stamp that lets `fss_jax.data.source` skip
re-hashing untouched files). ``--verify``
re-hashes every record file of a built dataset against the report.

Safety:
* Everything is built in ``<data_dir>/<dataset>/incomplete.build-<pid>-<tag>.1.0.0/``;
  the report (the completeness marker) is written last, then the finished
  folder is renamed into place. An interrupted build therefore never leaves a
  dataset that looks complete; the next build removes the leftovers of dead
  builds.
* A complete build (dataset_info.json + every split's index file + a report saying
  ``complete``, record files of the sizes it lists) makes a rerun a no-op;
  ``--overwrite`` rebuilds and replaces the old dataset only after the new one
  is finished.
* Raw-data problems stop the build before anything is written, with a message
  that shows the expected layout (`data_prep.raw.RawDataError`); corrupt
  images/labels (every file is decoded fully: libjpeg's corrupt-data warnings,
  PNG chunk CRCs) are skipped, logged and listed in the report by file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import pathlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from data_prep import raw
from fss_jax import io as fss_io
from fss_jax.data import source

log = logging.getLogger(__name__)

DATASETS = {
  "pascal5i": ("data_prep.pascal5i", "Pascal5i"),
  "coco20i": ("data_prep.coco20i", "Coco20i"),
  "fss1000": ("data_prep.fss1000", "Fss1000"),
  "deepglobe": ("data_prep.deepglobe", "Deepglobe"),
  "isic2018": ("data_prep.isic2018", "Isic2018"),
  "chest_xray": ("data_prep.chest_xray", "ChestXray"),
}
# 2: adds "record_files" {name: {"size", "sha256"}}.
REPORT_FORMAT = 2
_STAGING_PREFIX = "incomplete.build-"
_READ_CHUNK = 256


class BuildError(RuntimeError):
  """The build cannot proceed (existing data in the way, inconsistent output); the message says what to do."""


def builder_class(dataset: str):
  """The TFDS builder class of ``dataset`` (a key of `DATASETS`)."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
  module, name = DATASETS[dataset]
  return getattr(importlib.import_module(module), name)


def _missing_parts(path: pathlib.Path, record_sizes: bool = True) -> list[str]:
  """What a complete build at ``path`` lacks (empty list: complete).

  Args:
    path: the dataset folder ``<data_dir>/<dataset>/<version>`` (its splits: `raw.DATASET_SPLITS`).
    record_sizes: also require record files of the sizes the report lists (cheap; `verify` hashes them).
  """
  split_names = raw.DATASET_SPLITS.get(path.parent.name, raw.SPLITS)
  missing = [
    n
    for n in ["dataset_info.json"] + [source.index_filename(s) for s in split_names]
    if not (path / n).is_file()
  ]
  report = path / source.REPORT_FILE
  if not report.is_file():
    missing.append(source.REPORT_FILE)
  else:
    try:
      content = json.loads(report.read_text())
    except ValueError:
      return missing + [f"a readable {source.REPORT_FILE}"]
    if not content.get("complete"):
      missing.append(f"{source.REPORT_FILE} saying complete")
    files = content.get("record_files") or {}
    if record_sizes:
      missing += [
        f"intact record files ({p})"
        for p in source.check_record_files(path, files, sorted(files), checksum="never")
      ]
  return missing


def is_complete(data_dir: str | os.PathLike, dataset: str) -> bool:
  """True when ``<data_dir>/<dataset>/1.0.0`` holds a finished build of this tool."""
  path = source.dataset_dir(data_dir, dataset)
  return path.is_dir() and not _missing_parts(path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_staging(parent: pathlib.Path) -> None:
  """Deletes the staging folders of builds whose process is gone (interrupted builds)."""
  if not parent.is_dir():
    return
  for d in parent.glob(f"{_STAGING_PREFIX}*"):
    try:
      pid = int(d.name[len(_STAGING_PREFIX) :].split("-")[0])
    except ValueError:
      continue
    if pid != os.getpid() and not _pid_alive(pid):
      log.info("removing the leftovers of an interrupted build: %s", d)
      shutil.rmtree(d, ignore_errors=True)


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  fss_io.atomic_write(path, json.dumps(obj, indent=1) + "\n")


def index_from_records(path: pathlib.Path, split: str) -> source.DatasetIndex:
  """Reads the split's records back through TFDS (reading order) -> `source.DatasetIndex`."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(os.fspath(path))
  records = builder.as_data_source(
    split, decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
  )
  n = len(records)
  ids, hs, ws, cps, igs = [], [], [], [], []
  for start in range(0, n, _READ_CHUNK):
    for rec in records.__getitems__(list(range(start, min(n, start + _READ_CHUNK)))):
      iid = rec["image_id"]
      ids.append(iid.decode("utf-8") if isinstance(iid, bytes) else str(iid))
      hs.append(int(rec["height"]))
      ws.append(int(rec["width"]))
      cps.append(np.asarray(rec["class_pixels"], np.int64))
      igs.append(int(rec["ignore_pixels"]))
  c1 = builder.info.features["class_pixels"].shape[0]
  return source.DatasetIndex(
    image_ids=np.asarray(ids, dtype=str) if ids else np.zeros((0,), "<U1"),
    heights=np.asarray(hs, np.int32),
    widths=np.asarray(ws, np.int32),
    class_pixels=np.stack(cps) if cps else np.zeros((0, c1), np.int64),
    ignore_pixels=np.asarray(igs, np.int64),
  )


def record_file_names(path: pathlib.Path) -> list[str]:
  """The array_record files of every split of the TFDS dataset at ``path``."""
  import tensorflow_datasets as tfds

  splits = tfds.builder_from_directory(os.fspath(path)).info.splits
  return sorted(name for s in splits.values() for name in s.filenames)


def build(
  dataset: str,
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  *,
  overwrite: bool = False,
  num_workers: int = 0,
  progress: bool = True,
) -> epath.Path:
  """Builds ``dataset`` from the raw files in ``manual_dir`` into ``data_dir`` (local or gs://).

  A ``gs://`` ``data_dir`` gets a local build (in a temporary folder) uploaded file by file,
  the record files first and the build report (the completeness marker) last: an upload that
  stops part-way leaves a folder every reader and a rerun call incomplete.
  """
  if not fss_io.is_remote(data_dir):
    return _build_local(
      dataset, manual_dir, data_dir, overwrite=overwrite, num_workers=num_workers, progress=progress
    )
  final = source.dataset_dir(data_dir, dataset)
  if final.exists() and not overwrite:
    missing = _missing_parts(final)
    if not missing:
      log.info("%s is already built in %s (use --overwrite to rebuild)", dataset, final)
      return final
    raise BuildError(
      f"{final} exists but is not a complete build of this tool (it lacks {', '.join(missing)}). "
      f"Rerun with --overwrite to replace it."
    )
  with tempfile.TemporaryDirectory(prefix="fss_jax-build-") as tmp:
    built = _build_local(dataset, manual_dir, tmp, num_workers=num_workers, progress=progress)
    _upload_build(epath.Path(built), final)
  return final


def _upload_build(built: epath.Path, final: epath.Path) -> None:
  """Copies a finished local build to ``final`` in a store: every file but the report, the
  verified stamp for the uploaded record files, then the report (completeness marker)."""
  if final.exists():  # --overwrite: the old build stops being complete before it is replaced
    (final / source.REPORT_FILE).unlink(missing_ok=True)
    final.rmtree()
  report = json.loads((built / source.REPORT_FILE).read_text())
  skip = {source.REPORT_FILE, source.VERIFIED_FILE}
  names = sorted(p.name for p in built.iterdir() if p.is_file() and p.name not in skip)
  for i, name in enumerate(names):
    log.info("uploading %s (%d/%d) to %s", name, i + 1, len(names), final)
    fss_io.copy_file(built / name, final / name)
  source.stamp_verified(final, report.get("record_files") or {})
  fss_io.copy_file(built / source.REPORT_FILE, final / source.REPORT_FILE)


def _build_local(
  dataset: str,
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  *,
  overwrite: bool = False,
  num_workers: int = 0,
  progress: bool = True,
) -> pathlib.Path:
  """Builds ``dataset`` from the raw files in ``manual_dir`` into ``data_dir``.

  Args:
    dataset: a key of `DATASETS` ("pascal5i", "coco20i", "fss1000", "deepglobe", "isic2018", "chest_xray").
    manual_dir: the raw data (layouts in `data_prep.raw.VOC_LAYOUT` / `COCO_LAYOUT`,
      `data_prep.cross_domain.LAYOUTS`).
    data_dir: TFDS data dir; the dataset lands in ``<data_dir>/<dataset>/1.0.0``.
    overwrite: rebuild even when a complete build exists (replaced only on success).
    num_workers: >1 decodes images in that many processes (record order unchanged).
    progress: show progress bars.

  Returns:
    The dataset folder ``<data_dir>/<dataset>/1.0.0``.

  Raises:
    raw.RawDataError: missing or malformed raw data (nothing is written).
    BuildError: an incomplete dataset is in the way (without ``overwrite``) or
      the written records disagree with the lists.
  """
  import tensorflow_datasets as tfds

  t0 = time.time()
  cls = builder_class(dataset)
  final = source.dataset_dir(data_dir, dataset)
  if final.exists() and not overwrite:
    missing = _missing_parts(final)
    if not missing:
      log.info("%s is already built in %s (use --overwrite to rebuild)", dataset, final)
      return final
    raise BuildError(
      f"{final} exists but is not a complete build of this tool (it lacks {', '.join(missing)}). "
      f"Rerun with --overwrite to replace it, or move it away."
    )

  if fss_io.is_remote(manual_dir):
    raise raw.RawDataError(
      f"--manual_dir {os.fspath(manual_dir)}: the raw download is read from a local "
      f"folder (copy it first, e.g. `gsutil -m cp -r {os.fspath(manual_dir)} .`); "
      f"--data_dir may be gs://"
    )
  manual_dir = pathlib.Path(os.path.expanduser(manual_dir)).resolve()
  plan = raw.plan(dataset, manual_dir)  # raises before anything is written

  parent = final.parent
  parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_staging(parent)
  staging = (
    parent / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.{source.DATASET_VERSION}"
  )
  try:
    builder = cls(data_dir=os.fspath(staging), file_format="array_record")
    builder.fss_manual_dir = os.fspath(manual_dir)
    builder.fss_plan = plan
    builder.fss_num_workers = num_workers
    builder.fss_progress = progress
    tfds.disable_progress_bar()  # ours (per split, per image) replaces TFDS's
    builder.download_and_prepare(
      download_dir=os.fspath(staging / "downloads"),
      download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir), compute_stats=tfds.download.ComputeStatsMode.SKIP
      ),
    )
    built = pathlib.Path(builder.data_dir)
    skipped = builder.fss_skipped

    split_counts, empty_masks = {}, {}
    for split, entries in plan.splits.items():
      index = index_from_records(built, split)
      skipped_ids = {s.image_id for s in skipped[split]}
      expected = [e.image_id for e in entries if e.image_id not in skipped_ids]
      if index.image_ids.tolist() != expected:
        raise BuildError(
          f"{dataset}/{split}: TFDS reads the records in a different order than the list "
          f"(first records {index.image_ids[:5].tolist()} vs {expected[:5]}); this is a bug."
        )
      if not len(index):
        raise raw.RawDataError(
          f"{dataset}/{split}: every listed image was skipped as corrupt; see the log."
        )
      source.save_index(built / source.index_filename(split), index, dataset=dataset, split=split)
      split_counts[split] = {
        "listed": len(entries),
        "records": len(index),
        "skipped": len(skipped[split]),
      }
      if raw.LABEL_ENCODING[dataset] == "binary":
        empty = index.image_ids[index.class_pixels[:, 1:].sum(1) == 0].tolist()
        if empty:
          empty_masks[split] = empty
    record_files = source.checksum_record_files(built, record_file_names(built))

    report = {
      "format": REPORT_FORMAT,
      "dataset": dataset,
      "version": source.DATASET_VERSION,
      "num_classes": plan.num_classes,
      "manual_dir": os.fspath(manual_dir),
      "raw_root": plan.root,
      "sources": plan.sources,
      "splits": split_counts,
      "label_encoding": raw.LABEL_ENCODING[dataset],
      # Cross-domain records whose binarised mask is empty (kept: PATNet draws them like the others).
      "empty_masks": empty_masks,
      "record_files": record_files,
      "skipped": [
        dict(split=split, image_id=s.image_id, file=s.file, reason=s.reason)
        for split in plan.splits
        for s in skipped[split]
      ],
      # Only when some split's labels were rendered from an instances json (§3.2 choices).
      "coco_label_rendering": (
        {"draw_crowd": raw.COCO_DRAW_CROWD, "paint_order": raw.COCO_PAINT_ORDER}
        if any("pycocotools" in v for v in plan.sources.values())
        else None
      ),
      "tfds_version": tfds.__version__,
      "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "elapsed_s": round(time.time() - t0, 2),
      "complete": True,  # completeness marker: the report is the last file written
    }
    _write_json_atomic(built / source.REPORT_FILE, report)

    old = None
    if final.exists():  # --overwrite: move the old build aside only now that the new one is done
      old = parent / f"{_STAGING_PREFIX}{os.getpid()}-replaced.{source.DATASET_VERSION}"
      os.rename(final, old)
    os.rename(built, final)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)

  for split, c in split_counts.items():
    log.info(
      "%s/%s: %d records (%d listed, %d skipped)",
      dataset,
      split,
      c["records"],
      c["listed"],
      c["skipped"],
    )
  for s in report["skipped"]:
    log.warning("skipped %s/%s %s: %s", s["split"], s["image_id"], s["file"], s["reason"])
  for split, ids in empty_masks.items():
    log.warning(
      "%s/%s: %d records have an empty mask (no pixel >= %d): %s",
      dataset,
      split,
      len(ids),
      raw.BINARY_MASK_THRESHOLD,
      ", ".join(ids[:10]),
    )
  return final


def verify(data_dir: str | os.PathLike, dataset: str) -> dict[str, int]:
  """Re-hashes every record file of a built dataset and compares it with the build report.

  Files that match are stamped as verified (`source.VERIFIED_FILE`), so the
  next `source.open_split` skips them.

  Returns:
    {"files": number checked, "bytes": their total size}.

  Raises:
    source.DatasetNotReadyError: not built, or built before checksums were
      recorded. source.RecordFileError: files missing, truncated or not
      matching their sha256 (all named), with the rebuild command.
  """
  path = source.dataset_dir(data_dir, dataset)
  rebuild = f"Rebuild it with:\n  {source.build_command(data_dir, dataset)} --overwrite"
  if not path.is_dir():
    raise source.DatasetNotReadyError(
      f"{dataset} is not built in {data_dir} ({path} not found).\nBuild it "
      f"with:\n  {source.build_command(data_dir, dataset)}"
    )
  missing = _missing_parts(path, record_sizes=False)  # sizes: below, with the checksums
  if missing:
    raise source.RecordFileError(
      f"{path} is not a complete build (it lacks {', '.join(missing)}).\n{rebuild}"
    )
  expected = json.loads((path / source.REPORT_FILE).read_text()).get("record_files")
  if not expected:
    raise source.DatasetNotReadyError(
      f"{path / source.REPORT_FILE} records no checksums (built by an older "
      f"version); nothing to verify against.\n{rebuild}"
    )
  names = sorted(set(record_file_names(path)) | set(expected))
  problems = source.check_record_files(path, expected, names, checksum="always")
  if problems:
    raise source.RecordFileError("; ".join(problems) + f".\n{rebuild}")
  return {"files": len(names), "bytes": sum(e["size"] for e in expected.values())}


def _verify_main(args) -> int:
  t0 = time.time()
  try:
    result = verify(args.data_dir, args.dataset)
  except source.DatasetNotReadyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(
    f"{args.dataset} in {source.dataset_dir(args.data_dir, args.dataset)}: all {result['files']} record files "
    f"({result['bytes'] / 1e6:.1f} MB) match their sha256 ({time.time() - t0:.1f} s)"
  )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from data_prep import cross_domain

  layouts = {"pascal5i": raw.VOC_LAYOUT, "coco20i": raw.COCO_LAYOUT, **cross_domain.LAYOUTS}
  p = argparse.ArgumentParser(
    prog="python -m data_prep.build",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Raw layouts:\n" + "\n".join(f"{d}\n{l}" for d, l in layouts.items()),
  )
  p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
  p.add_argument(
    "--manual_dir", help="folder with the raw files (see the layouts below); not with --verify"
  )
  p.add_argument(
    "--data_dir",
    default=os.path.expanduser("~/tensorflow_datasets"),
    help="TFDS data dir (default ~/tensorflow_datasets)",
  )
  p.add_argument("--overwrite", action="store_true", help="rebuild and replace an existing build")
  p.add_argument(
    "--num_workers",
    type=int,
    default=min(8, os.cpu_count() or 1),
    help="image decoding processes (default: min(8, CPUs)); 0 or 1 decodes in-process",
  )
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument(
    "--verify",
    action="store_true",
    help="build nothing: re-hash every record file of the built dataset against its report",
  )
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if args.verify:
    return _verify_main(args)
  if args.manual_dir is None:
    p.error("--manual_dir is required (except with --verify)")
  try:
    path = build(
      args.dataset,
      args.manual_dir,
      args.data_dir,
      overwrite=args.overwrite,
      num_workers=args.num_workers,
      progress=not args.no_progress,
    )
  except (raw.RawDataError, BuildError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  report = json.loads((path / source.REPORT_FILE).read_text())
  counts = ", ".join(
    f"{s} {c['records']} records ({c['skipped']} skipped)" for s, c in report["splits"].items()
  )
  print(f"{args.dataset} ready in {path}: {counts}; report {path / source.REPORT_FILE}")
  if report["skipped"]:
    print(
      f"{len(report['skipped'])} corrupt images/labels were skipped (named in the report and the log); "
      f"replace them from the original archives and rebuild with --overwrite to include them"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
