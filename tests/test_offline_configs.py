"""Smoke runs of the offline issue-14 configs: EfficientNet-Lite0 zero-shot on the labelled
ImageNet photos, MiniLM-L6 on SNLI (their :runlocal variants). They skip without the data."""

import json
import os

import pytest

from experiments import train


def _config(module):
  try:
    return module.get_config('runlocal')
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def test_imagenet_efficientnet_is_zero_shot_only(tmp_path):
  from configs import imagenet_efficientnet
  config = _config(imagenet_efficientnet)
  workdir = str(tmp_path / 'run')
  results = train.run(config, workdir)
  assert set(results) == {'baseline', 'zero_shot'}
  # The published weights classify the first 4 photos correctly (18 of all 20).
  assert results['baseline']['float32'] == 1.0
  assert set(results['zero_shot']) == {'float32', 'M7E4b10'}
  assert results['zero_shot']['float32'] == 1.0
  assert os.path.getsize(os.path.join(workdir, 'results.md')) > 0
  assert _results(workdir)


@pytest.mark.heavy
def test_snli_minilm_runs_every_phase(tmp_path):
  from configs import snli_minilm
  config = _config(snli_minilm)
  config.accumulator.attention = False
  results = train.run(config, str(tmp_path / 'run'))
  assert set(results) == {'pretrain', 'baseline', 'zero_shot', 'stage1', 'stage2'}
  assert 0 <= results['baseline']['float32'] <= 1
