"""What `pip install lowacc` needs: the numerics import and run with jax, numpy and ml_dtypes
alone; a part whose extra is missing says in one line which extra to install."""

import importlib
import subprocess
import sys

import pytest

# Packages of the extras (setup.cfg) that the numerics must not import.
OPTIONAL = ('absl', 'etils', 'flax', 'grain', 'h5py', 'ml_collections', 'optax', 'orbax', 'PIL',
            'safetensors', 'tensorflow_datasets', 'tokenizers')


def test_the_numerics_run_without_any_extra():
  code = ('import sys\n'
          f'sys.modules.update(dict.fromkeys({OPTIONAL!r}))\n'  # None: "not installed"
          'import numpy as np, lowacc\n'
          'x = np.arange(6, dtype=np.float32).reshape(2, 3)\n'
          'print(lowacc.matmul(x, x.T, lowacc.AccumulatorConfig(lowacc.FP16)).tolist())\n')
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == '[[5.0, 14.0], [14.0, 50.0]]'


@pytest.mark.parametrize('module, missing, extra', [
    ('lowacc.data.images', 'grain', 'data'), ('lowacc.data.pipeline', 'absl', 'data'),
    ('lowacc.data.text', 'tokenizers', 'data'), ('lowacc.models.resnet', 'flax', 'models'),
    ('lowacc.models.bert', 'safetensors', 'models')])
def test_a_part_without_its_extra_names_the_extra(module, missing, extra, monkeypatch):
  package = module.rsplit('.', 1)[0]
  for name in [n for n in sys.modules if n == package or n.startswith(package + '.')]:
    monkeypatch.delitem(sys.modules, name)  # imported afresh, restored afterwards
  monkeypatch.setitem(sys.modules, missing, None)
  with pytest.raises(ImportError) as error:
    importlib.import_module(module)
  message = f"{package} needs {missing} (not installed): pip install 'lowacc[{extra}]'"
  assert str(error.value) == message


def test_lowacc_nn_without_flax_names_the_extra(monkeypatch):
  monkeypatch.delitem(sys.modules, 'lowacc.nn', raising=False)
  monkeypatch.setitem(sys.modules, 'flax', None)
  with pytest.raises(ImportError) as error:
    importlib.import_module('lowacc.nn')
  assert str(error.value) == "lowacc.nn needs flax (not installed): pip install 'lowacc[nn]'"
