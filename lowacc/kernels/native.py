"""The forward of simulated GEMMs through the native CPU kernel (chunk_dot.cc), an XLA FFI call.

`lowacc.dot` runs the forward of a GEMM through `dot` on the CPU when `supports(cfg)`: the
kernel was built (by `pip install`; it needs a C++17 compiler), the CPU has AVX-512, and the
config is one the kernel covers: order 'fma' (the paper's FMAq) and order 'chunk', with or
without product rounding, and a matrix unit's fused dot products (`lowacc.hardware`'s NVIDIA
presets without promotion); `lowacc.conv` runs a convolution's GEMM through `conv`, which reads
the patches from the padded input. Everywhere else it runs its XLA path, which stays the
reference: the tests hold the two equal bit for bit (and the presets equal to mmasim). Order
'fma' and 'chunk' with product rounding add in the XLA path's order, so they are equal on any
operands; 'chunk' without product rounding sums a chunk with fused multiply-adds, equal
wherever the chunk partials are exact (the contract leaves the order of the additions inside a
chunk unspecified, so only there is equality defined).
"""

from __future__ import annotations

import ctypes
import fractions
import functools
import importlib.util
import itertools
import struct
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

from lowacc.formats import AccumulatorConfig, FloatFormat
from lowacc.hardware import INPUT_TYPES, OUTPUT_TYPES, FusedDotProduct
from lowacc.quantize import limit_bits

__all__ = ['available', 'conv', 'dot', 'exact_sum', 'scaled', 'scaled_total', 'supports']

_TARGET = 'lowacc_chunk_dot'
_ROUNDINGS = {'nearest_even': 0, 'toward_zero': 1, 'up': 2, 'down': 3}
_OVERFLOWS = {'none': 0, 'inf': 1, 'saturate': 2}
_ORDERS = {'chunk': 0, 'fma': 1}
_F32_MAX = (2 ** 24 - 1) * 2 ** 104


def _elf_problem(path: str) -> Optional[str]:
  """Why the file at `path` is not a whole 64-bit little-endian ELF library, or None.

  dlopen maps the file's segments without checking its length, and touching a page past the end
  of a truncated file kills the process (SIGBUS): so the headers, every loaded segment and the
  section table must lie inside the file.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 64 or data[:4] != b'\x7fELF' or data[4:6] != b'\x02\x01':
    return 'not a 64-bit little-endian ELF file'
  phoff, shoff = struct.unpack_from('<QQ', data, 32)
  phentsize, phnum, shentsize, shnum = struct.unpack_from('<HHHH', data, 54)
  if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
    return f'truncated: {len(data)} bytes, its headers end past them'
  for i in range(phnum):
    kind, _, offset, _, _, filesz = struct.unpack_from('<IIQQQQ', data, phoff + i * phentsize)
    if kind == 1 and offset + filesz > len(data):  # PT_LOAD
      return f'truncated: {len(data)} bytes, a loaded segment ends at {offset + filesz}'
  return None


def _load(path: str):
  """The kernel library at `path`; OSError saying why where it does not load."""
  problem = _elf_problem(path)
  if problem is not None:
    raise OSError(problem)
  library = ctypes.cdll.LoadLibrary(path)
  try:
    library.LowaccChunkDot, library.LowaccChunkDotSupported  # a stale or foreign build lacks them
  except AttributeError as e:
    raise OSError(e) from None
  return library


@functools.cache
def available() -> bool:
  """Whether the kernel was built and this CPU runs it; if so, registers it with XLA. A library
  that is there but does not load (truncated, stale, without the kernel) warns once."""
  spec = importlib.util.find_spec('lowacc.kernels._chunk_dot')
  if spec is None or spec.origin is None:
    return False
  try:
    library = _load(spec.origin)
  except OSError as e:
    warnings.warn(f"lowacc: the native kernel {spec.origin} does not load ({e}); order='chunk' "
                  'runs on the XLA path')
    return False
  if not library.LowaccChunkDotSupported():
    return False
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.LowaccChunkDot), platform='cpu')
  return True


def _covered(fmt: Optional[FloatFormat]) -> bool:
  """Formats whose every nonzero result is a float32 normal (float32 subnormals flushed), so
  that a rounding drops a fixed 23 - man_bits bits: the kernel's rounding."""
  return fmt is None or isinstance(fmt, FloatFormat) and (  # the kernel rounds FloatFormats only
      fmt.rounding in _ROUNDINGS and fmt.man_bits < 23
      and (fmt.underflow == 'none' or (fmt.underflow == 'flush' and fmt.min_exp > -126)))


