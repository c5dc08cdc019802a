"""Host memory of a streamed training run on a >= 2 GB JPEG dataset, and whether it stays flat.

  python experiments/bench/make_synthetic_images.py --output=runs/synthetic_images
  python experiments/bench/loader_memory.py --data=runs/synthetic_images --epochs=1 --workers=0 --out

Trains `mnist_cnn` (a small CNN) on dir:DATA with images decoded, inception-cropped to
--image_size px and flipped per example by grain (config.data.load='auto' streams encoded
images; 2 reader threads, --workers grain worker processes), batch 32, for --epochs epochs, under
`/usr/bin/time -v`, sampling the memory of the run's whole process tree (the trainer and any
grain workers) with psutil every 0.5 s: RSS and PSS (shared pages counted once: the fair sum when
workers share the trainer's libraries). Prints a markdown table: both sampled
at each tenth of the run (the sample nearest that time: a flat run shows flat rows), the peak
sample, and /usr/bin/time's maximum resident set size of the trainer; --out writes it (with the
machine's description) to experiments/bench/results/loader_memory_<date>.md (or --out=PATH).
bigjax is imported as installed (`pip install -e .`): nothing here sets PYTHONPATH.
"""

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import psutil

import harness

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
  """(RSS, PSS) in bytes summed over the process tree. Worker processes share pages with the
  trainer (the interpreter, jax's libraries): the RSS sum counts those once per process, the PSS
  sum (proportional set size) divides each shared page among its sharers, so it counts them once."""
  rss = pss = 0
  with contextlib.suppress(psutil.NoSuchProcess):
    for p in [proc, *proc.children(recursive=True)]:
      with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        info = p.memory_full_info()
        rss += info.rss
        pss += info.pss
  return rss, pss


def nearest(samples: list[tuple[float, int, int]], t: float) -> tuple[float, int, int]:
  """The (time, rss, pss) sample taken nearest to time t."""
  return min(samples, key=lambda s: abs(s[0] - t))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True, help='a make_synthetic_images.py folder')
  parser.add_argument('--workdir', default=None, help='the run folder (default: a new temp one)')
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--workers', type=int, default=0, help='grain worker processes')
  parser.add_argument('--image_size', type=int, default=64)
  default_out = os.path.join(RESULTS, f'loader_memory_{time.strftime("%Y-%m-%d")}.md')
  parser.add_argument('--out', nargs='?', const=default_out, help='write the table (markdown)')
  args = parser.parse_args()
  data = os.path.abspath(args.data)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_loader_memory_')
  cmd = [
    '/usr/bin/time',
    '-v',
    sys.executable,
    '-m',
    'bigjax.train',
    '--config=mnist_cnn',
    f'--workdir={workdir}',
    f'--config.data.name=dir:{data}',
    f'--config.data.image_size={args.image_size}',
    f'--config.data.workers={args.workers}',
    '--config.data.threads=2',
    '--config.batch_size=32',
    '--config.eval_batch_size=64',
    f'--config.num_epochs={args.epochs}',
    '--config.log_every=10',
    '--config.checkpoint_every=100000',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  t0 = time.time()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  watched = psutil.Process(proc.pid)
  samples = []
  while proc.poll() is None:
    samples.append((time.time() - t0, *tree_memory(watched)))
    time.sleep(0.5)
  out, err = proc.communicate()
  err_text = err.decode(errors='replace')
  if proc.returncode:
    sys.exit(f'run failed ({proc.returncode}):\n{err_text[-3000:]}')
  max_rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', err_text).group(1))
  total = time.time() - t0
  samples = [s for s in samples if s[1] > 0] or [(0.0, 0, 0)]
  lines = [
    f'{args.epochs} epoch(s) of dir:{data}, {args.workers} worker process(es), '
    f'{args.image_size} px crops: {total:.0f} s wall',
    '',
    '| time into the run | RSS of the process tree (MB) | PSS of the process tree (MB) |',
    '| --- | --- | --- |',
  ]
  for tenth in range(1, 11):
    at, rss, pss = nearest(samples, total * tenth / 10)
    lines.append(f'| {tenth * 10}% ({at:.0f} s) | {rss / 2**20:.0f} | {pss / 2**20:.0f} |')
  peak_rss = max(s[1] for s in samples) / 2**20
  peak_pss = max(s[2] for s in samples) / 2**20
  lines.append(f'| peak (psutil, tree) | {peak_rss:.0f} | {peak_pss:.0f} |')
  lines.append(f'| peak (/usr/bin/time -v, trainer) | {max_rss_kb / 1024:.0f} | |')
  print('\n'.join(lines), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      command = ' '.join(['python', *sys.argv])
      f.write(f'# Loader memory\n\n`{command}`\n\n{harness.machine_info()}\n\n')
      f.write('\n'.join(lines) + '\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
