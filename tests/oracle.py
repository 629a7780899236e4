"""An independent exact model of the numeric contract, in plain Python (no JAX, no numpy).

Values are Python floats (every float32 is one exactly) and sums are exact Fractions. This file
reads the contract (../shared/spec/numerics.md) directly and shares no code with lowacc: it only
reads a format's six fields. It models float32 arithmetic as XLA on the CPU runs it: subnormal
operands and results of a float32 product count as signed zeros (FTZ/DAZ).
"""

import math
import struct
from fractions import Fraction

F32_MIN_NORMAL = 2.0 ** -126
F32_MAX = float(Fraction(2 ** 24 - 1) * Fraction(2) ** 104)


def bits(x: float) -> int:
  return struct.unpack('<I', struct.pack('<f', x))[0]


def from_bits(b: int) -> float:
  return struct.unpack('<f', struct.pack('<I', b & 0xFFFFFFFF))[0]


def _floor_log2(a: Fraction) -> int:
  e = a.numerator.bit_length() - a.denominator.bit_length()
  if Fraction(2) ** e > a:
    e -= 1
  return e


def _pow2(e: int) -> Fraction:
  return Fraction(2) ** e


class Format:
  """A format's range, computed here from the contract's definitions."""

  def __init__(self, exp_bits, man_bits, bias=None, rounding='nearest_even', underflow='flush',
               overflow='saturate'):
    self.E, self.M = exp_bits, man_bits
    self.b = 2 ** (exp_bits - 1) - 1 if bias is None else bias
    self.rounding, self.underflow, self.overflow = rounding, underflow, overflow
    e_top = 2 ** exp_bits - (2 if overflow == 'inf' else 1)
    self.max_normal = _pow2(e_top - self.b) * (2 - _pow2(-man_bits))
    self.min_exp = 1 - self.b
    self.min_normal = _pow2(self.min_exp)

  @classmethod
  def of(cls, fmt):
    """From a lowacc FloatFormat (its fields only)."""
    return cls(fmt.exp_bits, fmt.man_bits, fmt.bias, fmt.rounding, fmt.underflow, fmt.overflow)


FLOAT32 = Format(8, 23, 127, 'nearest_even', 'subnormal', 'inf')


def _round_to_odd(a: Fraction, quantum: Fraction) -> Fraction:
  n = a / quantum
  f = math.floor(n)
  if n != f and f % 2 == 0:
    f += 1
  return f * quantum


def round_value(v, fmt: Format, rand=None, negative_zero=False):
  """Rounds the exact value v (Fraction, or float inf/nan) into fmt. -> (float, sat).

  negative_zero: the sign of v when v == 0.
  """
  if isinstance(v, float) and math.isnan(v):
    return v, False
  negative = v < 0 or (v == 0 and negative_zero)
  sign = -1.0 if negative else 1.0
  a = abs(v)
  limit = fmt.max_normal if fmt.overflow != 'none' else Fraction(F32_MAX)
  if a == 0:
    return sign * 0.0, False
  sat = a > limit
  infinite = math.isinf(a)
  if infinite:  # exact: kept, or +-max_normal under 'saturate' (below)
    r = a
  else:
    a = Fraction(a)
    e = _floor_log2(a)
    q = (max(e, fmt.min_exp) if fmt.underflow == 'subnormal' else e) - fmt.M
    n = a / _pow2(q)
    fl = math.floor(n)
    frac = n - fl
    mode = fmt.rounding
    if mode == 'nearest_even':
      # 'Even' is the encoding's last bit: a fraction bit, or for M = 0 the exponent code's.
      odd = fl % 2 == 1 if fmt.M > 0 or fl == 0 else (q + fmt.b) % 2 == 1
      up = frac > Fraction(1, 2) or (frac == Fraction(1, 2) and odd)
    elif mode == 'toward_zero':
      up = False
    elif mode == 'up':
      up = frac > 0 and not negative
    elif mode == 'down':
      up = frac > 0 and negative
    elif mode == 'stochastic':
      # The contract: the exact value rounded to odd at 2 bits below float32's precision, then up
      # iff the random word is below floor(discarded fraction * 2^32).
      a26 = _round_to_odd(a, _pow2(max(e, -126) - 23 - 2))
      n26 = a26 / _pow2(q)
      up = rand < math.floor((n26 - math.floor(n26)) * 2 ** 32)
    else:
      raise AssertionError(mode)
    r = (fl + up) * _pow2(q)
    if fmt.underflow == 'flush' and r < fmt.min_normal:
      r = Fraction(0)
  if fmt.overflow == 'none':
    if r > Fraction(F32_MAX):
      r = math.inf
  elif r > fmt.max_normal:
    to_max = fmt.overflow == 'saturate' or not infinite and (
        fmt.rounding == 'toward_zero' or (fmt.rounding == 'down' and not negative)
        or (fmt.rounding == 'up' and negative))
    r = fmt.max_normal if to_max else math.inf
  return sign * float(r), sat


