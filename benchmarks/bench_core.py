"""Speed of the simulated accumulator as ratios to float32 XLA on the same shapes, same run.

python -m benchmarks.bench_core [--out results.json] [--gemm-only] [--cpu-time]
"""

import argparse
import ctypes
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lowacc
from lowacc import hardware
from lowacc.dot import _Chain, _forward

CHUNK = lowacc.PAPER_M7E4.replace(order='chunk', product=None)  # M7E4, chunk 16, one rounding
FMA = lowacc.PAPER_M7E4  # the paper's FMAq with product rounding
_NEAREST = dict(rounding='nearest_even')
FMA_NEAREST = FMA.replace(acc=FMA.acc.replace(**_NEAREST), product=FMA.product.replace(**_NEAREST))
CHUNK_PRODUCT = lowacc.PAPER_M7E4.replace(order='chunk')  # each product rounded, then chunk sums
_NONE = dict(underflow='none')  # the paper's fine-tuning stage 1: "without underflow"
FMA_STAGE1 = FMA.replace(acc=FMA.acc.replace(**_NONE), product=FMA.product.replace(**_NONE))
_E5 = dict(exp_bits=5)  # M7E5 at the paper's bias rule, IEEE + 3 (the SNLI grid's E5 b18)
FMA_E5 = FMA.replace(acc=FMA.acc.replace(bias=18, **_E5),
                     product=FMA.product.replace(bias=20, **_E5))


def keep_freed_memory():
  """Has glibc's malloc keep freed memory rather than return it to the OS (M_TRIM_THRESHOLD,
  M_MMAP_THRESHOLD). Otherwise whichever call follows one that freed a large temporary pays the
  page faults of taking it back, and a ratio measures the allocator: float32's 1024^3 dot took
  14.5 ms instead of 10 after the simulated GEMM, and 'chunk' 60 ms instead of 26 after float32.
  No-op without glibc."""
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return
  libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
  libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, at its maximum on 64-bit


def best_times(calls, repeats=5, clock=time.perf_counter):
  """{name: (compiled fn, args)} -> {name: best wall time in seconds} (or best time of `clock`:
  time.process_time gives the CPU time of all the process's threads, which waiting for a core
  that other jobs hold does not add to).

  One warm-up (compile) call each, then `repeats` rounds that call each once in turn, so that a
  slow phase of the machine slows every candidate alike. The best time, not the median: on a
  shared 2-core VM interference only ever adds time, and it adds more to the memory-bound
  simulation than to the compute-bound float32 dot (timed one after the other with medians,
  ResNet-18's chunk step ratio read 1.93 and then 1.63 in consecutive runs).
  """
  keep_freed_memory()
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      start = clock()
      jax.block_until_ready(fn(*args))
      times[name].append(clock() - start)
  return {name: min(t) for name, t in times.items()}


def seconds(fn, *args, repeats=5):
  """Best wall time of one compiled call (see best_times)."""
  return best_times({'': (fn, args)}, repeats)['']


# Matrix units (lowacc.hardware) the sweeps' hardware axis takes: fp16 and FP8 Hopper, bf16 Ampere.
UNITS = ('Hopper/wgmma/m64n8k16.f32.f16.f16', 'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3',
         'Ampere/mma/m16n8k16.f32.bf16.bf16.f32')


def _xla_path(cfg, x, w):
  """cfg's forward through lowacc.dot's XLA path, which dot_general leaves for the native kernel
  on the CPU: the reference the kernel is measured against."""
  chain = _Chain.layout(cfg, x[None], w[None], None)
  return _forward(chain, False, False)[0][0]


def _xla_chunk_path(x, w):
  return _xla_path(CHUNK, x, w)


