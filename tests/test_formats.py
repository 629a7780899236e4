"""Formats and configs: known ranges, presets, hashability, and clear errors for bad input."""

import jax
import numpy as np
import pytest

import lowacc
from lowacc import AccumulatorConfig, DotConfig, FloatFormat, InputQuant


@pytest.mark.parametrize('fmt, max_normal, min_normal', [
    (lowacc.FP16, 65504.0, 2.0 ** -14),
    (lowacc.BF16, 3.3895313892515355e38, 2.0 ** -126),
    (lowacc.FP8_E4M3, 240.0, 2.0 ** -6),
    (lowacc.FP8_E5M2, 57344.0, 2.0 ** -14),
    (FloatFormat(4, 3, overflow='saturate'), 480.0, 2.0 ** -6),  # all codes finite
    (lowacc.PAPER_ACC, 2.0 ** 5 * (2 - 2.0 ** -7), 2.0 ** -9),
    (lowacc.PAPER_PRODUCT, 2.0 ** 3 * (2 - 2.0 ** -7), 2.0 ** -11),
])
def test_ranges(fmt, max_normal, min_normal):
  assert fmt.max_normal == max_normal
  assert fmt.min_normal == min_normal


def test_paper_preset_and_names():
  cfg = lowacc.PAPER_M7E4
  assert (cfg.acc.name, cfg.product.name) == ('M7E4b10', 'M7E4b12')
  assert cfg.acc.width == 12 and cfg.chunk_size == 16 and cfg.order == 'fma'
  assert cfg.acc.rounding == 'toward_zero' and cfg.acc.underflow == 'flush'
  assert cfg.acc.overflow == 'saturate' and cfg.combine == 'acc'
  # b_acc = b_prod - log2(chunk) / 2
  assert cfg.acc.bias == cfg.product.bias - np.log2(cfg.chunk_size) / 2
  assert lowacc.PAPER_M7E4_FP8.lhs.scaling == 'per_tensor_pow2'
  assert lowacc.FP16.name == 'M10E5'


def test_configs_are_hashable_static_arguments():
  cfg = lowacc.PAPER_M7E4_FP8
  assert hash(cfg) == hash(lowacc.PAPER_M7E4.replace(lhs=cfg.lhs, rhs=cfg.rhs))
  assert DotConfig.of(cfg) == DotConfig(fwd=cfg)
  f = jax.jit(lambda x, c: lowacc.matmul(x, x, c), static_argnums=1)
  f(np.eye(3, dtype=np.float32), cfg)
  stage1 = cfg.replace(acc=cfg.acc.replace(underflow='none'))
  assert stage1 != cfg and stage1.acc.underflow == 'none'


@pytest.mark.parametrize('make, words', [
    (lambda: FloatFormat(0, 3), ['exp_bits=0', '[1, 30]']),
    (lambda: FloatFormat(4, -1), ['man_bits=-1', '[0, 23]']),
    (lambda: FloatFormat(4, 24), ['man_bits=24', '[0, 23]']),
    (lambda: FloatFormat(4.0, 3), ['exp_bits', 'int']),
    (lambda: FloatFormat(4, 3, rounding='floor'), ["rounding='floor'", 'nearest_even']),
    (lambda: FloatFormat(4, 3, underflow='ftz'), ["underflow='ftz'", 'subnormal']),
    (lambda: FloatFormat(4, 3, overflow='clip'), ["overflow='clip'", 'saturate']),
    (lambda: FloatFormat(9, 3), ['bias=255', 'float32']),
    (lambda: FloatFormat(5, 3, bias=-100), ['bias >= -96', 'float32']),
    (lambda: FloatFormat(4, 3, bias=200), ['bias <= 127', "underflow='none'"]),
    (lambda: FloatFormat(1, 3, overflow='inf'), ['exp_bits=1', 'no normal']),
    (lambda: InputQuant(lowacc.FP8_E4M3, 'per_row'), ["scaling='per_row'", 'per_tensor_pow2']),
    (lambda: InputQuant('e4m3'), ['InputQuant.format', 'FloatFormat']),
    (lambda: AccumulatorConfig(acc=lowacc.PAPER_ACC, chunk_size=0), ['chunk_size=0', '>= 1']),
    (lambda: AccumulatorConfig(acc=lowacc.PAPER_ACC, order='tree'), ["order='tree'", 'fma']),
    (lambda: AccumulatorConfig(acc=lowacc.PAPER_ACC, combine='fp32'), ["combine='fp32'", "'acc'"]),
    (lambda: AccumulatorConfig(acc=lowacc.PAPER_ACC, ste='recursive'), ["ste='recursive'",
                                                                        'recursive_of']),
    (lambda: AccumulatorConfig(acc='M7E4'), ['AccumulatorConfig.acc', 'FloatFormat']),
    (lambda: AccumulatorConfig(acc=None, product=lowacc.PAPER_PRODUCT), ['product', 'acc=None']),
    (lambda: DotConfig(fwd=lowacc.PAPER_M7E4.replace(ste='immediate_of'),
                       dlhs=lowacc.PAPER_M7E4), ['DotConfig.dlhs', "ste='identity'"]),
    (lambda: DotConfig.of('paper'), ['config', 'DotConfig']),
    (lambda: FloatFormat(10 ** 6, 7), ['exp_bits=1000000', '[1, 30]']),
    (lambda: FloatFormat(4, 7, bias=10 ** 6000), ['bias=<an int of 19932 bits>', '[-1073741824']),
    (lambda: FloatFormat(4, np.float64(7)), ['man_bits', 'int']),
    (lambda: AccumulatorConfig(acc=lowacc.PAPER_ACC, combine=np.array(['acc'])),
     ['combine=array', "'acc'"]),
    (lambda: AccumulatorConfig(acc=lowacc.PAPER_ACC, order=np.array(['fma'])), ['order=array']),
    (lambda: AccumulatorConfig(None, order='chunk', combine=lowacc.FP16),
     ["order='chunk'", 'ignored', 'acc=None', "'fma'"]),
    (lambda: AccumulatorConfig(None, combine=lowacc.FP16), ['combine=FloatFormat', 'acc=None']),
    (lambda: AccumulatorConfig(None, chunk_size=32), ['chunk_size=32', 'acc=None', '16']),
])
def test_invalid_configs_name_field_value_and_valid_range(make, words):
  with pytest.raises(ValueError) as err:
    make()
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def _conv(window_strides=(1, 1), padding='SAME', **kwargs):
  return lowacc.conv_general_dilated(np.ones((1, 4, 4, 2)), np.ones((3, 3, 2, 4)), window_strides,
                                     padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     config=lowacc.PAPER_M7E4, **kwargs)


