"""Matrix units as hardware builds them: the fused dot-product accumulator and its presets.

`FusedDotProduct` is the accumulator kind of NVIDIA's tensor cores as MMA-Sim models them (Xie et
al., arXiv 2511.10909; its reference `mmasim` 2.1.1, arithmetic `T-FDPA`; also Fasi et al. 2021,
Khattak and Mikaitis 2025). One step takes a group of L products and the incoming accumulator c:

1. every operand is read in its input type: x = m 2^q exactly, with exponent
   e_x = max(floor(log2 |x|), e_min of the type) (subnormals keep e_min); products are exact,
   m_a m_b 2^(q_a + q_b) with exponent e_a + e_b; c likewise in its own type (fp32 or fp16);
2. a zero term (a zero product, a zero c) gets the exponent `e_zero`, and
   e_max = the largest exponent among the L + 1 terms (a zero term can be the largest);
3. each term is truncated toward zero to a multiple of 2^(e_max - F) (F fraction bits below the
   largest exponent), and the truncated terms are summed exactly;
4. the sum is normalised and rounded into the output type: 'toward_zero' with `out_fraction_bits`
   kept (23: fp32; 13 for Ada and Hopper FP8), gradual underflow below 2^-126, overflow to inf;
   or 'nearest_even' into fp16 (subnormals below 2^-14, overflow to inf);
5. any NaN, inf * 0, or inf - inf gives the canonical NaN (0x7FFFFFFF, fp16 0x7FFF); otherwise an
   inf gives that inf; a zero result is +0.

K runs group after group (an instruction of k = n L is n groups; K = k, 2k, ... chains
instructions), the result of one being c of the next, from c = +0. A short last group is padded
with zero products, as zero-filled operands in hardware. `mma(arch, instruction, shape_and_type)`
returns such a chain as an AccumulatorConfig, optionally promoted into an fp32 sum every N
products (`promote_every`, DeepSeek-V3's two-level accumulation).

AMD's MFMA as mmasim models them, from `mma(arch, 'mfma', suffix)`: `FlushedAddTree` is CDNA2's
for f16 and bf16 (float32 adds of pairs or fours of products into c, flushing subnormals);
`TwoLevelFusedSum` is CDNA3's for xf32, f16, bf16 and fp8 (a fused sum truncated 24 bits below
its largest product, then added to c in a second fused level that rounds down, then to nearest
even); `ExactSum` is CDNA1's for f16 and bf16 (the exact sum of 4 or 2 products and c rounded
once into fp32) and every f32 MFMA's (a chain of float32 FMAs). float64 and block-scaled (MX)
instructions are refused with the reason (`NOT_MODELLED`). The four kinds are `MatrixUnit`s: order
'fma' only, a short last instruction zero-filled, its d the output.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax.numpy as jnp
from jax import lax

from lowacc.accumulator import Accumulator, Flags
from lowacc.formats import BF16, FP32, AccumulatorConfig, FloatFormat, _check_choice, _check_int
from lowacc.quantize import _floor_log2, round_exact

# The FP6 and FP4 types (no inf, no NaN; XLA's CPU backend does not convert to them).
_SMALL = dict(rounding='nearest_even', underflow='subnormal', overflow='saturate')
# Input types, by mmasim's (PTX's) names: (fraction bits, smallest normal exponent, what rounds
# a float32 into it: a jnp dtype to cast to, or a FloatFormat). tf32 operands are float32 values
# truncated to 10 fraction bits (the hardware ignores the low 13 bits).
INPUT_TYPES = {
    'tf32': (10, -126, None),
    'f16': (10, -14, jnp.float16),
    'bf16': (7, -126, BF16),  # in integers: the CPU's bf16 conversion can flush subnormals
    'e4m3': (3, -6, jnp.float8_e4m3fn),
    'e5m2': (2, -14, jnp.float8_e5m2),
    'e3m2': (2, -2, FloatFormat(3, 2, **_SMALL)),
    'e2m3': (3, 0, FloatFormat(2, 3, **_SMALL)),
    'e2m1': (1, 0, FloatFormat(2, 1, **_SMALL)),
}
# MFMA input types, by mmasim's names: xf32 is read as tf32; fp8 and bf8 are CDNA3's e4m3fnuz and
# e5m2fnuz (no inf, no -0).
MFMA_INPUT_TYPES = {'xf32': INPUT_TYPES['tf32'], 'f16': INPUT_TYPES['f16'],
                    'bf16': INPUT_TYPES['bf16'], 'fp8': (3, -7, jnp.float8_e4m3fnuz),
                    'bf8': (2, -15, jnp.float8_e5m2fnuz)}
# The input types of `ExactSum`: CDNA1's f16 and bf16, and float32 for the f32 MFMA.
EXACT_TYPES = {'f32': (23, -126, jnp.float32), 'f16': INPUT_TYPES['f16'],
               'bf16': INPUT_TYPES['bf16']}
_ALL_TYPES = {**INPUT_TYPES, **MFMA_INPUT_TYPES, **EXACT_TYPES}
# Output (and accumulator) types: (smallest normal exponent, largest exponent, NaN bits in float32).
OUTPUT_TYPES = {'f32': (-126, 127, 0x7FFFFFFF), 'f16': (-14, 15, 0x7FFFE000)}
ROUNDINGS = ('toward_zero', 'nearest_even')
_U32 = jnp.uint32
_SIGN, _ABS, _INF = 0x80000000, 0x7FFFFFFF, 0x7F800000


def to_input_type(x, name: str):
  """float32 x read as input type `name` (INPUT_TYPES, MFMA_INPUT_TYPES): tf32 and xf32
  truncate, the others round to nearest even (FP6 and FP4 saturate)."""
  rounding = _ALL_TYPES[name][2]
  if rounding is None:
    bits = lax.bitcast_convert_type(x, _U32) & _U32(0xFFFFE000)
    return lax.bitcast_convert_type(bits, jnp.float32)
  if isinstance(rounding, FloatFormat):
    return round_exact(x, None, rounding)[0]
  return x.astype(rounding).astype(jnp.float32)


def _decompose(x, fraction_bits: int, min_exp: int, e_zero: int):
  """Finite float32 x in a type of `fraction_bits` -> (negative, m, q, e): |x| = m 2^q with
  m < 2^(fraction_bits + 1), and e = max(floor(log2 |x|), min_exp), or e_zero for a zero.

  From the bits alone, behind an optimization barrier: inside a fusion, XLA on the CPU (LLVM)
  rewrites a test of x's bits for zero into the float32 compare x == 0, which reads a float32
  subnormal as a zero (a fused result's gradual underflow, read back as the next step's c)."""
  u = lax.optimization_barrier(lax.bitcast_convert_type(x, _U32))
  a = u & _U32(_ABS)
  biased = lax.shift_right_logical(a, _U32(23)).astype(jnp.int32)
  m24 = jnp.where(biased > 0, (a & _U32(0x7FFFFF)) | _U32(0x800000), a)
  drop = 23 - fraction_bits  # trailing bits every value of the type has clear
  m = lax.shift_right_logical(m24, _U32(drop))
  q = jnp.maximum(biased, 1) - 150 + drop
  exponent = jnp.where(biased > 0, biased - 127, _floor_log2(a) - 149)  # -276 for a zero
  e = jnp.where(a == 0, e_zero, jnp.maximum(exponent, min_exp))
  return u >= _U32(_SIGN), m, q, e


def _zero_operands(mx, x, mw, w):
  """Which operands are zeros, from their significands (of `_decompose`): fused by XLA on the
  CPU, `_is_zero` of a subnormal operand has been seen to read true."""
  return (mx == 0) & jnp.isfinite(x), (mw == 0) & jnp.isfinite(w)


def _is_zero(x):
  """x == 0 from the bits: XLA on the CPU compares float32 subnormals as zeros."""
  return (lax.bitcast_convert_type(x, _U32) & _U32(_ABS)) == 0


def _shift(m, k):
  """m 2^k truncated toward zero, for uint32 m and int32 k with m 2^k < 2^32."""
  left = lax.shift_left(m, jnp.clip(k, 0, 31).astype(_U32))
  right = lax.shift_right_logical(m, jnp.clip(-k, 0, 31).astype(_U32))
  return jnp.where(k >= 0, left, right)


def _bit_length(s):
  """floor(log2 s) + 1 of uint32 s (0 for s = 0)."""
  hi = lax.shift_right_logical(s, _U32(16))
  return jnp.where(hi > 0, 17 + _floor_log2(hi), 1 + _floor_log2(s & _U32(0xFFFF)))


def _round(total, base, p: int, min_exp: int, nearest_even: bool):
  """The exact total 2^base (uint32 total) normalised and rounded to p fraction bits below its
  leading bit, or below min_exp (subnormals): toward zero, or to nearest even.
  -> (r, float32 bits of r 2^quantum, the result's leading exponent), for r > 0."""
  lead = base + _bit_length(total) - 1
  quantum = jnp.maximum(lead, min_exp) - p
  drop = quantum - base
  d = jnp.clip(drop, 0, 32)
  kept = jnp.where(d >= 32, _U32(0), lax.shift_right_logical(total, jnp.minimum(d, 31)
                                                            .astype(_U32)))
  if nearest_even:
    mask = jnp.where(d >= 32, _U32(0xFFFFFFFF),
                     lax.shift_left(_U32(1), jnp.minimum(d, 31).astype(_U32)) - _U32(1))
    rem = total & mask
    half = lax.shift_left(_U32(1), jnp.maximum(d - 1, 0).astype(_U32))
    up = (d > 0) & (drop <= 32) & ((rem > half) | ((rem == half) & ((kept & _U32(1)) == 1)))
    kept = kept + up.astype(_U32)
  r = jnp.where(drop <= 0, _shift(total, -drop), kept)  # |result| = r 2^quantum, r <= 2^(p+1)
  r_lead = quantum + _bit_length(r) - 1
  normal_bits = (lax.bitcast_convert_type(r.astype(jnp.float32), jnp.int32)
                 + lax.shift_left(quantum, 23)).astype(_U32)
  subnormal_bits = lax.shift_left(r, jnp.clip(quantum + 149, 0, 31).astype(_U32))
  return r, jnp.where(r_lead < -126, subnormal_bits, normal_bits), r_lead


class MatrixUnit(Accumulator):
  """What every matrix unit's kind shares: order 'fma' only, one step per `group` products
  (an instruction, or its fused groups), a short last step filled with +0 products as the
  hardware zero-fills a short instruction, and the last step's d as the output
  (`Accumulator.direct_output`), in fp32 unless the kind says otherwise."""
  orders = ('fma',)
  output = 'f32'
  direct_output = True

  @property
  def pad_product(self) -> float:
    return 0.0

  def _check_group(self, multiple_of: str):
    """group: an int >= 1 that is a multiple of the field `multiple_of`."""
    _check_int(self, 'group', 1)
    unit = getattr(self, multiple_of)
    if self.group % unit:
      raise ValueError(f'{type(self).__name__}.group={self.group} is invalid: must be a '
                       f'multiple of {multiple_of}={unit}')


@dataclasses.dataclass(frozen=True)
class FusedDotProduct(MatrixUnit):
  """A matrix unit's fused dot product of `group` products and the accumulator (module doc).

  fraction_bits: F, the bits kept below the largest exponent. e_zero: the exponent of a zero term.
  a_type, b_type: the operands' input types (INPUT_TYPES). output: 'f32' or 'f16', the type of
  the result and of the incoming accumulator; c_type: the accumulator's type when the instruction
  reads c in another type than it writes d (then group must be the instruction's k).
  rounding: into the output, 'toward_zero' or 'nearest_even'; out_fraction_bits: the bits kept.
  """
  fraction_bits: int
  e_zero: int
  a_type: str
  b_type: str
  group: int = 1
  output: str = 'f32'
  rounding: str = 'toward_zero'
  out_fraction_bits: int = 23
  c_type: Optional[str] = None

  def __post_init__(self):
    _check_int(self, 'group', 1)
    _check_int(self, 'fraction_bits', 0, 30)
    _check_int(self, 'e_zero', -1000, 1000)
    for field in ('a_type', 'b_type'):
      _check_choice('FusedDotProduct', field, getattr(self, field), tuple(INPUT_TYPES))
    _check_choice('FusedDotProduct', 'output', self.output, tuple(OUTPUT_TYPES))
    if self.c_type is not None:
      _check_choice('FusedDotProduct', 'c_type', self.c_type, tuple(OUTPUT_TYPES))
    _check_choice('FusedDotProduct', 'rounding', self.rounding, ROUNDINGS)
    _check_int(self, 'out_fraction_bits', 0, 10 if self.output == 'f16' else 23)
    # The truncated terms are summed in uint32: L products below 2^(F+2) and c below 2^(F+1).
    largest = 1
    for name in (self.a_type, self.b_type):
      largest *= 2 ** (INPUT_TYPES[name][0] + 1) - 1
    bound = self.group * (largest << self.fraction_bits >> (
        INPUT_TYPES[self.a_type][0] + INPUT_TYPES[self.b_type][0])) + 2 ** (self.fraction_bits + 1)
    if bound >= 2 ** 32:
      raise ValueError(f'FusedDotProduct(group={self.group}, fraction_bits={self.fraction_bits}) '
                       f'of {self.a_type} x {self.b_type}: the exact sum may reach 2^'
                       f'{bound.bit_length() - 1}, beyond the 32-bit sum this model keeps')

  @property
  def name(self) -> str:
    return (f'FDP{self.group}F{self.fraction_bits}.{self.a_type}.{self.b_type}.{self.output}.'
            f'{self.rounding}')

  def terms(self, x, w):
    """The operand slices x (L, B, M), w (L, B, N) read in their input types."""
    return to_input_type(x, self.a_type), to_input_type(w, self.b_type)

  def step(self, s, u, rand):
    """c = s (B, M, N) fused with the L products of u = (x (L, B, M), w (L, B, N))."""
    x, w = u
    min_out, max_out, nan_bits = OUTPUT_TYPES[self.output]
    if self.c_type is not None and self.c_type != self.output:
      s = s.astype(jnp.float16).astype(jnp.float32)  # d written as f32 is read back as f16 c
    c_min = OUTPUT_TYPES[self.c_type or self.output][0]
    c_frac = 10 if (self.c_type or self.output) == 'f16' else 23
    (fa, ma_min, _), (fb, mb_min, _) = INPUT_TYPES[self.a_type], INPUT_TYPES[self.b_type]
    # Specials are read as zeros here and decided apart below.
    _, mx, qx, ex = _decompose(jnp.where(jnp.isfinite(x), x, 0.0), fa, ma_min, self.e_zero)
    _, mw, qw, ew = _decompose(jnp.where(jnp.isfinite(w), w, 0.0), fb, mb_min, self.e_zero)
    # Products, (L, B, M, N): sign, significand, quantum, exponent (e_zero for a zero).
    neg = jnp.signbit(x)[..., None] ^ jnp.signbit(w)[:, :, None, :]  # specials' signs too
    m = mx[..., None] * mw[:, :, None, :]
    q = qx[..., None] + qw[:, :, None, :]
    e = jnp.where(m == 0, self.e_zero, ex[..., None] + ew[:, :, None, :])
    nc, mc, qc, ec = _decompose(jnp.where(jnp.isfinite(s), s, 0.0), c_frac, c_min, self.e_zero)
    e_max = jnp.maximum(jnp.max(e, axis=0), ec)
    F = self.fraction_bits
    t = _shift(m, q + F - e_max)  # truncated toward zero on the magnitude
    tc = _shift(mc, qc + F - e_max)
    pos = jnp.sum(jnp.where(neg, _U32(0), t), axis=0) + jnp.where(nc, _U32(0), tc)
    negs = jnp.sum(jnp.where(neg, t, _U32(0)), axis=0) + jnp.where(nc, tc, _U32(0))
    negative = negs > pos
    total = jnp.where(negative, negs - pos, pos - negs)  # exact: |sum| = total 2^(e_max - F)

    r, mag, r_lead = _round(total, e_max - F, self.out_fraction_bits, min_out,
                            self.rounding == 'nearest_even')
    over = r_lead > max_out
    mag = jnp.where(over, _U32(_INF), mag)
    bits = jnp.where(r == 0, _U32(0), mag | jnp.where(negative, _U32(_SIGN), _U32(0)))

    # Specials: NaN from a NaN, inf * 0 or inf - inf; else the infinity.
    zero_x, zero_w = _zero_operands(mx, x, mw, w)
    prod_nan = (jnp.isnan(x)[..., None] | jnp.isnan(w)[:, :, None, :]
                | (jnp.isinf(x)[..., None] & zero_w[:, :, None, :])
                | (zero_x[..., None] & jnp.isinf(w)[:, :, None, :]))
    prod_inf = (jnp.isinf(x)[..., None] | jnp.isinf(w)[:, :, None, :]) & ~prod_nan
    pinf = jnp.any(prod_inf & ~neg, axis=0) | (s == jnp.inf)
    ninf = jnp.any(prod_inf & neg, axis=0) | (s == -jnp.inf)
    nan = jnp.any(prod_nan, axis=0) | jnp.isnan(s) | (pinf & ninf)
    bits = jnp.where(pinf, _U32(_INF), jnp.where(ninf, _U32(_INF | _SIGN), bits))
    bits = jnp.where(nan, _U32(nan_bits), bits)
    out = lax.bitcast_convert_type(bits, jnp.float32)
    finite = ~(nan | pinf | ninf)
    nonzero_terms = jnp.any(m != 0, axis=0)
    return out, Flags(sat=finite & over, lost=finite & nonzero_terms & (out == s),
                      flush=finite & (total != 0) & (r == 0))



def _flush(v, min_exp: int, negative=None):
  """v with every magnitude below 2^min_exp (zeros and subnormals) replaced by a zero: +0, or
  signed by `negative` where given. Read from the bits (XLA on the CPU flushes subnormals)."""
  small = (lax.bitcast_convert_type(v, _U32) & _U32(_ABS)) < _U32((127 + min_exp) << 23)
  zero = 0.0 if negative is None else jnp.where(negative, -0.0, 0.0)
  return jnp.where(small, zero, v)


def _ftz_add(a, b):
  """fl32(a + b) of float32 normals, zeros or specials, a subnormal result flushed to a zero of
  its sign; an exact zero is signed as IEEE 754 signs it (-0 only for -0 + -0).
  -> (sum, whether a nonzero sum was flushed)"""
  cancel = a == -b
  negative = jnp.where(cancel, jnp.signbit(a) & jnp.signbit(b), a < -b)
  s = _flush(a + b, -126, negative)
  return s, ~cancel & _is_zero(s)


@dataclasses.dataclass(frozen=True)
class FlushedAddTree(MatrixUnit):
  """An MFMA that adds products in float32 adds flushing subnormals: CDNA2's f16 and bf16
  (mmasim 2.1.1's `MMA_FTZ_MUL_ADD`). One step is one instruction of `group` (its k) products
  and the accumulator c:

  1. operands are read in `in_type` ('f16' or 'bf16'); a subnormal or zero operand, and a
     subnormal or zero c, reads as +0;
  2. products are float32 products (exact for f16, nearest even for bf16), a subnormal product a
     zero of its sign;
  3. for each `tree` (2 or 4) consecutive products: their sum t (p0 + p1, or (p0 + p1) +
     (p2 + p3)), then c <- c + t; every add rounds to nearest even in float32 and flushes a
     subnormal result to a zero of its sign (an exact zero: IEEE 754's sign).

  NaN and inf follow float32 arithmetic (mmasim leaves NaN payloads to the host CPU; they are not
  modelled). A short last instruction is zero-filled (+0 operands), as in hardware. Flags: sat, a
  result that overflowed (a product or a sum) to inf from finite operands; flush, c flushed to
  zero inside the step. The rare -0 of a flushed negative sum is the result, as in mmasim.
  """
  in_type: str
  group: int
  tree: int = 4

  def __post_init__(self):
    _check_choice('FlushedAddTree', 'in_type', self.in_type, ('f16', 'bf16'))
    if isinstance(self.tree, bool) or self.tree not in (2, 4):
      raise ValueError(f'FlushedAddTree.tree={self.tree!r} is invalid: valid values are 2 and 4')
    self._check_group('tree')

  @property
  def name(self) -> str:
    return f'FTZ{self.group}T{self.tree}.{self.in_type}.f32'

  def terms(self, x, w):
    """The operand slices x (L, B, M), w (L, B, N) in the input type, small values read as +0."""
    read = lambda v: _flush(to_input_type(v, self.in_type), INPUT_TYPES[self.in_type][1])
    return read(x), read(w)

  def step(self, s, u, rand):
    """c = s (B, M, N) and the `group` products of u = (x (L, B, M), w (L, B, N))."""
    x, w = u
    negative = jnp.signbit(x)[..., None] ^ jnp.signbit(w)[:, :, None, :]
    p = _flush(x[..., None] * w[:, :, None, :], -126, negative)
    c, flushed = _flush(s, -126), jnp.zeros(s.shape, bool)
    for i in range(0, self.group, self.tree):
      t = _ftz_add(p[i], p[i + 1])[0]
      if self.tree == 4:
        t = _ftz_add(t, _ftz_add(p[i + 2], p[i + 3])[0])[0]
      c, f = _ftz_add(c, t)
      flushed |= f
    finite = (jnp.all(jnp.isfinite(x), axis=0)[..., None] & jnp.all(jnp.isfinite(w), axis=0)[
        :, None, :] & jnp.isfinite(s))  # finite operands: an inf result overflowed
    nonzero = jnp.any(~_is_zero(p), axis=0)
    return c, Flags(sat=finite & ~jnp.isfinite(c), lost=finite & nonzero & (c == s),
                    flush=finite & flushed)



_NO_EXP = -1000  # the exponent of a zero product: below every other


def _first_level(m, q, e, neg):
  """Products m 2^q (L, B, M, N) of exponents e, each truncated toward zero to a multiple of
  2^(e_max - 24), summed exactly. -> (D as int32, e_max): the sum is D 2^(e_max - 24)."""
  e_max = jnp.max(e, axis=0)
  t = _shift(m, q + 24 - e_max)  # < 2^26: a product is below 4 2^e
  pos = jnp.sum(jnp.where(neg, _U32(0), t), axis=0).astype(jnp.int32)
  return pos - jnp.sum(jnp.where(neg, t, _U32(0)), axis=0).astype(jnp.int32), e_max


def _floor_shift(v, k):
  """floor(v 2^-k) of int32 v for int32 k >= 0."""
  return lax.shift_right_arithmetic(v, jnp.minimum(k, 31))


@dataclasses.dataclass(frozen=True)
class TwoLevelFusedSum(MatrixUnit):
  """CDNA3's MFMA (mmasim 2.1.1's MMA_TR_FDPA; with `halves`, the fp8 MMA_GTR_FDPA). One step
  takes `group` products and the accumulator c:

  1. operands are read in their input types (MFMA_INPUT_TYPES) with exponents e =
     max(floor(log2 |x|), e_min); products are exact, with exponent e_a + e_b; a product of 2^128
     or more is inf;
  2. first level: each product truncated toward zero to a multiple of 2^(e_max - 24), e_max the
     largest exponent of the nonzero products, and summed exactly: D. With `halves` the even and
     the odd products are two such sums, each rounded down (toward -inf) to a multiple of
     2^(e_dot - 24), e_dot the larger of their e_max, and added;
  3. second level: E = max(e_dot, e_c) (c's exponent as in 1, e_min -126; a zero c: -126); D
     rounded down to a multiple of 2^(E - 32), c to one of 2^(E - 24) (with `halves`, a c with
     e_c < E - 25 counts as 0); v, their exact sum;
  4. v rounded down to 31 fraction bits below max(floor(log2 |v|), -126), then to nearest even
     into fp32 (subnormals; overflow to inf). A zero is +0, or -0 where a negative v rounds to 0;
  5. NaN (0x7FFFFFFF) from a NaN, inf * 0 or inf - inf; otherwise an inf gives that inf. With
     `halves`, mmasim reads an inf or NaN c as of exponent -1, so that it counts as 0 (step 3)
     where e_dot > 24; this follows it (real hardware is not known to do so).
  """
  a_type: str
  b_type: str
  group: int
  halves: bool = False

  def __post_init__(self):
    for field in ('a_type', 'b_type'):
      _check_choice('TwoLevelFusedSum', field, getattr(self, field), tuple(MFMA_INPUT_TYPES))
    _check_int(self, 'group', 1, 16)
    if not isinstance(self.halves, bool) or self.halves and self.group % 2:
      raise ValueError(f'TwoLevelFusedSum.halves={self.halves!r} is invalid with group='
                       f'{self.group}: use a bool, and an even group for halves=True')

  @property
  def name(self) -> str:
    return f'TLF{self.group}{"H" if self.halves else ""}.{self.a_type}.{self.b_type}.f32'

  def terms(self, x, w):
    """The operand slices x (L, B, M), w (L, B, N) read in their input types."""
    return to_input_type(x, self.a_type), to_input_type(w, self.b_type)

  def step(self, s, u, rand):
    """c = s (B, M, N) fused with the `group` products of u = (x (L, B, M), w (L, B, N))."""
    x, w = u
    (fa, ea, _), (fb, eb, _) = MFMA_INPUT_TYPES[self.a_type], MFMA_INPUT_TYPES[self.b_type]
    _, mx, qx, ex = _decompose(jnp.where(jnp.isfinite(x), x, 0.0), fa, ea, 0)
    _, mw, qw, ew = _decompose(jnp.where(jnp.isfinite(w), w, 0.0), fb, eb, 0)
    neg = jnp.signbit(x)[..., None] ^ jnp.signbit(w)[:, :, None, :]
    m = mx[..., None] * mw[:, :, None, :]
    q = qx[..., None] + qw[:, :, None, :]
    zero_x, zero_w = _zero_operands(mx, x, mw, w)
    e = jnp.where(m == 0, _NO_EXP, ex[..., None] + ew[:, :, None, :])
    big = (m != 0) & (q + _bit_length(m) - 1 >= 128)  # overflows to inf
    if self.halves:
      (d_even, e_even), (d_odd, e_odd) = (_first_level(m[i::2], q[i::2], e[i::2], neg[i::2])
                                          for i in (0, 1))
      e_dot = jnp.maximum(e_even, e_odd)
      dot = (_floor_shift(d_even, e_dot - e_even) + _floor_shift(d_odd, e_dot - e_odd))
    else:
      dot, e_dot = _first_level(m, q, e, neg)
    nc, mc, qc, ec = _decompose(jnp.where(jnp.isfinite(s), s, 0.0), 23, -126, -126)
    top = jnp.maximum(e_dot, ec)  # E
    # D 2^(e_dot - 24) rounded down to a multiple of 2^(E - 32), as hi 2^8 + lo (0 <= lo < 2^8),
    # in units of 2^(E - 32): k = e_dot - E + 8 <= 8.
    k = e_dot - top + 8
    k_up = jnp.clip(k, 0, 8)
    a = _floor_shift(dot, jnp.maximum(-k, 0))
    hi = jnp.where(k >= 0, _floor_shift(dot, 8 - k_up), _floor_shift(a, 8))
    lo = jnp.where(k >= 0, lax.shift_left(dot, k_up), a) & 0xFF
    # c rounded down to a multiple of 2^(E - 24): C, in units of 2^(E - 24).
    r_c = top - 24 - qc
    c_mag = _shift(mc, -r_c).astype(jnp.int32)
    dropped = jnp.where(r_c >= 32, mc != 0, (mc & (lax.shift_left(
        _U32(1), jnp.clip(r_c, 0, 31).astype(_U32)) - _U32(1))) != 0) & (r_c > 0)
    c_int = jnp.where(nc, -c_mag - dropped.astype(jnp.int32), c_mag)
    if self.halves:
      c_int = jnp.where(ec < top - 25, 0, c_int)
    hi = hi + c_int  # v = (hi 2^8 + lo) 2^(E - 32), exactly
    negative = hi < 0
    borrow = negative & (lo > 0)
    mag_hi = jnp.where(negative, -hi - borrow.astype(jnp.int32), hi).astype(_U32)
    mag_lo = jnp.where(borrow, 256 - lo, lo).astype(_U32)
    base = top - 32
    n = jnp.where(mag_hi > 0, 8 + _bit_length(mag_hi), _bit_length(mag_lo))
    # Round down to 31 fraction bits (drop <= 6 bits of a 38-bit |v|): a negative v's magnitude
    # rounds up.
    drop = jnp.clip(jnp.maximum(base + n - 1, -126) - 31 - base, 0, 8)
    kept = lax.shift_left(mag_hi, (8 - drop).astype(_U32)) | lax.shift_right_logical(
        mag_lo, drop.astype(_U32))
    up = negative & ((mag_lo & (lax.shift_left(_U32(1), drop.astype(_U32)) - _U32(1))) != 0)
    carry = up & (kept == _U32(0xFFFFFFFF))
    total = jnp.where(carry, _U32(1 << 31), kept + up.astype(_U32))
    r, mag, r_lead = _round(total, base + drop + carry.astype(jnp.int32), 23, -126, True)
    over = r_lead > 127
    mag = jnp.where(over, _U32(_INF), jnp.where(r == 0, _U32(0), mag))
    bits = mag | jnp.where(negative, _U32(_SIGN), _U32(0))

    prod_nan = (jnp.isnan(x)[..., None] | jnp.isnan(w)[:, :, None, :]
                | (jnp.isinf(x)[..., None] & zero_w[:, :, None, :])
                | (zero_x[..., None] & jnp.isinf(w)[:, :, None, :]))
    prod_inf = (jnp.isinf(x)[..., None] | jnp.isinf(w)[:, :, None, :] | big) & ~prod_nan
    c = s if not self.halves else jnp.where(e_dot > 24, 0.0, s)  # mmasim: inf, NaN: e_c = -1
    pinf = jnp.any(prod_inf & ~neg, axis=0) | (c == jnp.inf)
    ninf = jnp.any(prod_inf & neg, axis=0) | (c == -jnp.inf)
    nan = jnp.any(prod_nan, axis=0) | jnp.isnan(c) | (pinf & ninf)
    bits = jnp.where(pinf, _U32(_INF), jnp.where(ninf, _U32(_INF | _SIGN), bits))
    out = lax.bitcast_convert_type(jnp.where(nan, _U32(0x7FFFFFFF), bits), jnp.float32)
    finite = ~(nan | pinf | ninf)
    operands = (jnp.all(jnp.isfinite(x), axis=0)[..., None]
                & jnp.all(jnp.isfinite(w), axis=0)[:, None, :] & jnp.isfinite(s))
    return out, Flags(sat=operands & (over | jnp.any(big, axis=0)),
                      lost=finite & jnp.any(m != 0, axis=0) & (out == s),
                      flush=finite & (total != 0) & (r == 0))


def _place(v, offset, n: int):
  """v 2^offset as n uncarried 16-bit digits (int32, a leading axis), for uint32 v < 2^25 and
  int32 offset with v 2^offset < 2^(16 n) (v = 0 for a negative offset)."""
  i = lax.shift_right_arithmetic(offset, 4)
  r = (offset & 15).astype(_U32)
  lo = lax.shift_left(v & _U32(0xFFFF), r)  # < 2^31
  hi = lax.shift_left(lax.shift_right_logical(v, _U32(16)), r)  # < 2^24
  parts = [p.astype(jnp.int32) for p in (lo & _U32(0xFFFF),
                                         lax.shift_right_logical(lo, _U32(16)) + (hi & _U32(0xFFFF)),
                                         lax.shift_right_logical(hi, _U32(16)))]
  k = lax.broadcasted_iota(jnp.int32, (n,) + v.shape, 0) - i
  return jnp.where(k == 0, parts[0], jnp.where(k == 1, parts[1], jnp.where(k == 2, parts[2], 0)))


def _carry(digits):
  """Uncarried int32 digits (n, ...) -> (digits in [0, 2^16), the carry out: -1 for a negative
  value)."""
  def body(carry, d):
    v = d + carry
    return lax.shift_right_arithmetic(v, 16), v & 0xFFFF
  carry, out = lax.scan(body, jnp.zeros_like(digits[0]), digits)
  return out, carry


def _select(digits, index):
  """digits[index] per element (0 outside)."""
  k = lax.broadcasted_iota(jnp.int32, digits.shape, 0)
  return jnp.sum(jnp.where(k == index, digits, 0), axis=0)


@dataclasses.dataclass(frozen=True)
class ExactSum(MatrixUnit):
  """An MFMA that rounds the exact sum of `fused` products and c once, to nearest even into fp32:
  CDNA1's f16 and bf16 (mmasim 2.1.1's MMA_E_FDPA: 4 or 2 products) and every f32 MFMA
  (MMA_FMA: fused=1, a chain of float32 FMAs). One step is one instruction of `group` (its k)
  products, `fused` at a time, in order:

  1. operands are read in `in_type` ('f32', 'f16' or 'bf16'), subnormals kept; products are
     exact;
  2. c <- the exact sum of c and the products, rounded to nearest even into fp32 with gradual
     underflow and overflow to inf. An exact zero is +0, but for an FMA (fused=1) -0 when both
     terms are -0, as IEEE 754 signs it (mmasim's exact sums give +0 there); a nonzero sum that
     rounds to zero keeps its sign;
  3. NaN (0x7FFFFFFF) from a NaN, inf * 0 or inf - inf; otherwise an inf gives that inf.

  The exact sum is held in a fixed-point register of 16-bit digits that spans every term the
  types allow (a Kulisch accumulator: 2^-298 to 2^258 for f32), so no cancellation loses a bit.
  A short last instruction is zero-filled (+0 operands), as in hardware. Flags: sat, a finite
  sum that overflowed to inf; flush, a nonzero sum that rounded to zero.
  """
  in_type: str
  group: int
  fused: int = 1

  def __post_init__(self):
    _check_choice('ExactSum', 'in_type', self.in_type, tuple(EXACT_TYPES))
    _check_int(self, 'fused', 1, 16)
    self._check_group('fused')

  @property
  def name(self) -> str:
    return f'EXACT{self.group}F{self.fused}.{self.in_type}.f32'

  def terms(self, x, w):
    """The operand slices x (L, B, M), w (L, B, N) (group 1: (B, M), (B, N)) read in the input
    type, as (L, B, M), (L, B, N)."""
    read = lambda v: to_input_type(v if self.group > 1 else v[None], self.in_type)
    return read(x), read(w)

  def _register(self):
    """(the exponent of the register's lowest bit, its digits): below the smallest product's
    quantum and fp32's, above `fused` of the largest products and c, with a sign bit."""
    fraction_bits, min_exp, _ = EXACT_TYPES[self.in_type]
    smallest = max(min_exp - fraction_bits, -126) - fraction_bits  # the least quantum m 2^q
    base = min(2 * smallest, -149)
    max_exp = 15 if self.in_type == 'f16' else 127
    top = max(2 * (max_exp + 1), 128) + self.fused.bit_length()
    return base, -(-(top - base + 1) // 16)

  def step(self, s, u, rand):
    """c = s (B, M, N) and the `group` products of u = (x (L, B, M), w (L, B, N))."""
    x, w = u
    fraction_bits, min_exp, _ = EXACT_TYPES[self.in_type]
    base, n = self._register()
    _, mx, qx, _ = _decompose(jnp.where(jnp.isfinite(x), x, 0.0), fraction_bits, min_exp, 0)
    _, mw, qw, _ = _decompose(jnp.where(jnp.isfinite(w), w, 0.0), fraction_bits, min_exp, 0)
    neg = jnp.signbit(x)[..., None] ^ jnp.signbit(w)[:, :, None, :]
    offset = qx[..., None] + qw[:, :, None, :] - base
    if 2 * (fraction_bits + 1) <= 25:
      pieces = [(mx[..., None] * mw[:, :, None, :], offset)]
    else:  # 24-bit significands: four products of 12-bit halves
      halves = lambda m: (lax.shift_right_logical(m, _U32(12)), m & _U32(0xFFF))
      (xh, xl), (wh, wl) = halves(mx), halves(mw)
      pieces = [(a[..., None] * b[:, :, None, :], offset + shift)
                for a, b, shift in ((xh, wh, 24), (xh, wl, 12), (xl, wh, 12), (xl, wl, 0))]
    products = sum(jnp.where(neg, -d, d) for d in (_place(v, o, n) for v, o in pieces))
    zero_x, zero_w = _zero_operands(mx, x, mw, w)
    zero = zero_x[..., None] | zero_w[:, :, None, :]
    prod_nan = (jnp.isnan(x)[..., None] | jnp.isnan(w)[:, :, None, :]
                | (jnp.isinf(x)[..., None] & zero_w[:, :, None, :])
                | (zero_x[..., None] & jnp.isinf(w)[:, :, None, :]))
    prod_inf = (jnp.isinf(x)[..., None] | jnp.isinf(w)[:, :, None, :]) & ~prod_nan
    index = lax.broadcasted_iota(jnp.int32, (n,) + s.shape, 0)

    def sub_step(c, i):
      """c and products i .. i + fused - 1 -> (the rounded sum, sat, flush)."""
      at = slice(i, i + self.fused)
      nc, mc, qc, _ = _decompose(jnp.where(jnp.isfinite(c), c, 0.0), 23, -126, 0)
      raw = jnp.where(nc, -1, 1) * _place(mc, qc - base, n) + jnp.sum(products[:, at], axis=1)
      negative = _carry(raw)[1] < 0
      mag = _carry(jnp.where(negative, -raw, raw))[0]
      lead = jnp.max(jnp.where(mag != 0, index, -1), axis=0)
      top = _select(mag, lead).astype(_U32)
      start = jnp.maximum(16 * lead + _bit_length(top) - 1 - 28, 0)  # 29 bits from the lead
      at_digit, r = lax.shift_right_arithmetic(start, 4), (start & 15).astype(_U32)
      g0, g1, g2 = (_select(mag, at_digit + j).astype(_U32) for j in range(3))
      window = (lax.shift_right_logical(g0, r) | lax.shift_left(g1, _U32(16) - r)
                | jnp.where(r == 0, _U32(0), lax.shift_left(g2, _U32(32) - r)))
      sticky = (((g0 & (lax.shift_left(_U32(1), r) - _U32(1))) != 0)
                | jnp.any((index < at_digit) & (mag != 0), axis=0))
      total = (window & _U32(0x1FFFFFFF)) | sticky.astype(_U32)
      rounded, bits, r_lead = _round(total, base + start, 23, -126, True)
      over = r_lead > 127
      nonzero = lead >= 0
      negative_zero = jnp.all(zero[at] & neg[at], axis=0) & (mc == 0) & nc & (self.fused == 1)
      sign = jnp.where(nonzero, negative, negative_zero)
      bits = jnp.where(nonzero, jnp.where(over, _U32(_INF), jnp.where(rounded == 0, _U32(0),
                                                                        bits)), _U32(0))
      bits = bits | jnp.where(sign, _U32(_SIGN), _U32(0))
      pinf = jnp.any(prod_inf[at] & ~neg[at], axis=0) | (c == jnp.inf)
      ninf = jnp.any(prod_inf[at] & neg[at], axis=0) | (c == -jnp.inf)
      nan = jnp.any(prod_nan[at], axis=0) | jnp.isnan(c) | (pinf & ninf)
      bits = jnp.where(pinf, _U32(_INF), jnp.where(ninf, _U32(_INF | _SIGN), bits))
      out = lax.bitcast_convert_type(jnp.where(nan, _U32(0x7FFFFFFF), bits), jnp.float32)
      finite = ~(nan | pinf | ninf)
      return out, finite & over, finite & nonzero & (rounded == 0)

    c, sat, flush = s, jnp.zeros(s.shape, bool), jnp.zeros(s.shape, bool)
    for i in range(0, self.group, self.fused):
      c, over, flushed = sub_step(c, i)
      sat, flush = sat | over, flush | flushed
    nonzero = jnp.any(~zero, axis=0)
    return c, Flags(sat=sat, lost=jnp.isfinite(c) & nonzero & (c == s), flush=flush)


# Per NVIDIA generation (from mmasim's model): F, the bytes of operands one fused group takes,
# and e_zero of a zero term for an fp16 output (fp32 outputs: 112 lower).
ARCHS = ('Volta', 'Turing', 'Ampere', 'Ada Lovelace', 'Hopper', 'Blackwell', 'RTX Blackwell')
AMD_ARCHS = ('CDNA1', 'CDNA2', 'CDNA3')
INSTRUCTIONS = {'mma': ARCHS, 'wgmma': ('Hopper',), 'tcgen05.mma': ('Blackwell',),
                'mfma': AMD_ARCHS}
_GENERATION = {'Volta': (23, 8, -19), 'Turing': (24, 16, -20), 'Ampere': (24, 16, -20),
               'Ada Lovelace': (24, 16, -20), 'Hopper': (25, 32, -21), 'Blackwell': (25, 32, -21),
               'RTX Blackwell': (25, 32, -21)}
_BYTES = {'tf32': 4, 'f16': 2, 'bf16': 2, 'e4m3': 1, 'e5m2': 1, 'e3m2': 1, 'e2m3': 1, 'e2m1': 1}
_FP8 = ('e4m3', 'e5m2')
# Why some instructions have no preset (ValueError from `mma`).
NOT_MODELLED = {
    'f64': 'float64 operands: lowacc simulates in float32 containers',
    'block-scaled': 'block-scaled (MX) instructions take per-block scale operands that '
                    'dot_general does not carry, and the k=64 ones sum 35 fraction bits, beyond '
                    "this model's 32-bit sum",
}
# MFMA suffixes, as mmasim spells them: CDNA1/CDNA2 'f32_32x32x8f16', 'f32_32x32x8bf16_1k';
# CDNA3 'f32_32x32x8_f16', 'f32_4x4x4_16b_f16', 'f32_16x16x32_fp8_bf8'.
_MFMA_OLD = re.compile(r'(f32|f64)_(\d+)x(\d+)x(\d+)(f32|f16|bf16|f64)(_1k)?')
_MFMA_CDNA3 = re.compile(r'(f32|f64)_(\d+)x(\d+)x(\d+)(?:_\d+b)?_(xf32|f32|f16|bf16|f64|fp8|bf8)'
                         r'(?:_(fp8|bf8))?')


def _parse(instruction: str, shape_and_type: str):
  """'m16n8k16[.kind::f16].f32.f16.f16[.f32]' -> (k, d, a, b, c)."""
  parts = shape_and_type.split('.') if isinstance(shape_and_type, str) else []
  if any(p.startswith('block') for p in parts):
    raise ValueError(f'shape_and_type={shape_and_type!r}: {NOT_MODELLED["block-scaled"]}')
  parts = [p for p in parts if not p.startswith('kind::')]
  wanted = 5 if instruction == 'mma' else 4
  shape = parts[0] if parts else ''
  mnk = shape[1:].replace('n', ' ').replace('k', ' ').split() if shape.startswith('m') else []
  if len(parts) != wanted or len(mnk) != 3 or not all(v.isdigit() for v in mnk):
    form = 'm<M>n<N>k<K>.<d>.<a>.<b>' + ('.<c>' if instruction == 'mma' else '')
    raise ValueError(f'shape_and_type={shape_and_type!r} is invalid for {instruction}: expected '
                     f"{form} (a '.kind::...' qualifier allowed), e.g. 'm16n8k16.f32.f16.f16.f32'")
  d, a, b = parts[1:4]
  c = parts[4] if instruction == 'mma' else d
  if 'f64' in (d, a, b, c):
    raise ValueError(f'shape_and_type={shape_and_type!r}: {NOT_MODELLED["f64"]}')
  for field, value, valid in (('d', d, OUTPUT_TYPES), ('a', a, INPUT_TYPES),
                              ('b', b, INPUT_TYPES), ('c', c, OUTPUT_TYPES)):
    if value not in valid:
      raise ValueError(f'shape_and_type={shape_and_type!r}: {field} type {value!r} is invalid: '
                       f'valid types are {tuple(valid)}')
  return int(mnk[2]), d, a, b, c


def mma(arch: str, instruction: str, shape_and_type: str,
        promote_every: Optional[int] = None) -> AccumulatorConfig:
  """The accumulation of K chained `instruction`s of `arch` (mmasim's names: arch 'Volta' ...
  'RTX Blackwell', 'CDNA1'..'CDNA3', instruction 'mma', 'wgmma', 'tcgen05.mma' or 'mfma',
  shape_and_type as PTX spells it, e.g. 'm16n8k16.f32.f16.f16.f32', 'm64n8k32.f32.e4m3.e4m3', or
  an MFMA suffix as mmasim spells it, e.g. 'f32_32x32x8f16', 'f32_32x32x8bf16_1k'), as an
  AccumulatorConfig for `lowacc.dot_general`, `matmul`, `conv_general_dilated`, policies and
  `simulate`.

  Operands are read in the instruction's input types (nearest-even casts; tf32 truncates), K is
  chained in fused groups (`FusedDotProduct`) from a zero accumulator, and the result is in the
  output type. promote_every: add the running sum into an fp32 accumulator (nearest-even) every
  that many products, restarting the instruction chain from zero (CUTLASS / DeepSeek-V3).

  Modelled: every NVIDIA mma / wgmma / tcgen05.mma of mmasim but float64 and block-scaled ones;
  AMD MFMA on CDNA2 for f16 and bf16 (`FlushedAddTree`; CDNA1's f16 and bf16 suffixes run there
  too) and on CDNA3 for xf32, f16, bf16, fp8 and bf8 (`TwoLevelFusedSum`); CDNA1's f16 and
  bf16 and every f32 MFMA (`ExactSum`: exact sums rounded once, FMA chains). The result is the
  last instruction's d, a -0 included (`Accumulator.direct_output`). Refused, with
  `NOT_MODELLED`'s reason: float64 and block scaling. Source: MMA-Sim (arXiv 2511.10909),
  mmasim 2.1.1 (nv_ptx/ and amd/sim.py), which the tests match bit for bit.
  """
  if instruction not in INSTRUCTIONS:
    raise ValueError(f'instruction={instruction!r} is invalid: valid instructions are '
                     f'{tuple(INSTRUCTIONS)}')
  if arch not in INSTRUCTIONS[instruction]:
    raise ValueError(f'arch={arch!r} is invalid for instruction={instruction!r}: valid archs are '
                     f'{INSTRUCTIONS[instruction]}')
  if instruction == 'mfma':
    return _mfma(arch, shape_and_type, promote_every)
  k, d, a, b, c = _parse(instruction, shape_and_type)
  fraction_bits, group_bytes, e_zero = _GENERATION[arch]
  out_bits = 23
  group = group_bytes // _BYTES[a]
  if arch == 'Turing' and shape_and_type.startswith('m8n8k4.'):  # Volta's instruction: its unit
    fraction_bits, group, e_zero = 23, 4, -19
  if a in _FP8 and (arch == 'Ada Lovelace' and instruction == 'mma' or instruction == 'wgmma'):
    fraction_bits, out_bits = 13, 13  # Ada and Hopper FP8 keep 13 fraction bits
  if d == 'f32':
    e_zero -= 112
  rounding = 'nearest_even' if d == 'f16' else 'toward_zero'
  acc = FusedDotProduct(group=min(k, group), fraction_bits=fraction_bits, e_zero=e_zero,
                        a_type=a, b_type=b, output=d, rounding=rounding,
                        out_fraction_bits=10 if d == 'f16' else out_bits,
                        c_type=None if c == d else c)
  return _chained(acc, promote_every)


def _chained(acc: Accumulator, promote_every: Optional[int]) -> AccumulatorConfig:
  """K in steps of acc from c = +0, promoted into an fp32 sum every `promote_every` products."""
  return AccumulatorConfig(acc=acc, chunk_size=promote_every, order='fma',
                           combine=None if promote_every is None else FP32)


def _mfma(arch: str, suffix: str, promote_every: Optional[int]) -> AccumulatorConfig:
  """The MFMA preset of `mma` (mmasim 2.1.1's amd/sim.py): f32 FMA chains and CDNA1's exact
  sums (`ExactSum`), CDNA2's f16 and bf16 (`FlushedAddTree`), CDNA3's (`TwoLevelFusedSum`)."""
  cdna3 = arch == 'CDNA3'
  match = (_MFMA_CDNA3 if cdna3 else _MFMA_OLD).fullmatch(suffix) if isinstance(suffix, str) \
      else None
  one_k = bool(match and not cdna3 and match[6])  # CDNA2's bf16 '_1k' instructions
  if not match or one_k and arch != 'CDNA2':
    form = ("'f32_<M>x<N>x<K>_<type>', e.g. 'f32_32x32x8_f16'" if arch == 'CDNA3' else
            "'f32_<M>x<N>x<K><type>', e.g. 'f32_32x32x8f16'"
            + (" or 'f32_32x32x8bf16_1k'" if arch == 'CDNA2' else ''))
    raise ValueError(f'shape_and_type={suffix!r} is invalid for mfma on {arch}: expected {form}')
  d, k, a = match[1], int(match[4]), match[5]
  if 'f64' in (d, a):
    raise ValueError(f'shape_and_type={suffix!r}: {NOT_MODELLED["f64"]}')
  if a == 'f32' or arch == 'CDNA1':  # FMA chains; CDNA1's exact sums of 4 f16 or 2 bf16
    fused = 1 if a == 'f32' else 4 if a == 'f16' else 2
    if k % fused:
      raise ValueError(f'shape_and_type={suffix!r}: k={k} is invalid for {arch}, which rounds '
                       f'the exact sum of {fused} {a} products: use a multiple of {fused}')
    return _chained(ExactSum(in_type=a, group=k, fused=fused), promote_every)
  if cdna3:
    fp8 = a in ('fp8', 'bf8')
    if fp8 != (match[6] is not None):
      raise ValueError(f'shape_and_type={suffix!r} is invalid for mfma on {arch}: fp8 and bf8 '
                       "name both operands' types ('f32_16x16x32_fp8_bf8'), the others one")
    group = min(k, 16 if fp8 else 4 if a == 'xf32' else 8)
    if k % group:
      raise ValueError(f'shape_and_type={suffix!r}: k={k} is invalid for {arch}, which fuses '
                       f'{a} products in groups of {group}: use a multiple of {group}')
    return _chained(TwoLevelFusedSum(a_type=a, b_type=match[6] or a, group=group, halves=fp8),
                    promote_every)
  tree = 2 if a == 'bf16' and not one_k else 4
  if k % tree:
    raise ValueError(f'shape_and_type={suffix!r}: k={k} is invalid for {arch}, which adds '
                     f'{a} products in trees of {tree}: use a multiple of {tree}')
  return _chained(FlushedAddTree(in_type=a, group=k, tree=tree), promote_every)


def parse(name: str) -> AccumulatorConfig:
  """The preset named 'arch/instruction/shape_and_type[/promote<N>]', e.g.
  'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3/promote128': `mma` of those fields (how experiments name
  a hardware accumulator)."""
  fields = name.split('/') if isinstance(name, str) else []
  promote = None
  if len(fields) == 4 and fields[3].startswith('promote') and fields[3][7:].isdigit():
    promote = int(fields.pop()[7:])
  if len(fields) != 3:
    raise ValueError(f"hardware accumulator {name!r} is invalid: expected "
                     "'arch/instruction/shape_and_type[/promote<N>]', e.g. "
                     "'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3/promote128'")
  return mma(*fields, promote_every=promote)
