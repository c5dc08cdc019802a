"""Training step time, tokens/s and MFU of bigjax's own train step on one GPU.

  python experiments/bench/gpu.py [--models gpt125m,gpt1b,mnist_cnn] [--steps 20] [--warmup 3]
                                  [--batch gpt125m=32,gpt1b=8]
  python experiments/bench/gpu.py --cpu_smoke      # plumbing check on CPU: tiny shapes, no numbers

Runs from any directory and writes nothing unless --profile DIR is given (DIR is relative to the
current directory).

Models (each in a fresh subprocess, on jax.devices()[0] alone):
  gpt125m    GPT-2 small shape: 12 layers, 12 heads, 768 wide, context 1024, vocab 50304, batch 32.
  gpt1b      24 layers, 16 heads, 2048 wide, context 2048, vocab 50304, batch 8 (~1.3B parameters).
  mnist_cnn  the shipped mnist_cnn config as it is (batch 64, mnist5k, float32).
Both GPTs: the shipped gpt_shakespeare config with the model replaced (learned positions, tied
embedding, GELU MLP 4x, no dropout), bfloat16 compute with float32 parameters and optimizer state
(dtype='bfloat16', param_dtype='float32'), cuDNN flash attention (attention='cudnn'), layers
unrolled (scan=False: on the H100 the scanned stack spent ~18% of the 125M step copying per-layer
slices in and out of the stacked arrays), no remat (the 1B step fits in 52 GiB), the config's AdamW
with warmup + cosine and clipping. Data: synthetic uniform random token windows
over the full vocabulary (B x (T+1) int32), so no data set is needed. The GPT worker replaces two
functions of `bigjax.experiment` in its own process (`use_synthetic_data`):
`experiment.tokenizer_for` returns a `SyntheticVocab` (only the facts build() derives the model's
and task's vocabulary from: vocab_size = 50304, num_regular_tokens = vocab_size - 4 and the four
special ids pad, cls, sep, mask after them; it encodes nothing), and `experiment.load_data`
returns the random windows. Everything else is bigjax's: `experiment.build(config)` (which derives
vocab_size from that tokenizer and checks the tokens as usual), `Experiment.compile_train_step()`
(the jitted, donated train step train.py runs), `steps.create_state`, `TrainBatches` and
`Experiment.to_global` for every batch.
Timing: `--warmup` steps, then `--steps` steps dispatched back to back, blocking on the last
result; step time = elapsed / steps. MFU (bigjax.flops): model FLOPs per step / step time / dense
bf16 peak of the device (H100 SXM 989.5 TFLOP/s); GPT model FLOPs = 6*N*tokens + 12*L*T*d*tokens
(no remat recompute, no causal saving). XLA's own count is printed for reference only: it counts
a scanned layer once and the cuDNN attention kernel as zero, so it falls far below the model count.
Goals on one H100 or H200 (issue 19): >= 50% MFU for gpt125m, >= 60% for gpt1b.
"""

import argparse
import os
import sys
import time

import numpy as np

import harness

VOCAB = 50304
GPTS = {
  'gpt125m': dict(num_layers=12, num_heads=12, embed_dim=768, max_len=1024, batch=32),
  'gpt1b': dict(num_layers=24, num_heads=16, embed_dim=2048, max_len=2048, batch=8),
}
MODELS = (*GPTS, 'mnist_cnn')
# --cpu_smoke: the same code path at toy sizes on CPU (no cuDNN: attention='xla').
SMOKE_GPT = dict(num_layers=2, num_heads=2, embed_dim=64, max_len=64, batch=4)
SMOKE_VOCAB = 512


def gpt_config(name, batch, smoke, model_overrides=()):
  """The shipped gpt_shakespeare config with the benchmark's GPT (see the module docstring). The
  vocabulary is not set here: build() derives it from the tokenizer (`use_synthetic_data`).

  model_overrides: (key, value-string) pairs for config.model.kwargs (from --set), e.g. scan=false.
  """
  from bigjax import config_lib

  shape = dict(SMOKE_GPT if smoke else GPTS[name])
  shape.pop('batch')
  config = config_lib.load_config_file('gpt_shakespeare')
  # The context length is config.data.seq_len; the config ties the model's max_len to it.
  config.data.seq_len = shape.pop('max_len')
  config.model.kwargs.update(
    dropout=0.0,
    scan=False,
    remat='none',
    attention='xla' if smoke else 'cudnn',
    dtype='bfloat16',
    param_dtype='float32',
    **shape,
  )
  for key, value in model_overrides:
    default = config.model.kwargs.get(key, '')  # fields the config leaves unset are strings
    config.model.kwargs[key] = (
      value.lower() == 'true' if isinstance(default, bool) else type(default)(value)
    )
  config.batch_size = config.eval_batch_size = batch
  return config


