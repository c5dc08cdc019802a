"""bigjax/compress/prune.py: masks, schedules, exact zeros after every step and after a SIGKILL and
resume, sparse export, the (data=2, fsdp=2, tensor=2) mesh against one device, bad input."""

import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import checkpoint, experiment
from bigjax.compress import prune
from bigjax.errors import UserError

from conftest import REPO, kill_after_checkpoint, load_config


def _cfg(**kw):
  cfg = load_config('mnist_cnn', 'smoke').prune
  cfg.update(**{'method': 'magnitude', **kw})
  return cfg


def _pruning_config(**kw):
  """mnist_cnn:smoke (20 steps, Adam) with gradual magnitude pruning to 90% from step 2 to 12."""
  config = load_config('mnist_cnn', 'smoke')
  config.prune.update(
    method='magnitude', sparsity=0.9, schedule='gradual', begin_step=2, end_step=12, frequency=2
  )
  config.prune.update(**kw)
  return config


# ----------------------------------------------------------------------------------------------
# Masks and schedules
# ----------------------------------------------------------------------------------------------
def test_two_four_masks_keep_exactly_the_two_largest_of_every_group_of_four():
  rng = np.random.default_rng(0)
  dense, conv = rng.normal(size=(16, 6)), rng.normal(size=(3, 3, 8, 5))
  cfg = _cfg(method='n_m', n=2, m=4)
  masks = prune.n_m_masks(cfg, [jnp.abs(dense), jnp.abs(conv)], None)
  # groups of 4 run along the input axis: axis 0 of a dense kernel, axis 2 of a conv kernel
  dense_groups = np.asarray(masks[0]).reshape(4, 4, 6)
  conv_groups = np.asarray(masks[1]).reshape(3, 3, 2, 4, 5)
  assert (dense_groups.sum(axis=1) == 2).all() and (conv_groups.sum(axis=3) == 2).all()
  # ...and the kept two are the largest two of their group
  w = np.abs(dense).reshape(4, 4, 6)
  kept_min = np.where(dense_groups, w, np.inf).min(axis=1)
  dropped_max = np.where(dense_groups, -np.inf, w).max(axis=1)
  assert (kept_min > dropped_max).all()


def _gpt_params(heads, head_dim):
  """Boxed (logically named) parameters of a 1-layer GPT, embed 32."""
  from bigjax.models import gpt

  model = gpt.Model(
    vocab_size=20, num_layers=1, num_heads=heads, embed_dim=heads * head_dim, max_len=8
  )
  return model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']


def test_two_four_groups_run_along_an_attention_out_kernels_inputs():
  """The output projection (heads, head_dim, embed) = (4, 8, 32) contracts heads x head_dim: in
  its flattened (32 inputs, 32 outputs) matrix every 4 consecutive inputs of every output keep
  exactly their 2 largest weights. The query kernel (embed, heads, head_dim) groups along embed.
  Through the optax wrapper after one update, as a run applies it."""
  import optax

  boxed = _gpt_params(heads=4, head_dim=8)
  cfg = _cfg(method='n_m', n=2, m=4, params='(out|query)/kernel', begin_step=1)
  prune.check(cfg, boxed)
  params = flax.linen.meta.unbox(boxed)
  tx = prune.wrap(optax.sgd(0.1), cfg, boxed)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zero_grads, tx.init(params), params)
  pruned = optax.apply_updates(params, updates)
  attention = lambda p: p['stack']['layer_0']['self_attention']
  for name, as_matrix in (
    ('out', lambda k: k.reshape(32, 32)),  # (heads * head_dim, embed)
    ('query', lambda k: k.reshape(32, 32)),  # (embed, heads * head_dim)
  ):
    w = np.abs(np.asarray(as_matrix(attention(params)[name]['kernel'])))
    kept = np.asarray(as_matrix(attention(pruned)[name]['kernel'])) != 0
    np.testing.assert_array_equal(
      kept, np.asarray(as_matrix(attention(state.masks)[name]['kernel']))
    )
    groups, wg = kept.reshape(8, 4, 32), w.reshape(8, 4, 32)
    assert (groups.sum(axis=1) == 2).all(), name
    assert (np.where(groups, wg, np.inf).min(1) > np.where(groups, -np.inf, wg).max(1)).all()
  # 2 heads of 16: the out kernel's 32 inputs divide by 4 (its heads axis alone would not)
  prune.check(cfg, _gpt_params(heads=2, head_dim=16))
  with pytest.raises(UserError, match=r'config.prune.m=3 does not divide .*out/kernel \(32 inputs'):
    prune.check(_cfg(method='n_m', n=1, m=3, params='out/kernel'), _gpt_params(2, 16))


