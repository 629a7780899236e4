"""lowacc.hardware against mmasim (MMA-Sim's bit-accurate reference) and the exact oracle.

Every (arch, instruction, shape_and_type) in mmasim's own tables is either a preset, checked bit
for bit on normal, wide-range, heavy-cancellation and special-value operands at one instruction's
k and at K = 3k (instructions chained through c), or one of the families `NOT_MODELLED` names.
NVIDIA presets are checked on both forwards lowacc has on the CPU: the native kernel and the XLA
path (`route`).
"""

import functools
import zlib

import ml_dtypes
import numpy as np
import pytest

import jax
import lowacc
from lowacc import hardware
from lowacc.kernels import native
from tests import oracle
from tests.conftest import assert_bits_equal

torch = pytest.importorskip('torch')
mmasim = pytest.importorskip('mmasim')
from mmasim import nv_ptx  # noqa: E402
from mmasim.amd import MFMA, isa_mfma  # noqa: E402
from mmasim.nv_ptx import isa_mma, isa_tcgen05mma, isa_wgmma  # noqa: E402

BATCHED = (((2,), (1,)), ((0,), (0,)))
# Input types: ml_dtypes type to draw values in, torch type mmasim takes (None: uint8 codes).
TYPES = {'tf32': (np.float32, torch.float32), 'f16': (np.float16, torch.float16),
         'bf16': (ml_dtypes.bfloat16, torch.bfloat16),
         'e4m3': (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
         'e5m2': (ml_dtypes.float8_e5m2, torch.float8_e5m2),
         'e3m2': (ml_dtypes.float6_e3m2fn, None), 'e2m3': (ml_dtypes.float6_e2m3fn, None),
         'e2m1': (ml_dtypes.float4_e2m1fn, None), 'xf32': (np.float32, torch.float32),
         'fp8': (ml_dtypes.float8_e4m3fnuz, torch.float8_e4m3fnuz),
         'bf8': (ml_dtypes.float8_e5m2fnuz, torch.float8_e5m2fnuz),
         'f32': (np.float32, torch.float32)}
TYPE_FIELDS = {**hardware.INPUT_TYPES, **hardware.MFMA_INPUT_TYPES, **hardware.EXACT_TYPES}
FLOAT32_READ = ('tf32', 'xf32')  # float32 values the model truncates
ROWS = 48  # dot products per input kind


@pytest.fixture(params=['native', 'xla'])
def route(request, monkeypatch):
  """The forward lowacc takes: the native kernel (skipped where it is not built or does not cover
  the preset: `check_route`) or the XLA path (native.supports patched off)."""
  if request.param == 'xla':
    jax.clear_caches()  # dots traced through the kernel must be traced again
    monkeypatch.setattr(native, 'supports', lambda cfg: False)
  elif not native.available():
    pytest.skip('the native kernel is not available here')
  return request.param


def check_route(route, cfg):
  if route == 'native' and not native.supports(cfg):
    pytest.skip(f'the native kernel does not cover {cfg.acc.name}')


def _nv_table():
  """(instruction, arch, shape_and_type, block_scaled) of every NVIDIA entry in mmasim."""
  for instruction, tables in (
      ('mma', ((isa_mma.mma_shape_and_type, False),
               (isa_mma.mma_block_scale_shape_and_type, True))),
      ('wgmma', ((isa_wgmma.wgmma_shape_and_type, False),)),
      ('tcgen05.mma', ((isa_tcgen05mma.tcgen05mma_shape_and_type, False),
                       (isa_tcgen05mma.tcgen05mma_block_scale_shape_and_type, True)))):
    for table, block in tables:
      for arch, shapes in table.items():
        for shape_and_type in shapes:
          yield instruction, arch, shape_and_type, block


def _numerics_key(instruction, arch, shape_and_type):
  """The entry with m and n dropped: they do not change a dot product's arithmetic."""
  shape, rest = shape_and_type.split('.', 1)
  return instruction, arch, shape[shape.index('k'):], rest


def _distinct(entries):
  seen = {}
  for entry in entries:
    seen.setdefault(_numerics_key(*entry[:3]), entry)
  return list(seen.values())


NV = _distinct(_nv_table())
MODELLED = [e for e in NV if not e[3] and 'f64' not in e[2]]
AMD = [(arch, suffix) for arch, suffixes in isa_mfma.arch_mfma_suffix.items()
       for suffix in suffixes]
# What lowacc models of mmasim's AMD table: all but f64 (CDNA2's f16 and bf16: float32 adds
# flushing subnormals; CDNA3's xf32, f16, bf16, fp8 and bf8: two-level fused sums; CDNA1's f16 and
# bf16, and every f32: exact sums rounded once).
AMD_MODELLED = [(arch, suffix) for arch, suffix in AMD if 'f64' not in suffix]


def test_every_mmasim_entry_is_a_preset_or_a_named_exclusion():
  for instruction, arch, shape_and_type, block in NV:
    if block or 'f64' in shape_and_type:
      reason = hardware.NOT_MODELLED['block-scaled' if block else 'f64']
      with pytest.raises(ValueError, match='block-scaled' if block else 'float64'):
        hardware.mma(arch, instruction, shape_and_type)
      assert reason
    else:
      assert isinstance(hardware.mma(arch, instruction, shape_and_type).acc,
                        hardware.FusedDotProduct)
  for arch, suffix in AMD:
    if (arch, suffix) in AMD_MODELLED:
      assert isinstance(hardware.mma(arch, 'mfma', suffix).acc,
                        (hardware.FlushedAddTree, hardware.TwoLevelFusedSum, hardware.ExactSum))
    else:
      with pytest.raises(ValueError, match='float64'):
        hardware.mma(arch, 'mfma', suffix)


def _in_type(v, name):
  return np.asarray(v, np.float32).astype(TYPES[name][0]).astype(np.float32)


def _operands(name, k_total, rng):
  """(4 * ROWS, K) values of type `name`: normal, wide-range, cancelling, special."""
  fraction_bits, min_exp, _ = TYPE_FIELDS[name]
  finfo = ml_dtypes.finfo(TYPES[name][0]) if name not in FLOAT32_READ else np.finfo(np.float32)
  max_exp = int(np.log2(float(finfo.max)))
  shape = (ROWS, k_total)
  normal = rng.standard_normal(shape)
  e = rng.integers(min_exp - fraction_bits, max_exp + 1, shape)
  wide = rng.choice([-1, 1], shape) * (1 + rng.random(shape)) * np.exp2(e)
  half = k_total // 2
  cancel = rng.standard_normal(shape)
  cancel[:, half:2 * half] = -cancel[:, :half]  # x_i w_i - x_i w_i: exact cancellation
  special = rng.standard_normal(shape) * np.exp2(rng.integers(min_exp - 2, 2, shape))
  specials = [0.0, -0.0, float(finfo.tiny) / 2 ** min(fraction_bits, 2)]
  if name in ('tf32', 'xf32', 'f32', 'f16', 'bf16', 'e5m2'):
    specials += [np.inf, -np.inf, np.nan]
  elif name in ('e4m3', 'fp8', 'bf8'):  # no inf (fp8, bf8: no -0 either)
    specials += [np.nan]
  hit = rng.random(shape) < 0.08
  special[hit] = rng.choice(np.array(specials), hit.sum())
  with np.errstate(over='ignore', invalid='ignore'):
    values = np.concatenate([normal, wide, cancel, special]).astype(np.float32)
    return values if name in FLOAT32_READ else _in_type(values, name)


def _cancelling_partner(w):
  """w with its second half a copy of its first, so that x's negated copy cancels."""
  w = w.copy()
  half = w.shape[1] // 2
  rows = slice(2 * ROWS, 3 * ROWS)
  w[rows, half:2 * half] = w[rows, :half]
  return w


def _to_mmasim(v, name):
  dtype = TYPES[name][1]
  if dtype is not None:
    return torch.from_numpy(v).to(dtype)
  codes = v.astype(TYPES[name][0]).view(np.uint8)
  return torch.from_numpy(codes << 2 if name == 'e2m1' else codes)  # fp4 sits in bits 5:2


def _operation(instruction, arch, shape_and_type):
  cls = {'mma': nv_ptx.MMA, 'wgmma': nv_ptx.WGMMA, 'tcgen05.mma': nv_ptx.TCGen05MMA}[instruction]
  return cls(arch, shape_and_type)


@functools.cache
def _case(a_type, b_type, k_total):
  rng = np.random.default_rng(zlib.crc32(f"{a_type} {b_type} {k_total}".encode()))
  x = _operands(a_type, k_total, rng)
  w = _cancelling_partner(_operands(b_type, k_total, rng))
  return x, w


def _reference(op, x, w, a_type, b_type):
  """mmasim: instructions of k chained through c from +0 (c read in the instruction's c type)."""
  c = torch.zeros(x.shape[0], dtype=op.c_type)
  for i in range(0, x.shape[1], op.k):
    c = op.dpa(_to_mmasim(x[:, i:i + op.k], a_type), _to_mmasim(w[:, i:i + op.k], b_type),
               c.to(op.c_type))
  return c.float().numpy()


def _same_computation(entries):
  """The entries grouped by what lowacc computes for them (its config, input types and k), so
  that each group's dot runs once and is compared with mmasim's result for every entry."""
  groups = {}
  for entry in entries:
    op = _operation(*entry[:3])
    key = (hardware.mma(entry[1], entry[0], entry[2]), op.a_type_ptx, op.b_type_ptx, op.k)
    groups.setdefault(key, []).append(entry)
  return list(groups.values())


@pytest.mark.parametrize('entries', _same_computation(MODELLED),
                         ids=lambda g: f'{g[0][1]}:{g[0][0]}:{g[0][2]}+{len(g) - 1}')
def test_preset_equals_mmasim(entries, route):
  instruction, arch, shape_and_type, _ = entries[0]
  op = _operation(instruction, arch, shape_and_type)
  cfg = hardware.mma(arch, instruction, shape_and_type)
  check_route(route, cfg)
  dot = lambda x, w: np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED,
                                                   cfg)).ravel()
  for chained in (1, 3):
    x, w = _case(op.a_type_ptx, op.b_type_ptx, op.k * chained)
    y = dot(x, w).copy()
    # The rows whose operands are all finite, in a call of their own: where any operand of a
    # call is an inf or a NaN the native kernel takes its scalar chain, else its vector one.
    finite = np.all(np.isfinite(x) & np.isfinite(w), axis=1)
    assert finite.sum() >= 3 * ROWS // 2  # most normal, wide-range and cancelling rows
    if not finite.all():
      y[finite] = dot(x[finite], w[finite])
    for entry in entries:
      expected = _reference(_operation(*entry[:3]), x, w, op.a_type_ptx, op.b_type_ptx)
      bad = np.flatnonzero(y.view(np.uint32) != expected.view(np.uint32))
      assert bad.size == 0, (f'{entry[:3]}, K={x.shape[1]}: {bad.size} of {y.size} differ, '
                             f'first rows {bad[:4]}: got {y[bad[:4]]}, mmasim '
                             f'{expected[bad[:4]]}')


