"""The estimator study's runner: flags checked before any training, each finished run kept as it
ends, a killed study resumed to the uninterrupted one's results, runs of other flags refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import estimators, state

# The small study of tests/conftest.py's small_results.
SMALL = dict(formats=['M3E4b10'], chunks=[16], estimators=['identity', 'recursive_of'], seeds=2,
             epochs=0.1, hidden=16, rounding='toward_zero')


def test_bad_flags_are_refused_before_any_training(tmp_path, monkeypatch):
  def work(*args):
    raise AssertionError('training started')
  monkeypatch.setattr(estimators, 'train_one', work)
  (tmp_path / 'file').write_text('')
  for change, message in [
      (dict(seeds=0), '--seeds=0: must be at least 1'),
      (dict(hidden=0), '--hidden=0'),
      (dict(epochs=0.0), '--epochs=0.0'),
      (dict(epochs=float('nan')), '--epochs=nan'),
      (dict(epochs=0.01), '--epochs=0.01: must give at least one step'),
      (dict(chunks=[16, -1]), '--chunks contains -1'),
      (dict(estimators=['identity', 'straight']), "--estimators contains 'straight': valid "
                                                  'estimators are identity, immediate_of'),
      (dict(formats=['M3E']), r"--formats=M3E: accumulator format 'M3E' is invalid"),
      (dict(formats=['M30E4']), '--formats=M30E4: .*man_bits'),
      (dict(rounding='stochastic'), '--rounding=stochastic: valid roundings are nearest_even, '
                                    'toward_zero, down, up'),
      (dict(out=str(tmp_path / 'file' / 'e')), '--out=.*file/e: cannot write there')]:
    with pytest.raises(ValueError, match=message):
      estimators.study(**{**SMALL, 'out': str(tmp_path / 'out' / 'e'), **change})
  assert sorted(os.listdir(tmp_path)) == ['file']


def _copy_state(root, out):
  shutil.copytree(root / 'estimators.state', out + '.state')
  return open(root / 'estimators.runs.jsonl').read().splitlines()


def test_a_killed_study_trains_only_the_unfinished_run_and_equals_the_whole(small_results,
                                                                            tmp_path, monkeypatch):
  root, _ = small_results
  out = str(tmp_path / 'e')
  runs = _copy_state(root, out)
  assert len(runs) == 6  # (float32 reference + 2 estimators) x 2 seeds, in that order
  assert json.loads(runs[1]) == dict(setting='float32 chunk none identity', seed=1,
                                     accuracy=json.loads(runs[1])['accuracy'])
  with open(out + '.runs.jsonl', 'w') as f:  # a kill in the middle of appending the second run
    f.write('\n'.join(runs[:1] + runs[2:]) + '\n' + runs[1][:20])
  trained = []
  train_one = estimators.train_one
  monkeypatch.setattr(estimators, 'train_one',
                      lambda config, seed, *a: trained.append((config, seed)) or
                      train_one(config, seed, *a))
  result = estimators.study(**SMALL, out=out)
  assert trained == [(None, 1)]
  whole = json.load(open(root / 'estimators.json'))
  assert result == whole == json.load(open(out + '.json'))
  assert open(out + '.md').read() == open(root / 'estimators.md').read()


def test_runs_of_other_flags_or_a_second_study_at_once_are_refused(small_results, tmp_path):
  root, _ = small_results
  out = str(tmp_path / 'e')
  _copy_state(root, out)
  for change, field in [(dict(epochs=0.2), r'epochs \(0.1 -> 0.2\)'), (dict(hidden=8), 'hidden'),
                        (dict(rounding='nearest_even'), 'rounding')]:
    with pytest.raises(state.StateError, match=field + '.*give another --out'):
      estimators.study(**dict(SMALL, out=out, **change))
  with state.lock(out + '.state'):
    with pytest.raises(state.StateError, match=r'e\.state is in use by another run'):
      estimators.study(**SMALL, out=out)


def test_the_command_refuses_no_seeds_in_one_line(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, '-m', 'experiments.estimators', '--seeds=0',
                        f'--out={tmp_path / "e"}'], cwd=repo, capture_output=True, text=True)
  assert run.returncode == 2
  assert run.stderr == 'estimators.py: error: --seeds=0: must be at least 1\n'
  assert os.listdir(tmp_path) == []
