"""What a run leaves in its workdir: metrics (JSONL and TensorBoard), results.json, results.md and
accuracy.png (accuracy against accumulator width, the paper's zero-shot table as a plot)."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from experiments import state  # noqa: E402
from lowacc import hardware  # noqa: E402
from lowacc.formats import FloatFormat, IntFormat  # noqa: E402


class MetricLog:
  """Appends {'phase', 'step', metrics...} lines to metrics.jsonl and scalars to TensorBoard; steps
  are the run's global steps, increasing across phases."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = open(self._path, 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def rewind(self, step: int):
    """Drops the lines past `step` (what a killed run logged after the checkpoint it resumes from),
    so that the resumed run logs each step once."""
    rows = state.read_jsonl(self._path)
    kept = [row for row in rows if row['step'] <= step]
    if len(kept) < len(rows):
      self._jsonl.close()
      state.write_jsonl(self._path, kept)
      self._jsonl = open(self._path, 'a')

  def write(self, phase: str, step: int, metrics: dict[str, float]):
    state.append_jsonl(self._jsonl, dict(phase=phase, step=step, **metrics))
    for name, value in metrics.items():
      self._tb.add_scalar(f'{phase}/{name}', value, step)
    self._tb.flush()

  def close(self):
    self._jsonl.close()
    self._tb.close()


def load_results(workdir: str) -> dict:
  """The finished phases' results in <workdir>/results.json ({} if there is none)."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return {}
  saved = state.read_json(path)
  if not isinstance(saved, dict) or not isinstance(saved.get('results'), dict):
    raise state.StateError(f'{path} holds no results: delete it to recompute what it held')
  return saved['results']


def save_results(workdir: str, config, results: dict):
  state.write_json(os.path.join(workdir, 'results.json'),
                   {'config': config.to_dict(), 'results': results}, indent=1, default=str)


def bits(fmt: str) -> int:
  """Bits of 'M7E4b10' (1 + 7 + 4), of 'INT16s' (16), of a hardware preset's output type;
  float32 is 32. Another name is a ValueError (names are checked before any run)."""
  if fmt == 'float32':
    return 32
  if '/' in fmt:
    return 16 if hardware.parse(fmt).acc.output == 'f16' else 32
  if fmt.startswith('INT'):
    return IntFormat.parse(fmt).bits
  return FloatFormat.parse(fmt).width


def binomial_se(p: float, n: int) -> float:
  """The standard error of an accuracy p measured on n independent examples: sqrt(p(1-p)/n)."""
  return math.sqrt(p * (1 - p) / n)


def plus_minus(value, se, scale=100.0, digits=2) -> str:
  """'85.10 +- 0.50' (value and standard error times scale); without the error where se is None,
  'n/a' where the value is."""
  if value is None:
    return 'n/a'
  return f'{scale * value:.{digits}f} +- {scale * se:.{digits}f}' if se is not None \
      else f'{scale * value:.{digits}f}'


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
