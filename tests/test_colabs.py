"""Every notebook in colabs/ executes top to bottom on its smoke parameters, from a fresh directory
outside the repository (the notebooks import the installed package, never the checkout), and
shows a stated number; every plot cell renders an image; the set-up cell picks the CPU path here
and the right jax build elsewhere."""

import glob
import os
import shutil

from nbclient import NotebookClient
import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colabs', '*.ipynb')))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS]


def _run(name, tmp_path):
  """Executes colabs/<name>.ipynb with SMOKE = True injected after its parameters cell (as
  papermill does) in `tmp_path`; returns the executed notebook (errors fail the test)."""
  nb = nbformat.read(os.path.join(REPO, 'colabs', f'{name}.ipynb'), as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell('SMOKE = True  # injected by the test'))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the notebook sets its own
  client = NotebookClient(
    nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  )
  client.execute(env=env)
  errors = [
    o
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.get('outputs', [])
    if o.get('output_type') == 'error'
  ]
  assert not errors, errors[0].get('evalue')
  return nb


def _text(nb):
  return '\n'.join(
    o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
  )


def _plots_render(nb):
  for cell in nb.cells:
    if cell.cell_type == 'code' and ('plt.show()' in cell.source or 'display(Image' in cell.source):
      assert any('image/png' in o.get('data', {}) for o in cell.outputs), cell.source[:80]


def test_every_notebook_starts_with_the_same_set_up_cell():
  firsts = [nbformat.read(p, as_version=4).cells[1].source for p in NOTEBOOKS]
  assert set(NAMES) >= {'quickstart', 'sharding', 'gpt_shakespeare', 'sweep_results', 'explain'}
  assert len(set(firsts)) == 1 and 'def detect_runtime' in firsts[0]
  for path in NOTEBOOKS:
    params = [
      c
      for c in nbformat.read(path, as_version=4).cells
      if 'parameters' in c.metadata.get('tags', [])
    ]
    assert len(params) == 1 and 'SMOKE = False' in params[0].source, path  # the real run ships


def _set_up_namespace(monkeypatch, **env):
  source = nbformat.read(NOTEBOOKS[0], as_version=4).cells[1].source
  head = source[: source.index('RUNTIME = detect_runtime()')]  # definitions only: no install
  for key in ('COLAB_TPU_ADDR', 'TPU_ACCELERATOR_TYPE'):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  namespace = {}
  exec(head, namespace)
  return namespace


def test_set_up_cell_chooses_the_cpu_path_here_and_the_matching_jax_elsewhere(monkeypatch):
  ns = _set_up_namespace(monkeypatch)
  if shutil.which('nvidia-smi') is None and not os.path.exists('/dev/accel0'):
    assert ns['detect_runtime']() == 'cpu'
  cmds = {rt: [' '.join(c[3:]) for c in ns['install_commands'](rt)] for rt in ('cpu', 'gpu', 'tpu')}
  assert cmds['cpu'] == ['install -q -U jax', 'install -q ' + ns['BIGJAX']]
  assert (
    cmds['gpu'][0] == 'install -q -U jax[cuda12]' and cmds['tpu'][0] == 'install -q -U jax[tpu]'
  )
  assert (
    _set_up_namespace(monkeypatch, TPU_ACCELERATOR_TYPE='v5litepod-8')['detect_runtime']() == 'tpu'
  )
  legacy = _set_up_namespace(monkeypatch, COLAB_TPU_ADDR='10.0.0.2:8470')
  assert legacy['detect_runtime']() == 'tpu-node'
  with pytest.raises(RuntimeError, match='legacy TPU-node runtime cannot run current jax'):
    legacy['install_commands']('tpu-node')


@pytest.mark.slow  # executes the notebook: 40-80 s on 2 cores (CI's slow pass runs it)
def test_quickstart(tmp_path):
  nb = _run('quickstart', tmp_path)
  text = _text(nb)
  assert 'runtime: cpu' in text and 'bigjax is already installed' in text
  accuracy = float(text.split('test accuracy ')[1].split()[0])
  assert accuracy > 0.5  # mnist_cnn:smoke, 20 steps: well above the 0.1 of chance
  _plots_render(nb)