@pytest.mark.parametrize('scope', ['global', 'layer'])
def test_magnitude_masks_prune_the_exact_fraction_of_smallest_weights(scope):
  rng = np.random.default_rng(1)
  leaves = [jnp.asarray(np.abs(rng.normal(size=s)) * f) for s, f in [((20, 10), 1.0), ((50,), 3)]]
  masks = prune.magnitude_masks(_cfg(scope=scope), leaves, jnp.float32(0.7))
  if scope == 'layer':
    for w, m in zip(leaves, masks):
      assert int((~np.asarray(m)).sum()) == int(0.7 * w.size)
      assert np.asarray(w)[np.asarray(m)].min() >= np.asarray(w)[~np.asarray(m)].max()
  else:
    flat_w = np.concatenate([np.asarray(w).ravel() for w in leaves])
    flat_m = np.concatenate([np.asarray(m).ravel() for m in masks])
    assert int((~flat_m).sum()) == int(0.7 * flat_w.size)
    assert flat_w[flat_m].min() >= flat_w[~flat_m].max()
    # one threshold for all: the larger-scaled layer keeps a larger share than the other
    assert np.asarray(masks[1]).mean() > np.asarray(masks[0]).mean()


def test_gradual_schedule_is_zhu_and_gupta_cubic():
  cfg = _cfg(sparsity=0.8, schedule='gradual', begin_step=10, end_step=50, frequency=10)
  at = prune.SCHEDULES.get('gradual')(cfg, 0.8)
  for t in range(70):
    due, s = at(jnp.int32(t))
    assert bool(due) == (t in (10, 20, 30, 40, 50))
    progress = min(max((t - 10) / 40, 0.0), 1.0)
    np.testing.assert_allclose(float(s), 0.8 * (1 - (1 - progress) ** 3), rtol=1e-6)
  one = prune.SCHEDULES.get('one_shot')(_cfg(begin_step=7), 0.5)
  assert [t for t in range(20) if bool(one(jnp.int32(t))[0])] == [7]


# ----------------------------------------------------------------------------------------------
# Training: exact zeros after every step
# ----------------------------------------------------------------------------------------------
def _masks(state):
  return state.opt_state.masks


def _run_steps(config, devices, steps):
  """[(params, masks, metrics)] on the host after each of `steps` train steps."""
  exp = experiment.build(config, devices)
  state = exp.create_state()
  train_step = exp.compile_train_step()
  out = []
  for i in range(steps):
    state, metrics = train_step(state, exp.to_global(exp.batches.batch(i)))
    out.append(jax.device_get((state.params, _masks(state), metrics)))
  return out


