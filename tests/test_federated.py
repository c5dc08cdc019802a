"""Federated learning (bigjax/federated): splits, FedAvg against centralised gradient descent,
accuracy on a small problem, 8 devices against one, FedProx, SIGKILL + rerun, bad input."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bigjax import checkpoint, config_lib, experiment, train
from bigjax.errors import UserError
from bigjax.federated import rounds, splits

from conftest import REPO, kill_after_checkpoint


def mlp_config(dataset='breast_cancer', **federated):
  """A small MLP on `dataset` trained by plain SGD, config.federated updated from `federated`."""
  config = config_lib.base_config()
  config.data.name = dataset
  config.data.standardize = dataset == 'breast_cancer'
  config.model.name = 'mlp'
  config.model.kwargs = dict(hidden=(16,), activation='relu')
  config.task.kwargs = dict(binary=dataset == 'breast_cancer')
  config.optim.update(name='sgd', lr=0.1)
  config.eval_batch_size = 128
  config.mesh.data = 1
  config.federated.update(federated)
  return config


def fed_cfg(**fields):
  return ml_collections.ConfigDict(dict(config_lib.base_config().federated.to_dict(), **fields))


# ----------------------------------------------------------------------------------------------
# Splits and rounds
# ----------------------------------------------------------------------------------------------
def _labels(n=4000, classes=10, seed=0):
  """Labels with unequal class counts (as in mnist5k's train split), in random order."""
  rng = np.random.default_rng(seed)
  return rng.permutation(rng.choice(classes, n, p=rng.dirichlet(np.full(classes, 20.0))))


@pytest.mark.parametrize('name', ['iid', 'shards', 'dirichlet'])
def test_every_split_holds_every_example_once(name):
  labels = _labels()
  parts = splits.split(labels, fed_cfg(clients=100, split=name), seed=0)
  assert len(parts) == 100 and min(len(p) for p in parts) > 0
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_shard_split_gives_each_client_at_most_two_labels():
  """McMahan et al.'s pathological split: 200 single-label shards, 2 per client."""
  labels = _labels()
  parts = splits.split(labels, fed_cfg(clients=100, split='shards', shards_per_client=2), seed=0)
  per_client = [len(np.unique(labels[p])) for p in parts]
  assert max(per_client) <= 2 and np.mean(per_client) > 1.5, per_client  # mostly 2
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 10, sizes  # shards of 20 +- a few (class counts differ)


def test_dirichlet_split_large_alpha_is_near_uniform_small_alpha_is_skewed():
  labels = np.repeat(np.arange(10), 500)
  share = lambda alpha: np.array(
    [
      np.bincount(labels[p], minlength=10) / len(p)
      for p in splits.split(labels, fed_cfg(clients=10, split='dirichlet', alpha=alpha), seed=0)
    ]
  )
  near = share(1e4)
  assert np.abs(near - 0.1).max() < 0.02, near  # every client ~ the global label mix
  sizes = [
    len(p) for p in splits.split(labels, fed_cfg(clients=10, split='dirichlet', alpha=1e4), 0)
  ]
  assert max(sizes) < 1.1 * 500 and min(sizes) > 0.9 * 500, sizes
  assert share(0.1).max(axis=1).mean() > 0.5  # alpha 0.1: most of a client is one label


def test_round_data_selects_clients_from_seed_and_round_and_weights_padding_zero():
  arrays = {'inputs': np.arange(103, dtype=np.float32)[:, None], 'label': np.zeros(103, np.int32)}
  cfg = fed_cfg(clients=10, client_fraction=0.3, local_epochs=2, local_batch_size=4)
  data = rounds.RoundData(arrays, cfg, seed=0, parallel=4)  # 3 clients a round, padded to 4
  b = data.batch(5)
  assert b['inputs'].shape == (4, 2 * 3, 4, 1)  # clients of 10-11 examples: 3 batches an epoch
  assert list(b[rounds.EXAMPLES][3:]) == [0.0] and b[rounds.WEIGHT][3].sum() == 0
  for j, k in enumerate(b[rounds.CLIENT][:3]):  # each real client sees its examples E times
    seen = b['inputs'][j, :, :, 0][b[rounds.WEIGHT][j] > 0]
    np.testing.assert_array_equal(np.sort(seen), np.sort(np.tile(data.clients[k], 2)))
  again = rounds.RoundData(arrays, cfg, seed=0, parallel=4).batch(5)
  jax.tree.map(np.testing.assert_array_equal, b, again)  # a pure function of (seed, round)
  assert not np.array_equal(data.selected(5), data.selected(6))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _params(workdir):
  return checkpoint.load_latest(os.path.join(workdir, 'checkpoints'))[1]['params']


def _round(local_steps, weight_rows, client_tx, prox_mu=0.0, with_data=False):
  """One round of a 3-class MLP for one client: S = local_steps steps of 4 rows, the first
  weight_rows rows of the flattened (S, 4) layout real (weight 1), the rest padding; the client
  learning rate 0.05. with_data: also (model, task, initial params, x (S, 4, 5), y (S, 4))."""
  import flax
  import jax.numpy as jnp
  import optax

  from bigjax import mesh as mesh_lib
  from bigjax import steps
  from bigjax.federated import round_step
  from bigjax.models import mlp
  from bigjax.tasks import base, classification

  model, task = mlp.Model(hidden=(8,), num_outputs=3), classification.Task(base.DataInfo(3))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 8, 4, 5)).astype(np.float32)[:, :local_steps]  # the same rows for all S
  y = rng.integers(0, 3, (1, 8, 4)).astype(np.int32)[:, :local_steps]
  weight = (np.arange(local_steps * 4) < weight_rows).astype(np.float32).reshape(1, -1, 4)
  params = flax.linen.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 5)))['params'])
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, optax.identity().init(params))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), mesh_lib.AXES)
  step = round_step.make_round_step(
    model,
    task,
    client_tx,
    lambda r: 0.05,
    seed=0,
    client_sharding=mesh_lib.batch_sharding(mesh),
    prox_mu=prox_mu,
  )
  data = {'inputs': x, 'label': y, rounds.WEIGHT: weight, rounds.EXAMPLES: np.ones(1, np.float32)}
  out = jax.jit(step)(state, dict(data, **{rounds.CLIENT: np.zeros(1, np.int32)}))
  return (*out, (model, task, params, x[0], y[0])) if with_data else out


