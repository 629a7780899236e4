"""An image classifier zero-shot under accumulators, measured against its own float32 self on
label-free inputs: EfficientNet-Lite0 on every offline photo's crops and flips.

python -m experiments.agreement --config=configs/imagenet_efficientnet.py \
    --out=results/agreement_lite0 [--inputs=108] [--formats=M7E4b10,M6E5] [--stats_examples=2]

Per accumulator format (the float32 baseline first, then --formats, by default the paper's width
grid, M10 down to M4 with 5 and 4 exponent bits at the IEEE bias, and with 4 at the paper's
bias 10; products at bias + config.accumulator.product_bias_offset), on the first --inputs
label-free views (lowacc.data.photo_views, which cover the 27 photos evenly):
  top1       top-1 on the labelled photos' first views (their Lite eval crops: on the 20
             ImageNet photos once --inputs reaches 27), with its binomial standard error;
  agreement  the fraction of views whose top-1 class is the float32 model's;
  kl         the mean over the views of KL(float32 softmax || simulated softmax), in nats;
             both with standard errors clustered by photo (the views of one photo are not
             independent) and, as `*_se_iid`, as if every view were;
  counters   at the --stats_formats, per-layer telemetry (lowacc.nn.layer_stats) on the first
             --stats_examples views, each layer with its contraction length K (k * k for a
             depthwise conv, C for a 1x1 conv).
Resuming and refusing are experiments.sweep's: finished points are kept in <out>.points.jsonl
as each ends, so a killed run resumes where it stopped, and <out>.state/manifest.json (the
weights' hash, every config field that changes a point, --inputs, --stats_examples and
--stats_formats) refuses the points of another config in one line. Writes <out>.json and
<out>.md.
"""

from __future__ import annotations

import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from experiments import cli, reporting, state, sweep, tasks, train
from lowacc.data import photo_views
from lowacc.nn import Policy, apply_policy, layer_stats

FLAGS = flags.FLAGS
MANTISSAS = range(10, 3, -1)
# Row by row of the table (M10 first), so that a run cut short has its widest rows complete.
FORMATS = tuple(f for m in MANTISSAS for f in (f'M{m}E5', f'M{m}E4', f'M{m}E4b10'))
flags.DEFINE_list('formats', list(FORMATS), "Accumulator formats ('M7E4b10', 'M6E5', ...).")
flags.DEFINE_list('stats_formats', ['M7E4b10', 'M7E4', 'M7E5', 'M5E5'],
                  'Formats at which the per-layer telemetry is taken (each costs a compilation).')
flags.DEFINE_integer('inputs', 0, 'How many label-free views to score (0: all 1,944); the first '
                     'views cover the photos evenly.')
# experiments.sweep's flags that have no meaning here.
_SWEEP_ONLY = ('axes', 'finetune', 'mantissas', 'exponents', 'presets', 'int_widths')


def points(formats) -> list[dict]:
  """The float32 baseline, then one point per format."""
  return [dict(axis='baseline', format='float32')] + [dict(axis='zero_shot', format=f)
                                                      for f in formats]


def check(config, model_path: str, wanted: list[dict], inputs: int, procs: int,
          stats_examples: int, stats_formats) -> None:
  """Refuses, before any work, a format that makes no valid accumulator, a config whose model or
  data cannot give the views, and --inputs, --procs, --stats_examples or --stats_formats out of
  range."""
  sweep.check(config, wanted, (), procs, stats_examples)
  available, photos = len(photo_views.photo_views()), len(photo_views.natural_photos())
  if inputs and not photos <= inputs <= available:
    raise ValueError(f'--inputs={inputs}: must be 0 (all {available} views) or {photos}..'
                     f'{available} (at least one view of each of the {photos} photos)')
  if stats_formats and stats_examples > (inputs or available):
    raise ValueError(f'--stats_examples={stats_examples}: must be at most --inputs '
                     f'({inputs or available})')
  formats = [p['format'] for p in wanted]
  for fmt in stats_formats:
    if fmt not in formats:
      raise ValueError(f'--stats_formats contains {fmt!r}, which is not among --formats')
  views = _views_config(config, inputs, model_path)
  tasks.create(views).check(views)


def _views_config(config, inputs: int, model_path: str) -> ml_collections.ConfigDict:
  """config with the label-free views as its evaluation data and model_path as its init_from."""
  views = ml_collections.ConfigDict(config.to_dict())
  views.data.name = 'photo_views'
  views.data.max_eval_examples = inputs
  views.init_from = model_path or views.init_from
  return views