def _fused(cfg: AccumulatorConfig) -> bool:
  """Whether the kernel runs cfg's chain as a matrix unit's fused dot products (chunk_dot.cc's
  Fused): a `FusedDotProduct` that reads c in the type it writes, one chunk (no promotion), no
  product or combine rounding."""
  acc = cfg.acc
  return (isinstance(acc, FusedDotProduct) and acc.c_type in (None, acc.output)
          and cfg.order == 'fma' and cfg.chunk_size is None and cfg.product is None
          and cfg.combine_format is None)


def supports(cfg: AccumulatorConfig) -> bool:
  """Whether `dot` computes this config's forward, the kernel being available: order 'fma' or
  'chunk', acc, product and combine formats that are None (float32) or `_covered`
  (deterministic rounding, man_bits < 23, underflow 'flush' above float32's normal range or
  'none'); or a matrix unit's fused dot product (`_fused`)."""
  if _fused(cfg):
    return available()
  return (cfg.order in _ORDERS and cfg.acc is not None and _covered(cfg.acc)
          and _covered(cfg.product) and _covered(cfg.combine_format) and available())


def _binades(fmt: Optional[FloatFormat]):
  """(lowest, highest) exponent of the nonzero finite values of a covered format (None: float32)
  as the kernel sees them: float32 normals only (FTZ/DAZ), so underflow 'none' reaches 2^-126 and
  overflow 'none' 2^127."""
  if fmt is None:
    return -126, 127
  return (fmt.min_exp if fmt.underflow == 'flush' else -126,
          127 if fmt.overflow == 'none' else fmt.max_exp)


@functools.cache
def exact_sum(a: Optional[FloatFormat], b: Optional[FloatFormat]) -> bool:
  """Whether the float32 sum of any finite value of format `a` and any of format `b` (None:
  float32) is exact, so that a chain step Q(s + u) may round fl32(s + u) alone, without TwoSum.

  Proof. Take nonzero a in binade 2^ea (quantum 2^qa, qa = ea - Ma) and b in binade 2^eb
  (qb = eb - Mb). a + b is an integer multiple N of 2^q, q = min(qa, qb), with |N| <= (2^(ea+1) -
  2^qa + 2^(eb+1) - 2^qb) / 2^q, attained by the two largest values of the binades. If that
  bound is <= 2^24, and the bound on |a + b| itself is <= float32's max, a + b is a float32, or
  a float32 subnormal: which FTZ would flush. A nonzero a + b is >= 2^q_min, q_min = the least
  quantum of both formats, so q_min >= -126 rules that out. (With a zero operand the sum is
  the other operand.) For fixed eb, the bound on N grows with ea where qa >= qb and falls where
  qa < qb, so over the rectangle of binades it peaks at a corner: the four corners decide.
  Infinities and NaN add exactly in float32 as in the exact chain.

  Only exact sums take the fast path: where a float32 sum can be inexact, rounding it and then
  rounding into the format is not the exact rounding in general (under toward_zero, a + b with
  b negative and below half a float32 ulp of a rounds back to a, whose truncation is a, while
  the exact truncation is the grid point below a), so those pairs run TwoSum with a sticky bit,
  or, for a directed acc rounding, the float32 sum rounded in the same direction (chunk_dot.cc's
  DirectedStep).
  A wider criterion (b's smallest normal above half a float32 ulp of any a, so that float32
  rounding keeps the sticky information) would admit more pairs, e.g. M7E4b10 with an M7E4b13
  product, where the tests found the two paths equal; it is not proven here, so not used.
  """
  (la, ha), (lb, hb) = _binades(a), _binades(b)
  ma, mb = (23 if f is None else f.man_bits for f in (a, b))
  if min(la - ma, lb - mb) < -126:
    return False
  for ea, eb in itertools.product((la, ha), (lb, hb)):
    qa, qb = ea - ma, eb - mb
    q = min(qa, qb)
    # Exact integers in units of 2^q (q may be negative): |a| + |b| <= top / 2^-q.
    top = (2 ** (ea + 1 - q) - 2 ** (qa - q)) + (2 ** (eb + 1 - q) - 2 ** (qb - q))
    if top > 2 ** 24 or fractions.Fraction(top) * fractions.Fraction(2) ** q > _F32_MAX:
      return False
  return True


