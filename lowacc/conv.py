"""conv_general_dilated with the simulated accumulator: a dot of each output position with its patch.

The contraction runs over (kernel spatial dims..., input channel) row-major, the order of an im2col
patch in NHWC with HWIO kernels (spec section 3); feature groups are the dot's batch dimension.
Patches are gathered with pads and strided slices only, so no arithmetic touches the operands; on
the CPU the native kernel reads them from the padded input in place (`Patches.native`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lowacc.dot import dot_general, gathered_dot
from lowacc.formats import AccumulatorConfig, DotConfig
from lowacc.kernels import native
from lowacc.quantize import as_float32, result_dtype


@dataclasses.dataclass(frozen=True)
class Patches:
  """The im2col patches of a padded (and lhs-dilated) channels-last input xp (N, spatial..., C)
  as a convolution's GEMM operand: (groups, N * output positions, taps * C / groups), taps in
  row-major order of the kernel's spatial dims (spec section 3). Built with strided slices only,
  so no arithmetic touches the operands; `native` reads them from xp in place instead."""
  kernel: tuple
  strides: tuple
  dilation: tuple  # the kernel's (rhs_dilation)
  groups: int

  def out(self, padded: Sequence[int]) -> tuple:
    """Output positions per spatial dim of a padded spatial shape."""
    return tuple((p - (k - 1) * d - 1) // s + 1
                 for p, k, d, s in zip(padded, self.kernel, self.dilation, self.strides))

  def __call__(self, xp):
    out = self.out(xp.shape[1:-1])
    taps = []
    for tap in itertools.product(*(range(k) for k in self.kernel)):
      start = [0] + [t * d for t, d in zip(tap, self.dilation)] + [0]
      limit = ([xp.shape[0]] + [s + (o - 1) * st + 1
                                for s, o, st in zip(start[1:], out, self.strides)]
               + [xp.shape[-1]])
      taps.append(lax.slice(xp, start, limit, [1] + list(self.strides) + [1]))
    cols = jnp.stack(taps, axis=-2)  # (N, out..., taps, C)
    positions, cin = xp.shape[0] * math.prod(out), xp.shape[-1] // self.groups
    cols = cols.reshape(positions, len(taps), self.groups, cin).transpose(2, 0, 1, 3)
    return cols.reshape(self.groups, positions, len(taps) * cin)

  def native(self, xp, w, fwd: AccumulatorConfig):
    """The simulated forward of self(xp) . w by the native kernel, reading xp in place (1-d and
    2-d convolutions; a 1-d one as 2-d with one row)."""
    if len(self.kernel) == 1:
      return Patches((1,) + self.kernel, (1,) + self.strides, (1,) + self.dilation,
                     self.groups).native(xp[:, None], w, fwd)
    return native.conv(xp, w, fwd, self.kernel, self.strides, self.dilation,
                       self.out(xp.shape[1:-1]))


def _positive_ints(field: str, value, n: int):
  try:
    out = tuple(operator.index(v) for v in value)
  except TypeError:
    out = None
  if out is None or len(out) != n or min(out) < 1:
    raise ValueError(f'conv_general_dilated: {field}={value!r} is invalid: need {n} positive '
                     'ints, one per spatial dim')
  return out


def _padding(padding, n: int):
  """'SAME', 'SAME_LOWER', 'VALID' (any case, as lax), or n (low, high) pairs of ints."""
  if isinstance(padding, str):
    if padding.upper() in ('SAME', 'SAME_LOWER', 'VALID'):
      return padding
  else:
    try:
      pads = tuple((operator.index(lo), operator.index(hi)) for lo, hi in padding)
      if len(pads) == n:
        return pads
    except (TypeError, ValueError):
      pass
  raise ValueError(f"conv_general_dilated: padding={padding!r} is invalid: need 'SAME', "
                   f"'SAME_LOWER', 'VALID' or {n} (low, high) pairs of ints")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *,
                         config: AccumulatorConfig | DotConfig | None, key=None,
                         stats: bool = False):
  """`lax.conv_general_dilated` whose products are accumulated as `config` says.

  Bit for bit the result of `lowacc.dot_general` on the im2col patches (contraction over kernel
  spatial dims then input channel), per feature group. batch_group_count must be 1. stats=True
  returns (result, the patch GEMM's counters), as `lowacc.dot_general(..., stats=True)`.
  """
  if DotConfig.of(config) == DotConfig(None) and not stats:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  if batch_group_count != 1:
    raise ValueError(f'conv_general_dilated: batch_group_count={batch_group_count} is not '
                     'supported by the simulated accumulator; only 1 is')
  out_dtype = result_dtype(lhs, rhs, preferred_element_type)
  patches, xp, kern, finish = _patch_gemm(lhs, rhs, window_strides, padding, lhs_dilation,
                                          rhs_dilation, dimension_numbers, feature_group_count)
  if stats or len(patches.kernel) > 2:
    out = dot_general(patches(xp), kern, _PATCH_DIMS, config, key=key, stats=stats)
  else:  # the native kernel, where it applies, reads the patches from xp in place
    out = gathered_dot(patches, xp, kern, config, key=key)
  y, counters = out if stats else (out, None)
  y = finish(y).astype(out_dtype)
  return (y, counters) if stats else y


_PATCH_DIMS = (((2,), (1,)), ((0,), (0,)))  # (groups, positions, K) . (groups, K, out)


def _patch_gemm(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count):
  """The convolution as one GEMM: its Patches, the padded input they are read from, the kernel
  (groups, K, out) and the function that lays the GEMM's output out as the convolution's."""
  lhs, rhs = as_float32(lhs, 'lhs'), as_float32(rhs, 'rhs')
  nsp = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_spec, rhs_spec, out_spec = dn
  x = lhs.transpose((lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))  # N, spatial..., C
  k = rhs.transpose(tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))  # spatial..., I, O
  kernel_spatial = k.shape[:nsp]
  window_strides = _positive_ints('window_strides', window_strides, nsp)
  lhs_dilation = _positive_ints('lhs_dilation', lhs_dilation or (1,) * nsp, nsp)
  rhs_dilation = _positive_ints('rhs_dilation', rhs_dilation or (1,) * nsp, nsp)
  padding = _padding(padding, nsp)
  groups = feature_group_count
  channels, cin, cout = x.shape[-1], k.shape[-2], k.shape[-1]
  if groups < 1 or channels != cin * groups or cout % groups:
    raise ValueError(f'conv_general_dilated: feature_group_count={groups} does not fit '
                     f'{channels} input channels, a kernel of {cin} input and {cout} output '
                     'channels (need in_channels = kernel_in * groups, out % groups == 0)')
  if isinstance(padding, str):
    dilated_in = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], lhs_dilation)]
    spans = [(s - 1) * d + 1 for s, d in zip(kernel_spatial, rhs_dilation)]
    padding = lax.padtype_to_pads(dilated_in, spans, window_strides, padding)
  pad_cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
  xp = lax.pad(x, jnp.array(0, x.dtype), pad_cfg + [(0, 0, 0)])
  patches = Patches(tuple(kernel_spatial), window_strides, rhs_dilation, groups)
  n, out_spatial, taps = x.shape[0], patches.out(xp.shape[1:-1]), math.prod(kernel_spatial)
  if any(o <= 0 for o in out_spatial):
    spans = tuple((k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dilation))
    raise ValueError(f'conv: the dilated kernel {spans} does not fit the padded input '
                     f'{xp.shape[1:-1]}')
  kern = k.reshape(taps, cin, groups, cout // groups).transpose(2, 0, 1, 3)
  kern = kern.reshape(groups, taps * cin, cout // groups)

  def finish(y):
    y = y.transpose(1, 0, 2).reshape((n,) + tuple(out_spatial) + (cout,))
    # y is (N, spatial..., O); place each axis where out_spec wants it.
    order = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
    return y.transpose([order.index(i) for i in range(y.ndim)])

  return patches, xp, kern, finish


@dataclasses.dataclass(frozen=True)
class ConvGeneralDilated:
  """A hashable drop-in for `lax.conv_general_dilated` that simulates `config` (for Flax's
  `conv_general_dilated=`)."""
  config: Optional[AccumulatorConfig | DotConfig]

  def __post_init__(self):
    DotConfig.of(self.config)

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None, out_sharding=None):
    y = conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                             dimension_numbers, feature_group_count, batch_group_count, precision,
                             preferred_element_type, config=self.config)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)
