"""``remat=True`` (nn.remat around the attention blocks) changes memory, not numbers.

For the transformers that the `remat` model field reaches (SCCAN's SCCA blocks,
HDMNet's transformer layers, PAHNet's SCCANPlus blocks and HDMNetPlus layers),
at tiny sizes: identical parameter trees, and the same loss and gradients with
remat on and off. The compiled gradient's temp memory is printed for both; it
is not asserted: on XLA:CPU remat does not lower it at these sizes (it grows by
2-8 %, the recomputation's buffers outweigh the saved activations).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_weights

from fss_jax.models import hdmnet, pahnet, sccan
from fss_jax.nn.attention.hdm import HierarchicalTransformer
from fss_jax.nn.attention.sccan import SCCATransformer

RNGS = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}


def _maps(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _binary(rng, *shape):
  return jnp.asarray(rng.random(shape) > 0.5, jnp.float32)


def _cases():
  """name -> (module factory (remat) -> module, inputs (rng) -> args, call kwargs)."""
  sccan_kw = dict(dim=32, depth=2, num_heads=4, window=4)
  hdm_args = lambda r, h: (
    _maps(r, 2, h, h, 64),
    _maps(r, 2, h, h, 64),
    _binary(r, 2, 4 * h, 4 * h),
    _maps(r, 2, h, h, 2),
  )
  return {
    "sccan": (
      lambda remat: SCCATransformer(**sccan_kw, remat=remat),
      lambda r: (_maps(r, 2, 8, 8, 32), _maps(r, 2, 8, 8, 32), _binary(r, 2, 8, 8, 1)),
      {},
    ),
    "sccan_plus": (
      lambda remat: pahnet.SCCAPlusTransformer(**sccan_kw, remat=remat),
      lambda r: (
        _maps(r, 2, 8, 8, 32),
        _maps(r, 2, 8, 8, 32),
        _binary(r, 2, 8, 8, 1),
        jnp.asarray(r.random((2, 8, 8)), jnp.float32),
      ),
      {},
    ),
    "hdmnet": (
      lambda remat: HierarchicalTransformer(depth=1, remat=remat),
      lambda r: hdm_args(r, 8),
      {"train": True},
    ),
    "hdmnet_plus": (
      lambda remat: pahnet.TransformerPlus(depth=1, remat=remat),
      lambda r: (*hdm_args(r, 8), jnp.asarray(r.random((2, 8, 8)), jnp.float32)),
      {"train": True},
    ),
  }


def _loss_and_grad(module, variables, args, kwargs):
  def loss(params):
    out = module.apply(
      {**variables, "params": params}, *args, rngs={"dropout": RNGS["dropout"]}, **kwargs
    )
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(out)) * 1e-3

  fn = jax.jit(jax.value_and_grad(loss))
  compiled = fn.lower(variables["params"]).compile()
  mem = compiled.memory_analysis()
  temp = None if mem is None else mem.temp_size_in_bytes
  return compiled(variables["params"]), temp


# Compile-bound (~20 s for SCCAN, 35-90 s for each of the others on 2 loaded cores). The PAHNet
# blocks are wrapped by the same code paths (nn.remat of the block class / hdm.encoder_layer_cls);
# run them with FSS_FULL_REMAT=1.
_EXTRA = ("sccan_plus", "hdmnet_plus") if os.environ.get("FSS_FULL_REMAT") else ()


@pytest.mark.parametrize("name", ["sccan", pytest.param("hdmnet", marks=pytest.mark.slow), *_EXTRA])
def test_remat_same_params_loss_and_grads(name):
  make, inputs, kwargs = _cases()[name]
  args = inputs(np.random.default_rng(0))
  plain, remat = make(False), make(True)
  with jax.default_matmul_precision("highest"):
    shapes = jax.eval_shape(lambda a: plain.init(RNGS, *a, **kwargs), args)
    variables = random_weights.draw(shapes)  # no compile of the init
    shapes_remat = jax.eval_shape(lambda a: remat.init(RNGS, *a, **kwargs), args)
    assert jax.tree.structure(variables) == jax.tree.structure(shapes_remat)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(shapes_remat)):
      assert (a.shape, a.dtype) == (b.shape, b.dtype)
    (loss0, grad0), temp0 = _loss_and_grad(plain, variables, args, kwargs)
    (loss1, grad1), temp1 = _loss_and_grad(remat, variables, args, kwargs)
  print(f"{name}: compiled grad temp bytes remat=False {temp0}, remat=True {temp1}")
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
  assert jax.tree.structure(grad0) == jax.tree.structure(grad1)
  for g0, g1 in zip(jax.tree.leaves(grad0), jax.tree.leaves(grad1)):
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-6)


def test_remat_is_a_model_field():
  assert sccan.make_model(remat=True).remat
  assert hdmnet.make_model(remat=True).remat
  assert hdmnet.keymap(remat=True) == hdmnet.keymap()
  assert pahnet.make_sccan_plus(remat=True).remat
  assert pahnet.make_hdmnet_plus(remat=True).remat
