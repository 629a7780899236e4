"""One trained model across a grid of accumulators: zero-shot accuracy and per-layer telemetry at
every point, and the two-stage fine-tuning at chosen points.

python -m experiments.sweep --config=configs/demo.py --model=runs/demo/models/pretrain \
    --out=results/sweep_demo --finetune=M7E4b10,M6E5,M5E4

Axes (--axes), each point otherwise config.accumulator's settings:
  width     mantissa 3..10 x exponent 3..6 (--mantissas, --exponents) at each accumulator bias
            IEEE + s for s in --bias_shifts (default 0: the IEEE bias; the paper's M7E4b10 is
            IEEE + 3), the paper's zero-shot table
  bias      M7E4 with accumulator bias 4..14 (the product bias follows, + product_bias_offset)
  chunk     M7E4b10 with chunk sizes 1..128 and one chunk of the whole contraction
  rounding  M7E4b10 with each deterministic rounding mode
  hardware  each matrix-unit preset of --presets ('arch/instruction/shape_and_type[/promote<N>]',
            `lowacc.hardware.parse`): its own input types and chain
  integer   INT<bits>w and INT<bits>s for each width of --int_widths: an integer register that
            wraps or saturates, accumulating the whole contraction (one chunk), over int8
            symmetric per-tensor inputs (experiments.train.INT_INPUTS), so products are exact
The hardware and integer axes run only when --axes names them.
--model is a model export (<workdir>/models/<phase>); empty: config.pretrained's weights.
Writes <out>.json and <out>.md; finished points are kept in <out>.points.jsonl, so a killed sweep
resumes where it stopped. <out>.state/ holds the sweep's lock and its manifest: the model's path and
content hash and every field that changes a point, so points of another model or config are
refused, never reported. Fine-tuning runs the recipe (experiments.train) per point in
<out>_finetune/<format>, which resumes as any run does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, reporting, state, train
from lowacc.formats import FloatFormat
from lowacc.nn import layer_stats, rates

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The experiment config (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('model', '', 'A model export (<workdir>/models/<phase>) to evaluate; empty: '
                    "the config's pretrained weights.")
flags.DEFINE_list('axes', ['width', 'bias', 'chunk', 'rounding'], 'Grid axes to sweep.')
flags.DEFINE_list('finetune', [], "Formats to fine-tune at with the two-stage recipe ('M6E5').")
flags.DEFINE_integer('procs', 2, 'Processes evaluating points in parallel.')
flags.DEFINE_integer('stats_examples', 32, 'Evaluation examples the per-layer telemetry runs on.')
flags.DEFINE_string('out', None, 'Output path prefix (.json, .md).')
flags.mark_flags_as_required(['config', 'out'])

flags.DEFINE_list('mantissas', [str(m) for m in range(3, 11)], 'Mantissa bits of the width axis.')
flags.DEFINE_list('exponents', ['3', '4', '5', '6'], 'Exponent bits of the width axis.')
flags.DEFINE_list('bias_shifts', ['0'], 'Accumulator biases of the width axis, as shifts from the '
                  "IEEE bias 2^(E-1)-1 (3: the paper's M7E4b10).")

# The hardware axis's default: the fp16 and bf16 units of four NVIDIA generations (fp32 and fp16
# outputs) and Hopper's FP8 wgmma, without and with DeepSeek-V3's promotion every 128 products.
PRESETS = ('Volta/mma/m8n8k4.f32.f16.f16.f32', 'Volta/mma/m8n8k4.f16.f16.f16.f16',
           'Ampere/mma/m16n8k16.f32.f16.f16.f32', 'Ampere/mma/m16n8k16.f32.bf16.bf16.f32',
           'Ampere/mma/m16n8k16.f16.f16.f16.f16',
           'Hopper/wgmma/m64n8k16.f32.f16.f16', 'Hopper/wgmma/m64n8k16.f32.bf16.bf16',
           'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3', 'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3/promote128',
           'Blackwell/tcgen05.mma/m64n8k16.f32.f16.f16',
           'Blackwell/tcgen05.mma/m64n8k16.f32.bf16.bf16')
INT_WIDTHS = (12, 14, 16, 18, 20, 22)
flags.DEFINE_list('presets', list(PRESETS), 'Matrix-unit presets of the hardware axis.')
flags.DEFINE_list('int_widths', [str(b) for b in INT_WIDTHS],
                  'Register bits of the integer axis (2..23).')


def axes(mantissas=range(3, 11), exponents=range(3, 7), presets=PRESETS,
         int_widths=INT_WIDTHS, bias_shifts=(0,)) -> dict[str, list[dict]]:
  """Each axis's points: the accumulator settings that differ from config.accumulator's."""
  mantissas, exponents, int_widths = tuple(mantissas), tuple(exponents), tuple(int_widths)
  return {
    'width': [_width_point(m, e, s) for s in bias_shifts for e in exponents for m in mantissas],
    'bias': [dict(format=f'M7E4b{b}') for b in range(4, 15)],
    'chunk': [dict(format='M7E4b10', chunk_size=c) for c in (1, 2, 4, 8, 16, 32, 64, 128, 0)],
    'rounding': [dict(format='M7E4b10', rounding=r)
                 for r in ('toward_zero', 'nearest_even', 'down', 'up')],
    'hardware': [dict(format=p) for p in presets],
    'integer': [dict(format=f'INT{b}{o}', chunk_size=0) for o in 'ws' for b in int_widths],
  }


def _width_point(man: int, exp: int, shift: int) -> dict:
  """M<man>E<exp> with the accumulator bias shifted `shift` from the IEEE one."""
  bias = f'b{2 ** (exp - 1) - 1 + shift}' if shift else ''
  return dict(format=f'M{man}E{exp}{bias}', bias_shift=shift)


def points(names, grid: dict[str, list[dict]]) -> list[dict]:
  """The float32 baseline, then every point of the named axes in order."""
  for name in names:
    if name not in grid:
      raise ValueError(f'--axes contains {name!r}: valid axes are {tuple(grid)}')
  return [dict(axis='baseline', format='float32')] + [dict(p, axis=n) for n in names
                                                       for p in grid[n]]


def check(config, wanted: list[dict], finetune_formats, procs: int, stats_examples: int) -> None:
  """Refuses, before any work, a point or --finetune format that makes no valid accumulator and
  a --procs or --stats_examples below 1."""
  for point in wanted:
    try:
      train.policy_for(configure(config, point))
    except ValueError as e:
      raise ValueError(f"--axes={point['axis']} point {point['format']}: {e}") from None
  for fmt in finetune_formats:
    if fmt == 'float32':
      raise ValueError("--finetune contains 'float32': fine-tuning needs an accumulator format "
                       "such as 'M7E4b10'")
    try:
      train.policy_for(configure(config, dict(format=fmt)))
    except ValueError as e:
      raise ValueError(f'--finetune={fmt}: {e}') from None
  for flag, value in (('procs', procs), ('stats_examples', stats_examples)):
    if value < 1:
      raise ValueError(f'--{flag}={value}: must be at least 1')


def fingerprint(path: str, what: str) -> str:
  """The SHA-256 of a file, or of a directory's relative file names and contents."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{what}={path} does not exist')
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
  digest = hashlib.sha256()
  for name in files:
    digest.update(os.path.relpath(name, path).encode() + b'\0')
    with open(name, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  return digest.hexdigest()


# Fields that change only fine-tuning (guarded by its own workdirs) or the report's title.
_NOT_IN_POINTS = ('name', 'pretrain', 'stage1', 'stage2', 'zero_shot', 'log_every_steps',
                  'checkpoint_every_steps', 'keep_checkpoints')


def manifest(config, model_path: str, stats_examples: int) -> dict:
  """Everything a point depends on: the evaluated weights (path and content hash), the config's
  fields but the training phases', and the telemetry's examples."""
  fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_POINTS + ('init_from',)}
  weights = {}  # the model evaluated: --model, else config.init_from over config.pretrained
  for name, path, flag in (('pretrained', config.pretrained, '--config.pretrained'),
                           ('model', model_path or config.init_from,
                            '--model' if model_path else '--config.init_from')):
    if path:
      weights[name] = dict(path=os.path.abspath(path), sha256=fingerprint(path, flag))
  return dict(config=fields, weights=weights, stats_examples=stats_examples)


