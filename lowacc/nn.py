"""Flax NNX glue: the attention products as a layer, and the policy that puts accumulator configs
into an unmodified model.

Models use stock `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Einsum`, and this module's
`Einsum` for products of two activations; each takes its GEMM as an attribute (`dot_general`,
`conv_general_dilated`, `einsum_op`), which `apply_policy` replaces. A layer's name is its path in
the model, joined by '/': 'layer1/0/conv2', 'encoder/layer/3/attention/self/query'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import string

from lowacc._extras import require

require('lowacc.nn', 'nn', ('flax',))

import jax  # noqa: E402  (after the check that names the extra)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from lowacc.conv import ConvGeneralDilated
from lowacc.dot import DotGeneral
from lowacc.policy import Config, Policy, Rule, simulated
from lowacc.simulate import simulate

__all__ = ['Einsum', 'EinsumOp', 'Policy', 'Rule', 'apply_policy', 'einsum', 'layer_stats', 'rates']


def einsum(equation: str, a, b, dot_general=lax.dot_general, precision=None,
           preferred_element_type=None, out_sharding=None):
  """A two-operand einsum as one `dot_general`, without jnp.einsum's jit (so counters can be
  collected eagerly). Letters in both operands and the output are batch dims; letters in both
  operands only are contracted, in the order they appear in `a`. An ellipsis stands for the same
  leading dims in each operand and the output, aligned from the right (no broadcasting)."""
  try:
    inputs, out = equation.replace(' ', '').split('->')
    la, lb = inputs.split(',')
  except ValueError:
    raise ValueError(f"einsum equation {equation!r} is invalid: expected 'ab,bc->ac' with two "
                     'operands and an explicit output') from None
  if '...' in la + lb + out:
    la, lb, out = _expand_ellipsis(equation, (la, a), (lb, b), out)
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


def _expand_ellipsis(equation, *operands_and_out):
  """The equation's letters with each '...' replaced by letters of its own dims."""
  *operands, out = operands_and_out
  spare = [c for c in string.ascii_letters if c not in equation]
  n = max(op.ndim - (len(letters) - 3) if '...' in letters else 0 for letters, op in operands)
  dims = spare[:n]
  expanded = []
  for letters, op in operands:
    k = op.ndim - (len(letters) - 3) if '...' in letters else 0
    expanded.append(letters.replace('...', ''.join(dims[n - k:])))
  return (*expanded, out.replace('...', ''.join(dims)))


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


def apply_policy(model: nnx.Module, policy: Policy) -> dict[str, Config]:
  """Sets the GEMM of every Linear, LinearGeneral, Conv, nnx.Einsum and lowacc Einsum in `model`
  (in place) to its config under `policy` (role 'activation' for lowacc's Einsum, 'weight' for
  the others); returns name -> config for every such layer. `lowacc.simulate` reaches every other
  GEMM too."""
  assigned = {}
  for path, module in nnx.iter_modules(model):
    name = '/'.join(map(str, path))
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral, Einsum)):
      role = 'activation' if isinstance(module, Einsum) else 'weight'
      config = policy.config_for(name, role, 'dot')
      module.dot_general = DotGeneral(config) if simulated(config) else lax.dot_general
      if isinstance(module, nnx.LinearGeneral):
        module.dot_general_cls = None  # Flax prefers dot_general_cls over dot_general
    elif isinstance(module, nnx.Conv):
      config = policy.config_for(name, 'weight', 'conv')
      module.conv_general_dilated = (ConvGeneralDilated(config) if simulated(config)
                                     else lax.conv_general_dilated)
    elif isinstance(module, nnx.Einsum):
      config = policy.config_for(name, 'weight', 'dot')
      module.einsum_op = EinsumOp(DotGeneral(config)) if simulated(config) else jnp.einsum
    else:
      continue
    assigned[name] = config
  return assigned


_GEMMS = ('dot_general', 'dot_general_cls', 'conv_general_dilated', 'einsum_op')


@contextlib.contextmanager
def _float32_gemms(model: nnx.Module):
  """Within the block, the model's layers run lax's float32 GEMMs (as `apply_policy` with no rule
  sets them); afterwards they hold what they held before."""
  saved = [(m, {a: getattr(m, a) for a in _GEMMS if hasattr(m, a)})
           for _, m in nnx.iter_modules(model)]
  apply_policy(model, Policy(()))
  try:
    yield
  finally:
    for module, attrs in saved:
      for attr, value in attrs.items():
        setattr(module, attr, value)


def layer_stats(model: nnx.Module, policy: Policy, *args, **kwargs) -> dict[str, dict]:
  """The counters of every simulated GEMM site of `model(*args, **kwargs)` under `policy`, path ->
  steps, sat, lost, flush, max_abs_error, rel_error, calls: `lowacc.simulate(..., stats=True)`
  under jit (the arguments are traced), on the model's layers as float32 whatever `apply_policy`
  put into them, so `policy` alone decides. Paths are `simulate`'s: a layer's name as
  `apply_policy` gives it, then any scope inside the layer (jnp.einsum, inside nnx.Einsum, names
  its own after the equation: 'mix/bqk,kh->bqh'); a layer called twice: '<name>#2'."""
  with _float32_gemms(model):
    _, stats = jax.jit(simulate(lambda m, *a, **k: m(*a, **k), policy, stats=True))(
        model, *args, **kwargs)
  return {path: {k: v.item() for k, v in s.items()} for path, s in jax.device_get(stats).items()}


def rates(stats: dict[str, dict]) -> dict[str, dict[str, float]]:
  """Per layer, the fraction of accumulation steps that saturated, lost their update or flushed."""
  return {name: {k: float(s[k]) / max(s['steps'], 1) for k in ('sat', 'lost', 'flush')}
          for name, s in stats.items()}