def exact(x: float):
  return x if math.isinf(x) or math.isnan(x) else Fraction(x)


def quantize(x: float, fmt: Format, rand=None) -> float:
  return round_value(exact(x), fmt, rand, negative_zero=math.copysign(1, x) < 0)[0]


def _daz(x: float) -> float:
  return math.copysign(0.0, x) if abs(x) < F32_MIN_NORMAL else x


def product(x: float, w: float, fmt=None, rand=None) -> float:
  """p = Q_prod(fl32(x * w)), float32 flushing subnormal operands and results."""
  x, w = _daz(x), _daz(w)
  if math.isnan(x) or math.isnan(w) or (math.isinf(x) and w == 0) or (math.isinf(w) and x == 0):
    return math.nan
  negative = (math.copysign(1, x) < 0) != (math.copysign(1, w) < 0)
  if math.isinf(x) or math.isinf(w):
    p = -math.inf if negative else math.inf
  else:
    p = _daz(round_value(Fraction(x) * Fraction(w), FLOAT32, negative_zero=negative)[0])
  return p if fmt is None else round_value(exact(p), fmt, rand, math.copysign(1, p) < 0)[0]


def add(s: float, u: float, down=False):
  """The exact sum s + u and whether it is -0 when zero (IEEE 754 section 6.3): when s and u are
  both negative (both -0), or under `down` (rounding toward -inf) when either is."""
  if math.isnan(s) or math.isnan(u):
    return math.nan, False
  if math.isinf(s) or math.isinf(u):
    if math.isinf(s) and math.isinf(u) and s != u:
      return math.nan, False
    return (s if math.isinf(s) else u), False
  ns, nu = math.copysign(1, s) < 0, math.copysign(1, u) < 0
  return Fraction(s) + Fraction(u), (ns or nu) if down else (ns and nu)


def step(s: float, u: float, fmt, rand=None):
  """s_t = Q(s + u) rounded once, and the flags (sat, lost, flush) of the contract's section 4."""
  v, negative_zero = add(s, u, fmt is not None and fmt.rounding == 'down')
  if fmt is None:  # a float32 sum
    out = round_value(v, FLOAT32, negative_zero=negative_zero)[0]
    return _daz(out), (False, False, False)
  out, sat = round_value(v, fmt, rand, negative_zero)
  lost = u != 0 and out == s
  flush = out == 0 and v != 0
  return out, (sat, lost, flush)


def _chunk_partial(terms) -> float:
  """P, the float32 sum of a chunk's products from +0, for sums exact in float32 (any order)."""
  specials = {p for p in terms if math.isinf(p)} | {math.nan for p in terms if math.isnan(p)}
  if specials:
    return specials.pop() if len(specials) == 1 else math.nan  # one infinity, or inf - inf
  partial = sum(Fraction(p) for p in terms)
  if Fraction(round_value(partial, FLOAT32)[0]) != partial:
    raise ValueError('oracle: this chunk sum is not exact in float32; choose other inputs')
  return float(partial)  # a zero partial is +0: +0 + -0 = +0