def _scalable(f) -> bool:
  """Formats that the scaled path carries in their own scale (chunk_dot.cc's ScaledFormat)."""
  return (isinstance(f, FloatFormat) and f.rounding in ('toward_zero', 'nearest_even')
          and f.underflow == 'flush' and f.overflow == 'saturate' and f.man_bits >= 1
          and f.min_exp <= 0)


def scaled(cfg: AccumulatorConfig) -> bool:
  """Whether the kernel runs this config's chain on its scaled path (chunk_dot.cc's
  ScaledFormat), where the CPU's flush-to-zero flushes: a product format toward_zero or
  nearest_even, 'flush', 'saturate', man_bits >= 1 and min_normal <= 1; for order 'fma', an acc
  of the same kind too, and every step sum exact (`exact_sum`); order 'chunk' sums the rounded
  products in float32, and rounds its acc as elsewhere. A nearest_even acc also needs the
  product's min_normal at most half the acc's, and the smallest quantum of the two formats at
  least acc.min_normal * 2^(man_bits - 23), so that no nonzero sum falls where its Veltkamp
  splitting would not flush."""
  acc, product = cfg.acc, cfg.product
  if cfg.order == 'chunk':
    return _scalable(product)
  if not (cfg.order == 'fma' and _scalable(acc) and _scalable(product)
          and exact_sum(acc, product)):
    return False
  if acc.rounding == 'nearest_even':
    quantum = min(acc.min_exp - acc.man_bits, product.min_exp - product.man_bits)
    return (product.min_exp <= acc.min_exp - 1
            and quantum >= acc.min_exp - (23 - acc.man_bits))
  return True


def scaled_total(cfg: AccumulatorConfig) -> bool:
  """Whether order 'chunk' rounds its chunk sums and their combine in the acc's scale
  (chunk_dot.cc's Tile, kScaledTotal): a toward_zero `_scalable` acc that is also the combine's
  format, and every sum of two of its values exact (`exact_sum`), as in the paper's preset."""
  acc = cfg.acc
  return (cfg.order == 'chunk' and _scalable(acc) and acc.rounding == 'toward_zero'
          and cfg.combine_format == acc and exact_sum(acc, acc))


def _fields(fmt: Optional[FloatFormat]) -> np.ndarray:
  """[man_bits, rounding, overflow, flush_below, limit, m0_parity]: chunk_dot.cc's Format."""
  if fmt is None:
    return np.zeros((0,), np.int64)
  flush_below = (fmt.min_exp + 127) << 23 if fmt.underflow == 'flush' else 0
  return np.array([fmt.man_bits, _ROUNDINGS[fmt.rounding], _OVERFLOWS[fmt.overflow],
                   flush_below, limit_bits(fmt), (fmt.bias + 1) % 2], np.int64)


