"""The Pallas kernel for order='fma' equals the XLA path (lowacc.dot_general) bit for bit.

On the CPU the kernel runs in Pallas interpret mode (`interpret=None` picks it); the last test
lowers it for CUDA, which checks that every op has a Triton lowering without needing a GPU.
Shapes are small on purpose: interpret mode traces every grid step.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowacc
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.kernels.pallas_fma import fma_dot
from lowacc.quantize import quantize_operand
from tests.conftest import assert_bits_equal
from tests.test_dot import BATCHED, operands

ROUNDINGS = ('nearest_even', 'toward_zero', 'down', 'up')
RANGES = list(itertools.product(('flush', 'subnormal', 'none'), ('saturate', 'inf', 'none')))


def check(cfg, x, w, **blocks):
  """fma_dot on canonical operands against the XLA path, as uint32 words."""
  blocks = dict(dict(block_m=8, block_n=8), **blocks)
  expected = lowacc.dot_general(x, w, BATCHED, cfg)
  got = fma_dot(jnp.asarray(x), jnp.asarray(w), cfg, **blocks)
  assert got.shape == expected.shape and got.dtype == jnp.float32
  assert_bits_equal(got, expected, str(cfg))
  return np.asarray(got)


def test_paper_preset():
  # B=2; K=37: two chunks of 16 and a short one; M=13, N=11: ragged 8x8 blocks.
  x, w = operands(lowacc.PAPER_ACC, (2, 13, 37), (2, 37, 11), seed=1)
  check(lowacc.PAPER_M7E4, x, w)


@pytest.mark.parametrize('rounding', ROUNDINGS)
@pytest.mark.parametrize('underflow, overflow', RANGES)
def test_every_rounding_and_range_on_a_narrow_format(rounding, underflow, overflow):
  # M3E3 bias 3 accumulator, products rounded to M3E3 bias 4 with the same modes: operands span
  # both ranges, so products and sums saturate (or overflow), flush and lose updates.
  modes = dict(rounding=rounding, underflow=underflow, overflow=overflow)
  acc = FloatFormat(3, 3, bias=3, **modes)
  cfg = AccumulatorConfig(acc=acc, product=FloatFormat(3, 3, bias=4, **modes), chunk_size=6)
  x, w = operands(acc, (2, 5, 20), (2, 20, 6), seed=ROUNDINGS.index(rounding) * 9
                  + RANGES.index((underflow, overflow)))
  check(cfg, x, w, block_m=4, block_n=4)


def test_narrow_format_operands_trigger_every_event():
  """The operands of the test above really saturate, flush and lose updates."""
  modes = dict(rounding='nearest_even', underflow='flush', overflow='saturate')
  acc = FloatFormat(3, 3, bias=3, **modes)
  cfg = AccumulatorConfig(acc=acc, product=FloatFormat(3, 3, bias=4, **modes), chunk_size=6)
  x, w = operands(acc, (2, 5, 20), (2, 20, 6), seed=0)
  stats = lowacc.accumulation_stats(x, w, BATCHED, cfg)
  assert min(int(stats[name]) for name in ('sat', 'lost', 'flush')) > 0, stats


@pytest.mark.parametrize('combine', ['acc', None, 'narrow'])
@pytest.mark.parametrize('product', [None, 'own'])
def test_combine_and_product(combine, product):
  acc = FloatFormat(4, 7, bias=10, rounding='toward_zero', underflow='flush')
  combine = {'narrow': FloatFormat(3, 3, rounding='up', underflow='subnormal')}.get(combine,
                                                                                    combine)
  product = acc.replace(bias=12, rounding='nearest_even') if product else None
  cfg = AccumulatorConfig(acc=acc, product=product, chunk_size=5, combine=combine)
  x, w = operands(acc, (2, 7, 23), (2, 23, 9), seed=3)
  check(cfg, x, w)


@pytest.mark.parametrize('rounding', ROUNDINGS)
def test_wide_range_sums_are_rounded_once(rounding):
  """Products spread over 2^60: fl32(s + p) is often inexact, so only an exactly-then-once rounded
  sum (TwoSum) matches; a kernel rounding fl32(s + p) again fails this test."""
  acc = FloatFormat(6, 4, rounding=rounding, underflow='subnormal', overflow='saturate')
  comb = lowacc.BF16.replace(rounding=rounding)  # directed: double rounding shows
  cfg = AccumulatorConfig(acc=acc, product=None, chunk_size=3, combine=comb)
  x, w = operands(acc, (1, 6, 30), (1, 30, 5), seed=11, mantissa_bits=10)
  check(cfg, x, w)


def test_padding_keeps_the_sign_of_zero():
  """K = 3 in chunks of 2: the padded product must be -0 so that a last chunk that flushed to -0
  stays -0 and the combine total -0 + -0 keeps its sign (+0 padding would give +0)."""
  acc = FloatFormat(4, 3, bias=7, rounding='toward_zero', underflow='flush')  # min_normal 2^-6
  comb = FloatFormat(4, 3, bias=3, rounding='toward_zero', underflow='flush')  # min_normal 2^-2
  cfg = AccumulatorConfig(acc=acc, product=None, chunk_size=2, combine=comb)
  x = np.array([[[-2.0 ** -4, 0.0, -2.0 ** -8]]], np.float32)
  w = np.ones((1, 3, 1), np.float32)
  y = check(cfg, x, w)
  assert y[0, 0, 0] == 0 and np.signbit(y[0, 0, 0])


@pytest.mark.parametrize('chunk_size', [None, 1, 40])
def test_chunk_sizes(chunk_size):
  # None: one chunk of K; 1: every product its own chunk; 40 > K: one short chunk.
  acc = FloatFormat(4, 5, bias=8, rounding='down', underflow='subnormal', overflow='inf')
  cfg = AccumulatorConfig(acc=acc, product=None, chunk_size=chunk_size, combine=lowacc.FP16)
  x, w = operands(acc, (1, 6, 19), (1, 19, 5), seed=7)
  check(cfg, x, w)


def test_default_blocks_and_float32_chain():
  """An FP32 'accumulator' is the sequential float32 sum; default (64) blocks shrink to fit."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 24, 40)).astype(np.float32)
  w = rng.standard_normal((1, 40, 20)).astype(np.float32)
  cfg = AccumulatorConfig(acc=lowacc.FP32, chunk_size=None, combine=None)
  y = check(cfg, x, w, block_m=64, block_n=64)
  expected = np.zeros((24, 20), np.float32)
  for k in range(40):
    expected = (expected + x[0, :, k:k + 1] * w[0, k:k + 1, :]).astype(np.float32)
  assert_bits_equal(y[0], expected, 'sequential float32')


