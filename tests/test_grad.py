"""Gradients through the accumulator: identity, the fine-grained estimators, backward configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowacc
from lowacc import AccumulatorConfig, DotConfig, FloatFormat
from lowacc.formats import STES
from tests import oracle
from tests.conftest import assert_bits_equal
from tests.test_dot import BATCHED, oracle_dot, operands


def test_identity_equals_float32_gradients(rng):
  # Small integers: every float32 sum is exact, so any summation order gives the same bits.
  x = rng.integers(-4, 5, (3, 4, 40)).astype(np.float32)
  w = rng.integers(-4, 5, (3, 40, 5)).astype(np.float32)
  g = rng.integers(-3, 4, (3, 4, 5)).astype(np.float32)
  loss = lambda dot: lambda a, b: jnp.sum(dot(a, b) * g)
  ours = jax.grad(loss(lambda a, b: lowacc.dot_general(a, b, BATCHED, lowacc.PAPER_M7E4)),
                  argnums=(0, 1))(x, w)
  ref = jax.grad(loss(lambda a, b: jnp.einsum('bmk,bkn->bmn', a, b)), argnums=(0, 1))(x, w)
  for o, r in zip(ours, ref):
    assert_bits_equal(o, r, 'identity gradient')


def _oracle_grads(x, w, g, cfg):
  """dx, dw from the oracle's per-step factors, each sum of two exact terms rounded once."""
  _, records = oracle_dot(x, w, cfg)
  b, m, k = x.shape
  n = w.shape[2]
  c = cfg.chunk_size or k
  f = np.zeros((b, m, n, k))
  for (bi, mi, ni), record in records.items():
    per_step = oracle.factors(record, cfg)
    f[bi, mi, ni] = per_step if cfg.order == 'fma' else np.repeat(per_step, c)[:k]
  gf = g[:, :, :, None] * f
  dx = np.einsum('bmnk,bkn->bmk', gf, w.astype(np.float64)).astype(np.float32)
  dw = np.einsum('bmnk,bmk->bkn', gf, x.astype(np.float64)).astype(np.float32)
  return dx, dw, f


# Chunks of 6 steps record their flags in one inner run; one chunk of 37 'fma' steps (more than
# dot._RECORDED_STEPS) runs its inner chain again for the gradients.
@pytest.mark.parametrize('order, chunk', [('fma', 6), ('chunk', 6), ('fma', None)])
@pytest.mark.parametrize('ste', STES[1:])
def test_fine_grained_estimators_equal_oracle(ste, order, chunk, rng):
  acc = FloatFormat(3, 3, bias=3, rounding='toward_zero', underflow='flush', overflow='saturate')
  cfg = AccumulatorConfig(acc=acc, product=acc.replace(bias=4) if order == 'fma' else None,
                          chunk_size=chunk, order=order, ste=ste)
  # Two terms per gradient sum (M = N = 2) and exact terms: the float32 result is one rounding.
  if order == 'fma':
    x, w = operands(acc, (2, 2, 37), (2, 37, 2), seed=len(ste))
  else:  # exact integer chunk sums
    x = rng.integers(-6, 7, (2, 2, 37)).astype(np.float32)
    w = rng.integers(-6, 7, (2, 37, 2)).astype(np.float32)
  g = rng.integers(-3, 4, (2, 2, 2)).astype(np.float32)
  fn = lambda a, b: jnp.sum(lowacc.dot_general(a, b, BATCHED, cfg) * g)
  dx, dw = jax.grad(fn, argnums=(0, 1))(x, w)
  ex, ew, f = _oracle_grads(x, w, g, cfg)
  assert 0 < f.mean() < 1, 'the case should block some gradients and pass others'
  # A blocked sum is zero of either sign, by summation order; + 0.0 makes every zero +0.
  assert_bits_equal(np.asarray(dx) + 0.0, ex, f'{ste} dx')
  assert_bits_equal(np.asarray(dw) + 0.0, ew, f'{ste} dw')
  jdx, jdw = jax.jit(jax.grad(fn, argnums=(0, 1)))(x, w)
  assert_bits_equal(jdx, dx, 'jit dx')
  assert_bits_equal(jdw, dw, 'jit dw')


def test_recursive_and_immediate_differ():
  acc = FloatFormat(3, 3, bias=3, rounding='toward_zero', underflow='flush')
  x, w = operands(acc, (2, 2, 37), (2, 37, 2), seed=4)
  grads = {}
  for ste in ('immediate_both', 'recursive_both'):
    cfg = AccumulatorConfig(acc=acc, chunk_size=6, ste=ste)
    grads[ste] = np.asarray(jax.grad(lambda a: jnp.sum(lowacc.dot_general(a, w, BATCHED, cfg)))(x))
  assert not np.array_equal(grads['immediate_both'], grads['recursive_both'])


