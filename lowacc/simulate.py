"""Any JAX function, unmodified: every dot_general and convolution it traces to, simulated.

`simulate(fn, policy)` traces fn at the shapes it is called with (`jax.make_jaxpr`) and evaluates
the jaxpr with each `dot_general` / `conv_general_dilated` equation replaced by lowacc's under the
config the policy gives its site; every other equation is bound as it is. The evaluation recurses
into jit, scan, while, cond, checkpoint, custom_jvp and custom_vjp (whose custom rules still give
the gradients: the primal is simulated, the tangent or cotangent is the user's rule) and
shard_map (check_vma on or off; its sites are per shard, with per-shard shapes). GEMMs inside any
other higher-order primitive (pallas_call, ...) stay float32 and are reported so.
A GEMM whose result is bfloat16 or float16 (a bf16 layer) is simulated on its operands as given
and its result cast to that dtype, as the equation's own result would be.

Sites. A site's path is its scope path: Linen module names and `jax.named_scope` names as the
jaxpr's name stack holds them, NNX module paths for NNX modules passed as arguments, and the
function and line of the GEMM where there is no scope. Paths that repeat get '#2', '#3', ... in
trace order. A site's role is 'weight' when one operand depends on parameters and constants only,
'activation' otherwise; parameters are the array leaves nested inside a pytree argument of fn (a
module, a params dict), while arrays passed directly as arguments are activations; leaves that are
not arrays (numbers, functions) are static. Gradients are
taken outside: `jax.grad(simulate(loss, policy))`, so lowacc's own estimators apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import source_info_util
from jax.extend import core
from jax.sharding import PartitionSpec as P

from lowacc.conv import conv_general_dilated
from lowacc.dot import dot_general, varying_axes
from lowacc.formats import DotConfig
from lowacc.policy import Config, Policy, Site, simulated
from lowacc.quantize import check_key

__all__ = ['Coverage', 'coverage', 'simulate']

_GEMMS = {'dot_general': 'dot', 'conv_general_dilated': 'conv'}
_CALLS = ('jit', 'call', 'closed_call', 'remat2', 'custom_jvp_call', 'custom_vjp_call')
_SUPPORTED = _CALLS + ('scan', 'while', 'cond', 'shard_map')
# Collectives whose result is the same on every shard of their axes, and those whose result
# differs across them whatever their operand (for the typing of a body under check_vma=False).
_REPLICATING = ('psum', 'psum_invariant', 'pmax', 'pmin', 'all_gather', 'all_gather_invariant')
_SPLITTING = ('axis_index', 'reduce_scatter', 'pvary')
_NNX_MARK = '\x00nnx:'  # prefixes the scope that names an NNX module's path


@dataclasses.dataclass(frozen=True)
class Coverage:
  """A site and what the policy made of it: `config` is simulated, or `status` says why not."""
  site: Site
  config: Config
  status: str  # 'simulated', 'float32 (rule)', 'float32 (no rule matched)', 'float32 (why not)'

  def __str__(self):
    s = self.site
    what = self.config if self.status == 'simulated' else self.status
    return (f'{s.path}  {s.role} {s.kind} {s.lhs_shape} x {s.rhs_shape} K={s.contraction}: '
            f'{what}')


# ------------------------------------------------------------------------------------ tracing

def _is_param(key_path) -> bool:
  """A leaf nested inside an argument (module, dict, list) is a parameter; a bare argument not."""
  return len(key_path) > 2  # (args or kwargs, the argument, ...)


def _is_array(leaf) -> bool:
  """Arrays are traced inputs; any other leaf (a Python number, a function) is static."""
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _nnx_modules(tree) -> dict[int, tuple[str, Any]]:
  """id(module) -> (its path, module) for the NNX modules inside the arguments (those below the
  argument itself, which has no path). flax need not be loaded."""
  nnx = sys.modules.get('flax.nnx')
  if nnx is None:
    return {}
  found = {}
  for top in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Module)):
    if isinstance(top, nnx.Module):
      for path, module in nnx.iter_modules(top):
        if path:
          found.setdefault(id(module), ('/'.join(map(str, path)), module))
  return found


@contextlib.contextmanager
def _module_scopes(modules: dict[int, tuple[str, Any]]):
  """While tracing, each method of the NNX modules' own classes runs under a scope naming its
  path (NNX, unlike Linen, puts no names into the jaxpr)."""
  nnx = sys.modules.get('flax.nnx')
  classes = {c for _, m in modules.values() for c in type(m).__mro__
             if issubclass(c, nnx.Module) and c is not nnx.Module}
  saved = []

  def scoped(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
      path, _ = modules.get(id(self), (None, None))
      if path is None:
        return method(self, *args, **kwargs)
      with jax.named_scope(_NNX_MARK + path):
        return method(self, *args, **kwargs)
    return call

  try:
    for cls in classes:
      for name, value in list(vars(cls).items()):
        if inspect.isfunction(value) and (name == '__call__' or not name.startswith('_')):
          saved.append((cls, name, value))
          setattr(cls, name, scoped(value))
    yield
  finally:
    for cls, name, value in saved:
      setattr(cls, name, value)


def _top_modules(tree) -> list:
  """The NNX modules that are (or lie inside) arguments and are not inside another module."""
  nnx = sys.modules.get('flax.nnx')
  if nnx is None:
    return []
  return [m for m in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Module))
          if isinstance(m, nnx.Module)]


@dataclasses.dataclass
class _Traced:
  """fn's closed jaxpr on the flattened (args, kwargs): its first `outputs` results are fn's
  outputs (of out_tree), the rest the array leaves of the NNX argument modules' states after fn
  ran (`write_back` puts them into the modules, as nnx.jit does)."""
  closed: Any
  out_tree: Any
  outputs: int
  leaves: list
  params: list
  states: list  # per top module: (its State's treedef, [leaf or None where an array follows])

  def write_back(self, modules, values):
    """Sets the Variables whose value fn replaced (those it left are the very arrays passed in,
    so a module from outside an enclosing jax transform is written only where fn wrote it)."""
    nnx = sys.modules['flax.nnx']
    values = iter(values)
    value = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v  # noqa: E731
    for module, (tree, static) in zip(modules, self.states):
      after = jax.tree.unflatten(tree, [next(values) if leaf is None else leaf for leaf in static])
      before = dict(nnx.to_flat_state(nnx.state(module)))
      changed = [(path, v) for path, v in nnx.to_flat_state(after)
                 if path not in before or value(v) is not value(before[path])]
      if changed:
        nnx.update(module, nnx.from_flat_state(changed))


def _trace(fn, args, kwargs) -> _Traced:
  leaves_with_paths, tree = jax.tree_util.tree_flatten_with_path((args, kwargs))
  traced = [_is_array(leaf) for _, leaf in leaves_with_paths]
  leaves = [leaf for (_, leaf), t in zip(leaves_with_paths, traced) if t]
  params = [_is_param(p) for (p, _), t in zip(leaves_with_paths, traced) if t]
  found = {}

  def flat(*arrays):
    arrays = iter(arrays)
    a, k = jax.tree.unflatten(tree, [next(arrays) if t else leaf
                                     for (_, leaf), t in zip(leaves_with_paths, traced)])
    with _module_scopes(_nnx_modules((a, k))):
      out = fn(*a, **k)
    out_leaves, found['out_tree'] = jax.tree.flatten(out)
    nnx = sys.modules.get('flax.nnx')
    found['states'], state_arrays = [], []
    for module in _top_modules((a, k)):
      state_leaves, state_tree = jax.tree.flatten(nnx.state(module))
      is_array = [isinstance(leaf, jax.Array) for leaf in state_leaves]
      found['states'].append((state_tree, [None if array else leaf
                                           for leaf, array in zip(state_leaves, is_array)]))
      state_arrays += [leaf for leaf, array in zip(state_leaves, is_array) if array]
    found['outputs'] = len(out_leaves)
    return out_leaves + state_arrays

  closed = jax.make_jaxpr(flat)(*leaves)
  return _Traced(closed, found['out_tree'], found['outputs'], leaves, params, found['states'])


# ------------------------------------------------------------------------------------ sites

def _scope_path(prefix: tuple[str, ...], eqn) -> tuple[str, ...]:
  path = list(prefix)
  for elem in eqn.source_info.name_stack.stack:
    if not isinstance(elem, source_info_util.Scope):
      continue  # transforms (vmap, jvp, ...) are not part of a site's name
    if elem.name.startswith(_NNX_MARK):
      path = elem.name[len(_NNX_MARK):].split('/')
    elif not path or path[-1] != elem.name:  # Linen repeats a module that calls super()
      path.append(elem.name)
  return tuple(path)


def _sub_jaxprs(eqn):
  """The jaxprs an equation's params hold, as (Jaxpr, consts)."""
  out = []
  for value in eqn.params.values():
    for v in value if isinstance(value, tuple) else (value,):
      if isinstance(v, core.ClosedJaxpr):
        out.append((v.jaxpr, v.consts))
      elif isinstance(v, core.Jaxpr):
        out.append((v, ()))
  return out


