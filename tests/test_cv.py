"""Cross-validation folds of the train split, and the final eval's predictions file."""

import os

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.model_selection import StratifiedKFold

from bigjax import experiment, train
from bigjax.data import pipeline
from bigjax.errors import DataError

from conftest import REPO, load_config


def _breast_cancer_train():
  arrays = pipeline.load_split('breast_cancer', 'train')
  return dict(arrays, index=np.arange(len(arrays['label'])))  # rows carry their index


def test_held_out_folds_partition_the_train_split():
  arrays = _breast_cancer_train()
  n, k = len(arrays['label']), 5
  held_out = []
  for fold in range(k):
    train_part, eval_part = pipeline.cv_split(arrays, k, fold)
    assert not set(train_part['index']) & set(eval_part['index'])
    assert len(train_part['index']) + len(eval_part['index']) == n
    np.testing.assert_array_equal(eval_part['inputs'], arrays['inputs'][eval_part['index']])
    held_out.append(eval_part)
  sizes = [len(h['index']) for h in held_out]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n == 455
  np.testing.assert_array_equal(
    np.sort(np.concatenate([h['index'] for h in held_out])), np.arange(n)
  )  # disjoint, union = all
  positives = [h['label'].sum() for h in held_out]  # stratified: 290 positives, 58 per fold
  assert arrays['label'].sum() == 290 and positives == [58] * 5
  # Fixed assignment: the same every call, and not the identity order.
  np.testing.assert_array_equal(
    pipeline.cv_fold_ids(arrays['label'], k), pipeline.cv_fold_ids(arrays['label'].copy(), k)
  )
  assert not np.array_equal(held_out[0]['index'], np.arange(sizes[0]))
  # The folds are scikit-learn's StratifiedKFold's (shuffled with CV_SEED), in its order.
  splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=pipeline.CV_SEED)
  for h, (_, expected) in zip(held_out, splitter.split(arrays['inputs'], arrays['label'])):
    np.testing.assert_array_equal(h['index'], expected)


def test_a_class_smaller_than_the_fold_count_is_one_line_error():
  labels = np.array([0] * 10 + [1] * 3)
  assert np.bincount(pipeline.cv_fold_ids(labels, 3)[labels == 1]).tolist() == [1, 1, 1]
  with pytest.raises(
    DataError,
    match=r'^config.data.cv_folds=4 is more than the 3 training '
    r'example\(s\) of label 1; .* lower config.data.cv_folds to '
    r'at most 3$',
  ):
    pipeline.cv_fold_ids(labels, 4)
  with pytest.raises(
    DataError,
    match=r'cv_folds=2 is more than the 1 training example\(s\) of '
    r'label 7; .*no stratified split exists',
  ):
    pipeline.cv_fold_ids(np.array([0] * 10 + [7]), 2)


def test_cv_data_ignores_the_test_split_and_config_seed():
  loaded = []
  for seed in (0, 7):
    config = load_config('mlp_breast_cancer')
    config.data.update(cv_folds=5, cv_fold=3, standardize=False)
    config.seed = seed
    loaded.append(experiment.load_data(config))
  (train_a, eval_a, name_a), (train_b, eval_b, _) = loaded
  assert name_a == 'train (cv fold 3 of 5)'
  assert (len(train_a['label']), len(eval_a['label'])) == (364, 91)
  np.testing.assert_array_equal(eval_a['inputs'], eval_b['inputs'])
  full = pipeline.load_split('breast_cancer', 'train')
  _, expected = pipeline.cv_split(full, 5, 3)
  np.testing.assert_array_equal(eval_a['inputs'], expected['inputs'])


def test_breast_cancer_fold_0_reaches_90_percent_and_saves_predictions(tmp_path, one_device):
  config = load_config('mlp_breast_cancer')
  config.data.update(cv_folds=5, cv_fold=0)
  config.save_eval_predictions = True
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  report = results['eval']
  assert report['accuracy'] >= 0.9 and np.sum(report['confusion_matrix']) == 91
  saved = np.load(tmp_path / 'eval_predictions.npz')
  _, held_out = pipeline.cv_split(pipeline.load_split('breast_cancer', 'train'), 5, 0)
  np.testing.assert_array_equal(saved['labels'], held_out['label'])
  scores = saved['scores']  # P(label=1), (N,)
  assert scores.shape == (91,) and scores.min() >= 0 and scores.max() <= 1
  assert skm.accuracy_score(saved['labels'], scores > 0.5) == report['accuracy']
  assert skm.roc_auc_score(saved['labels'], scores) == pytest.approx(report['roc_auc'], abs=1e-9)


def test_multiclass_predictions_are_class_probabilities(tmp_path, one_device):
  config = load_config('mlp_breast_cancer')
  config.data.name = 'digits'
  config.task.kwargs = dict(binary=False)  # 10 classes and outputs: from the dataset's info
  config.num_steps, config.save_eval_predictions = 30, True
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  saved = np.load(tmp_path / 'eval_predictions.npz')
  assert saved['scores'].shape == (360, 10) and saved['labels'].shape == (360,)
  np.testing.assert_allclose(saved['scores'].sum(1), 1.0, rtol=1e-5)
  assert np.mean(saved['scores'].argmax(1) == saved['labels']) == results['eval']['accuracy']
  np.testing.assert_array_equal(
    skm.confusion_matrix(saved['labels'], saved['scores'].argmax(1)),
    results['eval']['confusion_matrix'],
  )


MLP = os.path.join(REPO, 'configs', 'mlp_breast_cancer.py')
GPT = os.path.join(REPO, 'configs', 'gpt_shakespeare.py')


@pytest.mark.parametrize(
  'argv, expected',
  [
    (
      [f'--config={MLP}', '--config.data.cv_folds=1'],
      'config.data.cv_folds=1, cv_fold=0: need cv_folds >= 2 and 0 <= cv_fold < cv_folds',
    ),
    (
      [f'--config={MLP}', '--config.data.cv_folds=5', '--config.data.cv_fold=5'],
      'config.data.cv_folds=5, cv_fold=5: need',
    ),
    (
      [f'--config={MLP}', '--config.data.cv_fold=2'],
      'config.data.cv_fold=2 needs config.data.cv_folds >= 2',
    ),
    (
      [f'--config={MLP}', '--config.data.cv_folds=1000'],
      'config.data.cv_folds=1000 must lie in [2, 455]',
    ),
    (
      [f'--config={GPT}:smoke', '--config.save_eval_predictions=true'],
      "config.save_eval_predictions=True needs a classification task, not "
      "config.task.name='causal_lm'",
    ),
  ],
)
def test_invalid_cv_or_predictions_is_one_line_exit_2(argv, expected, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(['train', *argv, f'--workdir={tmp_path / "run"}'])
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip() and not l.startswith(('WARNING', 'I0', 'W0'))]
  assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], err
  assert not (tmp_path / 'run').exists()
