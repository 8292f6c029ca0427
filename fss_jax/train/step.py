"""The pure train and eval steps, and their jit wrappers with NamedSharding.

``train_step(state, batch, *, model, loss_fn, tx)`` and ``eval_step(state, batch,
*, model, score)`` are pure functions of arrays; `make_train_step` /
`make_eval_step` jit them once with the state replicated and the batch split
over the mesh's data axis (``donate_argnums=0`` for the state). The same code
runs on 1 CPU, 8 GPUs or a pod.

Mixed precision: ``compute_dtype="bfloat16"`` runs the model on bfloat16 inputs
with float32 parameters, statistics and losses (`fss_jax.train.precision`);
"float32" (the default) applies the model unchanged.

Randomness: step ``s`` uses ``fold_in(state.rng, s)`` as the ``dropout`` rng, so
a resumed run draws exactly what an uninterrupted run draws.

Evaluation scores at the original label resolution without recompiling: the
episode carries its original label padded to a fixed bucket
(``label_original [B, Hb, Wb]``, 255 padding) and its true size
(``label_size [B, 2]``); the logits are resized with a per-episode
align_corners=True bilinear operator built from that size
(`fss_jax.eval.metrics.episode_counts`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fss_jax import parallel
from fss_jax.eval import metrics as metrics_lib
from fss_jax.train import precision
from fss_jax.train.state import TrainState

LossFn = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array]], tuple[jax.Array, dict]]


def widen_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch with its uint8 entries (the loaders' labels: 0/1/255, N-way 0..N/255) as
  int32, cast on the device at the start of every step; every other entry as it is."""
  return {
    k: v.astype(jnp.int32) if getattr(v, "dtype", None) == jnp.uint8 else v
    for k, v in batch.items()
  }


def _stop_frozen(params: Any, trainable: Any | None) -> Any:
  if trainable is None:
    return params
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def loss_and_grads(
  params: Any,
  batch_stats: Any,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  model,
  loss_fn: LossFn,
  trainable: Any | None = None,
  compute_dtype: str = "float32",
):
  """Forward (train=True) + backward, the forward in ``compute_dtype``.

  Returns:
    ((loss, (metrics, new_batch_stats)), grads); grads of frozen leaves are 0.
  """
  has_bs = bool(batch_stats)

  def fn(p):
    variables = {"params": _stop_frozen(p, trainable)}
    if has_bs:
      variables["batch_stats"] = batch_stats
      outputs, mutated = precision.apply(
        model,
        variables,
        batch,
        dtype=compute_dtype,
        train=True,
        rngs={"dropout": rng},
        mutable=["batch_stats"],
      )
      new_bs = mutated.get("batch_stats", batch_stats)
    else:
      outputs = precision.apply(
        model, variables, batch, dtype=compute_dtype, train=True, rngs={"dropout": rng}
      )
      new_bs = batch_stats
    loss, aux = loss_fn(outputs, batch)
    return loss, (aux, new_bs)

  return jax.value_and_grad(fn, has_aux=True)(params)


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  trainable: Any | None = None,
  compute_dtype: str = "float32",
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step.

  Args:
    state: the `TrainState`.
    batch: an Episode dict, global batch [B, ...].
    model: flax module (``__call__(episode, *, train)``).
    loss_fn: ``(outputs, episode) -> (loss, {name: scalar})``.
    tx: the optax transformation.
    trainable: params-shaped bool tree; False leaves get no gradient (frozen).
    compute_dtype: "float32" or "bfloat16" (`fss_jax.train.precision`).

  Returns:
    (new state, {"loss", "grad_norm", "params_finite", <loss_fn metrics>}) — scalars.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, (aux, new_bs)), grads = loss_and_grads(
    state.params,
    state.batch_stats,
    widen_labels(batch),
    rng,
    model=model,
    loss_fn=loss_fn,
    trainable=trainable,
    compute_dtype=compute_dtype,
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()}
  out["loss"] = jnp.asarray(loss, jnp.float32)
  out["grad_norm"] = optax.global_norm(grads)
  # 1.0 when every updated parameter is finite: a finite loss computed BEFORE this update
  # does not make the state after it good (lr too large, a huge gradient); the loop stops
  # before saving such a state.
  out["params_finite"] = jnp.asarray(
    jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])), jnp.float32
  )
  new_state = state.replace(  # type: ignore[attr-defined]  # flax.struct stub lacks .replace
    step=state.step + 1, params=params, batch_stats=new_bs, opt_state=opt_state
  )
  return new_state, out


