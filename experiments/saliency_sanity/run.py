"""Sanity checks for saliency maps (Adebayo et al. 2018) on the MNIST CNN.

  python experiments/saliency_sanity/run.py [--workdir runs/saliency_sanity] [--num_images 64] \
      [--permuted_epochs 40]

1. Trains the shipped mnist_cnn config (a plain `python -m bigjax.train`, skipped when its
   results.json exists).
2. Trains the same model, optimizer and batch on the same images with the training labels
   permuted (seed 0), for --permuted_epochs, in process with bigjax's own Experiment and train
   step (the data randomisation test); its params go to WORKDIR/permuted/params.npz.
3. For each method (gradient, gradient x input, SmoothGrad, integrated gradients, guided
   backprop, Grad-CAM) compares the trained model's maps of the first --num_images test digits
   (for their true class) with the maps of (a) cascading randomised copies, layers re-initialised
   from the output down, and (b) the permuted-label model: Spearman rank correlation of |map|,
   of the signed map, and SSIM of |map|, each the mean over the images.
4. Writes results.csv (one row per method and model), results.md (tables + a verdict per method),
   cascade.png (similarity vs randomised depth) and examples.png (one digit's maps) to
   --results_dir (default: this experiment's results/, committed), and results.json (timings).
Verdict: a method passes a test when its mean Spearman rank correlation with the randomised
model's maps is below 0.5 (the maps changed more than they stayed), and passes overall when it
passes both tests; given for |map| and for the signed map (the paper reports both).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

THRESHOLD = 0.5


def train_cnn(workdir):
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    subprocess.run(
      [sys.executable, '-m', 'bigjax.train', '--config=mnist_cnn', f'--workdir={workdir}'],
      check=True,
    )
  with open(results) as f:
    return json.load(f)


def train_permuted(workdir, epochs, seed=0):
  """The mnist_cnn config trained on permuted labels; returns (params, train acc, test acc)."""
  import jax

  from bigjax import config_lib, experiment, steps
  from bigjax.data import pipeline

  path = os.path.join(workdir, 'params.npz')
  config = config_lib.load_config_file(
    os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'mnist_cnn.py')
  )
  config.num_epochs = epochs
  exp = experiment.build(config, jax.devices()[:1])
  train = dict(exp.train_arrays)
  train['label'] = np.random.default_rng(seed).permutation(train['label'])
  if not os.path.exists(path):
    exp.batches = pipeline.TrainBatches(train, config.batch_size, config.seed)
    total = epochs * exp.batches.steps_per_epoch
    state = steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
    step = exp.compile_train_step()
    for s in range(total):
      state, _ = step(state, exp.to_global(exp.batches.batch(s)))
    params = jax.device_get(state.params)
    os.makedirs(workdir, exist_ok=True)
    flat = {'/'.join(k): v for k, v in _flatten(params).items()}
    np.savez(path, **flat)
  params = _unflatten(dict(np.load(path)))
  acc = lambda arrays: float(
    (
      np.asarray(exp.model.apply({'params': params}, arrays['inputs'].astype(np.float32) / 255.0))
      .argmax(-1)
      .__eq__(arrays['label'])
    ).mean()
  )
  return params, acc(train), acc(exp.eval_arrays)


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = np.asarray(v)
  return out


def _unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=os.path.join('runs', 'saliency_sanity'))
  parser.add_argument('--num_images', type=int, default=64)
  parser.add_argument('--permuted_epochs', type=int, default=40)
  parser.add_argument(
    '--results_dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
  )
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  t0 = time.time()
  trained = train_cnn(os.path.join(args.workdir, 'trained'))
  t_trained = time.time() - t0
  permuted, perm_train_acc, perm_test_acc = train_permuted(
    os.path.join(args.workdir, f'permuted_{args.permuted_epochs}epochs'), args.permuted_epochs
  )
  t_permuted = time.time() - t0 - t_trained

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from bigjax import explain
  from bigjax.explain import sanity

  run = explain.load_run(os.path.join(args.workdir, 'trained'), devices=jax.devices()[:1])
  rows_in = run.eval_rows(list(range(args.num_images)))
  x = jnp.asarray(run.check_inputs(rows_in['inputs']))
  target = jnp.asarray(rows_in['label'], jnp.int32)
  model, variables = run.exp.model, jax.device_get(run.variables)
  fresh = nn.meta.unbox(model.init(jax.random.key(1), x[:1])['params'])
  table, examples = [], {}
  for method in sanity.METHODS:
    ref = sanity.maps(method, model, variables, x, target)
    examples[(method, 'trained')] = ref[0]
    for layer, params in sanity.cascade(variables['params'], fresh):
      other = sanity.maps(method, model, {'params': params}, x, target)
      examples[(method, f'random to {layer}')] = other[0]
      table.append({'method': method, 'model': f'random to {layer}', **sanity.compare(ref, other)})
    other = sanity.maps(method, model, {'params': permuted}, x, target)
    examples[(method, 'permuted labels')] = other[0]
    table.append({'method': method, 'model': 'permuted labels', **sanity.compare(ref, other)})
    print(method, 'done', f'{time.time() - t0:.0f}s', flush=True)
  t_total = time.time() - t0

  os.makedirs(args.results_dir, exist_ok=True)
  with open(os.path.join(args.results_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, ['method', 'model', 'spearman_abs', 'spearman', 'ssim'])
    writer.writeheader()
    for r in table:
      writer.writerow({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in r.items()})
  layers = sanity.layer_order(variables['params'])
  models = [f'random to {l}' for l in layers] + ['permuted labels']
  lines = [
    f'mnist_cnn trained to test accuracy {trained["eval"]["accuracy"]:.3f}; the permuted-label '
    f'model reached train accuracy {perm_train_acc:.3f} on its permuted labels (test '
    f'{perm_test_acc:.3f}) after {args.permuted_epochs} epochs. {args.num_images} test digits, '
    'their true class. Cascading randomisation re-initialises the layers from the output down '
    f'("random to {layers[-1]}" = every layer).',
    '',
  ]
  for metric, title in (
    ('spearman_abs', 'Spearman rank correlation of |map|'),
    ('spearman', 'Spearman rank correlation of the signed map'),
    ('ssim', 'SSIM of |map|'),
  ):
    lines += [f'{title} with the trained model\'s maps (mean over images):', '']
    lines.append('| method | ' + ' | '.join(models) + ' |')
    lines.append('|' + ' --- |' * (len(models) + 1))
    for method in sanity.METHODS:
      vals = {r['model']: r[metric] for r in table if r['method'] == method}
      lines.append(f'| {method} | ' + ' | '.join(f'{vals[m]:.3f}' for m in models) + ' |')
    lines.append('')
  lines += [
    f'Verdict: a test passes when the mean Spearman rank correlation with the randomised model\'s '
    f'maps is below {THRESHOLD} (|map| / signed map); a method passes when it passes both tests.',
    '',
    '| method | model randomisation, abs / signed | data randomisation, abs / signed | '
    'verdict on abs | verdict on signed |',
    '| --- | --- | --- | --- | --- |',
  ]
  verdicts = {}
  for method in sanity.METHODS:
    cell, verdict = [], []
    for metric in ('spearman_abs', 'spearman'):
      vals = {r['model']: r[metric] for r in table if r['method'] == method}
      verdict.append(vals[models[-2]] < THRESHOLD and vals['permuted labels'] < THRESHOLD)
      cell.append((vals[models[-2]], vals['permuted labels']))
    word = lambda ok: 'passes' if ok else 'fails'
    verdicts[method] = {'abs': word(verdict[0]), 'signed': word(verdict[1])}
    lines.append(
      f'| {method} | {cell[0][0]:.3f} / {cell[1][0]:.3f} | {cell[0][1]:.3f} / {cell[1][1]:.3f} | '
      f'{word(verdict[0])} | {word(verdict[1])} |'
    )
  lines.append(
    f'\n`python experiments/saliency_sanity/run.py --num_images {args.num_images} '
    f'--permuted_epochs {args.permuted_epochs}`'
  )
  with open(os.path.join(args.results_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  _plot(table, models, examples, x[0], args.results_dir)
  with open(os.path.join(args.results_dir, 'results.json'), 'w') as f:
    json.dump(
      {
        'trained_eval': trained['eval'],
        'permuted_train_accuracy': perm_train_acc,
        'permuted_test_accuracy': perm_test_acc,
        'seconds': {'train': t_trained, 'permuted': t_permuted, 'total': t_total},
        'verdicts': verdicts,
        'num_images': args.num_images,
        'permuted_epochs': args.permuted_epochs,
      },
      f,
      indent=2,
    )
  print(f'\nwritten to {args.results_dir}; {t_total:.0f} s')


def _plot(table, models, examples, image, outdir):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from bigjax.explain import sanity

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for method in sanity.METHODS:
    for ax, metric in zip(axes, ('spearman_abs', 'ssim')):
      vals = {r['model']: r[metric] for r in table if r['method'] == method}
      ax.plot(range(len(models)), [vals[m] for m in models], marker='o', label=method)
  for ax, metric in zip(axes, ('Spearman(|map|)', 'SSIM(|map|)')):
    ax.set_xticks(
      range(len(models)),
      [m.replace('random to ', 'rand→') for m in models],
      rotation=30,
      fontsize=7,
    )
    ax.axhline(THRESHOLD if 'Spearman' in metric else 0, color='gray', lw=0.5, ls='--')
    ax.set_ylabel(metric)
  axes[0].legend(fontsize=6)
  fig.suptitle(
    'similarity to the trained model\'s maps (MNIST CNN, Adebayo et al. 2018)', fontsize=9
  )
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'cascade.png'), dpi=70)
  plt.close(fig)
  cols = ['trained', *models]
  fig, axes = plt.subplots(
    len(sanity.METHODS), len(cols) + 1, figsize=(1.1 * (len(cols) + 1), 1.15 * len(sanity.METHODS))
  )
  for i, method in enumerate(sanity.METHODS):
    axes[i, 0].imshow(np.asarray(image)[..., 0], cmap='gray')
    axes[i, 0].set_ylabel(method, fontsize=6)
    for j, col in enumerate(cols):
      axes[i, j + 1].imshow(np.abs(examples[(method, col)]), cmap='hot')
      if i == 0:
        axes[i, j + 1].set_title(col.replace('random to ', 'rand→'), fontsize=6)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'examples.png'), dpi=60)
  plt.close(fig)


if __name__ == '__main__':
  main()