@dataclasses.dataclass
class _Found:
  site_eqn: Any
  scope: tuple[str, ...]
  role: str
  kind: str
  lhs_shape: tuple
  rhs_shape: tuple
  contraction: int
  axes: frozenset  # the shard_map axes its operands vary over (its shards differ over)
  inside: Optional[str]  # why it cannot be simulated, if it cannot


@dataclasses.dataclass(frozen=True)
class _Dep:
  """What a value depends on: parameters and constants only (`param`), and the shard_map axes
  it varies over (`axes`)."""
  param: bool
  axes: frozenset = frozenset()


def _join(deps) -> _Dep:
  """A value computed from values with these deps."""
  deps = list(deps)
  return _Dep(all(d.param for d in deps), frozenset().union(*(d.axes for d in deps)))


def _spec_axes(spec) -> frozenset:
  """The mesh axes a PartitionSpec splits an array over."""
  return frozenset(n for part in spec for n in (part if isinstance(part, tuple) else (part,))
                   if n is not None)


def _collective_axes(eqn, ins) -> frozenset:
  """The axes a collective's result varies over, from those its operands do (check_vma=False,
  where the jaxpr's types do not say)."""
  p = eqn.params
  named = p.get('axes', p.get('axis_name', ()))
  named = frozenset(a for a in (named if isinstance(named, tuple) else (named,))
                    if not isinstance(a, int))  # (ints name positional axes, not mesh axes)
  axes = _join(ins).axes
  if eqn.primitive.name in _REPLICATING:
    return axes - named
  return axes | named if eqn.primitive.name in _SPLITTING else axes


