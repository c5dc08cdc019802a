"""Every notebook in colabs/ executes top to bottom on its smoke settings, from a fresh directory
(the notebooks import the installed package, never the checkout)."""

import glob
import os

from nbclient import NotebookClient
import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colabs', '*.ipynb')))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  ).execute()
  errors = [
    o
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.get('outputs', [])
    if o.get('output_type') == 'error'
  ]
  assert not errors
