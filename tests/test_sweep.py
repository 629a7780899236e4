"""Model exports and the accumulator sweep: a model written by one run is the model another loads,
the sweep scores every point once (serial == parallel), resumes, fine-tunes and tabulates."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import demo
from experiments import reporting, state, sweep, train
from lowacc.nn import apply_policy, layer_stats
from tests.conftest import SMALL_GRID


def _leaves(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))


@pytest.fixture(scope='module')
def exported(small_results):
  """The small run's model export and the model it was written from (runlocal demo, seed 1)."""
  config = demo.get_config('runlocal')
  config.seed = 1
  _, model = train.build(config)
  return small_results[1], model


def test_a_loaded_export_is_the_exported_model(exported):
  path, model = exported
  config = demo.get_config('runlocal')  # seed 0: different initial weights
  _, fresh = train.build(config)
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(fresh), _leaves(model)))
  config.init_from = path
  _, loaded = train.build(config)
  for a, b in zip(_leaves(loaded), _leaves(model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_an_export_of_another_model_or_none_fails_with_its_path(exported, tmp_path):
  path, _ = exported
  config = demo.get_config('runlocal')
  config.model.width = 16
  config.init_from = path
  with pytest.raises(ValueError, match='does not fit this model'):
    train.build(config)
  config.init_from = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='nothing'):
    train.build(config)


def test_sweep_scores_each_point_once_in_parallel_as_serially_and_resumes(small_results,
                                                                            tmp_path):
  root, path = small_results
  config = demo.get_config('runlocal')
  serial = json.load(open(root / 'sweep_demo.json'))
  names = ['width', 'chunk']
  parallel = sweep.sweep(config, path, names, SMALL_GRID, [], 2, 4, str(tmp_path / 'p'))
  assert parallel['points'] == [r for r in serial['points'] if r['axis'] in ['baseline'] + names]

  rows = serial['points']
  assert [(r['axis'], r['format'], r['bits']) for r in rows] == [
      ('baseline', 'float32', 32), ('width', 'M3E4', 8), ('width', 'M7E4', 12),
      ('bias', 'M7E4b10', 12), ('chunk', 'M7E4b10', 12), ('rounding', 'M7E4b10', 12)]
  float32 = sweep.configure(config, dict(format='float32'))
  float32.init_from = path
  task, model = train.build(float32)
  layers = apply_policy(model, train.policy_for(config, 'M7E4'))
  simulated = {name for name, layer_config in layers.items() if layer_config is not None}
  assert simulated
  for r in rows[1:]:
    assert set(r['layers']) == simulated
    assert all(0 <= v <= 1 for layer in r['layers'].values() for v in layer.values())
  baseline = train.evaluate(task, model, float32, train.policy_for(float32), 'float32')
  assert rows[0]['metric'] == baseline
  scored = sum(int(batch['valid'].sum()) for batch in task.eval_batches(float32))
  assert all(r['examples'] == scored for r in rows)
  # The telemetry is the exported model's on the first 4 evaluation inputs, in eval mode.
  batch = next(iter(task.eval_batches(float32)))
  model.eval()
  stats = layer_stats(model, train.policy_for(config, 'M3E4'), np.asarray(batch['image'])[:4])
  assert rows[1]['layers'] == {name: {k: float(s[k]) / max(s['steps'], 1)
                                      for k in ('sat', 'lost', 'flush')}
                               for name, s in stats.items()}
  assert any(v > 0 for layer in rows[1]['layers'].values() for v in layer.values())

  tuned, = serial['finetune']
  assert tuned['format'] == 'M5E4' and tuned['baseline'] == baseline
  assert os.path.isdir(root / 'sweep_demo_finetune' / 'M5E4' / 'models' / 'stage2')
  table = open(root / 'sweep_demo.md').read()
  for row in ('| M \\ E | 4 |', '| 3 | ', '| M7E4b10 |', '| none |', '| nearest_even |',
              '| M5E4 | 10 |'):
    assert row in table

  # A rerun finds every point done: nothing is evaluated again.
  lines = open(tmp_path / 'p.points.jsonl').read()
  again = sweep.sweep(config, path, names, SMALL_GRID, [], 2, 4, str(tmp_path / 'p'))
  assert open(tmp_path / 'p.points.jsonl').read() == lines
  assert again['points'] == parallel['points']


def test_the_width_axis_is_the_full_grid():
  width = [p['format'] for p in sweep.axes()['width']]
  assert len(width) == 8 * 4 and {'M3E3', 'M10E3', 'M3E6', 'M10E6', 'M7E4'} <= set(width)
  once = sweep.axes(iter([3, 4]), iter([4, 5]))['width']  # iterators, as the flags give them
  assert [p['format'] for p in once] == ['M3E4', 'M4E4', 'M3E5', 'M4E5']


def test_the_width_axis_shifts_the_ieee_bias_and_reports_a_table_per_shift():
  width = sweep.axes([7], [4, 5], bias_shifts=iter([0, 3]))['width']
  assert [p['format'] for p in width] == ['M7E4', 'M7E5', 'M7E4b10', 'M7E5b18']
  rows = [dict(axis='baseline', format='float32', metric=0.9)] + [
      dict(p, axis='width', metric=m) for p, m in zip(width, (0.1, 0.2, 0.3, 0.4))]
  config = ml_collections.ConfigDict(dict(name='n', metric_name='accuracy'))
  ieee, shifted = sweep.markdown(config, rows, []).split('IEEE bias + 3')
  assert '| 7 | 10.00 | 20.00 |' in ieee and '| 7 | 30.00 | 40.00 |' in shifted
  # With the examples counted, each accuracy p carries sqrt(p (1 - p) / n): 100 examples here.
  ieee, shifted = sweep.markdown(config, [dict(r, examples=100) for r in rows], []).split('+ 3')
  assert 'baseline accuracy: 90.00 +- 3.00 (100 examples' in ieee
  assert '| 7 | 10.00 +- 3.00 | 20.00 +- 4.00 |' in ieee
  assert '| 7 | 30.00 +- 4.58 | 40.00 +- 4.90 |' in shifted


def test_sweep_names_an_unknown_axis():
  with pytest.raises(ValueError, match="'widths'.*valid axes are"):
    sweep.points(['widths'], sweep.axes())


def test_bits_counts_sign_exponent_and_mantissa():
  assert [reporting.bits(f) for f in ('float32', 'M7E4b10', 'M10E5', 'M3E4')] == [32, 12, 16, 8]


def _no_work(monkeypatch):
  """Makes evaluating or fine-tuning a point fail the test."""
  def work(*args, **kwargs):
    raise AssertionError('work started')
  monkeypatch.setattr(sweep, 'Evaluator', work)
  monkeypatch.setattr(sweep, 'finetune', work)


def test_sweep_checks_everything_before_any_work(tmp_path, monkeypatch):
  _no_work(monkeypatch)
  config, out = demo.get_config('runlocal'), str(tmp_path / 'out' / 's')
  model = tmp_path / 'model'
  model.write_bytes(b'weights')
  for kwargs, error, message in [
      (dict(finetune_formats=['M3E']), ValueError, r"--finetune=M3E: .*'M<man>E<exp>'"),
      (dict(finetune_formats=['float32']), ValueError, "--finetune contains 'float32'"),
      (dict(names=['widths']), ValueError, "--axes contains 'widths'"),
      (dict(grid=sweep.axes([30], [3])), ValueError, r'--axes=width point M30E3: .*man_bits'),
      (dict(procs=0), ValueError, '--procs=0'),
      (dict(stats_examples=0), ValueError, '--stats_examples=0'),
      (dict(model_path=str(tmp_path / 'none')), FileNotFoundError, '--model=.*none'),
      (dict(out=str(model / 's')), ValueError, '--out=.*cannot write')]:
    args = dict(config=config, model_path=str(model), names=['width'], grid=SMALL_GRID,
                finetune_formats=['M5E4'], procs=1, stats_examples=4, out=out)
    with pytest.raises(error, match=message):
      sweep.sweep(**dict(args, **kwargs))
  assert not os.path.exists(tmp_path / 'out')


def _export(seed: int, path: str) -> None:
  config = demo.get_config('runlocal')
  config.seed = seed
  train.export_model(train.build(config)[1], path)


def test_a_sweep_refuses_points_of_another_model_or_config(tmp_path):
  config = demo.get_config('runlocal')
  model, copy, out = str(tmp_path / 'model'), str(tmp_path / 'copy'), str(tmp_path / 's')
  _export(1, model)
  shutil.copytree(model, copy)
  first = sweep.sweep(config, model, [], SMALL_GRID, [], 1, 4, out)
  assert sweep.sweep(config, model, [], SMALL_GRID, [], 1, 4, out)['points'] == first['points']
  changed = demo.get_config('runlocal')
  changed.data.max_eval_examples = 4
  with pytest.raises(state.StateError, match=r'config\.data\.max_eval_examples \(8 -> 4\)'):
    sweep.sweep(changed, model, [], SMALL_GRID, [], 1, 4, out)
  with pytest.raises(state.StateError, match=r'stats_examples \(4 -> 2\)'):
    sweep.sweep(config, model, [], SMALL_GRID, [], 1, 2, out)
  with pytest.raises(state.StateError, match=r'weights\.model\.path'):
    sweep.sweep(config, copy, [], SMALL_GRID, [], 1, 4, out)  # the same weights elsewhere
  _export(2, model)  # another model at the same path (stage2's export over pretrain's)
  with pytest.raises(state.StateError, match=r'weights\.model\.sha256.*give another --out'):
    sweep.sweep(config, model, [], SMALL_GRID, [], 1, 4, out)


def test_points_without_a_manifest_or_in_use_are_refused(tmp_path, monkeypatch):
  _no_work(monkeypatch)
  config, out = demo.get_config('runlocal'), str(tmp_path / 's')
  model = tmp_path / 'model'
  model.write_bytes(b'weights')
  with state.lock(out + '.state'):
    with pytest.raises(state.StateError, match=r's\.state is in use by another run'):
      sweep.sweep(config, str(model), [], SMALL_GRID, [], 1, 4, out)
  os.makedirs(tmp_path / 's_finetune' / 'M5E4')  # fine-tuned from a model nothing names
  with pytest.raises(state.StateError, match=r's_finetune has no manifest.*give another --out'):
    sweep.sweep(config, str(model), [], SMALL_GRID, [], 1, 4, out)
  (tmp_path / 's.points.jsonl').write_text('{"axis": "baseline", "format": "float32"}\n')
  with pytest.raises(state.StateError, match=r's\.points\.jsonl has no manifest'):
    sweep.sweep(config, str(model), [], SMALL_GRID, [], 1, 4, out)


def test_a_sweep_killed_during_an_append_resumes_and_scores_only_that_point(small_results,
                                                                          tmp_path, monkeypatch):
  root, path = small_results
  out = str(tmp_path / 's')
  shutil.copytree(root / 'sweep_demo.state', out + '.state')
  baseline, *rest = open(root / 'sweep_demo.points.jsonl').read().splitlines()
  assert json.loads(baseline)['axis'] == 'baseline'
  with open(out + '.points.jsonl', 'w') as f:
    f.write('\n'.join(rest) + '\n' + baseline[:len(baseline) // 2])  # the kill's partial line
  scored = []
  call = sweep.Evaluator.__call__
  monkeypatch.setattr(sweep.Evaluator, '__call__',
                      lambda self, point: scored.append(point) or call(self, point))
  result = sweep.sweep(demo.get_config('runlocal'), path, list(SMALL_GRID), SMALL_GRID, [], 1, 4,
                       out)
  assert scored == [dict(axis='baseline', format='float32')]
  assert result['points'] == json.load(open(root / 'sweep_demo.json'))['points']
  assert json.load(open(out + '.json'))['points'] == result['points']


def test_the_sweep_command_names_a_bad_flag_in_one_line(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, '-m', 'experiments.sweep', '--config=configs/demo.py',
                        f'--out={tmp_path / "s"}', '--mantissas=4,x'], cwd=repo,
                       capture_output=True, text=True)
  assert run.returncode == 2
  assert run.stderr.strip() == ('sweep.py: error: --mantissas=4,x: expected a list of integers, '
                                'e.g. 4,5,6')
