"""Forward + backward time of each block of the cnn.py and gpt.py models on the CPU: bigjax's
formulations side by side with PyTorch eager's, interleaved in one process.

  python experiments/bench/blocks.py [--blocks cnn,gpt] [--reps 30] [--one_core] [--out [FILE]]

Each block is one jitted function (jax) or one eager call (torch) of the shapes the benchmarks
train: the CNN at batch 64 on 28x28x1 images; the GPT at batch 32, context 128, width 128, 4 heads,
MLP 512, vocabulary 260; the last block of each model is its whole train step. A jax block's
formulations are checked against its first one (values and gradients, printed as max |difference|)
before timing. Rounds interleave every formulation of a block (A, B, C, A, B, C, ...); the table
gives the median and [min] wall time over rounds, the median process CPU time, and ratios to the
block's first formulation and to torch. --one_core pins the process to one core with one thread
for XLA and torch: CPU time is then the work each formulation does, which other jobs on the machine
hardly change (with two threads, CPU time also counts threads spinning while they wait, which
PyTorch's OpenMP does, and wall time swings with the load). This is where the formulation choices
for bigjax's CNN and GPT modules were measured
(experiments/bench/README.md quotes the tables); it is a microbenchmark, not the training benchmark
(cnn.py, gpt.py).
"""

import argparse
import os
import time
from typing import Any

import numpy as np

import harness

CNN_BATCH = 64
B, T, D, N, MLP, VOCAB = 32, 128, 128, 4, 512, 260


def timed(fns, reps, warmup=2):
  """{name: fn} -> {name: (wall seconds list, cpu seconds list)}, interleaved rounds."""
  for f in fns.values():
    for _ in range(warmup):
      f()
  out = {k: ([], []) for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      c, t = time.process_time(), time.perf_counter()
      f()
      out[k][0].append(time.perf_counter() - t)
      out[k][1].append(time.process_time() - c)
  return out


def max_diff(a, b):
  import jax

  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def jax_contenders(fns_and_args):
  """{name: (jitted fn, args)} -> ({name: callable}, {name: max |diff| to the first})."""
  import jax

  calls, diffs, ref = {}, {}, None
  for name, (fn, args) in fns_and_args.items():
    out = jax.block_until_ready(fn(*args))
    ref = out if ref is None else ref
    diffs[name] = max_diff(out, ref)
    calls[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
  return calls, diffs


def rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# CNN blocks, and the formulations tried for them (measured, not kept in bigjax: each was faster
# alone but slower inside the whole train step; see experiments/bench/README.md).
# ------------------------------------------------------------------------------------------------
NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_im2col(lhs, rhs, window_strides, padding, **unused):
  """lax.conv_general_dilated for NHWC/HWIO, stride 1, VALID as im2col: the KH*KW shifted slices
  of the input concatenated on the channel axis, times the (KH*KW*C, O) kernel (one matmul; the
  backward pass is two matmuls and the pads/adds that transpose the slices)."""
  import jax.numpy as jnp

  assert tuple(window_strides) == (1, 1) and padding == 'VALID', (window_strides, padding)
  kh, kw, c, o = rhs.shape
  oh, ow = lhs.shape[1] - kh + 1, lhs.shape[2] - kw + 1
  taps = [lhs[:, i : i + oh, j : j + ow] for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1) @ rhs.reshape(kh * kw * c, o)


def pool_strided_slices(x):
  """2x2/2 max-pool as the elementwise maximum of the four strided slices."""
  import jax.numpy as jnp

  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  tap = lambda i, j: x[:, i:h:2, j:w:2]
  return jnp.maximum(jnp.maximum(tap(0, 0), tap(0, 1)), jnp.maximum(tap(1, 0), tap(1, 1)))


CONV_SHAPES = {  # (H, W, C_in, C_out), whether the input gradient is needed
  'conv1 28x28x1->32': ((28, 28, 1, 32), False),
  'conv2 13x13x32->64': ((13, 13, 32, 64), True),
  'conv3 5x5x64->64': ((5, 5, 64, 64), True),
}


def block_conv(name):
  import jax
  from jax import lax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  (h, w, ci, co), need_dx = CONV_SHAPES[name]
  x, k = rand((CNN_BATCH, h, w, ci), 0), rand((3, 3, ci, co), 1, 0.1)
  gy = rand((CNN_BATCH, h - 2, w - 2, co), 2)
  argnums = (0, 1) if need_dx else (1,)

  def grad(conv):
    f = lambda x, k: jnp.sum(conv(x, k, (1, 1), 'VALID', dimension_numbers=NHWC) * gy)
    return jax.jit(jax.grad(f, argnums=argnums))

  calls, diffs = jax_contenders(
    {
      'jax lax.conv (bigjax)': (grad(lax.conv_general_dilated), (x, k)),
      'jax im2col (tried)': (grad(conv_im2col), (x, k)),
    }
  )
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  xt.requires_grad_(need_dx)
  kt = torch.tensor(k).permute(3, 2, 0, 1).contiguous().requires_grad_()
  gt = torch.tensor(gy).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

  def torch_step():
    (F.conv2d(xt, kt) * gt).sum().backward()
    xt.grad = kt.grad = None

  calls['torch conv2d (channels_last)'] = torch_step
  return calls, diffs


def block_pool():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  from bigjax.models import layers

  x = rand((CNN_BATCH, 26, 26, 32), 0)
  gy = rand((CNN_BATCH, 13, 13, 32), 1)
  grad = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(jax.nn.relu(x)) * gy)))
  calls, diffs = jax_contenders(
    {
      'jax reshape + max (bigjax)': (grad(layers.max_pool_2x2), (x,)),
      'jax nn.max_pool': (grad(lambda x: nn.max_pool(x, (2, 2), (2, 2))), (x,)),
      'jax strided slices (tried)': (grad(pool_strided_slices), (x,)),
    }
  )
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  xt.requires_grad_()
  gt = torch.tensor(gy).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

  def torch_step():
    (F.max_pool2d(F.relu(xt), 2) * gt).sum().backward()
    xt.grad = None

  calls['torch max_pool2d'] = torch_step
  return calls, diffs


