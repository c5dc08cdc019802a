"""Parameter-efficient fine-tuning against full fine-tuning on bigjax's own tasks (issue 14).

  python experiments/peft_comparison/run.py --bert_pretrain runs/pf1500/pretrain \\
      [--workdir runs/peft_comparison] [--seeds 0,1,2] [--bert_steps 150] [--gpt_steps 150] \\
      [--gpt_pretrain_steps 800] [--tasks bert,gpt] [--methods full,lora1,...]

Two tasks, each fine-tuned from a pretrained bigjax run with every method of METHODS (full
fine-tuning; LoRA r = 1, 2, 4, 8, 16 on the query and value projections, alpha 8 as Hu et al. fix
it; AdaLoRA 12 -> 8 on the same; Houlsby bottleneck adapters of width 16 after attention and MLP;
prefix tuning and prompt tuning with 16 virtual tokens), one run per (task, method, seed):

  bert  genre classification (configs/bert_genre.py: 4 genres, test passages from 4 unseen works)
        from the MLM pretraining run --bert_pretrain (experiments/pretrain_finetune pretrains it:
        `--pretrain_steps 1500 --workdir runs/pf1500` gives runs/pf1500/pretrain), through the
        same init=<workdir> mechanism. Passages are 112 bytes for every method, so the 16 virtual
        positions of prompt / prefix tuning fit the pretrained 128-row position table; the new
        classifier head trains with every PEFT method (config.peft.trainable_base, HF PEFT's
        modules_to_save). Metric: test accuracy (and macro F1).
  gpt   held-out plays: a small byte-level GPT (configs/gpt_shakespeare.py size=small: 4 layers,
        128 wide, rotary positions) pretrained here for --gpt_pretrain_steps on the first 24 of
        the 34 training works, then fine-tuned on the other 10; metric: validation bits per byte
        on the 4 validation works (1,024 windows), which neither saw.

Learning rates are fixed per method family (not tuned here): full fine-tuning the configs' own
(1e-3), LoRA / AdaLoRA / adapters 3e-3, prompt / prefix tuning 1e-2; warmup 10% of the steps.

Every run is a plain `python -m bigjax.train` (this interpreter, configs by bare name) in its own
sub-workdir of --workdir; a run whose results.json exists is not run again, so re-running resumes.
Writes results.csv (one row per run), results.json, results.md (mean +- std over seeds: trainable
parameters, metric, step time, per-device train-step memory from XLA's memory analysis) and
peft_comparison.png to --results_dir (default: this experiment's results/).
"""

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np

# method -> (config.peft overrides, learning rate or None for the config's own, label)
TARGET = 'self_attention/(query|value)/kernel'
METHODS = {
  'full': ({}, None, 'full fine-tuning'),
  **{
    f'lora{r}': (
      dict(method='lora', target=TARGET, rank=r, alpha=8.0),
      3e-3,
      f'LoRA r={r}',
    )
    for r in (1, 2, 4, 8, 16)
  },
  'adalora': (
    {
      'method': 'adalora',
      'target': TARGET,
      'rank': 12,
      'alpha': 8.0,
      'adalora.target_rank': 8,
      'adalora.tinit': '{tinit}',
      'adalora.tfinal': '{tfinal}',
      'adalora.delta_t': 10,
    },
    3e-3,
    'AdaLoRA r=12->8',
  ),
  'adapter': (
    dict(method='adapter', target='(self_attention/out|mlp/wo)/kernel', bottleneck=16),
    3e-3,
    'adapters (Houlsby, m=16)',
  ),
  'prefix': (dict(method='prefix', virtual_tokens=16), 1e-2, 'prefix tuning (16)'),
  'prompt': (dict(method='prompt', virtual_tokens=16), 1e-2, 'prompt tuning (16)'),
}
TASKS = ('bert', 'gpt')
GPT_MODEL = ['--config.model.kwargs.positions=rotary']  # no position table: virtual rows fit
BERT_SEQ_LEN = 112  # + 16 virtual positions = the pretrained 128-row position table


def run(config, workdir, *overrides):
  """Runs bigjax.train unless workdir already has results.json; returns that results dict."""
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    cmd = [sys.executable, '-m', 'bigjax.train', f'--config={config}', f'--workdir={workdir}']
    print('+', ' '.join(cmd[1:] + list(overrides)), flush=True)
    subprocess.run([*cmd, *overrides], check=True)
  with open(results) as f:
    return json.load(f)


