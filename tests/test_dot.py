"""dot_general against the exact oracle, float32 references, and JAX transformations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowacc
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.quantize import random_bits
from tests import oracle
from tests.conftest import assert_bits_equal, run_on_host_devices

FORMATS = {'M7E4b10': dict(exp_bits=4, man_bits=7, bias=10),
           'M7E4b12': dict(exp_bits=4, man_bits=7, bias=12),
           'M10E5': dict(exp_bits=5, man_bits=10), 'M3E4': dict(exp_bits=4, man_bits=3),
           'M2E3': dict(exp_bits=3, man_bits=2), 'M5E6': dict(exp_bits=6, man_bits=5)}
ROUNDINGS = ('nearest_even', 'toward_zero', 'down', 'up')
RANGES = list(itertools.product(('flush', 'subnormal', 'none'), ('saturate', 'inf', 'none')))


def operands(fmt, shape_x, shape_w, seed, mantissa_bits=6):
  """Operands whose products span the format's range, from below min_normal to above max_normal,
  so that chains saturate, lose updates and flush."""
  rng = np.random.default_rng(seed)

  def draw(shape):
    e = rng.integers((fmt.min_exp - 3) // 2, (fmt.max_exp + 3) // 2 + 1, shape)
    f = rng.integers(0, 2 ** mantissa_bits, shape) / 2.0 ** mantissa_bits
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return (sign * np.ldexp(1 + f, e)).astype(np.float32)

  return draw(shape_x), draw(shape_w)


def oracle_dot(x, w, cfg, rand=None):
  """The oracle over a canonical (B, M, K) x (B, K, N) dot. -> (y, records)"""
  b, m, k = x.shape
  n = w.shape[2]
  y = np.zeros((b, m, n), np.float32)
  records = {}
  for bi, mi, ni in itertools.product(range(b), range(m), range(n)):
    r = None if rand is None else (lambda s, t: int(rand(s, t)[bi, mi, ni]))
    y[bi, mi, ni], records[bi, mi, ni] = oracle.chain(
        [float(v) for v in x[bi, mi]], [float(v) for v in w[bi, :, ni]], cfg, r)
  return y, records


BATCHED = (((2,), (1,)), ((0,), (0,)))


def check_against_oracle(cfg, x, w, rand=None, key=None):
  y = lowacc.dot_general(x, w, BATCHED, cfg, key=key)
  expected, _ = oracle_dot(x, w, cfg, rand)
  assert_bits_equal(y, expected, str(cfg))


# Every (underflow, overflow) pair on M7E4 bias 10 with every rounding; the other formats take
# every rounding, cycling through the range modes.
CASES = ([('M7E4b10', r, uf, of) for r in ROUNDINGS for uf, of in RANGES]
         + [(name, r, *RANGES[(i * 4 + j) % len(RANGES)])
            for i, name in enumerate(list(FORMATS)[1:]) for j, r in enumerate(ROUNDINGS)])


@pytest.mark.parametrize('name, rounding, underflow, overflow', CASES)
def test_fma_chain_equals_oracle(name, rounding, underflow, overflow):
  acc = FloatFormat(**FORMATS[name], rounding=rounding, underflow=underflow, overflow=overflow)
  prod = FloatFormat(exp_bits=acc.exp_bits, man_bits=acc.man_bits, bias=acc.bias + 2,
                     rounding=rounding, underflow=underflow, overflow=overflow)
  seed = hash((name, rounding, underflow, overflow)) % 2 ** 32
  # K = 37: two full chunks of 16 and a short one; products rounded to their own format.
  x, w = operands(acc, (2, 3, 37), (2, 37, 4), seed)
  cfg = AccumulatorConfig(acc=acc, product=prod if seed % 2 else None, chunk_size=16)
  check_against_oracle(cfg, x, w)


@pytest.mark.parametrize('combine', ['acc', None, 'fp16', 'narrow'])
@pytest.mark.parametrize('chunk_size', [1, 5, 16, None])
def test_every_combine_and_chunk_size(combine, chunk_size):
  acc = FloatFormat(4, 7, bias=10, rounding='toward_zero', underflow='flush')
  combine = {'fp16': lowacc.FP16, 'narrow': FloatFormat(3, 3, rounding='up')}.get(combine, combine)
  x, w = operands(acc, (1, 3, 23), (1, 23, 3), seed=chunk_size or 0)
  check_against_oracle(AccumulatorConfig(acc=acc, chunk_size=chunk_size, combine=combine), x, w)


def test_paper_preset_equals_oracle():
  x, w = operands(lowacc.PAPER_ACC, (1, 4, 40), (1, 40, 4), seed=5)
  check_against_oracle(lowacc.PAPER_M7E4, x, w)


@pytest.mark.parametrize('product', [None, 'narrow'])
@pytest.mark.parametrize('combine', ['acc', None])
def test_chunk_order_equals_oracle(product, combine):
  # Order 'chunk' sums a chunk in float32 in an unspecified order: integer products of at most
  # 2^10 over chunks of 8 keep every partial sum exact, so the oracle is order-independent.
  rng = np.random.default_rng(11)
  x = rng.integers(-32, 33, (2, 3, 29)).astype(np.float32)
  w = rng.integers(-32, 33, (2, 29, 5)).astype(np.float32)
  acc = FloatFormat(3, 4, bias=-3, rounding='toward_zero', underflow='flush', overflow='saturate')
  prod = FloatFormat(4, 3, bias=-2, rounding='nearest_even') if product else None
  cfg = AccumulatorConfig(acc=acc, product=prod, chunk_size=8, order='chunk', combine=combine)
  check_against_oracle(cfg, x, w)
  stats = lowacc.accumulation_stats(x, w, BATCHED, cfg)
  assert int(stats['sat']) > 0, 'the test should saturate some chunks'


def test_stochastic_chain_equals_oracle_with_the_documented_streams():
  acc = FloatFormat(4, 5, bias=8, rounding='stochastic', underflow='subnormal')
  prod = FloatFormat(4, 5, bias=10, rounding='stochastic', underflow='flush')
  x, w = operands(acc, (1, 2, 19), (1, 19, 3), seed=3)
  key = jax.random.key(42)
  cfg = AccumulatorConfig(acc=acc, product=prod, chunk_size=8)

  def rand(stream, t):  # the contract: random_bits(fold_in(fold_in(key, stream), t), out shape)
    k = jax.random.fold_in(jax.random.fold_in(key, stream), t)
    return np.asarray(random_bits(k, (1, 2, 3)))

  check_against_oracle(cfg, x, w, rand=rand, key=key)
  y2 = lowacc.dot_general(x, w, BATCHED, cfg, key=jax.random.key(43))
  assert not np.array_equal(np.asarray(y2), np.asarray(lowacc.dot_general(x, w, BATCHED, cfg,
                                                                          key=key)))


def test_float32_accumulator_is_sequential_float32_sum(rng):
  x = rng.standard_normal((5, 300)).astype(np.float32)
  w = rng.standard_normal((300, 7)).astype(np.float32)
  y = lowacc.matmul(x, w, AccumulatorConfig(acc=lowacc.FP32, chunk_size=None))
  expected = np.zeros((5, 7), np.float32)
  for k in range(300):
    expected = (expected + x[:, k:k + 1] * w[k:k + 1, :]).astype(np.float32)
  assert_bits_equal(y, expected, 'fp32 chain')


def test_padding_the_contraction_changes_nothing(rng):
  acc = FloatFormat(4, 7, bias=10, rounding='down')
  x, w = operands(acc, (1, 3, 21), (1, 21, 4), seed=9)
  cfg = AccumulatorConfig(acc=acc, chunk_size=8)
  y = lowacc.dot_general(x, w, BATCHED, cfg)
  xp = np.concatenate([x, np.zeros((1, 3, 3), np.float32)], axis=2)  # 21 -> 24 = 3 chunks of 8
  wp = np.concatenate([w, np.zeros((1, 3, 4), np.float32)], axis=1)
  assert_bits_equal(y, lowacc.dot_general(xp, wp, BATCHED, cfg), 'padded')


def test_dimension_numbers_of_any_layout(rng):
  """Batch dims and contracting dims anywhere; contraction row-major in the given order."""
  acc = FloatFormat(4, 7, bias=10, rounding='toward_zero')
  cfg = AccumulatorConfig(acc=acc, chunk_size=4)
  lhs = rng.standard_normal((3, 5, 2, 4)).astype(np.float32)  # (k1, m, batch, k0)
  rhs = rng.standard_normal((4, 6, 2, 3)).astype(np.float32)  # (k0, n, batch, k1)
  dims = (((3, 0), (0, 3)), ((2,), (2,)))
  y = lowacc.dot_general(lhs, rhs, dims, cfg)
  assert y.shape == lax.dot_general(lhs, rhs, dims).shape == (2, 5, 6)
  x = lhs.transpose(2, 1, 3, 0).reshape(2, 5, 12)  # k = k0 * 3 + k1
  w = rhs.transpose(2, 0, 3, 1).reshape(2, 12, 6)
  expected, _ = oracle_dot(x, w, cfg)
  assert_bits_equal(y, expected, 'layout')


def test_input_quantization_then_chain(rng):
  cfg = lowacc.PAPER_M7E4_FP8
  x = rng.standard_normal((1, 4, 20)).astype(np.float32)
  w = (rng.standard_normal((1, 20, 3)) * 0.05).astype(np.float32)
  y = lowacc.dot_general(x, w, BATCHED, cfg)
  iq = cfg.lhs.format
  xq = np.asarray(lowacc.quantize(x * 2.0 ** (iq.max_exp - np.floor(np.log2(np.abs(x).max()))),
                                  iq)) / 2.0 ** (iq.max_exp - np.floor(np.log2(np.abs(x).max())))
  wq = np.asarray(lowacc.quantize(w * 2.0 ** (iq.max_exp - np.floor(np.log2(np.abs(w).max()))),
                                  iq)) / 2.0 ** (iq.max_exp - np.floor(np.log2(np.abs(w).max())))
  expected, _ = oracle_dot(xq.astype(np.float32), wq.astype(np.float32),
                           cfg.replace(lhs=None, rhs=None))
  assert_bits_equal(y, expected, 'fp8 inputs')
  # acc=None keeps the input quantization and sums in float32.
  plain = lowacc.dot_general(x, w, BATCHED, AccumulatorConfig(acc=None, lhs=cfg.lhs, rhs=cfg.rhs))
  np.testing.assert_allclose(plain, np.einsum('bmk,bkn->bmn', xq, wq), rtol=1e-6)


def test_acc_none_is_the_float32_dot(rng):
  x = rng.integers(-8, 8, (3, 33)).astype(np.float32)
  w = rng.integers(-8, 8, (33, 2)).astype(np.float32)
  assert_bits_equal(lowacc.matmul(x, w, AccumulatorConfig(acc=None)), x @ w, 'acc=None')
  assert_bits_equal(lowacc.matmul(x, w, None), x @ w, 'config=None')


def test_jit_eager_vmap_agree(rng):
  cfg = lowacc.PAPER_M7E4
  x = rng.standard_normal((4, 3, 20)).astype(np.float32)
  w = rng.standard_normal((20, 5)).astype(np.float32)
  f = lambda a: lowacc.matmul(a, w, cfg)
  eager = f(x)
  assert_bits_equal(jax.jit(f)(x), eager, 'jit')
  assert_bits_equal(jax.vmap(f)(x), eager, 'vmap')
  with jax.disable_jit():
    assert_bits_equal(f(x[:1]), eager[:1], 'disable_jit')


def test_matmul_shapes(rng):
  cfg = lowacc.PAPER_M7E4
  a = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
  b = rng.standard_normal((5, 8, 4)).astype(np.float32)
  assert lowacc.matmul(a, b, cfg).shape == (2, 5, 3, 4)
  assert lowacc.matmul(a[0, 0, 0], b[0], cfg).shape == (4,)
  assert lowacc.matmul(b[0], b[0, 0], cfg).shape == (8,)
  x = a[0, 0]
  assert_bits_equal(lowacc.matmul(x[0], b[0], cfg), lowacc.matmul(x, b[0], cfg)[0], '1-d lhs')


def test_dot_general_callable_in_einsum_and_jit(rng):
  dg = lowacc.DotGeneral(lowacc.PAPER_M7E4)
  assert hash(dg) == hash(lowacc.DotGeneral(lowacc.PAPER_M7E4))
  x = rng.standard_normal((3, 16)).astype(np.float32)
  w = rng.standard_normal((16, 4)).astype(np.float32)
  y = jax.jit(lambda a, b: jnp.einsum('mk,kn->mn', a, b, _dot_general=dg))(x, w)
  assert_bits_equal(y, lowacc.matmul(x, w, lowacc.PAPER_M7E4), 'einsum')


def test_empty_contraction_is_zero():
  y = lowacc.matmul(np.zeros((3, 0), np.float32), np.zeros((0, 2), np.float32), lowacc.PAPER_M7E4)
  assert np.array_equal(np.asarray(y), np.zeros((3, 2)))


def test_special_values_propagate():
  acc = FloatFormat(4, 7, bias=10, overflow='inf')
  cfg = AccumulatorConfig(acc=acc, chunk_size=2)
  x = np.array([[1.0, np.inf, 1.0], [np.nan, 1.0, 1.0], [np.inf, -np.inf, 0.0]], np.float32)
  w = np.ones((3, 1), np.float32)
  y = np.asarray(lowacc.matmul(x, w, cfg))[:, 0]
  assert y[0] == np.inf and np.isnan(y[1]) and np.isnan(y[2])
  sat = np.asarray(lowacc.matmul(x[:1], w, cfg.replace(acc=acc.replace(overflow='saturate'))))
  assert sat[0, 0] == acc.replace(overflow='saturate').max_normal


def test_stats_count_what_the_oracle_counts():
  acc = FloatFormat(3, 3, bias=3, rounding='toward_zero', underflow='flush')
  cfg = AccumulatorConfig(acc=acc, chunk_size=6)
  x, w = operands(acc, (1, 3, 20), (1, 20, 4), seed=21)
  stats = lowacc.accumulation_stats(x, w, BATCHED, cfg)
  y, records = oracle_dot(x, w, cfg)
  flags = [f for rec in records.values() for inner, comb in rec for f in inner + [comb]]
  expected = {name: sum(f[i] for f in flags) for i, name in enumerate(('sat', 'lost', 'flush'))}
  got = {name: int(stats[name]) for name in expected}
  assert got == expected
  assert min(got.values()) > 0, 'the operands should trigger every event'
  assert int(stats['steps']) == 12 * (20 + 4) == len(flags)
  ref = np.einsum('bmk,bkn->bmn', x.astype(np.float64), w)
  np.testing.assert_allclose(float(stats['max_abs_error']), np.max(np.abs(y - ref)), rtol=1e-5)


def _loops(jaxpr) -> int:
  """The scan and while loops of a jaxpr, recursively."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in ('scan', 'while')
    for value in eqn.params.values():
      for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          n += _loops(getattr(v, 'jaxpr', v))
  return n


