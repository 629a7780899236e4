"""The Hopper presets of `lowacc.hardware` against the GPU's own tensor cores (issue 12's check).

python -m benchmarks.gpu_tensor_cores [--out tensor_cores.json]

Run on a lent Hopper GPU (H100 / H200; a few minutes). For f16, bf16 and e4m3 operands (and
float32 operands at default precision, which XLA runs as tf32) it reports, per output element,
the share of results bit-equal (float32 words; every NaN equals every NaN) to each candidate
preset, the presets computed by lowacc on the CPU:
1. One instruction: K is the instruction's k, so no accumulation order is in question. The GPU
   side is XLA's own GEMM (`jnp.dot(..., preferred_element_type=float32)`, whatever kernel XLA
   picks: cuBLAS or its Triton emitter, wgmma or mma).
2. Chained K through a Pallas (Triton) kernel whose order is known: each (64, 64) output tile
   walks K in steps of the instruction's k, `acc = acc + dot(a_k, b_k)`. Triton may fold the add
   into the MMA's accumulator operand (then the chain feeds c through the fused sum: the preset
   itself) or not (each step from zero, added in float32: the preset with promote_every=k); the
   rates say which, per type.
Inputs, per type (`cases`): standard normal; wide range (exponents over the type's whole normal
range); heavy cancellation (each row of a holds pairs v, -v, and b's second half is its first
perturbed by about 1/64, so most of the sum cancels and what is left is small); specials (about 2% each of +-0, +-inf, NaN and the
type's subnormals among normals).
Without a GPU it says so, runs the CPU side once (the inputs and presets), and measures nothing.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

import lowacc
from lowacc import hardware

M = N = 128
K_CHAINED = 256
BLOCK = 64

# type -> (jnp dtype, instruction k, candidate presets as 'instruction/shape_and_type').
TYPES = {
    'f16': (jnp.float16, 16, ('wgmma/m64n8k16.f32.f16.f16', 'mma/m16n8k16.f32.f16.f16.f32')),
    'bf16': (jnp.bfloat16, 16, ('wgmma/m64n8k16.f32.bf16.bf16',
                                'mma/m16n8k16.f32.bf16.bf16.f32')),
    'e4m3': (jnp.float8_e4m3fn, 32, ('wgmma/m64n8k32.f32.e4m3.e4m3',
                                     'mma/m16n8k32.f32.e4m3.e4m3.f32',
                                     'wgmma/m64n8k16.f32.f16.f16')),  # XLA may upcast to f16
    'tf32': (jnp.float32, 8, ('wgmma/m64n8k8.f32.tf32.tf32', 'mma/m16n8k8.f32.tf32.tf32.f32')),
}


def cases(dtype, k: int, seed: int = 0):
  """name -> (a (M, k), b (k, N)) as float32 holding values of `dtype` exactly."""
  rng = np.random.default_rng(seed)
  info = jnp.finfo(dtype)
  cast = lambda v: np.asarray(jnp.asarray(v, jnp.float32).astype(dtype).astype(jnp.float32))

  def wide(shape):
    lo, hi = int(np.log2(float(info.smallest_normal))), int(np.log2(float(info.max))) - 1
    e = rng.integers(lo, hi + 1, shape)
    return cast(np.where(rng.random(shape) < 0.5, -1, 1) * np.ldexp(1 + rng.random(shape), e))

  def cancelling(rows, cols):
    half = rng.standard_normal((rows, cols // 2)) * 2.0 ** rng.integers(-4, 5, (rows, 1))
    return cast(np.concatenate([half, -half], axis=1))

  def special(shape):
    v = rng.standard_normal(shape)
    pick = rng.random(shape)
    tiny = float(info.smallest_subnormal) * rng.integers(1, 8, shape)
    for share, value in ((0.02, 0.0), (0.04, -0.0), (0.06, np.inf), (0.08, -np.inf),
                         (0.10, np.nan), (0.14, tiny)):
      v = np.where((pick >= share - 0.02) & (pick < share), value, v)
    return cast(v)

  normal = lambda *s: cast(rng.standard_normal(s))
  b_pairs = normal(k // 2, N)
  b_near = cast(b_pairs + rng.standard_normal(b_pairs.shape) / 64)
  return {
      'normal': (normal(M, k), normal(k, N)),
      'wide range': (wide((M, k)), wide((k, N))),
      'cancellation': (cancelling(M, k), np.concatenate([b_pairs, b_near], axis=0)),
      'specials': (special((M, k)), special((k, N))),
  }


def equal_share(actual, expected) -> float:
  a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  same = (a.view(np.uint32) == e.view(np.uint32)) | (np.isnan(a) & np.isnan(e))
  return float(same.mean())


def reference(a, b, preset: str, promote_every=None):
  """lowacc's result of the preset on the CPU (the contract's device)."""
  instruction, shape_and_type = preset.split('/')
  cfg = hardware.mma('Hopper', instruction, shape_and_type, promote_every=promote_every)
  with jax.default_device(jax.devices('cpu')[0]):
    return np.asarray(lowacc.matmul(jnp.asarray(a), jnp.asarray(b), cfg))


def xla_gemm(a, b, dtype, gpu):
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return np.asarray(f(jax.device_put(jnp.asarray(a).astype(dtype), gpu),
                      jax.device_put(jnp.asarray(b).astype(dtype), gpu)))


def _chained_kernel(a_ref, b_ref, o_ref, *, step: int, steps: int):
  def body(i, acc):
    a = a_ref[:, pl.ds(i * step, step)]
    b = b_ref[pl.ds(i * step, step), :]
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)
  o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def chained_gemm(a, b, dtype, step: int, interpret: bool):
  """a (M, K) . b (K, N) by the Pallas kernel, K walked in steps of `step`, ascending."""
  params = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    params = dict(compiler_params=pltriton.CompilerParams(num_warps=4))
  k = a.shape[1]
  f = pl.pallas_call(
      lambda a_ref, b_ref, o_ref: _chained_kernel(a_ref, b_ref, o_ref, step=step,
                                                  steps=k // step),
      out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32),
      grid=(a.shape[0] // BLOCK, b.shape[1] // BLOCK),
      in_specs=[pl.BlockSpec((BLOCK, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, BLOCK), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j)),
      interpret=interpret, **params)
  return np.asarray(jax.jit(f)(jnp.asarray(a).astype(dtype), jnp.asarray(b).astype(dtype)))


def _attempt(fn):
  """fn's value, or the error's first line (one unsupported type must not end the run)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 -- reported, per type, in the results
    return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'


