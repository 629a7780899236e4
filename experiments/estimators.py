"""The paper's section-4 study: an MLP trained on real MNIST with 8-bit accumulators in every
GEMM, once per gradient estimator and seed; mean and spread of the test accuracy.

python -m experiments.estimators --out=results/estimators   (writes .json and .md)
Flags choose the formats ('M4E3,M3E4'), chunk sizes (0: one chunk), estimators, seeds, epochs;
the first row is the same MLP trained in float32 (the reference). Each finished (setting, seed)
is appended to <out>.runs.jsonl as it ends, so a killed study resumes without retraining it;
<out>.state/ holds the study's lock and the manifest of the flags that change a run (epochs,
hidden, rounding), so runs of other flags are refused, never reported.
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np
import optax
from absl import flags, logging
from flax import nnx
from ml_collections import ConfigDict

from experiments import cli, state
from experiments.train import make_train_step, parse_format
from lowacc import AccumulatorConfig
from lowacc.data import images, pipeline
from lowacc.formats import ROUNDINGS, STES
from lowacc.nn import Policy, apply_policy

FLAGS = flags.FLAGS

# Stochastic rounding needs a random key per GEMM call, which the MLP's layers do not pass.
DETERMINISTIC = tuple(r for r in ROUNDINGS if r != 'stochastic')
BATCH_SIZE, LEARNING_RATE, MOMENTUM = 64, 0.05, 0.9


class MLP(nnx.Module):
  """784 -> hidden -> 10 with ReLU; both GEMMs are policy targets."""

  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(784, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))


def _loss(model, batch):
  logits = model(batch['image'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean(), {}


class _Task:
  loss = staticmethod(_loss)


def _accuracy(model, source) -> float:
  batch = next(pipeline.make_loader(source, batch_size=len(source),
                                    transform=images.small_transform, shuffle=False, seed=0,
                                    num_epochs=1, drop_remainder=False))
  logits = nnx.jit(lambda m, x: m(x))(model, batch['image'])
  return float(np.mean(np.argmax(np.asarray(logits), -1) == batch['label']))


def settings(formats, chunks, estimators, rounding: str) -> dict[str, AccumulatorConfig | None]:
  """{name: accumulator config} of every setting, the float32 reference (None) first; a bad flag
  value is a ValueError naming the flag and what is valid."""
  if rounding not in DETERMINISTIC:
    raise ValueError(f'--rounding={rounding}: valid roundings are {", ".join(DETERMINISTIC)} '
                     '(stochastic needs a random key per GEMM call, which the study does not pass)')
  for chunk in chunks:
    if chunk < 0:
      raise ValueError(f'--chunks contains {chunk}: chunk sizes are >= 0 (0: one chunk of the '
                       'whole contraction)')
  for ste in estimators:
    if ste not in STES:
      raise ValueError(f'--estimators contains {ste!r}: valid estimators are {", ".join(STES)}')
  modes = ConfigDict(dict(rounding=rounding, underflow='flush', overflow='saturate'))
  configs = {'float32 chunk none identity': None}
  for fmt, chunk, ste in itertools.product(formats, chunks, estimators):
    try:
      acc = parse_format(fmt, modes)
    except ValueError as e:
      raise ValueError(f'--formats={fmt}: {e}') from None
    # Products get the accumulator's widths with bias + 2, as the paper's M7E4 (10 -> 12).
    configs[f'{fmt} chunk {chunk or "none"} {ste}'] = AccumulatorConfig(
        acc=acc, product=acc.replace(bias=acc.bias + 2), chunk_size=chunk or None, ste=ste)
  return configs


def train_one(config: AccumulatorConfig | None, seed: int, steps: int, hidden: int,
              step) -> float:
  """Test accuracy of an MLP trained from scratch for `steps` SGD steps with `config` in every
  GEMM (None: float32)."""
  model = MLP(hidden, nnx.Rngs(seed))
  apply_policy(model, Policy.everywhere(config))
  train, test = images.mnist('train'), images.mnist('test')
  schedule = optax.cosine_decay_schedule(LEARNING_RATE, steps)
  optimizer = nnx.Optimizer(model, optax.sgd(schedule, momentum=MOMENTUM), wrt=nnx.Param)
  batches = pipeline.make_loader(train, batch_size=BATCH_SIZE, transform=images.small_transform,
                                 shuffle=True, seed=seed, start_step=0)
  for _ in range(steps):
    step(model, optimizer, next(batches))
  return _accuracy(model, test)


def markdown(runs: dict[str, list[float]]) -> str:
  """The study as a table: mean and spread over seeds per setting."""
  rows = ['| accumulator | chunk | estimator | test accuracy (%) mean +- std | seeds |',
          '|---|---|---|---|---|']
  for name, accs in runs.items():
    fmt, _, chunk, ste = name.split(' ')
    rows.append(f'| {fmt} | {chunk} | {ste} | {100 * np.mean(accs):.2f} +- '
                f'{100 * np.std(accs):.2f} | {len(accs)} |')
  return '\n'.join(rows) + '\n'


def study(formats, chunks, estimators, seeds: int, epochs: float, hidden: int, rounding: str,
          out: str) -> dict:
  """Trains every (setting, seed) not yet in <out>.runs.jsonl, appending each as it ends, then
  writes <out>.json and <out>.md from the runs; returns the JSON's content. Everything is checked
  before any training."""
  configs = settings(formats, chunks, estimators, rounding)
  for flag, value, least in (('seeds', seeds, 1), ('hidden', hidden, 1)):
    if value < least:
      raise ValueError(f'--{flag}={value}: must be at least {least}')
  steps = int(epochs * len(images.mnist('train')) / BATCH_SIZE) if epochs > 0 else 0
  if steps < 1:
    raise ValueError(f'--epochs={epochs}: must give at least one step of {BATCH_SIZE} of the '
                     f"{len(images.mnist('train'))} training digits")
  cli.writable('out', out)
  runs_path = out + '.runs.jsonl'
  with state.lock(out + '.state', '--out'):
    state.check_manifest(out + '.state', dict(
        epochs=epochs, hidden=hidden, rounding=rounding, batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, momentum=MOMENTUM), f'delete {runs_path} and {out}.state, '
        'or give another --out')
    done = {(r['setting'], r['seed']): r['accuracy'] for r in state.read_jsonl(runs_path)}
    step = make_train_step(_Task)  # compiled once per setting, shared by its seeds
    start = time.time()
    with open(runs_path, 'a') as f:
      for name, config in configs.items():
        for seed in range(seeds):
          if (name, seed) not in done:
            done[name, seed] = train_one(config, seed, steps, hidden, step)
            state.append_jsonl(f, dict(setting=name, seed=seed, accuracy=done[name, seed]))
        accs = [done[name, seed] for seed in range(seeds)]
        print(f'{name:<36} {100 * np.mean(accs):6.2f} +- {100 * np.std(accs):.2f}  '
              f'({time.time() - start:.0f} s)', flush=True)
    runs = {name: [done[name, seed] for seed in range(seeds)] for name in configs}
    result = {'flags': dict(formats=list(formats), chunks=list(chunks),
                            estimators=list(estimators), seeds=seeds, epochs=epochs,
                            hidden=hidden, rounding=rounding),
              'test_accuracy': runs}
    state.write_json(out + '.json', result, indent=1)
    with open(out + '.md', 'w') as f:
      f.write(markdown(runs))
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  study(FLAGS.formats, cli.integers('chunks', FLAGS.chunks), FLAGS.estimators, FLAGS.seeds,
        FLAGS.epochs, FLAGS.hidden, FLAGS.rounding, FLAGS.out)


def define_flags():
  """The command line's flags (defined only when it runs: experiments.sweep shares --out)."""
  flags.DEFINE_list('formats', ['M4E3b4', 'M3E4b10'],
                    "8-bit accumulator formats ('M<m>E<e>[b<bias>]').")
  flags.DEFINE_list('chunks', ['16', '0'], 'Chunk sizes; 0 is one chunk of the whole contraction.')
  flags.DEFINE_list('estimators', list(STES[:2]) + ['immediate_diff', 'recursive_of',
                                                    'recursive_diff', 'recursive_both'],
                    'Gradient estimators (ste=).')
  flags.DEFINE_integer('seeds', 3, 'Seeds per setting.')
  flags.DEFINE_float('epochs', 3.0, 'Training epochs over the 4000 training digits.')
  flags.DEFINE_integer('hidden', 128, 'Hidden units of the two-layer MLP.')
  flags.DEFINE_string('rounding', 'toward_zero', 'Rounding of products and accumulator.')
  flags.DEFINE_string('out', 'results/estimators', 'Output path prefix (.json, .md).')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