def _mfma_types(op):
  """The operands' type names (TYPES) of an mmasim MFMA."""
  names = {torch.float32: 'xf32' if op.suffix.endswith('xf32') else 'f32', torch.float16: 'f16',
           torch.bfloat16: 'bf16', torch.float8_e4m3fnuz: 'fp8', torch.float8_e5m2fnuz: 'bf8'}
  return names[op.a_type], names[op.b_type]


def _mfma_reference(op, x, w):
  """mmasim: MFMA instructions of k chained through c from +0."""
  a, b = _mfma_types(op)
  c = torch.zeros(x.shape[0])
  for i in range(0, x.shape[1], op.k):
    c = op.dpa(_to_mmasim(x[:, i:i + op.k], a), _to_mmasim(w[:, i:i + op.k], b), c)
  return c.numpy()


def _same_mfma(entries):
  groups = {}
  for arch, suffix in entries:
    groups.setdefault(hardware.mma(arch, 'mfma', suffix), []).append((arch, suffix))
  return list(groups.values())


@pytest.mark.parametrize('entries', _same_mfma(AMD_MODELLED),
                         ids=lambda g: f'{g[0][0]}:{g[0][1]}+{len(g) - 1}')
def test_mfma_preset_equals_mmasim(entries):
  """Bit for bit, but for NaN payloads: mmasim's CDNA2 model and its FMA chains leave them to
  the host CPU (its CDNA3 fused sums give 0x7FFFFFFF, as lowacc)."""
  op = MFMA(*entries[0])
  cfg = hardware.mma(entries[0][0], 'mfma', entries[0][1])
  for chained in (1, 3):
    x, w = _case(*_mfma_types(op), op.k * chained)
    y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
    for arch, suffix in entries:
      expected = _mfma_reference(MFMA(arch, suffix), x, w)
      assert_bits_equal(y, expected, f'{arch} {suffix}, K={x.shape[1]}')
      if isinstance(cfg.acc, hardware.TwoLevelFusedSum):
        np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize('suffix', ['f32_32x32x8f16', 'f32_16x16x8bf16', 'f32_4x4x4bf16_1k'])
