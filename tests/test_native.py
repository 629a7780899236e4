"""The native CPU kernel against the exact oracle and the XLA path, bit for bit.

Order 'chunk' without product rounding: the contract leaves the order of the additions inside a
chunk unspecified, so the kernel is compared on operands whose chunk partials are exact in any
order: small integers times powers of two. The partials are placed across each format's range, so
that the roundings, flushing and every overflow mode are reached. Order 'fma' and 'chunk' with
product rounding add in the XLA path's order, so they are compared on any operands: products
spread over the formats' ranges (tests.test_dot.operands) and the values of
tests.conftest.boundary_inputs (ties, ulps either side, overflow boundaries, specials).
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
from lowacc import AccumulatorConfig, FloatFormat, hardware
from lowacc.dot import _Chain, _forward
from lowacc.kernels import native
from tests.conftest import assert_bits_equal, boundary_inputs
from tests.test_dot import operands, oracle_dot

BATCHED = (((2,), (1,)), ((0,), (0,)))


def exact_operands(rng, shape_x, shape_w, scale_exp):
  """x, w of integers in [-7, 7] times 2^[0, 3], x scaled by 2^scale_exp: every product has at
  most 6 significant bits within 7 binades, so any sum of up to 2^11 of them is exact."""
  def draw(shape, e0):
    v = rng.integers(-7, 8, shape) * np.ldexp(1.0, rng.integers(0, 4, shape) + e0)
    return v.astype(np.float32)
  return draw(shape_x, scale_exp), draw(shape_w, 0)


def xla_path(cfg, x, w):
  return jax.jit(lambda a, b: _forward(_Chain.layout(cfg, a, b, None), False, False)[0])(x, w)


def brute_force_exact(a: FloatFormat, b: FloatFormat) -> bool:
  """Whether every float32 sum of a value of `a` and one of `b` is exact and not a float32
  subnormal (which the CPU flushes), by enumerating both formats' values (float64 sums of these
  are exact)."""
  def values(f):
    lo = f.min_exp if f.underflow == 'flush' else -126
    hi = 127 if f.overflow == 'none' else f.max_exp
    e, m = np.meshgrid(np.arange(lo, hi + 1), np.arange(2 ** f.man_bits))
    v = np.ldexp(1 + m / 2.0 ** f.man_bits, e).ravel()
    v = v[v <= f.max_normal] if f.overflow != 'none' else v
    return np.concatenate([v, -v, [0.0]])
  exact = values(a)[:, None] + values(b)[None, :]
  with np.errstate(over='ignore'):
    f32 = exact.astype(np.float32)
  return bool(np.all(f32.astype(np.float64) == exact)
              and np.all((exact == 0) | (np.abs(exact) >= 2.0 ** -126)))


def test_exact_sum_predicate_equals_brute_force():
  # The fast path's proof (native.exact_sum) against enumeration of every sum of small formats.
  small = [FloatFormat(e, m, bias=bias, underflow='flush', overflow=overflow)
           for e, m, bias, overflow in itertools.product(
               (2, 3), (0, 2, 4, 7), (-3, 1, 5), ('saturate', 'inf'))
           if FloatFormat(e, m, bias=bias, underflow='flush', overflow=overflow).e_top >= 1]
  small += [FloatFormat(2, 0, underflow='none'), FloatFormat(2, 2, bias=1, overflow='none')]
  verdicts = set()
  for a, b in itertools.product(small, repeat=2):
    want = brute_force_exact(a, b)
    assert native.exact_sum(a, b) == want, (a, b)
    verdicts.add(want)
  assert verdicts == {True, False}
  # The paper's pairs: acc + product and acc + acc are exact; float32 products never are.
  assert native.exact_sum(lowacc.PAPER_ACC, lowacc.PAPER_PRODUCT)
  assert native.exact_sum(lowacc.PAPER_ACC, lowacc.PAPER_ACC)
  assert not native.exact_sum(lowacc.PAPER_ACC, None)


def test_kernel_is_available_here():
  # CI's machine builds the kernel (g++) and has AVX-512: a failed build must not pass unseen.
  assert native.available()


def _available_with(monkeypatch, path):
  """native.available() (uncached) as if the built library were the file at `path`."""
  monkeypatch.setattr(native.importlib.util, 'find_spec',
                      lambda name: types.SimpleNamespace(origin=str(path)))
  return native.available.__wrapped__()


def test_a_library_that_does_not_load_falls_back_with_one_warning(monkeypatch, tmp_path):
  # Cached before find_spec is patched: a first call under the patch would cache False for
  # every later test of this process.
  assert native.available()
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
      assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w),
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
    assert_bits_equal(native.dot(x, w, cfg), oracle_dot(x, w, cfg)[0],
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
    assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{(b, m, k, n)}')


def test_special_values_and_zeros():
  cfg = lowacc.PAPER_M7E4.replace(order='chunk', product=None)
  rng = np.random.default_rng(5)
  x, w = exact_operands(rng, (1, 16, 48), (1, 48, 40), -3)
  x[0, 0, 3], x[0, 1, 20], x[0, 2, :] = np.inf, np.nan, 0.0
  w[0, 7, 5], w[0, 30, :] = -np.inf, -0.0
  assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), 'inf, nan and zeros')


def test_scaled_total_where_it_applies():
  chunk = lowacc.PAPER_M7E4.replace(order='chunk', product=None)
  acc = chunk.acc
  for cfg in (chunk, chunk.replace(product=lowacc.PAPER_PRODUCT),
              chunk.replace(product=lowacc.PAPER_PRODUCT.replace(rounding='up')),
              chunk.replace(combine=acc, chunk_size=None)):
    assert native.scaled_total(cfg), cfg
  e5 = FloatFormat(5, 7, bias=18, rounding='toward_zero', underflow='flush', overflow='saturate')
  assert not native.exact_sum(e5, e5)  # its sums of two values may be inexact
  for cfg in (chunk.replace(combine=None), chunk.replace(combine=lowacc.FP16),
              chunk.replace(order='fma'), chunk.replace(acc=e5),
              chunk.replace(acc=acc.replace(rounding='nearest_even')),
              chunk.replace(acc=acc.replace(underflow='none')),
              chunk.replace(acc=acc.replace(overflow='inf'))):
    assert not native.scaled_total(cfg), cfg


@pytest.mark.parametrize('product', (None, 'toward_zero', 'nearest_even', 'up'))
def test_scaled_total_equals_xla_path_and_oracle(product):
  # Chunk partials from below the acc's min_normal (flushed, of either sign) to beyond its
  # max_normal (saturated), and with product rounding any operands, specials included.
  paper = lowacc.PAPER_M7E4
  rng = np.random.default_rng(17)
  for chunk in (5, 16, None):
    cfg = paper.replace(order='chunk', chunk_size=chunk, product=product and paper.product.replace(
        rounding=product))
    assert native.scaled_total(cfg), cfg
    for scale_exp in (cfg.acc.min_exp - 8, cfg.acc.min_exp - 3, -1, cfg.acc.max_exp - 6,
                      cfg.acc.max_exp - 2):
      x, w = exact_operands(rng, (2, 11, 41), (2, 41, 35), scale_exp)
      context = f'{cfg} scale 2^{scale_exp}'
      assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), context)
      if chunk == 5:
        assert_bits_equal(native.dot(x, w, cfg), oracle_dot(x, w, cfg)[0], f'{context} oracle')
    if product is not None:
      for seed in range(2):
        x, w = boundary_operands(cfg, seed)
        assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{cfg} seed {seed}')
  # The zero signs of float32_sum(+0, P): T flushed to -0 (Q_acc(-1.5 mn + 1.25 mn)), then a
  # chunk whose float32 partial is -0 (products flushed from float32 subnormals), whose s is +0,
  # so T becomes +0 (columns 0, 1); after a chunk of tiny negative normals s is -0, and so is T
  # (column 2).
  cfg = paper.replace(order='chunk', chunk_size=5, product=None)
  mn = cfg.acc.min_normal
  x, w = np.zeros((1, 2, 15), np.float32), np.ones((1, 15, 3), np.float32)
  x[0, :, 0], x[0, :, 5], x[0, :, 10:] = -1.5 * mn, 1.25 * mn, 2.0 ** -64
  w[0, 10:, :2], w[0, 10:, 2] = -(2.0 ** -64), -1.0
  y = native.dot(x, w, cfg)
  assert_bits_equal(y, xla_path(cfg, x, w), 'zero signs')
  assert np.signbit(y[0, :, 2]).all() and not np.signbit(y[0, :, :2]).any(), y


def test_dot_general_takes_the_kernel_only_where_it_applies(monkeypatch):
  jax.clear_caches()  # so that every dot below is traced again, through the patched kernel
  calls = []
  real = native.dot
  monkeypatch.setattr(native, 'dot', lambda *a: calls.append(1) or real(*a))
  rng = np.random.default_rng(6)
  x, w = exact_operands(rng, (1, 8, 40), (1, 40, 8), 0)
  paper = lowacc.PAPER_M7E4
  stochastic = paper.acc.replace(rounding='stochastic')
  uncovered = [
      paper.replace(acc=stochastic),  # stochastic rounding
      paper.replace(product=paper.product.replace(rounding='stochastic')),
      paper.replace(combine=stochastic),
      paper.replace(acc=lowacc.FP16),  # subnormal underflow
      paper.replace(product=lowacc.BF16),
      paper.replace(order='chunk', combine=lowacc.FP16),
      # man_bits 23: no bit dropped
      paper.replace(product=FloatFormat(8, 23, underflow='none', overflow='inf')),
      paper.replace(acc=paper.acc.replace(exp_bits=8, bias=127, overflow='inf')),  # flush at 2^-126
  ]
  assert not any(map(native.supports, uncovered))
  # The kernel computes its values, but its forward must also record the last forgetting step.
  uncovered.append(paper.replace(ste='recursive_of'))
  for cfg in uncovered:
    lowacc.dot_general(x, w, BATCHED, cfg, key=jax.random.key(0) if cfg.stochastic else None)
  assert not calls
  for cfg in (paper, paper.replace(order='chunk'), paper.replace(order='chunk', product=None),
              paper.replace(ste='immediate_both')):
    assert native.supports(cfg), cfg
    assert_bits_equal(lowacc.dot_general(x, w, BATCHED, cfg), xla_path(cfg, x, w), f'{cfg}')
    assert calls
    calls.clear()


KINDS = {'chunk': lowacc.PAPER_M7E4.replace(order='chunk', product=None),
         'chunk, products': lowacc.PAPER_M7E4.replace(order='chunk'), 'fma': lowacc.PAPER_M7E4}


@pytest.mark.parametrize('kind', KINDS)
def test_vmap_and_gradient_through_the_kernel(kind):
  cfg = KINDS[kind]
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
  # Second order differentiates the forward (the kernel): the exact dot's derivative.
  loss = lambda a: jax.numpy.vdot(dot(a, w[0]), g)
  assert_bits_equal(jax.jvp(jax.grad(loss), (x[0],), (x[0],))[1], np.zeros_like(x[0]), 'jvp')


@pytest.mark.parametrize('kind', KINDS)
def test_vmap_folds_into_one_kernel_call(kind):
  cfg = KINDS[kind]
  rng = np.random.default_rng(8)
  x, w = exact_operands(rng, (3, 2, 5, 40), (3, 2, 40, 6), -1)
  dot = lambda a, b: native.dot(a, b, cfg)  # noqa: E731
  hlo = jax.jit(jax.vmap(dot)).lower(x, w).as_text()  # one call, no loop over the examples
  assert hlo.count('custom_call @lowacc_chunk_dot') == 1 and 'while' not in hlo, hlo
  want = [xla_path(cfg, x[i], w[i]) for i in range(3)]
  assert_bits_equal(jax.vmap(dot)(x, w), np.stack(want), 'vmap over both')
  assert_bits_equal(jax.vmap(dot, (0, None))(x, w[0]),
                    np.stack([xla_path(cfg, x[i], w[0]) for i in range(3)]), 'vmap over x')
  nested = jax.vmap(jax.vmap(dot))(x[:, :, None], w[:, :, None])
  assert_bits_equal(nested[:, :, 0], np.stack(want), 'nested vmap')


# Order 'fma' and 'chunk' with product rounding, through every mode the kernel covers: each acc
# rounding with each (underflow, overflow) pair; products, combine and chunk sizes cycle through
# theirs, so that fast (exact-sum) and TwoSum steps, each combine and short chunks all occur.
COVERED_RANGES = list(itertools.product(('flush', 'none'), OVERFLOWS))
PRODUCTS = [None, dict(exp_bits=4, man_bits=7, bias=12), dict(exp_bits=4, man_bits=3),
            dict(exp_bits=5, man_bits=2, bias=12), dict(exp_bits=3, man_bits=0, bias=2)]
COMBINES = ('acc', 'other', None)
CHUNKS = (16, 5, 1, None)
KERNEL_CASES = [(rounding, uf, of, i) for rounding in ROUNDINGS
                for i, (uf, of) in enumerate(COVERED_RANGES)]


def kernel_config(order, rounding, underflow, overflow, i):
  acc = FloatFormat(4, 7, bias=10, rounding=rounding, underflow=underflow, overflow=overflow)
  j = ROUNDINGS.index(rounding) + i
  product = PRODUCTS[j % len(PRODUCTS)]
  uf, of = COVERED_RANGES[(j + 1) % len(COVERED_RANGES)]
  if underflow == 'flush' and overflow != 'none':
    # The paper's pair (exact sums: the fast path), or its product one binade lower (bias 13),
    # just past native.exact_sum's bound: sums of a large acc and a small product are inexact.
    product, uf, of = dict(PRODUCTS[1], bias=12 + j // 2 % 2), 'flush', OVERFLOWS[j % 2]
  if product is not None:
    product = FloatFormat(**product, rounding=ROUNDINGS[(j + 2) % 4], underflow=uf, overflow=of)
  combine = COMBINES[j % 3]
  other = FloatFormat(5, 10, rounding=ROUNDINGS[(j + 1) % 4], underflow='flush', overflow='inf')
  return AccumulatorConfig(acc=acc, product=product, order=order, chunk_size=CHUNKS[j % 4],
                           combine=other if combine == 'other' else combine)


def boundary_operands(cfg, seed):
  """x (1, 6, 37), w (1, 37, 35): products across the acc's range, rows of x and a row of w
  from boundary_inputs (ties, ulps either side, min_normal, overflow boundaries, zeros, inf, NaN)
  of the acc and the product format, and a column of w of ones, where the products are those
  values themselves."""
  x, w = operands(cfg.acc, (1, 6, 37), (1, 37, 35), seed)
  edge = boundary_inputs(cfg.acc, 6 * 37 + 35, seed)
  x[0, 5, :] = edge[:37]  # one row of edge values meets every column
  w[0, 3, :] = edge[37:72]
  x[0, 4, :] = boundary_inputs(cfg.product or cfg.acc, 6 * 37, seed + 1)[:37]
  for i, f in enumerate(filter(None, (cfg.product, cfg.acc))):  # each format's range ends
    x[0, 4, 8 * i:8 * i + 8] = [f.min_normal, -f.min_normal, f.max_normal, -f.max_normal,
                                f.min_normal * 1.5, f.min_normal / 2, 0.0, -0.0]
  x[0, 0, 30:] = 1.0  # one row whose last products are w's own values
  w[0, :, 0] = 1.0
  return x, w


def test_kernel_cases_take_both_kinds_of_step():
  exact = {native.exact_sum(c.acc, c.product)
           for c in (kernel_config('fma', *case) for case in KERNEL_CASES)}
  assert exact == {True, False}


@pytest.mark.parametrize('rounding, underflow, overflow, i', KERNEL_CASES)
def test_fma_and_chunk_with_products_equal_xla_path(rounding, underflow, overflow, i):
  for order in ('fma', 'chunk'):
    cfg = kernel_config(order, rounding, underflow, overflow, i)
    if order == 'chunk' and cfg.product is None:
      continue  # the fused multiply-add kernel, compared on exact operands above
    assert native.supports(cfg), cfg
    for seed in range(2):
      x, w = boundary_operands(cfg, seed + 10 * i)
      assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{cfg} seed {seed}')


@pytest.mark.parametrize('order', ('fma', 'chunk'))
def test_fma_and_chunk_with_products_equal_exact_oracle(order):
  acc = FloatFormat(3, 3, bias=4, rounding='nearest_even', underflow='flush', overflow='inf')
  product = FloatFormat(3, 2, bias=5, rounding='up', underflow='flush', overflow='saturate')
  other = FloatFormat(4, 5, bias=6, rounding='down', underflow='none', overflow='saturate')
  rng = np.random.default_rng(11)
  for combine, chunk in (('acc', 4), (other, 7), (None, None)):
    cfg = AccumulatorConfig(acc=acc, product=product, chunk_size=chunk, order=order,
                            combine=combine)
    for scale_exp in (acc.min_exp - 4, -1, acc.max_exp - 4):
      x, w = exact_operands(rng, (1, 5, 19), (1, 19, 7), scale_exp)
      assert_bits_equal(native.dot(x, w, cfg), oracle_dot(x, w, cfg)[0],
                        f'{cfg} scale 2^{scale_exp}')


def test_paper_preset_specials_equal_xla_path_and_oracle():
  cfg = lowacc.PAPER_M7E4
  x, w = exact_operands(np.random.default_rng(12), (1, 6, 40), (1, 40, 9), -2)
  x[0, 0, 3], x[0, 1, 20], x[0, 2, :] = np.inf, np.nan, -0.0
  x[0, 3, :] = 0.0
  w[0, 7, 5], w[0, 30, :] = -np.inf, -0.0
  x[0, 4, :] = 4.0  # saturates: +-max_normal
  want = oracle_dot(x, w, cfg)[0]
  for c in (cfg, cfg.replace(order='chunk')):
    assert_bits_equal(native.dot(x, w, c), xla_path(c, x, w), f'{c}')
  assert_bits_equal(native.dot(x, w, cfg), want, 'oracle')
  zeros = np.asarray(native.dot(x, w, cfg))[0, 2:4]  # rows of zeros, but 0 * inf = NaN
  assert not np.signbit(zeros[~np.isnan(zeros)]).any()  # +0: the chain starts at +0


def test_skinny_products_run_transposed_with_the_same_bits():
  # A depthwise convolution's GEMM has one column; the kernel computes y^T = w^T x^T instead,
  # whose register tiles are full (native._transposed_is_faster). Boundary operands, under vmap
  # too, against the XLA path.
  assert native._transposed_is_faster(12544, 1) and native._transposed_is_faster(70, 5)
  assert not native._transposed_is_faster(6, 35) and not native._transposed_is_faster(64, 64)
  for n, cfg in ((1, lowacc.PAPER_M7E4), (5, kernel_config('fma', 'up', 'none', 'inf', 1)),
                 (1, kernel_config('chunk', 'nearest_even', 'flush', 'saturate', 2))):
    x, w = boundary_operands(cfg, n)
    x = np.concatenate([x] * 12, axis=1)[:, :70]  # 70 rows
    w = w[:, :, :n]
    assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{cfg} n={n}')
    xs, ws = np.stack([x, -x]), np.stack([w, w[:, :, ::-1]])
    assert_bits_equal(jax.vmap(lambda a, b: native.dot(a, b, cfg))(xs, ws),
                      np.stack([xla_path(cfg, a, b) for a, b in zip(xs, ws)]), f'{cfg} vmap')


@pytest.mark.parametrize('rounding', ('toward_zero', 'up', 'down'))
def test_directed_steps_equal_exact_oracle_at_float32s_ends(rounding):
  # A directed acc rounds each inexact step's float32 sum in its own direction (chunk_dot.cc's
  # DirectedStep) instead of taking TwoSum. Where that could differ, at both ends of float32:
  # - underflow 'none' (the paper's stage 1) with float32 products (24 bits) below 2^-102,
  #   where TwoSum's error is a float32 subnormal, which the CPU flushes; the first two rows are
  #   2^-100 - (2^-108 + 2^-131), whose exact truncation is one grid point below fl32's;
  # - an acc near float32's top (E8 M7), whose sums exceed float32: the float32 sum is then
  #   float32's max or an infinity, which must overflow as the exact sum.
  rng = np.random.default_rng(14)
  stage1 = lowacc.PAPER_ACC.replace(rounding=rounding, underflow='none')
  x = np.ldexp(1 + rng.integers(0, 2 ** 23, (1, 8, 13)) / 2 ** 23,
               rng.integers(-126, -100, (1, 8, 13))) * rng.choice([-1, 1], (1, 8, 13))
  x[0, :, 0] = np.ldexp(1 + rng.integers(0, 128, 8) / 128, rng.integers(-104, -95, 8))
  x[0, :2, :2] = [[2.0 ** -100, -(2.0 ** -108 + 2.0 ** -131)],
                  [-2.0 ** -100, 2.0 ** -108 + 2.0 ** -131]]
  top = np.ldexp(1 + rng.integers(0, 128, (1, 8, 13)) / 128, rng.integers(120, 128, (1, 8, 13)))
  top *= rng.choice([-1, 1], top.shape)
  ones = np.ones((1, 13, 3), np.float32)
  cases = [(stage1, None, x), (stage1, stage1.replace(bias=12), x)]
  cases += [(FloatFormat(8, 7, bias, rounding=rounding, underflow=u, overflow=o), None, top)
            for o, bias, u in (('inf', 127, 'none'), ('saturate', 128, 'none'))]
  for acc, product, v in cases:
    cfg = AccumulatorConfig(acc=acc, product=product, chunk_size=None, combine=None)
    assert native.supports(cfg) and not native.exact_sum(acc, product), cfg
    v = v.astype(np.float32)
    assert_bits_equal(native.dot(v, ones, cfg), oracle_dot(v, ones, cfg)[0], f'{cfg}')


@pytest.mark.parametrize('rounding', ROUNDINGS)
def test_fast_path_only_where_sums_are_exact(rounding):
  # Products down to 2^-23 meet an accumulator near 2^5, whose float32 ulp is 2^-18: there
  # fl32(s + p) = s loses p, and only TwoSum's sticky bit rounds s + p correctly. A predicate
  # that let this pair take the fast path fails here.
  acc = lowacc.PAPER_ACC.replace(rounding=rounding)
  product = FloatFormat(5, 2, bias=24, rounding=rounding, underflow='flush', overflow='saturate')
  cfg = AccumulatorConfig(acc=acc, product=product, chunk_size=None)
  assert not native.exact_sum(acc, product)
  x = np.full((1, 4, 9), 2.0 ** -12, np.float32)
  x[0, :, 0] = 40.0
  w = np.array([1.0] + [-2.0 ** -11] * 8, np.float32)[None, :, None] * np.array(
      [1, -1, 3, -3], np.float32)[None, None, :]
  assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), rounding)
  assert_bits_equal(native.dot(x, w, cfg), oracle_dot(x, w, cfg)[0], f'{rounding} oracle')


def _paper(acc_rounding, product_rounding, **product):
  return lowacc.PAPER_M7E4.replace(acc=lowacc.PAPER_ACC.replace(rounding=acc_rounding),
                                   product=lowacc.PAPER_PRODUCT.replace(
                                       rounding=product_rounding, **product))


def test_scaled_path_where_it_applies():
  for a, p in itertools.product(('toward_zero', 'nearest_even'), repeat=2):
    assert native.scaled(_paper(a, p)), (a, p)
  cfg = lowacc.PAPER_M7E4
  assert native.scaled(cfg.replace(combine=None, chunk_size=None))
  # The product's min_normal equal to the acc's: a toward_zero acc, but not a nearest_even one.
  assert native.scaled(_paper('toward_zero', 'nearest_even', bias=10))
  assert not native.scaled(_paper('nearest_even', 'toward_zero', bias=10))
  # A nearest_even acc where a sum may fall below min_normal 2^-(23 - man_bits): E2M7 bias 1
  # (min_normal 1) with products of quantum 2^-20.
  acc = FloatFormat(2, 7, bias=1, rounding='nearest_even', underflow='flush', overflow='saturate')
  fine = FloatFormat(2, 10, bias=11, rounding='nearest_even', underflow='flush',
                     overflow='saturate')
  assert native.exact_sum(acc, fine)
  assert not native.scaled(AccumulatorConfig(acc=acc, product=fine))
  assert native.scaled(AccumulatorConfig(acc=acc.replace(rounding='toward_zero'), product=fine))
  # Order 'chunk': the product alone decides (its acc rounds each chunk's float32 sum).
  chunk = cfg.replace(order='chunk')
  assert native.scaled(chunk)
  assert native.scaled(chunk.replace(acc=cfg.acc.replace(rounding='up', underflow='none')))
  for product in (cfg.product.replace(rounding='down'), cfg.product.replace(underflow='none'),
                  cfg.product.replace(overflow='inf'), None):
    assert not native.scaled(chunk.replace(product=product)), product
  for other in (cfg.replace(product=None),
                _paper('up', 'toward_zero'), _paper('toward_zero', 'down'),
                cfg.replace(acc=cfg.acc.replace(overflow='inf')),
                cfg.replace(product=cfg.product.replace(underflow='none')),
                cfg.replace(product=cfg.product.replace(bias=13)),  # inexact sums
                cfg.replace(acc=FloatFormat(4, 7, bias=-2, rounding='toward_zero',
                                            underflow='flush', overflow='saturate'))):
    assert not native.scaled(other), other


SCALED_CASES = list(itertools.product(('toward_zero', 'nearest_even'), repeat=2))


@pytest.mark.parametrize('acc_rounding, product_rounding', SCALED_CASES)
@pytest.mark.parametrize('order', ('fma', 'chunk'))
def test_scaled_path_equals_xla_path(order, acc_rounding, product_rounding):
  # Products at and around each format's flush point, and those whose Veltkamp splitting would
  # not flush (|v| just below min_normal 2^-(23 - man_bits)), which must become zeros: after a
  # small acc value, to which the product's min_normal (the wrong result) would add.
  i = SCALED_CASES.index((acc_rounding, product_rounding))
  for j, (combine, chunk) in enumerate((('acc', 16), (None, 5), (lowacc.PAPER_ACC, None))):
    cfg = _paper(acc_rounding, product_rounding, bias=12 - (i + j) % 2 * 2).replace(
        combine=combine, chunk_size=chunk, order=order)
    assert native.scaled(cfg) == (order == 'chunk' or acc_rounding == 'toward_zero'
                                  or (i + j) % 2 == 0), cfg
    for seed in range(2):
      x, w = boundary_operands(cfg, seed + 10 * i)
      band = cfg.product.min_normal * 2.0 ** (cfg.product.man_bits - 23)
      x[0, 1, 0] = 1.5 * cfg.acc.min_normal
      x[0, 1, 1:13] = band * np.array([1 - 2 ** -20, 1 - 2 ** -18, 1 - 2 ** -17, 1, 1 + 2 ** -16,
                                      0.5] * 2) * np.repeat([1, -1], 6)
      x[0, 2, :8] = cfg.acc.min_normal * np.array([1, -1, 1 - 2 ** -9, -(1 - 2 ** -9), 0.5,
                                                   1 - 2 ** -8, 2 ** -16, -2 ** -17])
      assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{cfg} seed {seed}')
      # Finite operands take the kernel's finite variant; products still overflow to inf.
      x, w = (np.where(np.isfinite(a), a, np.copysign(np.float32(3e38), a)) for a in (x, w))
      assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{cfg} seed {seed} finite')


@pytest.mark.parametrize('acc_rounding', ('toward_zero', 'nearest_even'))
@pytest.mark.parametrize('order', ('fma', 'chunk'))
def test_scaled_path_equals_exact_oracle(order, acc_rounding):
  cfg = _paper(acc_rounding, acc_rounding).replace(order=order)
  assert native.scaled(cfg)
  x, w = exact_operands(np.random.default_rng(13), (1, 5, 37), (1, 37, 6), -4)
  x[0, 0, 3], x[0, 1, 20], w[0, 7, 5] = np.inf, np.nan, -np.inf
  x[0, 2, :] = 4.0  # saturates
  assert_bits_equal(native.dot(x, w, cfg), oracle_dot(x, w, cfg)[0], f'{cfg}')


# Matrix units' fused dot products (chunk_dot.cc's Fused): f16 and f32 outputs, both roundings,
# each input type's range, mixed FP8 types; test_hardware checks every preset against mmasim.
FUSED_PRESETS = ('Volta/mma/m8n8k4.f16.f16.f16.f16', 'Ampere/mma/m16n8k8.f32.tf32.tf32.f32',
                 'Ampere/mma/m16n8k16.f32.bf16.bf16.f32', 'Ampere/mma/m16n8k16.f16.f16.f16.f16',
                 'Hopper/wgmma/m64n8k32.f32.e5m2.e4m3',
                 'Blackwell/tcgen05.mma/m64n8k16.f32.f16.f16')


def fused_operands(rng, acc, kind, n):
  """x (2, 37, K), w (2, K, n), K = 3 groups and 5 (a short last group): normal values, a
  wide range of exponents (beyond each input type's both ends), or specials planted across
  groups: +inf then -inf (NaN), inf x 0, a NaN, an overflow (of an f16 output) then -inf, a row
  of signed zeros, and products just below 2^e_zero beside zero products, whose e_zero is then
  the largest exponent."""
  group = acc.group
  k = 3 * group + 5
  scale = lambda shape: np.exp2(rng.integers(-40, 24, shape)) if kind == 'wide' else 1.0
  x = rng.standard_normal((2, 37, k)) * scale((2, 37, k))
  w = rng.standard_normal((2, k, n)) * scale((2, k, n))
  if kind == 'special':
    x[0, 0, 1], x[0, 0, 2 * group + 1] = np.inf, -np.inf
    x[0, 1, 3], w[0, 3, 0] = np.inf, 0.0
    x[0, 2, 5] = np.nan
    x[0, 3, :group], w[0, :group, :] = 300.0, 300.0
    x[0, 3, group + 2] = -np.inf
    x[1, 0, :] = np.where(np.arange(k) % 2, 0.0, -0.0)
    tiny = 2.0 ** ((acc.e_zero - 3) // 2)
    x[1, 1, :], w[1, :, :] = tiny * (1 + rng.random(k)), tiny * (1 + rng.random((k, n)))
    x[1, 1, ::3] = 0.0
  return x.astype(np.float32), w.astype(np.float32)


@pytest.mark.parametrize('name', FUSED_PRESETS)
def test_fused_dot_products_equal_xla_path(name):
  cfg = hardware.parse(name)
  assert native.supports(cfg)
  rng = np.random.default_rng(len(name))
  for kind, n in itertools.product(('normal', 'wide', 'special'), (45, 1)):  # 1: transposed
    with np.errstate(over='ignore', invalid='ignore'):
      x, w = fused_operands(rng, cfg.acc, kind, n)
    assert_bits_equal(native.dot(x, w, cfg), xla_path(cfg, x, w), f'{name} {kind} n={n}')
  xs, ws = np.stack([x, -x]), np.stack([w, w[:, ::-1]])
  assert_bits_equal(jax.vmap(lambda a, b: native.dot(a, b, cfg))(xs, ws),
                    np.stack([xla_path(cfg, a, b) for a, b in zip(xs, ws)]), f'{name} vmap')


def test_fused_kind_takes_the_kernel_only_where_it_covers_it(monkeypatch):
  jax.clear_caches()  # so that every dot below is traced again, through the patched kernel
  calls = []
  real = native.dot
  monkeypatch.setattr(native, 'dot', lambda *a: calls.append(1) or real(*a))
  x, w = exact_operands(np.random.default_rng(7), (1, 8, 64), (1, 64, 8), 0)
  covered = hardware.parse('Hopper/wgmma/m64n8k32.f32.e4m3.e4m3')
  uncovered = [hardware.parse('Hopper/wgmma/m64n8k32.f32.e4m3.e4m3/promote128'),
               # d written as f32, c read as f16: the kernel reads c in the type it writes.
               hardware.parse('Volta/mma/m8n8k4.f32.f16.f16.f16'),
               hardware.parse('CDNA3/mfma/f32_16x16x16_bf16')]
  assert native.supports(covered) and not any(map(native.supports, uncovered))
  for cfg in uncovered:
    lowacc.dot_general(x, w, BATCHED, cfg)
  assert not calls
  assert_bits_equal(lowacc.dot_general(x, w, BATCHED, covered), xla_path(covered, x, w))
  assert calls