def test_backward_gemms_use_their_own_configs(rng):
  fwd = lowacc.PAPER_M7E4
  dl = AccumulatorConfig(acc=FloatFormat(4, 3, bias=5, rounding='toward_zero'), chunk_size=2)
  dr = AccumulatorConfig(acc=FloatFormat(5, 2, rounding='up'), chunk_size=3)
  x = rng.standard_normal((1, 3, 10)).astype(np.float32)
  w = rng.standard_normal((1, 10, 7)).astype(np.float32)
  g = rng.standard_normal((1, 3, 7)).astype(np.float32)
  cfg = DotConfig(fwd=fwd, dlhs=dl, drhs=dr)
  dx, dw = jax.grad(lambda a, b: jnp.sum(lowacc.dot_general(a, b, BATCHED, cfg) * g),
                    argnums=(0, 1))(x, w)
  # dlhs contracts over n: dx[m, k] = sum_n g[m, n] w[k, n]; drhs over m: dw[k, n] = sum_m x g.
  ex, _ = oracle_dot(g, w.transpose(0, 2, 1), dl)
  ew, _ = oracle_dot(x.transpose(0, 2, 1), g, dr)
  assert_bits_equal(dx, ex, 'dlhs')
  assert_bits_equal(dw, ew, 'drhs')


def test_grad_composes_with_vmap_and_input_quantization(rng):
  cfg = lowacc.PAPER_M7E4_FP8.replace(ste='recursive_of')
  x = rng.standard_normal((3, 2, 20)).astype(np.float32)
  w = rng.standard_normal((20, 4)).astype(np.float32)
  per_example = jax.vmap(jax.grad(lambda a: jnp.sum(lowacc.matmul(a, w, cfg))))(x)
  batched = jax.grad(lambda a: jnp.sum(lowacc.matmul(a, w, cfg)))(x)
  assert_bits_equal(per_example[0], jax.grad(lambda a: jnp.sum(lowacc.matmul(a, w, cfg)))(x[0]),
                    'vmap of grad')
  assert per_example.shape == batched.shape == x.shape
  assert np.all(np.isfinite(np.asarray(batched)))


def test_second_order_is_the_exact_dots_for_identity(rng):
  # Small integers: the FP32 chain and the float32 dot agree, so the whole hessian (mixed terms,
  # which depend on y, included) must too; under M7E4 d2/dx2 sum(y^2) = 2 w w^T whatever y is.
  x = rng.integers(-3, 4, (2, 5)).astype(np.float32)
  w = rng.integers(-3, 4, (5, 3)).astype(np.float32)
  loss = lambda dot: lambda a, b: jnp.sum(dot(a, b) ** 2)
  ref = jax.hessian(loss(jnp.matmul), argnums=(0, 1))(x, w)
  fp32 = AccumulatorConfig(acc=lowacc.FP32, chunk_size=2)
  ours = jax.hessian(loss(lambda a, b: lowacc.matmul(a, b, fp32)), argnums=(0, 1))(x, w)
  for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert_bits_equal(o, r, 'FP32 hessian')
  paper = lambda a: loss(lambda a, b: lowacc.matmul(a, b, lowacc.PAPER_M7E4))(a, w)
  assert_bits_equal(jax.hessian(paper)(x), ref[0][0], 'M7E4 d2/dx2')
  v = rng.integers(-2, 3, x.shape).astype(np.float32)
  jvp_of_grad = jax.jvp(jax.grad(paper), (x,), (v,))[1]
  assert_bits_equal(jvp_of_grad, np.einsum('mkpq,pq->mk', ref[0][0], v), 'jvp of grad')


def test_second_order_through_a_fine_grained_estimator_is_refused(rng):
  x = rng.standard_normal((2, 5)).astype(np.float32)
  w = rng.standard_normal((5, 3)).astype(np.float32)
  cfg = lowacc.PAPER_M7E4.replace(ste='recursive_of')
  with pytest.raises(ValueError, match="ste='recursive_of'.*forward mode.*ste='identity'"):
    jax.hessian(lambda a: jnp.sum(lowacc.matmul(a, w, cfg) ** 2))(x)


def test_recursive_estimators_under_x64():
  acc = FloatFormat(3, 3, bias=3, rounding='toward_zero', underflow='flush')
  x, w = operands(acc, (1, 2, 13), (1, 13, 2), seed=4)
  grads = {}
  for x64 in (False, True):
    with jax.enable_x64(x64):
      for order in ('fma', 'chunk'):
        cfg = AccumulatorConfig(acc=acc, chunk_size=6, order=order, ste='recursive_both')
        grads[x64, order] = jax.grad(lambda a: jnp.sum(lowacc.dot_general(a, w, BATCHED, cfg)))(x)
  for order in ('fma', 'chunk'):
    assert_bits_equal(grads[True, order], grads[False, order], f'x64 {order}')
