"""Model exports and the accumulator sweep: a model written by one run is the model another loads,
the sweep scores every point once (serial == parallel), resumes, fine-tunes and tabulates."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from experiments import reporting, sweep, train
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
  # The telemetry is the exported model's on the first 4 evaluation inputs, in eval mode.
  batch = next(iter(task.eval_batches(float32)))
  apply_policy(model, train.policy_for(config, 'M3E4'))
  model.eval()
  stats = layer_stats(model, np.asarray(batch['image'])[:4])
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


def test_sweep_names_an_unknown_axis():
  with pytest.raises(ValueError, match="'widths'.*valid axes are"):
    sweep.points(['widths'], sweep.axes())


def test_bits_counts_sign_exponent_and_mantissa():
  assert [reporting.bits(f) for f in ('float32', 'M7E4b10', 'M10E5', 'M3E4')] == [32, 12, 16, 8]
