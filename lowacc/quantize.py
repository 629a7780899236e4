"""Bit-exact rounding of float32 arrays into a FloatFormat, by integer operations on the bits.

`round_exact` rounds the exact value hi + lo of a float32 pair (as TwoSum returns it) in one step;
`quantize` is the public one-value case with a straight-through gradient, and `quantize_operand`
adds the power-of-two scaling of spec section 2.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowacc.formats import FloatFormat, InputQuant, IntQuant

_SIGN = 0x80000000
_ABS = 0x7FFFFFFF
_INF = 0x7F800000
_F32_MAX = 0x7F7FFFFF


def _u32(v: int):
  return jnp.uint32(v)


def _pow2_bits(k):
  """Bits of the float32 2^k for int32 k in [-149, 127] (subnormal below -126)."""
  k = k.astype(jnp.int32)
  normal = lax.shift_left((k + 127).astype(jnp.uint32), _u32(23))
  subnormal = lax.shift_left(_u32(1), jnp.clip(k + 149, 0, 31).astype(jnp.uint32))
  return jnp.where(k >= -126, normal, subnormal)


def _floor_log2(m):
  """floor(log2 m) for uint32 0 < m < 2^24, read off the exponent of float32(m) (an exact
  conversion); -127 for m = 0. Used instead of clz, which Pallas' Triton backend cannot lower."""
  f = lax.bitcast_convert_type(m.astype(jnp.float32), jnp.uint32)
  return lax.shift_right_logical(f, _u32(23)).astype(jnp.int32) - 127


def _float_bits(value: float) -> int:
  return int(np.float32(value).view(np.uint32))


def limit_bits(fmt: FloatFormat) -> int:
  """Bits of the largest finite magnitude: max_normal, or float32's max for overflow='none'."""
  return _F32_MAX if fmt.overflow == 'none' else _float_bits(fmt.max_normal)