@pytest.mark.slow  # executes the notebook: 40-80 s on 2 cores (CI's slow pass runs it)
def test_sharding(tmp_path):
  nb = _run('sharding', tmp_path)
  text = _text(nb)
  assert '8 devices' in text and "mesh axes {'data': 1, 'fsdp': 8, 'tensor': 1}" in text
  # The (vocab 260, embed 32) table: vocab over 'tensor' (size 1 here), embed 8 ways over 'fsdp'.
  embed = next(l for l in text.splitlines() if l.startswith('embed/embedding'))
  assert embed.split()[1:] == ['(260,', '32)', "P('tensor',", "'fsdp')", 'shard', '(260,', '4)']
  steps = {
    l.split()[0]: float(l.split('loss ')[1])
    for l in text.splitlines()
    if 'ms/step' in l and l.split()[0] in ('data', 'fsdp', 'tensor')
  }
  assert list(steps) == ['data', 'fsdp', 'tensor']
  # Data- and FSDP-parallel run the same global batch (64): the same loss, however it is split.
  assert abs(steps['data'] - steps['fsdp']) < 1e-3
  _plots_render(nb)


@pytest.mark.slow  # executes the notebook: 40-80 s on 2 cores (CI's slow pass runs it)
def test_gpt_shakespeare(tmp_path):
  nb = _run('gpt_shakespeare', tmp_path)
  text = _text(nb)
  first, last = (float(x) for x in text.split('train loss ')[1].split(';')[0].split(' -> '))
  assert last < first - 0.5  # the smoke GPT's byte loss falls from ~5.5 within its steps
  samples = [l for l in text.splitlines() if l.startswith(' ROMEO.')]
  assert len(samples) == 3
  _plots_render(nb)


@pytest.mark.slow  # executes the notebook: 40-80 s on 2 cores (CI's slow pass runs it)
def test_sweep_results(tmp_path):
  nb = _run('sweep_results', tmp_path)
  text = _text(nb)
  settings = [l for l in text.splitlines() if ' accuracy ' in l and 'over 1 run(s)' in l]
  assert len(settings) == 4  # 2 learning rates x 2 weight decays, one seed each on SMOKE
  assert all(float(l.split(' accuracy ')[1].split()[0]) > 0.8 for l in settings)
  assert 'best setting: ' in text
  _plots_render(nb)


@pytest.mark.slow  # executes the notebook: 40-80 s on 2 cores (CI's slow pass runs it)
def test_explain(tmp_path):
  nb = _run('explain', tmp_path)
  text = _text(nb)
  gaps = [
    float(l.split('gap ')[1].rstrip('%')) for l in text.splitlines() if 'completeness gap' in l
  ]
  assert len(gaps) == 2 and gaps[1] < gaps[0] and gaps[1] < 5.0  # more IG steps converge
  top, rand = (
    float(x.split()[-1]) for x in text.split('logit drop: ')[1].splitlines()[0].split(',')
  )
  assert top > 2 * rand  # the pixels IG ranks highest matter more than random ones
  _plots_render(nb)


@pytest.mark.slow  # executes the notebook: three smoke GPT runs, ~90 s on 2 cores
def test_finetune_lora(tmp_path):
  nb = _run('finetune_lora', tmp_path)
  text = _text(nb)
  shares = {
    l.split(':')[0]: float(l.split('(')[1].split('%')[0])
    for l in text.splitlines()
    if l.startswith(('full: ', 'lora: '))
  }
  assert shares['full'] == 100.0 and 0 < shares['lora'] < 10.0  # only the adapter trains
  for name in ('full', 'lora'):
    first, last = (float(x) for x in text.split(f'{name} fine-tune train loss ')[1].split()[0:3:2])
    assert last < first - 0.05, (name, first, last)  # both keep learning from the checkpoint
  diffs = [float(x.split()[0]) for x in text.split('max abs difference ')[1:]]
  assert len(diffs) == 2 and max(diffs) < 1e-4  # merged == adapter, in bigjax and transformers
  assert "'config.json', 'model.safetensors'" in text  # the HF directory and the merged export
  assert sum(l.startswith("'ROMEO.") for l in text.splitlines()) == 3
  _plots_render(nb)