class _Analysis:
  """Finds every GEMM site of a jaxpr, recursively, with its scope path, role and the shard_map
  axes it is split over."""

  def __init__(self):
    self.found: dict[tuple, _Found] = {}  # key -> site, in trace order
    self.holds: dict[tuple, set] = {}     # key of a higher-order eqn -> keys of the sites inside
    self.typed = False  # inside a shard_map with check_vma=True: the avals say what varies

  def run(self, jaxpr, flags, prefix=(), inside=None, where=()) -> list[_Dep]:
    """flags: per invar, its _Dep. -> the outvars' _Deps.
    where: the key of the jaxpr's place (a jaxpr, e.g. a jitted helper's, can occur twice)."""
    env = {v: f for v, f in zip(jaxpr.invars, flags)}
    env.update({v: _Dep(True, varying_axes(v.aval)) for v in jaxpr.constvars})

    def read(a):
      return _Dep(True) if isinstance(a, core.Literal) else env[a]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      name = eqn.primitive.name
      scope = _scope_path(prefix, eqn)
      key = where + (id(eqn),)
      if name in _GEMMS:
        self._gemm(key, eqn, scope, ins, inside)
        outs = [_join(ins)]
      elif _sub_jaxprs(eqn):
        before = set(self.found)
        outs = self._nested(key, eqn, ins, scope, inside)
        # (a union: a loop body is analysed again until its carry's flags settle)
        self.holds[key] = self.holds.get(key, set()) | (set(self.found) - before)
      else:
        outs = [_Dep(_join(ins).param, _collective_axes(eqn, ins))] * len(eqn.outvars)
      if self.typed:
        outs = [_Dep(f.param, varying_axes(v.aval)) for v, f in zip(eqn.outvars, outs)]
      for v, f in zip(eqn.outvars, outs):
        env[v] = f
    return [read(a) for a in jaxpr.outvars]

  def _gemm(self, key, eqn, scope, ins, inside):
    lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
    to = eqn.params.get('preferred_element_type')
    if to is not None and not (jnp.issubdtype(to, jnp.floating) and jnp.dtype(to).itemsize <= 4):
      inside = inside or f'a {eqn.primitive.name} to {to}: not supported'
    if eqn.primitive.name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      k = math.prod(lhs[d] for d in lc)
    else:
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      k = math.prod(rhs[d] for d in rhs_spec[1:])
      if eqn.params['batch_group_count'] != 1:
        inside = inside or 'batch_group_count > 1: not supported'
    role = 'weight' if any(d.param for d in ins) else 'activation'
    self.found[key] = _Found(eqn, scope, role, _GEMMS[eqn.primitive.name], lhs, rhs, k,
                             _join(ins).axes, inside)

  def _nested(self, key, eqn, ins, scope, inside):
    name, p = eqn.primitive.name, eqn.params
    if inside is None and name not in _SUPPORTED:
      inside = f'inside {name}: not supported'
    if inside is not None or name in _CALLS:
      outs = None
      for i, (jaxpr, _) in enumerate(_sub_jaxprs(eqn)):
        sub_ins = ins if inside is None else [_Dep(False, _join(ins).axes)] * len(jaxpr.invars)
        outs = self.run(jaxpr, sub_ins, scope, inside, key + (i,))
      return outs if inside is None else [_Dep(False, _join(ins).axes)] * len(eqn.outvars)
    if name == 'shard_map':
      sub_ins = [_Dep(d.param, d.axes | _spec_axes(s)) for d, s in zip(ins, p['in_specs'])]
      typed, self.typed = self.typed, p['check_vma']
      try:
        outs = self.run(p['jaxpr'], sub_ins, scope, where=key + (0,))
      finally:
        self.typed = typed
      return [_Dep(d.param, d.axes - p['newly_manual_axes']) for d in outs]
    if name == 'cond':
      outs = [self.run(b.jaxpr, ins[1:], scope, where=key + (i,))
              for i, b in enumerate(p['branches'])]
      index = _Dep(True, ins[0].axes)  # the branch taken varies where the index does
      return [_join(fs + (index,)) for fs in zip(*outs)]
    if name == 'scan':
      nc, ncarry = p['num_consts'], p['num_carry']
      consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
      while True:  # the carry depends on parameters only if it does on every iteration
        outs = self.run(p['jaxpr'].jaxpr, consts + carry + xs, scope, where=key + (0,))
        new = [_join((c, o)) for c, o in zip(carry, outs[:ncarry])]
        if new == carry:
          return outs
        carry = new
    # while
    cn, bn = p['cond_nconsts'], p['body_nconsts']
    carry = ins[cn + bn:]
    while True:  # a GEMM in the condition could not carry its counters: not supported
      self.run(p['cond_jaxpr'].jaxpr, ins[:cn] + carry, scope,
               "inside a while loop's condition: not supported", key + (0,))
      outs = self.run(p['body_jaxpr'].jaxpr, ins[cn:cn + bn] + carry, scope, where=key + (1,))
      new = [_join((c, o)) for c, o in zip(carry, outs)]
      if new == carry:
        return carry
      carry = new