def configure(config: ml_collections.ConfigDict, point: dict) -> ml_collections.ConfigDict:
  """config with config.accumulator set to the point's format, chunk size and rounding."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.accumulator.format = point['format']
  for field in ('chunk_size', 'rounding'):
    if field in point:
      config.accumulator[field] = point[field]
  return config


class Evaluator:
  """One model and its evaluation set; scores accumulator points."""

  def __init__(self, config_dict: dict, model_path: str, stats_examples: int):
    self.config = ml_collections.ConfigDict(config_dict)
    self.config.init_from = model_path or self.config.init_from
    self.task, self.model = train.build(self.config)
    batch = next(iter(self.task.eval_batches(self.config)))
    self.stats_batch = {k: np.asarray(v)[:stats_examples] for k, v in batch.items()}
    self.examples = self.task.eval_size(self.config)

  def __call__(self, point: dict) -> dict:
    config = configure(self.config, point)
    fmt = point['format']
    policy = train.policy_for(config)  # config.accumulator.format is the point's
    metric = train.evaluate(self.task, self.model, config, policy, fmt)
    layers = {}
    if fmt != 'float32':
      self.model.eval()
      layers = rates(layer_stats(self.model, policy, *self.task.inputs(self.stats_batch)))
      self.model.train()
    return dict(point, bits=reporting.bits(fmt), metric=metric,
                examples=self.examples, layers=layers)


_WORKER = None


def _start_worker(evaluator, *args):
  global _WORKER
  _WORKER = evaluator(*args)


def _score(point):
  return _WORKER(point)


def zero_shot(config, model_path: str, todo: list[dict], procs: int, stats_examples: int,
              done_path: str, evaluator=Evaluator, extra=()):
  """Scores the points of `todo` with `evaluator(config dict, model_path, stats_examples,
  *extra)` in `procs` processes, appending each row to done_path as it ends."""
  args = (config.to_dict(), model_path, stats_examples, *extra)
  with open(done_path, 'a') as done:
    if procs <= 1:
      scored = map(evaluator(*args), todo)
      pool = None
    else:
      pool = multiprocessing.get_context('spawn').Pool(procs, _start_worker, (evaluator, *args))
      scored = pool.imap_unordered(_score, todo)
    for row in scored:
      state.append_jsonl(done, row)
      print(f"{row['axis']:<9} {row['format']:<9} chunk={row.get('chunk_size', '-')!s:<4} "
            f"{row.get('rounding', ''):<12} {100 * row['metric']:6.2f}", flush=True)
    if pool is not None:
      pool.close()
      pool.join()


@contextlib.contextmanager
def resumed(out: str, fields: dict):
  """Holds the lock of <out>.state for the block, once points and fine-tuning workdirs that
  another model or config made (manifest `fields`) are refused with a StateError."""
  done_path = out + '.points.jsonl'
  with state.lock(out + '.state', '--out'):
    fresh = f'delete {done_path}, {out}_finetune and {out}.state, or give another --out'
    made = [p for p in (done_path, out + '_finetune') if os.path.exists(p)]
    if made and not os.path.exists(os.path.join(out + '.state', 'manifest.json')):
      raise state.StateError(f'{made[0]} has no manifest saying which model and config made it: '
                             f'{fresh}')
    state.check_manifest(out + '.state', fields, fresh)
    yield


def scored(config, model_path: str, wanted: list[dict], procs: int, stats_examples: int,
           out: str, evaluator=Evaluator, extra=()) -> list[dict]:
  """The rows of `wanted`, in order (inside `resumed(out, ...)`): those <out>.points.jsonl
  holds, and the others scored now by zero_shot, which appends them to it."""
  done_path = out + '.points.jsonl'
  done = {_key(row): row for row in state.read_jsonl(done_path)}
  todo = [p for p in wanted if _key(p) not in done]
  if todo:
    zero_shot(config, model_path, todo, procs, stats_examples, done_path, evaluator, extra)
    done = {_key(row): row for row in state.read_jsonl(done_path)}
  return [done[_key(p)] for p in wanted]


def finetune(config, model_path: str, fmt: str, workdir: str) -> dict:
  """The recipe's stages 1 and 2 at `fmt`, from the swept model; returns its results."""
  config = configure(config, dict(format=fmt))
  config.init_from = model_path or config.init_from
  config.pretrain.steps = 0
  config.zero_shot = (fmt,)
  results = train.run(config, workdir)
  return dict(format=fmt, bits=reporting.bits(fmt), baseline=results['baseline']['float32'],
              zero_shot=results['zero_shot'][fmt], stage1=results['stage1'][fmt],
              stage2=results['stage2'][fmt])


