"""The paper's section-4 study: an MLP trained on real MNIST with 8-bit accumulators in every
GEMM, once per gradient estimator and seed; mean and spread of the test accuracy.

python -m experiments.estimators --out=results/estimators   (writes .json and .md)
Flags choose the formats ('M4E3,M3E4'), chunk sizes (0: one chunk), estimators, seeds, epochs;
the first row is the same MLP trained in float32 (the reference).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import ConfigDict

from experiments.train import make_train_step, parse_format
from lowacc import AccumulatorConfig
from lowacc.data import images, pipeline
from lowacc.formats import STES
from lowacc.nn import Policy, apply_policy

FLAGS = flags.FLAGS
flags.DEFINE_list('formats', ['M4E3b4', 'M3E4b10'], "8-bit accumulator formats ('M<m>E<e>[b<bias>]').")
flags.DEFINE_list('chunks', ['16', '0'], 'Chunk sizes; 0 is one chunk of the whole contraction.')
flags.DEFINE_list('estimators', list(STES[:2]) + ['immediate_diff', 'recursive_of',
                                                  'recursive_diff', 'recursive_both'],
                  'Gradient estimators (ste=).')
flags.DEFINE_integer('seeds', 3, 'Seeds per setting.')
flags.DEFINE_float('epochs', 3.0, 'Training epochs over the 4000 training digits.')
flags.DEFINE_integer('hidden', 128, 'Hidden units of the two-layer MLP.')
flags.DEFINE_string('rounding', 'toward_zero', 'Rounding of products and accumulator.')
flags.DEFINE_string('out', 'results/estimators', 'Output path prefix (.json, .md).')


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


def train_one(fmt: str, chunk: int, ste: str, seed: int, step) -> float:
  """Test accuracy of an MLP trained from scratch with the accumulator in every GEMM
  ('float32': none simulated, the reference)."""
  config = None
  if fmt != 'float32':
    acc = parse_format(fmt, ConfigDict(dict(rounding=FLAGS.rounding, underflow='flush',
                                            overflow='saturate')))
    # Products get the accumulator's widths with bias + 2, as the paper's M7E4 (10 -> 12).
    config = AccumulatorConfig(acc=acc, product=acc.replace(bias=acc.bias + 2),
                               chunk_size=chunk or None, ste=ste)
  model = MLP(FLAGS.hidden, nnx.Rngs(seed))
  apply_policy(model, Policy.everywhere(config))
  train, test = images.mnist('train'), images.mnist('test')
  batch_size = 64
  steps = int(FLAGS.epochs * len(train) / batch_size)
  schedule = optax.cosine_decay_schedule(0.05, steps)
  optimizer = nnx.Optimizer(model, optax.sgd(schedule, momentum=0.9), wrt=nnx.Param)
  batches = pipeline.make_loader(train, batch_size=batch_size, transform=images.small_transform,
                                 shuffle=True, seed=seed, start_step=0)
  for _ in range(steps):
    step(model, optimizer, next(batches))
  return _accuracy(model, test)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  runs = {}
  start = time.time()
  step = make_train_step(_Task)  # compiled once per setting, shared by its seeds
  settings = itertools.product(FLAGS.formats, map(int, FLAGS.chunks), FLAGS.estimators)
  for fmt, chunk, ste in [('float32', 0, 'identity')] + list(settings):
    accs = [train_one(fmt, chunk, ste, seed, step) for seed in range(FLAGS.seeds)]
    runs[f'{fmt} chunk {chunk or "none"} {ste}'] = accs
    print(f'{fmt} chunk={chunk or "none"} {ste:<15} {100 * np.mean(accs):6.2f} '
          f'+- {100 * np.std(accs):.2f}  ({time.time() - start:.0f} s)', flush=True)
  os.makedirs(os.path.dirname(FLAGS.out) or '.', exist_ok=True)
  with open(FLAGS.out + '.json', 'w') as f:
    json.dump({'flags': {k: FLAGS[k].value for k in ('formats', 'chunks', 'estimators', 'seeds',
                                                     'epochs', 'hidden', 'rounding')},
               'test_accuracy': runs}, f, indent=1)
  rows = ['| accumulator | chunk | estimator | test accuracy (%) mean +- std | seeds |',
          '|---|---|---|---|---|']
  for name, accs in runs.items():
    fmt, _, chunk, ste = name.split(' ')
    rows.append(f'| {fmt} | {chunk} | {ste} | {100 * np.mean(accs):.2f} +- '
                f'{100 * np.std(accs):.2f} | {len(accs)} |')
  with open(FLAGS.out + '.md', 'w') as f:
    f.write('\n'.join(rows) + '\n')


if __name__ == '__main__':
  app.run(main)