def _fused_fields(acc: FusedDotProduct, transposed: bool) -> np.ndarray:
  """chunk_dot.cc's Fused: [group, fraction_bits, e_zero, a_frac, a_min, b_frac, b_min,
  out_frac, out_min, out_max, nearest_even, c_frac, c_min, nan_bits], a_* for the kernel's x
  (w's type where the call is transposed)."""
  a, b = (acc.b_type, acc.a_type) if transposed else (acc.a_type, acc.b_type)
  out_min, out_max, nan_bits = OUTPUT_TYPES[acc.output]
  return np.array([acc.group, acc.fraction_bits, acc.e_zero, *INPUT_TYPES[a][:2],
                   *INPUT_TYPES[b][:2], acc.out_fraction_bits, out_min, out_max,
                   acc.rounding == 'nearest_even', 10 if acc.output == 'f16' else 23, out_min,
                   nan_bits], np.int64)


def _operands(cfg: AccumulatorConfig, x, w):
  """The kernel's operands: a fused dot product's read in its input types (`terms`, elementwise),
  others as they are; no derivative either way."""
  x, w = jax.lax.stop_gradient(x), jax.lax.stop_gradient(w)
  return cfg.acc.terms(x, w) if _fused(cfg) else (x, w)


def dot(x, w, cfg: AccumulatorConfig):
  """The simulated forward of `cfg` (order 'fma' or 'chunk') on canonical float32 x (B, M, K),
  w (B, K, N) -> (B, M, N), on the CPU, for a config that `supports` accepts. Under vmap, the
  vmapped axis joins B: one kernel call for the whole batch. Its result is piecewise constant in
  x and w, as the XLA path's integer rounding is, so its derivative is zero (an FFI call has
  none): lowacc.dot attaches the estimator's tangent, and second-order derivatives, which
  differentiate the forward, pass through."""
  if not supports(cfg):
    raise ValueError(f'lowacc.kernels.native.dot: not supported here: {cfg} '
                     f'(kernel available: {available()})')
  return _batched_call(cfg)(*_operands(cfg, x, w))


