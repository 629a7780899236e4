"""Which GEMM gets which accumulator: GEMM sites, rules that match them, and the ordered policy.

A site is one `dot_general` or convolution of a model: its path ('encoder/layers/3/attn/query'),
its role ('weight': a parameter times an activation; 'activation': two activations, as attention's
QK^T and PV), its kind ('dot' or 'conv') and its operand shapes. A policy's first matching rule
gives the site its config; a site no rule matches stays float32.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Union

from lowacc.formats import UNDERFLOWS, AccumulatorConfig, DotConfig, FloatFormat

Config = Union[AccumulatorConfig, DotConfig, None]
ROLES = ('weight', 'activation')
KINDS = ('dot', 'conv')


@dataclasses.dataclass(frozen=True)
class Site:
  """One GEMM of a model. contraction: the length K of its dot products (for a convolution, kernel
  taps times input channels per group)."""
  path: str
  role: str
  kind: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  contraction: int


def _check_choice(field, value, valid):
  if value is not None and value not in valid:
    raise ValueError(f'Rule.{field}={value!r} is invalid: valid values are {valid} or None (any)')


@dataclasses.dataclass(frozen=True)
class Rule:
  """Sites whose path matches `pattern` (re.search), and whose role, kind and `when(site)` match
  where given, get `config` (None: float32)."""
  pattern: str
  config: Config
  role: Optional[str] = None
  kind: Optional[str] = None
  when: Optional[Callable[[Site], bool]] = None  # e.g. lambda s: s.contraction >= 64

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f'Rule.pattern={self.pattern!r} is not a regular expression: {e}') from None
    _check_choice('role', self.role, ROLES)
    _check_choice('kind', self.kind, KINDS)
    DotConfig.of(self.config)

  def matches(self, path: str, role: str, kind: str, site: Optional[Site] = None) -> bool:
    if self.when is not None and site is None:
      raise ValueError(f'Rule(pattern={self.pattern!r}) has when=, which needs the GEMM\'s shapes: '
                       'use lowacc.simulate, which sees them, rather than apply_policy')
    return (re.search(self.pattern, path) is not None
            and self.role in (None, role) and self.kind in (None, kind)
            and (self.when is None or bool(self.when(site))))


@dataclasses.dataclass(frozen=True)
class Policy:
  """An ordered list of rules; a site takes the config of the first rule that matches it, and
  float32 when none does."""
  rules: tuple[Rule, ...]

  def __post_init__(self):
    object.__setattr__(self, 'rules', tuple(self.rules))
    for rule in self.rules:
      if not isinstance(rule, Rule):
        raise ValueError(f'Policy.rules must hold Rule objects, got {rule!r}')

  @classmethod
  def everywhere(cls, config: Config, *, skip: tuple[str, ...] = ()) -> 'Policy':
    """`config` for every site except those matching a pattern in `skip` (kept float32)."""
    return cls(tuple(Rule(p, None) for p in skip) + (Rule('.*', config),))

  def rule_for(self, path: str, role: str = 'weight', kind: str = 'dot',
               site: Optional[Site] = None) -> Optional[Rule]:
    """The first rule that matches, or None."""
    for rule in self.rules:
      if rule.matches(path, role, kind, site):
        return rule
    return None

  def config_for(self, path: str, role: str = 'weight', kind: str = 'dot',
                 site: Optional[Site] = None) -> Config:
    rule = self.rule_for(path, role, kind, site)
    return None if rule is None else rule.config

  def with_underflow(self, underflow: str) -> 'Policy':
    """The same policy with every simulated format's underflow mode set (the paper's two stages:
    'none' while fine-tuning stage 1, then the format's own, e.g. 'flush')."""
    if underflow not in UNDERFLOWS:
      raise ValueError(f'underflow={underflow!r} is invalid: valid values are {UNDERFLOWS}')

    def fmt(f):
      return f.replace(underflow=underflow) if isinstance(f, FloatFormat) else f

    def acc(c):
      if c is None:
        return None
      return c.replace(acc=fmt(c.acc), product=fmt(c.product), combine=fmt(c.combine))

    def config(c):
      if isinstance(c, DotConfig):
        return DotConfig(acc(c.fwd), acc(c.dlhs), acc(c.drhs))
      return acc(c)

    return Policy(tuple(dataclasses.replace(r, config=config(r.config)) for r in self.rules))


def simulated(config: Config) -> bool:
  """Whether a config simulates any of the GEMM's three products."""
  return DotConfig.of(config) != DotConfig(None)
