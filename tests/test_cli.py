"""Bad input on the command line: one line naming the field and the fix, exit 2, nothing written."""

import os

import pytest

from bigjax import train

from conftest import REPO

CNN = os.path.join(REPO, 'configs', 'mnist_cnn.py')
MLP = os.path.join(REPO, 'configs', 'mlp_breast_cancer.py')

# (extra argv, text the one-line message must contain). 8 fake devices in tests.
INVALID = [
  (['--config.optim.lrr=1'], "config.optim has no field 'lrr'; its fields: b1"),
  (['--config.nope=1'], "config has no field 'nope'"),
  (['--config.model.kwargs.widths=3'], "config.model.kwargs has no field 'widths'"),
  (['--config.optim.lr.x=2'], "config.optim.lr has no field 'x'"),
  (['--config.optim.lr=abc'], '--config.optim.lr=abc: could not convert'),
  (['--config.batch_size=1.5'], '--config.batch_size=1.5'),
  (['--config.batch_size=many'], '--config.batch_size=many'),
  (['--config.augment.enabled=maybe'], '--config.augment.enabled=maybe'),
  (['--config.mesh=3'], '--config.mesh=3'),
  (['--config.seed=one'], '--config.seed=one'),
  (['--config.num_epochs=2.5'], '--config.num_epochs=2.5'),
  (['--config.mesh.tensor=3'], 'config.mesh.tensor=3 does not divide 8 devices'),
  (['--config.mesh.data=16'], 'config.mesh.data=16 does not divide 8 devices'),
  (['--config.mesh.data=-1', '--config.mesh.fsdp=-1'], 'only one axis may be -1'),
  (['--config.mesh.data=0'], 'config.mesh.data=0 must be a positive size'),
  (
    ['--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=1'],
    'use 4 of 8 devices; set one axis to -1',
  ),
  (['--config.batch_size=12'], 'config.batch_size=12 is not divisible by the data-parallel size 8'),
  (['--config.eval_batch_size=100'], 'config.eval_batch_size=100 is not divisible'),
  (['--config.batch_size=0'], 'config.batch_size=0 is not divisible'),
  (['--config.batch_size=8000'], 'config.batch_size=8000 is larger than the training split'),
  (['--config.model.name=cnnn'], "config.model.name='cnnn' is unknown; known models: bert, cnn"),
  (['--config.task.name=clasify'], "config.task.name='clasify' is unknown; known tasks"),
  (['--config.optim.name=adamm'], "config.optim.name='adamm' is unknown; known optimizers: adam"),
  (['--config.optim.schedule=cosine'], "config.optim.schedule='cosine' is unknown"),
  (['--config.data.name=mnist6k'], "config.data.name='mnist6k' is not a TFDS dataset"),
  (['--config.data.name=cifar10'], "dataset 'cifar10' is not prepared in"),
  (['--config.data.train_split=training'], "split 'training' of dataset 'mnist5k'"),
  (['--config.nan_policy=ignore'], "config.nan_policy='ignore' is unknown; use one of raise, skip"),
  (['--config.log_every=0'], 'config.log_every=0 must be positive'),
  # Sizes that follow from the data are not config fields: build() derives them.
  (['--config.model.kwargs.num_classes=7'], "config.model.kwargs has no field 'num_classes'"),
  (['--config.model.kwargs.pool_after=(True,)'], 'config.model.kwargs.pool_after has 1 entries'),
  (['--config.model.kwargs.kernel_init=xavier'], "kernel_init='xavier' is unknown"),
  (['--bogus=1'], "Unknown command line flag 'bogus'"),
]


def _run(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize('extra, expected', INVALID, ids=[' '.join(e) for e, _ in INVALID])
def test_invalid_input_is_one_line_exit_2_and_writes_nothing(extra, expected, tmp_path, capsys):
  workdir = tmp_path / 'run'
  code, err = _run(['train', f'--config={CNN}:smoke', f'--workdir={workdir}', *extra], capsys)
  lines = [l for l in err.splitlines() if l.strip() and not l.startswith(('WARNING', 'I0', 'W0'))]
  assert code == 2
  assert len(lines) == 1 and lines[0].startswith('bigjax: error: '), err
  assert expected in lines[0]
  assert 'Traceback' not in err
  assert not workdir.exists()


@pytest.mark.parametrize(
  'argv, expected',
  [
    ([f'--config={CNN}:bogus=1'], "config arg 'bogus' is unknown; known args: data, smoke"),
    ([f'--config={MLP}:smoke=perhaps'], "config arg smoke='perhaps' is not a boolean"),
    (['--config=configs/nope.py'], '--config=configs/nope.py: no such config file'),
    ([], '--config required; see bigjax-train --help'),
  ],
)
def test_invalid_config_file_or_args(argv, expected, tmp_path, capsys):
  code, err = _run(['train', *argv, f'--workdir={tmp_path / "run"}'], capsys)
  assert code == 2 and expected in err and 'Traceback' not in err
  assert not (tmp_path / 'run').exists()


def test_a_workdir_of_another_model_is_refused(tmp_path, capsys):
  workdir = tmp_path / 'run'
  base = [
    'train',
    f'--config={CNN}:smoke',
    f'--workdir={workdir}',
    '--config.num_steps=2',
    '--config.mesh.data=1',
    '--config.mesh.fsdp=-1',
  ]
  train.main(base)
  code, err = _run(base + ['--config.model.kwargs.dense_features=(32,)'], capsys)
  assert code == 2 and 'holds a run with a different config.model' in err


def test_a_derived_size_set_in_a_config_is_refused(one_device):
  """Each fact once: the class count comes from the dataset, so a config that states it is told
  to drop it (and a model/task that disagree can no longer be configured)."""
  from bigjax import config_lib, experiment
  from bigjax.errors import UserError

  config = config_lib.load_config_file(f'{CNN}:smoke')
  config.model.kwargs.num_classes = 7
  with pytest.raises(
    UserError,
    match=r'config.model.kwargs.num_classes=7: bigjax derives it from '
    r'the data \(output_size = 10\); remove that field',
  ):
    experiment.build(config, one_device)
