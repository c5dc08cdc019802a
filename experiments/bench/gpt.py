"""Training throughput of a small byte-level GPT: bigjax vs a plain jax loop vs PyTorch eager (CPU).

  python experiments/bench/gpt.py [--steps 60] [--rounds 3] [--out [FILE]]  (from any directory)

--out writes the printed output to FILE as well (default results/gpt_cpu_<date>.md); otherwise
nothing is written.

Contenders, all on the same GPT: pre-LN decoder, 4 layers, 4 heads, 128 wide, context 128, learned
positions, tied input/output embedding, GELU (tanh) MLP 4x, LayerNorm eps 1e-5, no dropout, byte
vocabulary of 260 (bigjax's: 256 bytes + 4 specials), fp32, batch 32 windows of 128 tokens.
Init as bigjax's gpt.Model: token/position embeddings and MLP kernels N(0, 0.02), attention q/k/v
and output kernels lecun-normal (truncated), biases 0, LayerNorm 1/0.
Optimizer, the same in all three: AdamW lr 1e-3 constant (no warmup), betas (0.9, 0.999),
eps 1e-8, weight decay 0.1 on >=2-D params only, no gradient clipping. (The shipped config uses
b2 0.99, warmup + cosine and clipping at 1.0; the benchmark sets the reference loops' settings.)
Data: the 'shakespeare' TFDS train split as bigjax's 'lm' view (windows of 129 bytes); step i of
epoch e takes rows [i*32, (i+1)*32) of the permutation default_rng([0, e]), as bigjax's
TrainBatches does with seed 0, so all three train on the same batches in the same order.
  bigjax    `train.train_and_evaluate` on the shipped gpt_shakespeare:size=small config with only
            the optimizer settings above, num_steps, eval_every=0 and eval_max_examples=64
            changed, in a temporary workdir, so its checkpointing (one save, at the last step),
            metrics, logging and progress bar are part of what is measured (its vocabulary of
            260 comes from the config's byte tokenizer, as build() derives it);
  jax loop  a minimal flax + optax loop: one AOT-compiled, donated step, numpy batches sliced on
            host, einsum causal attention with a fused qkv projection (as the reference anchor);
  torch     the same GPT in PyTorch eager: F.scaled_dot_product_attention(is_causal=True), fused
            AdamW, one thread per core (skipped if torch is missing).
Tokens/s excludes the first step (compilation / warm-up) and times all remaining steps, blocking on
the result at the end. "data wait" (bigjax only) is results.json's throughput.data_wait_fraction:
the share of the timed steps' wall time the loop spent blocked on the next batch. "compile s" is the
ahead-of-time XLA compile of the train step (jax) or the first eager step (torch). Model FLOP/s uses
FLOPs/token = 6*N + 12*L*T*d (N = bigjax's parameter count minus the position embeddings; 12*L*T*d =
attention scores and weighted sum, forward and backward, no causal saving); "of peak" divides it by
a float32 2048^3 jax matmul measured once at the start. Each (round, contender) runs in a fresh
subprocess, interleaved round by round (bigjax, jax loop, torch, bigjax, ...) so all three see the
same machine state; the table gives the median and [min-max] over rounds. The plain loops are
adapted from the reference anchors (gpt_jax.py, gpt_torch.py, matmul_peak.py) and self-contained.
"""

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np

import harness

N_LAYER, N_HEAD, N_EMBD, BLOCK, VOCAB, BATCH = 4, 4, 128, 128, 260, 32
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.1
SEED = 0
CONTENDERS = ('bigjax', 'jax loop', 'torch')
LECUN_TRUNC = 0.87962566103423978  # std of a unit normal truncated to [-2, 2] (flax's correction)


def shakespeare_windows():
  """bigjax's 'lm' view of the shakespeare train split: {'inputs': (N, BLOCK + 1) int32}."""
  from bigjax.data import text

  return text.load_text_split('shakespeare', 'train', 'lm', BLOCK)['inputs']


