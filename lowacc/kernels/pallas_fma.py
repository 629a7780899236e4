"""A Pallas kernel for order='fma': the forward chain of `lowacc.dot._accumulate`, bit for bit.

For every output element of a canonical dot x (B, M, K) . w (B, K, N) the contract (spec section 3)
runs chunks of C consecutive k; inside a chunk s <- 0 and, for each k,

    p = Q_prod(fl32(x_k * w_k));  (hi, lo) = two_sum(s, p);  s = round_exact(hi, lo, acc)

and the chunk results are combined in ascending order: T <- round_exact(two_sum(T, s), combine)
(or T + s in float32 when combine is None), every zero sum signed as IEEE 754 says. K is padded
to whole chunks with neutral zero products (`FloatFormat.pad_product`), as `_Chain.layout` does.

The kernel: a grid over (B, M / block_m, N / block_n). Each program keeps its (block_m, block_n)
accumulator tile and the combine total in registers and walks the contraction with two nested
`fori_loop`s (chunks, then steps), loading per step one (block_m,) row of x^T and one (block_n,)
row of w (x is transposed once outside the kernel so that both loads are contiguous). Rounding and
TwoSum are `lowacc.quantize.round_exact` and `lowacc.accumulator.two_sum` themselves: plain
jnp/lax ops on uint32 bit patterns (bitcast_convert_type, and/or, logical shifts by at most 31,
comparisons, select), so the kernel body is the XLA path's step, traced once more.

Backends. `interpret=None` runs Pallas interpret mode on the CPU (the kernel body then compiles to
ordinary XLA CPU code) and the compiled kernel elsewhere. On a GPU it goes through Pallas' Triton
backend (`compiler_params=pltriton.CompilerParams`), chosen over Mosaic GPU because the chain is
pure elementwise integer and float32 work (no MMA, TMA or warpgroup structure for Mosaic GPU to
exploit), Triton takes any power-of-two tile with a plain grid and `pl.pallas_call`, and it runs on
Ampere as well as Hopper; `pl.pallas_call` with Mosaic GPU is also deprecated in jax 0.10 in
favour of `plgpu.kernel`. Triton needs power-of-two block sizes; interpret mode takes any.

Float32 subnormals. XLA on the CPU flushes float32 subnormal operands and results (FTZ/DAZ) and
the contract follows it: products count subnormals as zero. A GPU does not flush (neither
Triton's code nor XLA's by default), so the kernel flushes explicitly, with integer ops:
- the operands x and w before the products (DAZ of the multiply), once, outside the loop;
- every float32 product fl32(x * w) (FTZ of the multiply), before Q_prod;
- the float32 combine sum (combine=None) and its chunk operand.
On the CPU these are no-ops (XLA already flushed), which is why the tests here cannot tell them
apart; on a GPU they make the kernel follow the contract where the XLA path run on that GPU would
not. The product flush also keeps a compiler from contracting x * w + s into one FMA (Triton allows
fp contraction by default), which would skip the product's float32 rounding when product=None.
TwoSum itself is not flushed: its intermediates and error term are subnormal only when the sums
reach below about 2^-78, i.e. for formats whose range does (8 exponent bits, or underflow='none'),
where the kernel on a GPU follows IEEE gradual underflow, as XLA does on a GPU, and may differ
from XLA on the CPU. One more corner the explicit flush cannot reproduce: x86 decides that a
product is tiny after rounding it with an unbounded exponent, IEEE rounding (a GPU) rounds it on
the subnormal grid first, so a product within 2^-150 below 2^-126 is 2^-126 on a GPU and 0 on the
CPU; that takes operands with more than 12 significant bits whose product lands there.

Not covered: stochastic rounding (NotImplementedError: the per-step random words would have to be
reproduced from the key inside the kernel), order='chunk', acc=None, gradients (the kernel is a
forward pass; no VJP is defined), input quantization (config.lhs / config.rhs must be None: pass
operands already quantized, as `lowacc.dot._prepare` leaves them).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lowacc.accumulator import float32_sum, two_sum
from lowacc.formats import AccumulatorConfig, DotConfig, FloatFormat
from lowacc.quantize import round_exact

__all__ = ['fma_dot']

_SIGN = 0x80000000
_ABS = 0x7FFFFFFF
_MIN_NORMAL_BITS = 0x00800000  # 2^-126, float32's smallest normal


def _flush_subnormal(v):
  """v with float32 subnormals replaced by zeros of the same sign (what FTZ/DAZ make of them)."""
  u = lax.bitcast_convert_type(v, jnp.uint32)
  tiny = (u & jnp.uint32(_ABS)) < jnp.uint32(_MIN_NORMAL_BITS)
  return lax.bitcast_convert_type(jnp.where(tiny, u & jnp.uint32(_SIGN), u), jnp.float32)


def _check_config(config) -> AccumulatorConfig:
  cfg = config.fwd if isinstance(config, DotConfig) else config
  if not isinstance(cfg, AccumulatorConfig):
    raise ValueError(f'fma_dot: config must be an AccumulatorConfig (or a DotConfig with fwd set), '
                     f'got {config!r}')
  if cfg.acc is None:
    raise ValueError('fma_dot: config.acc=None is a plain float32 dot, not an accumulator chain; '
                     'use lax.dot_general')
  if not isinstance(cfg.acc, FloatFormat):
    raise ValueError(f'fma_dot: config.acc={cfg.acc.name} is not supported: the kernel runs the '
                     'FloatFormat kind only; use lowacc.dot_general')
  if cfg.order != 'fma':
    raise ValueError(f"fma_dot: config.order={cfg.order!r} is not supported: the kernel runs "
                     "order='fma' only; use lowacc.dot_general for order='chunk'")
  if cfg.lhs is not None or cfg.rhs is not None:
    raise ValueError('fma_dot: config.lhs / config.rhs (input quantization) are set; the kernel '
                     'takes operands already quantized: apply lowacc.quantize.quantize_operand '
                     'and pass config.replace(lhs=None, rhs=None)')
  if cfg.stochastic:
    raise NotImplementedError(
        "fma_dot: rounding='stochastic' is not supported by the Pallas kernel (its random words "
        "come from jax.random per step and output element); use lowacc.dot_general with key=")
  return cfg


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def fma_dot(x, w, config: Union[AccumulatorConfig, DotConfig], *, block_m: int = 64,
            block_n: int = 64, interpret: Optional[bool] = None, num_warps: int = 4):
  """The forward of `lowacc.dot._accumulate` for order='fma', as a Pallas kernel.

  x: float32 (B, M, K), w: float32 (B, K, N), both already input-quantized (config.lhs and
  config.rhs must be None). config: an AccumulatorConfig with order='fma' and deterministic roundings, or a
  DotConfig (its fwd is used). block_m, block_n: the output tile of one program (powers of two
  when compiled; any size in interpret mode); a tile larger than the padded M or N shrinks to
  it. interpret: True for Pallas interpret mode, False for the compiled kernel, None for interpret
  mode on the CPU and compiled elsewhere (jax.default_backend()). num_warps: Triton's, per program.
  Returns y (B, M, N) float32, bit for bit `lowacc.dot._accumulate(config, False, x, w, None)`.
  """
  cfg = _check_config(config)
  x, w = jnp.asarray(x), jnp.asarray(w)
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise ValueError(f'fma_dot: x and w must be float32, got {x.dtype} and {w.dtype}')
  if x.ndim != 3 or w.ndim != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[1]:
    raise ValueError(f'fma_dot: expected x (B, M, K) and w (B, K, N), got {x.shape} and {w.shape}')
  for name, value in (('block_m', block_m), ('block_n', block_n), ('num_warps', num_warps)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'fma_dot: {name}={value!r} must be a positive int')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  b, m, k = x.shape
  n = w.shape[2]
  bm = min(block_m, _next_power_of_2(m))
  bn = min(block_n, _next_power_of_2(n))
  if not interpret and (bm & (bm - 1) or bn & (bn - 1)):
    raise ValueError(f'fma_dot: block_m={block_m}, block_n={block_n}: the compiled (Triton) '
                     'kernel needs powers of two')
  if k == 0 or b * m * n == 0:  # as the XLA path: an empty contraction is the float32 dot, +0
    return jnp.zeros((b, m, n), jnp.float32)
  return _fma_dot(cfg, bm, bn, bool(interpret), num_warps, x, w)


def _kernel(x_ref, w_ref, y_ref, *, cfg: AccumulatorConfig, chunk: int, chunks: int):
  """One (bm, bn) output tile. x_ref: (Kp, bm) of x^T, w_ref: (Kp, bn), y_ref: (bm, bn)."""
  acc, prod, comb = cfg.acc, cfg.product, cfg.combine_format
  zero = jnp.zeros(y_ref.shape, jnp.float32)

  def step(t, s):
    xk = x_ref[t, :]
    wk = w_ref[t, :]
    p = _flush_subnormal(xk[:, None] * wk[None, :])
    if prod is not None:
      p = round_exact(p, None, prod)[0]
    hi, lo = two_sum(s, p, acc.rounding == 'down')
    return round_exact(hi, lo, acc)[0]

  def per_chunk(j, total):
    start = j * chunk
    s = lax.fori_loop(0, chunk, lambda i, s: step(start + i, s), zero)
    if comb is None:
      return _flush_subnormal(float32_sum(total, _flush_subnormal(s)))
    hi, lo = two_sum(total, s, comb.rounding == 'down')
    return round_exact(hi, lo, comb)[0]

  y_ref[...] = lax.fori_loop(0, chunks, per_chunk, zero)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _fma_dot(cfg: AccumulatorConfig, bm: int, bn: int, interpret: bool, num_warps: int, x, w):
  b, m, k = x.shape
  n = w.shape[2]
  chunk = k if cfg.chunk_size is None else min(cfg.chunk_size, k)
  chunks = -(-k // chunk)
  kp = chunks * chunk
  mp, np_ = -(-m // bm) * bm, -(-n // bn) * bn
  x, w = _flush_subnormal(x), _flush_subnormal(w)
  # K: padded products acc.pad_product * (+0), as _Chain.layout. M, N: sliced off below.
  x = jnp.pad(x, ((0, 0), (0, 0), (0, kp - k)), constant_values=cfg.acc.pad_product)
  x = jnp.pad(x, ((0, 0), (0, mp - m), (0, 0))).transpose(0, 2, 1)  # (B, Kp, Mp)
  w = jnp.pad(w, ((0, 0), (0, kp - k), (0, np_ - n)))  # (B, Kp, Np)
  compiler_params = None
  if not interpret and jax.default_backend() != 'tpu':
    # Explicitly Triton: with no compiler_params jax 0.10 lowers pl.pallas_call to Mosaic GPU.
    from jax.experimental.pallas import triton as pltriton
    compiler_params = pltriton.CompilerParams(num_warps=num_warps)
  y = pl.pallas_call(
      functools.partial(_kernel, cfg=cfg, chunk=chunk, chunks=chunks),
      out_shape=jax.ShapeDtypeStruct((b, mp, np_), jnp.float32),
      grid=(b, mp // bm, np_ // bn),
      in_specs=[pl.BlockSpec((None, kp, bm), lambda bi, i, j: (bi, 0, i)),
                pl.BlockSpec((None, kp, bn), lambda bi, i, j: (bi, 0, j))],
      out_specs=pl.BlockSpec((None, bm, bn), lambda bi, i, j: (bi, i, j)),
      interpret=interpret,
      compiler_params=compiler_params,
      name='lowacc_fma_dot',
  )(x, w)
  return y[:, :m, :n]
