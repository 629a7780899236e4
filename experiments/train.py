"""The paper's recipe as a library: create a model, load pretrained weights, evaluate in float32 and
zero-shot under a sweep of accumulators, fine-tune in two stages (underflow off, then on), report.

`run(config, workdir)` executes the phases in order:
  pretrain   float32 training from scratch (only when config.pretrain.steps > 0: the offline demo)
  baseline   float32 evaluation
  zero_shot  evaluation under each accumulator of config.zero_shot (no training)
  stage1     fine-tuning with config.accumulator and underflow 'none', then evaluation
  stage2     fine-tuning with underflow config.accumulator.underflow, then evaluation
A phase with 0 steps is skipped; a finished training phase exports its model to
<workdir>/models/<phase> (what `config.init_from` and experiments.sweep load). Training phases
checkpoint with orbax every config.checkpoint_every_steps (model, optimizer, phase, step); a
restarted run continues from the last checkpoint with nothing lost, and finished phases are read
back from results.json.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import reporting, tasks
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.formats import PAPER_FP8_INPUT
from lowacc.nn import Policy, apply_policy

TRAIN_PHASES = ('pretrain', 'stage1', 'stage2')


def parse_format(name: str, acc: ml_collections.ConfigDict) -> FloatFormat:
  """'M7E4' or 'M7E4b10' (the paper's notation) with the modes of config.accumulator."""
  match = re.fullmatch(r'M(\d+)E(\d+)(?:b(-?\d+))?', name)
  if not match:
    raise ValueError(f"accumulator format {name!r} is invalid: expected 'M<man>E<exp>' or "
                     "'M<man>E<exp>b<bias>', e.g. 'M7E4b10'")
  man, exp, bias = int(match[1]), int(match[2]), match[3]
  return FloatFormat(exp, man, None if bias is None else int(bias), rounding=acc.rounding,
                     underflow=acc.underflow, overflow=acc.overflow)


def accumulator_config(acc: ml_collections.ConfigDict, fmt: str | None = None):
  """The AccumulatorConfig of config.accumulator, or of format `fmt` with the same settings.

  'float32' is no simulation (None). With acc.product, products are rounded to the accumulator's
  widths with bias + acc.product_bias_offset (the paper: 12 = 10 + log2(16) / 2).
  """
  name = fmt or acc.format
  if name == 'float32':
    return None
  acc_fmt = parse_format(name, acc)
  product = acc_fmt.replace(bias=acc_fmt.bias + acc.product_bias_offset) if acc.product else None
  inputs = PAPER_FP8_INPUT if acc.fp8_inputs else None
  return AccumulatorConfig(acc=acc_fmt, product=product, chunk_size=acc.chunk_size or None,
                           order=acc.order, combine=acc.combine, ste=acc.ste, lhs=inputs,
                           rhs=inputs)


def policy_for(config: ml_collections.ConfigDict, fmt: str | None = None) -> Policy:
  """Which layers simulate the accumulator: all but config.accumulator.skip (and the attention
  products when config.accumulator.attention is False)."""
  acc = config.accumulator
  skip = tuple(acc.skip) + (() if acc.attention else tuple(tasks.ATTENTION_PATTERNS))
  return Policy.everywhere(accumulator_config(acc, fmt), skip=skip)


def _float32_policy():
  return Policy.everywhere(None)


def export_model(model: nnx.Module, path: str) -> None:
  """Writes the model's state (weights, batch statistics) to the directory `path`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), nnx.to_pure_dict(nnx.state(model)), force=True)
  checkpointer.wait_until_finished()


def load_model(model: nnx.Module, path: str) -> None:
  """Replaces the model's state with the one `export_model` wrote to `path`."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'model export {path!r} does not exist: give a <workdir>/models/<phase> '
                            'directory that a finished training phase wrote')
  state = nnx.state(model)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)
  except (ValueError, KeyError) as e:
    raise ValueError(f'model export {path!r} does not fit this model: {e}') from e
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)


def build(config: ml_collections.ConfigDict):
  """(task, model) of a config: checked before any work (missing data, weights, tokenizer), with
  the pretrained weights and then config.init_from loaded."""
  task = tasks.create(config)
  task.check(config)
  model = task.create_model(nnx.Rngs(config.seed))
  if config.pretrained:
    task.load_pretrained(model, config.pretrained)
  if config.init_from:
    load_model(model, config.init_from)
  return task, model


def evaluate(task, model, config, policy: Policy, label: str, place=lambda batch: batch) -> float:
  """The task's metric of `model` on the evaluation set with the accumulators of `policy`."""
  apply_policy(model, policy)
  model.eval()
  totals: dict[str, float] = {}
  step = nnx.jit(task.eval_metrics)
  for batch in tqdm.tqdm(task.eval_batches(config), desc=f'eval {label}', unit='batch',
                         leave=False):
    for k, v in jax.device_get(step(model, place(batch))).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  model.train()
  return task.summarize(totals)


