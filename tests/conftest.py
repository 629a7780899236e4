"""Shared helpers: bitwise comparison, inputs that hit every rounding boundary of a format, and
small runs of the experiments (a sweep and an estimator study; an agreement study) that several
test files read."""

import os
import shutil
import subprocess
import sys
import tempfile

# Every process of a test session (pytest-xdist's workers and the subprocesses tests start)
# shares one persistent compilation cache, new for the session, so what one process compiled
# the others load instead of compiling it again. Set before jax is imported.
_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lowacc-jax-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lowacc import FloatFormat  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])


def pytest_unconfigure(config):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)


def assert_bits_equal(actual, expected, context=''):
  """Bit-for-bit equality of float32 arrays; NaNs only need to be NaNs."""
  a = np.asarray(actual, np.float32).ravel()
  e = np.asarray(expected, np.float32).ravel()
  assert a.shape == e.shape, (a.shape, e.shape)
  nan = np.isnan(e)
  assert np.array_equal(np.isnan(a), nan), f'{context}: NaN positions differ'
  ab, eb = a.view(np.uint32), e.view(np.uint32)
  bad = np.flatnonzero((ab != eb) & ~nan)
  if bad.size:
    i = bad[:5]
    raise AssertionError(f'{context}: {bad.size} of {a.size} differ; first at {i}: '
                         f'got {a[i]!r} ({ab[i]}), expected {e[i]!r} ({eb[i]})')


def boundary_inputs(fmt: FloatFormat, n: int, seed: int = 0) -> np.ndarray:
  """float32 inputs for quantizing into `fmt`: random bit patterns (every class of float32),
  values on the format's grid in and beyond its range, the ties between grid points, one float32
  ulp either side of each, both overflow boundaries, min_normal, zeros, infs and NaN."""
  rng = np.random.default_rng(seed)
  m = fmt.man_bits
  lo_exp, hi_exp = max(fmt.min_exp - m - 3, -149), min(fmt.max_exp + 2, 127)
  k = n // 8
  e = rng.integers(lo_exp, hi_exp + 1, k)
  f = rng.integers(0, 2 ** m, k)
  grid = np.ldexp(1 + f / 2.0 ** m, e)
  quantum = np.ldexp(1.0, e - m)
  ties = grid + quantum / 2
  special = np.array([fmt.max_normal, fmt.min_normal, 2.0 ** (fmt.max_exp + 1), 0.0, -0.0,
                      np.inf, -np.inf, np.nan, fmt.max_normal + 2.0 ** (fmt.max_exp - m - 1),
                      fmt.min_normal / 2, 2.0 ** (fmt.min_exp - m), 2.0 ** (fmt.min_exp - m - 1),
                      3 * 2.0 ** (fmt.min_exp - m - 1), 1.0, 3.4028235e38, 1e-45, 2.0 ** -126])
  center = np.concatenate([grid, ties, special]).astype(np.float32)
  center = center[np.isfinite(center) | np.isnan(center) | np.isinf(center)]
  with np.errstate(over="ignore"):
    up, down = np.nextafter(center, np.float32(np.inf)), np.nextafter(center, np.float32(-np.inf))
  near = np.concatenate([center, up, down])
  signs = np.where(rng.random(near.size) < 0.5, -1, 1).astype(np.float32)
  near = near * signs
  random_bits = rng.integers(0, 2 ** 32, n - near.size, dtype=np.uint64).astype(np.uint32)
  out = np.concatenate([near, random_bits.view(np.float32)]).astype(np.float32)
  return out[rng.permutation(out.size)]


