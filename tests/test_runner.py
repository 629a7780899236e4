"""What experiments.train does with the state a workdir holds: a run resumes from the newest intact
checkpoint or from the finished phases' exports and reports only what it computed; corrupt,
foreign or busy workdirs, bad configs and a NaN loss are refused in one line, before any work."""

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import base, demo
from experiments import state, train
from lowacc.data import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  """The runlocal demo with every layer in float32 (the runner is under test here, not the
  numerics): checkpoints 1-2 pretrain, 3-4 stage 1, 5-7 stage 2, the last 3 kept."""
  config = demo.get_config('runlocal')
  config.zero_shot = ('float32',)
  config.accumulator.skip = ('',)
  config.stage2.steps = 3
  return config


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """(workdir, results) of one uninterrupted run of _config(); tests work on copies."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  return workdir, train.run(_config(), workdir)


def _copy(finished, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  return workdir


def _forget(workdir, *phases):
  """The workdir as a run killed before `phases` finished leaves it: no results, no exports."""
  path = os.path.join(workdir, 'results.json')
  with open(path) as f:
    saved = json.load(f)
  for phase in phases:
    del saved['results'][phase]
    shutil.rmtree(os.path.join(workdir, 'models', phase))
  with open(path, 'w') as f:
    json.dump(saved, f)


def _corrupt(directory):
  """Overwrites the array data of an orbax checkpoint item."""
  for parent, _, files in os.walk(directory):
    if os.path.basename(parent) == 'd':
      for name in files:
        with open(os.path.join(parent, name), 'wb') as f:
          f.write(b'garbage')


def _rows(workdir):
  def refuse(constant):
    raise AssertionError(f'{constant} in metrics.jsonl')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _assert_same_model(workdir_a, workdir_b, phase):
  a, b = (dict(nnx.traversals.flatten_mapping(ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(w, 'models', phase))))) for w in (workdir_a, workdir_b))
  assert a.keys() == b.keys() and a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_without_checkpoints_stage1_starts_from_the_pretrain_export(finished, tmp_path):
  """Killed in stage 1 with checkpoints/ gone: stage 1 starts over from pretrain's model (not
  from random weights), ends as the uninterrupted run, and logs each step once."""
  workdir = _copy(finished, tmp_path)
  _forget(workdir, 'stage1', 'stage2')
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  config = _config()
  config.keep_checkpoints = 0  # not in the manifest: 0 keeps none
  assert train.run(config, workdir) == finished[1]
  _assert_same_model(finished[0], workdir, 'stage2')
  assert _rows(workdir) == _rows(finished[0])
  assert not os.listdir(os.path.join(workdir, 'checkpoints'))


def test_a_corrupt_checkpoint_falls_back_to_the_intact_one_before(finished, tmp_path, caplog,
                                                                   capsys):
  workdir = _copy(finished, tmp_path)
  _forget(workdir, 'stage2')  # killed after stage 2's last checkpoint
  checkpoints = os.path.join(workdir, 'checkpoints')
  _corrupt(os.path.join(checkpoints, '7', 'state'))  # TensorStore's data
  with open(os.path.join(checkpoints, '6', 'meta', 'metadata'), 'w') as f:
    f.write('{"phase": "sta')  # a cut JSON file
  with caplog.at_level(logging.WARNING):
    assert train.run(_config(), workdir) == finished[1]
  warned = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert len(warned) == 2 and warned[0].startswith('checkpoint 7 in ')
  assert warned[1].startswith('checkpoint 6 in ') and 'Unterminated string' in warned[1]
  assert 'stage2: resuming at step 1 of 3' in capsys.readouterr().out
  _assert_same_model(finished[0], workdir, 'stage2')
  assert _rows(workdir) == _rows(finished[0])
  assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == [5, 6, 7]


def test_a_finished_workdir_needs_no_checkpoint(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  _corrupt(os.path.join(workdir, 'checkpoints'))
  assert train.run(_config(), workdir) == finished[1]
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  assert train.run(_config(), workdir) == finished[1]


def test_a_phase_whose_starting_model_is_gone_is_refused(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  _forget(workdir, 'stage2')
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  shutil.rmtree(os.path.join(workdir, 'models', 'stage1'))
  with pytest.raises(state.StateError, match=r"phase 'stage1' is finished but its model .*"
                                             r"models/stage1 is missing"):
    train.run(_config(), workdir)
  assert 'stage2' not in json.load(open(os.path.join(workdir, 'results.json')))['results']


def test_another_config_is_refused_naming_what_differs(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  config = _config()
  config.accumulator.format = 'M3E4'
  config.zero_shot = ('M4E3',)
  with pytest.raises(state.StateError, match=r"accumulator\.format \('M7E4b10' -> 'M3E4'\), "
                                             r"zero_shot .*another --workdir"):
    train.run(config, workdir)
  config = _config()  # what does not change results may change
  config.name, config.log_every_steps, config.keep_checkpoints = 'renamed', 2, 1
  assert train.run(config, workdir) == finished[1]
  assert open(os.path.join(workdir, 'results.md')).read().startswith('# renamed\n')


def test_a_busy_workdir_or_a_corrupt_results_file_is_refused(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  with state.lock(workdir), pytest.raises(state.StateError, match='in use by another run'):
    train.run(_config(), workdir)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    f.write('{"config": {}, "resu')
  with pytest.raises(state.StateError, match=r'results\.json is corrupt'):
    train.run(_config(), workdir)
  # Deleted, as the message says: the exports are evaluated again, no phase is trained again.
  os.remove(os.path.join(workdir, 'results.json'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  assert train.run(_config(), workdir) == finished[1]
  assert _rows(workdir) == _rows(finished[0])


@pytest.mark.parametrize('field, value, message', [
    ('log_every_steps', 0, r'config\.log_every_steps=0 is invalid: it must be an integer >= 1'),
    ('checkpoint_every_steps', 0, r'config\.checkpoint_every_steps=0 is invalid'),
    ('zero_shot', ('float32', 'M7E9x'), r"config\.zero_shot entry 'M7E9x': accumulator format"),
    ('accumulator.order', 'fmq', r"config\.accumulator 'M7E4b10': .*order='fmq'"),
    ('accumulator.rounding', 'floor', r"config\.accumulator 'M7E4b10': .*rounding='floor'"),
    ('stage2.optimizer', 'adam', r"config\.stage2\.optimizer='adam' is invalid: it must be one of "
                                 r"\('sgd', 'adamw'\)"),
    ('stage1.learning_rate', float('nan'), r'config\.stage1\.learning_rate=nan is invalid'),
    ('pretrain.steps', -2, r'config\.pretrain\.steps=-2 is invalid'),
])
def test_a_bad_config_is_refused_before_any_work(field, value, message, tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'build', lambda config: pytest.fail('built before checking'))
  config = _config()
  *parents, leaf = field.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('name', ['demo', 'glue_bert', 'imagenet_resnet18', 'imagenet_resnet34',
                                  'imagenet_resnet50', 'squad_bert', 'text_minilm'])
def test_an_unknown_config_argument_is_refused(name):
  get_config = importlib.import_module(f'configs.{name}').get_config
  assert get_config('runlocal').data.max_train_examples == 16
  assert get_config().to_dict() == get_config('').to_dict()
  with pytest.raises(ValueError, match=r"argument 'runlcoal' is invalid: valid are none \(the "
                                       r"full config\) and 'runlocal'"):
    get_config('runlcoal')
  assert list(base.VARIANTS) == ['runlocal']


def _main(workdir, *flags):
  run = subprocess.run([sys.executable, '-m', 'experiments.main', f'--workdir={workdir}', *flags],
                       cwd=ROOT, capture_output=True, text=True)
  assert 'Traceback' not in run.stderr, run.stderr
  return run.returncode, run.stderr.strip().splitlines()[-1]


def test_main_prints_a_users_mistake_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  code, line = _main(workdir, '--config=configs/demo.py:runlcoal')
  assert code == 2 and line.startswith('main.py: error: flag --config=configs/demo.py:runlcoal: ')
  assert line.endswith("config argument 'runlcoal' is invalid: valid are none (the full config) "
                       "and 'runlocal'")
  code, line = _main(workdir, '--config=configs/demo.py:runlocal', '--config.log_every_steps=0')
  assert (code, line) == (2, 'main.py: error: config.log_every_steps=0 is invalid: it must be an '
                             'integer >= 1')
  assert not workdir.exists()


def test_a_nan_loss_stops_the_phase_and_nothing_is_reported(tmp_path):
  code, line = _main(tmp_path, '--config=configs/demo.py:runlocal', '--config.zero_shot=("float32",)',
                     '--config.accumulator.skip=("",)', '--config.pretrain.steps=3',
                     '--config.pretrain.learning_rate=1e38', '--config.stage1.steps=0',
                     '--config.stage2.steps=0')
  assert code == 2
  assert line.startswith('main.py: error: pretrain diverged: the loss is nan at step 3 of 3, so '
                         'nothing of pretrain is kept or reported')
  assert _rows(tmp_path)  # the finite steps before
  assert not os.path.exists(tmp_path / 'results.json')
  assert not os.path.exists(tmp_path / 'models')


def test_the_mnist_train_split_takes_the_digits_in_turn():
  """runlocal trains on the first 16 examples: every digit, not only zeros; every round of ten
  holds each digit once, in an order that varies (so that strided shards get every digit too)."""
  labels = images.mnist('train').columns['label']
  rounds = labels.reshape(400, 10)
  assert all(sorted(r) == list(range(10)) for r in rounds.tolist())
  assert len({tuple(r) for r in rounds.tolist()}) > 300
  assert np.bincount(labels[:4000]).tolist() == [400] * 10
