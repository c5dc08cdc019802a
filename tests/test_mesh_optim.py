import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from bigjax import config_lib, optim
from bigjax import mesh as mesh_lib
from bigjax.errors import UserError


def _sizes(**sizes):
  """config.mesh of the base config with `sizes` changed."""
  cfg = config_lib.base_config().mesh
  cfg.update(sizes)
  return cfg


def _mesh(**sizes):
  return mesh_lib.make_mesh(_sizes(**sizes))


def test_mesh_sizes_resolve_minus_one():
  assert mesh_lib.mesh_shape(_sizes(data=-1, fsdp=2, tensor=2), 8) == (
    2,
    2,
    2,
  )
  assert mesh_lib.mesh_shape(_sizes(data=1, fsdp=-1, tensor=1), 8) == (
    1,
    8,
    1,
  )
  with pytest.raises(UserError, match='config.mesh.tensor=3 does not divide 8 devices'):
    mesh_lib.mesh_shape(_sizes(data=-1, tensor=3), 8)


def test_spec_for_follows_rules_and_skips_indivisible_or_used_axes():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  rules = (
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('conv_out', ('fsdp', 'tensor')),
    ('conv_out', 'tensor'),
  )
  assert mesh_lib.spec_for(('embed', 'mlp'), (64, 128), mesh, rules) == P('fsdp', 'tensor')
  assert mesh_lib.spec_for(('embed', 'mlp'), (3, 128), mesh, rules) == P(None, 'tensor')
  assert mesh_lib.spec_for(('mlp', 'mlp'), (8, 8), mesh, rules) == P('tensor', None)
  assert mesh_lib.spec_for(('conv_out',), (32,), mesh, rules) == P(('fsdp', 'tensor'))
  assert mesh_lib.spec_for(('conv_out',), (6,), mesh, rules) == P('tensor')  # fallback rule
  assert mesh_lib.spec_for(('norm',), (6,), mesh, rules) == P(None)


def _optim(**fields):
  """config.optim of the base config with `fields` changed (every other field at its default)."""
  cfg = config_lib.base_config().optim
  cfg.update(fields)
  return cfg


@pytest.mark.parametrize(
  'schedule, warmup, checks',
  [
    ('constant', 0, {0: 1.0, 50: 1.0, 99: 1.0}),
    ('constant', 10, {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),
    ('warmup_cosine', 10, {0: 0.0, 10: 1.0, 55: 0.5, 100: 0.0}),
    ('warmup_linear', 10, {0: 0.0, 10: 1.0, 55: 0.5, 100: 0.0}),
    ('step', 0, {0: 1.0, 49: 1.0, 50: 0.1, 75: 0.01}),
    # Goyal et al.'s recipe: a linear warmup, then the decays at the same fractions of the run.
    ('step', 10, {0: 0.0, 5: 0.5, 10: 1.0, 49: 1.0, 50: 0.1, 74: 0.1, 75: 0.01}),
  ],
)
def test_schedules(schedule, warmup, checks):
  cfg = _optim(name='sgd', lr=1.0, schedule=schedule, warmup_steps=warmup)
  fn = optim.learning_rate_schedule(cfg, 100)
  for step, lr in checks.items():
    np.testing.assert_allclose(fn(step), lr, atol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'momentum', 'nesterov', 'adam', 'adamw'])
def test_weight_decay_skips_biases_and_clipping_bounds_the_update(name):
  jnp = jax.numpy
  lr, wd, clip = 0.1, 0.5, 1e-3
  params = {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]), 'bias': jnp.ones((2,))}
  cfg = _optim(name=name, lr=lr, weight_decay=wd, clip_norm=clip)
  tx = optim.make_optimizer(cfg, 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)  # zero gradient: only decay moves params
  assert float(jnp.abs(updates['bias']).max()) == 0.0
  assert float(jnp.abs(updates['kernel']).max()) > 0.0
  # The exact first step of the decay term wd * param: -lr * wd * param (the decayed weights enter
  # sgd/momentum as the gradient, adamw adds them after Adam); nesterov's look-ahead makes it
  # (1 + momentum)x; adam normalises the term like a gradient, so each weight moves by
  # -lr * wd * p / (|wd * p| + eps).
  decay = wd * params['kernel']
  expected = {
    'sgd': -lr * decay,
    'momentum': -lr * decay,
    'nesterov': -lr * (1 + cfg.momentum) * decay,
    'adam': -lr * decay / (jnp.abs(decay) + cfg.eps),
    'adamw': -lr * decay,
  }[name]
  # (adam: float32 rounding of its bias correction 1 - b2 moves the step by 7e-6 of itself)
  np.testing.assert_allclose(updates['kernel'], expected, rtol=2e-5 if name == 'adam' else 1e-6)
  big = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)
  cfg.weight_decay = 0.0
  tx = optim.make_optimizer(cfg, 10)
  updates, state = tx.update(big, tx.init(params), params)
  if name in ('sgd', 'momentum', 'nesterov'):  # first step: update = -lr * clipped gradient
    np.testing.assert_allclose(
      optax.tree.norm(updates), 0.1 * 1e-3 * (1 if name != 'nesterov' else 1.9), rtol=1e-4
    )
  # Every optimizer's first update is its unclipped update of the gradient scaled to norm clip_norm.
  clipped = jax.tree.map(lambda g: g * (clip / optax.tree.norm(big)), big)
  cfg.clip_norm = 0.0
  plain = optim.make_optimizer(cfg, 10)
  reference, _ = plain.update(clipped, plain.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, reference)
  if name in ('adam', 'adamw'):
    # Adam's first update is about -lr per weight at any gradient scale; its moments show the
    # clipping: mu = (1 - b1) * clipped gradient, nu = (1 - b2) * its square.
    mu, nu = optax.tree.get(state, 'mu'), optax.tree.get(state, 'nu')
    jax.tree.map(
      lambda m, g: np.testing.assert_allclose(m, (1 - cfg.b1) * g, rtol=1e-6), mu, clipped
    )
    jax.tree.map(
      lambda v, g: np.testing.assert_allclose(v, (1 - cfg.b2) * g**2, rtol=1e-5), nu, clipped
    )