def _key(point: dict) -> str:
  return json.dumps({k: point[k] for k in sorted(point) if k in ('axis', 'format', 'chunk_size',
                                                                  'rounding')})


def markdown(config, rows: list[dict], tuned: list[dict]) -> str:
  """The sweep as tables: the width grid pivoted (mantissa x exponent), the other axes as lists.
  An accuracy shows its binomial standard error where the rows say how many examples scored it."""
  name = config.metric_name
  base = next(r for r in rows if r['axis'] == 'baseline')
  n = base.get('examples') if name == 'accuracy' else None

  def pm(metric):
    return reporting.plus_minus(metric, n and reporting.binomial_se(metric, n))

  out = [f'# {config.name}: accumulator sweep', '',
         f"float32 baseline {name}: {pm(base['metric'])}"
         + (f' ({n} examples; +- is the binomial standard error)' if n else '')]
  width = [r for r in rows if r['axis'] == 'width']
  for shift in sorted({r.get('bias_shift', 0) for r in width}):
    cells = {(f.man_bits, f.exp_bits): r['metric'] for r in width
             if r.get('bias_shift', 0) == shift for f in [FloatFormat.parse(r['format'])]}
    exps = sorted({e for _, e in cells})
    mans = sorted({m for m, _ in cells}, reverse=True)
    bias = f'IEEE bias + {shift}' if shift else 'IEEE bias'
    out += ['', f'## Zero-shot {name} (%), {bias}: mantissa bits (rows) x exponent bits',
            '', '| M \\ E | ' + ' | '.join(map(str, exps)) + ' |', '|---' * (len(exps) + 1) + '|']
    out += [f'| {m} | ' + ' | '.join(pm(cells[m, e]) if (m, e) in cells else '-'
                                     for e in exps) + ' |' for m in mans]
  for axis, field in (('bias', 'format'), ('chunk', 'chunk_size'), ('rounding', 'rounding')):
    axis_rows = [r for r in rows if r['axis'] == axis]
    if axis_rows:
      out += ['', f'## Zero-shot {name} (%) against {axis}, M7E4', '', f'| {field} | {name} |',
              '|---|---|']
      out += [f"| {r[field] if r[field] != 0 else 'none'} | {pm(r['metric'])} |"
              for r in axis_rows]
  hardware = [r for r in rows if r['axis'] == 'hardware']
  if hardware:
    out += ['', f'## Zero-shot {name} (%) under matrix-unit presets', '',
            f'| preset | {name} |', '|---|---|']
    out += [f"| {r['format']} | {pm(r['metric'])} |" for r in hardware]
  integer = {r['format']: r['metric'] for r in rows if r['axis'] == 'integer'}
  if integer:
    widths = sorted({int(f[3:-1]) for f in integer})
    out += ['', f'## Zero-shot {name} (%) of an integer accumulator over int8 inputs', '',
            '| bits | wrap | saturate |', '|---|---|---|']
    out += ['| '.join([f'| {b} '] + [f'{pm(integer[f])} ' if f in integer else '- '
                                      for f in (f'INT{b}w', f'INT{b}s')]) + '|' for b in widths]
  if tuned:
    out += ['', f'## Two-stage fine-tuning ({name}, %)', '',
            '| accumulator | bits | float32 | zero-shot | stage 1 | stage 2 |', '|---' * 6 + '|']
    out += [f"| {t['format']} | {t['bits']} | " + ' | '.join(
        pm(t[k]) for k in ('baseline', 'zero_shot', 'stage1', 'stage2')) + ' |' for t in tuned]
  return '\n'.join(out) + '\n'


