"""lowacc: bit-exact simulation of low-bit floating-point accumulators inside JAX dot products."""

from lowacc import hardware
from lowacc.accumulator import Accumulator
from lowacc.conv import ConvGeneralDilated, conv_general_dilated
from lowacc.dot import DotGeneral, accumulation_stats, dot_general, matmul
from lowacc.formats import (BF16, FP8_E3M4, FP8_E4M3, FP8_E5M2, FP16, FP32, PAPER_ACC,
                            PAPER_FP8_INPUT, PAPER_M7E4, PAPER_M7E4_FP8, PAPER_PRODUCT,
                            AccumulatorConfig, DotConfig, FloatFormat, InputQuant, IntFormat,
                            IntQuant)
from lowacc.policy import Policy, Rule, Site
from lowacc.quantize import quantize
from lowacc.simulate import coverage, simulate

__all__ = [
    'Accumulator', 'AccumulatorConfig', 'BF16', 'ConvGeneralDilated', 'DotConfig', 'DotGeneral',
    'FP16', 'FP32', 'FP8_E3M4', 'FP8_E4M3', 'FP8_E5M2', 'FloatFormat', 'InputQuant', 'IntFormat',
    'IntQuant', 'PAPER_ACC', 'PAPER_FP8_INPUT', 'PAPER_M7E4', 'PAPER_M7E4_FP8', 'PAPER_PRODUCT',
    'accumulation_stats', 'conv_general_dilated', 'dot_general', 'matmul',
    'quantize', 'Policy', 'Rule', 'Site', 'coverage', 'hardware', 'simulate',
]


def __getattr__(name):
  """`lowacc.nn` (which needs flax) is imported on first use, so `import lowacc` needs no flax."""
  if name == 'nn':
    import importlib
    return importlib.import_module('lowacc.nn')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
