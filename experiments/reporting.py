"""What a run leaves in its workdir: metrics (JSONL and TensorBoard), results.json, results.md and
accuracy.png (accuracy against accumulator width, the paper's zero-shot table as a plot)."""

from __future__ import annotations

import json
import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


class MetricLog:
  """Appends {'phase', 'step', metrics...} lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, phase: str, step: int, metrics: dict[str, float]):
    self._jsonl.write(json.dumps(dict(phase=phase, step=step, **metrics)) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f'{phase}/{name}', value, step)
    self._tb.flush()

  def close(self):
    self._jsonl.close()
    self._tb.close()


def load_results(workdir: str) -> dict:
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)['results']


def save_results(workdir: str, config, results: dict):
  path = os.path.join(workdir, 'results.json')
  with open(path + '.tmp', 'w') as f:
    json.dump({'config': config.to_dict(), 'results': results}, f, indent=1, default=str)
  os.replace(path + '.tmp', path)  # atomic: a kill never leaves half a file


def bits(fmt: str) -> int:
  """Bits of 'M7E4b10' (1 + 7 + 4); float32 is 32."""
  m = re.fullmatch(r'M(\d+)E(\d+)(?:b-?\d+)?', fmt)
  return 32 if m is None else 1 + int(m[1]) + int(m[2])


def table(results: dict, metric: str) -> str:
  """The markdown table: baseline, zero-shot per format, stage 1, stage 2."""
  rows = [f'| phase | accumulator | bits | {metric} |', '|---|---|---|---|']
  for phase in ('baseline', 'zero_shot', 'stage1', 'stage2'):
    for fmt, value in results.get(phase, {}).items():
      rows.append(f'| {phase} | {fmt} | {bits(fmt)} | {100 * value:.2f} |')
  return '\n'.join(rows)


def plot(results: dict, metric: str, path: str):
  zero = results.get('zero_shot', {})
  fig, ax = plt.subplots(figsize=(6, 4))
  points = sorted((bits(f), v, f) for f, v in zero.items())
  if points:
    ax.plot([p[0] for p in points], [100 * p[1] for p in points], 'o-', label='zero-shot')
    for w, v, f in points:
      ax.annotate(f, (w, 100 * v), textcoords='offset points', xytext=(3, 3), fontsize=7)
  for phase, marker in (('stage1', 's'), ('stage2', '^')):
    for fmt, value in results.get(phase, {}).items():
      ax.plot([bits(fmt)], [100 * value], marker, label=f'{phase} fine-tuned {fmt}')
  if 'baseline' in results:
    ax.axhline(100 * results['baseline']['float32'], color='gray', ls='--', label='float32')
  ax.set_xlabel('accumulator width (bits)')
  ax.set_ylabel(f'{metric} (%)')
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(workdir: str, config, results: dict):
  metric = config.get('metric_name', 'accuracy')
  md = table(results, metric)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'# {config.name}\n\n{md}\n')
  plot(results, metric, os.path.join(workdir, 'accuracy.png'))
  print(md)
