"""order='chunk' through the native CPU kernel (chunk_dot.cc), an XLA FFI custom call.

`lowacc.dot` runs the forward of order='chunk' GEMMs through `chunk_dot` on the CPU when
`supports(cfg)`: the kernel was built (by `pip install`; it needs a C++17 compiler), the CPU
has AVX-512, and the config is one the kernel covers. Everywhere else it runs its XLA path,
which stays the reference: the tests hold the two equal bit for bit wherever the chunk partials
are exact (the contract leaves the order of the additions inside a chunk unspecified, so only
there is equality defined).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import struct
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowacc.formats import AccumulatorConfig, FloatFormat
from lowacc.quantize import limit_bits

__all__ = ['available', 'chunk_dot', 'supports']

_TARGET = 'lowacc_chunk_dot'
_ROUNDINGS = {'nearest_even': 0, 'toward_zero': 1, 'up': 2, 'down': 3}
_OVERFLOWS = {'none': 0, 'inf': 1, 'saturate': 2}


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


def supports(cfg: AccumulatorConfig) -> bool:
  """Whether `chunk_dot` computes this config's forward: order 'chunk' without product
  rounding, deterministic roundings of covered formats, and the kernel available."""
  return (cfg.order == 'chunk' and cfg.product is None and cfg.acc is not None
          and _covered(cfg.acc) and _covered(cfg.combine_format) and available())


def _fields(fmt: Optional[FloatFormat]) -> np.ndarray:
  """[man_bits, rounding, overflow, flush_below, limit, m0_parity]: chunk_dot.cc's Format."""
  if fmt is None:
    return np.zeros((0,), np.int64)
  flush_below = (fmt.min_exp + 127) << 23 if fmt.underflow == 'flush' else 0
  return np.array([fmt.man_bits, _ROUNDINGS[fmt.rounding], _OVERFLOWS[fmt.overflow],
                   flush_below, limit_bits(fmt), (fmt.bias + 1) % 2], np.int64)


def chunk_dot(x, w, cfg: AccumulatorConfig):
  """The forward of order='chunk' on canonical float32 x (B, M, K), w (B, K, N) -> (B, M, N),
  on the CPU, for a config that `supports` accepts. Under vmap, the vmapped axis joins B: one
  kernel call for the whole batch."""
  if not supports(cfg):
    raise ValueError(f'lowacc.kernels.native.chunk_dot: not supported here: {cfg} '
                     f'(kernel available: {available()})')
  return _batched_call(cfg)(x, w)


@functools.cache
def _batched_call(cfg: AccumulatorConfig):
  @jax.custom_batching.custom_vmap
  def call(x, w):
    b, m, k = x.shape
    chunk = k if cfg.chunk_size is None else min(cfg.chunk_size, k)
    ffi = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((b, m, w.shape[2]), jnp.float32))
    return ffi(x, w, chunk=np.int64(max(chunk, 1)), acc=_fields(cfg.acc),
               combine=_fields(cfg.combine_format))

  @call.def_vmap
  def fold_batch(axis_size, in_batched, x, w):
    x, w = (a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip((x, w), in_batched))
    y = call(x.reshape((-1,) + x.shape[2:]), w.reshape((-1,) + w.shape[2:]))
    return y.reshape((axis_size, -1) + y.shape[1:]), True

  return call