def test_mfma_oracle_agrees_with_mmasim_and_lowacc(suffix):
  """The oracle's exact-rational flushing adds, on every kind of row, K = 2k (k = 4 for
  f32_4x4x4bf16_1k: K = 7, a zero-filled last instruction, against lowacc only)."""
  op = MFMA('CDNA2', suffix)
  cfg = hardware.mma('CDNA2', 'mfma', suffix)
  x, w = _case(*_mfma_types(op), op.k * 2)
  exact = np.array([oracle.ftz_tree_chain([float(v) for v in xi], [float(v) for v in wi],
                                          cfg.acc) for xi, wi in zip(x, w)], np.float32)
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  assert_bits_equal(exact, _mfma_reference(op, x, w), 'oracle against mmasim')
  assert_bits_equal(y, exact, 'lowacc against the oracle')
  short = [oracle.ftz_tree_chain([float(v) for v in xi[:7]], [float(v) for v in wi[:7]],
                                 cfg.acc) for xi, wi in zip(x, w)]
  y = np.asarray(lowacc.dot_general(x[:, None, :7], w[:, :7, None], BATCHED, cfg)).ravel()
  assert_bits_equal(y, np.array(short, np.float32), 'a zero-filled last instruction')


@pytest.mark.parametrize('arch, suffix', [
    ('CDNA2', 'f32_4x4x4bf16_1k'), ('CDNA2', 'f32_32x32x8f16'), ('CDNA2', 'f32_16x16x8bf16'),
    ('CDNA3', 'f32_32x32x8_bf16'), ('CDNA3', 'f32_16x16x8_xf32'), ('CDNA3', 'f32_32x32x8_f16'),
    ('CDNA3', 'f32_16x16x32_fp8_bf8'), ('CDNA3', 'f32_32x32x16_bf8_bf8'),
    ('CDNA1', 'f32_32x32x8f16'), ('CDNA1', 'f32_16x16x8bf16'), ('CDNA1', 'f32_16x16x4f32'),
    ('CDNA3', 'f32_32x32x2_f32')])
