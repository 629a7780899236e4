"""The Pallas order='fma' kernel against the XLA path: bit equality, then speed (GPU only).

python -m benchmarks.bench_pallas [--n 1024] [--out results.json]

On a GPU (a few minutes; compiled Triton kernel):
1. equality, kernel vs lowacc.dot_general (uint32 words), on a battery of small GEMMs whose
   configs exercise the integer paths of the rounding (floor(log2), shifts, M0's parity,
   saturation, flushing), then on the n^3 GEMM under PAPER_M7E4;
2. speed of the n^3 GEMM: G FMAq/s (fused multiply-accumulate steps, n^3 of them) of the kernel
   over a few tile shapes and of the XLA path, and each time as a ratio to float32 jnp.dot
   (precision HIGHEST; the default-precision dot, TF32 on recent GPUs, is printed too) on the same
   shapes in the same run; the XLA path with order='chunk' (bench_core's config) beside it.
On a CPU it says the GPU figures were not measured and runs a small interpret-mode equality check.
Exits non-zero if any equality check fails.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lowacc
from benchmarks.bench_core import CHUNK, seconds
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.kernels.pallas_fma import fma_dot

BATCHED = (((2,), (1,)), ((0,), (0,)))
CFG = lowacc.PAPER_M7E4
TILES = ((64, 64, 4), (64, 64, 8), (32, 64, 4), (128, 64, 8))  # (block_m, block_n, num_warps)


def spanning(fmt, shape, rng):
  """Operands whose products span fmt's range (below min_normal to above max_normal)."""
  e = rng.integers((fmt.min_exp - 3) // 2, (fmt.max_exp + 3) // 2 + 1, shape)
  f = rng.integers(0, 64, shape) / 64.0
  return jnp.asarray(np.where(rng.random(shape) < 0.5, -1, 1) * np.ldexp(1 + f, e), jnp.float32)


def battery():
  """(name, config, x, w): small GEMMs for the compiled kernel's integer paths. Operands stay
  far above 2^-126, so no float32 subnormal arises (where a GPU and the contract may differ)."""
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  narrow = lambda r, u, o: FloatFormat(3, 3, bias=3, rounding=r, underflow=u, overflow=o)
  m3 = narrow('up', 'subnormal', 'inf')
  m0 = FloatFormat(4, 0, bias=7, rounding='nearest_even', underflow='none', overflow='none')
  cases = [
      ('paper M7E4', CFG, normal(1, 256, 96), normal(1, 96, 128)),
      ('paper, product None, combine None', CFG.replace(product=None, combine=None),
       normal(1, 256, 96), normal(1, 96, 128)),
      ('FP32 acc (variable exponent path), chunk None', AccumulatorConfig(acc=lowacc.FP32, chunk_size=None),
       normal(2, 64, 200), normal(2, 200, 64)),
      ('M3E3 up/subnormal/inf, product M3E3 down/flush/saturate, combine FP16',
       AccumulatorConfig(acc=m3, product=narrow('down', 'flush', 'saturate').replace(bias=4),
                         chunk_size=5, combine=lowacc.FP16),
       spanning(m3, (2, 96, 70), rng), spanning(m3, (2, 70, 80), rng)),
      ('M0E4 nearest_even/none/none (parity of the exponent code)',
       AccumulatorConfig(acc=m0, product=None, chunk_size=7),
       spanning(m0, (1, 64, 50), rng), spanning(m0, (1, 50, 64), rng)),
  ]
  return cases


def mismatches(got, expected):
  a = np.asarray(got).view(np.uint32)
  e = np.asarray(expected).view(np.uint32)
  nan = np.isnan(np.asarray(expected))
  return int(np.sum((a != e) & ~(nan & np.isnan(np.asarray(got)))))


def check(name, cfg, x, w, **kw):
  try:
    got = fma_dot(x, w, cfg, **kw)
  except Exception as e:  # reported, and the battery goes on to find every failing case
    print(f'  FAIL {name}: {type(e).__name__}: {str(e)[:300]}')
    return False
  bad = mismatches(got, lowacc.dot_general(x, w, BATCHED, cfg))
  print(f'  {"OK  " if bad == 0 else "FAIL"} {name}: {bad} of {got.size} differ')
  return bad == 0


def gpu(n):
  results, ok = {}, True
  print('equality (kernel vs XLA path, uint32 words):')
  for name, cfg, x, w in battery():
    ok &= check(name, cfg, x, w)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, n, n)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, n, n)), jnp.float32)
  steps = n ** 3
  xla = jax.jit(lambda a, b: lowacc.dot_general(a, b, BATCHED, CFG))
  expected = xla(x, w)
  f32 = jax.jit(lambda a, b: jnp.matmul(a, b, precision=lax.Precision.HIGHEST))
  base = seconds(f32, x, w, repeats=20)
  results['float32 dot HIGHEST'] = dict(seconds=base, ratio=1.0)
  t = seconds(jax.jit(jnp.matmul), x, w, repeats=20)
  results['float32 dot default precision'] = dict(seconds=t, ratio=t / base)
  t = seconds(xla, x, w, repeats=2)
  results['XLA path (lowacc.dot_general)'] = dict(seconds=t, ratio=t / base, gfmaq=steps / t / 1e9)
  chunk = jax.jit(lambda a, b: lowacc.dot_general(a, b, BATCHED, CHUNK))
  t = seconds(chunk, x, w, repeats=5)
  results["XLA path, order='chunk' (no products)"] = dict(seconds=t, ratio=t / base,
                                                          gfmaq=steps / t / 1e9)
  for bm, bn, warps in TILES:
    name = f'Pallas kernel {bm}x{bn}, {warps} warps'
    kernel = jax.jit(lambda a, b, bm=bm, bn=bn, warps=warps: fma_dot(
        a, b, CFG, block_m=bm, block_n=bn, num_warps=warps))
    try:
      bad = mismatches(kernel(x, w), expected)
      t = seconds(kernel, x, w, repeats=3)
    except Exception as e:  # a tile that does not compile is reported, not fatal
      print(f'  {name}: failed: {type(e).__name__}: {str(e)[:300]}')
      ok = False
      continue
    print(f'  {"OK  " if bad == 0 else "FAIL"} {n}^3 {name}: {bad} of {n * n} differ')
    ok &= bad == 0
    results[name] = dict(seconds=t, ratio=t / base, gfmaq=steps / t / 1e9, mismatches=bad)
  print(f'\n{n}^3 GEMM, PAPER_M7E4 (order fma, chunk 16), forward:')
  print(f'{"":<40} {"ms":>10} {"x float32":>10} {"G FMAq/s":>9}')
  for name, r in results.items():
    g = f'{r["gfmaq"]:.2f}' if 'gfmaq' in r else '-'
    print(f'{name:<40} {r["seconds"] * 1e3:>10.3f} {r["ratio"]:>10.1f} {g:>9}')
  kernels = [r for name, r in results.items() if name.startswith('Pallas')]
  if kernels:
    best = min(r['seconds'] for r in kernels)
    xla_s = results['XLA path (lowacc.dot_general)']['seconds']
    print(f'XLA path time / best kernel time: {xla_s / best:.1f}')
  return results, ok


def cpu():
  print('GPU figures not measured: no GPU here (backend '
        f'{jax.default_backend()}). Interpret-mode equality check only:')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 40, 37)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 37, 24)), jnp.float32)
  start = time.perf_counter()
  ok = check('paper M7E4, (2, 40, 37) x (2, 37, 24), 16x16 tiles', CFG, x, w, block_m=16,
             block_n=16)
  ok &= check('paper, product None, combine None', CFG.replace(product=None, combine=None), x, w,
              block_m=16, block_n=8)
  print(f'  ({time.perf_counter() - start:.1f} s, interpret mode: not a speed figure)')
  return {}, ok


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--n', type=int, default=1024, help='the GEMM size n^3 (GPU)')
  parser.add_argument('--out', help='write the figures as JSON here')
  args = parser.parse_args()
  machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
             f'{jax.devices()[0].device_kind}, jax {jax.__version__}')
  print(f'machine: {machine}')
  results, ok = gpu(args.n) if jax.default_backend() == 'gpu' else cpu()
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(machine=machine, equal=ok, results=results), f, indent=1)
  if not ok:
    print('FAILED: the kernel and the XLA path differ')
    sys.exit(1)


if __name__ == '__main__':
  main()