def cnn_step_jax(conv=None, pool=None):
  """bigjax's cnn.Model (mnist_cnn shape) + optax.adam(1e-3): one donated train step. conv / pool
  replace bigjax.models.layers' convolution function / 2x2 max-pool while the step is traced."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from bigjax.models import cnn, layers

  model = cnn.Model()
  x = jnp.asarray(np.random.default_rng(0).random((CNN_BATCH, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).integers(0, 10, CNN_BATCH), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), x[:1])['params'])
  tx = optax.adam(1e-3)

  def step(params, opt, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, x), y
    ).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  class Conv(nn.Conv):  # layers.conv's nn.Conv with the formulation's convolution function
    conv_general_dilated: Any = conv

  saved = layers.nn.Conv, layers.max_pool_2x2
  layers.nn.Conv = Conv if conv is not None else saved[0]
  layers.max_pool_2x2 = pool or saved[1]
  try:
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), x, y)
  finally:
    layers.nn.Conv, layers.max_pool_2x2 = saved
  compiled = lowered.compile()
  state = [params, tx.init(params)]

  def call():
    state[0], state[1], loss = compiled(state[0], state[1], x, y)
    loss.block_until_ready()

  return call


def block_cnn_step():
  import torch
  from torch import nn
  import torch.nn.functional as F

  calls = {
    'jax lax.conv + reshape pool (bigjax)': cnn_step_jax(),
    'jax im2col convs (tried)': cnn_step_jax(conv=conv_im2col),
    'jax strided-slice pools (tried)': cnn_step_jax(pool=pool_strided_slices),
  }

  class CNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.c1, self.c2, self.c3 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3)
      self.fc1, self.fc2 = nn.Linear(576, 64), nn.Linear(64, 10)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.c1(x)), 2)
      x = F.max_pool2d(F.relu(self.c2(x)), 2)
      x = F.relu(self.c3(x)).flatten(1)
      return self.fc2(F.relu(self.fc1(x)))

  model = CNN().to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
  xt = torch.rand(CNN_BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
  yt = torch.randint(0, 10, (CNN_BATCH,))

  def torch_step():
    loss = F.cross_entropy(model(xt), yt)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  calls['torch eager (fused Adam)'] = torch_step
  return calls, {}


# ------------------------------------------------------------------------------------------------
# GPT blocks, and the attention formulation tried (measured, not kept: the same program as bigjax's
# 'xla' kernel inside a train step).
# ------------------------------------------------------------------------------------------------
HEADS_FIRST = 'xla_heads_first (tried)'


def heads_first_attention(q, k, v, mask, bias, *, causal, dropout_rate, dropout_rng, chunk_size):
  """bigjax's 'xla' kernel (no GQA, dropout or bias) with q, k, v moved to (B, N, T, H) before the
  einsums, so both are batched matmuls over leading axes: (B, T, N, H) -> (B, T, N, H)."""
  import jax.numpy as jnp

  from bigjax.models.attention import kernels

  assert q.shape[2] == k.shape[2] and bias is None and not dropout_rate, 'plain MHA only'
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  mask = kernels.combine_masks(mask, kernels.causal_mask(t, s) if causal else None)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum('bnth,bnsh->bnts', q, k) * (1.0 / np.sqrt(h))
  weights = kernels._masked_softmax(logits, mask)
  return jnp.einsum('bnts,bnsh->bnth', weights, v).transpose(0, 2, 1, 3)


def register_tried_attention():
  from bigjax.models.attention import kernels

  if HEADS_FIRST not in kernels.IMPLEMENTATIONS:
    kernels.IMPLEMENTATIONS.add(HEADS_FIRST, heads_first_attention)


# ------------------------------------------------------------------------------------------------
def block_attention():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  from bigjax.models.attention import MultiHeadAttention

  register_tried_attention()
  x, gy = rand((B, T, D), 0), rand((B, T, D), 1)
  contenders, params = {}, None
  for impl, label in (
    ('xla', 'jax xla (bigjax)'),
    (HEADS_FIRST, f'jax {HEADS_FIRST}'),
    ('chunked', 'jax chunked'),
  ):
    layer = MultiHeadAttention(num_heads=N, head_dim=D // N, causal=True, attention=impl)
    params = params or nn.meta.unbox(layer.init(jax.random.key(0), x)['params'])
    f = lambda p, x, layer=layer: jnp.sum(layer.apply({'params': p}, x) * gy)
    contenders[label] = (jax.jit(jax.grad(f, argnums=(0, 1))), (params, x))
  calls, diffs = jax_contenders(contenders)

  t = lambda a: torch.tensor(np.asarray(a)).requires_grad_()
  xt, gt = t(x), torch.tensor(gy)
  w = {n: t(np.asarray(params[n]['kernel']).reshape(D, D).T) for n in ('query', 'key', 'value')}
  b = {n: t(np.asarray(params[n]['bias']).reshape(D)) for n in ('query', 'key', 'value')}
  wo, bo = t(np.asarray(params['out']['kernel']).reshape(D, D).T), t(params['out']['bias'])
  leaves = [xt, wo, bo, *w.values(), *b.values()]

  def torch_step():
    heads = lambda n: F.linear(xt, w[n], b[n]).view(B, T, N, D // N).transpose(1, 2)
    y = F.scaled_dot_product_attention(heads('query'), heads('key'), heads('value'), is_causal=True)
    (F.linear(y.transpose(1, 2).reshape(B, T, D), wo, bo) * gt).sum().backward()
    for leaf in leaves:
      leaf.grad = None

  calls['torch linear + SDPA'] = torch_step
  return calls, diffs


def block_mlp():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  from bigjax.models import transformer

  x, gy = rand((B, T, D), 0), rand((B, T, D), 1)
  mlp = transformer.Mlp(MLP, 'gelu')
  params = nn.meta.unbox(mlp.init(jax.random.key(0), x)['params'])
  relu = transformer.Mlp(MLP, 'relu')
  grad = lambda m: jax.jit(
    jax.grad(lambda p, x: jnp.sum(m.apply({'params': p}, x) * gy), argnums=(0, 1))
  )
  calls, diffs = jax_contenders({'jax gelu (tanh) MLP': (grad(mlp), (params, x))})
  relu_calls, _ = jax_contenders({'jax relu MLP (floor)': (grad(relu), (params, x))})
  calls.update(relu_calls)
  t = lambda a: torch.tensor(np.asarray(a)).requires_grad_()
  xt, gt = t(x), torch.tensor(gy)
  w1, b1 = t(np.asarray(params['wi']['kernel']).T), t(params['wi']['bias'])
  w2, b2 = t(np.asarray(params['wo']['kernel']).T), t(params['wo']['bias'])

  def torch_step():
    h = F.gelu(F.linear(xt, w1, b1), approximate='tanh')
    (F.linear(h, w2, b2) * gt).sum().backward()
    for leaf in (xt, w1, b1, w2, b2):
      leaf.grad = None

  calls['torch gelu (tanh) MLP'] = torch_step
  return calls, diffs


def block_layernorm():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  x, gy = rand((B, T, D), 0), rand((B, T, D), 1)
  ln = nn.LayerNorm(epsilon=1e-5)
  params = ln.init(jax.random.key(0), x)['params']
  f = lambda p, x: jnp.sum(ln.apply({'params': p}, x) * gy)
  calls, diffs = jax_contenders({'jax nn.LayerNorm': (jax.jit(jax.grad(f, (0, 1))), (params, x))})
  xt, gt = torch.tensor(x).requires_grad_(), torch.tensor(gy)
  scale, bias = torch.ones(D, requires_grad=True), torch.zeros(D, requires_grad=True)

  def torch_step():
    (F.layer_norm(xt, (D,), scale, bias, 1e-5) * gt).sum().backward()
    xt.grad = scale.grad = bias.grad = None

  calls['torch layer_norm'] = torch_step
  return calls, diffs


def block_head_loss():
  import jax
  import jax.numpy as jnp
  import optax
  import torch
  import torch.nn.functional as F

  h, emb = rand((B, T, D), 0), rand((VOCAB, D), 1, 0.02)
  targets = np.random.default_rng(2).integers(0, VOCAB, (B, T)).astype(np.int32)

  def loss(h, emb):
    logits = jnp.einsum('btd,vd->btv', h, emb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  calls, diffs = jax_contenders(
    {'jax tied head + optax CE': (jax.jit(jax.grad(loss, (0, 1))), (h, emb))}
  )
  ht, et = torch.tensor(h).requires_grad_(), torch.tensor(emb).requires_grad_()
  tt = torch.tensor(targets).long()

  def torch_step():
    F.cross_entropy((ht @ et.T).reshape(-1, VOCAB), tt.reshape(-1)).backward()
    ht.grad = et.grad = None

  calls['torch tied head + cross_entropy'] = torch_step
  return calls, diffs


def gpt_params():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from bigjax.models import gpt

  model = gpt.Model(vocab_size=VOCAB, num_layers=4, num_heads=N, embed_dim=D, max_len=T)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))['params'])
  return model, params


def block_adamw():
  import jax
  import optax
  import torch

  from bigjax import optim

  _, params = gpt_params()
  grads = jax.tree.map(lambda p: p * 0.01 + 0.001, params)
  flat = optax.chain(
    optax.flatten(optax.scale_by_adam()),
    optax.add_decayed_weights(0.1, optim.decay_mask),
    optax.scale(-1e-3),
  )
  calls = {}
  for name, tx in {
    'jax optax.adamw (bigjax)': optax.adamw(1e-3, weight_decay=0.1, mask=optim.decay_mask),
    'jax optax.flatten(adam) + decay': flat,
  }.items():
    state = [jax.tree.map(lambda p: p.copy(), params)]
    state.append(tx.init(state[0]))

    def step(p, s, g, tx=tx):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state[0], state[1], grads).compile()

    def call(compiled=compiled, state=state):
      state[0], state[1] = compiled(state[0], state[1], grads)
      jax.block_until_ready(state[0])

    calls[name] = call
  leaves = [torch.nn.Parameter(torch.tensor(np.asarray(p))) for p in jax.tree.leaves(params)]
  for p, g in zip(leaves, jax.tree.leaves(grads)):
    p.grad = torch.tensor(np.asarray(g))
  opt = torch.optim.AdamW(leaves, 1e-3, weight_decay=0.1, fused=True)
  calls['torch fused AdamW'] = opt.step
  return calls, {}


def gpt_step_jax(flat_adam=False, **model_kw):
  """bigjax's gpt.Model (gpt.py's shape) + optax.adamw as gpt.py sets it (flat_adam: Adam's moments
  over one flattened vector, optax.flatten, then the same masked decay): one donated step."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from bigjax import optim
  from bigjax.models import gpt

  model = gpt.Model(vocab_size=VOCAB, num_layers=4, num_heads=N, embed_dim=D, max_len=T, **model_kw)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))['params'])
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=optim.decay_mask)
  if flat_adam:
    tx = optax.chain(
      optax.flatten(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)),
      optax.add_decayed_weights(0.1, optim.decay_mask),
      optax.scale(-1e-3),
    )
  windows = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)), jnp.int32)

  def step(params, opt, w):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, w[:, :-1]), w[:, 1:]
    ).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  state = [params, tx.init(params)]
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state[0], state[1], windows).compile()

  def call():
    state[0], state[1], loss = compiled(state[0], state[1], windows)
    loss.block_until_ready()

  return call