def test_mfma_step_equals_mmasim_from_any_accumulator(arch, suffix):
  """One step (an instruction, or a CDNA3 group of it) from c of every kind: normal, wide-range,
  subnormal, signed zeros, inf, NaN. -0 c and -0 products give +0, but -0 for an FMA chain
  (IEEE 754's fma of zeros of one sign)."""
  op, cfg = MFMA(arch, suffix), hardware.mma(arch, 'mfma', suffix)
  a, b = _mfma_types(op)
  x, w = (v[:, :cfg.acc.group] for v in _case(a, b, op.k))
  c = _operands('tf32', 1, np.random.default_rng(5))[:, 0]
  x[:8], w[:8], c[:8] = 0.0, -1.0, -0.0
  c[ROWS:ROWS + 6] = np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf  # beside wide products
  expected = op.dpa(_to_mmasim(x, a), _to_mmasim(w, b), torch.from_numpy(c)).numpy()
  terms = cfg.acc.terms(x.T[:, :, None], w.T[:, :, None])  # (L, B, 1): B = the rows
  y = np.asarray(cfg.acc.step(c[:, None, None], terms, None)[0]).ravel()
  assert_bits_equal(y, expected, suffix)
  assert np.signbit(expected[:8]).all() == (isinstance(cfg.acc, hardware.ExactSum)
                                            and cfg.acc.fused == 1)
  if isinstance(cfg.acc, hardware.TwoLevelFusedSum):
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize('arch, suffix', [('CDNA2', 'f32_32x32x8bf16_1k'),
                                          ('CDNA1', 'f32_16x16x8bf16')])