def check_key(key):
  """Refuses a key that is not one jax PRNG key: jax.random.key(seed), or a uint32[2] PRNGKey."""
  dtype, shape = getattr(key, 'dtype', None), getattr(key, 'shape', None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
  if not (typed or (dtype == jnp.uint32 and shape == (2,))):
    what = repr(key) if dtype is None else f'an array of {dtype} and shape {shape}'
    raise ValueError(f'key={what} is not a jax PRNG key: pass one key, jax.random.key(seed)')


def random_bits(key, shape):
  """The uniform uint32 words a stochastic rounding of an array of `shape` draws from `key`."""
  return jax.random.bits(key, shape, jnp.uint32)


def round_exact(hi, lo, fmt: FloatFormat, rand=None):
  """Rounds the exact value hi + lo into `fmt` once; returns (value, sat).

  hi, lo: float32 with |lo| <= ulp(hi) / 2 (TwoSum's result), or lo=None for a single value.
    An infinite hi is an exact infinity (kept under overflow 'inf' and 'none', +-max_normal under
    'saturate'), except with lo NaN: a finite sum beyond float32, which overflows as one.
  rand: uint32 words for rounding='stochastic'.
  sat: the exact magnitude exceeded max_normal (float32's max for overflow='none').

  The exact magnitude is h + delta * ulp(h), with h its float32 truncation and delta in [0, 1).
  When at least one significand bit is dropped, deterministic rounding needs only whether
  delta > 0 (a sticky bit). Where no bit may be dropped (man_bits=23) or the fraction itself
  matters (stochastic), delta is kept as two more bits g, rounded to odd: g = 0, 1, 2, 3 for
  delta = 0, (0, 1/2), 1/2, (1/2, 1).
  """
  u = lax.bitcast_convert_type(hi, jnp.uint32)
  sign = u & _u32(_SIGN)
  a = u & _u32(_ABS)
  nan = a > _u32(_INF)
  infinite = a == _u32(_INF)  # an exact infinity, unless lo is NaN: a finite sum beyond float32
  sticky = jnp.zeros(a.shape, bool)
  if lo is not None:
    lu = lax.bitcast_convert_type(lo, jnp.uint32)
    la = lu & _u32(_ABS)
    infinite &= la <= _u32(_INF)
    sticky = (la != 0) & (a < _u32(_INF))
    below = sticky & ((lu ^ u) >= _u32(_SIGN))  # lo opposite to hi: exact value is below |hi|
    a = jnp.where(below, a - 1, a)
  biased = lax.shift_right_logical(a, _u32(23)).astype(jnp.int32)
  precise = fmt.man_bits == 23 or fmt.rounding == 'stochastic'
  if fmt.underflow == 'flush' and fmt.min_exp > -126 and not precise:
    # Every result below 2^min_exp > 2^-126 flushes, so only float32 normals survive, and for
    # those the bits to drop are a constant: fixed masks instead of shifts. (Zeros and float32
    # subnormals, for which the general path below drops more, flush either way.)
    dropped = 23 - fmt.man_bits
    shift = dc = _u32(dropped)
    rem = a & _u32((1 << dropped) - 1)
    half = _u32(1 << (dropped - 1))
    sticky_r = sticky
    if fmt.man_bits:
      odd = (lax.shift_right_logical(a, shift) & _u32(1)) == 1
    else:  # a normal M0 result is even when its exponent code e + bias is
      odd = ((biased + fmt.bias - 127) & 1) == 1
  else:
    m = jnp.where(biased > 0, (a & _u32(0x7FFFFF)) | _u32(0x800000), a)
    qx = jnp.maximum(biased, 1) - 150  # |h| = m * 2^qx
    if fmt.underflow == 'none' or fmt.min_exp == -126:
      e = qx + _floor_log2(m)  # floor(log2 |h|), float32 subnormals too
    else:
      # Below float32's normal range only the format's quantum matters ('subnormal'), or every
      # result flushes ('flush', min_normal > 2^-126): -127 stands for all those exponents.
      e = biased - 127
    q = jnp.maximum(e, fmt.min_exp) if fmt.underflow == 'subnormal' else e
    q = q - fmt.man_bits  # exponent of the target quantum
    d = jnp.maximum(q - qx, 0)  # significand bits to drop
    if precise:
      g = jnp.zeros_like(a)
      if lo is not None:
        half_ulp = jnp.where(qx - 1 >= -149, _pow2_bits(jnp.maximum(qx - 1, -149)),
                             _u32(_ABS))
        g = jnp.where(sticky,
                      jnp.where(la == half_ulp, _u32(2), jnp.where(below, _u32(3), _u32(1))),
                      _u32(0))
      m_r, shift, sticky = lax.shift_left(m, _u32(2)) | g, (d + 2).astype(jnp.uint32), g != 0
      sticky_r = jnp.zeros_like(sticky)
    else:
      m_r, shift, sticky_r = m, d.astype(jnp.uint32), sticky
    sc = jnp.clip(shift, _u32(1), _u32(27))  # m_r < 2^26: beyond 27 everything is remainder
    rem = m_r & (lax.shift_left(_u32(1), sc) - _u32(1))
    half = lax.shift_left(_u32(1), sc - _u32(1))
    kept_r = lax.shift_right_logical(m_r, sc)
    if fmt.man_bits:
      odd = (kept_r & _u32(1)) == 1
    else:  # a normal M0 result is even when its exponent code e + bias is
      odd = (kept_r == 1) & ((e + fmt.bias) % 2 == 1)
    dc = jnp.minimum(d, 31).astype(jnp.uint32)
  negative = sign != 0
  mode = fmt.rounding
  if mode == 'nearest_even':  # rem > half, or rem == half and (sticky or odd)
    up = rem + (sticky_r | odd).astype(jnp.uint32) > half
  elif mode == 'toward_zero':
    up = jnp.zeros_like(negative)
  elif mode in ('up', 'down'):
    up = ((rem != 0) | sticky_r) & (negative if mode == 'down' else ~negative)
  else:  # stochastic: up iff rand < floor(discarded fraction * 2^32)
    if rand is None:
      raise ValueError(f"FloatFormat.rounding='stochastic' ({fmt.name}) needs a PRNG key")
    frac32 = jnp.where(shift <= 32, lax.shift_left(rem, _u32(32) - jnp.minimum(shift, _u32(32))),
                       lax.shift_right_logical(rem, shift - _u32(32)))
    up = rand < frac32
  up &= shift > 0

  kept = a & ~(lax.shift_left(_u32(1), dc) - _u32(1))
  mag = kept + lax.shift_left(up.astype(jnp.uint32), dc)
  if fmt.underflow == 'subnormal':
    # d >= 24 only below 2^min_exp, where the quantum is 2^(min_exp - man_bits) >= 2^-149 and
    # |value| is below it: the result is 0 or that quantum.
    quantum = _u32(_float_bits(2.0 ** (fmt.min_exp - fmt.man_bits)))
    mag = jnp.where(d >= 24, jnp.where(up, quantum, _u32(0)), mag)

  limit = _u32(limit_bits(fmt))
  sat = (a > limit) | ((a == limit) & sticky)
  if fmt.underflow == 'flush':
    mag = jnp.where(mag < _u32((fmt.min_exp + 127) << 23), _u32(0), mag)
  if fmt.overflow != 'none':
    over = mag > limit
    if fmt.overflow != 'saturate':  # an infinity is exact: only finite results overflow
      over &= ~infinite
    if fmt.overflow == 'saturate' or mode == 'toward_zero':
      mag = jnp.where(over, limit, mag)
    elif mode in ('up', 'down'):
      to_max = negative if mode == 'up' else ~negative
      mag = jnp.where(over, jnp.where(to_max, limit, _u32(_INF)), mag)
    else:
      mag = jnp.where(over, _u32(_INF), mag)
  bits = jnp.where(nan, u, sign | mag)
  return lax.bitcast_convert_type(bits, jnp.float32), sat & ~nan


def as_float32(x, what: str = 'x'):
  """x as float32, exactly: floats of at most 32 bits and integers of at most 16 bits. Wider
  integers are refused (float32 holds integers exactly only up to 2^24), and so are 64-bit floats
  when jax_enable_x64 is on (otherwise JAX itself converts them to 32 bits)."""
  dtype = np.dtype(x.dtype) if hasattr(x, 'dtype') else np.asarray(x).dtype
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f'{what} has dtype {dtype}: expected a float or integer array')
  if jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize > 2:
    raise ValueError(f'{what} has dtype {dtype}: integers above 2^24 are not exact in float32, '
                     'the container lowacc simulates in; pass (u)int8/(u)int16, or float32')
  x = jnp.asarray(x)
  if x.dtype.itemsize > 4:
    raise ValueError(f'{what} has dtype {x.dtype}: lowacc simulates in float32 containers; pass '
                     'float32 (or narrower) values')
  return x.astype(jnp.float32)


