"""Early stopping, the best checkpoint, and the learning curve kept across restarts (history.jsonl)."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from bigjax import checkpoint, experiment, steps, train
from bigjax import history as history_lib
from bigjax.errors import UserError

from conftest import REPO, load_config

MLP = os.path.join(REPO, 'configs', 'mlp_breast_cancer.py')


def _config(**overrides):
  """breast_cancer MLP (14 steps per epoch), eval every epoch, stop when the eval loss has not
  improved for 5 evals (it bottoms out near step 240 of 700)."""
  config = load_config('mlp_breast_cancer')
  config.eval_every = 14
  config.checkpoint_every = 70
  config.early_stopping.update(metric='loss', mode='min', patience=5)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  return workdir, train.train_and_evaluate(_config(), str(workdir), devices=jax.devices()[:1])


def _evals(results):
  return [(h['step'], h['loss']) for h in results['history'] if h['split'] == 'eval']


def _eval_loss(config, params):
  """The eval report's loss for `params`, computed directly from the model."""
  exp = experiment.build(config, jax.devices()[:1])
  logits = steps.apply_model(exp.model, {'params': params}, exp.eval_arrays, train=False)
  probs = np.asarray(exp.task.eval_outputs(logits, exp.eval_arrays))
  return exp.task.eval_report(probs, exp.eval_arrays['label'])['loss']


def test_stops_after_patience_and_keeps_the_best(uninterrupted):
  workdir, results = uninterrupted
  evals = _evals(results)
  best_step, best_loss = min(evals, key=lambda e: e[1])
  assert results['stopped_early'] and results['step'] < 700
  assert results['step'] == best_step + 5 * 14 == evals[-1][0]  # 5 evals without improvement
  assert all(loss >= best_loss for _, loss in evals)
  best = results['best']
  assert (best['step'], best['metric'], best['value']) == (best_step, 'loss', best_loss)
  assert best['eval']['loss'] == best_loss and 0.95 <= best['eval']['accuracy'] <= 1.0
  assert results['eval']['loss'] == evals[-1][1] > best_loss  # eval stays the final state's
  assert best == json.load(open(workdir / 'best.json'))
  # best/ holds exactly the best state; checkpoints/ holds the step training stopped at.
  step, tree = checkpoint.load_latest(workdir / 'best')
  assert step == best_step and os.listdir(workdir / 'best') == [str(best_step)]
  np.testing.assert_allclose(_eval_loss(_config(), tree['params']), best_loss, rtol=1e-5)
  assert checkpoint.load_latest(workdir / 'checkpoints')[0] == results['step']


def test_a_run_that_stopped_early_does_not_train_when_rerun(uninterrupted, tmp_path):
  workdir, results = uninterrupted
  shutil.copytree(workdir, tmp_path / 'copy')
  again = train.train_and_evaluate(_config(), str(tmp_path / 'copy'), devices=jax.devices()[:1])
  assert again['steps_this_run'] == 0 and again['stopped_early']
  assert again['step'] == results['step'] and again['best'] == results['best']
  assert again['history'] == results['history']  # the final eval is not counted twice
  assert again['eval']['loss'] == pytest.approx(results['eval']['loss'], rel=1e-6)


def test_restart_after_a_lost_checkpoint_gives_the_same_run(uninterrupted, tmp_path):
  """Stop at step 196 (best so far: 196), lose checkpoint 196 as a kill before its commit would,
  re-run: training resumes at 140 with the history cut there, re-saves best 196, goes on to the
  same stop step, best state (bitwise) and learning curve as the uninterrupted run."""
  ref_dir, ref = uninterrupted
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(_config(num_steps=196), str(workdir), devices=jax.devices()[:1])
  assert first['best']['step'] == 196 and not first['stopped_early']
  shutil.rmtree(workdir / 'checkpoints' / '196')
  results = train.train_and_evaluate(_config(), str(workdir), devices=jax.devices()[:1])
  assert results['steps_this_run'] == results['step'] - 140
  assert results['history'] == ref['history']
  assert (results['step'], results['stopped_early'], results['best']) == (
    ref['step'],
    True,
    ref['best'],
  )
  train_steps = [h['step'] for h in results['history'] if h['split'] == 'train']
  assert train_steps == list(range(14, results['step'] + 1, 14))  # strictly increasing, complete
  lines = [json.loads(l) for l in open(workdir / 'history.jsonl')]
  assert lines == results['history']
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.load_latest(workdir / 'best'),
    checkpoint.load_latest(ref_dir / 'best'),
  )


def test_history_file_drops_entries_after_the_restored_step(tmp_path):
  path = str(tmp_path / 'history.jsonl')
  with open(path, 'w') as f:
    for step in (10, 20, 30):
      f.write(json.dumps({'step': step, 'split': 'train', 'loss': step / 10}) + '\n')
    f.write('{"step": 40, "spl')  # cut short by a kill
  history = history_lib.History(path, restored_step=20)
  assert [e['step'] for e in history.entries] == [10, 20]
  history.append({'step': 30, 'split': 'eval', 'loss': 0.5})
  history.close()
  assert [json.loads(l) for l in open(path)] == [
    {'step': 10, 'split': 'train', 'loss': 1.0},
    {'step': 20, 'split': 'train', 'loss': 2.0},
    {'step': 30, 'split': 'eval', 'loss': 0.5},
  ]
  assert history_lib.History(path, restored_step=0).entries == []  # a fresh run starts empty


def test_max_mode_and_min_delta(tmp_path):
  cfg = ml_collections.ConfigDict(dict(metric='accuracy', mode='max', patience=2, min_delta=0.05))
  history = [
    {'step': s, 'split': 'eval', 'accuracy': a} for s, a in ((1, 0.5), (2, 0.6), (3, 0.64))
  ]
  es = history_lib.EarlyStopping(cfg, str(tmp_path), history)  # replayed from the history
  assert (es.best_step, es.best_value, es.bad_evals, es.stopped) == (2, 0.6, 1, False)
  es.update(4, {'accuracy': 0.649}, state=None)  # +0.049 <= min_delta: no improvement, no save
  assert es.stopped and es.best_step == 2 and es.best() is None
  es.close()


def test_unknown_metric_names_the_known_ones(tmp_path):
  config = _config(num_steps=2, eval_every=1)
  config.early_stopping.metric = 'acc'
  with pytest.raises(
    UserError,
    match=r"config.early_stopping.metric='acc' is not a scalar of the "
    r"eval report; use one of loss, accuracy, precision",
  ):
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert os.listdir(tmp_path) == []  # found before anything is written, not at the first eval


@pytest.mark.parametrize(
  'extra, expected',
  [
    (
      ['--config.early_stopping.metric=loss'],
      "config.early_stopping.metric='loss' needs periodic evals; set config.eval_every > 0",
    ),
    (
      [
        '--config.early_stopping.metric=loss',
        '--config.eval_every=14',
        '--config.early_stopping.mode=lowest',
      ],
      "config.early_stopping.mode='lowest' is unknown",
    ),
    (
      [
        '--config.early_stopping.metric=loss',
        '--config.eval_every=14',
        '--config.early_stopping.patience=-1',
      ],
      'config.early_stopping.patience=-1 and min_delta',
    ),
  ],
)
def test_invalid_early_stopping_is_one_line_exit_2(extra, expected, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(['train', f'--config={MLP}', f'--workdir={tmp_path / "run"}', *extra])
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip() and not l.startswith(('WARNING', 'I0', 'W0'))]
  assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], err
  assert not (tmp_path / 'run').exists()
