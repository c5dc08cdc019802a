"""Does MLM pretraining help genre classification? Fine-tune from pretraining vs. from scratch.

  python experiments/pretrain_finetune/run.py [--pretrain_steps 800] [--finetune_steps 150] \
      [--seeds 0,1,2] [--workdir runs/pretrain_finetune]

1. Pretrains the shipped bert_shakespeare_mlm config for --pretrain_steps (masked-LM + next
   sentence).
2. Fine-tunes the shipped bert_genre config for --finetune_steps from that checkpoint
   (init=<pretrain workdir>) and from scratch (init=none), for each seed, with the same model,
   data, steps and batch.
3. Prints a markdown table of test accuracy (mean +- std over seeds) and writes it, with one csv row
   per run and results.json, to --results_dir (default: this experiment's results/, committed).
Every run is a plain `python -m bigjax.train` (this interpreter, configs by bare name) in its own
sub-workdir, so re-running resumes or skips finished runs. It runs from any directory: --workdir
(default runs/pretrain_finetune) is relative to the current directory, and is made absolute before
any run starts.
"""

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np


def run(config, workdir, *overrides):
  """Runs bigjax.train unless workdir already has results.json; returns that results dict."""
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    subprocess.run(
      [
        sys.executable,
        '-m',
        'bigjax.train',
        f'--config={config}',
        f'--workdir={workdir}',
        *overrides,
      ],
      check=True,
    )
  with open(results) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pretrain_steps', type=int, default=800)
  parser.add_argument('--finetune_steps', type=int, default=150)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument(
    '--workdir',
    default=os.path.join('runs', 'pretrain_finetune'),
    help='where every run goes, relative to the current directory (default: %(default)s)',
  )
  parser.add_argument(
    '--results_dir',
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'),
    help='where results.md / results.csv / results.json go (default: %(default)s)',
  )
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  seeds = [int(s) for s in args.seeds.split(',')]
  pre_dir = os.path.join(args.workdir, 'pretrain')
  pre = run('bert_shakespeare_mlm', pre_dir, f'--config.num_steps={args.pretrain_steps}')
  rows = {}
  for init, arg in (('pretrained', f'init={pre_dir}'), ('scratch', 'init=none')):
    for seed in seeds:
      res = run(
        f'bert_genre:{arg}',
        os.path.join(args.workdir, f'{init}_seed{seed}'),
        f'--config.num_steps={args.finetune_steps}',
        f'--config.seed={seed}',
      )
      rows.setdefault(init, []).append(res['eval'])
  summary = {
    'pretrain_eval': pre['eval'],
    'pretrain_steps': args.pretrain_steps,
    'finetune_steps': args.finetune_steps,
    'seeds': seeds,
    'finetune': rows,
  }
  os.makedirs(args.results_dir, exist_ok=True)
  with open(os.path.join(args.results_dir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.results_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['run', 'seed', 'accuracy', 'f1_macro', 'mlm_accuracy', 'nsp_accuracy'])
    pre_eval = pre['eval']
    writer.writerow(['pretrain', 0, '', '', pre_eval['mlm_accuracy'], pre_eval['nsp_accuracy']])
    for init, evals in rows.items():
      for seed, e in zip(seeds, evals):
        writer.writerow([init, seed, e['accuracy'], e['f1_macro'], '', ''])
  lines = [
    f'pretraining ({args.pretrain_steps} steps): validation MLM accuracy '
    f'{pre["eval"]["mlm_accuracy"]:.3f}, next-sentence accuracy {pre["eval"]["nsp_accuracy"]:.3f}',
    '',
    f'| init | test accuracy (mean ± std, {len(seeds)} seeds) | macro F1 | per seed |',
    '| --- | --- | --- | --- |',
  ]
  for init, evals in rows.items():
    acc = np.array([e['accuracy'] for e in evals])
    f1 = np.array([e['f1_macro'] for e in evals])
    lines.append(
      f'| {init} | {acc.mean():.3f} ± {acc.std():.3f} | {f1.mean():.3f} ± {f1.std():.3f} | '
      f'{", ".join(f"{a:.3f}" for a in acc)} |'
    )
  lines.append(
    f'\n{args.finetune_steps} fine-tuning steps per run; `python experiments/pretrain_finetune/run.py '
    f'--pretrain_steps {args.pretrain_steps} --finetune_steps {args.finetune_steps}`'
  )
  with open(os.path.join(args.results_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  print(f'\nwritten to {args.results_dir}/results.{{md,csv,json}}')


if __name__ == '__main__':
  main()