def run_on_host_devices(code: str, devices: int = 2) -> None:
  """Runs `code` (which prints 'ok' when its checks pass) in a Python subprocess with that many
  host devices: XLA_FLAGS must be set before jax starts."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


SMALL_GRID = {'width': [dict(format='M3E4'), dict(format='M7E4')],
              'bias': [dict(format='M7E4b10')],
              'chunk': [dict(format='M7E4b10', chunk_size=0)],
              'rounding': [dict(format='M7E4b10', rounding='nearest_even')]}


@pytest.fixture(scope='session')
def small_results(tmp_path_factory):
  """A results directory as the real runs leave it, from tiny runs: sweep_demo.json (a runlocal
  demo model with random weights, exported, swept over SMALL_GRID and fine-tuned at M5E4) and
  estimators.json (two estimators, two seeds, a fraction of an epoch). Returns (directory, model
  export path)."""
  from configs import demo
  from experiments import sweep, train
  root = tmp_path_factory.mktemp('results')
  config = demo.get_config('runlocal')
  config.seed = 1
  _, model = train.build(config)
  export = str(root / 'models' / 'pretrain')
  train.export_model(model, export)
  sweep.sweep(demo.get_config('runlocal'), export, list(SMALL_GRID), SMALL_GRID, ['M5E4'], 1, 4,
              str(root / 'sweep_demo'))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-m', 'experiments.estimators', '--formats=M3E4b10',
                  '--chunks=16', '--estimators=identity,recursive_of', '--seeds=2',
                  '--epochs=0.1', '--hidden=16', f'--out={root / "estimators"}'], cwd=repo,
                 check=True, capture_output=True)
  return root, export


# The small agreement run: EfficientNet-Lite0 made narrow and shallow (7 blocks, 8 to 80 channels,
# 32 x 32 views), scored at these formats on the first AGREEMENT_INPUTS views, telemetry at the first.
TINY_LITE = dict(width=0.25, depth=0.1, image_size=32)
AGREEMENT_FORMATS = ['M7E4b10', 'M4E5', 'Hopper/wgmma/m64n8k16.f32.f16.f16', 'INT16s']
AGREEMENT_INPUTS = 27
# The layers it simulates: block 0 (a 3 x 3 depthwise conv, K = 9, and a 1x1 projection over the
# stem's 32 channels), block 2 (a 1x1 expansion, a 5 x 5 depthwise conv, a 1x1 projection) and the
# classifier (K = 1280): each kind of layer and each K the checks name, in 6 of the 23 GEMMs (the
# telemetry's compilation is most of the run's time).
AGREEMENT_SKIP = ('^(?!blocks/0/|blocks/2/|fc$)',)


def agreement_config():
  """configs/imagenet_efficientnet.py with random weights, batches of 9 views and AGREEMENT_SKIP
  (its model is the tiny one while efficientnet.VARIANTS['lite0'] is TINY_LITE's)."""
  from configs import imagenet_efficientnet
  config = imagenet_efficientnet.get_config()
  config.pretrained = ''
  config.data.eval_batch_size = 9
  config.accumulator.skip = AGREEMENT_SKIP
  return config


@pytest.fixture(scope='session')
def small_agreement(tmp_path_factory):
  """experiments.agreement's small run: (config, model export, output prefix <dir>/agreement_tiny,
  its JSON's content) of the tiny Lite with He-scaled random weights and batch statistics, at
  AGREEMENT_FORMATS on AGREEMENT_INPUTS views, telemetry at M7E4b10 on 2 views. Skips without the
  photo wheels."""
  from flax import nnx

  from experiments import agreement, train
  from lowacc.data import photo_views
  from lowacc.models import efficientnet
  from tests.test_efficientnet import _random_state
  try:
    photo_views.photo_views()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  root = tmp_path_factory.mktemp('agreement')
  variant = efficientnet.Variant(**TINY_LITE)
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(efficientnet.VARIANTS, 'lite0', variant)
    config = agreement_config()
    model = nnx.eval_shape(lambda: efficientnet.efficientnet_lite('lite0', num_classes=1000,
                                                                  rngs=nnx.Rngs(3)))
    efficientnet.load_torch(model, _random_state(efficientnet.torch_shapes(model), seed=3))
    export = str(root / 'model')
    train.export_model(model, export)
    out = str(root / 'agreement_tiny')
    result = agreement.run(config, export, AGREEMENT_FORMATS, AGREEMENT_INPUTS, 1, 2,
                           ('M7E4b10',), out)
  return config, export, out, result


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist (`-n`, with --dist loadgroup), tests that share one of our module- or
  session-scoped fixtures, directly or through another test, run on one worker, so each such
  fixture is built once; every other test goes to whichever worker is free."""
  parent = {}

  def root(key):
    while parent.setdefault(key, key) != key:
      key = parent[key]
    return key

  shared = {}
  for item in items:
    fixtures = item._fixtureinfo.name2fixturedefs.items()
    shared[item] = [f'{d.baseid}::{name}' for name, defs in fixtures for d in defs[-1:]
                    if d.scope in ('module', 'session') and (d.baseid or '').startswith('tests')]
    for key in shared[item][1:]:
      parent[root(key)] = root(shared[item][0])
  for item, keys in shared.items():
    if keys:
      item.add_marker(pytest.mark.xdist_group(root(keys[0])))
