"""GPU correctness checks that the CPU test suite can only fake: cuDNN attention and bf16 training.

  python experiments/bench/gpu_checks.py [--steps 300]     (from any directory; writes nothing)

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


def training_check(steps, log_every=10):
  """Train-loss curves of the VARIANTS (fp32 + XLA first, the reference) -> rows of (variant,
  max |dloss|, max |dloss| / loss, first and last logged train loss, final eval loss); the
  losses are those logged every `log_every` steps. Each run trains in a temporary workdir."""
  from bigjax import config_lib, train

  curves, finals = {}, {}
  for name, kw in VARIANTS.items():
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  args = parser.parse_args()
  import jax

  print(f'jax {jax.__version__}, device {jax.devices()[0].device_kind}')
  print(
    f'tolerances (tests/test_gpu.py): attention {ATTENTION_TOL:g}, training {TRAINING_REL_TOL:.0%}'
  )
  print('\n| attention case (B=4, T=1024, 8x64, bf16) | output rel. error | max grad rel. error |')
  print('|---|---|---|')
  for name, out_err, grad_err in attention_check():
    print(f'| {name} | {out_err:.2e} | {grad_err:.2e} |')
  print(
    f'\n| gpt_shakespeare:size=small, {args.steps} steps | max abs dloss vs float32 | '
    'max rel dloss | first loss | last train loss | final eval loss |'
  )
  print('|---|---|---|---|---|---|')
  for name, dmax, drel, first, last, final in training_check(args.steps):
    print(f'| {name} | {dmax:.4f} | {drel:.2%} | {first:.4f} | {last:.4f} | {final:.4f} |')


if __name__ == '__main__':
  main()