def gemm(n=1024, clock=time.perf_counter):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  # value_and_grad: with grad alone XLA would drop the forward, which the identity backward
  # does not need.
  grad = lambda dot: jax.jit(jax.value_and_grad(lambda a, b: jnp.vdot(dot(a, b), g),
                                                argnums=(0, 1)))
  dot = {name: lambda a, b, cfg=cfg: lowacc.matmul(a, b, cfg)
         for name, cfg in (('chunk', CHUNK), ('fma', FMA))}
  t = best_times({'float32': (jax.jit(jnp.dot), (x, w)),
                  'float32 fwd+bwd': (grad(jnp.dot), (x, w)),
                  'chunk': (jax.jit(dot['chunk']), (x, w)),
                  'chunk fwd+bwd': (grad(dot['chunk']), (x, w)),
                  'one chunk': (jax.jit(lambda a, b: lowacc.matmul(
                      a, b, CHUNK.replace(chunk_size=None))), (x, w)),
                  'xla path': (jax.jit(_xla_chunk_path), (x, w))}, clock=clock)
  slow = best_times({'float32': (jax.jit(jnp.dot), (x, w)),
                     **{name: (jax.jit(lambda a, b, cfg=cfg: lowacc.matmul(a, b, cfg)), (x, w))
                        for name, cfg in (('fma', FMA), ('fma nearest', FMA_NEAREST),
                                          ('fma stage 1', FMA_STAGE1), ('fma E5', FMA_E5),
                                          ('chunk product', CHUNK_PRODUCT))}}, repeats=3,
                    clock=clock)
  macs = n ** 3
  return {f'gemm{n} chunk fwd': dict(ratio=t['chunk'] / t['float32'],
                                     gmac_per_s=macs / t['chunk'] / 1e9),
          f'gemm{n} chunk fwd+bwd': dict(ratio=t['chunk fwd+bwd'] / t['float32 fwd+bwd']),
          f'gemm{n} chunk fwd, XLA path': dict(ratio=t['xla path'] / t['float32']),
          f'gemm{n} chunk fwd, one chunk (chunk_size None)': dict(
              ratio=t['one chunk'] / t['float32']),
          f'gemm{n} fma fwd': dict(ratio=slow['fma'] / slow['float32'],
                                   gmac_per_s=macs / slow['fma'] / 1e9),
          f'gemm{n} fma fwd, nearest_even': dict(ratio=slow['fma nearest'] / slow['float32'],
                                                 gmac_per_s=macs / slow['fma nearest'] / 1e9),
          f'gemm{n} fma fwd, underflow none (stage 1)': dict(
              ratio=slow['fma stage 1'] / slow['float32'],
              gmac_per_s=macs / slow['fma stage 1'] / 1e9),
          f'gemm{n} fma fwd, M7E5 b18': dict(ratio=slow['fma E5'] / slow['float32'],
                                              gmac_per_s=macs / slow['fma E5'] / 1e9),
          f'gemm{n} chunk fwd, product rounding': dict(
              ratio=slow['chunk product'] / slow['float32'],
              gmac_per_s=macs / slow['chunk product'] / 1e9)}


def resnet_conv(batch=8, clock=time.perf_counter):
  """ResNet-18's layer1 3x3 conv: 56x56x64 -> 64, stride 1, SAME."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((batch, 56, 56, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.06, jnp.float32)
  dn = ('NHWC', 'HWIO', 'NHWC')
  base = jax.jit(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), 'SAME', dimension_numbers=dn))
  macs = batch * 56 * 56 * 64 * 576
  out = {}
  for name, cfg in (('chunk', CHUNK), ('fma', FMA)):
    conv = jax.jit(lambda a, b, cfg=cfg: lowacc.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=dn, config=cfg))
    t = best_times({'float32': (base, (x, k)), name: (conv, (x, k))},
                   repeats=2 if name == 'fma' else 5, clock=clock)
    out[f'resnet18 conv3x3 b{batch} {name} fwd'] = dict(ratio=t[name] / t['float32'],
                                                          gmac_per_s=macs / t[name] / 1e9)
  return out


def depthwise_conv(clock=time.perf_counter):
  """EfficientNet-Lite0's depthwise convs (3x3 at 112x112x32, 5x5 at 28x28x144, SAME, batch 1)
  under PAPER_M7E4, against XLA's float32 depthwise conv."""
  rng = np.random.default_rng(2)
  dn = ('NHWC', 'HWIO', 'NHWC')
  out = {}
  for size, c, k in ((112, 32, 3), (28, 144, 5)):
    x = jnp.asarray(rng.standard_normal((1, size, size, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, 1, c)) * 0.3, jnp.float32)
    conv = lambda cfg: jax.jit(lambda a, b: lowacc.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=dn, feature_group_count=c, config=cfg))
    t = best_times({'float32': (conv(None), (x, kern)), 'fma': (conv(FMA), (x, kern))},
                   clock=clock)
    out[f'depthwise {k}x{k} {size}x{size}x{c} fma fwd'] = dict(
        ratio=t['fma'] / t['float32'], gmac_per_s=size * size * c * k * k / t['fma'] / 1e9)
  return out