def test_pruned_weights_are_exactly_zero_after_every_step(one_device):
  config = _pruning_config()
  history = _run_steps(config, one_device, 14)
  chosen = jax.tree.leaves(prune.selected(history[0][0], config.prune.params))
  for step, (params, masks, metrics) in enumerate(history, start=1):
    pruned = zeros = total = 0
    for p, m, c in zip(jax.tree.leaves(params), jax.tree.leaves(masks), chosen):
      if not c:
        assert m.all()  # biases are never pruned
        continue
      assert (p[~m] == 0).all(), f'step {step}: a pruned weight is not 0'
      pruned, zeros, total = pruned + (~m).sum(), zeros + (p == 0).sum(), total + p.size
    # the masks follow the schedule (updated at steps 2, 4, ..., 12) ...
    due = max([s for s in range(2, 13, 2) if s <= step], default=None)
    expected = 0.9 * (1 - (1 - (due - 2) / 10) ** 3) if due else 0.0
    assert abs(pruned - expected * total) <= 1, (step, pruned, expected * total)
    # ... and the logged sparsity is the measured fraction of exact zeros
    np.testing.assert_allclose(metrics['sparsity'], zeros / total, rtol=1e-6)
  np.testing.assert_allclose(history[-1][2]['sparsity'], 0.9, atol=1e-5)  # floor(0.9 N) / N
  per_layer = {k: v for k, v in history[-1][2].items() if k.startswith('sparsity/')}
  assert set(per_layer) == {f'sparsity/{n}/kernel' for n in ('conv_0', 'conv_1', 'conv_2')} | {
    'sparsity/dense_0/kernel',
    'sparsity/output/kernel',
  }
  # Adam keeps moving the kept weights: they are not frozen
  moved = [
    np.abs(a - b)[m].max()
    for a, b, m in zip(
      jax.tree.leaves(history[-1][0]),
      jax.tree.leaves(history[-2][0]),
      jax.tree.leaves(history[-1][1]),
    )
  ]
  assert max(moved) > 1e-5


@pytest.mark.slow  # a full build + compile + 14 steps; the masks are unit-tested above
def test_n_m_training_keeps_two_of_four(one_device):
  config = _pruning_config(
    method='n_m', n=2, m=4, schedule='one_shot', begin_step=3, params='(conv_1|dense_0)/kernel'
  )
  params, masks, metrics = _run_steps(config, one_device, 5)[-1]
  kernel = params['dense_0']['kernel']  # (576, 64)
  nonzero = (kernel != 0).reshape(144, 4, 64).sum(axis=1)
  assert (nonzero == 2).all()
  conv = (params['conv_1']['kernel'] != 0).reshape(3, 3, 8, 4, 64).sum(axis=3)
  assert (conv == 2).all()
  np.testing.assert_allclose(metrics['sparsity'], 0.5)
  assert (params['conv_0']['kernel'] != 0).all()  # not selected


@pytest.mark.slow  # 2 builds and compiles, one on 8 devices: 40-100 s on a busy 2-core machine
def test_pruning_on_the_mesh_equals_one_device(one_device):
  config = _pruning_config(end_step=6)
  # SGD, as in tests/test_steps.py: Adam's first steps (+-lr per weight) magnify the rounding
  # differences of near-zero gradients.
  config.optim.update(name='sgd', lr=0.1)
  ref = _run_steps(config, one_device, 7)[-1]
  config.mesh.update(data=2, fsdp=2, tensor=2)
  exp = experiment.build(config)
  assert any(
    'fsdp' in str(s.spec) or 'tensor' in str(s.spec)
    for s in jax.tree.leaves(exp.shardings.opt_state.masks)
  ), 'masks are not sharded like the parameters'
  got = _run_steps(config, None, 7)[-1]
  # The same number of weights pruned per layer on both, the same ones but for a few on the
  # threshold (float summation order moves them by ~1e-7), the weights equal to float order.
  for (p, m), (q, n) in zip(
    zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])),
    zip(jax.tree.leaves(ref[0]), jax.tree.leaves(ref[1])),
  ):
    assert (p[~m] == 0).all()
    assert (m != n).mean() <= 1e-4, (m != n).sum()
    both = m & n
    np.testing.assert_allclose(p[both], q[both], rtol=1e-5, atol=1e-6)
  assert sum((~m).sum() for m in jax.tree.leaves(got[1])) == sum(
    (~m).sum() for m in jax.tree.leaves(ref[1])
  )