def block_gpt_step():
  register_tried_attention()
  calls = {
    'jax as bigjax (attention xla)': gpt_step_jax(),
    f'jax attention {HEADS_FIRST}': gpt_step_jax(attention=HEADS_FIRST),
    'jax attention chunked (128)': gpt_step_jax(attention='chunked'),
    'jax optax.flatten(adam) + decay': gpt_step_jax(flat_adam=True),
    'jax bfloat16 compute, float32 params': gpt_step_jax(dtype='bfloat16'),
  }
  calls['torch eager (SDPA, fused AdamW)'] = torch_gpt_step()
  return calls, {}


def torch_gpt_step():
  """gpt.py's PyTorch GPT (same shapes, init irrelevant here): one eager step on random tokens."""
  import gpt as gpt_bench  # experiments/bench/gpt.py, next to this script
  import torch

  model, opt = gpt_bench.torch_model_and_optimizer()
  windows = torch.randint(0, VOCAB, (B, T + 1))

  def call():
    gpt_bench.torch_step(model, opt, windows)

  return call


BLOCKS = {
  **{name: (lambda name=name: block_conv(name)) for name in CONV_SHAPES},
  'maxpool 2x2 26x26x32 (after relu)': block_pool,
  'cnn train step (batch 64)': block_cnn_step,
  'attention sublayer (qkv/out projections + causal core)': block_attention,
  'gelu MLP 128->512->128': block_mlp,
  'layernorm': block_layernorm,
  'tied head + cross-entropy (V=260)': block_head_loss,
  'AdamW update (843k params, 68 tensors)': block_adamw,
  'gpt train step (batch 32 x 128)': block_gpt_step,
}
GROUPS = {
  'cnn': [k for k in BLOCKS if k.startswith(('conv', 'maxpool', 'cnn'))],
  'gpt': [k for k in BLOCKS if not k.startswith(('conv', 'maxpool', 'cnn'))],
}


