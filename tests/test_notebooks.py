"""Every notebook in notebooks/ runs top to bottom on a small run's results (a failing cell raises)
and writes its figures."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'notebooks', '*.ipynb')))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) == 4


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_on_a_small_run(path, small_results, tmp_path, monkeypatch):
  root, _ = small_results
  figures = tmp_path / 'figures'
  monkeypatch.setenv('LOWACC_RESULTS', str(root))
  monkeypatch.setenv('LOWACC_FIGURES', str(figures))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  assert os.listdir(figures), 'the notebook saved no figure'