def chain(xs, ws, cfg, rand=None):
  """One output element of the simulated dot: (value, steps) where steps lists, per chunk,
  (inner steps as (flags), the combine step's flags). rand(stream, t) gives random words."""
  acc = Format.of(cfg.acc)
  prod = None if cfg.product is None else Format.of(cfg.product)
  comb = cfg.acc if cfg.combine == 'acc' else cfg.combine
  comb = None if comb is None else Format.of(comb)
  r = (lambda stream, t: None) if rand is None else rand
  k = len(xs)
  c = cfg.chunk_size or k
  total = 0.0
  record = []
  for j, start in enumerate(range(0, k, c)):
    ks = range(start, min(start + c, k))
    inner = []
    if cfg.order == 'fma':
      s = 0.0
      for t in ks:
        s, flags = step(s, product(xs[t], ws[t], prod, r(0, t)), acc, r(1, t))
        inner.append(flags)
    else:
      terms = [product(xs[t], ws[t], prod, r(0, t)) for t in ks]
      s, flags = step(0.0, _chunk_partial(terms), acc, r(1, j))
      inner.append(flags)
    total, cflags = step(total, s, comb, r(2, j))
    record.append((inner, cflags))
  return total, record


def _passes(ste, flags):
  sat, lost, _ = flags
  if ste.endswith('_of'):
    return not sat
  if ste.endswith('_diff'):
    return not lost
  if ste.endswith('_both'):
    return not (sat or lost)
  return True


def _forgets(flags):
  return flags[0] or flags[2]


def factors(record, cfg):
  """dy/du for every inner step of the chain (products for 'fma', chunk sums for 'chunk')."""
  ste = cfg.ste
  recursive = ste.startswith('recursive')
  out = []
  for j, (inner, cflags) in enumerate(record):
    f_comb = _passes(ste, cflags)
    if recursive:
      f_comb = f_comb and not any(_forgets(later[1]) for later in record[j + 1:])
    for i, flags in enumerate(inner):
      f = _passes(ste, flags) and f_comb
      if recursive:
        f = f and not any(_forgets(later) for later in inner[i + 1:])
      out.append(1 if f else 0)
  return out


# The fused dot product of a matrix unit (lowacc.hardware's module doc), read from the kind's
# fields; the types' smallest normal exponents and output ranges are the IEEE-style definitions.
TYPE_MIN_EXP = {'tf32': -126, 'f16': -14, 'bf16': -126, 'e4m3': -6, 'e5m2': -14, 'e3m2': -2,
                'e2m3': 0, 'e2m1': 0, 'xf32': -126, 'fp8': -7, 'bf8': -15}
OUTPUT_RANGE = {'f32': (-126, 127), 'f16': (-14, 15)}


def _fused_exponent(v: Fraction, min_exp: int, e_zero: int) -> int:
  return e_zero if v == 0 else max(_floor_log2(abs(v)), min_exp)


def fused_step(xs, ws, c: float, kind) -> float:
  """One fused step: every term aligned to the largest exponent, truncated at kind.fraction_bits
  below it, summed exactly, rounded into the output type; a zero is +0. A NaN, inf * 0 or
  inf - inf is NaN, else an infinite term is the result."""
  specials = [x * w for x, w in zip(xs, ws) if not (math.isfinite(x) and math.isfinite(w))]
  specials += [] if math.isfinite(c) else [c]
  if specials:
    return sum(specials)  # nan, or the one signed infinity (inf - inf: nan)
  min_out, max_out = OUTPUT_RANGE[kind.output]
  terms = [(Fraction(x) * Fraction(w),
            kind.e_zero if x == 0 or w == 0 else
            _fused_exponent(Fraction(x), TYPE_MIN_EXP[kind.a_type], 0)
            + _fused_exponent(Fraction(w), TYPE_MIN_EXP[kind.b_type], 0))
           for x, w in zip(xs, ws)]
  terms.append((Fraction(c), _fused_exponent(Fraction(c), min_out, kind.e_zero)))
  quantum = _pow2(max(e for _, e in terms) - kind.fraction_bits)
  total = sum(math.trunc(v / quantum) * quantum for v, _ in terms)
  if total == 0:
    return 0.0
  q = _pow2(max(_floor_log2(abs(total)), min_out) - kind.out_fraction_bits)
  n = abs(total) / q
  kept = math.floor(n)
  if kind.rounding == 'nearest_even' and (n - kept > Fraction(1, 2)
                                          or n - kept == Fraction(1, 2) and kept % 2 == 1):
    kept += 1
  r = kept * q
  value = math.inf if r >= _pow2(max_out + 1) else float(r)
  return -value if total < 0 else value