def method_flags(method: str, task: str, steps: int) -> list[str]:
  """--config flags of a method (config.peft, learning rate, BERT's classifier head)."""
  fields, lr, _ = METHODS[method]
  flags = [
    f'--config.peft.{k}={str(v).format(tinit=steps // 10, tfinal=steps // 5)}'
    for k, v in fields.items()
  ]
  if fields and task == 'bert':
    flags.append('--config.peft.trainable_base=^classifier/')
  if lr is not None:
    flags.append(f'--config.optim.lr={lr}')
  return flags


def bert_run(args, method, seed):
  flags = [
    f'--config.num_steps={args.bert_steps}',
    f'--config.optim.warmup_steps={max(args.bert_steps // 10, 1)}',
    f'--config.checkpoint_every={args.bert_steps}',
    f'--config.data.seq_len={BERT_SEQ_LEN}',
    f'--config.seed={seed}',
    *method_flags(method, 'bert', args.bert_steps),
  ]
  workdir = os.path.join(args.workdir, 'bert', f'{method}_seed{seed}')
  return run(f'bert_genre:init={args.bert_pretrain}', workdir, *flags)


def gpt_pretrain(args):
  workdir = os.path.join(args.workdir, 'gpt', 'pretrain')
  run(
    'gpt_shakespeare:size=small',
    workdir,
    *GPT_MODEL,
    '--config.data.train_split=train[:24]',
    f'--config.num_steps={args.gpt_pretrain_steps}',
    f'--config.checkpoint_every={args.gpt_pretrain_steps}',
    '--config.eval_every=0',
    '--config.data.eval_max_examples=1024',
  )
  return workdir


def gpt_run(args, pretrain, method, seed):
  flags = [
    *GPT_MODEL,
    f'--config.init_from.checkpoint={pretrain}',
    '--config.data.train_split=train[24:]',
    '--config.data.eval_max_examples=1024',
    f'--config.num_steps={args.gpt_steps}',
    f'--config.optim.warmup_steps={max(args.gpt_steps // 10, 1)}',
    f'--config.checkpoint_every={args.gpt_steps}',
    '--config.eval_every=0',
    f'--config.seed={seed}',
    *method_flags(method, 'gpt', args.gpt_steps),
  ]
  workdir = os.path.join(args.workdir, 'gpt', f'{method}_seed{seed}')
  return run('gpt_shakespeare:size=small', workdir, *flags)


def row(task, method, seed, res) -> dict:
  """One results.csv row of a finished run."""
  ev, tp = res['eval'], res.get('throughput') or {}
  memory = res.get('train_step_memory') or {}
  return {
    'task': task,
    'method': method,
    'seed': seed,
    'trainable': res.get('num_trainable') or res['num_params'],
    'total': res['num_params'],
    'metric': ev['accuracy'] if task == 'bert' else ev['bits_per_byte'],
    'f1_macro': ev.get('f1_macro', ''),
    'step_ms': 1e3 * tp['step_time_s'] if tp.get('step_time_s') else '',
    'memory_mib': memory['total'] / 2**20 if memory.get('total') else '',
    'wall_s': res['wall_time_s'],
  }


METRIC = {'bert': 'test accuracy', 'gpt': 'validation bits/byte'}


def summary(rows: list[dict]) -> list[dict]:
  """Mean / std over seeds per (task, method), in METHODS order."""
  out = []
  for task in TASKS:
    for method in METHODS:
      rs = [r for r in rows if r['task'] == task and r['method'] == method]
      if not rs:
        continue
      metric = np.array([r['metric'] for r in rs])

      def mean(key, rs=rs):
        values = [r[key] for r in rs if r[key] != '']
        return float(np.mean(values)) if values else float('nan')

      out.append(
        {
          'task': task,
          'method': method,
          'label': METHODS[method][2],
          'seeds': len(rs),
          'trainable': rs[0]['trainable'],
          'share': rs[0]['trainable'] / rs[0]['total'],
          'metric': float(metric.mean()),
          'metric_std': float(metric.std()),
          'per_seed': [float(m) for m in metric],
          'step_ms': mean('step_ms'),
          'memory_mib': mean('memory_mib'),
        }
      )
  return out


