"""Peak host memory of a streamed training run on a >= 2 GB JPEG dataset, and whether it stays flat.

  python experiments/bench/make_synthetic_images.py --output=runs/synthetic_images
  python experiments/bench/loader_memory.py --data=runs/synthetic_images [--epochs=1]

Trains `mnist_cnn` (a small CNN) on dir:DATA with images decoded, inception-cropped to 64 px and
flipped per example by grain (config.data.load='auto' streams encoded images), batch 32, for
--epochs epochs, under `/usr/bin/time -v`, sampling the resident memory (RSS) of the run's whole
process tree (the trainer and any grain workers) with psutil every 0.5 s. Prints a markdown table:
RSS at each tenth of the run, the peak, and /usr/bin/time's maximum resident set size.
"""

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree_rss(proc: psutil.Process) -> int:
  total = 0
  for p in [proc, *proc.children(recursive=True)]:
    with contextlib.suppress(psutil.NoSuchProcess):
      total += p.memory_info().rss
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True)
  parser.add_argument('--workdir', default='runs/bench_loader_memory')
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--workers', type=int, default=0)
  args = parser.parse_args()
  data = os.path.abspath(args.data)
  cmd = [
    '/usr/bin/time',
    '-v',
    sys.executable,
    '-m',
    'bigjax.train',
    '--config=mnist_cnn',
    f'--workdir={args.workdir}',
    f'--config.data.name=dir:{data}',
    '--config.data.image_size=64',
    f'--config.data.workers={args.workers}',
    '--config.data.threads=2',
    '--config.batch_size=32',
    '--config.eval_batch_size=64',
    f'--config.num_epochs={args.epochs}',
    '--config.log_every=10',
    '--config.checkpoint_every=100000',
  ]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  watched = psutil.Process(proc.pid)
  samples = []
  while proc.poll() is None:
    samples.append((time.time() - t0, tree_rss(watched)))
    time.sleep(0.5)
  out, err = proc.communicate()
  err_text = err.decode(errors='replace')
  if proc.returncode:
    sys.exit(f'run failed ({proc.returncode}):\n{err_text[-3000:]}')
  max_rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', err_text).group(1))
  total = time.time() - t0
  print(f'{args.epochs} epoch(s) of dir:{data}: {total:.0f} s wall')
  print('| time into the run | RSS of the process tree (MB) |')
  print('| --- | --- |')
  for tenth in range(1, 11):
    t = total * tenth / 10
    rss = max((r for s, r in samples if s <= t), default=0)
    print(f'| {tenth * 10}% ({t:.0f} s) | {rss / 2**20:.0f} |')
  print(f'| peak (psutil, tree) | {max(r for _, r in samples) / 2**20:.0f} |')
  print(f'| peak (/usr/bin/time -v, trainer) | {max_rss_kb / 1024:.0f} |')


if __name__ == '__main__':
  main()
