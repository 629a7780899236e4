"""experiments.agreement on conftest's small run: a narrow, shallow EfficientNet-Lite (random
weights, 32 x 32 views, 6 of its 23 GEMM layers simulated; all of them in the heavy tier) against
its float32 self on the 27 first views, with agreement and KL checked against
logits computed here through `lowacc.simulate` and scipy; a killed run resumes with nothing lost
and points are never reused for another config; bad flags fail in one line before any work.
They skip without the photo wheels."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import scipy.special
from flax import nnx

import lowacc
from experiments import agreement, state, train
from lowacc.data import photo_views
from lowacc.models import efficientnet
from tests.conftest import AGREEMENT_FORMATS as FORMATS
from tests.conftest import AGREEMENT_INPUTS as INPUTS
from tests.conftest import TINY_LITE

TINY = efficientnet.Variant(**TINY_LITE)
# The GEMM layers conftest's AGREEMENT_SKIP leaves simulated.
SIMULATED = {'blocks/0/depthwise_conv', 'blocks/0/project_conv', 'blocks/2/expand_conv',
             'blocks/2/depthwise_conv', 'blocks/2/project_conv', 'fc'}


def _run(config, export, out, formats=FORMATS, inputs=INPUTS, stats_formats=('M7E4b10',)):
  return agreement.run(config, export, formats, inputs, 1, 2, stats_formats, str(out))


def _reference(config, export, fmt):
  """(float32, simulated) logits of the first INPUTS views through lowacc.simulate."""
  model = nnx.eval_shape(lambda: efficientnet.efficientnet_lite('lite0', num_classes=1000,
                                                                rngs=nnx.Rngs(0)))
  train.load_model(model, export)  # every variable
  model.eval()
  views = photo_views.photo_views()
  x = np.stack([photo_views.ViewTransform(TINY.image_size).map(views[i])['image']
                for i in range(INPUTS)])
  forward = lambda m, x: m(x)
  simulated = nnx.jit(lowacc.simulate(forward, train.policy_for(config, fmt)))
  # in the run's batches: XLA's float32 convolutions round differently for other batch sizes
  batches = [x[i:i + config.data.eval_batch_size] for i in range(0, INPUTS,
                                                                 config.data.eval_batch_size)]
  return tuple(np.concatenate([np.asarray(f(model, b)) for b in batches])
               for f in (nnx.jit(forward), simulated))


def test_agreement_kl_and_top1_equal_a_direct_computation(small_agreement):
  config, export, out, result = small_agreement
  rows = {r['format']: r for r in result['points']}
  assert list(rows) == ['float32'] + FORMATS
  base = rows['float32']
  assert base['agreement'] == 1 and base['kl'] == 0 and base['inputs'] == INPUTS
  assert base['photos'] == 27 and base['labelled'] == 20
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(efficientnet.VARIANTS, 'lite0', TINY)
    ref, sim = _reference(config, export, 'M4E5')
  row = rows['M4E5']
  assert row['agreement'] == np.mean(ref.argmax(-1) == sim.argmax(-1))
  p, q = scipy.special.softmax(ref.astype(np.float64), -1), scipy.special.softmax(
      sim.astype(np.float64), -1)
  kl = scipy.special.rel_entr(p, q).sum(-1)
  assert kl.mean() > 1e-3
  np.testing.assert_allclose(row['kl'], kl.mean(), rtol=1e-9)
  np.testing.assert_allclose(row['kl_se_iid'], kl.std(ddof=1) / np.sqrt(INPUTS), rtol=1e-7)
  labels = photo_views.natural_photos().columns['label'][:20]
  top1 = np.mean(sim[:20].argmax(-1) == labels)
  assert row['top1'] == top1 and row['top1_se'] == pytest.approx(np.sqrt(top1 * (1 - top1) / 20))
  # the telemetry only where asked, with each layer's contraction length
  assert rows['M4E5']['counters'] == {} and base['counters'] == {}
  counters = rows['M7E4b10']['counters']
  assert set(counters) == SIMULATED
  assert {name: c['K'] for name, c in counters.items()} == _torch_contraction_lengths(SIMULATED)
  assert counters['blocks/0/depthwise_conv']['K'] == 9  # 3 x 3, one channel per group
  assert counters['blocks/2/depthwise_conv']['K'] == 25  # 5 x 5
  assert counters['blocks/0/project_conv']['K'] == 32  # 1 x 1 over the stem's 32 channels
  assert counters['fc']['K'] == 1280
  kinds = agreement.by_kind(counters)
  assert {'depthwise K=9', 'depthwise K=25', '1x1 expansion', '1x1 projection'} <= set(kinds)
  assert all(0 <= g[k] <= 1 for g in kinds.values() for k in ('sat', 'lost', 'flush'))
  assert '| M4E5 | 10 |' in open(out + '.md').read()


def _torch_contraction_lengths(layers):
  """Layer path -> K from the tiny model's torch weight shapes: (out, in / groups, kh, kw) for a
  conv, (out, in) for the classifier."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(efficientnet.VARIANTS, 'lite0', TINY)
    model = nnx.eval_shape(lambda: efficientnet.efficientnet_lite('lite0', num_classes=1000,
                                                                  rngs=nnx.Rngs(0)))
  shapes = efficientnet.torch_shapes(model)
  path = lambda key: '/'.join(part.lstrip('_') for part in key[:-len('.weight')].split('.'))
  lengths = {path(k): int(np.prod(s[1:])) for k, s in shapes.items()
             if k.endswith('.weight') and len(s) in (2, 4)}
  return {name: lengths[name] for name in layers}