def make_train_step(task):
  """A jitted SGD step: (model, optimizer, batch) -> metrics, updating model and optimizer."""

  @nnx.jit
  def train_step(model, optimizer, batch):
    (loss, metrics), grads = nnx.value_and_grad(task.loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return dict(metrics, loss=loss)

  return train_step


class _Run:
  """One run's state: task, model, mesh, workdir outputs."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = workdir
    self.task, self.model = build(config)
    self.mesh = jax.make_mesh((jax.device_count(),), ('data',),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.log = reporting.MetricLog(workdir)
    self.results = reporting.load_results(workdir)
    self.checkpoints = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))

  # -- data parallel placement ------------------------------------------------------------------

  def replicate(self, tree):
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def shard(self, batch):
    sharding = NamedSharding(self.mesh, P('data'))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  # -- evaluation -------------------------------------------------------------------------------

  def evaluate(self, policy: Policy, label: str) -> float:
    return evaluate(self.task, self.model, self.config, policy, label, place=self.shard)

  # -- training ---------------------------------------------------------------------------------

  def phase_steps(self, phase: str) -> int:
    cfg = self.config[phase]
    if cfg.steps >= 0:
      return cfg.steps
    return math.ceil(cfg.epochs * self.task.train_size(self.config) / self.config.data.batch_size)

  def optimizer(self, phase: str, steps: int):
    cfg = self.config[phase]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, min(cfg.warmup_steps, max(steps - 1, 0)), max(steps, 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction)
    if cfg.optimizer == 'sgd':
      tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(schedule, momentum=cfg.momentum, nesterov=True))
    elif cfg.optimizer == 'adamw':
      tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    else:
      raise ValueError(f"config.{phase}.optimizer={cfg.optimizer!r} is invalid: valid values are "
                       "'sgd', 'adamw'")
    return nnx.Optimizer(self.model, tx, wrt=nnx.Param)

  def save(self, phase: str, step: int, optimizer):
    state = nnx.to_pure_dict(nnx.state((self.model, optimizer)))
    self.checkpoints.save(
        self.global_step(phase, step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave({'phase': phase, 'step': step})),
        force=True)
    self.checkpoints.wait_until_finished()

  def global_step(self, phase: str, step: int) -> int:
    """Checkpoint numbers increase across phases: the steps of earlier phases plus `step`."""
    before = TRAIN_PHASES[:TRAIN_PHASES.index(phase)]
    return sum(self.phase_steps(p) for p in before) + step

  def last_checkpoint(self):
    """(phase, step) of the newest checkpoint, or None."""
    latest = self.checkpoints.latest_step()
    if latest is None:
      return None
    meta = self.checkpoints.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return meta['meta']['phase'], meta['meta']['step']

  def restore(self, optimizer) -> None:
    """Model and optimizer state from the newest checkpoint."""
    latest = self.checkpoints.latest_step()
    state = nnx.state((self.model, optimizer))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    try:
      restored = self.checkpoints.restore(
          latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError) as e:
      raise ValueError(f'checkpoint {latest} in {self.workdir} does not fit this model '
                       f'(config.model={dict(self.config.model)}): {e}. Use a new --workdir.') from e
    nnx.replace_by_pure_dict(state, restored['state'])
    nnx.update((self.model, optimizer), state)

  def train(self, phase: str, policy: Policy, resume_step: int):
    """Trains `phase` from `resume_step` (restoring its checkpoint when > 0) to its end."""
    steps = self.phase_steps(phase)
    apply_policy(self.model, policy)
    optimizer = self.optimizer(phase, steps)
    start = resume_step
    if start:
      self.restore(optimizer)
    nnx.update((self.model, optimizer), self.replicate(nnx.state((self.model, optimizer))))
    task = self.task
    train_step = make_train_step(task)
    batches = task.train_batches(self.config, seed=self.config.seed + TRAIN_PHASES.index(phase),
                                 start_step=start)
    bar = tqdm.tqdm(total=steps, initial=start, desc=phase, unit='step')
    for step in range(start, steps):
      metrics = train_step(self.model, optimizer, self.shard(next(batches)))
      bar.update(1)
      done = step + 1
      if done % self.config.log_every_steps == 0 or done == steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        self.log.write(phase, self.global_step(phase, done), metrics)
      if done % self.config.checkpoint_every_steps == 0 or done == steps:
        self.save(phase, done, optimizer)
    bar.close()
    export_model(self.model, os.path.join(self.workdir, 'models', phase))


_PHASES = ('pretrain', 'baseline', 'zero_shot', 'stage1', 'stage2')


def _order(phase: str) -> int:
  return _PHASES.index(phase)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the recipe; returns and writes results.json, results.md, accuracy.png."""
  os.makedirs(workdir, exist_ok=True)
  r = _Run(config, workdir)
  start = time.time()
  stage_policy = policy_for(config)
  policies = {'pretrain': _float32_policy(), 'stage1': stage_policy.with_underflow('none'),
              'stage2': stage_policy.with_underflow(config.accumulator.underflow)}
  phases = [(phase, policies.get(phase)) for phase in _PHASES]
  last = r.last_checkpoint()
  if last is not None:  # a restart: the model is its newest checkpoint
    r.restore(r.optimizer(last[0], r.phase_steps(last[0])))
  for phase, policy in phases:
    trains = phase in TRAIN_PHASES
    if phase in r.results or (trains and r.phase_steps(phase) == 0):
      continue
    if last is not None and _order(last[0]) > _order(phase):
      raise ValueError(f'{workdir} has a checkpoint of phase {last[0]!r} but no results of '
                       f'{phase!r} before it (results.json removed?): use a new --workdir')
    if phase == 'baseline':
      r.results[phase] = {'float32': r.evaluate(_float32_policy(), 'float32')}
    elif phase == 'zero_shot':
      r.results[phase] = {fmt: r.evaluate(policy_for(config, fmt), fmt) for fmt in config.zero_shot}
    else:
      r.train(phase, policy, resume_step=last[1] if last and last[0] == phase else 0)
      r.results[phase] = ({'steps': r.phase_steps(phase)} if phase == 'pretrain' else
                          {config.accumulator.format: r.evaluate(policy, phase)})
    reporting.save_results(workdir, config, r.results)
    r.log.write(phase, 0, {'done': 1.0})
  r.checkpoints.close()
  r.log.close()
  reporting.write_report(workdir, config, r.results)
  print(f'finished in {time.time() - start:.0f} s; results in {workdir}')
  return r.results