@pytest.mark.parametrize('ste', ['identity', 'recursive_both'])
def test_stats_come_from_the_one_run_of_the_chain(ste):
  acc = FloatFormat(3, 3, bias=3, rounding='toward_zero', underflow='flush')
  cfg = AccumulatorConfig(acc=acc, chunk_size=6, ste=ste)
  x, w = operands(acc, (1, 3, 20), (1, 20, 4), seed=21)
  y, stats = jax.jit(lambda x, w: lowacc.dot_general(x, w, BATCHED, cfg, stats=True))(x, w)
  assert_bits_equal(y, lowacc.dot_general(x, w, BATCHED, cfg), 'the result with stats=True')
  assert jax.device_get(stats) == jax.device_get(lowacc.accumulation_stats(x, w, BATCHED, cfg))
  # One chain (a scan over chunks around one loop over each chunk's steps), no second run.
  jaxpr = jax.make_jaxpr(lambda x, w: lowacc.dot_general(x, w, BATCHED, cfg, stats=True))(x, w)
  assert _loops(jaxpr.jaxpr) == 2
  # Gradients through the result are the estimator's, as without stats; the counters carry none.
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
  plain = jax.grad(loss(lambda x, w: lowacc.dot_general(x, w, BATCHED, cfg)), (0, 1))(x, w)
  counted = jax.grad(loss(lambda x, w: lowacc.dot_general(x, w, BATCHED, cfg, stats=True)[0]),
                     (0, 1))(x, w)
  for got, want in zip(counted, plain):
    assert_bits_equal(got, want, f'gradient with stats=True, {ste}')
  with pytest.raises(ValueError, match='stats=True needs a config with a simulated forward'):
    lowacc.dot_general(x, w, BATCHED, AccumulatorConfig(acc=None), stats=True)


