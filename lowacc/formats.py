"""Formats and configurations of the simulated accumulator (numeric contract, sections 1 to 4).

Every class here is a frozen, hashable dataclass validated at construction, so configs can be
static arguments of `jax.jit` and of `jnp.einsum(..., _dot_general=...)`.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from lowacc.accumulator import Accumulator, Flags, two_sum

ROUNDINGS = ('nearest_even', 'toward_zero', 'down', 'up', 'stochastic')
UNDERFLOWS = ('flush', 'subnormal', 'none')
OVERFLOWS = ('saturate', 'inf', 'none')
SCALINGS = ('none', 'per_tensor_pow2', 'per_channel_pow2')
ORDERS = ('fma', 'chunk')
STES = ('identity', 'immediate_of', 'immediate_diff', 'immediate_both',
        'recursive_of', 'recursive_diff', 'recursive_both')

# float32's own exponent limits: the container every simulated value lives in.
_F32_MIN_EXP = -126
_F32_MAX_EXP = 127


def _check_int(obj, field: str, lo: int, hi: Optional[int] = None):
  """Checks that obj.field is an integer (Python or numpy) in [lo, hi]; stores it as an int."""
  owner, value = type(obj).__name__, getattr(obj, field)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{owner}.{field} must be an int, got {value!r}')
  value = int(value)
  if value < lo or (hi is not None and value > hi):
    valid = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
    shown = value if value.bit_length() <= 64 else f'<an int of {value.bit_length()} bits>'
    raise ValueError(f'{owner}.{field}={shown} is invalid: must be {valid}')
  object.__setattr__(obj, field, value)


def _check_choice(owner: str, field: str, value, choices):
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f'{owner}.{field}={value!r} is invalid: valid values are {choices}')


@dataclasses.dataclass(frozen=True)
class FloatFormat(Accumulator):
  """A sign + `exp_bits` exponent + `man_bits` fraction floating-point format.

  Normal values are (-1)^s 2^(e - bias) (1 + f / 2^man_bits) for exponent codes e = 1..e_top, where
  e_top reserves the top code for inf/NaN only when overflow='inf'. `bias=None` means the IEEE bias
  2^(exp_bits-1) - 1. The modes say how `lowacc.quantize` rounds into the format (spec section 1).
  As an accumulator (the paper's kind), a step takes s + u exactly and rounds it once.
  """
  exp_bits: int
  man_bits: int
  bias: Optional[int] = None
  rounding: str = 'nearest_even'
  underflow: str = 'flush'
  overflow: str = 'saturate'

  def __post_init__(self):
    # Past 2^30 exponent codes or a bias beyond +-2^30, no finite value would fit float32.
    _check_int(self, 'exp_bits', 1, 30)
    _check_int(self, 'man_bits', 0, 23)
    if self.bias is None:
      object.__setattr__(self, 'bias', 2 ** (self.exp_bits - 1) - 1)
    _check_int(self, 'bias', -2 ** 30, 2 ** 30)
    _check_choice('FloatFormat', 'rounding', self.rounding, ROUNDINGS)
    _check_choice('FloatFormat', 'underflow', self.underflow, UNDERFLOWS)
    _check_choice('FloatFormat', 'overflow', self.overflow, OVERFLOWS)
    if self.e_top < 1:
      raise ValueError(
          f'FloatFormat.exp_bits={self.exp_bits} with overflow={self.overflow!r} leaves no normal '
          f'exponent code: use exp_bits >= 2 or another overflow mode')
    if self.max_exp > _F32_MAX_EXP:
      raise ValueError(
          f'FloatFormat(exp_bits={self.exp_bits}, bias={self.bias}) has max_normal = '
          f'2^{self.max_exp} * (2 - 2^-{self.man_bits}), outside the float32 container: '
          f'need e_top - bias = {self.e_top} - bias <= {_F32_MAX_EXP}, i.e. bias >= '
          f'{self.e_top - _F32_MAX_EXP}')
    if self.underflow != 'none' and self.min_exp < _F32_MIN_EXP:
      raise ValueError(
          f'FloatFormat(exp_bits={self.exp_bits}, bias={self.bias}) has min_normal = '
          f'2^{self.min_exp}, below float32\'s normal range: need 1 - bias >= {_F32_MIN_EXP}, '
          f'i.e. bias <= {1 - _F32_MIN_EXP}, or underflow=\'none\'')

  @property
  def e_top(self) -> int:
    """The largest exponent code of a finite value."""
    return 2 ** self.exp_bits - (2 if self.overflow == 'inf' else 1)

  @property
  def max_exp(self) -> int:
    """Unbiased exponent of the top binade."""
    return self.e_top - self.bias

  @property
  def min_exp(self) -> int:
    """Unbiased exponent of the smallest normal binade."""
    return 1 - self.bias

  @property
  def max_normal(self) -> float:
    return 2.0 ** self.max_exp * (2 - 2.0 ** -self.man_bits)

  @property
  def min_normal(self) -> float:
    return 2.0 ** self.min_exp

  @property
  def width(self) -> int:
    return 1 + self.exp_bits + self.man_bits

  @property
  def name(self) -> str:
    """The paper's MxEy notation, with the bias when it is not IEEE's: 'M7E4b10'."""
    ieee = self.bias == 2 ** (self.exp_bits - 1) - 1
    return f'M{self.man_bits}E{self.exp_bits}' + ('' if ieee else f'b{self.bias}')

  def replace(self, **changes) -> 'FloatFormat':
    return dataclasses.replace(self, **changes)

  @classmethod
  def parse(cls, name: str, **modes) -> 'FloatFormat':
    """The format named 'M7E4' or 'M7E4b10' (the paper's notation, as `name` spells it), with the
    modes given (rounding=, underflow=, overflow=)."""
    match = re.fullmatch(r'M(\d+)E(\d+)(?:b(-?\d+))?', name) if isinstance(name, str) else None
    if not match:
      raise ValueError(f"accumulator format {name!r} is invalid: expected 'M<man>E<exp>' or "
                       "'M<man>E<exp>b<bias>', e.g. 'M7E4b10'")
    man, exp, bias = int(match[1]), int(match[2]), match[3]
    return cls(exp, man, None if bias is None else int(bias), **modes)

  @property
  def stochastic(self) -> bool:
    return self.rounding == 'stochastic'

  @property
  def pad_product(self) -> float:
    """-0 (x + -0 = x), or +0 under rounding 'down' (where +0 + -0 = -0)."""
    return 0.0 if self.rounding == 'down' else -0.0

  def step(self, s, u, rand):
    """s + u taken exactly (TwoSum) and rounded once; s=None rounds u alone."""
    from lowacc.quantize import round_exact  # quantize imports this module
    if s is None:
      s, hi, lo = jnp.zeros_like(u), u, None
    else:
      hi, lo = two_sum(s, u, self.rounding == 'down')
    out, sat = round_exact(hi, lo, self, rand)
    return out, Flags(sat=sat, lost=(u != 0) & (out == s), flush=(out == 0) & (hi != 0))


INT_OVERFLOWS = ('wrap', 'saturate')
_F32_EXACT_BITS = 24  # float32 holds every integer of up to 24 bits, sign apart


@dataclasses.dataclass(frozen=True)
class IntFormat(Accumulator):
  """A two's-complement accumulator of `bits` bits: integers in [-2^(bits-1), 2^(bits-1) - 1].

  A step adds the integer term u (a product of integer operands, or a chunk's integer partial)
  exactly; a sum out of range wraps modulo 2^bits (overflow='wrap', WrapNet) or becomes the
  nearest bound ('saturate', A2Q), and counts as sat. Terms must be integers exact in float32
  (|x w| < 2^24, e.g. int8 operands); a fraction is truncated toward zero. bits <= 23 keeps every
  value exact in the float32 container, so wider registers (int32) are not simulated.

  Gradients (AccumulatorConfig.ste). A wrapped sum is the exact sum minus a multiple of 2^bits
  that is constant between overflows, so 'identity' (the exact dot's gradient) is the derivative
  of the wrapping chain wherever it has one; a wrap forgets nothing, so no estimator zeroes
  anything there, and wrap takes only 'identity'. A saturated step is constant in everything
  before it: 'recursive_of' (u_t's gradient passes iff no step from t on saturated) is the
  derivative of the saturating chain wherever it has one; 'immediate_of' zeroes only the
  saturated step's own term. An integer step loses its update only at a bound, so under
  saturate lost implies sat, flush never happens, and '_both' equals '_of'.
  """
  bits: int
  overflow: str = 'wrap'

  def __post_init__(self):
    _check_int(self, 'bits', 2, _F32_EXACT_BITS - 1)
    _check_choice('IntFormat', 'overflow', self.overflow, INT_OVERFLOWS)

  @property
  def name(self) -> str:
    return f'INT{self.bits}' + ('w' if self.overflow == 'wrap' else 's')

  @classmethod
  def parse(cls, name: str) -> 'IntFormat':
    """'INT16w' (wrap) or 'INT16s' (saturate), as `name` spells it."""
    body = name[3:-1] if isinstance(name, str) and name.startswith('INT') else ''
    if not body.isdigit() or name[-1] not in 'ws':
      raise ValueError(f"integer accumulator {name!r} is invalid: expected 'INT<bits>w' (wrap) "
                       f"or 'INT<bits>s' (saturate), bits in [2, {_F32_EXACT_BITS - 1}], "
                       "e.g. 'INT16s'")
    return cls(int(body), 'wrap' if name[-1] == 'w' else 'saturate')

  def step(self, s, u, rand):
    """s + u exactly, wrapped or saturated into `bits`; s=None takes u alone."""
    v = u if s is None else s + u  # exact: |s| < 2^23 and integer |u| < 2^24 (see the class doc)
    vi = v.astype(jnp.int32)
    lo, hi = -2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
    if self.overflow == 'wrap':
      out = ((vi - lo) & (2 ** self.bits - 1)) + lo
    else:
      out = jnp.clip(vi, lo, hi)
    out = out.astype(jnp.float32)
    before = jnp.zeros_like(u) if s is None else s
    return out, Flags(sat=(vi < lo) | (vi > hi), lost=(u != 0) & (out == before),
                      flush=(out == 0) & (vi != 0))


@dataclasses.dataclass(frozen=True)
class InputQuant:
  """Quantization of one GEMM operand before the products (spec section 2).

  scaling='per_tensor_pow2' multiplies the operand by 2^k, with k chosen so max|x| falls in the
  format's top binade, quantizes, and divides by 2^k (the paper's flexible bias).
  'per_channel_pow2' chooses k per index of the operand's free (non-contracting, non-batch) axes,
  i.e. per output channel of a weight.
  """
  format: FloatFormat
  scaling: str = 'none'

  def __post_init__(self):
    if not isinstance(self.format, FloatFormat):
      raise ValueError(f'InputQuant.format must be a FloatFormat, got {self.format!r}')
    _check_choice('InputQuant', 'scaling', self.scaling, SCALINGS)
    if self.format.rounding == 'stochastic':
      raise ValueError("InputQuant.format.rounding='stochastic' is not supported: input "
                       'quantization is deterministic; use another rounding')


INT_SCALINGS = ('per_tensor', 'per_channel', 'per_tensor_pow2', 'per_channel_pow2')


@dataclasses.dataclass(frozen=True)
class IntQuant:
  """Symmetric integer quantization of one GEMM operand: q = clip(round_half_even(x / scale),
  -(2^(bits-1) - 1), 2^(bits-1) - 1), so that the products are integers for an IntFormat
  accumulator; the dot's result is multiplied back by both operands' scales.

  scale = max|x| / (2^(bits-1) - 1) ('per_tensor', 'per_channel'), or the power of two at or
  above it ('..._pow2'); per_channel takes max|x| over the contracting axes, per output channel of
  a weight (per row of an activation). Gradients pass straight through the rounding.
  """
  bits: int = 8
  scaling: str = 'per_tensor'

  def __post_init__(self):
    _check_int(self, 'bits', 2, 12)  # products of two 12-bit integers stay exact in float32
    _check_choice('IntQuant', 'scaling', self.scaling, INT_SCALINGS)


@dataclasses.dataclass(frozen=True)
class AccumulatorConfig:
  """How one GEMM accumulates (spec section 3) and how its gradient is estimated (section 4).

  acc: the accumulator, an `Accumulator` kind (a FloatFormat, or one of `lowacc.hardware`), or
    None for a plain float32 dot (inputs still quantized).
  product: the format each float32 product is rounded to, or None to keep float32 products.
  chunk_size: consecutive products per chunk (None: one chunk of the whole contraction), a
    multiple of acc.group.
  order: 'fma' (one step per acc.group products) or 'chunk' (float32 chunk sum, rounded once).
  combine: how chunk results are summed: 'acc' (the accumulator itself), a FloatFormat, or None
    (float32).
  ste: the gradient estimator.
  lhs, rhs: optional InputQuant (or, both, IntQuant) of each operand.
  """
  acc: Optional[Accumulator]
  product: Optional[FloatFormat] = None
  chunk_size: Optional[int] = 16
  order: str = 'fma'
  combine: Union[str, FloatFormat, None] = 'acc'
  ste: str = 'identity'
  lhs: Union[InputQuant, IntQuant, None] = None
  rhs: Union[InputQuant, IntQuant, None] = None

  def __post_init__(self):
    if self.acc is not None and not isinstance(self.acc, Accumulator):
      raise ValueError(f'AccumulatorConfig.acc must be an Accumulator (a FloatFormat, or a kind of '
                       f'lowacc.hardware) or None, got {self.acc!r}')
    if self.product is not None and not isinstance(self.product, FloatFormat):
      raise ValueError(f'AccumulatorConfig.product must be a FloatFormat or None, got '
                       f'{self.product!r}')
    for field in ('lhs', 'rhs'):
      value = getattr(self, field)
      if value is not None and not isinstance(value, (InputQuant, IntQuant)):
        raise ValueError(f'AccumulatorConfig.{field} must be an InputQuant, an IntQuant or None, '
                         f'got {value!r}')
    if (self.lhs is None) != (self.rhs is None) and isinstance(self.lhs or self.rhs, IntQuant):
      raise ValueError('AccumulatorConfig: an IntQuant on one operand needs one on the other, so '
                       'that the products are integers; set both lhs and rhs')
    if self.chunk_size is not None:
      _check_int(self, 'chunk_size', 1)
    _check_choice('AccumulatorConfig', 'order', self.order, ORDERS)
    if not (self.combine is None or isinstance(self.combine, (FloatFormat, IntFormat))
            or (isinstance(self.combine, str) and self.combine == 'acc')):
      raise ValueError(f"AccumulatorConfig.combine={self.combine!r} is invalid: valid values are "
                       "'acc', a FloatFormat or IntFormat, or None (float32)")
    _check_choice('AccumulatorConfig', 'ste', self.ste, STES)
    for field in ('acc', 'combine'):
      value = getattr(self, field)
      if isinstance(value, IntFormat) and value.overflow == 'wrap' and self.ste != 'identity':
        raise ValueError(f"AccumulatorConfig.ste={self.ste!r} is invalid with {field}="
                         f"{value.name} (overflow='wrap'): a wrapped sum has the exact sum's "
                         "derivative, so the only valid estimator is ste='identity'")
    if self.acc is not None:
      self._check_kind(self.acc)
    self._check_integer_partials()
    if self.acc is None and self.product is not None:
      raise ValueError('AccumulatorConfig.product is set but acc=None: product rounding needs a '
                       'simulated accumulator; set acc or product=None')
    if self.acc is None and self.ste != 'identity':
      raise ValueError(f"AccumulatorConfig.ste={self.ste!r} needs a simulated accumulator "
                       "(acc=None is a float32 dot): use ste='identity' or set acc")
    for field in ('chunk_size', 'order', 'combine'):
      value, default = getattr(self, field), _DEFAULTS[field]
      if self.acc is None and (type(value) is not type(default) or value != default):
        raise ValueError(f'AccumulatorConfig.{field}={value!r} would be ignored: acc=None is a '
                         f'float32 dot; leave {field} at its default {default!r} or set acc')

  def _check_kind(self, acc: Accumulator):
    """What a kind that takes acc.group products per step allows."""
    if self.order not in acc.orders:
      raise ValueError(f'AccumulatorConfig.order={self.order!r} is invalid for acc={acc.name}: '
                       f'valid orders are {acc.orders}')
    if acc.group == 1:
      return
    if self.chunk_size is not None and self.chunk_size % acc.group:
      raise ValueError(f'AccumulatorConfig.chunk_size={self.chunk_size} is invalid for '
                       f'acc={acc.name}: must be a multiple of its group of {acc.group} products')
    if self.product is not None:
      raise ValueError(f'AccumulatorConfig.product is set but acc={acc.name} sums exact products '
                       'of its input type: use product=None')
    if self.combine == 'acc':
      raise ValueError(f"AccumulatorConfig.combine='acc' is invalid for acc={acc.name}, which "
                       'adds groups of products: use a FloatFormat (promotion) or None')

  def _check_integer_partials(self):
    """An IntFormat chain is exact only while its terms are: under order 'chunk' the float32
    chunk partial of integer-quantized operands must stay below 2^24 in magnitude."""
    if not (isinstance(self.acc, IntFormat) and self.order == 'chunk'
            and isinstance(self.lhs, IntQuant)):
      return
    largest = (2 ** (self.lhs.bits - 1) - 1) * (2 ** (self.rhs.bits - 1) - 1)
    most = (2 ** _F32_EXACT_BITS - 1) // largest
    if self.chunk_size is None or self.chunk_size > most:
      raise ValueError(f"AccumulatorConfig.chunk_size={self.chunk_size} is invalid for "
                       f"acc={self.acc.name}, order='chunk' over {self.lhs.bits}- and "
                       f"{self.rhs.bits}-bit operands: a float32 chunk partial is exact for at "
                       f"most {most} products; use chunk_size <= {most} or order='fma'")

  @property
  def combine_format(self) -> Optional[Accumulator]:
    """The format of the chunk-combine chain, or None for a float32 sum."""
    return self.acc if self.combine == 'acc' else self.combine

  @property
  def stochastic(self) -> bool:
    """Whether any rounding in the chain needs a PRNG key."""
    return any(f is not None and f.stochastic
               for f in (self.acc, self.product, self.combine_format))

  def replace(self, **changes) -> 'AccumulatorConfig':
    return dataclasses.replace(self, **changes)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AccumulatorConfig)}


@dataclasses.dataclass(frozen=True)
class DotConfig:
  """Configs of the three GEMMs of a dot: the forward product and the gradients with respect to
  the lhs and the rhs (as in AQT). None is a plain float32 GEMM; the backward GEMMs default to it.

  Backward configs can only be simulated with fwd.ste='identity': the fine-grained estimators
  weight every product by its own factor, so their backward products are not GEMMs.
  """
  fwd: Optional[AccumulatorConfig]
  dlhs: Optional[AccumulatorConfig] = None
  drhs: Optional[AccumulatorConfig] = None

  def __post_init__(self):
    for field in ('fwd', 'dlhs', 'drhs'):
      value = getattr(self, field)
      if value is not None and not isinstance(value, AccumulatorConfig):
        raise ValueError(f'DotConfig.{field} must be an AccumulatorConfig or None, got {value!r}')
    for field in ('dlhs', 'drhs'):
      value = getattr(self, field)
      if value is not None and self.fwd is not None and self.fwd.ste != 'identity':
        raise ValueError(f"DotConfig.{field} is set but fwd.ste={self.fwd.ste!r}: backward GEMMs "
                         "can only be simulated with ste='identity'")
      if value is not None and value.ste != 'identity':
        raise ValueError(f"DotConfig.{field}.ste={value.ste!r}: a backward GEMM's own gradient is "
                         "not taken, use ste='identity'")

  @classmethod
  def of(cls, config: Union['DotConfig', AccumulatorConfig, None]) -> 'DotConfig':
    """Normalises an AccumulatorConfig (forward only) or None to a DotConfig."""
    if isinstance(config, DotConfig):
      return config
    if config is None or isinstance(config, AccumulatorConfig):
      return cls(fwd=config)
    raise ValueError(f'config must be a DotConfig, an AccumulatorConfig or None, got {config!r}')


# Standard formats: IEEE semantics (round to nearest even, gradual underflow, inf).
_IEEE = dict(rounding='nearest_even', underflow='subnormal', overflow='inf')
FP32 = FloatFormat(8, 23, **_IEEE)
FP16 = FloatFormat(5, 10, **_IEEE)
BF16 = FloatFormat(8, 7, **_IEEE)
FP8_E4M3 = FloatFormat(4, 3, **_IEEE)   # ml_dtypes.float8_e4m3 (IEEE-like, max 240)
FP8_E5M2 = FloatFormat(5, 2, **_IEEE)   # ml_dtypes.float8_e5m2
FP8_E3M4 = FloatFormat(3, 4, **_IEEE)   # ml_dtypes.float8_e3m4

# The paper's accumulator (spec section 3): M7E4 with bias 10, products M7E4 with bias 12, both
# truncating ('floor' read as toward_zero), flushing and saturating, chunks of 16.
_PAPER_MODES = dict(rounding='toward_zero', underflow='flush', overflow='saturate')
PAPER_ACC = FloatFormat(4, 7, bias=10, **_PAPER_MODES)
PAPER_PRODUCT = FloatFormat(4, 7, bias=12, **_PAPER_MODES)
PAPER_M7E4 = AccumulatorConfig(acc=PAPER_ACC, product=PAPER_PRODUCT, chunk_size=16,
                               order='fma', combine='acc')
# The paper's FP8 inputs: E4M3 with a per-tensor power-of-two scale. The scale puts max|x| in the
# top binade, whose upper part exceeds max_normal, so the inputs saturate rather than overflow.
PAPER_FP8_INPUT = InputQuant(FloatFormat(4, 3, rounding='nearest_even', underflow='subnormal',
                                         overflow='saturate'), 'per_tensor_pow2')
PAPER_M7E4_FP8 = PAPER_M7E4.replace(lhs=PAPER_FP8_INPUT, rhs=PAPER_FP8_INPUT)