def result_dtype(lhs, rhs, preferred_element_type=None):
  """The dtype of a simulated GEMM's float32 result: preferred_element_type, else the operands'
  float dtype, and float32 for integer operands (lax's integer result would wrap, not round)."""
  if preferred_element_type is not None:
    if not jnp.issubdtype(preferred_element_type, jnp.floating):
      raise ValueError(f'preferred_element_type={preferred_element_type!r} is invalid: a '
                       'simulated accumulator gives floats; use a float dtype or None')
    return preferred_element_type
  dtype = jnp.result_type(lhs, rhs)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _quantize_ste(x, rand, fmt):
  return round_exact(x, None, fmt, rand)[0]


@_quantize_ste.defjvp
def _quantize_ste_jvp(fmt, primals, tangents):
  x, rand = primals
  return _quantize_ste(x, rand, fmt), tangents[0]


def quantize(x, fmt: FloatFormat, key: Optional[jax.Array] = None):
  """Rounds float32 `x` into `fmt` (spec section 1); the result is float32 with values in `fmt`.

  rounding='stochastic' needs `key`: it rounds the magnitude up iff the word
  `random_bits(key, x.shape)` is below floor(discarded fraction * 2^32). The gradient is
  straight-through.
  """
  if not isinstance(fmt, FloatFormat):
    raise ValueError(f'fmt must be a FloatFormat, got {fmt!r}')
  x = as_float32(x)
  rand = None
  if fmt.rounding == 'stochastic':
    if key is None:
      raise ValueError(f"quantize: FloatFormat.rounding='stochastic' ({fmt.name}) needs key=, "
                       'a jax PRNG key')
    check_key(key)
    rand = random_bits(key, x.shape)
  return _quantize_ste(x, rand, fmt)


def _exponent_of(x):
  """floor(log2 |x|) of finite nonzero float32 x, from its bits (subnormals included)."""
  a = lax.bitcast_convert_type(x, jnp.uint32) & _u32(_ABS)
  biased = lax.shift_right_logical(a, _u32(23)).astype(jnp.int32)
  return jnp.where(biased > 0, biased - 127, _floor_log2(a) - 149)


def _scale(x, k):
  """x * 2^k for int32 k in [-252, 254], exact while the result stays a float32 normal."""
  k1 = jnp.clip(k, -126, 127)
  k2 = jnp.clip(k - k1, -126, 127)
  one = lambda k: lax.bitcast_convert_type(_pow2_bits(k), jnp.float32)
  return x * one(k1) * one(k2)


def quantize_operand(x, iq: Optional[InputQuant], reduce_axes=None):
  """Quantizes a GEMM operand by `iq` (spec section 2), with a straight-through gradient.

  reduce_axes: for scaling='per_channel_pow2', the axes max|x| is taken over (a weight's
  contracting axes), so each remaining index gets its own power-of-two scale.
  The scale comes from the finite values: an inf or NaN is quantized like any value (NaN stays
  NaN; inf stays inf, or becomes +-max_normal / 2^k under overflow='saturate').
  """
  if iq is None:
    return x
  if iq.scaling == 'none':
    return quantize(x, iq.format)
  axes = None if iq.scaling == 'per_tensor_pow2' else reduce_axes
  finite = jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)
  amax = lax.stop_gradient(jnp.max(finite, axis=axes, keepdims=True))
  usable = amax > 0
  k = jnp.where(usable, iq.format.max_exp - _exponent_of(jnp.where(usable, amax, 1.0)), 0)
  return _scale(quantize(_scale(x, k), iq.format), -k)


@jax.custom_jvp
def _round_ste(v):
  return jnp.round(v)  # half to even


@_round_ste.defjvp
def _round_ste_jvp(primals, tangents):
  return _round_ste(primals[0]), tangents[0]


def integer_operand(x, iq: IntQuant, reduce_axes):
  """(q, scale) of `iq` (its docstring): integer-valued float32 q, and the float32 scale
  broadcastable against x, with x ~ q * scale. A zero operand has scale 1."""
  axes = None if iq.scaling.startswith('per_tensor') else reduce_axes
  top = 2 ** (iq.bits - 1) - 1
  amax = lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=True))
  scale = jnp.where(amax > 0, amax / top, 1.0)
  if iq.scaling.endswith('_pow2'):
    scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
  return jnp.clip(_round_ste(x / scale), -top, top), scale