def test_mfma_counters_and_gradients_go_through_the_kind(arch, suffix):
  """bf16 products past float32's range: sat where mmasim overflows to inf from finite operands;
  immediate_of zeroes the products of those instructions (one of K = 8 here)."""
  import jax
  op, cfg = MFMA(arch, suffix), hardware.mma(arch, 'mfma', suffix)
  rng = np.random.default_rng(8)
  x = _in_type(rng.standard_normal((32, 8)) * 2.0 ** 63, 'bf16')
  w = _in_type(rng.standard_normal((32, 8)) * 2.0 ** 63, 'bf16')
  overflowed = np.isinf(_mfma_reference(op, x, w))
  assert 0 < overflowed.sum() < 32
  xs, ws = x[:, None, :], w[:, :, None]
  stats = lowacc.accumulation_stats(xs, ws, BATCHED, cfg)
  assert stats['steps'] == 32 and int(stats['sat']) == overflowed.sum()
  loss = lambda x: lowacc.dot_general(x, ws, BATCHED, cfg.replace(ste='immediate_of')).sum()
  g = np.asarray(jax.grad(loss)(xs))[:, 0]
  np.testing.assert_array_equal(g, np.where(overflowed[:, None], 0.0, w))


def test_mfma_flushes_a_sum_to_a_zero_of_its_sign():
  """CDNA2 bf16, k = 4: c = 2^-126, then c - 2^-126 (1 + 2^-7) = -2^-133 flushes to -0, as
  mmasim and the oracle give it, and the chain's result is that d (`direct_output`); promoted
  into an fp32 sum from +0 (CUTLASS), it reads +0."""
  op, cfg = MFMA('CDNA2', 'f32_4x4x4bf16_1k'), hardware.mma('CDNA2', 'mfma', 'f32_4x4x4bf16_1k')
  tiny = 2.0 ** -63
  x = np.array([[tiny, 0, 0, 0, -tiny * (1 + 2 ** -7), 0, 0, 0]], np.float32)
  w = np.array([[tiny, 1, 1, 1, tiny, 1, 1, 1]], np.float32)
  expected = _mfma_reference(op, x, w)
  assert expected.view(np.uint32)[0] == 0x80000000
  exact = oracle.ftz_tree_chain(list(map(float, x[0])), list(map(float, w[0])), cfg.acc)
  assert np.float32(exact).view(np.uint32) == 0x80000000
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  assert y.view(np.uint32)[0] == 0x80000000
  promoted = hardware.mma('CDNA2', 'mfma', 'f32_4x4x4bf16_1k', promote_every=8)
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, promoted)).ravel()
  assert y.view(np.uint32)[0] == 0


@pytest.mark.parametrize('arch, suffix', [('CDNA1', 'f32_32x32x8f16'), ('CDNA1', 'f32_4x4x2bf16'),
                                          ('CDNA1', 'f32_32x32x2f32'), ('CDNA3', 'f32_16x16x4_f32')])
def test_exact_sum_oracle_agrees_with_mmasim_and_lowacc(arch, suffix):
  """The oracle's exact-rational sums rounded once (CDNA1's f16 and bf16) and FMA chains (f32),
  on every kind of row, K = 2k, and a zero-filled last instruction (K = 2k - 1, lowacc only)."""
  op, cfg = MFMA(arch, suffix), hardware.mma(arch, 'mfma', suffix)
  x, w = _case(*_mfma_types(op), op.k * 2)
  rows = lambda k: [oracle.exact_sum_chain([float(v) for v in xi[:k]], [float(v) for v in wi[:k]],
                                           cfg.acc) for xi, wi in zip(x, w)]
  exact = np.array(rows(x.shape[1]), np.float32)
  assert_bits_equal(exact, _mfma_reference(op, x, w), 'oracle against mmasim')
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  assert_bits_equal(y, exact, 'lowacc against the oracle')
  k = x.shape[1] - 1
  y = np.asarray(lowacc.dot_general(x[:, None, :k], w[:, :k, None], BATCHED, cfg)).ravel()
  assert_bits_equal(y, np.array(rows(k), np.float32), 'a zero-filled last instruction')