def _steps(step, xs, ws, kind) -> float:
  """K products in steps of kind.group from c = +0, the last group padded with zeros."""
  c = 0.0
  for start in range(0, len(xs), kind.group):
    x = list(xs[start:start + kind.group])
    w = list(ws[start:start + kind.group])
    pad = kind.group - len(x)
    c = step(x + [0.0] * pad, w + [0.0] * pad, c, kind)
  return c


def fused_chain(xs, ws, kind) -> float:
  return _steps(fused_step, xs, ws, kind)


def ftz_add(a: float, b: float) -> float:
  """fl32(a + b), nearest even, a subnormal result flushed to a zero of its sign; an exact zero
  signed as IEEE 754 signs it. Specials as float arithmetic."""
  if not (math.isfinite(a) and math.isfinite(b)):
    return a + b
  v, negative_zero = add(a, b)
  r = round_value(v, FLOAT32, negative_zero=negative_zero)[0]
  return math.copysign(0.0, r) if abs(r) < F32_MIN_NORMAL else r


def ftz_product(x: float, w: float, min_exp: int) -> float:
  """Operands below 2^min_exp (zeros included) read as +0; the float32 product (nearest even),
  a subnormal product flushed to a zero of its sign."""
  x, w = (0.0 if abs(v) < 2.0 ** min_exp else v for v in (x, w))
  if not (math.isfinite(x) and math.isfinite(w)):
    return x * w
  negative = (math.copysign(1, x) < 0) != (math.copysign(1, w) < 0)
  r = round_value(Fraction(x) * Fraction(w), FLOAT32, negative_zero=negative)[0]
  return math.copysign(0.0, r) if abs(r) < F32_MIN_NORMAL else r


def ftz_tree_chain(xs, ws, kind) -> float:
  """An MFMA of float32 adds that flush subnormals (lowacc.hardware.FlushedAddTree's doc), read
  from the kind's in_type, group and tree: per instruction of `group` products (zero-filled), c
  read as +0 if subnormal, then c <- c + (sum of each `tree` products, pairwise)."""
  c = 0.0
  for start in range(0, len(xs), kind.group):
    p = [ftz_product(x, w, TYPE_MIN_EXP[kind.in_type])
         for x, w in zip(xs[start:start + kind.group], ws[start:start + kind.group])]
    p += [0.0] * (kind.group - len(p))
    c = 0.0 if abs(c) < F32_MIN_NORMAL else c
    for i in range(0, kind.group, kind.tree):
      t = ftz_add(p[i], p[i + 1])
      if kind.tree == 4:
        t = ftz_add(t, ftz_add(p[i + 2], p[i + 3]))
      c = ftz_add(c, t)
  return c


def _floor_to(v: Fraction, e: int) -> Fraction:
  """v rounded down (toward -inf) to a multiple of 2^e."""
  return math.floor(v / _pow2(e)) * _pow2(e)


def _truncated_sum(terms):
  """[(P, e)] of nonzero products: each truncated toward zero to a multiple of 2^(e_max - 24),
  summed. -> (sum, e_max), e_max None for no terms."""
  if not terms:
    return Fraction(0), None
  e_max = max(e for _, e in terms)
  return sum(math.trunc(p / _pow2(e_max - 24)) * _pow2(e_max - 24) for p, _ in terms), e_max