class SyntheticVocab:
  """What `experiment.tokenizer_for` returns in a GPT worker: the vocabulary facts build() reads
  (bigjax's tokenizer convention: the last four ids are PAD, CLS, SEP, MASK); no encode/decode,
  since the data are random ids already."""

  def __init__(self, vocab_size):
    self.name = f'synthetic{vocab_size}'
    self.vocab_size = vocab_size
    self.num_regular_tokens = vocab_size - 4
    self.pad, self.cls, self.sep, self.mask = range(vocab_size - 4, vocab_size)


def synthetic_tokens(seq_len, vocab, rows, seed):
  """{'inputs': (rows, seq_len + 1) int32} uniform over the whole vocabulary."""
  rng = np.random.default_rng(seed)
  return {'inputs': rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)}


def use_synthetic_data(vocab):
  """Replaces, in this process only, bigjax.experiment's tokenizer (a SyntheticVocab of `vocab`)
  and data loading (4 batches of random train windows, one eval batch): build() then derives the
  model's and task's vocab_size = `vocab` and checks the tokens as it does for real data."""
  from bigjax import experiment

  tokenizer = SyntheticVocab(vocab)
  experiment.tokenizer_for = lambda config: tokenizer

  def load_data(config, tokenizer=None):
    del tokenizer
    seq = config.data.seq_len
    return (
      synthetic_tokens(seq, vocab, 4 * config.batch_size, 0),
      synthetic_tokens(seq, vocab, config.eval_batch_size, 1),
      'synthetic',
    )

  experiment.load_data = load_data


