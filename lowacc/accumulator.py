"""The accumulator interface: what one step of the chain s_t = Q(s_{t-1} + u_t) does.

`lowacc.dot`'s chain, its telemetry, its gradient estimators, the kernels' `supports()` and the
experiments' format names all go through `Accumulator`; a new kind of accumulator is one subclass
with its `step`. A kind takes `group` products per step: 1 for the paper's FMAq (`FloatFormat`),
L for a fused dot product of L products and the incoming accumulator (`lowacc.hardware`).
Also here: the float32 sums every kind's exact arithmetic builds on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


def float32_sum(a, b, down=False):
  """fl32(a + b), a zero signed as IEEE 754 (section 6.3) signs an exact zero sum: -0 when a and b
  are both -0, or under `down` (rounding toward -inf) when either is negative, else +0. Not left
  to XLA, which folds 0 + x into x."""
  bits = lambda v: lax.bitcast_convert_type(v, jnp.uint32)
  negative = (bits(a) | bits(b)) if down else (bits(a) & bits(b))
  zero = lax.bitcast_convert_type(negative & jnp.uint32(0x80000000), jnp.float32)
  s = a + b
  return jnp.where(s == 0, zero, s)


def two_sum(a, b, down=False):
  """(s, e) with s = float32_sum(a, b, down) and s + e = a + b exactly (Knuth's TwoSum).

  An infinite operand gives e = 0 (the sum is exactly infinite); a finite sum beyond float32
  gives s = +-inf with e = NaN, which `round_exact` overflows as a finite value. Where the CPU
  flushes float32 subnormals (XLA does), an error below 2^-126 is lost (e = 0): that needs an
  operand with bits below 2^-126 beside a sum above 2^-102, i.e. underflow 'none' or float32
  products that small (test_native's test_directed_steps_equal_exact_oracle_at_float32s_ends has
  such chains, which the native kernel's directed steps round exactly).
  """
  s = float32_sum(a, b, down)
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return s, jnp.where(jnp.isinf(a) | jnp.isinf(b), 0.0, e)


@dataclasses.dataclass(frozen=True)
class Flags:
  """What one accumulation step s_t = Q(s_{t-1} + u_t) did, per output element (spec section 4)."""
  sat: jax.Array    # the exact sum exceeded the largest finite value (saturated, overflowed)
  lost: jax.Array   # u_t != 0 but s_t == s_{t-1}
  flush: jax.Array  # s_t == 0 although s_{t-1} + u_t != 0

  @classmethod
  def none(cls, shape):
    no = jnp.zeros(shape, bool)
    return cls(no, no, no)

  def passes(self, ste: str):
    """The immediate factor d_t of the estimator: does u_t's gradient pass this step?"""
    if ste.endswith('_of'):
      return ~self.sat
    if ste.endswith('_diff'):
      return ~self.lost
    if ste.endswith('_both'):
      return ~(self.sat | self.lost)
    return jnp.ones_like(self.sat)

  @property
  def forgets(self):
    """c_t = 0: the step forgot everything before it."""
    return self.sat | self.flush


class Accumulator:
  """A kind of accumulator: the base class of `FloatFormat` and the hardware kinds.

  A subclass is a frozen, hashable dataclass (a static argument of jit) that defines:
  - `name`: a short label (reports, errors);
  - `step(s, u, rand) -> (s, Flags)`: one step of the chain from the running sum s (float32,
    (B, M, N)) and the step's terms u, as `terms` makes them; s=None rounds u alone (order
    'chunk': s = Q(P) of a float32 chunk partial P);
  and may override `group`, `terms`, `pad_product`, `stochastic`, `orders` and `direct_output`.
  """
  group = 1  # products per step
  orders = ('fma', 'chunk')  # the AccumulatorConfig orders this kind runs
  stochastic = False  # whether its rounding draws random words (`rand` of `step`)
  # A chain of one chunk with combine=None outputs its last step's value itself (a matrix unit's
  # d, a -0 included), not the float32 total from +0 of spec section 3.
  direct_output = False

  @property
  def name(self) -> str:
    raise NotImplementedError

  def terms(self, x, w):
    """The step's terms from operand slices x (B, M) and w (B, N) (group 1: the float32 products
    fl32(x w), (B, M, N)), or x (L, B, M) and w (L, B, N) for a kind of group L."""
    return x[:, :, None] * w[:, None, :]

  def step(self, s, u, rand):
    raise NotImplementedError

  @property
  def pad_product(self) -> float:
    """The operand value that pads a chunk: its products leave every step's result unchanged."""
    return -0.0