def _frame_name(eqn) -> str:
  frame = source_info_util.user_frame(eqn.source_info.traceback)
  return 'unknown' if frame is None else f'{frame.function_name}:{frame.start_line}'


def _sites(closed, params, policy: Policy):
  """The sites by key (the ids of the equations and sub-jaxpr indices leading to one), in trace
  order, the keys of the sites inside each higher-order equation, and path -> the shard_map axes
  the site's operands vary over."""
  analysis = _Analysis()
  analysis.run(closed.jaxpr, [_Dep(p) for p in params])
  seen: dict[str, int] = {}
  table, axes = {}, {}
  for key, f in analysis.found.items():
    base = '/'.join(f.scope) if f.scope else _frame_name(f.site_eqn)
    seen[base] = seen.get(base, 0) + 1
    path = base if seen[base] == 1 else f'{base}#{seen[base]}'
    site = Site(path, f.role, f.kind, f.lhs_shape, f.rhs_shape, f.contraction)
    rule = policy.rule_for(path, f.role, f.kind, site)
    config = None if rule is None else rule.config
    if f.inside is not None:
      status, config = f'float32 ({f.inside})', None
    elif rule is None:
      status = 'float32 (no rule matched)'
    else:
      status = 'simulated' if simulated(config) else 'float32 (rule)'
    table[key] = Coverage(site, config if status == 'simulated' else None, status)
    axes[path] = f.axes
  return table, analysis.holds, axes


