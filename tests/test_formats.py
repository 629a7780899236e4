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
    (lambda: FloatFormat(0, 3), ['exp_bits=0', '>= 1']),
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
])
def test_invalid_configs_name_field_value_and_valid_range(make, words):
  with pytest.raises(ValueError) as err:
    make()
  for word in words:
    assert word in str(err.value), (word, str(err.value))


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
