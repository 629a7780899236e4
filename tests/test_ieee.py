"""IEEE 754 special values on every path (spec section 1, "Overflow" and "Signed zeros"): exact
infinities and the signs of zeros, through quantize, the XLA chain ('fma', 'chunk', every
combine), the native kernel and the Pallas kernel, against the oracle and the spec's own words."""

import itertools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowacc
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.accumulator import two_sum
from lowacc.kernels.pallas_fma import fma_dot
from tests import oracle
from tests.conftest import assert_bits_equal
from tests.test_dot import BATCHED, oracle_dot
from tests.test_native import xla_path

ROUNDINGS = ('nearest_even', 'toward_zero', 'down', 'up')
INF = np.inf


@pytest.mark.parametrize('overflow', ('saturate', 'inf', 'none'))
def test_an_infinity_is_exact_in_every_rounding(overflow):
  x = np.array([INF, -INF, np.nan, 0.0, -0.0], np.float32)
  for rounding in ROUNDINGS:
    fmt = lowacc.FP8_E5M2.replace(rounding=rounding, overflow=overflow)
    got = np.asarray(lowacc.quantize(x, fmt))
    big = fmt.max_normal if overflow == 'saturate' else INF
    assert_bits_equal(got, [big, -big, np.nan, 0.0, -0.0], str(fmt))
    o = oracle.Format.of(fmt)
    assert_bits_equal(got, [oracle.quantize(float(v), o) for v in x], f'oracle {fmt}')
  assert_bits_equal(lowacc.quantize(x, lowacc.FP8_E5M2), x.astype(ml_dtypes.float8_e5m2), 'cast')


def test_two_sum_of_infinities_and_of_a_float32_overflow():
  a = jnp.array([INF, 1.0, -INF, INF, 3e38], jnp.float32)
  b = jnp.array([1.0, -INF, -INF, -INF, 3e38], jnp.float32)
  s, e = map(np.asarray, two_sum(a, b))
  assert_bits_equal(s, [INF, -INF, -INF, np.nan, INF], 'sum')
  assert_bits_equal(e[:3], [0.0, 0.0, 0.0], 'an infinite operand: exact, no error term')
  assert np.isnan(e[4]), 'a finite sum beyond float32 is marked by a NaN error term'
  # The finite one overflows as a finite value: toward_zero keeps it at max_normal.
  fp32_tz = AccumulatorConfig(acc=lowacc.FP32.replace(rounding='toward_zero'), chunk_size=None)
  y = lowacc.matmul(np.array([[3e38, 3e38], [INF, 1.0]], np.float32), np.ones((2, 1), np.float32),
                    fp32_tz)
  assert_bits_equal(y, [[np.finfo(np.float32).max], [INF]], 'float32 overflow, toward_zero')


def test_the_issues_cases():
  assert lowacc.quantize(np.float32(-INF), lowacc.FP8_E5M2.replace(rounding='up')) == -INF
  flush = FloatFormat(4, 7, bias=10, underflow='flush')
  tiny = np.array([[-2.0 ** -12]], np.float32)  # its product flushes to -0 in the product format
  for combine in ('acc', None):
    cfg = AccumulatorConfig(acc=flush, product=flush, chunk_size=None, combine=combine)
    assert not np.signbit(lowacc.matmul(tiny, np.ones((1, 1), np.float32), cfg)), combine
  down = AccumulatorConfig(acc=flush.replace(rounding='down'), chunk_size=None)
  y = lowacc.matmul(np.array([[1.0, -1.0]], np.float32), np.ones((2, 1), np.float32), down)
  assert y == 0 and np.signbit(y), '1 + (-1) under down is -0'


# Rows whose chains meet every zero-sign rule and infinities: -0 products, exact cancellation,
# nonzero values flushing to zero, an infinite product, inf - inf, finite overflow.
ROWS = np.array([[-0.0, -0.0, -0.0], [1.0, -1.0, -0.0], [-2.0 ** -12, 2.0 ** -12, -0.0],
                 [-0.0, 0.0, -2.0 ** -11], [3.0, -3.0, 0.0], [INF, 1.0, -0.0],
                 [-1.0, -INF, 2.0], [INF, 1.0, -INF], [1e30, 1e30, -1.0], [-2.0, 1.0, 1.0]],
                np.float32)


@pytest.mark.parametrize('order', ('fma', 'chunk'))
def test_chains_equal_the_oracle_on_zeros_and_infinities(order):
  x1 = ROWS[None, :, :1]  # K = 1: a chain of one step
  # Every rounding with each combine; overflow 'inf' with combine 'acc', 'saturate' without.
  for rounding, combine in itertools.product(ROUNDINGS, ('acc', None)):
    acc = FloatFormat(4, 7, bias=10, rounding=rounding, underflow='flush',
                      overflow='inf' if combine else 'saturate')
    cfg = AccumulatorConfig(acc=acc, chunk_size=2, order=order, combine=combine)
    signs = rounding in ('nearest_even', 'down')  # the two rules of zero signs
    for x in (x1, ROWS[None]) if signs else (ROWS[None],):  # K = 3: two chunks, one padded
      w = np.ones((1, x.shape[2], 1), np.float32)
      expected = oracle_dot(x, w, cfg)[0]
      assert_bits_equal(lowacc.dot_general(x, w, BATCHED, cfg), expected, f'{cfg} K={x.shape[2]}')
      if order == 'chunk':  # dot_general ran the native kernel where it applies
        assert_bits_equal(xla_path(cfg, x, w), expected, f'XLA path {cfg}')
      if order == 'fma' and signs:  # interpret mode is slow
        assert_bits_equal(fma_dot(x, w, cfg, block_m=16, block_n=1), expected, f'pallas {cfg}')