# ------------------------------------------------------------------------------------ counters

def _counted(config: Config) -> bool:
  fwd = DotConfig.of(config).fwd
  return fwd is not None and fwd.acc is not None


def _stochastic(config: Config) -> bool:
  """Whether any of the site's three GEMMs rounds stochastically (and so needs a key)."""
  cfg = DotConfig.of(config)
  return any(c is not None and c.stochastic for c in (cfg.fwd, cfg.dlhs, cfg.drhs))


def _one_call(stats) -> dict:
  return {'steps': jnp.int32(stats['steps']), 'sat': stats['sat'], 'lost': stats['lost'],
          'flush': stats['flush'], 'max_abs_error': stats['max_abs_error'],
          'rel_error': stats['rel_error'], 'calls': jnp.int32(1)}


def _zero() -> dict:
  i, f = jnp.int32(0), jnp.float32(0)
  return {'steps': i, 'sat': i, 'lost': i, 'flush': i, 'max_abs_error': f, 'rel_error': f,
          'calls': i}


def _merge(a: dict, b: dict) -> dict:
  """Counters of two sets of calls of the sites; rel_error holds the sum until `_final`."""
  out = dict(a)
  for path, s in b.items():
    if path not in out:
      out[path] = s
    else:
      o = out[path]
      out[path] = {k: jnp.maximum(o[k], s[k]) if k == 'max_abs_error' else o[k] + s[k]
                   for k in o}
  return out


def _vary(tree, axes):
  """Each array of tree typed as varying over `axes` too (inside shard_map with check_vma=True;
  a no-op under check_vma=False)."""
  def vary(value):
    missing = tuple(sorted(axes - varying_axes(jax.typeof(value)), key=str))
    return lax.pcast(value, missing, to='varying') if missing else value
  return jax.tree.map(vary, tree)


def _across(stats: dict, axes) -> dict:
  """A site's counters on each shard -> those of the GEMM split over the shard_map axes `axes`
  (the axes its operands vary over; over the others every shard computes the same GEMM, counted
  once): steps, sat, lost, flush summed, max_abs_error the largest, calls the most any shard
  made, rel_error the shards' mean (the whole GEMM's |err|/|ref| is that when the shards' |ref|
  are equal)."""
  if not axes:
    return stats
  reduce = {'max_abs_error': lax.pmax, 'calls': lax.pmax, 'rel_error': lax.pmean}
  stats = _vary(stats, frozenset(axes))
  return {k: reduce.get(k, lax.psum)(v, tuple(axes)) for k, v in stats.items()}


def _final(stats: dict) -> dict:
  return {path: dict(s, rel_error=s['rel_error'] / jnp.maximum(s['calls'], 1))
          for path, s in stats.items()}


# ------------------------------------------------------------------------------------ keys

def _site_key(rng, index: int):
  """Site `index`'s key for this iteration: rng's key folded with the index, then with the
  iteration counter of each enclosing loop, outermost first. rng: (key, counters)."""
  key, counters = rng
  key = jax.random.fold_in(key, index)
  for i in counters:
    key = jax.random.fold_in(key, i)
  return key


def _iteration(rng, i):
  """The rng of iteration i of a loop (None stays None: no site needs a key)."""
  return None if rng is None else (rng[0], rng[1] + (i,))


# ------------------------------------------------------------------------------------ evaluation

