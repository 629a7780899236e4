"""The experiment entry point end to end: the recipe on real MNIST and on mock ImageNet, GLUE and
SQuAD, resuming after SIGKILL, data parallelism on 4 devices, and errors before any work
(tests/test_runner.py: the workdir's state, corrupt or foreign, and bad configs)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from configs import demo, glue_bert, imagenet_resnet18, squad_bert
from experiments import train
from lowacc.models import bert, resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _minilm():
  try:
    return str(bert.minilm_checkpoint_dir())
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _prepared(tmp_path, name, version):
  """The dataset_info.json tfds_source checks for; mock_data supplies the examples."""
  variant = tmp_path / 'tfds' / name / version
  variant.mkdir(parents=True)
  (variant / 'dataset_info.json').write_text(json.dumps(
      {'name': name.split('/')[0], 'version': version, 'fileFormat': 'array_record'}))
  return str(tmp_path / 'tfds')


def _mock(n=8):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def _check_outputs(workdir, results, phases):
  assert set(results) == set(phases)
  for name in ('results.json', 'results.md', 'accuracy.png', 'metrics.jsonl'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')).latest_step() is not None


def test_demo_recipe_on_real_mnist_and_resume_when_done(tmp_path):
  config = demo.get_config('runlocal')
  workdir = str(tmp_path / 'run')
  results = train.run(config, workdir)
  _check_outputs(workdir, results, ('pretrain', 'baseline', 'zero_shot', 'stage1', 'stage2'))
  assert set(results['zero_shot']) == {'float32', 'M7E4b10'}
  assert all(0 <= v <= 1 for phase in ('baseline', 'stage1', 'stage2')
             for v in results[phase].values())
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read()
  assert train.run(config, workdir) == results  # a finished run only reports again
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == lines


@pytest.mark.heavy
def test_imagenet_config_on_mock_data(tmp_path):
  config = imagenet_resnet18.get_config('runlocal')
  config.data.data_dir = _prepared(tmp_path, 'imagenet2012', '5.1.0')
  config.pretrained = str(tmp_path / 'resnet18.safetensors')
  resnet.save_torchvision(resnet.resnet18(width=8, rngs=nnx.Rngs(1)), config.pretrained)
  with _mock():
    results = train.run(config, str(tmp_path / 'run'))
  _check_outputs(str(tmp_path / 'run'), results, ('baseline', 'zero_shot', 'stage1', 'stage2'))


@pytest.mark.heavy
@pytest.mark.parametrize('get_config, dataset, version', [
    (glue_bert.get_config, 'glue/sst2', '2.0.0'), (squad_bert.get_config, 'squad/v1.1', '3.0.0')])
def test_bert_configs_on_mock_data(get_config, dataset, version, tmp_path):
  config = get_config('runlocal')
  config.pretrained = _minilm()
  config.data.data_dir = _prepared(tmp_path, dataset, version)
  with _mock():
    results = train.run(config, str(tmp_path / 'run'))
  _check_outputs(str(tmp_path / 'run'), results, ('baseline', 'zero_shot', 'stage1', 'stage2'))


def test_minilm_on_the_offline_review_set(tmp_path):
  _minilm()
  from configs import text_minilm
  config = text_minilm.get_config('runlocal')
  config.accumulator.attention = False
  results = train.run(config, str(tmp_path / 'run'))
  _check_outputs(str(tmp_path / 'run'), results,
                 ('pretrain', 'baseline', 'zero_shot', 'stage1', 'stage2'))


def _main(workdir, *overrides):
  return [sys.executable, '-m', 'experiments.main', '--config=configs/demo.py:runlocal',
          f'--workdir={workdir}', '--config.zero_shot=("float32",)', '--config.stage1.steps=6',
          '--config.stage2.steps=2', *overrides]


def _final_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  return step, manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))


@pytest.mark.heavy
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
  whole, killed = str(tmp_path / 'whole'), str(tmp_path / 'killed')
  subprocess.run(_main(whole), cwd=ROOT, check=True, capture_output=True)
  proc = subprocess.Popen(_main(killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Kill in stage 1: pretrain is 2 steps, so checkpoint 5 is stage 1's step 3.
  target = os.path.join(killed, 'checkpoints', '5')
  deadline = time.time() + 300
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, 'checkpoints', '10'))
  subprocess.run(_main(killed), cwd=ROOT, check=True, capture_output=True)
  (step_a, a), (step_b, b) = _final_state(whole), _final_state(killed)
  assert step_a == step_b == 10
  flat_a = dict(nnx.traversals.flatten_mapping(a['state']))
  flat_b = dict(nnx.traversals.flatten_mapping(b['state']))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))
  with open(os.path.join(whole, 'results.json')) as fa, open(os.path.join(killed,
                                                                          'results.json')) as fb:
    assert json.load(fa)['results'] == json.load(fb)['results']
  with open(os.path.join(whole, 'metrics.jsonl')) as fa, open(os.path.join(killed,
                                                                          'metrics.jsonl')) as fb:
    assert fa.read() == fb.read()  # the steps logged after the last checkpoint, once


_ONE_STEP = '''
import sys, numpy as np, jax
from flax import nnx
from configs import demo
from experiments import train
from lowacc.nn import apply_policy
config = demo.get_config('runlocal')
config.data.batch_size = 8
r = train._Run(config, sys.argv[1])
assert jax.device_count() == int(sys.argv[2]), jax.devices()
batch = r.shard(next(r.task.train_batches(config, seed=0, start_step=0)))
init = nnx.to_pure_dict(nnx.state(r.model))  # arrays, not the live variables
out = {}
for name, policy, batch_norm_frozen in (('float32', train._float32_policy(), False),
                                        ('simulated', train.policy_for(config), True)):
  state = nnx.state(r.model)
  nnx.replace_by_pure_dict(state, init)
  nnx.update(r.model, state)
  apply_policy(r.model, policy)
  r.model.eval() if batch_norm_frozen else r.model.train()
  optimizer = r.optimizer('stage1', 1)
  nnx.update((r.model, optimizer), r.replicate(nnx.state((r.model, optimizer))))
  train.make_train_step(r.task)(r.model, optimizer, batch)
  flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(r.model, nnx.Param)))
  out.update({name + '/' + '/'.join(map(str, k)): np.asarray(v) for k, v in flat.items()})
np.savez(sys.argv[1] + '/params.npz', **out)
'''


def test_one_step_on_four_devices_equals_one_device(tmp_path):
  """One SGD step with the batch sharded over 4 CPU devices equals the step on 1 device, up to
  the order of float32 sums over the batch (gradients, BatchNorm statistics). With simulated
  accumulators BatchNorm is frozen: an ulp of difference in a batch statistic moves the next
  layer's inputs, which a 12-bit accumulator rounds into a visibly different output."""
  params = {}
  for n in (1, 4):
    workdir = tmp_path / f'd{n}'
    workdir.mkdir()
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    subprocess.run([sys.executable, '-c', _ONE_STEP, str(workdir), str(n)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    params[n] = dict(np.load(workdir / 'params.npz'))
  assert params[1].keys() == params[4].keys() and len(params[1]) > 10
  for key in params[1]:
    np.testing.assert_allclose(params[4][key], params[1][key], rtol=1e-6, atol=1e-7,
                               err_msg=key)


def test_unknown_config_field_fails_at_start(tmp_path):
  run = subprocess.run(_main(str(tmp_path / 'w'), '--config.stage1.learnin_rate=1'), cwd=ROOT,
                       capture_output=True, text=True)
  assert run.returncode != 0 and 'learnin_rate' in run.stderr
  assert not os.path.exists(tmp_path / 'w')


def test_missing_data_dir_fails_before_work(tmp_path):
  config = imagenet_resnet18.get_config('runlocal')
  config.data.data_dir = str(tmp_path / 'nowhere')
  config.pretrained = str(tmp_path / 'missing.safetensors')
  with pytest.raises(FileNotFoundError, match='config.pretrained'):
    train.run(config, str(tmp_path / 'run'))
  resnet.save_torchvision(resnet.resnet18(width=8, rngs=nnx.Rngs(1)), config.pretrained)
  with pytest.raises(FileNotFoundError, match='imagenet2012 is not prepared'):
    train.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_checkpoint_of_the_wrong_model_fails_before_work(tmp_path):
  config = imagenet_resnet18.get_config('runlocal')
  config.data.data_dir = _prepared(tmp_path, 'imagenet2012', '5.1.0')
  config.pretrained = str(tmp_path / 'resnet50.safetensors')
  resnet.save_torchvision(resnet.resnet50(width=8, rngs=nnx.Rngs(1)), config.pretrained)
  with _mock(), pytest.raises(ValueError, match='resnet50'):
    train.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_tokenizer_missing_from_checkpoint_fails_before_work(tmp_path):
  checkpoint = tmp_path / 'bert'
  shutil.copytree(_minilm(), checkpoint)
  os.remove(checkpoint / 'tokenizer.json')
  config = glue_bert.get_config('runlocal')
  config.pretrained = str(checkpoint)
  config.data.data_dir = _prepared(tmp_path, 'glue/sst2', '2.0.0')
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    train.run(config, str(tmp_path / 'run'))


def test_estimator_study_runs_and_writes_its_table(small_results):
  root, _ = small_results
  runs = json.load(open(root / 'estimators.json'))['test_accuracy']
  assert set(runs) == {'float32 chunk none identity', 'M3E4b10 chunk 16 identity',
                       'M3E4b10 chunk 16 recursive_of'}
  assert all(len(accs) == 2 and all(0 <= a <= 1 for a in accs) for accs in runs.values())
  assert open(root / 'estimators.md').read().count('| M3E4b10 | 16 |') == 2
