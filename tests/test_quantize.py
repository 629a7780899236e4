"""quantize against independent references: numpy/ml_dtypes casts, reduce_precision, the oracle."""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import lowacc
from lowacc import FloatFormat, InputQuant
from lowacc.quantize import quantize_operand, random_bits
from tests import oracle
from tests.conftest import assert_bits_equal, boundary_inputs

MILLION = 1_000_000


@pytest.mark.parametrize('fmt, dtype', [
    (lowacc.FP16, np.float16),
    (lowacc.BF16, ml_dtypes.bfloat16),
    (lowacc.FP8_E4M3, ml_dtypes.float8_e4m3),
    (lowacc.FP8_E5M2, ml_dtypes.float8_e5m2),
    (lowacc.FP8_E3M4, ml_dtypes.float8_e3m4),
], ids=lambda v: getattr(v, 'name', None) or getattr(v, '__name__', str(v)))
def test_equals_numpy_and_ml_dtypes_casts(fmt, dtype):
  x = boundary_inputs(fmt, MILLION, seed=fmt.width)
  expected = x.astype(dtype).astype(np.float32)
  assert_bits_equal(lowacc.quantize(x, fmt), expected, fmt.name)


@pytest.mark.parametrize('exp_bits, man_bits', [(2, 1), (3, 2), (4, 3), (4, 7), (5, 2), (5, 10),
                                                (6, 5), (7, 12), (8, 7), (8, 0), (8, 23)])
def test_equals_reduce_precision(exp_bits, man_bits):
  fmt = FloatFormat(exp_bits, man_bits, rounding='nearest_even', underflow='flush',
                    overflow='inf')
  x = boundary_inputs(fmt, MILLION, seed=exp_bits * 32 + man_bits)
  if exp_bits == 8:
    # With 8 exponent bits XLA models no exponent range at all: it keeps float32 subnormals,
    # which the contract's flush mode flushes. Compare on float32 normals and zeros only.
    x = x[~((np.abs(x) < 2.0 ** -126) & (x != 0))]
  expected = np.asarray(lax.reduce_precision(jnp.asarray(x), exp_bits, man_bits))
  assert_bits_equal(lowacc.quantize(x, fmt), expected, fmt.name)


ORACLE_FORMATS = [dict(exp_bits=4, man_bits=7, bias=10), dict(exp_bits=4, man_bits=7, bias=12),
                  dict(exp_bits=5, man_bits=10), dict(exp_bits=4, man_bits=3),
                  dict(exp_bits=3, man_bits=2), dict(exp_bits=6, man_bits=5),
                  dict(exp_bits=8, man_bits=23, bias=127), dict(exp_bits=2, man_bits=0)]
DETERMINISTIC = ('nearest_even', 'toward_zero', 'down', 'up')


@pytest.mark.parametrize('underflow, overflow', itertools.product(('flush', 'subnormal', 'none'),
                                                                   ('saturate', 'inf', 'none')))
@pytest.mark.parametrize('fields', ORACLE_FORMATS, ids=lambda f: '-'.join(map(str, f.values())))
def test_equals_exact_oracle(fields, underflow, overflow):
  try:
    FloatFormat(**fields, underflow=underflow, overflow=overflow)
  except ValueError as e:
    pytest.skip(f'not a valid format: {e}')
  for rounding in DETERMINISTIC:
    fmt = FloatFormat(**fields, rounding=rounding, underflow=underflow, overflow=overflow)
    x = boundary_inputs(fmt, 3000, seed=hash((fmt.width, rounding, underflow, overflow)) % 2**32)
    o = oracle.Format.of(fmt)
    expected = np.array([oracle.quantize(float(v), o) for v in x], np.float32)
    assert_bits_equal(lowacc.quantize(x, fmt), expected, f'{fmt} ')


@pytest.mark.parametrize('fields', ORACLE_FORMATS[:5], ids=lambda f: '-'.join(map(str, f.values())))
def test_stochastic_equals_oracle_with_the_same_words(fields):
  fmt = FloatFormat(**fields, rounding='stochastic', underflow='subnormal', overflow='saturate')
  x = boundary_inputs(fmt, 4000, seed=7)
  key = jax.random.key(3)
  words = np.asarray(random_bits(key, x.shape))
  o = oracle.Format.of(fmt)
  expected = np.array([oracle.quantize(float(v), o, int(r)) for v, r in zip(x, words)],
                      np.float32)
  assert_bits_equal(lowacc.quantize(x, fmt, key=key), expected, str(fmt))


