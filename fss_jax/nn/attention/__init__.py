"""Attention building blocks of the few-shot models (Flax linen, NHWC maps / NLC tokens).

* `fss_jax.nn.attention.sccan` — SCCAN's SCCA transformer: patch alignment,
  scaled-cosine window attention, shifted (zero-pad) windows; reused by PAHNet's
  SCCANPlus.
* `fss_jax.nn.attention.hdm` — HDMNet's hierarchical dense-matching transformer;
  reused by PAHNet's HDMNetPlus.
* `fss_jax.nn.attention.linear` — JC²A's linear (efficient) attention and its
  alternatives.

Import the submodule you need; this package imports none of them eagerly.
"""

__all__ = ["sccan", "hdm", "linear"]