@pytest.mark.heavy
def test_the_whole_models_telemetry_has_every_layer_with_its_k(small_agreement, tmp_path,
                                                               monkeypatch):
  """The small run simulates 6 of the 23 GEMM layers (conftest.AGREEMENT_SKIP); with none skipped
  every one reports counters and its K (the telemetry of all 23 compiles for about a minute)."""
  config, export, _, _ = small_agreement
  monkeypatch.setitem(efficientnet.VARIANTS, 'lite0', TINY)
  config = ml_collections.ConfigDict(config.to_dict())
  config.accumulator.skip = ()
  counters = _run(config, export, tmp_path / 'all', formats=['M7E4b10'])['points'][1]['counters']
  lengths = _torch_contraction_lengths(counters)
  assert len(counters) == 23 and SIMULATED < set(counters)
  assert {name: c['K'] for name, c in counters.items()} == lengths
  assert lengths['conv_stem'] == 27 and all(c['steps'] > 0 for c in counters.values())


def test_clustered_standard_error_of_equal_clusters_is_that_of_their_means():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(40)
  groups = np.repeat(np.arange(8), 5)
  means = x.reshape(8, 5).mean(1)
  assert agreement.clustered_se(x, groups) == pytest.approx(means.std(ddof=1) / np.sqrt(8))


def test_a_killed_run_resumes_and_another_config_is_refused(small_agreement, tmp_path, monkeypatch):
  config, export, finished, result = small_agreement
  monkeypatch.setitem(efficientnet.VARIANTS, 'lite0', TINY)
  out = str(tmp_path / 'agr')
  shutil.copytree(finished + '.state', out + '.state')
  rows = state.read_jsonl(finished + '.points.jsonl')
  # killed while appending the last point: two rows complete, the third half written
  with open(out + '.points.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows[:2])
    f.write(json.dumps(rows[2])[:40])
  scored = []
  call = agreement.Agreement.__call__
  monkeypatch.setattr(agreement.Agreement, '__call__',
                      lambda self, point: scored.append(point['format']) or call(self, point))
  again = _run(config, export, out)['points']
  assert scored == [r['format'] for r in rows[2:]]
  assert again == result['points']
  assert len(state.read_jsonl(out + '.points.jsonl')) == len(rows)
  # another --inputs or another accumulator setting: refused, naming the field
  with pytest.raises(state.StateError, match=r'holds results of another configuration: inputs '
                                             r'\(27 -> 54\)'):
    _run(config, export, out, inputs=54)
  config = ml_collections.ConfigDict(config.to_dict())
  config.accumulator.chunk_size = 8
  with pytest.raises(state.StateError, match=r'accumulator.chunk_size \(16 -> 8\)'):
    _run(config, export, out)
  assert scored == [r['format'] for r in rows[2:]]  # nothing scored by the refused runs


@pytest.mark.parametrize('kwargs,message', [
    (dict(formats=['M7E4x']), r"point M7E4x: .*"),
    (dict(inputs=5000), r'--inputs=5000: must be 0 \(all 1944 views\) or 27..1944'),
    (dict(inputs=26), r'--inputs=26: must be 0'),
    (dict(stats_formats=['M6E5']), r"--stats_formats contains 'M6E5', which is not among"),
])
def test_bad_values_are_refused_before_any_work(small_agreement, tmp_path, kwargs, message):
  config, export, _, _ = small_agreement
  with pytest.raises(ValueError, match=message):
    _run(config, export, tmp_path / 'agr', **kwargs)
  assert not os.path.exists(str(tmp_path / 'agr') + '.state')


def test_command_line_error_is_one_line(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'experiments.agreement',
                         '--config=configs/imagenet_efficientnet.py', f'--out={tmp_path / "a"}',
                         '--axes=width'], cwd=repo, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'agreement.py: error: --axes is a flag of experiments.sweep: experiments.agreement takes '
      '--formats, --inputs, --stats_examples, --stats_formats, --procs, --model, --config, --out')
