"""Training dynamics: per-layer gradient norms (vanishing gradients in deep sigmoid MLPs), and the
post-LN GPT (original Transformer layout) next to the pre-LN default."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax import train
from bigjax.models import gpt

from conftest import load_config


def _first_step_norms(tmp_path, devices, activation, kernel_init):
  """One logged step of an 8-hidden-layer MLP on breast_cancer -> its history entry."""
  config = load_config('mlp_breast_cancer')
  config.model.kwargs.update(hidden=(32,) * 8, activation=activation, kernel_init=kernel_init)
  config.num_steps, config.log_every, config.log_grad_norms = 1, 1, True
  results = train.train_and_evaluate(
    config, str(tmp_path / f'{activation}_{kernel_init}'), devices=devices
  )
  return results['history'][0]


def test_sigmoid_stack_gradients_vanish_and_relu_he_does_not(tmp_path, one_device):
  names = [f'hidden_{i}' for i in range(8)] + ['output']
  ratios = {}
  for activation, init in (('sigmoid', 'normal'), ('relu', 'he')):
    entry = _first_step_norms(tmp_path, one_device, activation, init)
    norms = np.array([entry[f'grad_norm/{n}'] for n in names])
    assert sorted(k for k in entry if k.startswith('grad_norm/')) == sorted(
      f'grad_norm/{n}' for n in names
    )
    # The per-module norms make up the global one.
    np.testing.assert_allclose(np.sqrt(np.sum(norms**2)), entry['grad_norm'], rtol=1e-5)
    ratios[activation] = norms[-1] / norms[0]  # output / hidden_0
    if activation == 'sigmoid':  # each layer back shrinks the gradient (0.25 * |W| ~ 0.014)
      assert np.all(np.diff(np.log(norms)) > 0)
  assert ratios['sigmoid'] > 1e6  # measured 1.2e15 (at least 100x asked)
  assert 0.2 < ratios['relu'] < 5  # measured 1.6


def test_grad_norms_are_off_by_default(tmp_path, one_device):
  config = load_config('mlp_breast_cancer')
  config.num_steps, config.log_every = 1, 1
  entry = train.train_and_evaluate(config, str(tmp_path), devices=one_device)['history'][0]
  assert 'grad_norm' in entry and not any(k.startswith('grad_norm/') for k in entry)


def _gpt(pre_ln):
  return gpt.Model(
    vocab_size=16, num_layers=2, num_heads=2, embed_dim=32, max_len=16, pre_ln=pre_ln
  )


def _tokens(n, seed=0):
  """(n, 16) sequences counting up by 3 mod 16 from a random start: next token is predictable."""
  start = jax.random.randint(jax.random.key(seed), (n, 1), 0, 16)
  return (start + 3 * jnp.arange(16)) % 16


def test_post_ln_gpt_is_the_original_transformer_layout():
  tokens = _tokens(4)
  post, pre = _gpt(False), _gpt(True)
  params_post = nn.meta.unbox(post.init(jax.random.key(1), tokens)['params'])
  params_pre = nn.meta.unbox(pre.init(jax.random.key(1), tokens)['params'])
  # Same parameters but no final norm before the head (the last block's output is normalised).
  assert 'final_norm' in params_pre['stack'] and 'final_norm' not in params_post['stack']
  shared = dict(
    params_pre, stack={k: v for k, v in params_pre['stack'].items() if k != 'final_norm'}
  )
  jax.tree.map(np.testing.assert_array_equal, shared, params_post)
  # pre_ln=False changes the outputs.
  logits_post = post.apply({'params': params_post}, tokens)
  logits_pre = pre.apply({'params': params_pre}, tokens)
  assert logits_post.shape == logits_pre.shape == (4, 16, 16)
  assert float(jnp.max(jnp.abs(logits_post - logits_pre))) > 1e-2
  # Post-LN: every block's output is LayerNorm(x + sublayer(x)), so zero mean, unit variance per
  # token at init; pre-LN blocks output the un-normalised residual stream (per-token std measured
  # 0.2 to 1.0).
  for model, params, normalised in ((post, params_post, True), (pre, params_pre, False)):
    _, state = model.apply(
      {'params': params}, tokens, capture_intermediates=True, mutable=['intermediates']
    )
    for i in range(2):
      h = state['intermediates']['stack'][f'layer_{i}']['__call__'][0]
      std = np.asarray(h.std(-1))
      if normalised:
        np.testing.assert_allclose(std, 1.0, atol=1e-3)
        np.testing.assert_allclose(np.asarray(h.mean(-1)), 0.0, atol=1e-5)
      else:
        assert np.abs(std - 1.0).max() > 0.3


@pytest.mark.parametrize('pre_ln', [False, True])
def test_two_layer_gpt_trains(pre_ln):
  model, tokens = _gpt(pre_ln), _tokens(32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens)['params'])
  tx = optax.adam(3e-3)

  def loss_fn(params):
    logits = model.apply({'params': params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(60):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] > 2.0 and losses[-1] < 0.1 * losses[0], losses[::10]  # ln 16 = 2.77 -> < 0.28
