"""GPU checks the CPU test suite can only fake: cuDNN attention, bf16 training, the chunked loss.

  python experiments/bench/gpu_checks.py [--steps 300] [--checks attention,training,cross_entropy]
                                         (from any directory; writes nothing)

tests/test_gpu.py runs the same two functions (`attention_check`, `training_check`, a shorter
training run) with pass/fail assertions at ATTENTION_TOL and TRAINING_REL_TOL; this script prints
the full tables (the README's numbers).

1. cuDNN flash attention (`attention='cudnn'`) against bigjax's XLA attention computed in float32 on
   the same bf16 inputs: relative error ||out - ref|| / ||ref|| of the output and of the gradients
   of q, k, v, for causal, padded and plain attention (B=4, T=S=1024, 8 heads of 64).
2. One training run per variant of the shipped `gpt_shakespeare:size=small` (real Shakespeare bytes,
   `--steps` steps, same seed and batches): float32 + XLA attention (the reference), bfloat16
   compute with float32 parameters + XLA attention, bfloat16 + cuDNN attention. Prints each
   variant's train-loss curve against the reference's (max |difference| over the logged steps)
   and the final validation loss.

3. The chunked cross-entropy (bigjax.ops.cross_entropy, issue 19's candidate for the GPT step's
   50,304-way loss) against the plain full-logits loss at gpt125m's shape (32 x 1024 tokens, width
   768, bf16 hidden states and head, float32 accumulation): forward + backward ms (median of 10
   after 2 warm-ups), XLA's temporary memory of the compiled step, and the relative error of the
   loss and gradients. It decides whether the chunked loss is worth wiring into the train step.

Tolerances (what tests/test_gpu.py asserts): ATTENTION_TOL bounds the relative error of the cuDNN
output and of every gradient (measured on an H100: <= 2.8e-3, the bf16-operand level; bf16 keeps
8 significant bits, relative rounding 2^-8 = 3.9e-3); TRAINING_REL_TOL bounds max |loss - fp32
loss| / fp32 loss over the logged train losses (measured: 0.06% over 300 steps).
"""

import argparse
import tempfile

import numpy as np