@pytest.mark.slow  # >40 s on 2 busy cores: out of the default run (CI runs -m slow)
def test_padding_rows_and_steps_change_nothing():
  """A client's padding (weight-0 rows in its last batch, weight-0 steps after its last) leaves
  the round as without it: Adam's momentum would move the parameters on an all-zero gradient,
  so a padded step must be skipped, not just given no loss."""
  import optax

  ref, ref_metrics = _round(2, 6, optax.adam(1.0))  # 2 steps: 4 real rows, then 2 of 4
  padded, metrics = _round(5, 6, optax.adam(1.0))  # the same rows, then 3 all-padding steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ref.params, padded.params)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-6)
  moved, _ = _round(2, 8, optax.adam(1.0))  # the 2 padding rows made real: another result
  assert not np.allclose(moved.params['output']['kernel'], ref.params['output']['kernel'])


def test_fedprox_local_step_follows_g_plus_mu_times_the_drift():
  """FedProx, mu = 2, two local SGD steps (lr 0.05) of one client: the first step from the
  round's w0 is plain SGD (w = w0: no pull); the second uses g(w1) + mu (w1 - w0). Computed by
  hand with the task's loss; mu = 0 gives another result."""
  import optax

  new, _, (model, task, w0, x, y) = _round(2, 8, optax.sgd(1.0), prox_mu=2.0, with_data=True)
  loss = lambda w, i: task.loss_and_metrics(model.apply({'params': w}, x[i]), {'label': y[i]})[0]
  sgd = lambda w, g: jax.tree.map(lambda a, b: a - 0.05 * b, w, g)
  w1 = sgd(w0, jax.grad(loss)(w0, 0))
  g1 = jax.grad(loss)(w1, 1)
  w2 = sgd(w1, jax.tree.map(lambda g, a, b: g + 2.0 * (a - b), g1, w1, w0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, w2)
  plain, _ = _round(2, 8, optax.sgd(1.0))
  assert np.abs(plain.params['output']['kernel'] - w2['output']['kernel']).max() > 1e-4


# FedAvg round vs centralised full-batch SGD step, 5 of each: only the order of float sums
# differs (per-example losses summed vs the task's mean; K client gradients averaged as
# parameters); measured max |difference| 3e-8 on parameters of size ~0.3.
CENTRAL_ATOL = 1e-6


@pytest.mark.parametrize('clients', [1, 4])  # 4: 114, 114, 114, 113 examples
def test_full_batch_fedavg_equals_centralised_gradient_descent(clients, tmp_path, one_device):
  """K clients, C = 1, E = 1, B = inf, SGD: each round is one full-batch gradient step (FedSGD);
  with one client trivially, with 4 because the n_k-weighted average of their one-step
  parameters is the step on the mean gradient (the 113-example client's batch has one padding
  row)."""
  fed = mlp_config(
    clients=clients, client_fraction=1.0, local_epochs=1, local_batch_size=0, split='iid'
  )
  fed.num_steps, fed.log_every = 5, 1
  a = train.train_and_evaluate(fed, str(tmp_path / 'fed'), devices=one_device)
  central = mlp_config()
  central.batch_size, central.num_steps, central.log_every = 455, 5, 1
  b = train.train_and_evaluate(central, str(tmp_path / 'central'), devices=one_device)
  loss = lambda r: np.array([h['loss'] for h in r['history'] if h['split'] == 'train'])
  np.testing.assert_allclose(loss(a), loss(b), rtol=1e-5)
  assert loss(a)[-1] < 0.8 * loss(a)[0]
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=CENTRAL_ATOL),
    _params(tmp_path / 'fed'),
    _params(tmp_path / 'central'),
  )