def _transposed_is_faster(m: int, n: int) -> bool:
  """Whether y^T = w^T x^T takes at most half the kernel's register tiles (4 rows by 32
  columns) that y = x w takes, as for a depthwise convolution (n = 1), whose single column would
  leave 31 of a tile's 32 lanes idle. Its bits are y's: the chain of each output element adds the
  same products, fl32(x w) = fl32(w x), in the same order."""
  tiles = lambda rows, cols: -(-rows // 4) * -(-cols // 32)
  return 2 * tiles(n, m) <= tiles(m, n)


def conv(xp, w, cfg: AccumulatorConfig, kernel, strides, dilation, out):
  """The simulated forward of a 2-d convolution's patch GEMM, as `dot` on its im2col patches
  (groups, N * out positions, kh * kw * C / groups) and w (groups, K, O / groups) would give it,
  read from the padded input xp (N, Hp, Wp, C) itself: no patches are built. kernel, strides,
  dilation (the kernel's) and out: (rows, columns) pairs. One device (no partitioning rule);
  under vmap, one call per element."""
  if not supports(cfg):
    raise ValueError(f'lowacc.kernels.native.conv: not supported here: {cfg} '
                     f'(kernel available: {available()})')
  xp, w = _operands(cfg, xp, w)
  positions = xp.shape[0] * out[0] * out[1]
  transposed = _transposed_is_faster(positions, w.shape[2])  # a depthwise conv
  geometry = np.array(xp.shape[1:] + (xp.shape[3] // w.shape[0],) + tuple(kernel)
                      + tuple(strides) + tuple(dilation) + tuple(out) + (transposed,), np.int64)
  if transposed:
    t = jnp.swapaxes(w, 1, 2)
    return jnp.swapaxes(_call(cfg, t, xp, geometry, (w.shape[0], w.shape[2], positions), True),
                        1, 2)
  return _call(cfg, xp, w, geometry, (w.shape[0], positions, w.shape[2]))


def _kernel(cfg: AccumulatorConfig, x, w):
  """The GEMM x (B, M, K) . w (B, K, N) on one device."""
  if _transposed_is_faster(x.shape[1], w.shape[2]):
    t = lambda a: jnp.swapaxes(a, 1, 2)
    return t(_call(cfg, t(w), t(x), None, (x.shape[0], w.shape[2], x.shape[1]), True))
  return _call(cfg, x, w, None, (x.shape[0], x.shape[1], w.shape[2]))


def _call(cfg: AccumulatorConfig, x, w, geometry, shape, transposed=False):
  """The FFI call on x (B, M, K), w (B, K, N) (geometry None), or with a padded convolution input
  as x or, transposed, as w (chunk_dot.cc's ConvGeometry and Operands), giving `shape`;
  transposed: x holds the dot's right operand (y^T = w^T x^T)."""
  k = w.shape[1] if geometry is None else int(np.prod(geometry[3:6]))  # kh kw cg
  chunk = k if cfg.chunk_size is None else min(cfg.chunk_size, k)
  ffi = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                         vmap_method='sequential')
  conv = np.zeros((0,), np.int64) if geometry is None else geometry
  order, chunk = np.int64(_ORDERS[cfg.order]), np.int64(max(chunk, 1))
  none = _fields(None)
  if _fused(cfg):
    return ffi(x, w, chunk=chunk, order=order, acc=none, product=none, combine=none,
               exact_step=np.int64(0), scaled=np.int64(0), scaled_total=np.int64(0),
               exact_combine=np.int64(0), conv=conv,
               fused=_fused_fields(cfg.acc, transposed))
  comb = cfg.combine_format
  return ffi(x, w, chunk=chunk, order=order, acc=_fields(cfg.acc), product=_fields(cfg.product),
             combine=_fields(comb), exact_step=np.int64(exact_sum(cfg.acc, cfg.product)),
             scaled=np.int64(scaled(cfg)), scaled_total=np.int64(scaled_total(cfg)),
             exact_combine=np.int64(comb is not None and exact_sum(comb, cfg.acc)), conv=conv,
             fused=none)


def _axes(spec, i: int) -> tuple:
  """The mesh axes that shard dimension i of a PartitionSpec (none past its end)."""
  entry = spec[i] if i < len(spec) else None
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _split(mesh, arg_shapes):
  """Shardings of x, w and y where every device computes its own block of y: B and M as x is
  split, N as w is (unless those axes already split B or M); K whole on every device, since the
  chain runs over all of it in order."""
  x_spec, w_spec = (a.sharding.spec for a in arg_shapes)
  b, m = _axes(x_spec, 0), _axes(x_spec, 1)
  n = tuple(a for a in _axes(w_spec, 2) if a not in b + m)
  spec = lambda *dims: jax.sharding.PartitionSpec(*(d or None for d in dims))
  named = lambda *dims: jax.sharding.NamedSharding(mesh, spec(*dims))
  return named(b, m, ()), named(b, (), n), named(b, m, n)


@functools.cache
def _partitioned(cfg: AccumulatorConfig):
  """The kernel as one block per device under jit's automatic partitioning (a data-parallel
  run), instead of XLA's default for an opaque call: gather every operand and compute all of y on
  every device."""
  call = custom_partitioning(functools.partial(_kernel, cfg))

  def partition(mesh, arg_shapes, result_shape):
    x, w, y = _split(mesh, arg_shapes)
    return mesh, functools.partial(_kernel, cfg), y, (x, w)

  call.def_partition(partition, infer_sharding_from_operands=lambda mesh, args, _: _split(
      mesh, args)[2], sharding_rule='b m k, b k n -> b m n', need_replication_factors=('k',))
  return call


@functools.cache
def _batched_call(cfg: AccumulatorConfig):
  @jax.custom_batching.custom_vmap
  def call(x, w):
    if jax.device_count() == 1:
      return _kernel(cfg, x, w)
    return _partitioned(cfg)(x, w)

  @call.def_vmap
  def fold_batch(axis_size, in_batched, x, w):
    x, w = (a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip((x, w), in_batched))
    y = call(x.reshape((-1,) + x.shape[2:]), w.reshape((-1,) + w.shape[2:]))
    return y.reshape((axis_size, -1) + y.shape[1:]), True

  return call