ATTENTION_TOL = 1e-2
TRAINING_REL_TOL = 1e-2
VARIANTS = {
  'float32 + xla': dict(dtype='float32', attention='xla'),
  'bfloat16 + xla': dict(dtype='bfloat16', attention='xla'),
  'bfloat16 + cudnn': dict(dtype='bfloat16', attention='cudnn'),
}


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def attention_check():
  """cuDNN vs float32 XLA attention: rows of (case, output error, max gradient error)."""
  import jax
  import jax.numpy as jnp

  from bigjax.models import attention as A

  B, T, N, H = 4, 1024, 8, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (
    jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(jnp.bfloat16) for kk in keys
  )
  lengths = jnp.array([T, T // 2, 300, 17])
  valid = jnp.arange(T)[None, :] < lengths[:, None]
  cases = {
    'causal': dict(causal=True),
    'padding': dict(mask=A.padding_mask(valid)),
    'plain': {},
    'causal+padding': dict(causal=True, mask=A.padding_mask(valid)),
  }
  rows = []
  for name, kw in cases.items():

    def loss(q, k, v, impl):
      out = A.dot_product_attention(q, k, v, implementation=impl, **kw)
      return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

    f32 = lambda x: x.astype(jnp.float32)
    (_, ref), ref_grads = jax.jit(
      jax.value_and_grad(
        lambda q, k, v: loss(f32(q), f32(k), f32(v), 'xla'), argnums=(0, 1, 2), has_aux=True
      )
    )(q, k, v)
    (_, out), grads = jax.jit(
      jax.value_and_grad(lambda q, k, v: loss(q, k, v, 'cudnn'), argnums=(0, 1, 2), has_aux=True)
    )(q, k, v)
    if 'mask' in kw:  # padded queries are defined as zeros by both; compare the valid rows
      sel = np.asarray(valid)
      ref, out = np.asarray(ref)[sel], np.asarray(out)[sel]
    rows.append((name, rel_err(out, ref), max(rel_err(a, b) for a, b in zip(grads, ref_grads))))
  return rows


def training_check(steps, log_every=10, variants=None):
  """Train-loss curves of the VARIANTS (fp32 + XLA first, the reference) -> rows of (variant,
  max |dloss|, max |dloss| / loss, first and last logged train loss, final eval loss); the
  losses are those logged every `log_every` steps. Each run trains in a temporary workdir."""
  from bigjax import config_lib, train

  curves, finals = {}, {}
  for name, kw in (variants or VARIANTS).items():
    config = config_lib.load_config_file('gpt_shakespeare:size=small')
    config.model.kwargs.update(**kw)
    config.num_steps = steps
    config.log_every = log_every
    config.eval_every = 0
    config.checkpoint_every = steps
    config.data.eval_max_examples = 512
    with tempfile.TemporaryDirectory() as workdir:
      results = train.train_and_evaluate(config, workdir)
    curves[name] = np.array([h['loss'] for h in results['history'] if h['split'] == 'train'])
    finals[name] = results['eval']['loss']
  ref = curves['float32 + xla']
  return [
    (
      name,
      float(np.max(np.abs(c - ref))),
      float(np.max(np.abs(c - ref) / ref)),
      float(c[0]),
      float(c[-1]),
      finals[name],
    )
    for name, c in curves.items()
  ]


def cross_entropy_check(tokens=32 * 1024, width=768, vocab=50304, chunks=(4096, 8192), reps=10):
  """Plain vs chunked head + cross-entropy, forward + backward, bf16 inputs -> rows of (variant,
  median ms, XLA temp GiB, loss rel. error, max grad rel. error vs plain)."""
  import time

  import jax
  import jax.numpy as jnp

  from bigjax.ops import cross_entropy as ce

  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (tokens, width), jnp.float32).astype(jnp.bfloat16)
  head = (0.02 * jax.random.normal(keys[1], (vocab, width), jnp.float32)).astype(jnp.bfloat16)
  targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
  variants = {'plain (full float32 logits)': ce.cross_entropy_plain}
  for c in chunks:
    variants[f'chunked, {c} tokens a chunk'] = lambda h, e, t, c=c: ce.cross_entropy_chunked(
      h, e, t, chunk_size=c
    )
  rows, ref = [], None
  for name, fn in variants.items():
    step = jax.jit(jax.value_and_grad(lambda h, e, fn=fn: fn(h, e, targets).mean(), argnums=(0, 1)))
    compiled = step.lower(hidden, head).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, 'temp_size_in_bytes', 0) / 2**30 if memory is not None else float('nan')
    out = jax.block_until_ready(compiled(hidden, head))
    times = []
    for _ in range(reps + 2):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(hidden, head))
      times.append(time.perf_counter() - t0)
    ref = ref or out
    loss_err = rel_err(out[0], ref[0])
    grad_err = max(rel_err(g, r) for g, r in zip(out[1], ref[1]))
    rows.append((name, float(np.median(times[2:])) * 1e3, temp, loss_err, grad_err))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument(
    '--checks',
    default='attention,training,cross_entropy',
    help='comma-separated subset of attention, training, cross_entropy',
  )
  parser.add_argument(
    '--cpu_smoke',
    action='store_true',
    help='plumbing check on the CPU: no cuDNN attention, a toy loss shape, 20 training steps',
  )
  args = parser.parse_args()
  checks = set(args.checks.split(','))
  ce_shape = dict(tokens=32 * 1024, width=768, vocab=50304, chunks=(4096, 8192))
  if args.cpu_smoke:  # the numbers mean nothing; cuDNN needs a GPU
    checks.discard('attention')
    ce_shape = dict(tokens=1024, width=32, vocab=512, chunks=(256, 512))
    args.steps = min(args.steps, 20)
  import jax

  print(f'jax {jax.__version__}, device {jax.devices()[0].device_kind}')
  print(
    f'tolerances (tests/test_gpu.py): attention {ATTENTION_TOL:g}, training {TRAINING_REL_TOL:.0%}'
  )
  # Each table is printed after its rows are computed: training's progress lines go in between.
  if 'attention' in checks:
    rows = attention_check()
    print(
      '\n| attention case (B=4, T=1024, 8x64, bf16) | output rel. error | max grad rel. error |'
    )
    print('|---|---|---|')
    for name, out_err, grad_err in rows:
      print(f'| {name} | {out_err:.2e} | {grad_err:.2e} |')
  if 'cross_entropy' in checks:
    rows = cross_entropy_check(**ce_shape)
    print(
      f'\n| head + cross-entropy, {ce_shape["tokens"]} tokens, {ce_shape["width"]} wide, '
      f'V={ce_shape["vocab"]}, bf16 | fwd+bwd ms | XLA temp GiB | loss rel. error | '
      'max grad rel. error |'
    )
    print('|---|---|---|---|---|')
    for name, ms, temp, loss_err, grad_err in rows:
      print(f'| {name} | {ms:.2f} | {temp:.2f} | {loss_err:.1e} | {grad_err:.1e} |')
  if 'training' in checks:
    variants = {k: v for k, v in VARIANTS.items() if not (args.cpu_smoke and 'cudnn' in k)}
    rows = training_check(args.steps, variants=variants)
    print(
      f'\n| gpt_shakespeare:size=small, {args.steps} steps | max abs dloss vs float32 | '
      'max rel dloss | first loss | last train loss | final eval loss |'
    )
    print('|---|---|---|---|---|---|')
    for name, dmax, drel, first, last, final in rows:
      print(f'| {name} | {dmax:.4f} | {drel:.2%} | {first:.4f} | {last:.4f} | {final:.4f} |')


if __name__ == '__main__':
  main()