def sweep(config, model_path: str, names, grid, finetune_formats, procs: int,
          stats_examples: int, out: str) -> dict:
  """Runs the sweep (resuming) and writes <out>.json and <out>.md; returns the JSON's content.

  Everything is checked before any work; <out> is locked for the run, and points that another
  model or config made are refused with a StateError naming the differing fields."""
  wanted = points(names, grid)
  check(config, wanted, finetune_formats, procs, stats_examples)
  fields = manifest(config, model_path, stats_examples)
  cli.writable('out', out)
  with resumed(out, fields):
    start = time.time()
    rows = scored(config, model_path, wanted, procs, stats_examples, out)
    tuned = [finetune(config, model_path, fmt, os.path.join(out + '_finetune', fmt))
             for fmt in finetune_formats]
    result = dict(config=config.to_dict(), model=model_path, points=rows, finetune=tuned,
                  machine=f'{os.cpu_count()} CPU cores, {jax.devices()[0].platform}',
                  seconds=round(time.time() - start))
    state.write_json(out + '.json', result, indent=1)
    with open(out + '.md', 'w') as f:
      f.write(markdown(config, rows, tuned))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  grid = axes(cli.integers('mantissas', FLAGS.mantissas),
              cli.integers('exponents', FLAGS.exponents), FLAGS.presets,
              cli.integers('int_widths', FLAGS.int_widths),
              cli.integers('bias_shifts', FLAGS.bias_shifts))
  sweep(FLAGS.config, FLAGS.model, FLAGS.axes, grid, FLAGS.finetune, FLAGS.procs,
        FLAGS.stats_examples, FLAGS.out)
  print(f'wrote {FLAGS.out}.json and {FLAGS.out}.md')


if __name__ == '__main__':
  cli.run(main)
