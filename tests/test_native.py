"""The native CPU kernel for order='chunk' against the exact oracle and the XLA path, bit for bit.

The contract leaves the order of the additions inside a chunk unspecified, so the kernel is
compared on operands whose chunk partials are exact in any order: small integers times powers of
two. The partials are placed across each format's range, so that the roundings, flushing and
every overflow mode are reached.
"""

import importlib.util
import itertools
import shutil
import subprocess
import types

import jax
import numpy as np
import pytest

import lowacc
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.dot import _Chain, _forward
from lowacc.kernels import native
from tests.conftest import assert_bits_equal
from tests.test_dot import oracle_dot

BATCHED = (((2,), (1,)), ((0,), (0,)))


def exact_operands(rng, shape_x, shape_w, scale_exp):
  """x, w of integers in [-7, 7] times 2^[0, 3], x scaled by 2^scale_exp: every product has at
  most 6 significant bits within 7 binades, so any sum of up to 2^11 of them is exact."""
  def draw(shape, e0):
    v = rng.integers(-7, 8, shape) * np.ldexp(1.0, rng.integers(0, 4, shape) + e0)
    return v.astype(np.float32)
  return draw(shape_x, scale_exp), draw(shape_w, 0)


def xla_path(cfg, x, w):
  return jax.jit(lambda a, b: _forward(_Chain.layout(cfg, a, b, None), False)[0])(x, w)


def test_kernel_is_available_here():
  # CI's machine builds the kernel (g++) and has AVX-512: a failed build must not pass unseen.
  assert native.available()


def _available_with(monkeypatch, path):
  """native.available() (uncached) as if the built library were the file at `path`."""
  monkeypatch.setattr(native.importlib.util, 'find_spec',
                      lambda name: types.SimpleNamespace(origin=str(path)))
  return native.available.__wrapped__()


