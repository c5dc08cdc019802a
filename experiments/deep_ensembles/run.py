"""Deep ensembles vs single nets vs MC dropout (Lakshminarayanan et al. 2017) on the 8x8 digits
and on mnist5k.

  bigjax-sweep --sweep=experiments/deep_ensembles/sweep.py --workdir=runs/deep_ensembles --jobs 1
  python experiments/deep_ensembles/run.py --workdir=runs/deep_ensembles [--data=digits,mnist5k]

Reads the sweep's runs of each dataset (dropout 0 and 0.5, seeds 0-4; their directories from the
sweep's own plan). Each run's class probabilities on the test digits, on the held-out training
digits (sweep.HELD_OUT, for temperature scaling) and on two shifted copies of the test digits
(rotate90, uniform noise) are computed once with bigjax.ensemble.combine.predict (MC dropout: the
mean of --samples dropout passes). Methods: a single net (each of the 5 seeds), ensembles of 2
(seeds 0+1, 2+3) and 5 members (their mean probabilities), the dropout-0.5 net without and with
MC dropout (each of the 5 seeds). Reports accuracy, NLL, Brier, ECE and entropy on the test
digits, NLL and ECE after temperature scaling, and the entropy on the shifted inputs: mean +- std
over the instances of each method. Writes results.csv, results.md, metrics.png and the reliability
diagrams of one net and of the 5-member ensemble to --results_dir/<dataset>/.
"""

import argparse
import csv
import importlib.util
import os
import time

import numpy as np

from bigjax.data import pipeline
from bigjax.ensemble import combine, shifts, uncertainty
from bigjax.sweep import plan

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = os.path.join(HERE, 'sweep.py')
SHIFTS = ('rotate90', 'noise')
METRICS = (
  'accuracy',
  'nll',
  'brier',
  'ece',
  'entropy',
  'nll_T',
  'ece_T',
  *[f'entropy_{s}' for s in SHIFTS],
)


def held_out_splits() -> dict[str, str]:
  """sweep.py's HELD_OUT: {dataset: the split temperature scaling is fitted on}."""
  spec = importlib.util.spec_from_file_location('deep_ensembles_sweep', SWEEP)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.HELD_OUT


def sweep_runs(workdir) -> dict[tuple, str]:
  """{(dataset, dropout, seed): the run's workdir} of the sweep in `workdir`."""
  runs = plan.plan(plan.load_sweep(SWEEP), workdir)
  return {
    (r.values['data.name'], r.values['model.kwargs.dropout'], r.seed): r.workdir for r in runs
  }


def run_probs(workdir, samples, held_out_split):
  """{'test', 'held_out', <shift>: probs} and the test and held-out labels of one run."""
  exp, state = combine.load(workdir)
  d = exp.config.data
  held_out = pipeline.load_split(d.name, held_out_split, d.data_dir)
  arrays = {'test': exp.eval_arrays, 'held_out': held_out}
  arrays.update({s: shifts.shifted(s, exp.eval_arrays) for s in SHIFTS})
  probs = {k: combine.predict(exp, state, a, samples, exp.config.seed) for k, a in arrays.items()}
  return probs, np.asarray(exp.eval_arrays['label']), np.asarray(held_out['label'])


def evaluate(members, labels, held_labels):
  """Metrics of the ensemble whose members' probability dicts are `members`."""
  mean = {k: np.mean([m[k] for m in members], axis=0) for k in members[0]}
  p = uncertainty.as_classes(mean['test'])
  out = {'accuracy': float(np.mean(p.argmax(1) == labels)), **uncertainty.report(p, labels)}
  t = uncertainty.fit_temperature(mean['held_out'], held_labels)
  calibrated = uncertainty.report(uncertainty.with_temperature(p, t), labels)
  out.update(nll_T=calibrated['nll'], ece_T=calibrated['ece'], temperature=t)
  out.update({f'entropy_{s}': uncertainty.entropy(mean[s]) for s in SHIFTS})
  return out, mean['test']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='runs/deep_ensembles')
  parser.add_argument('--data', default='digits,mnist5k', help='datasets, comma-separated')
  parser.add_argument('--samples', type=int, default=20, help='MC dropout passes')
  parser.add_argument('--results_dir', default=os.path.join(HERE, 'results'))
  args = parser.parse_args()
  runs, held_out = sweep_runs(args.workdir), held_out_splits()
  for data in args.data.split(','):
    t0 = time.time()
    report(data, runs, held_out[data], args.samples, os.path.join(args.results_dir, data))
    print(f'{data}: {time.time() - t0:.0f} s')


def report(data, runs, held_out_split, samples, results_dir):
  """Writes results_dir/{results.csv, results.md, metrics.png, reliability_*.png} for `data`."""
  os.makedirs(results_dir, exist_ok=True)
  run = lambda drop, seed: runs[(data, drop, seed)]
  plain, labels, held = {}, None, None
  for s in range(5):
    plain[s], labels, held = run_probs(run(0.0, s), 0, held_out_split)
  dropout = {s: run_probs(run(0.5, s), 0, held_out_split)[0] for s in range(5)}
  mc = {s: run_probs(run(0.5, s), samples, held_out_split)[0] for s in range(5)}
  methods = {
    'single net': [[plain[s]] for s in range(5)],
    'ensemble of 2': [[plain[0], plain[1]], [plain[2], plain[3]]],
    'ensemble of 5': [[plain[s] for s in range(5)]],
    'dropout 0.5 net': [[dropout[s]] for s in range(5)],
    f'MC dropout x{samples}': [[mc[s]] for s in range(5)],
  }
  rows, stats = [], {}
  for name, instances in methods.items():
    results = []
    for i, members in enumerate(instances):
      r, mean = evaluate(members, labels, held)
      results.append(r)
      rows.append({'method': name, 'instance': i, **r})
      if i == 0 and name in ('single net', 'ensemble of 5'):
        uncertainty.reliability_diagram(
          mean, labels, os.path.join(results_dir, f'reliability_{name.split()[-1]}.png'), name
        )
    stats[name] = {
      m: (np.mean([r[m] for r in results]), np.std([r[m] for r in results])) for m in METRICS
    }
    stats[name]['n'] = len(results)
  with open(os.path.join(results_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [
    '| method | ' + ' | '.join(METRICS) + ' | n |',
    '| --- |' + ' --- |' * (len(METRICS) + 1),
  ]
  for name, s in stats.items():
    cells = [f'{s[m][0]:.4f} ± {s[m][1]:.4f}' if s['n'] > 1 else f'{s[m][0]:.4f}' for m in METRICS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {s["n"]} |')
  with open(os.path.join(results_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'{data}:\n' + '\n'.join(lines))
  plot(stats, os.path.join(results_dir, 'metrics.png'))


def plot(stats, path):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  shown = ('nll', 'brier', 'ece', 'entropy_rotate90', 'entropy_noise')
  fig, axes = plt.subplots(1, len(shown), figsize=(3.0 * len(shown), 3.4))
  names = list(stats)
  for ax, metric in zip(axes, shown):
    means = [stats[n][metric][0] for n in names]
    errs = [stats[n][metric][1] for n in names]
    ax.bar(range(len(names)), means, yerr=errs, color=[f'C{i}' for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, rotation=60, ha='right', fontsize=7)
    ax.set_title(
      metric + (' (higher = better)' if metric.startswith('entropy_') else ''), fontsize=9
    )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