def two_level_step(xs, ws, c: float, kind) -> float:
  """One step of lowacc.hardware.TwoLevelFusedSum (its doc), read from the kind's a_type, b_type
  and halves: a first fused level over the products (or their even and odd halves), a second
  with c that rounds down, the sum rounded down to 31 fraction bits, then nearest even."""
  lo_a, lo_b = TYPE_MIN_EXP[kind.a_type], TYPE_MIN_EXP[kind.b_type]
  terms = [(Fraction(x) * Fraction(w), _fused_exponent(Fraction(x), lo_a, 0)
            + _fused_exponent(Fraction(w), lo_b, 0))
           if math.isfinite(x) and math.isfinite(w) and x != 0 and w != 0 else None
           for x, w in zip(xs, ws)]
  specials = [x * w for x, w in zip(xs, ws) if not (math.isfinite(x) and math.isfinite(w))]
  specials += [math.copysign(math.inf, t[0]) for t in terms if t and abs(t[0]) >= _pow2(128)]
  halves = ([t for t in terms[0::2] if t], [t for t in terms[1::2] if t]) if kind.halves \
      else ([t for t in terms if t],)
  sums = [_truncated_sum(h) for h in halves]
  e_dot = max((e for _, e in sums if e is not None), default=None)
  dot = sum((_floor_to(v, e_dot - 24) for v, e in sums if e is not None), Fraction(0))
  if not math.isfinite(c) and not (kind.halves and e_dot is not None and e_dot > 24):
    specials.append(c)  # with halves, mmasim drops an inf or NaN c beside products above 2^24
  if specials:
    return sum(specials)
  e_c = _fused_exponent(Fraction(c), -126, -126) if math.isfinite(c) else -1  # frexp's
  top = e_c if e_dot is None else max(e_dot, e_c)
  v = _floor_to(dot, top - 32)
  if not (kind.halves and e_c < top - 25):
    v += _floor_to(Fraction(c), top - 24)
  if v == 0:
    return 0.0
  v = _floor_to(v, max(_floor_log2(abs(v)), -126) - 31)
  return round_value(v, FLOAT32)[0]


def two_level_chain(xs, ws, kind) -> float:
  return _steps(two_level_step, xs, ws, kind)


def exact_sum_step(xs, ws, c: float, kind) -> float:
  """One instruction of lowacc.hardware.ExactSum (its doc), read from the kind's fused: for each
  `fused` products in order, c <- the exact sum of c and them, rounded to nearest even into
  float32 (subnormals, overflow to inf); an exact zero is +0, but -0 for an FMA (fused = 1) of
  two -0 terms. Specials as float arithmetic (NaN payloads aside)."""
  for start in range(0, len(xs), kind.fused):
    terms = [x * w if math.isfinite(x) and math.isfinite(w) else None
             for x, w in zip(xs[start:start + kind.fused], ws[start:start + kind.fused])]
    specials = [x * w for x, w, t in zip(xs[start:], ws[start:], terms) if t is None]
    if specials or not math.isfinite(c):
      c = sum(specials, c)
      continue
    exact_terms = [Fraction(x) * Fraction(w)
                   for x, w in zip(xs[start:start + kind.fused], ws[start:start + kind.fused])]
    v = sum(exact_terms, Fraction(c))
    negative_zero = kind.fused == 1 and all(math.copysign(1, t) < 0 for t in terms + [c])
    c = round_value(v, FLOAT32, negative_zero=negative_zero)[0]
  return c


def exact_sum_chain(xs, ws, kind) -> float:
  return _steps(exact_sum_step, xs, ws, kind)


def int_step(s: int, u: int, bits: int, overflow: str):
  """s + u into a two's-complement accumulator of `bits`: wrapped modulo 2^bits or saturated.
  -> (value, (sat, lost, flush)), the contract's section-4 flags: the sum left the range; u != 0
  but the value did not change; the value is 0 although the sum is not."""
  lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  v = s + u
  out = (v - lo) % 2 ** bits + lo if overflow == 'wrap' else min(max(v, lo), hi)
  return out, (not lo <= v <= hi, u != 0 and out == s, out == 0 and v != 0)


def int_chain(xs, ws, acc, chunk, order, combine):
  """An integer dot: chunks of `chunk` products, each added per product (order 'fma') or summed
  exactly and then stepped once ('chunk'), the chunk results stepped into `combine` (an IntFormat's
  fields, or acc). -> (value, record), record as `chain`'s (per chunk: the inner steps' flags, the
  combine step's flags), which `factors` reads."""
  comb = acc if combine == 'acc' else combine
  total, record = 0, []
  for start in range(0, len(xs), chunk):
    products = [int(x) * int(w) for x, w in zip(xs[start:start + chunk], ws[start:start + chunk])]
    s, inner = 0, []
    for u in (products if order == 'fma' else [sum(products)]):
      s, flags = int_step(s, u, acc.bits, acc.overflow)
      inner.append(flags)
    total, cflags = int_step(total, s, comb.bits, comb.overflow)
    record.append((inner, cflags))
  return total, record
