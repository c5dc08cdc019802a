"""GPU kernel time by kernel and by kind (matmul, attention, fusion) from a jax.profiler perfetto trace.

  python experiments/bench/trace_summary.py TRACE.json.gz [--top 40]

gpu.py --profile DIR writes DIR/<model>/plugins/profile/<time>/perfetto_trace.json.gz. Only events on
the GPU's stream threads count; the kinds are matched from kernel names (cuBLAS/nvjet/cutlass
matmuls, cuDNN attention, XLA fusions).

GPU traces only. XLA:CPU traces (jax 0.10.2) cannot be summed this way: the thunk events of Eigen
`dot`s end when the work is handed to the thread pool, so their time shows up in whichever op runs
next (a 17 GFLOP transposed matmul read 16 ms next to a 450 ms YNNPACK matmul in one measured trace,
issue 19). On the CPU, time blocks alone instead: `experiments/bench/blocks.py --one_core`.
"""

import argparse
import collections
import gzip
import json
import re

KINDS = (
  ('matmul', r'gemm|xmma|cutlass|nvjet|cublas'),
  ('attention', r'fmha|flash|sdpa|cudnn'),
  ('fusion', r'fusion|^loop_|^input_'),
)


def kernel_times(path):
  """-> Counter {kernel name: total microseconds}, Counter {kernel name: launches}."""
  with gzip.open(path) if path.endswith('.gz') else open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  meta = lambda kind: {
    (e['pid'], e.get('tid')) if kind == 'thread_name' else e['pid']: e['args']['name']
    for e in events
    if e.get('ph') == 'M' and e.get('name') == kind
  }
  processes, threads = meta('process_name'), meta('thread_name')
  gpus = {pid for pid, name in processes.items() if 'GPU' in name}
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if (
      e.get('ph') == 'X'
      and e['pid'] in gpus
      and 'stream' in str(threads.get((e['pid'], e['tid']), '')).lower()
    ):
      total[e['name']] += e.get('dur', 0)
      count[e['name']] += 1
  return total, count


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace')
  parser.add_argument('--top', type=int, default=40)
  args = parser.parse_args()
  total, count = kernel_times(args.trace)
  all_us = sum(total.values()) or 1
  print(f'GPU kernel time {all_us / 1e3:.1f} ms')
  kinds = collections.Counter()
  for name, us in total.items():
    kinds[next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), 'other')] += us
  for kind, us in kinds.most_common():
    print(f'{kind:10s} {us / 1e3:9.1f} ms {us / all_us:6.1%}')
  for name, us in total.most_common(args.top):
    print(f'{us / 1e3:8.2f} ms {count[name]:5d}x  {name[:110]}')


if __name__ == '__main__':
  main()
