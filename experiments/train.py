"""The paper's recipe as a library: create a model, load pretrained weights, evaluate in float32 and
zero-shot under a sweep of accumulators, fine-tune in two stages (underflow off, then on), report.

`run(config, workdir)` executes the phases in order:
  pretrain   float32 training from scratch (only when config.pretrain.steps > 0: the offline demo)
  baseline   float32 evaluation
  zero_shot  evaluation under each accumulator of config.zero_shot (no training)
  stage1     fine-tuning with config.accumulator and underflow 'none', then evaluation
  stage2     fine-tuning with underflow config.accumulator.underflow, then evaluation
A phase with 0 steps is skipped; a finished training phase exports its model to
<workdir>/models/<phase> (what `config.init_from` and experiments.sweep load).

Resuming. The whole config is checked before any work, and the workdir, locked for the run,
records the fields that change results (manifest.json) and refuses another config. Finished
phases' results are read back from results.json, never recomputed. A training phase is finished
when its export exists; an unfinished one resumes from its newest intact checkpoint (orbax, every
config.checkpoint_every_steps: model, optimizer, phase, step; an unreadable one is passed over
with a warning, and replaced when the run saves that step again), or else starts over from the
export of the training phase before it (or the built model). A phase whose starting model is gone is refused. A NaN or inf loss
stops the run (ValueError naming phase and step) before it is logged or checkpointed.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import reporting, state, tasks
from lowacc import AccumulatorConfig, FloatFormat, IntFormat, IntQuant, hardware
from lowacc.formats import PAPER_FP8_INPUT
from lowacc.nn import Policy, apply_policy

PHASES = ('pretrain', 'baseline', 'zero_shot', 'stage1', 'stage2')
TRAIN_PHASES = ('pretrain', 'stage1', 'stage2')
OPTIMIZERS = ('sgd', 'adamw')
# Config fields that do not change a workdir's results: a run may resume with other values.
NOT_IN_MANIFEST = ('name', 'metric_name', 'log_every_steps', 'checkpoint_every_steps',
                   'keep_checkpoints', 'data.eval_batch_size')


# The operands of an integer accumulator: int8, symmetric, one float scale per tensor (max|x|/127).
INT_INPUTS = IntQuant(8, 'per_tensor')


def parse_format(name: str, acc: ml_collections.ConfigDict) -> FloatFormat:
  """'M7E4' or 'M7E4b10' (the paper's notation) with the modes of config.accumulator."""
  return FloatFormat.parse(name, rounding=acc.rounding, underflow=acc.underflow,
                           overflow=acc.overflow)


def accumulator_config(acc: ml_collections.ConfigDict, fmt: str | None = None):
  """The AccumulatorConfig of config.accumulator, or of format `fmt` with the same settings.

  'float32' is no simulation (None). A name with '/' is a hardware preset
  (`lowacc.hardware.parse`, e.g. 'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3'), which brings its own
  input types and chain and takes only acc.ste. 'INT<bits>w' or 'INT<bits>s' is an integer
  accumulator (`IntFormat`, wrap or saturate) over INT_INPUTS, so that products are exact
  integers, with acc's chunk_size, order, combine and ste (acc.product and acc.fp8_inputs do not
  apply). With acc.product, a float format's products are rounded to the accumulator's widths
  with bias + acc.product_bias_offset (the paper: 12 = 10 + log2(16) / 2).
  """
  name = fmt or acc.format
  if name == 'float32':
    return None
  if '/' in name:
    return hardware.parse(name).replace(ste=acc.ste)
  if name.startswith('INT'):
    return AccumulatorConfig(acc=IntFormat.parse(name), chunk_size=acc.chunk_size or None,
                             order=acc.order, combine=acc.combine, ste=acc.ste, lhs=INT_INPUTS,
                             rhs=INT_INPUTS)
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


def _integer(low):
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
          f'an integer >= {low}')


def _real(low, high=math.inf, below=False):
  top = f'< {high}' if below else f'<= {high}'
  return (lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     and low <= v and (v < high if below else v <= high)),
          f'a finite number >= {low}' + ('' if high == math.inf else f' and {top}'))


# What check_config requires of each field the recipe reads: (test, what is valid).
_PHASE_FIELDS = {
    'steps': (_integer(-1)[0], 'an integer >= -1 (-1: from epochs)'), 'epochs': _real(0),
    'learning_rate': _real(0), 'warmup_steps': _integer(0), 'final_lr_fraction': _real(0, 1),
    'optimizer': (lambda v: v in OPTIMIZERS, f'one of {OPTIMIZERS}'),
    'momentum': _real(0, 1, below=True), 'weight_decay': _real(0)}
