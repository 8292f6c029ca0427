"""What a training or evaluation run sets up around its loop (``--mode train``:
`fss_jax.train.loop`; ``--mode eval``: `fss_jax.eval.run`).

* `build_model` (with `check_input_sizes`) and `compute_dtype_name`: the model and the compute
  dtype from the config, checked before anything is built;
* `log_devices`, `metric_writer` and `write_episode_images`: the run's hardware line, its clu
  writer (TensorBoard + log) and the episode panels;
* `quiet_library_logs`: called by the entry points before a run, it keeps orbax's, jax's,
  TFDS's and TensorFlow's chatter off the console (the debug log keeps every record).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from fss_jax import io as fss_io
from fss_jax import parallel
from fss_jax.eval import evaluate as evaluate_lib
from fss_jax.models import registry
from fss_jax.train import checkpointing as ckpt_lib
from fss_jax.train import precision
from fss_jax.train import workdir as workdir_lib


class _QuietLibraries:
  """absl log filter: orbax's INFO records (several per checkpoint), its notes on read-only
  managers (used to read checkpoints for evaluation) and its tracebacks of a failed save, with
  asyncio's reports of orbax's failed write tasks (the loop reports that failure in one line),
  jax's INFO notes on the platforms it probes ("Unable to initialize backend 'tpu'") and
  TFDS's ("Load dataset info from ...") are dropped from the console; log.txt keeps every
  record."""

  def filter(self, record) -> bool:
    if record.name == "asyncio":  # "Task exception was never retrieved" for each write
      return "/orbax/" not in record.getMessage()
    if record.name.startswith("jax._src.xla_bridge") and record.levelno <= 20:
      return False  # "Unable to initialize backend 'tpu'": jax probing platforms
    if "/tensorflow_datasets/" in record.pathname and record.levelno <= 20:
      return False  # "Load dataset info from ...", each time a split is opened
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno <= 20 or record.exc_info:
      return False
    return record.levelno > 30 or "read only" not in record.getMessage().replace("_", " ")


def _without_closed_loop_noise(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """A ``sys.unraisablehook`` that drops "Event loop is closed": after a failed save, tensorstore
  calls back into the event loop orbax has closed, once per write still pending."""

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  hook.quiet_closed_loop = True  # type: ignore[attr-defined]  # marks it as installed
  return hook


# What TensorFlow's C++ start-up prints whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21 logs
# through absl before absl's logging is initialised): notes about CPU features, not problems.
_TF_STARTUP_NOTES = (
  "absl::InitializeLog",
  "oneDNN custom operations",
  "cpu_feature_guard",
  "To enable the following instructions",
  "rebuild TensorFlow with",
)


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow (clu's TensorBoard writer and TFDS load it) with its start-up notes
  dropped; any other line it prints still reaches stderr."""
  if "tensorflow" in sys.modules:
    return
  with fss_io.captured_stderr() as lines:
    import tensorflow  # noqa: F401  (imported for its start-up output, captured here)
  rest = [line for line in lines if not any(n in line for n in _TF_STARTUP_NOTES)]
  if rest:
    print("\n".join(rest), file=sys.stderr)


def quiet_library_logs() -> None:
  """Keeps the run's own INFO lines readable (orbax logs every file it renames), a failed
  save to the loop's one line, and the console free of TensorFlow's start-up notes."""
  _import_tensorflow_quietly()
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  if not getattr(sys.unraisablehook, "quiet_closed_loop", False):
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


# ---------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------


def check_input_sizes(config, spec, keys: tuple[str, ...]) -> None:
  """Refuses ``config.data.<key>`` input sizes below the model's minimum (`ModelSpec.min_size`).

  Raises:
    ValueError: naming the model, the size, the minimum and the config key.
  """
  minimum = spec.min_size(ckpt_lib.model_fields(config))
  for key in keys:
    size = int(config.data[key])
    if minimum is not None and size < minimum:
      raise ValueError(
        f"config.data.{key}={size} is below the smallest input model "
        f"{config.model!r} takes ({minimum} px); set --config.data.{key}={minimum} "
        f"or larger"
      )


def build_model(config, sizes: tuple[str, ...] = ()):
  """(ModelSpec, module) of ``config.model`` with ``config.model_fields``; the ``config.data``
  input sizes named in ``sizes`` are checked against the model's minimum first."""
  spec = registry.get(config.model)
  check_input_sizes(config, spec, sizes)
  fields = ckpt_lib.model_fields(config)
  try:
    model = spec.make_model(**fields)
  except TypeError as e:
    raise ValueError(f"config.model_fields do not fit model {config.model!r}: {e}") from None
  return spec, model


def compute_dtype_name(config) -> str:
  """``config.compute_dtype`` (float32 for configs written before the field existed), checked
  here so that a wrong name stops the run before the model and data are built."""
  name = str(config.get("compute_dtype", "float32"))
  precision.compute_dtype(name)
  return name


def log_devices(mesh) -> None:
  """The run's first line about hardware: processes, devices and the mesh over them."""
  d = jax.devices()
  logging.info(
    "%d process(es), %d %s device(s) (%s; %d on this process); mesh %s (%d device(s))",
    jax.process_count(),
    len(d),
    d[0].platform,
    d[0].device_kind,
    jax.local_device_count(),
    dict(mesh.shape),
    mesh.size,
  )


def metric_writer(config, workdir: epath.Path):
  """clu writer of a run: TensorBoard + log on process 0 (``config.tensorboard``), log only
  elsewhere."""
  just_logging = jax.process_index() > 0 or not config.tensorboard
  return workdir_lib.metric_writer(workdir, just_logging=just_logging)


def write_episode_images(
  config, writer, step: int, state, predict_step, batches, mesh, local_batch_size: int
) -> None:
  """Query/support/prediction panels of the first stored test episodes -> TensorBoard.

  Always the first batch of the same stored list, so panels line up across steps.
  Collective (every process calls it); only process 0's writer records images.
  """
  from fss_jax.eval import visualize

  num = int(config.eval.get("num_images", 0))
  if num <= 0 or predict_step is None:
    return
  batch = evaluate_lib.pad_batch(evaluate_lib.model_inputs(next(iter(batches))), local_batch_size)
  inputs = {k: v for k, v in batch.items() if k != "valid"}
  pred = parallel.to_host(predict_step(state, parallel.to_global(inputs, mesh)))
  panels = visualize.panels_from_batch(
    batch, np.asarray(pred)[:local_batch_size], max_panels=num, valid=batch.get("valid")
  )
  visualize.write_image_summaries(writer, step, panels, prefix="val/episode")


__all__ = [
  "build_model",
  "check_input_sizes",
  "compute_dtype_name",
  "log_devices",
  "metric_writer",
  "quiet_library_logs",
  "write_episode_images",
]