def markdown(table: list[dict], args) -> str:
  lines = []
  for task in TASKS:
    rs = [r for r in table if r['task'] == task]
    if not rs:
      continue
    lines += [
      f'**{task}** ({METRIC[task]}, mean ± std over {rs[0]["seeds"]} seeds)',
      '',
      f'| method | trainable params | share | {METRIC[task]} | per seed | step ms | '
      'train-step memory MiB |',
      '| --- | ---: | ---: | --- | --- | ---: | ---: |',
    ]
    for r in rs:
      lines.append(
        f'| {r["label"]} | {r["trainable"]:,} | {r["share"]:.2%} | {r["metric"]:.3f} ± '
        f'{r["metric_std"]:.3f} | {", ".join(f"{m:.3f}" for m in r["per_seed"])} | '
        f'{r["step_ms"]:.0f} | {r["memory_mib"]:.1f} |'
      )
    lines.append('')
  lines.append(
    f'`python experiments/peft_comparison/run.py --bert_pretrain {args.bert_pretrain} '
    f'--bert_steps {args.bert_steps} --gpt_steps {args.gpt_steps} --gpt_pretrain_steps '
    f'{args.gpt_pretrain_steps} --seeds {args.seeds}`'
  )
  return '\n'.join(lines) + '\n'


def plot(table: list[dict], path: str) -> None:
  """Metric against trainable parameters (log scale), one panel per task."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  tasks = [t for t in TASKS if any(r['task'] == t for r in table)]
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, task in zip(axes[0], tasks, strict=True):
    rs = [r for r in table if r['task'] == task]
    lora = [r for r in rs if r['method'].startswith('lora')]
    ax.plot([r['trainable'] for r in lora], [r['metric'] for r in lora], 'C0-', alpha=0.5)
    colors = {'full': 'k', 'adalora': 'C1', 'adapter': 'C2', 'prefix': 'C3', 'prompt': 'C4'}
    for r in rs:
      color = colors.get(r['method'], 'C0')  # LoRA's ranks: C0, joined by a line
      ax.errorbar(
        r['trainable'], r['metric'], yerr=r['metric_std'], fmt='o', color=color, capsize=3
      )
      ax.annotate(
        r['label'],
        (r['trainable'], r['metric']),
        fontsize=7,
        xytext=(4, 4),
        textcoords='offset points',
      )
    ax.set_xscale('log')
    ax.set_xlabel('trainable parameters')
    ax.set_ylabel(METRIC[task] + (' (lower is better)' if task == 'gpt' else ''))
    ax.set_title({'bert': 'BERT genre classification', 'gpt': 'GPT on held-out plays'}[task])
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--bert_pretrain', default=os.path.join('runs', 'pf1500', 'pretrain'))
  parser.add_argument('--bert_steps', type=int, default=150)
  parser.add_argument('--gpt_pretrain_steps', type=int, default=800)
  parser.add_argument('--gpt_steps', type=int, default=150)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--workdir', default=os.path.join('runs', 'peft_comparison'))
  parser.add_argument(
    '--results_dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
  )
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  args.bert_pretrain = os.path.abspath(args.bert_pretrain)
  seeds = [int(s) for s in args.seeds.split(',')]
  tasks, methods = args.tasks.split(','), args.methods.split(',')
  unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f'unknown task or method {unknown}; tasks: {TASKS}, methods: {list(METHODS)}')
  if 'bert' in tasks and not os.path.isdir(os.path.join(args.bert_pretrain, 'checkpoints')):
    parser.error(
      f'--bert_pretrain={args.bert_pretrain} holds no checkpoints; run experiments/'
      'pretrain_finetune/run.py --pretrain_steps 1500 --workdir runs/pf1500 first'
    )
  rows = []
  if 'gpt' in tasks:
    pretrain = gpt_pretrain(args)
  for seed in seeds:  # seed-major: a partial run already covers every method
    for method in methods:
      if 'bert' in tasks:
        rows.append(row('bert', method, seed, bert_run(args, method, seed)))
      if 'gpt' in tasks:
        rows.append(row('gpt', method, seed, gpt_run(args, pretrain, method, seed)))
  table = summary(rows)
  os.makedirs(args.results_dir, exist_ok=True)
  out = lambda name: os.path.join(args.results_dir, name)
  with open(out('results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(out('results.json'), 'w') as f:
    json.dump({'args': vars(args), 'runs': rows, 'summary': table}, f, indent=2)
  text = markdown(table, args)
  with open(out('results.md'), 'w') as f:
    f.write(text)
  plot(table, out('peft_comparison.png'))
  print(text)
  print(f'written to {args.results_dir}/results.{{md,csv,json}} and peft_comparison.png')


if __name__ == '__main__':
  main()
