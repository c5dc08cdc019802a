"""GPU kernel time by kernel and by kind (matmul, attention, fusion) from a jax.profiler perfetto trace.

  python experiments/bench/trace_summary.py TRACE.json.gz   (written by gpu.py --profile DIR)
"""
import gzip, json, sys, collections, re
path = sys.argv[1]
d = json.load(gzip.open(path) if path.endswith('.gz') else open(path))
ev = d['traceEvents'] if isinstance(d, dict) else d
pname = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
tname = {(e['pid'], e['tid']): e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
gpu = {p for p, n in pname.items() if 'GPU' in n or 'gpu' in n}
print('gpu pids', {p: pname[p] for p in gpu})
tot = collections.Counter(); cnt = collections.Counter(); threads = collections.Counter()
for e in ev:
  if e.get('ph') == 'X' and e['pid'] in gpu:
    threads[tname.get((e['pid'], e['tid']), e['tid'])] += e.get('dur', 0)
for t, v in threads.most_common(10): print('thread', t, v / 1e3, 'ms')
for e in ev:
  if e.get('ph') == 'X' and e['pid'] in gpu:
    tn = str(tname.get((e['pid'], e['tid']), ''))
    if 'Stream' not in tn and 'stream' not in tn: continue
    n = e['name']
    tot[n] += e.get('dur', 0); cnt[n] += 1
all_us = sum(tot.values())
print(f'total kernel time {all_us/1e3:.1f} ms over 3 steps')
cat = collections.Counter()
for n, v in tot.items():
  k = ('gemm' if re.search('gemm|sm90_xmma|cutlass|nvjet|cublas', n, re.I) else
       'attn' if re.search('fmha|flash|cudnn|attention', n, re.I) else
       'fusion' if 'fusion' in n or 'loop_' in n or 'input_' in n else 'other')
  cat[k] += v
for k, v in cat.most_common(): print(f'{k:8s} {v/1e3:9.1f} ms {v/all_us:6.1%}')
for n, v in tot.most_common(40): print(f'{v/1e3:8.2f} ms {cnt[n]:5d}x  {n[:110]}')
