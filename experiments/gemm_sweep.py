"""A short offline demo of the simulated accumulator: how narrow can the accumulator be?

Runs one ResNet-like GEMM (a 3x3 conv's im2col: K = 576) under a sweep of accumulator formats
and prints, per format, the output's error against float32 and the accumulator's telemetry.
"""

import time

import jax
import numpy as np

import lowacc
from lowacc import AccumulatorConfig, FloatFormat


def sweep():
  rng = np.random.default_rng(0)
  # Post-ReLU activations and He-initialised weights, as in a ResNet's 3x3 conv with 64 channels.
  x = np.maximum(rng.standard_normal((256, 576)), 0).astype(np.float32)
  w = (rng.standard_normal((576, 64)) * np.sqrt(2 / 576)).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  rows = [('float32', None)]
  for man, exp in [(10, 5), (9, 5), (8, 5), (7, 5), (6, 5), (7, 4), (5, 4), (4, 3), (3, 4)]:
    bias = 2 ** (exp - 1) - 1
    acc = FloatFormat(exp, man, bias=bias, rounding='toward_zero', underflow='flush')
    rows.append((acc.name, AccumulatorConfig(acc=acc, chunk_size=16)))
  rows.append(('paper M7E4 b10/b12', lowacc.PAPER_M7E4))
  print(f'{"accumulator":<20} {"rel. error":>10} {"sat":>8} {"lost":>8} {"flush":>8} {"steps":>9}')
  for name, cfg in rows:
    if cfg is None:
      print(f'{name:<20} {0.0:>10.2e} {"-":>8} {"-":>8} {"-":>8} {"-":>9}')
      continue
    s = jax.device_get(lowacc.accumulation_stats(x, w, dims, cfg))
    print(f'{name:<20} {s["rel_error"]:>10.2e} {s["sat"]:>8} {s["lost"]:>8} {s["flush"]:>8} '
          f'{s["steps"]:>9}')


if __name__ == '__main__':
  start = time.time()
  sweep()
  print(f'done in {time.time() - start:.1f} s on {jax.devices()[0].platform}')