# ----------------------------------------------------------------------------------------------
# SIGKILL and resume
# ----------------------------------------------------------------------------------------------
PRUNE_FLAGS = [
  '--config.prune.method=magnitude',
  '--config.prune.sparsity=0.75',
  '--config.prune.schedule=gradual',
  '--config.prune.begin_step=4',
  '--config.prune.end_step=16',
  '--config.prune.frequency=4',
  '--config.checkpoint_every=6',
]


@pytest.mark.slow  # 3 subprocess runs, ~45 s
def test_pruned_run_killed_and_rerun_ends_bitwise_equal(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))

  def cmd(workdir):
    return [
      sys.executable,
      '-m',
      'bigjax.train',
      '--config=mnist_cnn:smoke',
      f'--workdir={workdir}',
      *PRUNE_FLAGS,
    ]

  subprocess.run(cmd(tmp_path / 'full'), cwd=REPO, env=env, check=True, capture_output=True)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  kill_after_checkpoint(cmd(tmp_path / 'killed'), env, ckpts, 12)  # pruned at 8, 12; 16 to come
  saved = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert 12 in saved and max(saved) < 20, saved
  _, at_kill = checkpoint.load_latest(ckpts)
  subprocess.run(cmd(tmp_path / 'killed'), cwd=REPO, env=env, check=True, capture_output=True)

  step_a, a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  step_b, b = checkpoint.load_latest(ckpts)
  assert step_a == step_b == 20
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, masks, optimizer state: bitwise
  for state in (at_kill, b):  # the checkpointed masks hold, and the weights under them are 0
    opt = state['opt_state']  # PruneState, restored as a dict or a list
    masks = opt['masks'] if isinstance(opt, dict) else opt[1]
    assert any((~m).any() for m in jax.tree.leaves(masks))
    for p, m in zip(jax.tree.leaves(state['params']), jax.tree.leaves(masks)):
      assert (p[~m] == 0).all()


# ----------------------------------------------------------------------------------------------
# Export and bad input
# ----------------------------------------------------------------------------------------------
def test_sparse_params_round_trip_and_size(tmp_path):
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(64, 32)).astype(np.float32)
  kernel[rng.random(kernel.shape) < 0.9] = 0
  params = {'dense': {'kernel': kernel, 'bias': np.ones(32, np.float32)}}
  arrays, nbytes = prune.sparse_params(params)
  assert set(arrays) == {
    'dense/kernel.values',
    'dense/kernel.mask',
    'dense/kernel.shape',
    'dense/bias',
  }
  nnz = int((kernel != 0).sum())
  assert nbytes == nnz * 4 + 64 * 32 // 8 + 16 + 32 * 4  # values + 1 bit per weight + shape + bias
  assert nbytes < kernel.nbytes / 3
  back = prune.dense_params(arrays)
  np.testing.assert_array_equal(back['dense/kernel'], kernel)
  np.testing.assert_array_equal(back['dense/bias'], params['dense']['bias'])


@pytest.mark.parametrize(
  'change, message',
  [
    (dict(sparsity=1.0), r'config.prune.sparsity=1.0 must be in \[0, 1\)'),
    (dict(sparsity=-0.1), r'config.prune.sparsity=-0.1 must be in \[0, 1\)'),
    (dict(method='n_m', m=3), r'config.prune.m=3 does not divide conv_0/kernel'),
    (dict(method='n_m', n=4, m=4), r'config.prune.n=4, m=4: N:M sparsity needs 0 < n < m'),
    (dict(method='random'), r"config.prune.method='random' is unknown; known pruning methods"),
    (dict(params='nothing'), r"config.prune.params='nothing' selects no parameter"),
    (dict(schedule='gradual', end_step=0), r'config.prune.schedule=gradual needs end_step'),
  ],
)
def test_bad_pruning_config_is_one_line(change, message, one_device):
  config = _pruning_config(schedule='one_shot')
  config.prune.update(**change)
  with pytest.raises(UserError, match=message) as e:
    experiment.build(config, one_device)
  assert '\n' not in str(e.value)