class _Interpreter:
  """Evaluates a jaxpr with its sites simulated; each `run` returns (outputs, counters).

  Every evaluation takes `rng`: None when no site rounds stochastically, else (key, counters of
  the enclosing loops). It is passed as an argument through every higher-order primitive (rather
  than closed over), because JAX may trace a custom rule later, outside the enclosing trace."""

  def __init__(self, table, holds, axes, stats: bool):
    self.table, self.holds, self.axes, self.stats = table, holds, axes, stats
    self.index = {key: i for i, key in enumerate(table)}  # a site's place in coverage's list
    self.typed = frozenset()  # the axes of the enclosing shard_maps with check_vma=True

  def counted_inside(self, key) -> dict:
    """Zero counters for every counted site inside a higher-order equation, typed as varying
    where the site's counters do (as a loop's carry or a branch's result must be)."""
    if not self.stats:
      return {}
    return {c.site.path: _vary(_zero(), self.axes[c.site.path] & self.typed)
            for c in (self.table[k] for k in self.holds[key])
            if c.status == 'simulated' and _counted(c.config)}

  def run(self, jaxpr, consts, args, rng, where=()):
    env = {}
    stats = {}

    def read(a):
      return a.val if isinstance(a, core.Literal) else env[a]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
      with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), \
          eqn.ctx.manager:
        key = where + (id(eqn),)
        entry = self.table.get(key)
        if entry is not None and entry.status == 'simulated':
          outs, st = self.gemm(eqn, entry, ins, rng, self.index[key])
        elif eqn.primitive.name in _SUPPORTED and any(
            self.table[k].status == 'simulated' for k in self.holds.get(key, ())):
          outs, st = getattr(self, '_' + eqn.primitive.name)(key, eqn, ins, rng)
        else:
          outs, st = self.bind(eqn, ins), {}
      stats = _merge(stats, st)
      for v, x in zip(eqn.outvars, outs):
        env[v] = x
    return [read(a) for a in jaxpr.outvars], stats

  def bind(self, eqn, ins):
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*ins, **params)
    return out if eqn.primitive.multiple_results else [out]

  def gemm(self, eqn, entry, ins, rng, index):
    lhs, rhs = ins
    p, config = eqn.params, entry.config
    count = self.stats and _counted(config)
    key = _site_key(rng, index) if _stochastic(config) else None
    if eqn.primitive.name == 'dot_general':
      out = dot_general(lhs, rhs, p['dimension_numbers'], config, key=key,
                        preferred_element_type=p['preferred_element_type'], stats=count)
    else:
      kw = {k: p[k] for k in ('window_strides', 'padding', 'lhs_dilation', 'rhs_dilation',
                              'dimension_numbers', 'feature_group_count')}
      out = conv_general_dilated(lhs, rhs, **kw, preferred_element_type=p['preferred_element_type'],
                                 config=config, key=key, stats=count)
    y, st = out if count else (out, None)
    return [y], {entry.site.path: _one_call(st)} if count else {}

  def closed(self, closed_jaxpr, where):
    """A function of (rng, *the jaxpr's inputs) -> (outputs, counters)."""
    return lambda rng, *args: self.run(closed_jaxpr.jaxpr, closed_jaxpr.consts, args, rng, where)

  def _call(self, key, eqn, ins, rng):
    sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
    if isinstance(sub, core.Jaxpr):
      sub = core.ClosedJaxpr(sub, ())
    return self.closed(sub, key + (0,))(rng, *ins)

  _jit = _closed_call = _call

  def _remat2(self, key, eqn, ins, rng):
    p = eqn.params
    fn = jax.checkpoint(self.closed(core.ClosedJaxpr(p['jaxpr'], ()), key + (0,)),
                        prevent_cse=p['prevent_cse'], policy=p['policy'])
    return fn(rng, *ins)

  def _shard_map(self, key, eqn, ins, rng):
    """The body simulated on each shard; the key enters replicated (every shard rounds with the
    same site key) and the counters leave summed over the shards (`_across`)."""
    p = eqn.params
    mesh, manual = p['mesh'], frozenset(p['newly_manual_axes'])
    body = self.closed(core.ClosedJaxpr(p['jaxpr'], ()), key + (0,))

    def shard(rng, *args):
      outs, st = body(rng, *args)
      return tuple(outs), {path: _across(s, [a for a in mesh.axis_names
                                              if a in self.axes[path] & manual])
                           for path, s in st.items()}

    typed = self.typed
    self.typed = typed | manual if p['check_vma'] else typed
    try:
      outs, st = jax.shard_map(shard, mesh=mesh, in_specs=(P(), *p['in_specs']),
                               out_specs=(tuple(p['out_specs']), P()),
                               axis_names=manual | frozenset(mesh.manual_axes),
                               check_vma=p['check_vma'])(rng, *ins)
    finally:
      self.typed = typed
    return list(outs), st

  def _cond(self, key, eqn, ins, rng):
    zero = self.counted_inside(key)

    def branch(i, b):
      def run(rng, *ops):
        outs, st = self.closed(b, key + (i,))(rng, *ops)
        return outs, _merge(zero, st)
      return run

    branches = [branch(i, b) for i, b in enumerate(eqn.params['branches'])]
    return lax.switch(ins[0], branches, rng, *ins[1:])

  def _scan(self, key, eqn, ins, rng):
    p = eqn.params
    nc, ncarry = p['num_consts'], p['num_carry']
    consts, init, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
    body_fn = self.closed(p['jaxpr'], key + (0,))

    def body(carry, x):
      c, st, i = carry
      outs, new = body_fn(_iteration(rng, i), *consts, *c, *x)
      return (outs[:ncarry], _merge(st, new), i + 1), outs[ncarry:]

    (carry, st, _), ys = lax.scan(body, (init, self.counted_inside(key), jnp.int32(0)), xs,
                                  length=p['length'], reverse=p['reverse'], unroll=p['unroll'])
    return list(carry) + list(ys), st

  def _while(self, key, eqn, ins, rng):
    p = eqn.params
    cn, bn = p['cond_nconsts'], p['body_nconsts']
    cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    cond_fn = self.closed(p['cond_jaxpr'], key + (0,))
    body_fn = self.closed(p['body_jaxpr'], key + (1,))

    def body(carry):
      c, st, i = carry
      outs, new = body_fn(_iteration(rng, i), *bconsts, *c)
      return outs, _merge(st, new), i + 1

    carry, st, _ = lax.while_loop(lambda carry: cond_fn(None, *cconsts, *carry[0])[0][0], body,
                                  (init, self.counted_inside(key), jnp.int32(0)))
    return list(carry), st

  def _custom_jvp_call(self, key, eqn, ins, rng):
    """The primal simulated; the tangents are the user's jvp rule (evaluated as traced)."""
    p = eqn.params
    nc = p['num_consts']
    primal = self.closed(p['call_jaxpr'], key + (0,))

    @jax.custom_jvp
    def call(rng, *args):
      return primal(rng, *args)

    @call.defjvp
    def jvp(primals, tangents):
      out = call(*primals)
      args, tangents = primals[1:], tangents[1:]
      jvp_jaxpr, jvp_consts, out_zeros = p['jvp_jaxpr_fun'].call_wrapped(
          *[False] * (len(args) - nc))
      res = jax.core.eval_jaxpr(jvp_jaxpr, jvp_consts, *args[nc:], *tangents[nc:])
      nz = iter(res[len(out_zeros):])
      out_tangents = [jnp.zeros_like(o) if z else next(nz) for o, z in zip(out[0], out_zeros)]
      return out, (out_tangents, _zero_tangents(out[1]))

    return call(rng, *ins)

  def _custom_vjp_call(self, key, eqn, ins, rng):
    """The primal simulated; the cotangents are the user's bwd rule, on the residuals of the
    user's fwd (evaluated as traced)."""
    p = eqn.params
    nc = p['num_consts']
    primal = self.closed(p['call_jaxpr'], key + (0,))

    @jax.custom_vjp
    def call(rng, *args):
      return primal(rng, *args)

    def fwd(rng, *args):
      fwd_jaxpr, fwd_consts = p['fwd_jaxpr_thunk'].call_wrapped(*[True] * (len(args) - nc))
      out = jax.core.eval_jaxpr(fwd_jaxpr, fwd_consts, *args[nc:])
      _, res_tree, forwarded = p['out_trees']()
      fresh = iter(out[:res_tree.num_leaves - sum(f is not None for f in forwarded)])
      res = [next(fresh) if f is None else args[nc + f] for f in forwarded]
      return call(rng, *args), (args, res)

    def bwd(saved, cts):
      args, res = saved
      grads = p['bwd'].call_wrapped(*res, *cts[0])
      grads = [jnp.zeros_like(a) if g is None or type(g).__name__ in ('Zero', 'SymbolicZero')
               else g for a, g in zip(args[nc:], grads)]
      return (None,) + tuple(jnp.zeros_like(c) for c in args[:nc]) + tuple(grads)

    call.defvjp(fwd, bwd)
    return call(rng, *ins)


