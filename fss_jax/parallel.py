"""Device mesh, shardings and multi-process set-up: one code path from 1 CPU to a pod.

* `initialize(config.distributed)` calls ``jax.distributed.initialize`` when the
  run is multi-process (before anything touches a device). On CPU it selects
  the gloo collectives so that a multi-process CPU run (the tests) works.
* `make_mesh(config.mesh)` builds ``Mesh(('data', 'model'))`` with
  ``AxisType.Auto`` (flax linen code stays unannotated; XLA propagates).
  ``data = -1`` takes every device not used by the model axis.
* The train state is replicated (`replicated`); episode batches are split over
  the data axis (`batch_sharding`). The global batch size is
  ``config.batch_size``; every process feeds ``batch_size / process_count``
  episodes (`local_batch_size`) and `to_global` assembles the global arrays
  with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"

_initialized = False


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if cfg is None:
    return default
  try:
    value = cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def initialize(dist_cfg: Any) -> None:
  """Starts multi-process JAX when ``dist_cfg.mode`` asks for it.

  Args:
    dist_cfg: ``config.distributed`` with ``mode`` in {"off", "auto", "manual"}:
      "auto" lets JAX detect the cluster (Cloud TPU, SLURM, ...); "manual" uses
      ``coordinator_address``, ``num_processes``, ``process_id`` (and optional
      ``local_device_ids``). ``cpu_collectives`` ("gloo") is set for CPU runs.
  """
  global _initialized
  mode = _get(dist_cfg, "mode", "off")
  if mode == "off" or _initialized:
    return
  collectives = _get(dist_cfg, "cpu_collectives", "gloo")
  if collectives:
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  if mode == "auto":
    jax.distributed.initialize()
  elif mode == "manual":
    missing = [
      k
      for k in ("coordinator_address", "num_processes", "process_id")
      if _get(dist_cfg, k) is None or _get(dist_cfg, k) == ""
    ]
    if missing:
      raise ValueError(
        f"config.distributed.mode='manual' needs {', '.join(missing)} "
        f"(e.g. --config.distributed.coordinator_address=10.0.0.1:1234)"
      )
    local = _get(dist_cfg, "local_device_ids")
    jax.distributed.initialize(
      coordinator_address=dist_cfg.coordinator_address,
      num_processes=int(dist_cfg.num_processes),
      process_id=int(dist_cfg.process_id),
      local_device_ids=list(local) if local not in (None, ()) else None,
    )
  else:
    raise ValueError(f"config.distributed.mode must be 'off', 'auto' or 'manual', got {mode!r}")
  _initialized = True
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """``Mesh(('data', 'model'))`` from ``config.mesh`` (``data``, ``model``; -1 = the rest).

  Args:
    mesh_cfg: has ``data`` and ``model`` sizes (defaults -1 and 1) and optionally
      ``num_devices`` (0 = every device; N = the first N devices, single-process only,
      e.g. to debug on one GPU of a machine).
    devices: the devices to use (default: all global devices).

  Raises:
    ValueError: the sizes do not multiply to the device count.
  """
  devices = list(devices) if devices is not None else jax.devices()
  num = int(_get(mesh_cfg, "num_devices", 0))
  if num:
    if jax.process_count() > 1 and num != len(devices):
      raise ValueError("config.mesh.num_devices only works in single-process runs; leave it at 0")
    if not 0 < num <= len(devices):
      raise ValueError(f"config.mesh.num_devices={num} but {len(devices)} devices are available")
    devices = devices[:num]
  n = len(devices)
  data = int(_get(mesh_cfg, "data", -1))
  model = int(_get(mesh_cfg, "model", 1))
  if model <= 0:
    raise ValueError(f"config.mesh.model must be >= 1, got {model}")
  if data == -1:
    if n % model:
      raise ValueError(f"config.mesh.model={model} does not divide the {n} devices")
    data = n // model
  if data * model != n:
    raise ValueError(
      f"config.mesh data={data} x model={model} = {data * model} devices, but "
      f"{n} are available; use data=-1 to take all of them"
    )
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=axis_types, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the full array (train state, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (episode) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA))


def data_size(mesh: Mesh) -> int:
  return mesh.shape[DATA]


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Episodes this process feeds per step; checks divisibility.

  Raises:
    ValueError: ``global_batch_size`` is not a multiple of the data axis or of
      the process count.
  """
  d, p = data_size(mesh), jax.process_count()
  if global_batch_size % d or global_batch_size % p:
    raise ValueError(
      f"batch size {global_batch_size} must be a multiple of the data-parallel size "
      f"{d} (mesh data axis) and of the {p} processes; change config.batch_size, "
      f"or use fewer devices (config.mesh.num_devices, single process)"
    )
  return global_batch_size // p


def to_global(local: Any, mesh: Mesh) -> Any:
  """Per-process numpy batch (pytree) -> global ``jax.Array``s sharded over 'data'.

  Each leaf's leading axis holds this process's episodes; the global leading
  size is ``process_count`` times larger.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
  )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host numpy pytree (the same on every process) -> fully replicated global arrays."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def to_host(x: Any) -> Any:
  """Fully-replicated or addressable global arrays -> numpy (every process gets all of it)."""

  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if a.sharding.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(get, x)


__all__ = [
  "initialize",
  "make_mesh",
  "replicated",
  "batch_sharding",
  "local_batch_size",
  "to_global",
  "replicate",
  "to_host",
  "data_size",
  "DATA",
  "MODEL",
]