def run(gpu) -> dict:
  results = {}
  for name, (dtype, k, presets) in TYPES.items():
    one = {}
    for case, (a, b) in cases(dtype, k).items():
      got = _attempt(lambda: xla_gemm(a, b, dtype, gpu))
      one[case] = got if isinstance(got, str) else {
          p: equal_share(got, reference(a, b, p)) for p in presets}
    chained = {}
    if name != 'tf32':  # the kernel's dot of float32 operands runs at its own precision
      for case, (a, b) in cases(dtype, K_CHAINED, seed=1).items():
        got = _attempt(lambda: chained_gemm(a, b, dtype, k, interpret=False))
        chained[case] = got if isinstance(got, str) else {
            **{p: equal_share(got, reference(a, b, p)) for p in presets},
            **{f'{p}/promote{k}': equal_share(got, reference(a, b, p, k)) for p in presets}}
    results[name] = {'one instruction (XLA GEMM, K = k)': one,
                     f'chained K = {K_CHAINED} (Pallas kernel, steps of k)': chained}
    print(json.dumps({name: results[name]}, indent=1), flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=None, help='Write the results here as JSON.')
  args = parser.parse_args(argv)
  gpus = [d for d in jax.devices() if d.platform == 'gpu']
  start = time.time()
  if not gpus:
    print('No GPU: the tensor-core figures were not measured. CPU side only: every case and '
          'preset, and the chained kernel in interpret mode on one case.')
    for name, (dtype, k, presets) in TYPES.items():
      for a, b in cases(dtype, k).values():
        for p in presets:
          reference(a, b, p)
    a, b = cases(jnp.float16, K_CHAINED, seed=1)['normal']
    y = chained_gemm(a, b, jnp.float16, 16, interpret=True)
    print('interpret-mode kernel vs the f16 preset restarted every 16 products: '
          f'{equal_share(y, reference(a, b, TYPES["f16"][2][0], 16)):.3f} equal '
          '(the CPU adds fl32 products, not fused sums: not a tensor-core figure)')
    return 0
  device = gpus[0]
  out = dict(device=device.device_kind, jax=jax.__version__, results=run(device),
             seconds=time.time() - start)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