def _zero_tangents(stats):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, jax.dtypes.float0)
                      if jnp.issubdtype(s.dtype, jnp.integer) else jnp.zeros_like(s), stats)


# ------------------------------------------------------------------------------------ public

def _rng(table, key):
  """The rng of the outermost evaluation: None when no simulated site rounds stochastically."""
  needs = [c.site.path for c in table.values()
           if c.status == 'simulated' and _stochastic(c.config)]
  if not needs:
    return None
  if key is None:
    raise ValueError(f"lowacc.simulate: site {needs[0]!r} rounds stochastically "
                     f"({len(needs)} site(s) do): pass key= (a jax PRNG key) to the simulated "
                     "function")
  check_key(key)
  return key, ()


def coverage(fn: Callable, policy: Policy, *args, **kwargs) -> list[Coverage]:
  """Every GEMM site of `fn(*args, **kwargs)` in trace order: path, role, kind, operand shapes,
  contraction length, and the config `simulate` gives it or why it stays float32."""
  traced = _trace(fn, args, kwargs)
  closed, params = traced.closed, traced.params
  return list(_sites(closed, params, policy)[0].values())


def simulate(fn: Callable, policy: Policy, stats: bool = False) -> Callable:
  """fn with every dot_general and convolution it traces to simulated under `policy`.

  The returned function takes fn's arguments, and `key=` (a jax PRNG key) where a site rounds
  stochastically: site i of `coverage`'s list rounds with `jax.random.fold_in(key, i)`, folded
  further with the iteration counter (0, 1, ... in execution order) of each enclosing scan or
  while loop, outermost first (so fn cannot take an argument named key itself). Inside shard_map
  the key enters replicated: every shard rounds with the same site key, so the rounding noise is
  correlated across shards (as when the key is wired by hand). It returns fn's outputs, or
  (outputs, stats) with stats=True: path -> steps, sat, lost, flush (summed over the site's calls,
  e.g. scan iterations), max_abs_error (the largest), rel_error (the mean) and calls, each as
  `lowacc.accumulation_stats` counts that GEMM, computed in the traced computation (so under jit
  and vmap too) from the same run of the chain as the output (`lowacc.dot_general(...,
  stats=True)`). A GEMM inside shard_map is counted as the whole GEMM its shards make up: summed
  over the mesh axes its operands vary over (once over those they are replicated on; under
  check_vma=False these axes are found from in_specs and the body's collectives), calls those of
  the program (not per shard), max_abs_error the largest and rel_error the mean over the shards
  (the whole GEMM's |err|/|ref| when the shards' |ref| are equal). Warns once about sites that no
  rule matched. State that fn updates in the NNX modules it is given (batch statistics, RNG
  counts, any Variable) is written back into them, as calling fn would (and as nnx.jit carries
  it out of a jitted call).
  """
  warned = set()

  @functools.wraps(fn)
  def simulated_fn(*args, key=None, **kwargs):
    traced = _trace(fn, args, kwargs)
    closed = traced.closed
    table, holds, axes = _sites(closed, traced.params, policy)
    rng = _rng(table, key)
    unmatched = [c.site.path for c in table.values()
                 if c.status.startswith('float32') and c.status != 'float32 (rule)']
    if unmatched and not set(unmatched) <= warned:
      warned.update(unmatched)
      warnings.warn(f'lowacc.simulate: {len(unmatched)} of {len(table)} GEMM sites stay float32 '
                    f'by no explicit rule: {", ".join(unmatched)}', stacklevel=2)
    outs, st = _Interpreter(table, holds, axes, stats).run(closed.jaxpr, closed.consts,
                                                            traced.leaves, rng)
    traced.write_back(_top_modules((args, kwargs)), outs[traced.outputs:])
    out = jax.tree.unflatten(traced.out_tree, outs[:traced.outputs])
    return (out, _final(st)) if stats else out

  return simulated_fn