def test_integer_operands_are_exact_or_refused():
  # int8/int16 convert exactly and give a float32 result: 16 * 127 * 127 = 258064 does not fit
  # int8, where lax.dot_general would wrap and a cast would saturate.
  x = np.full((2, 16), 127, np.int8)
  cfg = AccumulatorConfig(acc=lowacc.FP32, chunk_size=4)
  y = lowacc.matmul(x, x.T, cfg)
  assert y.dtype == jnp.float32
  assert_bits_equal(y, np.full((2, 2), 16 * 127 * 127, np.float32), 'int8')
  assert lowacc.matmul(x.astype(np.int16), x.T.astype(np.int16), cfg).dtype == jnp.float32
  with pytest.raises(ValueError, match='lhs has dtype int32: integers above 2\\^24'):
    lowacc.matmul(np.full((1, 2), 2 ** 24 + 1, np.int32), np.ones((2, 1), np.float32), cfg)
  with pytest.raises(ValueError, match='preferred_element_type=.*int8.*float dtype'):
    lowacc.dot_general(x, x.T, (((1,), (0,)), ((), ())), cfg, preferred_element_type=jnp.int8)


SHARDED_CHECK = '''
import jax, numpy as np, lowacc, lowacc.kernels.native
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ('d',), axis_types=(AxisType.Auto,))
explicit = jax.make_mesh((2,), ('d',), axis_types=(AxisType.Explicit,))
# Small integers: the per-shard float32 gradient sums and their psum are exact in any order.
x = np.arange(4 * 20, dtype=np.float32).reshape(4, 20) % 7 - 3
w = np.arange(20 * 3, dtype=np.float32).reshape(20, 3) % 5 - 2
for cfg in (lowacc.PAPER_M7E4, lowacc.PAPER_M7E4.replace(order='chunk', product=None),
            lowacc.PAPER_M7E4.replace(ste='recursive_both')):
  dot = lambda a, b: lowacc.matmul(a, b, cfg)
  loss = lambda f: lambda a, b: (f(a, b) ** 2).sum()
  want = (dot(x, w), *jax.grad(loss(dot), (0, 1))(x, w))
  sharded = jax.shard_map(dot, mesh=mesh, in_specs=(P('d'), P()), out_specs=P('d'))  # check_vma
  runs = {'shard_map': (jax.jit(sharded)(x, w), *jax.grad(loss(sharded), (0, 1))(x, w))}
  with jax.set_mesh(explicit):
    xs = jax.device_put(x, NamedSharding(explicit, P('d')))
    runs['explicit'] = (jax.jit(dot)(xs, w), *jax.jit(jax.grad(loss(dot), (0, 1)))(xs, w))
  # Automatic partitioning (a data-parallel run): each device's kernel call takes its own rows
  # of x, none gathers them.
  xa = jax.device_put(x, NamedSharding(mesh, P('d')))
  runs['auto'] = (jax.jit(dot)(xa, w), *jax.jit(jax.grad(loss(dot), (0, 1)))(xa, w))
  if lowacc.kernels.native.supports(cfg) and cfg.ste == "identity":
    hlo = jax.jit(dot).lower(xa, w).compile().as_text()
    calls = [l for l in hlo.splitlines() if 'custom_call_target="lowacc_chunk_dot"' in l]
    assert len(calls) == 1 and 'f32[1,2,20]' in calls[0] and 'all-gather' not in hlo, hlo
  for name, got in runs.items():
    for g, e in zip(got, want):
      assert np.array_equal(np.asarray(g).view(np.uint32), np.asarray(e).view(np.uint32)), name
print('ok')
'''


def test_shard_map_explicit_and_automatic_partitioning():
  run_on_host_devices(SHARDED_CHECK)  # one subprocess: one set of compiles