def test_fma_chain_rounds_each_exact_product_once():
  """f32 MFMA: c <- fma(a, b, c) per product, in order. The exact product (a float32 product
  rounded first gives 2^-11 in row 0; XLA's flushes row 1's to zero), gradual underflow, and
  IEEE 754's signed zeros: -2^-150 rounds to -0, then -0 + (-1) 0 is -0 and -0 + 1 0 is +0."""
  cfg = hardware.mma('CDNA3', 'mfma', 'f32_32x32x1_2b_f32')
  one = 1 + 2.0 ** -12
  x = np.array([[-1.0, one], [2.0 ** -100, 2.0 ** -100], [2.0 ** -75, -1.0], [2.0 ** -75, 1.0]],
               np.float32)
  w = np.array([[1.0, one], [2.0 ** -40, 2.0 ** -40], [-2.0 ** -75, 0.0], [-2.0 ** -75, 0.0]],
               np.float32)
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  expected = np.array([2.0 ** -11 + 2.0 ** -24, 2.0 ** -139, -0.0, 0.0], np.float32)
  np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))
  op = MFMA('CDNA3', 'f32_32x32x1_2b_f32')
  np.testing.assert_array_equal(_mfma_reference(op, x, w).view(np.uint32),
                                expected.view(np.uint32))


@pytest.mark.parametrize('suffix', ['f32_32x32x8_bf16', 'f32_16x16x8_xf32', 'f32_16x16x16_f16',
                                    'f32_16x16x32_fp8_bf8', 'f32_32x32x16_bf8_bf8'])