def contraction_lengths(model: nnx.Module) -> dict[str, int]:
  """Layer path -> K, the products summed per output: kernel area x input channels per group
  for a Conv, input features for a Linear."""
  lengths = {}
  for path, module in nnx.iter_modules(model):
    name = '/'.join(map(str, path))
    if isinstance(module, nnx.Conv):
      lengths[name] = math.prod(module.kernel_size) * module.in_features // \
          module.feature_group_count
    elif isinstance(module, nnx.Linear):
      lengths[name] = module.in_features
  return lengths


def clustered_se(x: np.ndarray, groups: np.ndarray) -> float:
  """The standard error of mean(x) with the examples of one group correlated (the cluster-robust
  sandwich estimate, with the small-sample factor G / (G - 1))."""
  labels = np.unique(groups)
  if len(labels) < 2:
    return float('nan')
  sums = np.array([np.sum(x[groups == g] - x.mean()) for g in labels])
  return float(math.sqrt(len(labels) / (len(labels) - 1) * np.sum(sums ** 2)) / len(x))


def _iid_se(x: np.ndarray) -> float:
  return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float('nan')


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits.astype(np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Agreement:
  """One model and the label-free views; scores accumulator points against the model's float32
  logits (computed once, at construction). Top-1 is taken on the views that are a labelled
  photo's first view, its eval crop, so one pass gives every measure."""

  def __init__(self, config_dict: dict, model_path: str, stats_examples: int, inputs: int,
               stats_formats=()):
    self.config = _views_config(ml_collections.ConfigDict(config_dict), inputs, model_path)
    self.task, self.model = train.build(self.config)
    self.lengths = contraction_lengths(self.model)
    self.stats_formats = set(stats_formats)
    self.reference = self._logits(Policy.everywhere(None), stats_examples if stats_formats else 0)
    self.stats_images = self.reference.pop('image')

  def _logits(self, policy: Policy, images: int = 0) -> dict[str, np.ndarray]:
    """The logits, label, view and photo of every view, through one jitted forward pass of the
    model under `policy`, and the first `images` views' images."""
    apply_policy(self.model, policy)
    self.model.eval()
    forward = nnx.jit(lambda model, images: model(images))
    parts: dict[str, list] = {}
    for batch in self.task.eval_batches(self.config):
      valid = np.asarray(batch['valid']) > 0
      parts.setdefault('logits', []).append(np.asarray(forward(self.model, batch['image']))[valid])
      for key in ('label', 'view', 'photo', 'image'):
        if key != 'image' or sum(map(len, parts.get('image', []))) < images:
          parts.setdefault(key, []).append(np.asarray(batch[key])[valid])
    self.model.train()
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out['image'] = out['image'][:images] if 'image' in out else np.zeros((0,), np.float32)
    return out

  def __call__(self, point: dict) -> dict:
    fmt = point['format']
    policy = train.policy_for(sweep.configure(self.config, point))
    ref = self.reference
    sim = ref if fmt == 'float32' else self._logits(policy)
    top = sim['logits'].argmax(-1)
    labelled = (ref['view'] == 0) & (ref['label'] != photo_views.NO_LABEL)
    correct = (top[labelled] == ref['label'][labelled]).astype(np.float64)
    top1 = float(correct.mean())
    agree = (top == ref['logits'].argmax(-1)).astype(np.float64)
    log_p, log_q = _log_softmax(ref['logits']), _log_softmax(sim['logits'])
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    row = dict(point, bits=reporting.bits(fmt), metric=top1, top1=top1,
               top1_se=reporting.binomial_se(top1, len(correct)), labelled=len(correct),
               inputs=len(agree), photos=len(np.unique(ref['photo'])))
    for name, x in (('agreement', agree), ('kl', kl)):
      row[name] = float(x.mean())
      row[f'{name}_se'] = clustered_se(x, ref['photo'])
      row[f'{name}_se_iid'] = _iid_se(x)
    row['counters'] = {}
    if fmt in self.stats_formats:
      stats = layer_stats(self.model, policy, self.stats_images)
      row['counters'] = {name: dict(s, K=self.lengths.get(name.split('#')[0]))
                         for name, s in stats.items()}
    # NaN (a simulated logit that is not finite) is not JSON: it is reported as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


# Layer kinds of EfficientNet-Lite, by the end of the layer's path.
KINDS = (('depthwise', 'depthwise_conv'), ('1x1 expansion', 'expand_conv'),
         ('1x1 projection', 'project_conv'), ('stem', 'conv_stem'), ('head 1x1', 'conv_head'),
         ('classifier', 'fc'))


def by_kind(counters: dict[str, dict]) -> dict[str, dict]:
  """Counters summed over the layers of each kind and contraction length K ('depthwise K=9'):
  the rates of sat, lost and flush per accumulation step, the saturated steps, and the layers'
  mean relative error of the output against the float32 dot."""
  groups: dict[str, dict] = {}
  for name, s in counters.items():
    kind = next((k for k, suffix in KINDS if name.split('#')[0].endswith(suffix)), 'other')
    key = f'{kind} K={s["K"]}' if kind in ('depthwise', 'stem', 'head 1x1', 'classifier') \
        else kind
    g = groups.setdefault(key, dict(layers=0, steps=0, sat=0, lost=0, flush=0, rel_error=0.0,
                                    K=set()))
    g['layers'] += 1
    g['K'].add(s['K'])
    g['rel_error'] += s['rel_error']
    for field in ('steps', 'sat', 'lost', 'flush'):
      g[field] += s[field]
  return {key: dict(layers=g['layers'], K=(min(g['K']), max(g['K'])), sat_steps=g['sat'],
                    **{f: g[f] / max(g['steps'], 1) for f in ('sat', 'lost', 'flush')},
                    rel_error=g['rel_error'] / g['layers'])
          for key, g in sorted(groups.items())}


def markdown(config, rows: list[dict], inputs: int, stats_examples: int) -> str:
  """The results as tables: per format top-1, agreement and KL; per format and layer kind the
  telemetry."""
  base = rows[0]
  out = [f'# {config.name}: agreement with float32', '',
         f"{base['inputs']} label-free views of {base['photos']} photos; top-1 on "
         f"{base['labelled']} labelled photos. Standard errors: binomial for top-1, clustered by "
         'photo for agreement and KL.', '',
         '| accumulator | bits | top-1 (%) | agreement (%) | KL (nats) |', '|---|---|---|---|---|']
  out += [f"| {r['format']} | {r['bits']} | {reporting.plus_minus(r['top1'], r['top1_se'])} | "
          f"{reporting.plus_minus(r['agreement'], r['agreement_se'])} | "
          f"{reporting.plus_minus(r['kl'], r['kl_se'], scale=1.0, digits=4)} |" for r in rows]
  kinds = {k: by_kind(r['counters']) for r in rows if r['counters'] for k in [r['format']]}
  if kinds:
    names = sorted({k for groups in kinds.values() for k in groups})
    first = kinds[next(iter(kinds))]
    out += ['', f'## Telemetry on {stats_examples} views: steps lost / flushed (%), saturated '
            "steps, layers' mean relative error (%)", '', '| accumulator | ' + ' | '.join(
                f"{n} ({first[n]['layers']} layers)" if n in first else n for n in names) + ' |',
            '|---' * (len(names) + 1) + '|']
    out += [f'| {fmt} | ' + ' | '.join(
        f"{100 * g[n]['lost']:.2f} / {100 * g[n]['flush']:.2f} / {g[n]['sat_steps']} / "
        f"{100 * g[n]['rel_error']:.1f}" if n in g else '-' for n in names) + ' |'
        for fmt, g in kinds.items()]
  return '\n'.join(out) + '\n'


def run(config, model_path: str, formats, inputs: int, procs: int, stats_examples: int,
        stats_formats, out: str) -> dict:
  """Scores (resuming) the baseline and `formats`; writes <out>.json and <out>.md and returns
  the JSON's content."""
  wanted = points(formats)
  check(config, model_path, wanted, inputs, procs, stats_examples, stats_formats)
  fields = dict(sweep.manifest(config, model_path, stats_examples), inputs=inputs,
                stats_formats=sorted(stats_formats))
  cli.writable('out', out)
  with sweep.resumed(out, fields):
    start = time.time()
    rows = sweep.scored(config, model_path, wanted, procs, stats_examples, out, Agreement,
                        (inputs, tuple(stats_formats)))
    result = dict(config=config.to_dict(), model=model_path, inputs=inputs, points=rows,
                  machine=f'{os.cpu_count()} CPU cores, {jax.devices()[0].platform}',
                  seconds=round(time.time() - start))
    state.write_json(out + '.json', result, indent=1)
    with open(out + '.md', 'w') as f:
      f.write(markdown(config, rows, inputs, stats_examples))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in _SWEEP_ONLY:
    if FLAGS[name].present:
      raise ValueError(f'--{name} is a flag of experiments.sweep: experiments.agreement takes '
                       '--formats, --inputs, --stats_examples, --stats_formats, --procs, --model, '
                       '--config, --out')
  logging.set_verbosity(logging.WARNING)
  run(FLAGS.config, FLAGS.model, FLAGS.formats, FLAGS.inputs, FLAGS.procs, FLAGS.stats_examples,
      FLAGS.stats_formats, FLAGS.out)
  print(f'wrote {FLAGS.out}.json and {FLAGS.out}.md')


if __name__ == '__main__':
  cli.run(main)
