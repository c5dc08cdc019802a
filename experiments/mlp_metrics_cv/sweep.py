"""MLP on breast_cancer with 5-fold cross-validation: accuracy, precision, recall, F1, ROC-AUC.

  bigjax-sweep --sweep=experiments/mlp_metrics_cv/sweep.py --workdir=runs/mlp_metrics_cv

configs/mlp_breast_cancer.py as shipped; fold i trains on the other four fifths of the 455-example
train split and is scored on fold i (stratified folds, fixed seed). Besides the runner's table it
draws the confusion matrix summed over the folds and one ROC curve per fold from each run's
eval_predictions.npz.
"""

import os

import numpy as np

from bigjax import sweep


def plot(runs, outdir):
  """confusion_matrix.png (summed over folds) and roc.png (one curve per fold)."""
  import matplotlib
  from sklearn import metrics as skm

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  folds = [np.load(os.path.join(r.workdir, 'eval_predictions.npz')) for r in runs if r.finished]
  confusion = sum(
    skm.confusion_matrix(f['labels'], f['scores'] > 0.5, labels=[0, 1]) for f in folds
  )
  fig, ax = plt.subplots(figsize=(4, 3.6))
  skm.ConfusionMatrixDisplay(confusion, display_labels=['malignant (0)', 'benign (1)']).plot(
    ax=ax, colorbar=False
  )
  ax.set_title(f'held-out predictions, {len(folds)} folds')
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'confusion_matrix.png'), dpi=120)
  fig, ax = plt.subplots(figsize=(4.5, 4))
  for r, f in zip([r for r in runs if r.finished], folds):
    fpr, tpr, _ = skm.roc_curve(f['labels'], f['scores'])
    ax.plot(fpr, tpr, label=f'fold {r.fold} (AUC {skm.auc(fpr, tpr):.3f})')
  ax.plot([0, 1], [0, 1], 'k:', lw=0.8)
  ax.set(xlabel='false positive rate', ylabel='true positive rate', title='ROC, held-out folds')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'roc.png'), dpi=120)
  with open(os.path.join(outdir, 'confusion_matrix.md'), 'w') as f:
    f.write(
      '| true \\ predicted | malignant (0) | benign (1) |\n|---|---|---|\n'
      f'| malignant (0) | {confusion[0, 0]} | {confusion[0, 1]} |\n'
      f'| benign (1) | {confusion[1, 0]} | {confusion[1, 1]} |\n'
    )


def get_sweep():
  return sweep.Sweep(
    config='mlp_breast_cancer',
    overrides={'save_eval_predictions': True},
    folds=5,
    metrics=['accuracy', 'precision', 'recall', 'f1', 'roc_auc'],
    plot=plot,
  )