def test_special_values_and_subnormal_operands():
  acc = FloatFormat(4, 7, bias=10, underflow='none', overflow='inf')
  cfg = AccumulatorConfig(acc=acc, product=None, chunk_size=2)
  x = np.array([[[1.0, np.inf, 1.0], [np.nan, 1.0, 1.0], [np.inf, -np.inf, 0.0],
                 [1e-40, -3e-39, 2.0 ** -70]]], np.float32)
  w = np.array([[[1.0, 2.0 ** 100], [1.0, -1e-40], [1.0, 2.0 ** -70]]], np.float32)
  y = check(cfg, x, w, block_m=2, block_n=2)
  assert y[0, 0, 0] == np.inf and np.isnan(y[0, 1, 0]) and np.isnan(y[0, 2, 0])


def test_fp8_inputs_quantized_like_dot_general():
  """The kernel takes operands already quantized, and refuses a config that would quantize them."""
  cfg = lowacc.PAPER_M7E4_FP8
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 9, 21)).astype(np.float32)
  w = (rng.standard_normal((1, 21, 7)) * 0.05).astype(np.float32)
  quant = jax.jit(quantize_operand, static_argnums=(1, 2))
  xq, wq = quant(jnp.asarray(x), cfg.lhs, (2,)), quant(jnp.asarray(w), cfg.rhs, (1,))
  assert_bits_equal(fma_dot(xq, wq, cfg.replace(lhs=None, rhs=None), block_m=8, block_n=4),
                    lowacc.dot_general(x, w, BATCHED, cfg), 'fp8 inputs')
  with pytest.raises(ValueError, match='already quantized'):
    fma_dot(xq, wq, cfg)


def test_empty_and_invalid():
  cfg = lowacc.PAPER_M7E4
  y = fma_dot(jnp.zeros((2, 3, 0)), jnp.zeros((2, 0, 4)), cfg)
  assert_bits_equal(y, np.zeros((2, 3, 4), np.float32), 'empty contraction')
  x, w = jnp.ones((1, 2, 3)), jnp.ones((1, 3, 2))
  stochastic = cfg.replace(acc=cfg.acc.replace(rounding='stochastic'))
  with pytest.raises(NotImplementedError, match='stochastic'):
    fma_dot(x, w, stochastic)
  with pytest.raises(ValueError, match='order'):
    fma_dot(x, w, cfg.replace(order='chunk'))
  with pytest.raises(ValueError, match='acc=None'):
    fma_dot(x, w, AccumulatorConfig(acc=None))
  with pytest.raises(ValueError, match='float32'):
    fma_dot(x.astype(jnp.bfloat16), w, cfg)
  with pytest.raises(ValueError, match='powers of two'):
    fma_dot(jnp.ones((1, 8, 3)), jnp.ones((1, 3, 8)), cfg, block_m=6, interpret=False)


def test_lowers_to_triton_for_cuda():
  """Lowering for CUDA on this machine: every op of the kernel has a Pallas Triton rule."""
  pytest.importorskip('jax.experimental.pallas.triton')
  from lowacc.kernels import pallas_fma
  cfg = AccumulatorConfig(acc=FloatFormat(4, 0, underflow='none', overflow='none'),
                          product=lowacc.PAPER_PRODUCT, chunk_size=7, combine=None)
  x = jax.ShapeDtypeStruct((2, 128, 100), jnp.float32)
  w = jax.ShapeDtypeStruct((2, 100, 64), jnp.float32)
  for c in (cfg, lowacc.PAPER_M7E4):
    fn = jax.jit(lambda a, b, c=c: pallas_fma._fma_dot(c, 64, 64, False, 4, a, b))
    text = fn.trace(x, w).lower(lowering_platforms=('cuda',)).as_text()
    assert 'xla.gpu.triton' in text and 'lowacc_fma_dot' in text