@pytest.mark.slow  # 30 rounds of 40 local steps (~35 s); CI runs it in its `-m slow` pass
def test_fedavg_on_non_iid_shards_reaches_90_percent_on_digits(tmp_path, one_device):
  """FedAvg (K=20 clients of 2 single-label shards, C=0.5, E=5, B=10, SGD 0.3) on sklearn's
  digits: the global MLP reaches >= 90% test accuracy in 30 rounds (measured 0.936; 0.78 after
  10), and the eval every 10 rounds is in the history by round."""
  config = mlp_config(
    'digits', clients=20, client_fraction=0.5, local_epochs=5, local_batch_size=10, split='shards'
  )
  config.model.kwargs = dict(hidden=(64,), activation='relu')
  config.optim.lr = 0.3
  config.num_steps, config.eval_every, config.log_every = 30, 10, 10
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  evals = [(h['step'], h['accuracy']) for h in results['history'] if h['split'] == 'eval']
  assert [s for s, _ in evals] == [10, 20, 30]
  assert results['eval']['accuracy'] >= 0.9, evals
  assert evals[0][1] < results['eval']['accuracy'] - 0.05, evals


# 8 clients a round on 8 devices (one each) vs one device: the same per-client arithmetic; the
# average is summed in another order (measured max |difference| 6e-8).
SHARDED_ATOL = 1e-6


@pytest.mark.slow  # two runs per case, >40 s on 2 busy cores: both cases are in the slow pass
@pytest.mark.parametrize('fraction', [0.3125, 0.5])  # 5 clients a round, padded to 8; 8 clients
def test_sharded_rounds_match_one_device(fraction, tmp_path, one_device):
  config = mlp_config(clients=16, client_fraction=fraction, local_epochs=1, local_batch_size=10)
  config.num_steps, config.log_every = 3, 1
  ref = train.train_and_evaluate(config, str(tmp_path / 'one'), devices=one_device)
  config.mesh.data = 8
  sharded = train.train_and_evaluate(config, str(tmp_path / 'mesh'))
  assert sharded['devices'] == 8
  loss = lambda r: np.array([h['loss'] for h in r['history'] if h['split'] == 'train'])
  np.testing.assert_allclose(loss(sharded), loss(ref), rtol=1e-6)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=SHARDED_ATOL),
    _params(tmp_path / 'one'),
    _params(tmp_path / 'mesh'),
  )


def test_round_splits_clients_over_the_mesh():
  """The compiled round takes the client axis split 8 ways and all-reduces the average."""
  config = mlp_config(clients=16, client_fraction=0.5, local_batch_size=10)
  config.num_steps, config.mesh.data = 1, 8
  exp = experiment.build(config)
  compiled = exp.compile_train_step()
  data_sharding = compiled.input_shardings[0][1]
  assert all(s.spec[0] == ('data', 'fsdp') for s in jax.tree.leaves(data_sharding))
  assert 'all-reduce' in compiled.as_text()