def batch_indices(n, steps):
  """Row indices of each step's batch: bigjax's TrainBatches with seed SEED, remainder dropped."""
  per_epoch, perm, epoch = n // BATCH, None, None
  for step in range(steps):
    e, i = divmod(step, per_epoch)
    if e != epoch:
      epoch, perm = e, np.random.default_rng([SEED, e]).permutation(n)
    yield perm[i * BATCH : (i + 1) * BATCH]


# ------------------------------------------------------------------------------------------------
# Contenders: each returns {'tokens_per_s', 'compile_s', ...}.
# ------------------------------------------------------------------------------------------------
def run_matmul(n=2048, reps=10):
  """float32 n^3 jax matmul GFLOP/s: median over `reps` after 2 warm-ups (as matmul_peak.py)."""
  from bigjax import flops

  measured = flops.measure_matmul(n, reps)
  return {
    'median_gflops': measured['median_flops'] / 1e9,
    'best_gflops': measured['best_flops'] / 1e9,
  }


def run_bigjax(steps):
  import jax

  from bigjax import config_lib, experiment, train

  config = config_lib.load_config_file('gpt_shakespeare:size=small')
  config.num_steps = steps
  config.optim.update(
    schedule='constant',
    warmup_steps=0,
    clip_norm=0.0,
    b1=B1,
    b2=B2,
    eps=EPS,
    lr=LR,
    weight_decay=WD,
  )
  config.eval_every = 0
  config.data.eval_max_examples = 64
  kw = config.model.kwargs
  vocab = experiment.tokenizer_for(config).vocab_size  # what build() gives the model and task
  assert (
    kw.num_layers,
    kw.num_heads,
    kw.embed_dim,
    kw.max_len,
    vocab,
    kw.dropout,
    config.data.seq_len,
    config.batch_size,
    config.seed,
  ) == (N_LAYER, N_HEAD, N_EMBD, BLOCK, VOCAB, 0.0, BLOCK, BATCH, SEED), 'config drifted'
  with tempfile.TemporaryDirectory(prefix='bench_gpt_') as workdir:
    r = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  # train metrics are the mean over the steps since the previous log step
  window = steps - (steps - 1) // config.log_every * config.log_every
  return {
    'tokens_per_s': r['train_examples_per_s'] * config.data.seq_len,
    'compile_s': r['compile_s'],
    'loss': r['train']['loss'],
    'loss_window': window,
    'num_params': r['num_params'],
    'flop_params': r['num_params'] - kw.max_len * kw.embed_dim,  # minus position embeddings
    'data_wait_fraction': r['throughput']['data_wait_fraction'],
  }


