"""IntFormat, the integer accumulator kind: against lax's integer dot and the exact oracle.

APyTypes 0.5.1 is not a reference here: its APyFixedAccumulatorContext(int_bits=16, overflow=WRAP
or SAT) returned 40000 for four 100 x 100 products (neither wrapped nor saturated), so the oracle's
plain-Python integers stand in for it.
"""

import itertools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowacc
from lowacc import AccumulatorConfig, IntFormat
from lowacc.formats import INT_OVERFLOWS, STES
from tests import oracle

BATCHED = (((2,), (1,)), ((0,), (0,)))


def int8(shape, seed):
  return np.random.default_rng(seed).integers(-128, 128, shape).astype(np.int8)


@pytest.mark.parametrize('order', ['fma', 'chunk'])
def test_wrap_equals_lax_integer_dot(order):
  """Wrapping is associative: any chunking gives lax's int16 dot, and int32's modulo 2^20."""
  x, w = int8((1, 6, 700), 0), int8((1, 700, 5), 1)
  exact = lax.dot_general(x, w, BATCHED, preferred_element_type=jnp.int32)
  for bits, dtype in ((16, jnp.int16), (20, None)):
    cfg = AccumulatorConfig(acc=IntFormat(bits, 'wrap'), chunk_size=16, order=order)
    y = np.asarray(lowacc.dot_general(x, w, BATCHED, cfg))
    if dtype is not None:
      expected = np.asarray(lax.dot_general(x, w, BATCHED, preferred_element_type=dtype))
    else:
      expected = (np.asarray(exact, np.int64) + 2 ** 19) % 2 ** 20 - 2 ** 19
    np.testing.assert_array_equal(y, expected.astype(np.float32))


@pytest.mark.parametrize('acc, chunk, order, combine', [
    (IntFormat(12, 'saturate'), 16, 'fma', 'acc'),
    (IntFormat(12, 'wrap'), 8, 'fma', IntFormat(16, 'saturate')),
    (IntFormat(14, 'saturate'), 8, 'chunk', IntFormat(18, 'saturate')),
    (IntFormat(10, 'saturate'), 5, 'chunk', 'acc')])
def test_equals_oracle_with_counters(acc, chunk, order, combine):
  x, w = int8((1, 4, 40), 2), int8((1, 40, 3), 3)
  x[0, 0] = 127  # a row of equal signs, to overflow
  w[0, :, 0] = 127
  cfg = AccumulatorConfig(acc=acc, chunk_size=chunk, order=order, combine=combine)
  y = np.asarray(lowacc.dot_general(x, w, BATCHED, cfg))
  stats = lowacc.accumulation_stats(x, w, BATCHED, cfg)
  expected, overflows = np.zeros((4, 3)), 0
  for m, n in itertools.product(range(4), range(3)):
    expected[m, n], record = oracle.int_chain(x[0, m], w[0, :, n], acc, chunk, order, combine)
    overflows += sum(flags[0] for inner, cflags in record for flags in inner + [cflags])
  np.testing.assert_array_equal(y[0], expected)
  assert int(stats['sat']) == overflows > 0


@pytest.mark.parametrize('overflow', INT_OVERFLOWS)
def test_identity_gradient_and_bad_fields(overflow):
  x, w = int8((1, 3, 20), 4).astype(np.float32), int8((1, 20, 2), 5).astype(np.float32)
  cfg = AccumulatorConfig(acc=IntFormat(8, overflow), chunk_size=None)
  g = jax.grad(lambda x: lowacc.dot_general(x, w, BATCHED, cfg).sum())(x)
  np.testing.assert_array_equal(g, np.broadcast_to(w.sum(2)[:, None, :], x.shape))
  with pytest.raises(ValueError, match='IntFormat.bits=32'):
    IntFormat(32)
  with pytest.raises(ValueError, match="IntFormat.overflow='clip'"):
    IntFormat(16, 'clip')


@pytest.mark.parametrize('scaling', lowacc.formats.INT_SCALINGS)
def test_integer_inputs_make_integer_products(scaling):
  """IntQuant operands: numpy's symmetric int8 quantization, their int64 dot wrapped into 16 bits,
  times the two scales (in float32)."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((1, 5, 64)).astype(np.float32)
  w = (rng.standard_normal((1, 64, 3)) * np.array([1, 10, 100])).astype(np.float32)
  iq = lowacc.IntQuant(8, scaling)
  cfg = AccumulatorConfig(acc=IntFormat(16, 'wrap'), chunk_size=None, lhs=iq, rhs=iq)
  y = np.asarray(lowacc.dot_general(x, w, BATCHED, cfg))

  def quantize(v, axis):
    amax = np.abs(v).max(axis=None if scaling.startswith('per_tensor') else axis, keepdims=True)
    scale = (amax / np.float32(127)).astype(np.float32)
    if scaling.endswith('_pow2'):
      scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    return np.clip(np.rint(v / scale), -127, 127).astype(np.int64), scale

  (qx, sx), (qw, sw) = quantize(x, 2), quantize(w, 1)
  total = (np.einsum('bmk,bkn->bmn', qx, qw) + 2 ** 15) % 2 ** 16 - 2 ** 15
  np.testing.assert_array_equal(y, total.astype(np.float32) * (sx * sw))
  g = jax.grad(lambda x: lowacc.dot_general(x, w, BATCHED, cfg).sum())(x)
  assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_chunk_partials_of_integer_operands_stay_exact_or_are_refused():
  """Order 'chunk' sums a chunk in float32: 1040 products of 127 x 127 (16,774,160 < 2^24) are
  exact, and wrap into 23 bits as Python's integers do; a chunk that could pass 2^24 is refused."""
  iq = lowacc.IntQuant(8)
  x, w = np.full((1, 2, 1040), 127.0, np.float32), np.full((1, 1040, 2), 127.0, np.float32)
  x[0, 1, :520] = -127.0
  cfg = AccumulatorConfig(acc=IntFormat(23, 'wrap'), chunk_size=1040, order='chunk', lhs=iq,
                          rhs=iq)
  exact = [1040 * 127 * 127, 0]
  wrapped = [(v + 2 ** 22) % 2 ** 23 - 2 ** 22 for v in exact]
  y = np.asarray(lowacc.dot_general(x, w, BATCHED, cfg))
  np.testing.assert_array_equal(y[0], np.array([wrapped, wrapped], np.float32).T)
  for chunk in (1041, None):
    with pytest.raises(ValueError, match=f'chunk_size={chunk} is invalid .* at most 1040 products'):
      cfg.replace(chunk_size=chunk)