def table(name, results, diffs, by_cpu):
  """Markdown rows of one block; ratios of CPU-time medians when by_cpu, else of wall medians."""
  wall = {k: float(np.median(w)) for k, (w, _) in results.items()}
  cpu = {k: float(np.median(c)) for k, (_, c) in results.items()}
  ratio_of = cpu if by_cpu else wall
  first = next(iter(ratio_of.values()))
  torch_key = next((k for k in ratio_of if k.startswith('torch')), None)
  rows = []
  for k, (w, _) in results.items():
    diff = f'{diffs[k]:.1e}' if k in diffs else ''
    vs_torch = f'{ratio_of[k] / ratio_of[torch_key]:.2f}' if torch_key else ''
    rows.append(
      f'| {name} | {k} | {wall[k] * 1e3:.2f} [{min(w) * 1e3:.2f}] | {cpu[k] * 1e3:.2f} | '
      f'{ratio_of[k] / first:.2f} | {vs_torch} | {diff} |'
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--blocks', default='cnn,gpt', help='cnn, gpt, or comma-separated block names'
  )
  parser.add_argument('--reps', type=int, default=30)
  parser.add_argument(
    '--one_core',
    action='store_true',
    help='pin to one core, one thread each (XLA and torch): process CPU time then measures the '
    'work of each formulation even on a busy machine',
  )
  harness.add_out_flag(parser, 'blocks')
  args = parser.parse_args()
  names = []
  for item in args.blocks.split(','):
    names += GROUPS.get(item, [item] if item in BLOCKS else [])
  if not names:
    parser.error(f'--blocks: choose cnn, gpt or names from {", ".join(BLOCKS)}')

  if args.one_core:  # before jax is imported: XLA reads its flags once
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false'
    )
  import torch

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  out = harness.Output(args.out)
  out.print(harness.machine_info())
  out.print(
    f'\n{args.reps} interleaved rounds per block; wall ms median [min], process CPU ms median; '
    + (
      'ratios of CPU-time medians; one core, one thread (--one_core)\n'
      if args.one_core
      else 'ratios of wall medians\n'
    )
  )
  out.print(
    '| block | formulation | wall ms median [min] | CPU ms | / first | / torch | max abs diff |'
  )
  out.print('|---|---|---|---|---|---|---|')
  for name in names:
    calls, diffs = BLOCKS[name]()
    for row in table(name, timed(calls, args.reps), diffs, args.one_core):
      out.print(row)
  out.print(f'\nload average at the end {os.getloadavg()[0]:.2f}')
  out.close()


if __name__ == '__main__':
  main()
