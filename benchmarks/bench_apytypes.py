"""lowacc against APyTypes (`APyFloatAccumulatorContext`) on the same exact-FMA work.

APyTypes rounds each product into the accumulator format and adds it with one rounding, in k
order: lowacc's order='fma' with product = acc and one chunk. The script checks that both give
identical results where their semantics coincide (IEEE bias, subnormals, inf; toward_zero and
nearest_even), then times both on the same GEMM. python -m benchmarks.bench_apytypes
"""

import time

import jax
import numpy as np

import lowacc
from benchmarks.bench_core import machine, seconds
from lowacc import AccumulatorConfig, FloatFormat

_MODES = {'toward_zero': 'TRN_ZERO', 'nearest_even': 'RND_CONV'}


def _config(rounding):
  acc = FloatFormat(5, 7, rounding=rounding, underflow='subnormal', overflow='inf')
  return AccumulatorConfig(acc=acc, product=acc, chunk_size=None)


def run(n=512):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
  out = {}
  for rounding in _MODES:
    from apytypes import APyFloatAccumulatorContext, APyFloatArray, QuantizationMode
    x = APyFloatArray.from_float(a, exp_bits=5, man_bits=10)  # FP16 operands
    w = APyFloatArray.from_float(b, exp_bits=5, man_bits=10)
    mode = getattr(QuantizationMode, _MODES[rounding])
    with APyFloatAccumulatorContext(exp_bits=5, man_bits=7, quantization=mode):
      start = time.perf_counter()
      expected = (x @ w).to_numpy()
      t_apy = time.perf_counter() - start
    xf, wf = np.asarray(x.to_numpy(), np.float32), np.asarray(w.to_numpy(), np.float32)
    f = jax.jit(lambda p, q, cfg=_config(rounding): lowacc.matmul(p, q, cfg))
    got = np.asarray(f(xf, wf))
    t_low = seconds(f, xf, wf)
    out[f'apytypes {n}^3 M7E5 {rounding}'] = dict(
        identical=bool(np.array_equal(got, expected.astype(np.float32))),
        lowacc_gmac_per_s=n ** 3 / t_low / 1e9, apytypes_gmac_per_s=n ** 3 / t_apy / 1e9,
        speedup=t_apy / t_low)
  return out


if __name__ == '__main__':
  print(f'machine: {machine()}')
  for name, r in run().items():
    print(f'{name}: identical={r["identical"]} lowacc {r["lowacc_gmac_per_s"]:.3f} G/s, '
          f'APyTypes {r["apytypes_gmac_per_s"]:.4f} G/s, speedup {r["speedup"]:.0f}x')
