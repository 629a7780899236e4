"""Fine-tuning steps with the M7E4 accumulator in every GEMM, as ratios to the float32 step:
ResNet-18 (32x32 inputs, batch 32) and BERT of MiniLM-L6's size (sequence 128, batch 8); and the
time of one simulated MiniLM-L6 evaluation of 1,024 reviews.

python -m benchmarks.bench_models [--cpu-time]
"""

import argparse
import time

import numpy as np
import optax
from flax import nnx

from benchmarks.bench_core import CHUNK, FMA, best_times, machine
from lowacc.models import bert, resnet
from lowacc.nn import Policy, apply_policy


def _step(model, loss, batch, policy):
  """A compiled fine-tuning step (SGD) of a copy of `model` under `policy`, with its arguments."""
  model = nnx.clone(model)
  apply_policy(model, policy)
  optimizer = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    value, grads = nnx.value_and_grad(loss)(model, batch)
    optimizer.update(model, grads)
    return value

  return step, (model, optimizer, batch)


def _ratios(name, model, loss, batch, clock):
  t = best_times({order: _step(model, loss, batch, Policy.everywhere(cfg))
                  for order, cfg in (('float32', None), ('chunk', CHUNK), ('fma', FMA))},
                 repeats=4, clock=clock)
  return {f'{name} step {order}': dict(ratio=t[order] / t['float32']) for order in ('chunk', 'fma')}


def resnet18_step(clock=time.perf_counter):
  model = resnet.resnet18(num_classes=10, stem='cifar', rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = dict(image=rng.standard_normal((32, 32, 32, 3)).astype(np.float32),
               label=rng.integers(0, 10, 32))
  loss = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(
      m(b['image']), b['label']).mean()
  return _ratios('resnet18 32x32 b32', model, loss, batch, clock)


def bert_step(clock=time.perf_counter):
  config = bert.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536,
                           max_position_embeddings=512)
  model = bert.BertForSequenceClassification(config, 2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(0, 30522, (8, 128)).astype(np.int32),
               label=rng.integers(0, 2, 8))
  loss = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(
      m(b['input_ids']), b['label']).mean()
  return _ratios('bert minilm-size s128 b8', model, loss, batch, clock)


def minilm_eval(clock=time.perf_counter):
  """One evaluation of configs/text_minilm.py's 1,024 reviews (8 batches of 128, length 64) by
  the real MiniLM-L6 checkpoint under PAPER_M7E4 and in float32: a timing (the token ids are
  random and the new head untrained), in seconds, from each batch's best time."""
  directory = bert.minilm_checkpoint_dir()
  model = bert.BertForSequenceClassification(
      bert.BertConfig.from_json(directory / 'config.json'), 2, rngs=nnx.Rngs(0))
  bert.load_hf_bert(model, directory)
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 20000, (128, 64)).astype(np.int32)
  mask = np.ones((128, 64), np.int32)
  forward = nnx.jit(lambda m, i, a: m(i, a))
  calls = {}
  for name, cfg in (('float32', None), ('fma', FMA)):
    wired = nnx.clone(model)
    apply_policy(wired, Policy.everywhere(cfg))
    calls[name] = (forward, (wired, ids, mask))
  t = best_times(calls, repeats=2, clock=clock)
  return {'minilm-l6 eval 1024 reviews fma': dict(ratio=t['fma'] / t['float32'],
                                                  seconds=8 * t['fma'],
                                                  float32_seconds=8 * t['float32'])}


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--cpu-time', action='store_true',
                      help="time the process's CPU seconds (all threads), as bench_core does")
  cpu = parser.parse_args().cpu_time
  clock = time.process_time if cpu else time.perf_counter
  print(f'machine: {machine()}; clock: {"CPU time" if cpu else "wall"}')
  for name, r in {**resnet18_step(clock), **bert_step(clock), **minilm_eval(clock)}.items():
    print(f'{name:<34} {r["ratio"]:>8.1f} x float32' + (
        f', {r["seconds"]:.1f} s' if 'seconds' in r else ''))
