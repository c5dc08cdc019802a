"""KV-cache generation for the decoder-only language models (gpt, llama): a prefill of the prompt,
then one token per step under `lax.fori_loop`, compiled once per (shapes, sampling settings).

  tokens = generate(model, params, prompt_BT, max_new_tokens=100, temperature=0.8, top_k=40, seed=0)

The model is called as `model.apply({'params', 'cache'}, tokens_BT, decode=True,
mutable=['cache'])` (its cache created by `model.init(rng, zeros((B, max_len)), decode=True)`);
an adapted model (bigjax.peft) generates with its adapter, and the virtual tokens of prompt or
prefix tuning (the model's `virtual_tokens`) take positions of max_len in front of the prompt.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _sample(logits_BV, rng, temperature, top_k, top_p):
  """Next token per row from (B, V) logits: greedy when temperature == 0, else top-k/top-p."""
  if temperature == 0.0:
    return logits_BV.argmax(-1)
  logits = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    # keep the smallest set whose probability reaches top_p (the top token always stays)
    cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(
  jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p')
)
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k, top_p):
  b, t = prompt.shape
  cache = model.init(jax.random.key(0), jnp.zeros((b, model.max_len), jnp.int32), decode=True)[
    'cache'
  ]
  logits, updates = model.apply(
    {'params': params, 'cache': cache}, prompt, decode=True, mutable=['cache']
  )
  out = jnp.zeros((b, max_new_tokens), jnp.int32)

  def step(i, carry):
    out, cache, last_logits, rng = carry
    rng, k = jax.random.split(rng)
    token = _sample(last_logits, k, temperature, top_k, top_p).astype(jnp.int32)
    out = out.at[:, i].set(token)
    logits, updates = model.apply(
      {'params': params, 'cache': cache}, token[:, None], decode=True, mutable=['cache']
    )
    return out, updates['cache'], logits[:, -1], rng

  out, _, _, _ = jax.lax.fori_loop(
    0, max_new_tokens, step, (out, updates['cache'], logits[:, -1], rng)
  )
  return out


def generate(
  model, params, prompt, *, max_new_tokens=100, temperature=1.0, top_k=0, top_p=1.0, seed=0
):
  """Samples continuations with the KV cache, compiled once per (shapes, sampling settings).

  model: a gpt or llama Model (or one adapted by bigjax.peft); prompt: (B, T) int token ids,
  1 <= T and (virtual tokens) + T + max_new_tokens <= model.max_len. temperature 0 is
  greedy; top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of tokens
  whose probability reaches top_p. Deterministic given seed. Returns (B, max_new_tokens) int32.
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f'prompt must be (batch, length >= 1) token ids, got shape {prompt.shape}')
  virtual = model.virtual_tokens  # > 0 for an adapter with virtual tokens (bigjax.peft)
  if virtual + prompt.shape[1] + max_new_tokens > model.max_len:
    extra = f' + {virtual} virtual tokens (prompt / prefix tuning)' if virtual else ''
    raise ValueError(
      f'prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens}{extra} exceeds '
      f'max_len={model.max_len}'
    )
  if prompt.min() < 0 or prompt.max() >= model.vocab_size:
    raise ValueError(
      f'prompt token ids must lie in [0, {model.vocab_size}); got {prompt.min()}..{prompt.max()}'
    )
  return _generate(
    model,
    params,
    jnp.asarray(prompt, jnp.int32),
    jax.random.key(seed),
    max_new_tokens,
    float(temperature),
    int(top_k),
    float(top_p),
  )
