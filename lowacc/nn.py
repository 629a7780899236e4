"""Flax NNX glue: the attention products as a layer, and the policy that puts accumulator configs
into an unmodified model.

Models use stock `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Einsum`, and this module's
`Einsum` for products of two activations; each takes its GEMM as an attribute (`dot_general`,
`conv_general_dilated`, `einsum_op`), which `apply_policy` replaces. A layer's name is its path in
the model, joined by '/': 'layer1/0/conv2', 'encoder/layer/3/attention/self/query'.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

import jax.numpy as jnp
from flax import nnx
from jax import lax

from lowacc.conv import ConvGeneralDilated
from lowacc.dot import DotGeneral, collect_stats
from lowacc.formats import UNDERFLOWS, AccumulatorConfig, DotConfig, FloatFormat

Config = Union[AccumulatorConfig, DotConfig, None]


def einsum(equation: str, a, b, dot_general=lax.dot_general, precision=None,
           preferred_element_type=None, out_sharding=None):
  """A two-operand einsum as one `dot_general`, without jnp.einsum's jit (so counters can be
  collected eagerly). Letters in both operands and the output are batch dims; letters in both
  operands only are contracted, in the order they appear in `a`."""
  try:
    inputs, out = equation.replace(' ', '').split('->')
    la, lb = inputs.split(',')
  except ValueError:
    raise ValueError(f"einsum equation {equation!r} is invalid: expected 'ab,bc->ac' with two "
                     'operands and an explicit output') from None
  for letters, operand, what in ((la, a, 'first'), (lb, b, 'second')):
    if not letters.isalpha() or len(set(letters)) != len(letters) or len(letters) != operand.ndim:
      raise ValueError(f'einsum equation {equation!r}: the {what} operand needs one distinct '
                       f'letter per axis of its shape {operand.shape} (no ellipsis or traces)')
  lonely = [c for c in la + lb if c not in out and (c in la) != (c in lb)]
  if lonely or len(set(out)) != len(out) or any(c not in la + lb for c in out):
    raise ValueError(f'einsum equation {equation!r}: every output letter must come from the '
                     'operands once, and a letter of only one operand must appear in the output')
  batch = [c for c in la if c in lb and c in out]
  contract = [c for c in la if c in lb and c not in out]
  dims = ((tuple(la.index(c) for c in contract), tuple(lb.index(c) for c in contract)),
          (tuple(la.index(c) for c in batch), tuple(lb.index(c) for c in batch)))
  kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}
  y = dot_general(a, b, dims, precision=precision, preferred_element_type=preferred_element_type,
                  **kwargs)
  letters = batch + [c for c in la if c not in lb] + [c for c in lb if c not in la]
  return y.transpose([letters.index(c) for c in out])


class Einsum(nnx.Module):
  """A parameter-free einsum of two activations, such as attention's QK^T and AV products.

  Unlike `nnx.Einsum` (an input times a kernel), both operands are inputs. The contraction uses
  `self.dot_general`, which the policy replaces.
  """

  def __init__(self, equation: str, dot_general=lax.dot_general):
    self.equation = equation
    self.dot_general = dot_general

  def __call__(self, a, b):
    return einsum(self.equation, a, b, self.dot_general, precision=lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class EinsumOp:
  """`einsum` with a given dot_general: the `einsum_op` of an `nnx.Einsum`."""
  dot_general: DotGeneral

  def __call__(self, equation, a, b, precision=None, preferred_element_type=None,
               out_sharding=None):
    return einsum(equation, a, b, self.dot_general, precision, preferred_element_type,
                  out_sharding)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Layers whose name matches `pattern` (re.search) get `config` (None: float32)."""
  pattern: str
  config: Config

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f'Rule.pattern={self.pattern!r} is not a regular expression: {e}') from None
    DotConfig.of(self.config)


@dataclasses.dataclass(frozen=True)
class Policy:
  """An ordered list of rules; a layer takes the config of the first rule that matches its name,
  and float32 when none does."""
  rules: tuple[Rule, ...]

  def __post_init__(self):
    object.__setattr__(self, 'rules', tuple(self.rules))
    for rule in self.rules:
      if not isinstance(rule, Rule):
        raise ValueError(f'Policy.rules must hold Rule objects, got {rule!r}')

  @classmethod
  def everywhere(cls, config: Config, *, skip: tuple[str, ...] = ()) -> 'Policy':
    """`config` for every layer except those matching a pattern in `skip` (kept float32)."""
    return cls(tuple(Rule(p, None) for p in skip) + (Rule('.*', config),))

  def config_for(self, name: str) -> Config:
    for rule in self.rules:
      if re.search(rule.pattern, name):
        return rule.config
    return None

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

    return Policy(tuple(Rule(r.pattern, config(r.config)) for r in self.rules))


def _simulated(config: Config) -> bool:
  return DotConfig.of(config) != DotConfig(None)


def apply_policy(model: nnx.Module, policy: Policy) -> dict[str, Config]:
  """Sets the GEMM of every Linear, LinearGeneral, Conv, nnx.Einsum and lowacc Einsum in `model`
  (in place) to its config under `policy`; returns name -> config for every such layer."""
  assigned = {}
  for path, module in nnx.iter_modules(model):
    name = '/'.join(map(str, path))
    config = policy.config_for(name)
    on = _simulated(config)
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral, Einsum)):
      module.dot_general = DotGeneral(config, name) if on else lax.dot_general
    elif isinstance(module, nnx.Conv):
      module.conv_general_dilated = (ConvGeneralDilated(config, name) if on
                                     else lax.conv_general_dilated)
    elif isinstance(module, nnx.Einsum):
      module.einsum_op = EinsumOp(DotGeneral(config, name)) if on else jnp.einsum
    else:
      continue
    assigned[name] = config
  return assigned


def layer_stats(model: nnx.Module, *args, **kwargs) -> dict[str, dict]:
  """Runs `model(*args, **kwargs)` eagerly and returns each simulated layer's counters
  (`lowacc.collect_stats`): steps, sat, lost, flush, max_abs_error, rel_error, calls."""
  with collect_stats() as stats:
    model(*args, **kwargs)
  return stats


def rates(stats: dict[str, dict]) -> dict[str, dict[str, float]]:
  """Per layer, the fraction of accumulation steps that saturated, lost their update or flushed."""
  return {name: {k: float(s[k]) / max(s['steps'], 1) for k in ('sat', 'lost', 'flush')}
          for name, s in stats.items()}
