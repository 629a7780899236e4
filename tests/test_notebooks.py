"""Every notebook in notebooks/ runs top to bottom on a small run's results (a failing cell raises)
and writes its figures; the agreement and hardware notebooks' tables show the numbers of the
points files their small runs wrote."""

import glob
import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'notebooks', '*.ipynb')))
WIDTH, AGREEMENT, HARDWARE = ('01_accuracy_vs_width.ipynb', '05_agreement.ipynb',
                              '06_hardware_integer.ipynb')
HOPPER_FP8 = 'Hopper/wgmma/m64n8k32.f32.e4m3.e4m3'
# The notebooks print percentages with 2 decimals and KL with 4: a shown number is the file's
# rounded, so it is within half a unit of its last digit.
HALF = {2: 0.005 + 1e-9, 4: 0.00005 + 1e-12}


def _path(name):
  return next(p for p in NOTEBOOKS if os.path.basename(p) == name)


def _execute(path, results, tmp_path, monkeypatch):
  """Runs the notebook on `results`; returns (what its cells printed, its figures' names)."""
  figures = tmp_path / 'figures'
  monkeypatch.setenv('LOWACC_RESULTS', str(results))
  monkeypatch.setenv('LOWACC_FIGURES', str(figures))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  printed = ''.join(o['text'] for cell in notebook.cells if cell.cell_type == 'code'
                    for o in cell.outputs if o.get('name') == 'stdout')
  return printed, sorted(os.listdir(figures))


def _points(prefix):
  with open(prefix + '.points.jsonl') as f:
    return [json.loads(line) for line in f]


def _close(shown, value, digits, scale=100):
  """Whether the printed `shown` is `value` x `scale` rounded to `digits` (a None value: 'nan')."""
  if value is None:
    return shown == 'nan'
  return abs(float(shown) - scale * value) <= HALF[digits]


def test_there_are_notebooks():
  assert len(NOTEBOOKS) == 6


@pytest.mark.parametrize('path', [p for p in NOTEBOOKS if os.path.basename(p) not in
                                  (WIDTH, AGREEMENT, HARDWARE)], ids=os.path.basename)
def test_notebook_runs_on_a_small_run(path, small_results, tmp_path, monkeypatch):
  root, _ = small_results
  _, figures = _execute(path, root, tmp_path, monkeypatch)
  assert figures, 'the notebook saved no figure'


