"""dot_general with a simulated low-bit accumulator (spec sections 3 to 5).

The whole accumulator chain lives here; what one step does is the accumulator's own
(`lowacc.accumulator.Accumulator.step`). A dot is brought to the canonical form
x (B, M, K) . w (B, K, N) -> (B, M, N); K is padded to whole chunks with zero products that leave
every step unchanged (`Accumulator.pad_product`) and laid out k-major, (G, C, B, M) and
(G, C, B, N), so a step reads one contiguous slice. `_run` scans the chunks: an inner chain per
chunk ('fma': C / acc.group steps; 'chunk': one float32 chunk sum rounded once), then one step of
the combine chain. Observers attached to the
inner and combine steps derive everything else from the same chain: telemetry counters, the
residual the recursive estimators need, and the backward pass, which recomputes the chain instead
of storing an M x N x K tensor.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lowacc.accumulator import Flags, float32_sum
from lowacc.formats import AccumulatorConfig, DotConfig, IntQuant
from lowacc.kernels import native
from lowacc.quantize import (as_float32, check_key, integer_operand, quantize_operand, random_bits,
                             result_dtype, round_exact)

_HIGHEST = lax.Precision.HIGHEST
# Streams of the PRNG key: step t of each rounding draws random_bits(fold_in(fold_in(key, s), t)).
_PRODUCT_STREAM, _ACC_STREAM, _COMBINE_STREAM, _DLHS_STREAM, _DRHS_STREAM = range(5)


def _step(s, u, acc, rand):
  """One step of a chain: `acc.step`, or a float32 sum for acc=None (combine=None), where a zero
  s gives u itself (XLA on the CPU would flush a float32 subnormal u, which IEEE keeps), +0 for
  +0 + -0. u is never tested for zero: inside a fusion, XLA on the CPU rewrites a test of the
  bits for zero into a float32 compare, which reads a subnormal as a zero (for s that is how the
  CPU's adds read it anyway); comparing with one bit pattern (+0, -0) it leaves alone."""
  if acc is None:
    bits = lambda v: lax.bitcast_convert_type(v, jnp.uint32)
    plus_zero_sum = (bits(s) == 0) & (bits(u) == jnp.uint32(0x80000000))  # +0 + -0
    zero_s = (bits(s) & jnp.uint32(0x7FFFFFFF)) == 0
    out = jnp.where(zero_s, jnp.where(plus_zero_sum, 0.0, u), float32_sum(s, u))
    return out, Flags.none(out.shape)
  return acc.step(s, u, rand)


@dataclasses.dataclass(frozen=True)
class _Chain:
  """A canonical dot laid out for the chain: xs (G, C, B, M), ws (G, C, B, N)."""
  cfg: AccumulatorConfig
  xs: jax.Array
  ws: jax.Array
  key: Optional[jax.Array]
  k: int  # the true contraction length (before padding)

  @classmethod
  def layout(cls, cfg, x, w, key):
    b, m, k = x.shape
    n = w.shape[2]
    group = cfg.acc.group
    c = k if cfg.chunk_size is None else min(cfg.chunk_size, k)
    c = -(-c // group) * group  # whole steps of acc.group products
    g = -(-k // c)
    pad = g * c - k
    # Padded products are acc.pad_product * (+0), which leave every step's result unchanged.
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=cfg.acc.pad_product)
    w = jnp.pad(w, ((0, 0), (0, pad), (0, 0)))
    xs = x.transpose(2, 0, 1).reshape(g, c, b, m)
    ws = w.transpose(1, 0, 2).reshape(g, c, b, n)
    return cls(cfg, xs, ws, key, k)

  @property
  def out_shape(self):
    return (self.xs.shape[2], self.xs.shape[3], self.ws.shape[3])

  def full(self, value, dtype=jnp.float32):
    """A (B, M, N) array of `value`, typed as the chain's results: the sharding and the shard_map
    axes of the products of x and w (a template XLA never computes). Scan carries start here."""
    return jnp.full_like(self.xs[0, 0][:, :, None] * self.ws[0, 0][:, None, :], value, dtype)

  def rand(self, fmt, stream, t):
    if fmt is None or not fmt.stochastic:
      return None
    if self.key is None:
      raise ValueError(f"AccumulatorConfig uses rounding='stochastic' ({fmt.name}): pass key= to "
                       'lowacc.dot_general / conv_general_dilated')
    return random_bits(jax.random.fold_in(jax.random.fold_in(self.key, stream), t), self.out_shape)

  def group(self, a, i):
    """The operand slice of step i of a chunk a (C, B, .): a[i], or acc.group rows from i L."""
    size = self.cfg.acc.group
    return a[i] if size == 1 else lax.dynamic_slice_in_dim(a, i * size, size)

  def products(self, xk, wk, t):
    """The step's terms for every output element: p_t = Q_prod(fl32(x_t * w_t)), (B, M, N), for a
    kind of group 1 (`Accumulator.terms`)."""
    p = self.cfg.acc.terms(xk, wk)
    fmt = self.cfg.product
    if fmt is not None:
      p = round_exact(p, None, fmt, self.rand(fmt, _PRODUCT_STREAM, t))[0]
    return p

  def inner(self, j, xc, wc, observe, init):
    """Chunk j's inner chain from s = 0; observe(state, i, u, flags) sees each step. -> (s, state)

    i is the step's position inside the chunk (order 'fma') or 0 (order 'chunk').
    """
    cfg = self.cfg
    zero = self.full(0.0)
    c = xc.shape[0]
    if cfg.order == 'chunk':
      if cfg.product is None:
        u = jnp.einsum('cbm,cbn->bmn', xc, wc, precision=_HIGHEST)
      else:
        u = lax.fori_loop(0, c, lambda i, u: u + self.products(xc[i], wc[i], j * c + i), zero)
      u = float32_sum(zero, u)  # P is summed from +0: a zero P is +0, in any order
      s, flags = cfg.acc.step(None, u, self.rand(cfg.acc, _ACC_STREAM, j))
      return s, observe(init, 0, u, flags)

    def body(i, carry):
      s, state = carry
      t = j * c + i
      u = self.products(self.group(xc, i), self.group(wc, i), t)
      s, flags = cfg.acc.step(s, u, self.rand(cfg.acc, _ACC_STREAM, t))
      return s, observe(state, i, u, flags)

    steps = c // cfg.acc.group
    return lax.fori_loop(jnp.int32(0), jnp.int32(steps), body, (zero, init))  # int32 i under x64

  def combine(self, j, total, s):
    fmt = self.cfg.combine_format
    if fmt is None and self.xs.shape[0] == 1 and self.cfg.acc.direct_output:
      return s, Flags.none(s.shape)
    return _step(total, s, fmt, self.rand(fmt, _COMBINE_STREAM, j))

  def run(self, per_chunk, init):
    """Scans the chunks. per_chunk(state, j, xc, wc, total) -> (total, state, out). -> (total,
    state, stacked outs)."""
    g = self.xs.shape[0]
    zero = self.full(0.0)

    def body(carry, inputs):
      total, state = carry
      j, xc, wc = inputs
      total, state, out = per_chunk(state, j, xc, wc, total)
      return (total, state), out

    chunks = jnp.arange(g, dtype=jnp.int32)
    (total, state), outs = lax.scan(body, (zero, init), (chunks, self.xs, self.ws))
    return total, state, outs


def _ignore(state, *_):
  return state


def _count(counts, flags: Flags):
  """Adds a step's flags to per-element counts (summed once at the end, to keep fusion)."""
  return {name: counts[name] + getattr(flags, name).astype(jnp.int32) for name in counts}


def _forward(chain: _Chain, track_forgets: bool, count: bool):
  """One run of the chain: its output, the last combine step that forgot the past (-1: none) if
  track_forgets, and the per-element counts of sat, lost and flush steps if count."""
  counting = lambda counts, i, u, flags: _count(counts, flags)  # noqa: E731

  def per_chunk(state, j, xc, wc, total):
    last, counts = state
    s, counts = chain.inner(j, xc, wc, counting if count else _ignore, counts)
    total, flags = chain.combine(j, total, s)
    if track_forgets:
      last = jnp.where(flags.forgets, j, last)
    if count and chain.cfg.combine_format is not None:
      counts = _count(counts, flags)
    return total, (last, counts), None

  zero = chain.full(0, jnp.int32)
  init = (chain.full(-1, jnp.int32) if track_forgets else None,
          {'sat': zero, 'lost': zero, 'flush': zero} if count else None)
  total, (last, counts), _ = chain.run(per_chunk, init)
  return total, last, counts


# A chunk of at most this many steps records its steps' flags in one run of its inner chain, one
# bit per step in a uint32 word per output element (two words: passes, forgets); a longer one
# runs its inner chain again for the gradients.
_RECORDED_STEPS = 32
_word = functools.partial(lax.convert_element_type, new_dtype=jnp.uint32)


def _backward(chain: _Chain, last_combine_forget, g):
  """Gradients of the chain under a fine-grained estimator, recomputing the chain chunk by chunk.

  dy/du_t = d_t * prod_{later steps j} c_j, through the inner chain and then the combine chain;
  u_t's gradient reaches x and w by the product rule. Returns dx (B, M, K), dw (B, K, N).
  """
  cfg = chain.cfg
  ste = cfg.ste
  recursive = ste.startswith('recursive')
  size = cfg.acc.group
  steps = 1 if cfg.order == 'chunk' else chain.xs.shape[1] // size
  recorded = steps <= _RECORDED_STEPS

  def record(words, i, u, flags):  # bit i of each word: step i passes (d_i) / forgets (c_i = 0)
    bit = lax.shift_left(jnp.uint32(1), _word(i))
    passes, forgets = words
    return (passes | jnp.where(flags.passes(ste), bit, jnp.uint32(0)),
            forgets | jnp.where(flags.forgets, bit, jnp.uint32(0)))

  def last_forget(last, i, u, flags):
    return jnp.where(flags.forgets, i, last) if recursive else last

  def grad(spec, gf, operand, like):  # sharded as its primal (a mesh with Explicit axes)
    return jnp.einsum(spec, gf, operand, precision=_HIGHEST, out_sharding=_spec(like))

  def per_chunk(state, j, xc, wc, total):
    if recorded:
      no_bits = chain.full(0, jnp.uint32)
      s, (passes, forgets) = chain.inner(j, xc, wc, record, (no_bits, no_bits))
    else:
      s, last_inner = chain.inner(j, xc, wc, last_forget, chain.full(-1, jnp.int32))  # pass A
    total, flags = chain.combine(j, total, s)
    gate = flags.passes(ste)
    if recursive:
      gate &= j >= last_combine_forget
    gj = jnp.where(gate, g, 0.0)

    def factor(i, flags):  # u_i's gradient: gj where step i passes, or 0
      if recorded:
        passes_i = (lax.shift_right_logical(passes, _word(i)) & 1) == 1
        if recursive:  # no later step of the chunk forgot
          passes_i &= lax.shift_right_logical(forgets, _word(i + 1)) == 0
      else:
        passes_i = flags.passes(ste)
        if recursive:
          passes_i &= i >= last_inner
      return jnp.where(passes_i, gj, 0.0)

    if cfg.order == 'chunk':
      def contribute(_, i, u, flags):
        gf = factor(i, flags)
        return grad('bmn,cbn->cbm', gf, wc, xc), grad('bmn,cbm->cbn', gf, xc, wc)
      init = None
    else:
      spec = ('bmn,bn->bm', 'bmn,bm->bn') if size == 1 else ('bmn,lbn->lbm', 'bmn,lbm->lbn')

      def put(d, i, value):
        return d.at[i].set(value) if size == 1 else lax.dynamic_update_slice_in_dim(
            d, value, i * size, 0)

      def contribute(grads, i, u, flags):
        gf = factor(i, flags)
        dx, dw = grads
        xg, wg = chain.group(xc, i), chain.group(wc, i)
        return put(dx, i, grad(spec[0], gf, wg, xg)), put(dw, i, grad(spec[1], gf, xg, wg))
      # Varying over the shard_map axes of x, w and g together, as the gradients do.
      init = (_vary(jnp.zeros_like(xc), gj), _vary(jnp.zeros_like(wc), gj))
    if not recorded:
      _, grads = chain.inner(j, xc, wc, contribute, init)  # pass B
    elif cfg.order == 'chunk':
      grads = contribute(None, jnp.int32(0), None, None)
    else:
      grads = lax.fori_loop(jnp.int32(0), jnp.int32(steps),
                            lambda i, grads: contribute(grads, i, None, None), init)
    return total, state, grads

  _, _, (dxs, dws) = chain.run(per_chunk, None)
  gn, cn, b, m = dxs.shape
  n = dws.shape[3]
  dx = dxs.reshape(gn * cn, b, m).transpose(1, 2, 0)[:, :, :chain.k]
  dw = dws.reshape(gn * cn, b, n).transpose(1, 0, 2)[:, :chain.k, :]
  return dx, dw


def _float32_dot(x, w):
  return lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST)


def _key_for(key, stream):
  return None if key is None else jax.random.fold_in(key, stream)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _accumulate(cfg: DotConfig, count: bool, x, w, key):
  """The canonical simulated dot x (B, M, K) . w (B, K, N) of already quantized operands; with
  count, (y, the chain's sat, lost and flush totals) from the same run of the chain."""
  return _accumulate_fwd(cfg, count, x, w, key)[0]


def _accumulate_fwd(cfg: DotConfig, count: bool, x, w, key):
  fwd = cfg.fwd
  recursive = fwd is not None and fwd.ste.startswith('recursive')
  counts = None
  if fwd is None or fwd.acc is None or x.shape[2] == 0:
    y, last = _float32_dot(x, w), None
  elif not count and _native_forward(fwd, x, w):
    # The native CPU kernel on the CPU, this XLA path elsewhere (equal where both are defined).
    y, last = lax.platform_dependent(
        x, w, cpu=lambda x, w: _vary(native.dot(x, w, fwd), x, w),
        default=lambda x, w: _forward(_Chain.layout(fwd, x, w, key), False, False)[0]), None
  else:
    y, last, counts = _forward(_Chain.layout(fwd, x, w, key), recursive, count)
  y = _exact_tangent('identity' if fwd is None else fwd.ste, y, x, w)
  out = (y, {name: jnp.sum(c) for name, c in counts.items()}) if count else y
  return out, (x, w, key, last)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _exact_tangent(ste, y, x, w):
  """y, with the tangent of the exact dot (forward mode; the identity estimator's derivative).

  The backward pass of `_accumulate` is differentiable; jax.hessian and the jvp of a gradient
  also differentiate the forward rule, whose integer rounding would otherwise give zero tangents.
  The fine-grained estimators define only a backward pass: their forward mode is refused.
  """
  return y


@_exact_tangent.defjvp
def _exact_tangent_jvp(ste, primals, tangents):
  if ste != 'identity':
    raise ValueError(f"ste={ste!r} defines only reverse-mode gradients (jax.grad, jax.vjp): "
                     "forward mode (jax.jvp, jax.jacfwd, jax.hessian) through it is not defined; "
                     "use ste='identity' for second-order derivatives")
  y, x, w = primals
  _, dx, dw = tangents
  return y, _float32_dot(dx, w) + _float32_dot(x, dw)


def _accumulate_bwd(cfg: DotConfig, count: bool, residuals, g):
  x, w, key, last = residuals
  if count:
    g = g[0]  # the counts are integers: no cotangent
  fwd = cfg.fwd
  if fwd is not None and fwd.ste != 'identity' and x.shape[2] > 0:
    dx, dw = _backward(_Chain.layout(fwd, x, w, key), last, g)
  else:  # identity: the gradients of the exact dot, each GEMM under its own config
    dx = _canonical_dot(g, w, (((2,), (2,)), ((0,), (0,))), cfg.dlhs, _key_for(key, _DLHS_STREAM),
                        x)
    dw = _canonical_dot(x, g, (((1,), (1,)), ((0,), (0,))), cfg.drhs, _key_for(key, _DRHS_STREAM),
                        w)
  return _sum_to(dx, x), _sum_to(dw, w), None


def gathered_dot(gather, source, rhs, config, *, key=None):
  """`dot_general` of x = gather(source) (B, M, K) and rhs (B, K, N), batched over B, where
  gather is a linear gather of source that the native kernel reads in place (a convolution's
  im2col patches: `gather.native(source, w, fwd)` computes the forward): x is then built only by
  the backward pass. Configs the kernel does not take this way (counters aside) run
  `dot_general` on gather(source): quantized lhs (its scale is x's, not source's), recursive
  estimators, stochastic rounding, configs the kernel does not cover, several devices."""
  cfg = DotConfig.of(config)
  fwd = cfg.fwd
  if (fwd is None or fwd.acc is None or fwd.lhs is not None or isinstance(fwd.rhs, IntQuant)
      or not _native_forward(fwd, source, rhs) or jax.device_count() != 1
      or rhs.shape[1] == 0):
    return dot_general(gather(source), rhs, _BATCHED, config, key=key)
  if key is not None:
    check_key(key)
  return _gathered(cfg, gather, as_float32(source, 'lhs'), as_float32(rhs, 'rhs'), key)


_BATCHED = (((2,), (1,)), ((0,), (0,)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gathered(cfg: DotConfig, gather, source, rhs, key):
  return _accumulate_gathered(cfg, gather, source,
                              quantize_operand(rhs, cfg.fwd.rhs, reduce_axes=(1,)), key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _accumulate_gathered(cfg: DotConfig, gather, source, w, key):
  """`_accumulate` on x = gather(source), its forward by gather.native on the CPU."""
  return _accumulate_gathered_fwd(cfg, gather, source, w, key)[0]


def _accumulate_gathered_fwd(cfg: DotConfig, gather, source, w, key):
  fwd = cfg.fwd
  y = lax.platform_dependent(
      source, w, cpu=lambda s, w: _vary(gather.native(s, w, fwd), s, w),
      default=lambda s, w: _forward(_Chain.layout(fwd, gather(s), w, key), False, False)[0])
  # gather(source) is read only by _exact_tangent's tangent (second order): XLA drops it from
  # the forward.
  return _exact_tangent(fwd.ste, y, gather(source), w), (source, w, key)


def _accumulate_gathered_bwd(cfg: DotConfig, gather, residuals, g):
  source, w, key = residuals
  x, pullback = jax.vjp(gather, source)
  dx, dw, _ = _accumulate_bwd(cfg, False, (x, w, key, None), g)
  return pullback(dx)[0], dw, None


_accumulate_gathered.defvjp(_accumulate_gathered_fwd, _accumulate_gathered_bwd)


def _native_forward(fwd: AccumulatorConfig, *operands) -> bool:
  """Whether the native kernel computes this forward on the CPU: a config it covers, no
  recursive estimator (its backward needs the chain's record), operands not sharded."""
  return (native.supports(fwd) and not fwd.ste.startswith('recursive')
          and not _sharded(*operands))


def _vary(v, *like):
  """v typed as varying over every shard_map axis that one of `like` varies over (an FFI call's
  result is not typed so)."""
  axes = tuple(frozenset().union(*map(_varying, like)) - _varying(v))
  return lax.pcast(v, axes, to='varying') if axes else v


def _sum_to(d, primal):
  """The gradient d summed over the shard_map axes it varies over and its primal does not (what
  the transpose of lax.dot_general does for a replicated operand)."""
  axes = tuple(_varying(d) - _varying(primal))
  return lax.psum(d, axes) if axes else d


def _spec(v):
  """v's PartitionSpec on a mesh with Explicit axes (its gradient's out_sharding), else None."""
  explicit = jax.sharding.AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
  return jax.typeof(v).sharding.spec if explicit else None


def _sharded(*arrays) -> bool:
  """Whether an operand's type is sharded (a mesh with Explicit axes), which the native kernel's
  FFI call does not follow."""
  return any(any(s is not None for s in _spec(a) or ()) for a in arrays)


def _varying(v) -> frozenset:
  """The shard_map axes v varies over (none outside shard_map)."""
  return varying_axes(jax.typeof(v))


def varying_axes(aval) -> frozenset:
  """The shard_map axes a value of type `aval` varies over (none outside shard_map, and none
  typed under check_vma=False)."""
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.10; `vma` before
  return frozenset(manual.varying if manual is not None else getattr(aval, 'vma', ()))


_accumulate.defvjp(_accumulate_fwd, _accumulate_bwd)


def _canonical_dot(a, b, dims, config: Optional[AccumulatorConfig], key, primal):
  """A backward GEMM on canonical 3-d operands; its result is laid out as lax.dot_general's and
  sharded as `primal` (on a mesh with Explicit axes)."""
  if config is None:
    return lax.dot_general(a, b, dims, precision=_HIGHEST, out_sharding=_spec(primal))
  return dot_general(a, b, dims, config, key=key)


def _canonicalize(lhs, rhs, dimension_numbers):
  """Validates the dimension numbers; returns the permutations and sizes of the canonical form."""
  (lc, rc), (lb, rb) = dimension_numbers = _hashable(dimension_numbers)
  for name, arr, dims in (('lhs', lhs, lc + lb), ('rhs', rhs, rc + rb)):
    if len(set(dims)) != len(dims) or any(not 0 <= d < arr.ndim for d in dims):
      raise ValueError(f'dimension_numbers={dimension_numbers!r}: {name} dims {dims} must be '
                       f'distinct axes of its shape {arr.shape}')
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f'dimension_numbers={dimension_numbers!r}: lhs and rhs need as many '
                     'contracting and batch dims')
  for what, ld, rd in (('contracting', lc, rc), ('batch', lb, rb)):
    ls, rs = tuple(lhs.shape[d] for d in ld), tuple(rhs.shape[d] for d in rd)
    if ls != rs:
      raise ValueError(f'shapes do not contract: lhs {what} dims {ld} have sizes {ls} but rhs '
                       f'{what} dims {rd} have sizes {rs} (lhs {lhs.shape}, rhs {rhs.shape})')
  lf = tuple(d for d in range(lhs.ndim) if d not in lc + lb)
  rf = tuple(d for d in range(rhs.ndim) if d not in rc + rb)
  return lb + lf + lc, rb + rc + rf, (lb, lf, lc, rf)


def _size(shape: Sequence[int]) -> int:
  out = 1
  for s in shape:
    out *= s
  return out


def _prepare(lhs, rhs, dimension_numbers, cfg: DotConfig):
  """Canonical quantized operands x (B, M, K), w (B, K, N), the output's shape, and the scale of
  integer-quantized operands (IntQuant) that multiplies the dot, else None."""
  lhs, rhs = as_float32(lhs, 'lhs'), as_float32(rhs, 'rhs')
  lperm, rperm, (lb, lf, lc, rf) = _canonicalize(lhs, rhs, dimension_numbers)
  bshape = tuple(lhs.shape[d] for d in lb)
  mshape = tuple(lhs.shape[d] for d in lf)
  kshape = tuple(lhs.shape[d] for d in lc)
  nshape = tuple(rhs.shape[d] for d in rf)
  b, m, k, n = map(_size, (bshape, mshape, kshape, nshape))
  x = lhs.transpose(lperm).reshape(b, m, k)
  w = rhs.transpose(rperm).reshape(b, k, n)
  fwd = cfg.fwd
  scale = None
  if fwd is not None and isinstance(fwd.lhs, IntQuant):
    (x, sx), (w, sw) = integer_operand(x, fwd.lhs, (2,)), integer_operand(w, fwd.rhs, (1,))
    scale = sx * sw  # (B or 1, M or 1, 1) * (B or 1, 1, N or 1)
  elif fwd is not None:
    x = quantize_operand(x, fwd.lhs, reduce_axes=(2,))
    w = quantize_operand(w, fwd.rhs, reduce_axes=(1,))
  return x, w, bshape + mshape + nshape, scale


def dot_general(lhs, rhs, dimension_numbers, config, *, key=None, precision=None,
                preferred_element_type=None, stats: bool = False):
  """`lax.dot_general` with the accumulation simulated by `config` (spec section 3).

  lhs, rhs: floats of at most 32 bits, or integers of at most 16 bits (exact in float32; they give
  a float32 result). config: an AccumulatorConfig (forward GEMM; backward GEMMs in float32), a
  DotConfig, or None (plain `lax.dot_general`). key: PRNG key for stochastic rounding. The
  contraction runs over the contracting dims flattened row-major in the order dimension_numbers
  gives them. `precision` is accepted for signature compatibility; simulated GEMMs always compute
  in float32. Second order (jax.hessian, the jvp of a gradient) differentiates the identity
  estimator.

  stats=True returns (result, counters) from one run of the chain (spec section 5), under any
  transformation: steps (a Python int), sat, lost, flush: steps of the inner chains (one per
  group of products for order 'fma', one per chunk for 'chunk') and of the combine chain, and how
  many saturated, lost their update, or flushed to zero; rel_error and max_abs_error compare the
  result with the float32 dot of the same (quantized) operands (for IntQuant operands, of their
  integers, before the scales). The counters carry no gradient.
  """
  cfg = DotConfig.of(config)
  if stats and (cfg.fwd is None or cfg.fwd.acc is None):
    raise ValueError('stats=True needs a config with a simulated forward accumulator (acc set)')
  if cfg.fwd is None and cfg.dlhs is None and cfg.drhs is None:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  out_dtype = result_dtype(lhs, rhs, preferred_element_type)
  if cfg.fwd is not None and cfg.fwd.stochastic and key is None:
    raise ValueError("config uses rounding='stochastic': pass key= (a jax PRNG key)")
  if key is not None:
    check_key(key)
  dims = _hashable(dimension_numbers)
  steps = _steps(cfg.fwd, lhs, rhs, dims) if stats else None  # (checks the operands first)
  out = _simulated_dot(cfg, dims, stats, lhs, rhs, key)
  if not stats:
    return out.astype(out_dtype)
  y, counters = out
  return y.astype(out_dtype), dict(counters, steps=steps)


def _steps(fwd: AccumulatorConfig, lhs, rhs, dimension_numbers) -> int:
  """The accumulation steps of the GEMM: per output element, the inner chains' (a short last
  chunk's rounded up to whole groups) and the combine chain's."""
  _, _, (lb, lf, lc, rf) = _canonicalize(lhs, rhs, dimension_numbers)
  b, m, k = (_size([lhs.shape[d] for d in dims]) for dims in (lb, lf, lc))
  n = _size([rhs.shape[d] for d in rf])
  if k == 0:
    raise ValueError('stats=True needs a non-empty contraction')
  c = fwd.chunk_size or k
  g = -(-k // c)
  steps_of = lambda products: -(-products // fwd.acc.group)  # noqa: E731
  inner = (g - 1) * steps_of(c) + steps_of(k - (g - 1) * c) if fwd.order == 'fma' else g
  return b * m * n * (inner + (g if fwd.combine_format is not None else 0))


def _hashable(dimension_numbers):
  try:
    return tuple(tuple(tuple(int(d) for d in dims) for dims in pair) for pair in dimension_numbers)
  except (TypeError, ValueError):
    raise ValueError(f'dimension_numbers={dimension_numbers!r} is invalid: expected '
                     '((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))') from None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _simulated_dot(cfg: DotConfig, dimension_numbers, stats: bool, lhs, rhs, key):
  x, w, out_shape, scale = _prepare(lhs, rhs, dimension_numbers, cfg)
  out = _accumulate(cfg, stats, x, w, key)
  y, counts = out if stats else (out, None)
  result = (y if scale is None else y * scale).reshape(out_shape)
  if not stats:
    return result
  ref = lax.stop_gradient(_float32_dot(x, w))
  err = lax.stop_gradient(y) - ref
  return result, dict(counts, rel_error=jnp.linalg.norm(err) / jnp.linalg.norm(ref),
                      max_abs_error=jnp.max(jnp.abs(err)))


def matmul(a, b, config, *, key=None):
  """`jnp.matmul` (batch dims broadcast, 1-d operands promoted) with a simulated accumulator."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim == 0 or b.ndim == 0:
    raise ValueError(f'matmul needs operands of at least 1 dim, got shapes {a.shape}, {b.shape}')
  a2 = a[None, :] if a.ndim == 1 else a
  b2 = b[:, None] if b.ndim == 1 else b
  batch = jnp.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
  a2 = jnp.broadcast_to(a2, batch + a2.shape[-2:])
  b2 = jnp.broadcast_to(b2, batch + b2.shape[-2:])
  nb = len(batch)
  dims = (((a2.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
  out = dot_general(a2, b2, dims, config, key=key)
  if a.ndim == 1:
    out = out[..., 0, :]
  if b.ndim == 1:
    out = out[..., 0]
  return out


@dataclasses.dataclass(frozen=True)
class DotGeneral:
  """A hashable drop-in for `lax.dot_general` that simulates `config`, for injection into Flax
  layers (`dot_general=`) and `jnp.einsum(..., _dot_general=)`. Stochastic rounding needs a key,
  which this signature cannot carry: use `lowacc.dot_general(..., key=)` for it."""
  config: Optional[AccumulatorConfig | DotConfig]

  def __post_init__(self):
    DotConfig.of(self.config)

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               out_sharding=None):
    y = dot_general(lhs, rhs, dimension_numbers, self.config, precision=precision,
                    preferred_element_type=preferred_element_type)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


def accumulation_stats(lhs, rhs, dimension_numbers, config, *, key=None):
  """The counters of the simulated forward GEMM: `dot_general(..., stats=True)`'s."""
  return dot_general(lhs, rhs, dimension_numbers, config, key=key, stats=True)[1]
