"""Segmentation losses with the references' PyTorch semantics.

Models build their ``loss_fn(outputs, episode)`` from these pieces:

* `cross_entropy`: ``F.cross_entropy(logits, target, ignore_index=255)`` —
  softmax CE averaged over the non-ignored pixels of the whole batch (not a mean
  of per-image means). All pixels ignored gives 0 (torch gives NaN; a 0 keeps a
  training run alive on an all-ignore crop and has zero gradient).
* `weighted_dice_loss`: SCCAN's / CyCTR's ``weighted_dice_loss`` (sccan.md §5):
  independent sigmoid per channel, targets ``[y == 0, y == 1]`` (255 is 0 in both),
  ``1 - 2 Σ(T·P) / max(Σ P² + Σ T², eps)`` per image and channel, summed over
  channels and divided by the batch size (``reduction="sum"``). Ignore pixels
  stay in the Σ P² term, as in the reference.
* `weighted_sum`: ``Σ w_i · L_i`` plus a metrics dict.

Shapes are NHWC: logits ``[B, H, W, C]``, targets ``[B, H, W]`` int (0..C-1, 255 ignore).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

IGNORE = 255


def cross_entropy(
  logits: jax.Array,
  target: jax.Array,
  *,
  ignore_index: int = IGNORE,
  weight: jax.Array | None = None,
) -> jax.Array:
  """Mean softmax cross-entropy over non-ignored pixels (torch ``reduction="mean"``).

  Args:
    logits: [B, H, W, C] (any leading dims, class axis last).
    target: [B, H, W] integer labels in 0..C-1, ``ignore_index`` skipped.
    ignore_index: label value that contributes nothing.
    weight: optional [C] class weights (torch ``weight=``: the mean is divided by
      the summed weights of the counted pixels).

  Returns:
    scalar float32.
  """
  logits = logits.astype(jnp.float32)
  valid = target != ignore_index
  safe = jnp.where(valid, target, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  w = valid.astype(jnp.float32)
  if weight is not None:
    w = w * jnp.asarray(weight, jnp.float32)[safe]
  denom = jnp.sum(w)
  return jnp.where(denom > 0, jnp.sum(nll * w) / jnp.maximum(denom, 1e-12), 0.0)


def weighted_dice_loss(
  logits: jax.Array,
  target: jax.Array,
  *,
  weight: float = 1.0,
  eps: float = 1e-8,
  reduction: str = "sum",
) -> jax.Array:
  """SCCAN's weighted Dice loss on 2-channel logits.

  Args:
    logits: [B, H, W, 2] raw scores (channel 0 background, 1 foreground).
    target: [B, H, W] int (0, 1, 255).
    weight: the reference's ``weighted_val``.
    eps: clamp of the denominator.
    reduction: "sum" (Σ over images and channels / B, the reference default),
      "mean" (mean over images and channels) or "none" ([B, 2]).

  Returns:
    scalar (or [B, 2] for reduction="none").
  """
  b = logits.shape[0]
  t = jnp.stack([target == 0, target == 1], axis=-1).astype(jnp.float32)  # [B, H, W, 2]
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  p = p.reshape(b, -1, p.shape[-1])
  t = t.reshape(b, -1, t.shape[-1])
  denom = jnp.sum(p * p, axis=1) + jnp.sum(t * t, axis=1)  # [B, 2]
  loss = 1.0 - 2.0 * jnp.sum(t * p, axis=1) / jnp.maximum(denom, eps)
  loss = loss * weight
  if reduction == "sum":
    return jnp.sum(loss) / b
  if reduction == "mean":
    return jnp.mean(loss)
  if reduction == "none":
    return loss
  raise ValueError(f"unknown reduction {reduction!r}; use 'sum', 'mean' or 'none'")


def mean_of(terms: Sequence[jax.Array]) -> jax.Array:
  """``(t_0 + t_1 + ...) / n`` added left to right, as Python's ``sum(terms) / len(terms)``
  the official losses use (bit for bit); ``terms`` is not empty."""
  if not terms:
    raise ValueError("mean_of needs at least one term")
  return functools.reduce(operator.add, terms) / len(terms)


def weighted_sum(
  terms: Mapping[str, jax.Array],
  weights: Mapping[str, float] | None = None,
  *,
  reported: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``Σ w_name · terms[name]`` (weights default to 1) and {name: term, "loss": total}.

  Terms whose weight is 0 are reported but do not enter the total; ``reported`` adds
  metrics that are only logged (e.g. the individual calls inside a term, `parts`).
  """
  weights = dict(weights or {})
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, value in terms.items():
    w = float(weights.get(name, 1.0))
    metrics[name] = value
    if w:
      total = total + w * value
  for name, value in (reported or {}).items():
    metrics[name] = jax.lax.stop_gradient(value)
  metrics["loss"] = total
  return total, metrics


def parts(prefix: str, values: Sequence[jax.Array]) -> dict[str, jax.Array]:
  """``{prefix0: values[0], prefix1: ...}``: the loss calls inside one term, for logging
  (and for the train-step fixtures' ``out_loss_part_*``)."""
  return {f"{prefix}{i}": v for i, v in enumerate(values)}


__all__ = ["cross_entropy", "weighted_dice_loss", "weighted_sum", "parts", "IGNORE"]