@pytest.mark.parametrize('field, cfg', [
    ('acc', dict(acc=IntFormat(16, 'wrap'))),
    ('combine', dict(acc=IntFormat(12, 'saturate'), combine=IntFormat(16, 'wrap')))])
def test_wrap_takes_only_the_identity_estimator(field, cfg):
  for ste in STES[1:]:
    with pytest.raises(ValueError, match=f"^AccumulatorConfig.ste='{ste}' is invalid with "
                                         f"{field}=INT16w .*only valid estimator is "
                                         "ste='identity'$"):
      AccumulatorConfig(**cfg, ste=ste)
  assert AccumulatorConfig(**cfg).ste == 'identity'


SATURATING = [(IntFormat(11, 'saturate'), 8, 'fma', 'acc'),
              (IntFormat(10, 'saturate'), 8, 'fma', IntFormat(12, 'saturate')),
              (IntFormat(10, 'saturate'), 4, 'chunk', IntFormat(12, 'saturate'))]


def _saturating_operands():
  """Integers whose chains saturate, come back from the bound and saturate again."""
  rng = np.random.default_rng(7)
  x = rng.integers(-40, 41, (1, 4, 32)).astype(np.float32)
  w = rng.integers(-40, 41, (1, 32, 3)).astype(np.float32)
  x[0, 0, :12], w[0, :12, 0] = 40.0, 40.0  # runs into the top bound, then random terms
  x[0, 1, 20:], w[0, 20:, 1] = -40.0, 40.0  # random terms, then into the bottom bound
  return x, w


@pytest.mark.parametrize('ste', STES[1:])
@pytest.mark.parametrize('acc, chunk, order, combine', SATURATING)
def test_saturate_estimators_equal_the_oracle_factors(acc, chunk, order, combine, ste):
  """dy/dx and dy/dw of sum(y), bit for bit, from the oracle's per-step flags: the factor of
  each product (order 'fma') or of its chunk ('chunk') times the other operand."""
  x, w = _saturating_operands()
  cfg = AccumulatorConfig(acc=acc, chunk_size=chunk, order=order, combine=combine, ste=ste)
  dx, dw = jax.grad(lambda x, w: lowacc.dot_general(x, w, BATCHED, cfg).sum(), (0, 1))(x, w)
  factor = np.zeros((4, 3, 32))
  for m, n in itertools.product(range(4), range(3)):
    _, record = oracle.int_chain(x[0, m], w[0, :, n], acc, chunk, order, combine)
    f = oracle.factors(record, cfg)
    factor[m, n] = f if order == 'fma' else np.repeat(f, chunk)
  assert 0 < factor.sum() < factor.size  # some gradients pass, some do not
  np.testing.assert_array_equal(dx[0], np.einsum('mnk,kn->mk', factor, w[0]))
  np.testing.assert_array_equal(dw[0], np.einsum('mnk,mk->kn', factor, x[0]))


def test_recursive_of_is_the_derivative_of_the_saturating_chain():
  """The oracle's chain of saturating steps, each term moved by +-1/64: where both one-sided
  differences agree, they equal recursive_of's factor (1 or 0); immediate_of differs somewhere."""
  acc, combine = IntFormat(10, 'saturate'), IntFormat(12, 'saturate')
  x, w = _saturating_operands()
  eps, checked, differs = Fraction(1, 64), 0, False
  for m, n in itertools.product(range(4), range(3)):
    us = [int(a) * int(b) for a, b in zip(x[0, m], w[0, :, n])]

    def chain(us):
      total = 0
      for start in range(0, len(us), 8):
        s = 0
        for u in us[start:start + 8]:
          s = oracle.int_step(s, u, acc.bits, acc.overflow)[0]
        total = oracle.int_step(total, s, combine.bits, combine.overflow)[0]
      return total

    _, record = oracle.int_chain(x[0, m], w[0, :, n], acc, 8, 'fma', combine)
    rec = oracle.factors(record, AccumulatorConfig(acc=acc, chunk_size=8, combine=combine,
                                                      ste='recursive_of'))
    imm = oracle.factors(record, AccumulatorConfig(acc=acc, chunk_size=8, combine=combine,
                                                      ste='immediate_of'))
    differs |= rec != imm
    for t in range(len(us)):
      up, down = (chain(us[:t] + [us[t] + d] + us[t + 1:]) - chain(us) for d in (eps, -eps))
      if up == -down:
        checked += 1
        assert up / eps == rec[t], (m, n, t)
  assert checked > 300 and differs