def test_two_level_oracle_agrees_with_mmasim_and_lowacc(suffix):
  """The oracle's exact-rational two-level sum (CDNA3), on every kind of row, K = 2k."""
  op, cfg = MFMA('CDNA3', suffix), hardware.mma('CDNA3', 'mfma', suffix)
  x, w = _case(*_mfma_types(op), op.k * 2)
  tf32 = lambda v: (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
  read = (lambda v: tf32(v)) if cfg.acc.a_type == 'xf32' else (lambda v: v)  # typed operands
  exact = np.array([oracle.two_level_chain([float(v) for v in xi], [float(v) for v in wi],
                                           cfg.acc) for xi, wi in zip(read(x), read(w))],
                   np.float32)
  assert_bits_equal(exact, _mfma_reference(op, x, w), 'oracle against mmasim')
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  assert_bits_equal(y, exact, 'lowacc against the oracle')


ORACLE_CASES = [('wgmma', 'Hopper', 'm64n8k16.f32.f16.f16'),
                ('wgmma', 'Hopper', 'm64n8k32.f32.e4m3.e5m2'),
                ('mma', 'Ampere', 'm16n8k8.f32.bf16.bf16.f32'),
                ('mma', 'Volta', 'm8n8k4.f16.f16.f16.f16'),
                ('mma', 'RTX Blackwell', 'm16n8k32.kind::f8f6f4.f16.e2m1.e3m2.f16'),
                ('mma', 'Ampere', 'm16n8k4.f32.tf32.tf32.f32')]


@pytest.mark.parametrize('entry', ORACLE_CASES, ids=lambda e: f'{e[1]}:{e[0]}:{e[2]}')
def test_oracle_agrees_with_mmasim_and_lowacc(entry, route):
  """The exact-rational fused sum, on finite normal, wide-range and cancelling rows."""
  op = _operation(*entry)
  cfg = hardware.mma(entry[1], entry[0], entry[2])
  check_route(route, cfg)
  x, w = _case(op.a_type_ptx, op.b_type_ptx, op.k * 2)
  rows = np.r_[0:4, ROWS:ROWS + 6, 2 * ROWS:2 * ROWS + 4]
  x, w = x[rows], w[rows]
  expected = _reference(op, x, w, op.a_type_ptx, op.b_type_ptx)
  tf32 = lambda v: (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
  read = lambda v, name: tf32(v) if name == 'tf32' else v  # the oracle takes typed operands
  exact = np.array([oracle.fused_chain([float(v) for v in xi], [float(v) for v in wi], cfg.acc)
                    for xi, wi in zip(read(x, op.a_type_ptx), read(w, op.b_type_ptx))],
                   np.float32)
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  assert_bits_equal(exact, expected, 'oracle against mmasim')  # the oracle's NaN is any NaN
  np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize('arch, instruction, shape_and_type', [
    ('Ampere', 'mma', 'm16n8k16.f32.bf16.bf16.f32'), ('CDNA3', 'mfma', 'f32_16x16x16_bf16')])
def test_a_subnormal_times_inf_is_inf(arch, instruction, shape_and_type, route):
  """bf16 subnormal x -inf is -inf, not the NaN of inf x 0 (XLA on the CPU can read the
  subnormal as a zero)."""
  x, w = np.ones((1, 16), np.float32), np.ones((1, 16), np.float32)
  x[0, 2], w[0, 2] = 2.0 ** -130, -np.inf
  cfg = hardware.mma(arch, instruction, shape_and_type)
  check_route(route, cfg)
  op = MFMA(arch, shape_and_type) if instruction == 'mfma' else _operation(instruction, arch,
                                                                         shape_and_type)
  expected = op.dpa(_to_mmasim(x, 'bf16'), _to_mmasim(w, 'bf16'), torch.zeros(1)).numpy()
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  assert expected[0] == -np.inf
  np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize('arch, instruction, shape_and_type', [
    ('Ampere', 'mma', 'm16n8k16.f32.bf16.bf16.f32'), ('Hopper', 'wgmma', 'm64n8k16.f32.bf16.bf16')])
def test_a_subnormal_result_is_the_next_instructions_c(arch, instruction, shape_and_type, route):
  """Products just below 2^e_zero beside zero products: an fp32 subnormal result, read back as
  the next instruction's c (the XLA path read it as a zero: XLA on the CPU rewrote a test of
  its bits into a float32 compare)."""
  op = _operation(instruction, arch, shape_and_type)
  cfg = hardware.mma(arch, instruction, shape_and_type)
  check_route(route, cfg)
  rng = np.random.default_rng(5)
  tiny = 2.0 ** ((cfg.acc.e_zero - 3) // 2)
  x = _in_type(tiny * (1 + rng.random((8, 3 * op.k))), op.a_type_ptx)
  w = _in_type(tiny * (1 + rng.random((8, 3 * op.k))), op.b_type_ptx)
  x[:, ::3] = 0.0
  expected = _reference(op, x, w, op.a_type_ptx, op.b_type_ptx)
  assert np.all((expected != 0) & (np.abs(expected) < 2.0 ** -126))
  exact = np.array([oracle.fused_chain([float(v) for v in xi], [float(v) for v in wi], cfg.acc)
                    for xi, wi in zip(x, w)], np.float32)
  np.testing.assert_array_equal(exact.view(np.uint32), expected.view(np.uint32))
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


def test_promotion_every_n_products_adds_into_float32():
  """Hopper FP8 with promotion every 128 products: mmasim's chain from zero per 128 products,
  each partial added into a float32 sum (numpy, nearest even)."""
  arch, instruction, shape = 'Hopper', 'wgmma', 'm64n8k32.f32.e4m3.e4m3'
  op = _operation(instruction, arch, shape)
  rng = np.random.default_rng(3)
  x = _in_type(rng.standard_normal((16, 384)), 'e4m3')
  w = _in_type(rng.standard_normal((16, 384)), 'e4m3')
  expected = np.zeros(16, np.float32)
  for i in range(0, 384, 128):
    expected = expected + _reference(op, x[:, i:i + 128], w[:, i:i + 128], 'e4m3', 'e4m3')
  cfg = hardware.mma(arch, instruction, shape, promote_every=128)
  y = np.asarray(lowacc.dot_general(x[:, None, :], w[:, :, None], BATCHED, cfg)).ravel()
  np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))
  unpromoted = _reference(op, x, w, 'e4m3', 'e4m3')
  assert not np.array_equal(unpromoted, expected)  # promotion changes results here


def test_counters_and_gradients_go_through_the_kind():
  """fp16 output overflow counts as sat where mmasim gives inf from finite operands; the
  identity gradient is the exact dot's, immediate_of zeroes the products of saturated steps."""
  import jax
  arch, instruction, shape = 'Hopper', 'mma', 'm16n8k16.f16.f16.f16.f16'
  op = _operation(instruction, arch, shape)
  rng = np.random.default_rng(4)
  x = _in_type(rng.standard_normal((32, 16)) * 200, 'f16')
  w = _in_type(rng.standard_normal((32, 16)) * 200, 'f16')
  overflowed = np.isinf(_reference(op, x, w, 'f16', 'f16'))
  assert 0 < overflowed.sum() < 32
  cfg = hardware.mma(arch, instruction, shape)
  xs, ws = x[:, None, :], w[:, :, None]
  stats = lowacc.accumulation_stats(xs, ws, BATCHED, cfg)
  assert stats['steps'] == 32 and int(stats['sat']) == overflowed.sum()
  loss = lambda cfg: lambda x: lowacc.dot_general(x, ws, BATCHED, cfg).sum()
  np.testing.assert_array_equal(jax.grad(loss(cfg))(xs)[:, 0], w)
  g = np.asarray(jax.grad(loss(cfg.replace(ste='immediate_of')))(xs))[:, 0]
  np.testing.assert_array_equal(g, np.where(overflowed[:, None], 0.0, w))


@pytest.mark.parametrize('args, field', [
    (('Hopper', 'wmma', 'm16n8k16.f32.f16.f16.f32'), 'instruction'),
    (('Hoppr', 'mma', 'm16n8k16.f32.f16.f16.f32'), 'arch'),
    (('Ampere', 'wgmma', 'm64n8k16.f32.f16.f16'), 'arch'),
    (('Hopper', 'mma', 'm16n8k16.f32.f16.f16'), 'shape_and_type'),
    (('Hopper', 'mma', 'm16n8k16.f32.f17.f16.f32'), 'a type'),
    (('Hopper', 'mma', 'm16n8k16.f64.f64.f64.f64'), 'float64'),
    (('CDNA2', 'mfma', 'f32_32x32x8_f16'), "shape_and_type='f32_32x32x8_f16' is invalid for "
                                           'mfma on CDNA2'),
    (('CDNA1', 'mfma', 'f32_32x32x8bf16_1k'), 'is invalid for mfma on CDNA1'),
    (('CDNA3', 'mfma', 'f32_32x32x8f16'), 'is invalid for mfma on CDNA3'),
    (('CDNA3', 'mfma', 'f32_16x16x32_fp8'), "fp8 and bf8 name both operands' types"),
    (('CDNA2', 'mfma', 'f32_32x32x6bf16_1k'), 'k=6 is invalid for CDNA2'),
    (('CDNA1', 'mfma', 'f32_32x32x6f16'), 'k=6 is invalid for CDNA1'),
    (('CDNA3', 'mfma', 'f64_16x16x4_f64'), 'float64')])
def test_bad_names_are_one_clear_error(args, field):
  with pytest.raises(ValueError, match=field):
    hardware.mma(*args)


def test_experiments_name_presets_by_their_fields():
  cfg = hardware.parse('Hopper/wgmma/m64n8k32.f32.e4m3.e4m3/promote128')
  assert cfg == hardware.mma('Hopper', 'wgmma', 'm64n8k32.f32.e4m3.e4m3', promote_every=128)
  assert hardware.parse('RTX Blackwell/mma/m16n8k16.f32.bf16.bf16.f32').acc.group == 16
  with pytest.raises(ValueError, match='arch/instruction/shape_and_type'):
    hardware.parse('Hopper/m64n8k32.f32.e4m3.e4m3')
