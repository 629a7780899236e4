"""Runs every benchmark and writes the summary: python -m benchmarks.run_all [--out DIR]

DIR/benchmarks.json and DIR/benchmarks.md (default: benchmarks/latest). Figures are ratios to
float32 XLA (or to APyTypes) measured in the same run, with the machine they came from.
"""

import argparse
import json
import os

from benchmarks import bench_apytypes, bench_core, bench_models, bench_simulate


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'latest'))
  args = parser.parse_args()
  results = {**bench_core.gemm(), **bench_core.matrix_units(), **bench_core.estimators(),
             **bench_core.resnet_conv(),
             **bench_core.depthwise_conv(),
             **bench_apytypes.run(),
             **bench_models.resnet18_step(), **bench_models.bert_step(),
             **bench_models.minilm_eval(), **bench_simulate.run()}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'benchmarks.json'), 'w') as f:
    json.dump(dict(machine=bench_core.machine(), results=results), f, indent=1)
  rows = [f'Machine: {bench_core.machine()}', '', '| benchmark | figure |', '|---|---|']
  for name, r in results.items():
    rows.append(f'| {name} | ' + ', '.join(
        f'{k} {v:.3g}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items()) + ' |')
  with open(os.path.join(args.out, 'benchmarks.md'), 'w') as f:
    f.write('\n'.join(rows) + '\n')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