def eval_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model,
  score: str | metrics_lib.Scoring = "pad_square",
  compute_dtype: str = "float32",
) -> dict[str, jax.Array]:
  """Per-episode intersection / union at the original label resolution.

  Args:
    state: the `TrainState` (params / batch_stats used, train=False).
    batch: an eval Episode dict with ``label_original [B, Hb, Wb]`` and ``label_size [B, 2]``.
    score: "pad_square" (PFENet/BAM/SCCAN: logits -> L×L, L = max(H, W); data_protocol.md
      §9.1) or "original" (HDMNet: logits -> H×W; §9.2).
    compute_dtype: the forward's dtype; the logits are scored in float32.

  Returns:
    {"intersection", "union", "target"}: int32 [B, C] per bin 0..C-1 (C = logits
    channels), ignore pixels and padding excluded; plus "class_id" and "valid"
    ([B], ones when the batch has none) passed through for the host accumulator.
  """
  batch = widen_labels(batch)
  episode = {k: v for k, v in batch.items() if k != "valid"}
  outputs = precision.apply(model, state.variables(), episode, dtype=compute_dtype, train=False)
  out = metrics_lib.episode_counts(
    outputs["logits"], batch["label_original"], batch["label_size"], score=score
  )
  b = batch["label_original"].shape[0]
  out["class_id"] = batch["class_id"]
  out["valid"] = batch["valid"] if "valid" in batch else jnp.ones((b,), jnp.int32)
  return out


def predict_step(
  state: TrainState, batch: Mapping[str, jax.Array], *, model, compute_dtype: str = "float32"
) -> jax.Array:
  """Prediction at the model's output resolution: int32 [B, h, w] (argmax of the logits)."""
  batch = widen_labels(batch)
  outputs = precision.apply(model, state.variables(), batch, dtype=compute_dtype, train=False)
  return jnp.argmax(outputs["logits"], axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# jit wrappers
# ---------------------------------------------------------------------------


def jit_train_step(fn: Callable, mesh) -> Callable:
  """jit ``fn(state, batch) -> (state, metrics)``: state replicated + donated, batch on 'data'."""
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=(0,))


def jit_eval_step(fn: Callable, mesh) -> Callable:
  """jit ``fn(state, batch) -> per-episode arrays``: outputs stay split over 'data'."""
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(repl, data), out_shardings=data)


def make_train_step(
  *, model, loss_fn: LossFn, tx, mesh, trainable: Any | None = None, compute_dtype: str = "float32"
) -> Callable:
  precision.compute_dtype(compute_dtype)  # an unsupported dtype fails here, not inside jit
  return jit_train_step(
    functools.partial(
      train_step,
      model=model,
      loss_fn=loss_fn,
      tx=tx,
      trainable=trainable,
      compute_dtype=compute_dtype,
    ),
    mesh,
  )


def make_eval_step(
  *, model, mesh, score: str | metrics_lib.Scoring = "pad_square", compute_dtype: str = "float32"
) -> Callable:
  precision.compute_dtype(compute_dtype)
  return jit_eval_step(
    functools.partial(eval_step, model=model, score=score, compute_dtype=compute_dtype), mesh
  )


def make_predict_step(*, model, mesh, compute_dtype: str = "float32") -> Callable:
  precision.compute_dtype(compute_dtype)
  return jit_eval_step(
    functools.partial(predict_step, model=model, compute_dtype=compute_dtype), mesh
  )


__all__ = [
  "widen_labels",
  "train_step",
  "eval_step",
  "predict_step",
  "loss_and_grads",
  "make_train_step",
  "make_eval_step",
  "make_predict_step",
  "jit_train_step",
  "jit_eval_step",
]