def run_jax_loop(steps):
  import flax.linen as nn
  from flax.training import train_state
  import jax
  import jax.numpy as jnp
  import optax

  emb_init = nn.initializers.normal(0.02)
  attn_init = nn.initializers.lecun_normal()  # bigjax's MultiHeadAttention default

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      B, T, C = x.shape
      h = nn.LayerNorm(epsilon=1e-5)(x)
      q, k, v = jnp.split(nn.Dense(3 * C, kernel_init=attn_init)(h), 3, axis=-1)
      q, k, v = (t.reshape(B, T, N_HEAD, C // N_HEAD) for t in (q, k, v))
      s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(C // N_HEAD).astype(x.dtype)
      s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
      y = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)
      x = x + nn.Dense(C, kernel_init=attn_init)(y.reshape(B, T, C))
      h = nn.LayerNorm(epsilon=1e-5)(x)
      h = nn.gelu(nn.Dense(4 * C, kernel_init=emb_init)(h), approximate=True)
      return x + nn.Dense(C, kernel_init=emb_init)(h)

  class GPT(nn.Module):
    @nn.compact
    def __call__(self, idx):
      wte = nn.Embed(VOCAB, N_EMBD, embedding_init=emb_init)
      wpe = self.param('wpe', emb_init, (BLOCK, N_EMBD))
      x = wte(idx) + wpe[: idx.shape[1]]
      for _ in range(N_LAYER):
        x = Block()(x)
      return wte.attend(nn.LayerNorm(epsilon=1e-5)(x))  # tied LM head

  def train_step(state, w):  # w: (B, T + 1) windows
    def loss_fn(params):
      logits = state.apply_fn({'params': params}, w[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  windows = shakespeare_windows()
  model = GPT()
  params = model.init(jax.random.PRNGKey(SEED), jnp.zeros((1, BLOCK), jnp.int32))['params']
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, mask=decay_mask)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  batches = [windows[idx] for idx in batch_indices(len(windows), steps)]
  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=0).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0

  losses = []
  for i, w in enumerate(batches):
    state, loss = step(state, w)
    losses.append(loss)  # device arrays: no host sync inside the loop
    if i == 0:  # the first step is warm-up: finish it, then start the clock
      jax.block_until_ready(loss)
      t0 = time.perf_counter()
  jax.block_until_ready((state, losses))
  train_s = time.perf_counter() - t0
  return {
    'tokens_per_s': (steps - 1) * BATCH * BLOCK / train_s,
    'compile_s': compile_s,
    'losses': [float(l) for l in jax.device_get(losses)],
    'num_params': int(sum(p.size for p in jax.tree.leaves(params))),
  }


def torch_model_and_optimizer():
  """The PyTorch GPT (bigjax's init, see the module docstring) and its fused AdamW, one thread per
  core."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(SEED)

  class Block(nn.Module):
    def __init__(self, C=N_EMBD):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
      self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
      self.fc, self.fc_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
      B, T, C = x.shape
      heads = lambda t: t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)  # (B, h, T, hd)
      q, k, v = map(heads, self.qkv(self.ln1(x)).split(C, dim=2))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
      return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate='tanh'))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(VOCAB, N_EMBD)
      self.wpe = nn.Parameter(torch.zeros(BLOCK, N_EMBD))
      self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
      self.ln_f = nn.LayerNorm(N_EMBD)
      for name, p in self.named_parameters():  # bigjax's init (see the module docstring)
        if name.endswith(('.qkv.weight', '.proj.weight')):  # lecun normal, truncated at 2 std
          std = (1.0 / p.shape[1]) ** 0.5 / LECUN_TRUNC  # fan_in = in_features
          nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        elif p.dim() >= 2:  # embeddings, MLP kernels
          nn.init.normal_(p, std=0.02)
        elif not name.startswith('ln') and '.ln' not in name:  # Linear biases; LayerNorm keeps 1/0
          nn.init.zeros_(p)

    def forward(self, idx):
      x = self.wte(idx) + self.wpe[: idx.shape[1]]
      for blk in self.blocks:
        x = blk(x)
      return self.ln_f(x) @ self.wte.weight.T  # tied LM head

  model = GPT()
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
    [{'params': decay, 'weight_decay': WD}, {'params': no_decay, 'weight_decay': 0.0}],
    lr=LR,
    betas=(B1, B2),
    eps=EPS,
    fused=True,
  )
  return model, opt


def torch_step(model, opt, windows):
  """One eager training step on (B, BLOCK + 1) int64 windows -> the loss (a 0-d tensor)."""
  import torch.nn.functional as F

  x, y = windows[:, :-1], windows[:, 1:].long()
  loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return loss.detach()


def run_torch(steps):
  import torch

  windows = torch.from_numpy(shakespeare_windows())
  model, opt = torch_model_and_optimizer()
  batches = [windows[torch.from_numpy(idx)] for idx in batch_indices(len(windows), steps)]
  losses = []
  t_first = time.perf_counter()
  for i, w in enumerate(batches):
    losses.append(torch_step(model, opt, w))
    if i == 0:  # eager runs synchronously on CPU; the first step is warm-up
      first_s, t0 = time.perf_counter() - t_first, time.perf_counter()
  losses = torch.stack(losses).tolist()
  train_s = time.perf_counter() - t0
  return {
    'tokens_per_s': (steps - 1) * BATCH * BLOCK / train_s,
    'compile_s': first_s,
    'losses': losses,
    'num_params': sum(p.numel() for p in model.parameters()),
  }


RUNNERS = {
  'matmul': lambda steps: run_matmul(),
  'bigjax': run_bigjax,
  'jax loop': run_jax_loop,
  'torch': run_torch,
}


# ------------------------------------------------------------------------------------------------
# Driver: one fresh subprocess per (round, contender), then the table.
# ------------------------------------------------------------------------------------------------
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--rounds', type=int, default=3)
  harness.add_out_flag(parser, 'gpt')
  parser.add_argument('--worker', choices=list(RUNNERS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.steps < 2:
    parser.error('--steps must be >= 2 (the first step is not timed)')
  if args.worker:
    harness.worker_result(RUNNERS[args.worker](args.steps))
    return

  out = harness.Output(args.out)
  out.print(harness.machine_info())
  peak = harness.run_worker(__file__, 'matmul', '--steps', args.steps)
  out.print(
    f'float32 matmul peak (jax, 2048^3): median {peak["median_gflops"]:.1f} GFLOP/s, '
    f'best {peak["best_gflops"]:.1f}'
  )
  contenders = [c for c in CONTENDERS if c != 'torch' or importlib.util.find_spec('torch')]
  results = {c: [] for c in contenders}
  for r in range(args.rounds):
    for c in contenders:
      results[c].append(harness.run_worker(__file__, c, '--steps', args.steps))
      out.print(
        f'round {r + 1}/{args.rounds} {c:9s} {results[c][-1]["tokens_per_s"]:7.0f} tokens/s'
      )

  big = results['bigjax'][0]
  window, n_flop = big['loss_window'], big['flop_params']
  flops_per_token = 6 * n_flop + 12 * N_LAYER * BLOCK * N_EMBD
  for c in contenders:  # the same model everywhere, and each run's final train loss
    for x in results[c]:
      if x['num_params'] != big['num_params']:
        out.print(f'WARNING: {c} has {x["num_params"]} params, bigjax {big["num_params"]}')
      if 'losses' in x:
        x['loss'] = float(np.mean(x['losses'][-window:]))

  med = lambda c, k: float(np.median([x[k] for x in results[c]]))
  base = med('jax loop', 'tokens_per_s')
  out.print(
    f'\nGPT {N_LAYER}L/{N_HEAD}H/{N_EMBD}d, context {BLOCK}, batch {BATCH}, {args.steps} steps '
    f'(first untimed), {args.rounds} rounds; median [min-max]; N = {n_flop:,} params '
    f'(without position embeddings), {flops_per_token:,} FLOP/token; matmul peak '
    f'{peak["median_gflops"]:.1f} GFLOP/s; load average at the end {os.getloadavg()[0]:.2f}\n'
  )
  out.print(
    '| contender | tokens/s median [min–max] | ratio to plain jax loop | model TFLOP/s | '
    'fraction of matmul peak | final train loss | data wait | compile s |'
  )
  out.print('|---|---|---|---|---|---|---|---|')
  for c in contenders:
    tps = [x['tokens_per_s'] for x in results[c]]
    tflops = np.median(tps) * flops_per_token / 1e12
    wait = f'{med(c, "data_wait_fraction"):.1%}' if c == 'bigjax' else '—'
    out.print(
      f'| {c} | {np.median(tps):.0f} [{min(tps):.0f}–{max(tps):.0f}] | '
      f'{np.median(tps) / base:.3f} | {tflops:.4f} | '
      f'{tflops * 1e3 / peak["median_gflops"]:.2f} | {med(c, "loss"):.4f} | {wait} | '
      f'{med(c, "compile_s"):.2f} |'
    )
  if 'torch' not in contenders:
    out.print('| torch | skipped: torch is not installed | | | | | | |')
  out.print(
    f'\nfinal train loss: mean over the last {window} steps (bigjax\'s last logged window). '
    'compile s: XLA compile of the train step (jax); first eager step (torch). data wait: share '
    'of the timed steps spent blocked on the next batch (results.json '
    'throughput.data_wait_fraction; goal < 2%).'
  )
  out.print(f'\nbigjax / jax loop = {med("bigjax", "tokens_per_s") / base:.3f}  (goal >= 0.95)')
  if 'torch' in contenders:
    out.print(f'torch / jax loop  = {med("torch", "tokens_per_s") / base:.3f}')
    ratio = med('bigjax', 'tokens_per_s') / med('torch', 'tokens_per_s')
    out.print(f'bigjax / torch    = {ratio:.3f}  (goal >= 1.0)')
  out.close()


if __name__ == '__main__':
  main()
