"""Convolutions equal dot_general on im2col patches (built here with numpy), bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowacc
from lowacc import AccumulatorConfig, FloatFormat, hardware
from tests.conftest import assert_bits_equal

CFG = AccumulatorConfig(acc=FloatFormat(4, 7, bias=10, rounding='toward_zero'),
                        product=FloatFormat(4, 7, bias=12, rounding='toward_zero'), chunk_size=16)


def numpy_patches(x, kernel, stride, pads, lhs_dil, rhs_dil):
  """im2col of NHWC x: (N, OH, OW, KH * KW * C), ordered (kernel row, kernel column, channel)."""
  n, h, w, c = x.shape
  kh, kw = kernel
  xd = np.zeros((n, (h - 1) * lhs_dil[0] + 1, (w - 1) * lhs_dil[1] + 1, c), x.dtype)
  xd[:, ::lhs_dil[0], ::lhs_dil[1]] = x
  xp = np.pad(xd, ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (xp.shape[1] - ((kh - 1) * rhs_dil[0] + 1)) // stride[0] + 1
  ow = (xp.shape[2] - ((kw - 1) * rhs_dil[1] + 1)) // stride[1] + 1
  cols = np.zeros((n, oh, ow, kh, kw, c), x.dtype)
  for i in range(kh):
    for j in range(kw):
      cols[:, :, :, i, j] = xp[:, i * rhs_dil[0]:, j * rhs_dil[1]:][
          :, :(oh - 1) * stride[0] + 1:stride[0], :(ow - 1) * stride[1] + 1:stride[1]]
  return cols


def conv_by_dot(x, k, stride, pads, lhs_dil, rhs_dil, groups, cfg):
  cols = numpy_patches(x, k.shape[:2], stride, pads, lhs_dil, rhs_dil)
  n, oh, ow, kh, kw, c = cols.shape
  cg, o = k.shape[2], k.shape[3]
  lhs = cols.reshape(n * oh * ow, kh, kw, groups, cg).transpose(3, 0, 1, 2, 4)
  lhs = lhs.reshape(groups, n * oh * ow, kh * kw * cg)
  rhs = k.reshape(kh, kw, cg, groups, o // groups).transpose(3, 0, 1, 2, 4)
  rhs = rhs.reshape(groups, kh * kw * cg, o // groups)
  y = lowacc.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))), cfg)
  return np.asarray(y).transpose(1, 0, 2).reshape(n, oh, ow, o)


CASES = [  # stride, padding, lhs dilation, rhs dilation, groups, kernel, in channels, out
    ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1, (3, 3), 8, 4),
    ((2, 2), ((0, 1), (2, 0)), (1, 1), (1, 1), 1, (3, 3), 5, 3),
    ((1, 2), ((2, 2), (1, 1)), (1, 1), (2, 1), 1, (3, 2), 4, 2),
    ((1, 1), ((1, 1), (0, 0)), (2, 1), (1, 1), 1, (2, 2), 3, 3),
    ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 4, (3, 3), 8, 8),   # grouped
    ((2, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 6, (3, 3), 6, 6),   # depthwise
    ((1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1, (1, 1), 16, 5),  # 1x1
]


@pytest.mark.parametrize('stride, pads, lhs_dil, rhs_dil, groups, kernel, cin, cout', CASES)
def test_conv_equals_dot_on_patches(stride, pads, lhs_dil, rhs_dil, groups, kernel, cin, cout,
                                    rng):
  x = rng.standard_normal((2, 7, 6, cin)).astype(np.float32)
  k = rng.standard_normal(kernel + (cin // groups, cout)).astype(np.float32)
  y = lowacc.conv_general_dilated(x, k, stride, pads, lhs_dil, rhs_dil, ('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups, config=CFG)
  expected = conv_by_dot(x, k, stride, pads, lhs_dil, rhs_dil, groups, CFG)
  assert_bits_equal(y, expected, 'conv vs dot on patches')
  ref = lax.conv_general_dilated(x, k, stride, pads, lhs_dil, rhs_dil, ('NHWC', 'HWIO', 'NHWC'),
                                 feature_group_count=groups)
  assert y.shape == ref.shape


def test_layouts_and_string_padding(rng):
  x = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
  k = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
  nhwc = lowacc.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO',
                                                                               'NHWC'), config=CFG)
  # SAME with stride 2 on 9 -> 5 outputs needs 2 pad rows: 1 before, 1 after.
  assert_bits_equal(nhwc, conv_by_dot(x, k, (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 1, CFG),
                    'SAME')
  nchw = lowacc.conv_general_dilated(x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1), (2, 2),
                                     'SAME', dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
                                     config=CFG)
  assert_bits_equal(np.asarray(nchw).transpose(0, 2, 3, 1), nhwc, 'NCHW')


def test_float32_config_and_gradients_match_lax(rng):
  x = rng.integers(-3, 4, (2, 6, 6, 3)).astype(np.float32)
  k = rng.integers(-3, 4, (3, 3, 3, 4)).astype(np.float32)
  args = ((1, 1), 'SAME', None, None, ('NHWC', 'HWIO', 'NHWC'))
  ours = lambda a, b: lowacc.conv_general_dilated(a, b, *args, config=AccumulatorConfig(acc=None))
  ref = lambda a, b: lax.conv_general_dilated(a, b, *args)
  assert_bits_equal(ours(x, k), ref(x, k), 'acc=None')
  g = rng.integers(-2, 3, (2, 6, 6, 4)).astype(np.float32)
  simulated = lambda a, b: lowacc.conv_general_dilated(a, b, *args, config=CFG)
  for o, r in zip(jax.grad(lambda a, b: jnp.sum(simulated(a, b) * g), (0, 1))(x, k),
                  jax.grad(lambda a, b: jnp.sum(ref(a, b) * g), (0, 1))(x, k)):
    assert_bits_equal(o, r, 'identity conv gradient')


def test_conv_callable_is_hashable_and_jits(rng):
  conv = lowacc.ConvGeneralDilated(CFG)
  assert conv == lowacc.ConvGeneralDilated(CFG) and hash(conv) == hash(lowacc.ConvGeneralDilated(CFG))
  x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
  k = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
  f = jax.jit(lambda a: conv(a, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  assert_bits_equal(f(x), lowacc.conv_general_dilated(x, k, (1, 1), 'VALID', dimension_numbers=(
      'NHWC', 'HWIO', 'NHWC'), config=CFG), 'jit')


# On the CPU the native kernel reads a convolution's patches from its padded input in place
# (lowacc.conv.Patches.native); the route through materialised patches (dot_general on
# Patches(xp), taken where native.supports is False) must give the same bits: forward, gradients
# (estimators and simulated backward GEMMs), second order and vmap.
ROUTE_CASES = [  # stride, padding, lhs dilation, rhs dilation, groups, kernel, cin, cout
    ((2, 1), ((1, 2), (0, 1)), (1, 2), (2, 1), 2, (3, 2), 6, 4),
    ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 5, (3, 3), 5, 5),   # depthwise
    ((3,), ((2, 1),), (1,), (2,), 1, (3,), 7, 3),                  # 1-d
]
ROUTE_CONFIGS = [
    lowacc.PAPER_M7E4,
    lowacc.DotConfig(CFG.replace(order='chunk', chunk_size=5), dlhs=CFG, drhs=CFG),
    lowacc.PAPER_M7E4.replace(acc=lowacc.PAPER_ACC.replace(underflow='none'),
                              ste='immediate_both'),
    hardware.parse('Hopper/wgmma/m64n8k32.f32.e5m2.e4m3'),  # a fused kind, two input types
]


def _layout(nsp):
  return ('NHWC', 'HWIO', 'NHWC') if nsp == 2 else ('NWC', 'WIO', 'NWC')


@pytest.mark.parametrize('case', ROUTE_CASES)
def test_native_patches_equal_materialised_patches(case, rng, monkeypatch):
  stride, pads, lhs_dil, rhs_dil, groups, kernel, cin, cout = case
  # Operands whose float32 gradient sums are exact, as the contract leaves their order open
  # (XLA fuses the patches' transpose differently in the two routes); the forward still rounds
  # and saturates (M7E4's max_normal is 127.5).
  x = (rng.integers(-15, 16, (2,) + (7, 6)[:len(kernel)] + (cin,)) / 4).astype(np.float32)
  k = rng.integers(-5, 6, kernel + (cin // groups, cout)).astype(np.float32)
  g = rng.integers(-2, 3, lax.conv_general_dilated(
      x, k, stride, pads, lhs_dil, rhs_dil, _layout(len(kernel)),
      feature_group_count=groups).shape).astype(np.float32)

  def run():
    out = {}
    for i, cfg in enumerate(ROUTE_CONFIGS):
      conv = lambda a, b, cfg=cfg: lowacc.conv_general_dilated(
          a, b, stride, pads, lhs_dil, rhs_dil, _layout(len(kernel)),
          feature_group_count=groups, config=cfg)
      out[i, 'y'] = jax.jit(conv)(x, k)
      out[i, 'grad'] = jax.grad(lambda a, b: jnp.sum(conv(a, b) * g), (0, 1))(x, k)
      out[i, 'vmap'] = jax.vmap(conv, (0, None))(np.stack([x, -x]), k)
      if i == 0:  # second order (the jvp of a gradient): the identity estimator's derivative
        loss = lambda a, b: jnp.sum(conv(a, b) ** 2)
        out[i, 'hvp'] = jax.jvp(lambda a: jax.grad(loss, (0, 1))(a, k), (x,), (x[::-1],))[1]
    return out

  native_route = run()
  monkeypatch.setattr(lowacc.dot.native, 'supports', lambda cfg: False)
  patch_route = run()
  for key in native_route:
    for a, b in zip(jax.tree.leaves(native_route[key]), jax.tree.leaves(patch_route[key])):
      assert_bits_equal(a, b, f'{case} {key}')


def test_native_conv_builds_no_patches():
  # ResNet-18's layer1 conv, batch 8: its im2col patches alone are 58 MiB; the padded input and
  # the output are 7 MiB each.
  x = jax.ShapeDtypeStruct((8, 56, 56, 64), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
  conv = jax.jit(lambda a, b: lowacc.conv_general_dilated(
      a, b, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), config=lowacc.PAPER_M7E4))
  compiled = conv.lower(x, k).compile()
  assert 'lowacc_chunk_dot' in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < 16 * 2 ** 20
