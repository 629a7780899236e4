"""The sweep's hardware and integer axes: the accumulators their points configure, the refusal of a
bad preset or width before any work, and one point of each scored on a tiny model."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from experiments import reporting, sweep, train
from lowacc import AccumulatorConfig, IntFormat, IntQuant, hardware
from lowacc.nn import Policy, layer_stats, rates

HOPPER_FP8 = 'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3'
# The integer axis's accumulator, spelled out: one register over the whole contraction, int8
# symmetric per-tensor operands, the config's order and combine.
INT_CONFIG = dict(chunk_size=None, order='fma', combine='acc', lhs=IntQuant(8, 'per_tensor'),
                  rhs=IntQuant(8, 'per_tensor'))


def _config(point):
  return train.accumulator_config(sweep.configure(demo.get_config(), point).accumulator)


def test_the_axes_configure_the_presets_and_the_integer_registers():
  grid = sweep.axes(presets=[HOPPER_FP8, HOPPER_FP8 + '/promote128'], int_widths=iter([12, 16]))
  assert grid['hardware'] == [dict(format=HOPPER_FP8), dict(format=HOPPER_FP8 + '/promote128')]
  assert grid['integer'] == [dict(format=f, chunk_size=0)
                             for f in ('INT12w', 'INT16w', 'INT12s', 'INT16s')]
  assert _config(grid['hardware'][1]) == hardware.mma('Hopper', 'wgmma', 'm64n8k32.f32.e4m3.e4m3',
                                                      promote_every=128)
  assert [_config(p) for p in grid['integer']] == [
      AccumulatorConfig(acc=IntFormat(b, o), **INT_CONFIG)
      for o in ('wrap', 'saturate') for b in (12, 16)]
  for point in sweep.axes()['hardware'] + sweep.axes()['integer']:
    assert _config(point).acc is not None
  assert [reporting.bits(f) for f in ('INT12w', 'INT23s', 'Ampere/mma/m16n8k16.f16.f16.f16.f16',
                                      HOPPER_FP8, 'CDNA1/mfma/f32_32x32x8f16')] == [12, 23, 16, 32,
                                                                                 32]


@pytest.mark.parametrize('axis, grid, message', [
    ('hardware', sweep.axes(presets=['Hoper/wgmma/m64n8k32.f32.e4m3.e4m3']),
     r"--axes=hardware point Hoper/wgmma/\S+: arch='Hoper' is invalid .*valid archs are"),
    ('hardware', sweep.axes(presets=['Hopper/wgmma/m64n8k32.f32.e4m3']),
     r"--axes=hardware point \S+: shape_and_type='m64n8k32.f32.e4m3' is invalid for wgmma"),
    ('integer', sweep.axes(int_widths=[16, 30]),
     r'--axes=integer point INT30w: IntFormat.bits=30 is invalid: must be in \[2, 23\]$')])
def test_a_bad_preset_or_width_is_refused_before_any_work(axis, grid, message, tmp_path,
                                                          monkeypatch):
  def work(*args, **kwargs):
    raise AssertionError('work started')
  monkeypatch.setattr(sweep, 'Evaluator', work)
  model = tmp_path / 'model'
  model.write_bytes(b'weights')
  with pytest.raises(ValueError, match=message):
    sweep.sweep(demo.get_config('runlocal'), str(model), [axis], grid, [], 1, 4,
                str(tmp_path / 'out' / 's'))
  assert not os.path.exists(tmp_path / 'out')


def test_a_preset_and_an_integer_register_score_on_a_tiny_model(tmp_path):
  config = demo.get_config('runlocal')
  config.seed = 1
  config.accumulator.skip = ('^(?!fc$)',)  # only the classifier simulated: a few seconds a point
  _, model = train.build(config)
  export = str(tmp_path / 'model')
  train.export_model(model, export)
  grid = dict(hardware=[dict(format=HOPPER_FP8)], integer=[dict(format='INT12s', chunk_size=0)])
  rows = sweep.sweep(config, export, ['hardware', 'integer'], grid, [], 1, 4,
                     str(tmp_path / 's'))['points']
  assert [(r['axis'], r['format'], r['bits']) for r in rows] == [
      ('baseline', 'float32', 32), ('hardware', HOPPER_FP8, 32), ('integer', 'INT12s', 12)]
  # Each point's telemetry is that of its accumulator built here from lowacc alone, on the first
  # 4 evaluation inputs in eval mode; a 12-bit register over int8 inputs saturates (127^2 > 2^11).
  task, _ = train.build(config)
  batch = next(iter(task.eval_batches(config)))
  direct = (hardware.mma('Hopper', 'wgmma', 'm64n8k32.f32.e4m3.e4m3'),
            AccumulatorConfig(acc=IntFormat(12, 'saturate'), **INT_CONFIG))
  for row, acc_config in zip(rows[1:], direct):
    assert 0 <= row['metric'] <= 1 and set(row['layers']) == {'fc'}
    model.eval()
    policy = Policy.everywhere(acc_config, skip=config.accumulator.skip)
    assert row['layers'] == rates(layer_stats(model, policy, np.asarray(batch['image'])[:4]))
  assert rows[2]['layers']['fc']['sat'] > 0
  table = open(tmp_path / 's.md').read()
  assert f'| {HOPPER_FP8} | ' in table and '| 12 | - | ' in table


def test_the_sweep_command_refuses_a_bad_width_in_one_line(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for flag, error in (('--int_widths=16,x', '--int_widths=16,x: expected a list of integers'),
                      ('--int_widths=16,30', '--axes=integer point INT30w: IntFormat.bits=30 is '
                                             'invalid: must be in [2, 23]')):
    run = subprocess.run([sys.executable, '-m', 'experiments.sweep', '--config=configs/demo.py',
                          f'--out={tmp_path / "s"}', '--axes=integer', flag], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith(f'sweep.py: error: {error}')
    assert len(run.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 's.points.jsonl')