def test_stochastic_is_unbiased_and_deterministic_per_key():
  fmt = FloatFormat(4, 3, rounding='stochastic', underflow='subnormal')
  x = np.full(200_000, 1.0 + 3 / 32, np.float32)  # 3/4 of the way from 1 to 1.125
  q1 = np.asarray(lowacc.quantize(x, fmt, key=jax.random.key(0)))
  assert set(np.unique(q1)) == {1.0, 1.125}
  # Binomial(200000, 0.75): the mean of the ups is within 5 sigma = 0.0048 of 0.75.
  assert abs(np.mean(q1 == 1.125) - 0.75) < 0.0048
  assert np.array_equal(q1, np.asarray(lowacc.quantize(x, fmt, key=jax.random.key(0))))
  assert not np.array_equal(q1, np.asarray(lowacc.quantize(x, fmt, key=jax.random.key(1))))


def test_gradient_is_straight_through():
  fmt = FloatFormat(4, 2, overflow='saturate')
  x = jnp.array([0.3, 100.0, -1e-9, 7.1], jnp.float32)
  g = jax.grad(lambda x: jnp.sum(lowacc.quantize(x, fmt) * jnp.arange(1.0, 5.0)))(x)
  assert np.array_equal(np.asarray(g), [1.0, 2.0, 3.0, 4.0])
  # reduce_precision's own gradient would round the cotangent 1/3 to 0.3125 in M2.
  g = jax.grad(lambda x: jnp.sum(lowacc.quantize(x, fmt)) / 3)(x)
  assert np.array_equal(np.asarray(g), np.full(4, np.float32(1) / 3))


def test_jit_equals_eager():
  fmt = FloatFormat(5, 4, bias=13, rounding='up', underflow='subnormal', overflow='inf')
  x = boundary_inputs(fmt, 20000)
  assert_bits_equal(jax.jit(lambda v: lowacc.quantize(v, fmt))(x), lowacc.quantize(x, fmt))


def _oracle_operand(x, fmt, reduce_axes):
  """Spec section 2 by hand: 2^k puts max|x| (over reduce_axes) in the top binade."""
  amax = np.max(np.abs(x), axis=reduce_axes, keepdims=True)
  k = fmt.max_exp - np.floor(np.log2(amax)).astype(int)
  o = oracle.Format.of(fmt)
  scaled = (x * np.exp2(k)).astype(np.float32)
  q = np.vectorize(lambda v: oracle.quantize(float(v), o))(scaled)
  return (q * np.exp2(-k)).astype(np.float32)


@pytest.mark.parametrize('scaling, axes', [('per_tensor_pow2', None), ('per_channel_pow2', (0,)),
                                           ('per_channel_pow2', (1,))])
def test_pow2_scaled_operand(scaling, axes, rng):
  fmt = lowacc.PAPER_FP8_INPUT.format
  x = (rng.standard_normal((24, 6)) * np.exp2(rng.integers(-20, 20, (1, 6)))).astype(np.float32)
  got = quantize_operand(jnp.asarray(x), InputQuant(fmt, scaling), reduce_axes=axes)
  assert_bits_equal(got, _oracle_operand(x, fmt, axes), scaling)
  if scaling == 'per_tensor_pow2':  # the largest element lands in the top binade
    assert np.max(np.abs(np.asarray(got))) * 2.0 ** (fmt.max_exp - np.floor(np.log2(np.abs(x).max()))) >= 2.0 ** fmt.max_exp


def test_scaled_operand_of_zeros_is_zero():
  x = jnp.zeros((3, 4))
  got = quantize_operand(x, lowacc.PAPER_FP8_INPUT)
  assert np.array_equal(np.asarray(got), np.zeros((3, 4)))


@pytest.mark.parametrize('scaling, axes', [('per_tensor_pow2', None), ('per_channel_pow2', (0,))])
def test_pow2_scale_comes_from_the_finite_values(scaling, axes, rng):
  x = (rng.standard_normal((8, 3)) * 1e-3).astype(np.float32)
  x[:3] = 1e-5  # below every channel's maximum: these rows take the non-finite values
  for fmt in (lowacc.PAPER_FP8_INPUT.format, lowacc.FP8_E4M3):  # saturate, inf
    expected = _oracle_operand(x, fmt, axes)
    k = fmt.max_exp - np.floor(np.log2(np.max(np.abs(x), axis=axes)))
    big = fmt.max_normal * 2.0 ** -np.broadcast_to(k, (3,)) if fmt.overflow == 'saturate' else (
        np.full(3, np.inf))
    special = x.copy()
    special[0, 0], special[1, 0], special[2, 1] = np.inf, np.nan, -np.inf
    expected[0, 0], expected[1, 0], expected[2, 1] = big[0], np.nan, -big[1]
    got = quantize_operand(jnp.asarray(special), InputQuant(fmt, scaling), reduce_axes=axes)
    assert_bits_equal(got, expected, f'{scaling} {fmt}')