def test_numpy_integers_are_ints():
  fmt = FloatFormat(np.int64(4), np.int32(7), bias=np.int16(10))
  assert fmt == lowacc.PAPER_ACC.replace(rounding='nearest_even', underflow='flush')
  assert type(fmt.exp_bits) is int and hash(fmt) == hash(FloatFormat(4, 7, bias=10))
  assert AccumulatorConfig(lowacc.PAPER_ACC, chunk_size=np.int64(8)).chunk_size == 8


@pytest.mark.parametrize('call, words', [
    (lambda: lowacc.dot_general(np.ones((2, 3)), np.ones((4, 2)), (((1,), (0,)), ((), ())),
                                lowacc.PAPER_M7E4), ['do not contract', '(3,)', '(4,)']),
    (lambda: lowacc.dot_general(np.ones((2, 3)), np.ones((3, 2)), (((2,), (0,)), ((), ())),
                                lowacc.PAPER_M7E4), ['dimension_numbers', 'lhs dims']),
    (lambda: lowacc.dot_general(np.ones((2, 3)), np.ones((3, 2)), 'ij,jk', lowacc.PAPER_M7E4),
     ['dimension_numbers', 'expected']),
    (lambda: lowacc.matmul(np.ones((2, 3)), np.ones((3, 2)), AccumulatorConfig(
        acc=FloatFormat(4, 7, rounding='stochastic'))), ['stochastic', 'key']),
    (lambda: lowacc.quantize(np.ones(3), FloatFormat(4, 7, rounding='stochastic')),
     ['stochastic', 'key']),
    (lambda: lowacc.quantize(np.array(['a']), lowacc.FP16), ['dtype <U1', 'float or integer']),
    (lambda: lowacc.conv_general_dilated(np.ones((1, 4, 4, 3)), np.ones((3, 3, 2, 4)), (1, 1),
                                         'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                         feature_group_count=2, config=lowacc.PAPER_M7E4),
     ['feature_group_count=2', '3 input channels']),
    (lambda: lowacc.conv_general_dilated(np.ones((2, 4, 4, 2)), np.ones((3, 3, 2, 4)), (1, 1),
                                         'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                         batch_group_count=2, config=lowacc.PAPER_M7E4),
     ['batch_group_count=2']),
    (lambda: _conv(window_strides=(0, 1)), ['window_strides=(0, 1)', '2 positive ints']),
    (lambda: _conv(lhs_dilation=(1, -1)), ['lhs_dilation=(1, -1)', 'positive']),
    (lambda: _conv(rhs_dilation=(2,)), ['rhs_dilation=(2,)', '2 positive ints']),
    (lambda: _conv(padding=((1, 1),)), ['padding=((1, 1),)', "'SAME'", '2 (low, high) pairs']),
    (lambda: _conv(padding='FULL'), ["padding='FULL'", "'VALID'"]),
    (lambda: lowacc.matmul(np.ones((2, 3)), np.ones((3, 2)), AccumulatorConfig(
        acc=FloatFormat(4, 7, rounding='stochastic')), key='garbage'), ["key='garbage'", 'PRNG']),
    (lambda: lowacc.matmul(np.ones((2, 3)), np.ones((3, 2)), lowacc.PAPER_M7E4,
                           key=np.ones(3, np.float32)), ['key=an array of float32', 'PRNG']),
    (lambda: lowacc.quantize(np.ones(3), FloatFormat(4, 7, rounding='stochastic'), key=7),
     ['key=7', 'PRNG key']),
])
def test_bad_calls_raise_clear_errors(call, words):
  with pytest.raises(ValueError) as err:
    call()
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def test_float64_is_refused_under_x64():
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match='dtype float64: lowacc simulates in float32'):
      lowacc.quantize(np.ones(3), lowacc.FP16)
