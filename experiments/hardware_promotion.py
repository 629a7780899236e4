"""The error of a K=4096 FP8 GEMM on Hopper's FP8 tensor cores, with and without promotion.

Hopper's FP8 wgmma keeps 13 fraction bits below the largest exponent of each group of 32 products
(lowacc.hardware, after MMA-Sim); DeepSeek-V3 reports about 2% maximum relative error for K=4096
without promotion and promotes the partial sums to float32 every 128 products. Inputs: standard
normal values rounded to E4M3 (no scaling), errors against the exact (float64) dot of the same
E4M3 values, relative to the outputs' root mean square. python -m experiments.hardware_promotion
"""

import time

import jax
import numpy as np

import lowacc
from lowacc import hardware

PRESET = 'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3'


def study(m=64, n=64, k=4096, seed=0):
  rng = np.random.default_rng(seed)
  cast = lambda v: np.asarray(jax.numpy.asarray(v, np.float32).astype(jax.numpy.float8_e4m3fn),
                              np.float32)
  x, w = cast(rng.standard_normal((m, k))), cast(rng.standard_normal((k, n)))
  exact = x.astype(np.float64) @ w.astype(np.float64)
  rows = {}
  for name in (PRESET, PRESET + '/promote128'):
    y = np.asarray(lowacc.matmul(x, w, hardware.parse(name)), np.float64)
    err, scale = np.abs(y - exact), np.sqrt(np.mean(exact ** 2))
    # Elementwise relative errors blow up where an output nearly cancels: errors are given
    # relative to the outputs' root mean square instead.
    rows[name] = dict(max_rel=float(err.max() / scale), median_rel=float(np.median(err) / scale),
                      normwise=float(np.linalg.norm(y - exact) / np.linalg.norm(exact)))
  return rows


if __name__ == '__main__':
  start = time.time()
  print(f'{"preset":<48} {"max rel":>9} {"median rel":>11} {"normwise":>9}')
  for name, r in study().items():
    print(f'{name:<48} {r["max_rel"]:>9.2e} {r["median_rel"]:>11.2e} {r["normwise"]:>9.2e}')
  print(f'done in {time.time() - start:.1f} s on {jax.devices()[0].platform}')