def test_width_notebook_shows_the_small_runs_fine_tuning(small_results, tmp_path, monkeypatch):
  root, _ = small_results
  printed, figures = _execute(_path(WIDTH), root, tmp_path, monkeypatch)
  assert figures == ['finetune.png', 'finetune_loss.png', 'zero_shot_width.png']
  tuned, = json.load(open(root / 'sweep_demo.json'))['finetune']
  n = _points(str(root / 'sweep_demo'))[0]['examples']
  shown = re.search(r'^demo +M5E4 +float32 +([\d.]+) \+- ([\d.]+)  zero-shot', printed, re.M)
  p = tuned['baseline']
  assert _close(shown[1], p, 2) and _close(shown[2], (p * (1 - p) / n) ** 0.5, 2)
  with open(root / 'sweep_demo_finetune' / 'M5E4' / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  for phase in ('stage1', 'stage2'):
    loss = [r['loss'] for r in logged if r['phase'] == phase]
    count, first, last = re.search(rf'^demo +M5E4 +{phase}: (\d+) logged steps, loss ([\d.]+) -> '
                                   r'([\d.]+)', printed, re.M).groups()
    assert int(count) == len(loss)
    assert _close(first, loss[0], 4, scale=1) and _close(last, loss[-1], 4, scale=1)


# The kinds experiments.agreement gives the small run's simulated layers (conftest.AGREEMENT_SKIP).
KINDS = {'blocks/0/depthwise_conv': 'depthwise', 'blocks/0/project_conv': '1x1 projection',
         'blocks/2/expand_conv': '1x1 expansion', 'blocks/2/depthwise_conv': 'depthwise',
         'blocks/2/project_conv': '1x1 projection', 'fc': 'classifier'}


def test_agreement_notebook_shows_the_small_runs_points(small_agreement, tmp_path, monkeypatch):
  _, _, out, _ = small_agreement
  printed, figures = _execute(_path(AGREEMENT), os.path.dirname(out), tmp_path, monkeypatch)
  name = os.path.basename(out)[len('agreement_'):]
  assert figures == sorted([f'agreement_{name}.png', f'agreement_telemetry_{name}.png',
                            f'agreement_units_{name}.png'])
  points = {p['format']: p for p in _points(out)}
  number = r'\s*(nan|[\d.]+) \+-\s*(nan|[\d.]+)'
  table = {m[1]: m.groups()[1:] for m in re.finditer(
      rf'^  (\S+) +(\d+) \|{number} \|{number} \|{number}$', printed, re.M)}
  assert set(table) == set(points)
  for fmt, p in points.items():
    bits, *shown = table[fmt]
    assert int(bits) == p['bits'], fmt
    for (key, scale, digits), (v, se) in zip((('top1', 100, 2), ('agreement', 100, 2),
                                               ('kl', 1, 4)), zip(shown[::2], shown[1::2])):
      assert _close(v, p[key], digits, scale) and _close(se, p[f'{key}_se'], digits, scale), \
          (fmt, key, v, se, p[key], p[f'{key}_se'])
  # the telemetry: each simulated layer's kind, K, steps lost and flushed, saturated steps and
  # relative error, at the one format that has them
  sections = re.split(r'^  (\S+)\n', printed.split('relative error (%)\n', 1)[1], flags=re.M)[1:]
  assert sections[::2] == ['M7E4b10']
  counters = points['M7E4b10']['counters']
  rows = re.findall(r'^    (\S+) +(\S.*?) +(\d+) \| +([\d.]+) \| +([\d.]+) \| +(\d+) \| +([\d.]+)$',
                    sections[1], re.M)
  assert [r[0] for r in rows] == sorted(counters, key=lambda n: (counters[n]['K'], n))
  for layer, kind, k, lost, flush, sat, rel in rows:
    c = counters[layer]
    assert kind == KINDS[layer] and int(k) == c['K'] and int(sat) == c['sat'], layer
    assert _close(lost, c['lost'] / c['steps'], 2) and _close(flush, c['flush'] / c['steps'], 2)
    assert _close(rel, c['rel_error'], 2), layer


@pytest.fixture(scope='module')
def small_hardware_sweep(small_results, tmp_path_factory):
  """The output prefix of a sweep of small_results' model over Hopper's FP8 preset and integer
  registers of 8 and 16 bits that wrap or saturate, the classifier alone simulated (seconds a
  point)."""
  from configs import demo
  from experiments import sweep
  config = demo.get_config('runlocal')
  config.accumulator.skip = ('^(?!fc$)',)
  out = str(tmp_path_factory.mktemp('hardware') / 'sweep_hardware')
  sweep.sweep(config, small_results[1], ['hardware', 'integer'],
              sweep.axes(presets=[HOPPER_FP8], int_widths=[8, 16]), [], 1, 4, out)
  return out


def test_hardware_notebook_shows_the_small_sweeps_points(small_hardware_sweep, tmp_path,
                                                         monkeypatch):
  out = small_hardware_sweep
  printed, figures = _execute(_path(HARDWARE), os.path.dirname(out), tmp_path, monkeypatch)
  assert figures == ['hardware_integer_hardware.png']
  points = {p['format']: p for p in _points(out)}
  assert re.search(rf"^hardware \(float32 {100 * points['float32']['metric']:.2f}\)$", printed,
                   re.M)
  presets = re.findall(r'^  preset (\S+) +([\d.]+)$', printed, re.M)
  assert [fmt for fmt, _ in presets] == [HOPPER_FP8]
  assert all(_close(acc, points[fmt]['metric'], 2) for fmt, acc in presets)
  registers = re.findall(r'^  INT(\d+) +wrap +([\d.]+) \((\d+)/(\d+) layers\) saturate +([\d.]+) '
                         r'\((\d+)/(\d+) layers\)$', printed, re.M)
  assert [r[0] for r in registers] == ['8', '16']
  for bits, *cells in registers:
    for (acc, hit, layers), overflow in zip((cells[:3], cells[3:]), 'ws'):
      p = points[f'INT{bits}{overflow}']
      assert _close(acc, p['metric'], 2) and int(layers) == len(p['layers']) == 1
      assert int(hit) == sum(s['sat'] > 0 for s in p['layers'].values())
  # 127 x 127 does not fit an 8-bit register: the classifier leaves its range, wrapping or not
  assert registers[0][2] == registers[0][5] == '1'