def test_a_library_that_does_not_load_falls_back_with_one_warning(monkeypatch, tmp_path):
  built = importlib.util.find_spec('lowacc.kernels._chunk_dot').origin
  data = open(built, 'rb').read()
  libraries = {'half': data[:len(data) // 2], 'one byte short': data[:-1], 'text': b'garbage'}
  if shutil.which('g++'):  # a real library without the kernel's symbols
    src = tmp_path / 'other.cc'
    src.write_text('extern "C" int other() { return 0; }\n')
    subprocess.run(['g++', '-shared', '-fPIC', str(src), '-o', str(tmp_path / 'other.so')],
                   check=True)
    libraries['no symbol'] = (tmp_path / 'other.so').read_bytes()
  for name, content in libraries.items():
    path = tmp_path / f'{name}.so'
    path.write_bytes(content)
    with pytest.warns(UserWarning, match='does not load.*XLA path') as record:
      assert not _available_with(monkeypatch, path), name
    assert len(record) == 1, name
  assert native.available()  # the real one stays registered


FORMATS = {
    'M7E4b10 flush': dict(exp_bits=4, man_bits=7, bias=10, underflow='flush'),
    'M3E3 flush': dict(exp_bits=3, man_bits=3, underflow='flush'),
    'M0E3 flush': dict(exp_bits=3, man_bits=0, bias=2, underflow='flush'),
    'M10E5 none': dict(exp_bits=5, man_bits=10, underflow='none'),
}
OVERFLOWS = ('saturate', 'inf', 'none')
ROUNDINGS = ('nearest_even', 'toward_zero', 'up', 'down')


@pytest.mark.parametrize('name, overflow', itertools.product(FORMATS, OVERFLOWS))
def test_equals_xla_path_on_every_rounding_and_range(name, overflow):
  rng = np.random.default_rng(abs(hash((name, overflow))) % 2 ** 32)
  for rounding in ROUNDINGS:
    acc = FloatFormat(**FORMATS[name], rounding=rounding, overflow=overflow)
    cfg = AccumulatorConfig(acc=acc, chunk_size=16, order='chunk')
    assert native.supports(cfg)
    # Partials from below the format's smallest normal to above its largest.
    for scale_exp in (acc.min_exp - 8, acc.min_exp - 2, 0, acc.max_exp - 8, acc.max_exp - 3):
      x, w = exact_operands(rng, (2, 19, 70), (2, 70, 37), scale_exp)
      assert_bits_equal(native.chunk_dot(x, w, cfg), xla_path(cfg, x, w),
                        f'{acc} scale 2^{scale_exp}')


@pytest.mark.parametrize('rounding', ROUNDINGS)
@pytest.mark.parametrize('combine', ('acc', 'other', None))
def test_equals_exact_oracle(rounding, combine):
  # The independent reference: the exact rational chain of tests/oracle.py, per output element.
  acc = FloatFormat(3, 3, bias=4, rounding=rounding, underflow='flush', overflow='inf')
  other = FloatFormat(4, 5, bias=6, rounding='up', underflow='none', overflow='saturate')
  cfg = AccumulatorConfig(acc=acc, chunk_size=5, order='chunk',
                          combine=other if combine == 'other' else combine)
  rng = np.random.default_rng(ROUNDINGS.index(rounding))
  for scale_exp in (acc.min_exp - 6, -1, acc.max_exp - 5):
    x, w = exact_operands(rng, (1, 9, 23), (1, 23, 34), scale_exp)
    assert_bits_equal(native.chunk_dot(x, w, cfg), oracle_dot(x, w, cfg)[0],
                      f'{cfg} scale 2^{scale_exp}')


@pytest.mark.parametrize('combine, chunk_size', itertools.product(
    ('acc', 'other', None), (1, 5, 16, None)))
def test_equals_xla_path_for_every_combine_and_chunk(combine, chunk_size):
  acc = FloatFormat(4, 7, bias=10, rounding='toward_zero', underflow='flush')
  other = FloatFormat(5, 10, rounding='nearest_even', underflow='flush', overflow='inf')
  cfg = AccumulatorConfig(acc=acc, chunk_size=chunk_size, order='chunk',
                          combine=other if combine == 'other' else combine)
  rng = np.random.default_rng(chunk_size or 0)
  # Shapes off the kernel's 8 x 32 tiles and 256-row blocks; K not a multiple of the chunk.
  for (b, m, k, n), scale_exp in itertools.product(
      ((1, 1, 1, 1), (3, 7, 23, 5), (1, 300, 67, 33), (1, 64, 256, 64)), (-9, -2, 4)):
    x, w = exact_operands(rng, (b, m, k), (b, k, n), scale_exp)
    assert_bits_equal(native.chunk_dot(x, w, cfg), xla_path(cfg, x, w), f'{(b, m, k, n)}')


def test_special_values_and_zeros():
  cfg = lowacc.PAPER_M7E4.replace(order='chunk', product=None)
  rng = np.random.default_rng(5)
  x, w = exact_operands(rng, (1, 16, 48), (1, 48, 40), -3)
  x[0, 0, 3], x[0, 1, 20], x[0, 2, :] = np.inf, np.nan, 0.0
  w[0, 7, 5], w[0, 30, :] = -np.inf, -0.0
  assert_bits_equal(native.chunk_dot(x, w, cfg), xla_path(cfg, x, w), 'inf, nan and zeros')


def test_dot_general_takes_the_kernel_only_where_it_applies(monkeypatch):
  jax.clear_caches()  # so that every dot below is traced again, through the patched kernel
  calls = []
  real = native.chunk_dot
  monkeypatch.setattr(native, 'chunk_dot', lambda *a: calls.append(1) or real(*a))
  rng = np.random.default_rng(6)
  x, w = exact_operands(rng, (1, 8, 40), (1, 40, 8), 0)
  chunk = lowacc.PAPER_M7E4.replace(order='chunk', product=None)
  uncovered = [
      lowacc.PAPER_M7E4,  # order 'fma'
      lowacc.PAPER_M7E4.replace(order='chunk'),  # product rounding
      chunk.replace(acc=lowacc.FP16),  # subnormal underflow
      chunk.replace(ste='recursive_of'),  # its forward records the last forgetting step
  ]
  for cfg in uncovered:
    lowacc.dot_general(x, w, BATCHED, cfg)
  assert not calls
  assert_bits_equal(lowacc.dot_general(x, w, BATCHED, chunk), xla_path(chunk, x, w), 'wired')
  assert calls


def test_vmap_and_gradient_through_the_kernel():
  cfg = lowacc.PAPER_M7E4.replace(order='chunk', product=None)
  rng = np.random.default_rng(7)
  x, w = exact_operands(rng, (3, 10, 40), (3, 40, 12), -1)
  dot = lambda a, b: lowacc.matmul(a, b, cfg)
  assert_bits_equal(jax.vmap(dot)(x, w), np.stack([xla_path(cfg, x[i:i + 1], w[i:i + 1])[0]
                                                   for i in range(3)]), 'vmap')
  # The identity estimator's gradient is the float32 dot's: the kernel is a forward only.
  g = np.ones((10, 12), np.float32)
  dx, dw = jax.grad(lambda a, b: jax.numpy.vdot(dot(a, b), g), argnums=(0, 1))(x[0], w[0])
  assert_bits_equal(dx, g @ w[0].T, 'dx')
  assert_bits_equal(dw, x[0].T @ g, 'dw')


def test_vmap_folds_into_one_kernel_call():
  cfg = lowacc.PAPER_M7E4.replace(order='chunk', product=None)
  rng = np.random.default_rng(8)
  x, w = exact_operands(rng, (3, 2, 5, 40), (3, 2, 40, 6), -1)
  dot = lambda a, b: native.chunk_dot(a, b, cfg)  # noqa: E731
  hlo = jax.jit(jax.vmap(dot)).lower(x, w).as_text()  # one call, no loop over the examples
  assert hlo.count('custom_call @lowacc_chunk_dot') == 1 and 'while' not in hlo, hlo
  want = [xla_path(cfg, x[i], w[i]) for i in range(3)]
  assert_bits_equal(jax.vmap(dot)(x, w), np.stack(want), 'vmap over both')
  assert_bits_equal(jax.vmap(dot, (0, None))(x, w[0]),
                    np.stack([xla_path(cfg, x[i], w[0]) for i in range(3)]), 'vmap over x')
  nested = jax.vmap(jax.vmap(dot))(x[:, :, None], w[:, :, None])
  assert_bits_equal(nested[:, :, 0], np.stack(want), 'nested vmap')
