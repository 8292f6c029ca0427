"""A model's frozen image encoder on its own: encode each test image once, reuse it.

At evaluation every parameter is fixed and the test transform is deterministic, so the
part of a model that sees one image at a time (the backbone; a PSPNet base learner's
features) is a pure function of that image. A model whose `ModelSpec.encoder` returns a
`FrozenEncoder` lets `fss_jax.eval.cached` compute those features once per unique
(image, test transform) over all episodes and seeds, and then runs the model's own forward
on episodes that carry them:

  episode["query_features"]    {name: [B, h, w, C]}
  episode["support_features"]  {name: [B, N*K, h, w, C]}  (way-major, as support_images)

The model reads them through `cached_features` in place of running its encoder child;
everything after the encoder is the same code in both cases. The encoder here is the same
module class with the same fields as the model's child ``scope``, applied to that child's
variables, so the cached features are the child's outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

QUERY_FEATURES = "query_features"
SUPPORT_FEATURES = "support_features"


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  """How to run a model's frozen image encoder alone.

  Attributes:
    module: the encoder, built with the fields the model builds its child ``scope`` with.
    scope: the path of that child, ``/``-joined (its variables are ``variables[col][scope]``,
      e.g. ``"ssp/backbone"``); or a tuple of such paths when ``module`` is a wrapper holding
      several of the model's encoders, as its children named by the paths with ``/`` -> ``_``.
    method: the module's method ``(images [N, H, W, 3], train=False) -> {name: [N, h, w, C]}``
      (None: ``__call__``), by name or a function ``(module, images, train)``. A list-valued
      output ``name`` is cached as ``name_0``, ``name_1``, ... (`flatten`).
    keep: the feature names the rest of the model reads (the cache holds only these).
    masked_supports: ``(images [N, H, W, 3], masks [N, H, W]) -> images`` when a support's
      encoder input depends on its mask (HDMNet encodes the image times its foreground
      mask), so support features are cached per (image, class); None: per image. Query
      entries are encoded through it with an all-ones mask (exact: ``x * 1.0 == x``).
  """

  module: Any
  scope: str | tuple[str, ...]
  keep: tuple[str, ...]
  method: str | Callable[..., Any] | None = None
  masked_supports: Callable[[jax.Array, jax.Array], jax.Array] | None = None

  def variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder child's variables ``{col: tree}`` out of the whole model's."""

    def child(tree: Any, path: str) -> Any:
      for part in path.split("/"):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
      return tree

    single = isinstance(self.scope, str)
    paths = (self.scope,) if isinstance(self.scope, str) else self.scope
    if any(child(variables.get("params"), p) is None for p in paths):
      raise ValueError(f"the model's variables have no {self.scope!r} child to encode with")
    out: dict[str, Any] = {}
    for col, tree in variables.items():
      subs = {p: v for p in paths if (v := child(tree, p)) is not None}
      if subs:
        out[col] = subs[paths[0]] if single else {p.replace("/", "_"): v for p, v in subs.items()}
    return out

  def __call__(
    self, variables: Mapping[str, Any], images: jax.Array, masks: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Features ``{name: [N, h, w, C]}`` (only ``keep``) of ``images`` [N, H, W, 3].

    ``variables``: the encoder's own (`variables`). ``masks`` [N, H, W] (0 / 1 / 255; ones
    for queries) feed ``masked_supports``; required when it is set.
    """
    if self.masked_supports is not None:
      if masks is None:
        raise ValueError("this encoder reads support masks: pass masks (ones for queries)")
      images = self.masked_supports(images, masks)
    kw: dict[str, Any] = {"train": False}
    if self.method is not None:
      kw["method"] = self.method
    out = flatten(self.module.apply(variables, images, **kw))
    return {n: jax.lax.stop_gradient(out[n]) for n in self.keep}


def cached_features(
  episode: Mapping[str, Any],
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]] | None:
  """(query ``{name: [B, h, w, C]}``, supports ``{name: [B*N*K, h, w, C]}``, row b*NK + j)
  when the episode carries cached encoder features, else None (run the encoder)."""
  if QUERY_FEATURES not in episode:
    return None
  fq = dict(episode[QUERY_FEATURES])
  fs = {n: v.reshape(-1, *v.shape[2:]) for n, v in episode[SUPPORT_FEATURES].items()}
  return fq, fs


def mask_foreground(images: jax.Array, masks: jax.Array) -> jax.Array:
  """``images`` [N, H, W, C] times the foreground (== 1) of ``masks`` [N, H, W]."""
  return images * (masks == 1).astype(images.dtype)[..., None]


def feature_names(fq: Mapping[str, Any], names: Sequence[str]) -> list[str]:
  """The ``names`` present in ``fq`` (a cached episode carries only the encoder's ``keep``)."""
  return [n for n in names if n in fq]


def flatten(feats: Mapping[str, Any]) -> dict[str, Any]:
  """``{name: array or list of arrays}`` -> ``{name: array}``, the i-th array of a list
  ``name`` as ``name_i`` (the cache holds flat dicts)."""
  out: dict[str, Any] = {}
  for n, v in feats.items():
    out.update({f"{n}_{i}": a for i, a in enumerate(v)} if isinstance(v, (list, tuple)) else {n: v})
  return out


def split_rows(feats: Mapping[str, jax.Array], b: int) -> tuple[dict, dict]:
  """Encoder outputs of ``[queries; supports]`` -> (first ``b`` rows, the rest)."""
  return {n: f[:b] for n, f in feats.items()}, {n: f[b:] for n, f in feats.items()}


__all__ = [
  "FrozenEncoder",
  "QUERY_FEATURES",
  "SUPPORT_FEATURES",
  "cached_features",
  "feature_names",
  "flatten",
  "mask_foreground",
  "split_rows",
]
