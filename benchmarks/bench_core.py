"""Speed of the simulated accumulator as ratios to float32 XLA on the same shapes, same run.

python -m benchmarks.bench_core [--out results.json]
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lowacc

CHUNK = lowacc.PAPER_M7E4.replace(order='chunk', product=None)  # M7E4, chunk 16, one rounding
FMA = lowacc.PAPER_M7E4  # the paper's FMAq with product rounding


def seconds(fn, *args, repeats=3):
  """Median wall time of a compiled call, after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def gemm(n=1024):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  macs = n ** 3
  base = seconds(jax.jit(jnp.dot), x, w)
  g = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  # value_and_grad: with grad alone XLA would drop the forward, which the identity backward
  # does not need.
  grad = lambda dot: jax.jit(jax.value_and_grad(lambda a, b: jnp.vdot(dot(a, b), g),
                                                argnums=(0, 1)))
  base_grad = seconds(grad(jnp.dot), x, w)
  out = {}
  for name, cfg in (('chunk', CHUNK), ('fma', FMA)):
    dot = lambda a, b, cfg=cfg: lowacc.matmul(a, b, cfg)
    t = seconds(jax.jit(dot), x, w, repeats=1 if name == 'fma' else 3)
    out[f'gemm{n} {name} fwd'] = dict(ratio=t / base, gmac_per_s=macs / t / 1e9)
    if name == 'chunk':
      out[f'gemm{n} {name} fwd+bwd'] = dict(ratio=seconds(grad(dot), x, w) / base_grad)
  return out


def resnet_conv(batch=8):
  """ResNet-18's layer1 3x3 conv: 56x56x64 -> 64, stride 1, SAME."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((batch, 56, 56, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.06, jnp.float32)
  dn = ('NHWC', 'HWIO', 'NHWC')
  base = seconds(jax.jit(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), 'SAME',
                                                               dimension_numbers=dn)), x, k)
  macs = batch * 56 * 56 * 64 * 576
  out = {}
  for name, cfg in (('chunk', CHUNK), ('fma', FMA)):
    conv = jax.jit(lambda a, b, cfg=cfg: lowacc.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=dn, config=cfg))
    t = seconds(conv, x, k, repeats=1 if name == 'fma' else 3)
    out[f'resnet18 conv3x3 b{batch} {name} fwd'] = dict(ratio=t / base, gmac_per_s=macs / t / 1e9)
  return out


def machine() -> str:
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'{jax.devices()[0].device_kind}, jax {jax.__version__}')


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', help='write the figures as JSON here')
  args = parser.parse_args()
  results = {**gemm(), **resnet_conv()}
  print(f'machine: {machine()}')
  print(f'{"benchmark":<34} {"x float32":>10} {"G MAC/s":>9}')
  for name, r in results.items():
    gmacs = f'{r["gmac_per_s"]:.3f}' if 'gmac_per_s' in r else '-'
    print(f'{name:<34} {r["ratio"]:>10.1f} {gmacs:>9}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(machine=machine(), results=results), f, indent=1)


if __name__ == '__main__':
  main()