def matrix_units(n=512, clock=time.perf_counter):
  """The UNITS presets at n^3: the native kernel's fused dot products and the XLA path."""
  rng = np.random.default_rng(3)
  x, w = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(2))
  calls = {'float32': (jax.jit(jnp.dot), (x, w))}
  for name in UNITS:
    cfg = hardware.parse(name)
    calls[name] = (jax.jit(lambda a, b, cfg=cfg: lowacc.matmul(a, b, cfg)), (x, w))
    calls[name + ' xla'] = (jax.jit(lambda a, b, cfg=cfg: _xla_path(cfg, a, b)), (x, w))
  t = best_times(calls, repeats=3, clock=clock)
  out = {}
  for name in UNITS:
    for suffix, label in (('', 'native'), (' xla', 'XLA path')):
      out[f'gemm{n} {name}, {label}'] = dict(ratio=t[name + suffix] / t['float32'],
                                             gmac_per_s=n ** 3 / t[name + suffix] / 1e9)
  return out


def estimators(n=512, clock=time.perf_counter):
  """PAPER_M7E4's forward and backward under the fine-grained estimators, each against the
  identity (straight-through) backward, at n^3; ratio: to the identity's time."""
  rng = np.random.default_rng(4)
  x, w, g = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(3))
  grad = lambda ste: jax.jit(jax.value_and_grad(
      lambda a, b: jnp.vdot(lowacc.matmul(a, b, FMA.replace(ste=ste)), g), argnums=(0, 1)))
  names = ('identity', 'immediate_both', 'recursive_both')
  t = best_times({ste: (grad(ste), (x, w)) for ste in names}, repeats=3, clock=clock)
  return {f'gemm{n} fma fwd+bwd, {ste} / identity': dict(ratio=t[ste] / t['identity'])
          for ste in names[1:]}


def machine() -> str:
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'{jax.devices()[0].device_kind}, jax {jax.__version__}')


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', help='write the figures as JSON here')
  parser.add_argument('--gemm-only', action='store_true', help='skip the convolutions')
  parser.add_argument('--cpu-time', action='store_true',
                      help="time the process's CPU seconds (all threads) instead of the wall: "
                           'on a machine shared with other jobs, waiting for a core adds none')
  args = parser.parse_args()
  clock = time.process_time if args.cpu_time else time.perf_counter
  results = {**gemm(clock=clock), **matrix_units(clock=clock), **estimators(clock=clock),
             **({} if args.gemm_only else {
      **resnet_conv(clock=clock), **depthwise_conv(clock=clock)})}
  print(f'machine: {machine()}; clock: {"CPU time" if args.cpu_time else "wall"}')
  print(f'{"benchmark":<60} {"x float32":>10} {"G MAC/cpu-s" if args.cpu_time else "G MAC/s":>9}')
  for name, r in results.items():
    gmacs = f'{r["gmac_per_s"]:.3f}' if 'gmac_per_s' in r else '-'
    print(f'{name:<60} {r["ratio"]:>10.1f} {gmacs:>9}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(machine=machine(), clock='cpu' if args.cpu_time else 'wall',
                     results=results), f, indent=1)


if __name__ == '__main__':
  main()