_FIELDS = {
    'seed': _integer(0), 'log_every_steps': _integer(1), 'checkpoint_every_steps': _integer(1),
    'keep_checkpoints': (_integer(0)[0], 'an integer >= 0 (0: none, a killed phase starts over)'),
    'data.batch_size': _integer(1), 'data.eval_batch_size': _integer(1),
    'data.max_train_examples': _integer(0), 'data.max_eval_examples': _integer(0),
    'zero_shot': (lambda v: isinstance(v, (tuple, list)) and all(isinstance(f, str) for f in v),
                  "a tuple of format names, e.g. ('float32', 'M7E4b10')"),
    **{f'{phase}.{k}': v for phase in TRAIN_PHASES for k, v in _PHASE_FIELDS.items()}}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of `config` and what is valid: every field
  the recipe reads, every zero-shot format and the accumulator's settings, before any model or
  data is built."""
  for name, (valid, what) in _FIELDS.items():
    value = config
    for key in name.split('.'):
      value = value[key]
    if not valid(value):
      raise ValueError(f'config.{name}={value!r} is invalid: it must be {what}')
  tasks.create(config)
  named = [('config.accumulator', config.accumulator.format)]
  for field, fmt in named + [('config.zero_shot entry', fmt) for fmt in config.zero_shot]:
    try:
      policy_for(config, fmt).with_underflow('none')
    except ValueError as e:
      raise ValueError(f'{field} {fmt!r}: {e}') from None


def manifest(config: ml_collections.ConfigDict) -> dict:
  """The fields of `config` that change a workdir's results: all but NOT_IN_MANIFEST."""
  fields = config.to_dict()
  for name in NOT_IN_MANIFEST:
    *parents, leaf = name.split('.')
    parent = fields
    for key in parents:
      parent = parent[key]
    del parent[leaf]
  return fields


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
  the pretrained weights, or config.init_from's export where one is given (it holds the whole
  state, so the model is then built abstractly, sparing its initialisers' compilation)."""
  task = tasks.create(config)
  task.check(config)
  if config.init_from:
    model = nnx.eval_shape(lambda: task.create_model(nnx.Rngs(config.seed)))
    load_model(model, config.init_from)
    return task, model
  model = task.create_model(nnx.Rngs(config.seed))
  if config.pretrained:
    task.load_pretrained(model, config.pretrained)
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
  """One run's state: task, model, mesh, workdir outputs, and which phase's model the model holds."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = workdir
    self.task, self.model = build(config)
    state.check_manifest(workdir, manifest(config),
                         fresh='give another --workdir (or delete this one) to start afresh')
    self.holds = None  # the training phase whose exported model self.model is; None: as built
    self.mesh = jax.make_mesh((jax.device_count(),), ('data',),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.results = reporting.load_results(workdir)
    self.log = reporting.MetricLog(workdir)
    self.checkpoints = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))

  def close(self):
    self.checkpoints.close()
    self.log.close()

  # -- data parallel placement ------------------------------------------------------------------

  def replicate(self, tree):
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def shard(self, batch):
    sharding = NamedSharding(self.mesh, P('data'))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  # -- the models phases start from -------------------------------------------------------------

  def export_path(self, phase: str) -> str:
    return os.path.join(self.workdir, 'models', phase)

  def trained(self, phase: str) -> bool:
    """Whether training phase `phase` is finished (its model exported, or its results saved)."""
    return phase in self.results or os.path.isdir(self.export_path(phase))

  def source(self, phase: str) -> str | None:
    """The training phase whose model `phase` starts from: the last one before it that has steps
    (None: the built model, with config.pretrained or config.init_from)."""
    before = [p for p in TRAIN_PHASES if PHASES.index(p) < PHASES.index(phase)
              and self.phase_steps(p)]
    return before[-1] if before else None

  def use(self, phase: str | None) -> None:
    """Makes self.model the model that finished training phase `phase` exported."""
    if phase == self.holds:
      return
    path = self.export_path(phase)
    if not os.path.isdir(path):
      raise state.StateError(f'{self.workdir}: phase {phase!r} is finished but its model {path} '
                             'is missing, and the phases after it start from it: put it back, or '
                             'give another --workdir to start afresh')
    load_model(self.model, path)
    nnx.update(self.model, self.replicate(nnx.state(self.model)))
    self.holds = phase

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
    else:  # 'adamw' (check_config allows only OPTIMIZERS)
      tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    return nnx.Optimizer(self.model, tx, wrt=nnx.Param)

  def save(self, phase: str, step: int, optimizer):
    """Checkpoints model and optimizer, replacing a checkpoint of the same number (one that
    restore found unreadable, or one of a run that went further before this one recomputed it)."""
    state_ = nnx.to_pure_dict(nnx.state((self.model, optimizer)))
    number = self.global_step(phase, step)
    if number in self.checkpoints.all_steps():
      self.checkpoints.delete(number)
    self.checkpoints.save(
        number,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state_),
                                meta=ocp.args.JsonSave({'phase': phase, 'step': step})),
        force=True)
    self.checkpoints.wait_until_finished()

  def global_step(self, phase: str, step: int) -> int:
    """Checkpoint numbers increase across phases: the steps of earlier phases plus `step`."""
    before = TRAIN_PHASES[:TRAIN_PHASES.index(phase)]
    return sum(self.phase_steps(p) for p in before) + step

  def restore(self, phase: str, optimizer) -> int:
    """Restores model and optimizer from the newest intact checkpoint of `phase` and returns its
    step (0: none); each unreadable one is passed over with a warning that names it."""
    first, last = self.global_step(phase, 0), self.global_step(phase, self.phase_steps(phase))
    live = nnx.state((self.model, optimizer))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(live))
    for number in sorted(self.checkpoints.all_steps(), reverse=True):
      if not first < number <= last:
        continue
      try:
        saved = self.checkpoints.restore(number, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        if saved['meta'] != {'phase': phase, 'step': number - first}:
          raise ValueError(f"its metadata {saved['meta']} is not {phase!r} step {number - first}")
        nnx.replace_by_pure_dict(live, saved['state'])
        nnx.update((self.model, optimizer), live)
        return number - first
      except (ValueError, OSError) as e:
        logging.warning('checkpoint %d in %s is unreadable (%s): falling back to the one before',
                        number, self.checkpoints.directory, str(e).splitlines()[0][:300])
    return 0

  def train(self, phase: str, policy: Policy):
    """Trains `phase` to its end, from its newest intact checkpoint or else from its start on the
    model it starts from, and exports the model."""
    steps = self.phase_steps(phase)
    apply_policy(self.model, policy)
    optimizer = self.optimizer(phase, steps)
    start = self.restore(phase, optimizer)
    if start:
      print(f'{phase}: resuming at step {start} of {steps}')
    else:  # a fresh optimizer's state does not depend on the weights
      self.use(self.source(phase))
    self.log.rewind(self.global_step(phase, start))
    nnx.update((self.model, optimizer), self.replicate(nnx.state((self.model, optimizer))))
    config = self.config
    train_step = make_train_step(self.task)
    batches = self.task.train_batches(config, seed=config.seed + TRAIN_PHASES.index(phase),
                                      start_step=start)
    with tqdm.tqdm(total=steps, initial=start, desc=phase, unit='step') as bar:
      for step in range(start, steps):
        metrics = train_step(self.model, optimizer, self.shard(next(batches)))
        bar.update(1)
        done = step + 1
        loss = float(metrics['loss'])
        if not math.isfinite(loss):
          raise ValueError(f'{phase} diverged: the loss is {loss} at step {done} of {steps}, so '
                           f'nothing of {phase} is kept or reported; lower '
                           f'config.{phase}.learning_rate (in another --workdir)')
        if done % config.log_every_steps == 0 or done == steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          bar.set_postfix(loss=f'{loss:.4f}')
          self.log.write(phase, self.global_step(phase, done), metrics)
        if config.keep_checkpoints and (done % config.checkpoint_every_steps == 0 or done == steps):
          self.save(phase, done, optimizer)
    export_model(self.model, self.export_path(phase))
    self.holds = phase

  # -- the recipe -------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    """Computes the phases that results.json lacks, saving it after each."""
    config = self.config
    stage = policy_for(config)
    policies = {'pretrain': _float32_policy(), 'stage1': stage.with_underflow('none'),
                'stage2': stage.with_underflow(config.accumulator.underflow)}
    for phase in PHASES:
      if phase in TRAIN_PHASES:
        if not self.phase_steps(phase):
          continue
        if not self.trained(phase):
          self.train(phase, policies[phase])
      if phase in self.results:
        continue
      if phase == 'pretrain':
        result = {'steps': self.phase_steps(phase)}
      elif phase == 'baseline':
        self.use(self.source(phase))
        result = {'float32': self.evaluate(_float32_policy(), 'float32')}
      elif phase == 'zero_shot':
        self.use(self.source(phase))
        result = {fmt: self.evaluate(policy_for(config, fmt), fmt) for fmt in config.zero_shot}
      else:
        self.use(phase)
        result = {config.accumulator.format: self.evaluate(policies[phase], phase)}
      self.results[phase] = result
      reporting.save_results(self.workdir, config, self.results)
    return self.results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the recipe; returns and writes results.json, results.md, accuracy.png.

  An invalid config is a ValueError before anything is written; a workdir in use by another run,
  or holding another config's results, a StateError.
  """
  check_config(config)
  start = time.time()
  # One process of a multi-host run locks: the others share its workdir.
  with state.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    r = _Run(config, workdir)
    try:
      results = r.run()
    finally:
      r.close()
    reporting.write_report(workdir, config, results)
  print(f'finished in {time.time() - start:.0f} s; results in {workdir}')
  return results