@pytest.mark.slow  # two compiles of 5-step rounds; CI's `-m slow` pass
def test_fedprox_term_keeps_the_round_near_the_global_model(tmp_path, one_device):
  """FedProx's mu pulls every local step back toward the round's start: with lr * mu = 0.5 the
  global update of a 5-step round shrinks to well under half (measured ~0.3x)."""
  norms = {}
  for mu in (0.0, 5.0):
    config = mlp_config(
      clients=5, client_fraction=1.0, local_epochs=5, local_batch_size=0, prox_mu=mu
    )
    config.num_steps, config.log_every = 1, 1
    results = train.train_and_evaluate(config, str(tmp_path / str(mu)), devices=one_device)
    norms[mu] = results['train']['update_norm']
  assert norms[5.0] < 0.5 * norms[0.0], norms


@pytest.mark.slow  # three bigjax-train processes (~40 s); CI's `-m slow` pass
def test_killed_federated_run_resumes_bitwise(tmp_path, one_device):
  """SIGKILL after round 20's checkpoint (of 40), then the same command again: the parameters
  equal those of an uninterrupted run bitwise, and the history has every round once."""
  flags = [
    '--config=configs/mlp_breast_cancer.py',
    '--config.federated.clients=10',
    '--config.federated.client_fraction=0.3',
    '--config.federated.local_batch_size=10',
    '--config.federated.split=shards',
    '--config.federated.shards_per_client=1',
    '--config.optim.name=sgd',
    '--config.optim.lr=0.05',
    '--config.num_steps=40',
    '--config.checkpoint_every=10',
    '--config.log_every=5',
    '--config.eval_every=20',
    '--config.mesh.data=1',
  ]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  cmd = [sys.executable, '-m', 'bigjax.train', f'--workdir={tmp_path / "killed"}', *flags]
  kill_after_checkpoint(cmd, env, tmp_path / 'killed' / 'checkpoints', 20)
  saved = [int(s) for s in os.listdir(tmp_path / 'killed' / 'checkpoints') if s.isdigit()]
  assert 20 in saved and max(saved) < 40, saved
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  full = [sys.executable, '-m', 'bigjax.train', f'--workdir={tmp_path / "full"}', *flags]
  subprocess.run(full, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  b = checkpoint.load_latest(tmp_path / 'killed' / 'checkpoints')
  assert a[0] == b[0] == 40
  jax.tree.map(np.testing.assert_array_equal, a[1], b[1])  # bitwise
  history = [
    line for line in open(tmp_path / 'killed' / 'history.jsonl') if '"split": "train"' in line
  ]
  assert len(history) == 8  # rounds 5, 10, ..., 40, each once


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the field, before anything is written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(clients=456), 'config.federated.clients=456 is more than the 455 training examples'),
    (
      dict(clients=10, client_fraction=0.0),
      'config.federated.client_fraction=0.0 must be in (0, 1]',
    ),
    (
      dict(clients=10, client_fraction=1.5),
      'config.federated.client_fraction=1.5 must be in (0, 1]',
    ),
    (dict(clients=10, local_epochs=0), 'config.federated.local_epochs=0 must be >= 1'),
    (dict(clients=10, split='dirichlet', alpha=0.0), 'config.federated.alpha=0.0 must be > 0'),
    (dict(clients=10, alpha=-1.0), 'config.federated.alpha=-1.0 must be > 0'),
    (dict(clients=10, split='pathological'), "config.federated.split='pathological' is unknown"),
    (dict(clients=1, split='shards', shards_per_client=1), 'cannot keep the 2 labels apart'),
  ],
)
def test_bad_federated_config_is_one_line_error(fields, message, tmp_path, one_device):
  config = mlp_config(**fields)
  config.num_steps = 5
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=one_device)
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('num_steps', 0, 'set config.num_steps to the number of rounds'),
    ('prune.method', 'magnitude', "config.prune.method='magnitude' does not combine"),
    ('grad_accum_steps', 2, 'config.grad_accum_steps=2 does not combine'),
  ],
)
def test_what_rounds_cannot_honour_is_one_line_error(field, value, message, tmp_path, one_device):
  config = mlp_config(clients=10)
  config.num_steps = 5
  parent, _, key = field.rpartition('.')
  (config[parent] if parent else config)[key] = value
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=one_device)
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