def run_model(name, steps, warmup, batch, smoke, profile_dir='', model_overrides=()):
  """One model in this process -> its result dict (see the module docstring)."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  import jax

  from bigjax import compile as compile_lib
  from bigjax import config_lib, experiment, flops
  from bigjax import steps as steps_lib

  if name in GPTS:
    batch = batch or (SMOKE_GPT if smoke else GPTS[name])['batch']
    config = gpt_config(name, batch, smoke, model_overrides)
    # bigjax's data path with random tokens instead of a data set (checked by the task as usual).
    use_synthetic_data(SMOKE_VOCAB if smoke else VOCAB)
  else:
    config = config_lib.load_config_file('mnist_cnn')
    if batch:
      config.batch_size = batch
  exp = experiment.build(config, devices=jax.devices()[:1])
  t0 = time.perf_counter()
  compiled = exp.compile_train_step()
  compile_s = time.perf_counter() - t0
  state = steps_lib.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
  host = [exp.batches.batch(i) for i in range(warmup + steps)]
  metrics = None
  for i in range(warmup):
    state, metrics = compiled(state, exp.to_global(host[i]))
  jax.block_until_ready((state, metrics))
  pending = []
  t0 = time.perf_counter()
  for i in range(warmup, warmup + steps):
    state, metrics = compiled(state, exp.to_global(host[i]))
    pending.append(metrics)
  jax.block_until_ready((state, pending))
  train_s = time.perf_counter() - t0
  last = jax.device_get(pending[-1])
  if profile_dir:  # a few more steps under the profiler (after timing, so they cost it nothing)
    with jax.profiler.trace(os.path.join(profile_dir, name), create_perfetto_trace=True):
      for i in range(3):
        state, metrics = compiled(state, exp.to_global(host[i % len(host)]))
      jax.block_until_ready((state, metrics))
  report = flops.throughput_report(exp, compiled, train_s, steps)
  memory = compile_lib.memory_report(compiled)
  return dict(
    report,
    model=name,
    device=jax.devices()[0].device_kind,
    num_params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(exp.abstract.params))),
    batch=config.batch_size,
    seq_len=config.data.seq_len if name in GPTS else None,
    compile_s=compile_s,
    memory_total_bytes=memory and memory['total'],
    loss=float(last['loss']),
    finite=bool(last['finite']),
  )


def probe():
  """The default backend and its first device, from a fresh process."""
  import jax

  return {
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'count': len(jax.devices()),
  }


def _fmt(value, spec, scale=1.0):
  return format(value / scale, spec) if value is not None else 'n/a'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--models', default=','.join(MODELS), help=f'comma-separated subset of {", ".join(MODELS)}'
  )
  parser.add_argument('--steps', type=int, default=20, help='timed steps per model')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
  parser.add_argument('--batch', default='', help='per-model batch sizes, e.g. gpt125m=16,gpt1b=4')
  parser.add_argument(
    '--cpu_smoke',
    action='store_true',
    help='run the code path on CPU at toy sizes (checks plumbing, no numbers)',
  )
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='override a GPT config.model.kwargs field, e.g. --set scan=false',
  )
  parser.add_argument(
    '--profile', default='', help='directory for a perfetto trace of 3 extra steps per model'
  )
  parser.add_argument('--worker', choices=[*MODELS, 'probe'], help=argparse.SUPPRESS)
  args = parser.parse_args()
  models = [m for m in args.models.split(',') if m]
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    parser.error(f'--models: unknown {", ".join(unknown)}; choose from {", ".join(MODELS)}')
  try:
    batches = {k: int(v) for k, v in (item.split('=') for item in args.batch.split(',') if item)}
  except ValueError:
    parser.error('--batch must look like gpt125m=16,gpt1b=4')
  if args.steps < 1 or args.warmup < 1:
    parser.error('--steps and --warmup must be >= 1')

  if args.worker == 'probe':
    harness.worker_result(probe())
    return
  if args.worker:
    harness.worker_result(
      run_model(
        args.worker,
        args.steps,
        args.warmup,
        batches.get(args.worker),
        args.cpu_smoke,
        args.profile,
        [item.split('=', 1) for item in args.set],
      )
    )
    return

  found = harness.run_worker(__file__, 'probe')
  if found['backend'] != 'gpu' and not args.cpu_smoke:
    sys.exit(
      f'gpu.py: no GPU found (jax {harness.version("jax")} sees {found["count"]} '
      f'{found["backend"]} device(s): {found["device"]}); run it on a machine with an '
      'NVIDIA GPU and jax[cuda12] installed, or pass --cpu_smoke to check the plumbing on '
      'CPU'
    )
  print(harness.machine_info())
  print(
    f'device: {found["device"]} ({found["backend"]}, {found["count"]} visible, using 1)'
    + ('; --cpu_smoke: toy shapes, the numbers mean nothing' if args.cpu_smoke else '')
  )
  extra = ['--steps', args.steps, '--warmup', args.warmup] + (
    ['--cpu_smoke'] if args.cpu_smoke else []
  )
  if args.batch:
    extra += ['--batch', args.batch]
  for item in args.set:
    extra += ['--set', item]
  if args.profile:
    extra += ['--profile', os.path.abspath(args.profile)]
  rows = []
  for m in models:
    r = harness.run_worker(__file__, m, *extra)
    rows.append(r)
    print(
      f'{m}: step {_fmt(r["step_time_s"], ".1f", 1e-3)} ms, MFU {_fmt(r["mfu"], ".1%")}', flush=True
    )

  print(
    f'\n{args.steps} timed steps after {args.warmup} warm-up; MFU against '
    f'{rows[0]["peak_source"]}\n'
  )
  print(
    '| model | params | batch x seq | step ms | tokens/s | examples/s | model TFLOP/s | MFU | '
    'analytic / XLA FLOPs | memory GiB | compile s | loss |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    shape = f'{r["batch"]} x {r["seq_len"]}' if r['seq_len'] else str(r['batch'])
    print(
      f'| {r["model"]} | {r["num_params"] / 1e6:.1f}M | {shape} | '
      f'{_fmt(r["step_time_s"], ".1f", 1e-3)} | {_fmt(r["tokens_per_s"], ",.0f")} | '
      f'{_fmt(r["examples_per_s"], ",.0f")} | {_fmt(r["model_flops_per_s"], ".1f", 1e12)} | '
      f'{_fmt(r["mfu"], ".1%")} | {_fmt(r["analytic_over_xla"], ".2f")} | '
      f'{_fmt(r["memory_total_bytes"], ".1f", 2**30)} | {r["compile_s"]:.1f} | '
      f'{r["loss"]:.3f}{"" if r["finite"] else " (non-finite)"} |'
    )


if __name__ == '__main__':
  main()
