"""bigjax/robust/attacks.py and config.eval_attacks: FGSM against its closed form on a linear
model, PGD inside the eps-ball (L-infinity and L2) and the input range, raising the loss, more
steps and restarts at least as strong as fewer, the eval report's robust accuracy, the mesh against
one device, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import experiment, train
from bigjax.errors import UserError
from bigjax.robust import attacks

from conftest import load_config

D, K = 20, 5  # input size and classes of the small random model below


def _mlp(seed=0):
  """A fixed random 20-32-5 tanh MLP and its per-example cross-entropy loss of x (B, 20)."""
  rng = np.random.default_rng(seed)
  w1, w2 = rng.normal(size=(D, 32)) * 1.5, rng.normal(size=(32, K)) * 1.5
  logits = lambda x: jnp.tanh(x @ w1) @ w2
  return logits


def _loss_fn(logits, labels):
  return lambda x: (
    -jnp.take_along_axis(jax.nn.log_softmax(logits(x)), labels[:, None], axis=1).reshape(-1)
  )


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0, 1, size=(64, D)), jnp.float32)
  logits = _mlp()
  labels = jnp.argmax(logits(x), -1)  # the model is right on every clean example
  return x, labels, logits


def _attack(method='pgd', norm='linf', eps=0.1, **kw):
  return attacks.Attack(method, norm, eps, **kw)


def test_fgsm_is_the_closed_form_step_on_a_linear_model():
  """Loss softplus(-y w.x): FGSM moves x by -y eps sign(w) (L-inf) or -y eps w / |w| (L2), and
  the margin falls by exactly eps |w|_1 (L-inf) or eps |w|_2 (L2), with no input bounds."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(D,)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
  y = jnp.asarray(rng.choice([-1.0, 1.0], size=8), jnp.float32)
  loss_fn = lambda x: jax.nn.softplus(-y * (x @ w))
  eps = 0.25
  for norm, step, drop in (
    ('linf', jnp.sign(w), eps * jnp.abs(w).sum()),
    ('l2', w / jnp.linalg.norm(w), eps * jnp.linalg.norm(w)),
  ):
    x_adv = attacks.perturb(loss_fn, x, jax.random.key(0), _attack('fgsm', norm, eps))
    np.testing.assert_allclose(x_adv, x - eps * y[:, None] * step, rtol=1e-6, atol=1e-6)
    margin = lambda x: y * (x @ w)
    np.testing.assert_allclose(margin(x) - margin(x_adv), drop, rtol=1e-5)


@pytest.mark.parametrize('norm,eps', [('linf', 0.1), ('l2', 1.0)])
def test_pgd_stays_in_the_ball_and_the_input_range_and_raises_the_loss(data, norm, eps):
  x, labels, logits = data
  loss_fn = _loss_fn(logits, labels)
  attack = _attack('pgd', norm, eps, steps=10, restarts=2)
  x_adv = jax.jit(lambda x: attacks.perturb(loss_fn, x, jax.random.key(3), attack, (0.0, 1.0)))(x)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  size = attacks.perturbation_size(x_adv, x, norm)
  assert float(size.max()) <= eps * (1 + 1e-5)
  assert float(size.mean()) > 0.5 * eps  # it does move (mostly to the ball's surface)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  clean, attacked = loss_fn(x), loss_fn(x_adv)
  assert bool(jnp.all(attacked >= clean - 1e-6))  # per example, with restarts and projection
  assert float(attacked.mean()) > float(clean.mean()) + 0.5  # by a lot on average


def test_more_steps_and_restarts_are_at_least_as_strong(data):
  x, labels, logits = data
  loss_fn = _loss_fn(logits, labels)
  mean_loss = lambda **kw: float(
    jax.jit(
      lambda x: loss_fn(
        attacks.perturb(loss_fn, x, jax.random.key(5), _attack(eps=0.05, **kw), (0, 1))
      )
    )(x).mean()
  )
  one, five, forty = mean_loss(steps=1), mean_loss(steps=5), mean_loss(steps=40)
  assert one < five <= forty + 1e-6, (one, five, forty)
  # restarts keep the best start per example: never weaker than the first start alone
  assert mean_loss(steps=5, restarts=4) >= five - 1e-6


def test_an_attack_vmaps_over_radii(data):
  """vmap over eps gives each radius's attack (eps traced inside the projection)."""
  x, labels, logits = data
  loss_fn = _loss_fn(logits, labels)
  run = lambda eps: attacks.perturb(
    loss_fn, x, jax.random.key(0), attacks.Attack('pgd', 'linf', eps, steps=3), (0.0, 1.0)
  )
  radii = jnp.array([0.02, 0.1])
  batched = jax.vmap(run)(radii)
  for i, eps in enumerate([0.02, 0.1]):
    np.testing.assert_allclose(batched[i], run(eps), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(batched[i] - x).max()) <= eps * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------
# config.eval_attacks through the experiment: a small CNN on the 8x8 digits
# ------------------------------------------------------------------------------------------------
def digits_cnn(steps=0):
  """Conv8-Pool-Dense32 on scikit-learn's 8x8 digits (1,437 train / 360 test), Adam 3e-3."""
  config = load_config('mnist_cnn', 'smoke')
  config.data.name = 'digits'
  config.model.kwargs.update(conv_features=(8,), pool_after=(True,), dense_features=(32,))
  config.optim.lr = 3e-3
  config.num_steps = steps or config.num_steps
  return config


def _attacked(config, devices, steps=60):
  """(eval report, host params) after `steps` train steps."""
  exp = experiment.build(config, devices)
  state = exp.create_state()
  train_step = exp.compile_train_step()
  for i in range(steps):
    state, _ = train_step(state, exp.to_global(exp.batches.batch(i)))
    if i % train.MAX_STEPS_IN_FLIGHT == 0:  # as the train loop bounds it (XLA:CPU deadlock)
      jax.block_until_ready(state)
  return exp.evaluate(exp.compile_eval_step(), state), jax.device_get(state.params)


@pytest.fixture(scope='module')
def eval_config():
  config = digits_cnn()
  config.eval_attacks.update(
    methods=('fgsm', 'pgd'), norm='linf', eps=(0.0, 0.05, 0.2), steps=5, max_examples=200
  )
  config.eval_batch_size = 64  # 4 eval batches, the last one padded
  return config


@pytest.fixture(scope='module')
def one_device_report(eval_config):
  return _attacked(eval_config, jax.devices()[:1])[0]


@pytest.mark.slow  # >40 s on 2 busy cores: out of the default run (CI runs -m slow)
def test_eval_reports_robust_accuracy_at_each_eps(one_device_report):
  r = one_device_report
  names = [f'robust_accuracy_{m}_linf_{e}' for m in ('fgsm', 'pgd') for e in ('0', '0.05', '0.2')]
  assert all(0 <= r[n] <= 1 for n in names), r
  assert r['accuracy'] > 0.6  # trained a little (60 steps)
  # eps = 0 changes nothing: the clean accuracy of the 200 attacked examples, for both methods
  assert r['robust_accuracy_fgsm_linf_0'] == r['robust_accuracy_pgd_linf_0'] > 0.6
  for method in ('fgsm', 'pgd'):
    at = [r[f'robust_accuracy_{method}_linf_{e}'] for e in ('0', '0.05', '0.2')]
    assert at[0] > at[1] > at[2], at  # falls with eps
  assert r['robust_accuracy_pgd_linf_0.2'] < 0.5 * r['accuracy']
  assert r['robust_accuracy_pgd_linf_0.05'] <= r['robust_accuracy_fgsm_linf_0.05']


def test_robust_eval_reads_streamed_data(one_device):
  """config.data.load='stream' (records read per batch, no host arrays): the attacks run through
  the eval batches, over the first 100 of the 360 test digits (2 batches of 64, the second cut
  at 36); at eps 0 the robust accuracy is the clean accuracy of those 100 (untrained model)."""
  config = digits_cnn()
  config.data.load = 'stream'
  config.eval_batch_size = 64
  config.eval_attacks.update(methods=('fgsm',), eps=(0.0, 0.1), max_examples=100)
  exp = experiment.build(config, one_device)
  report, probs = exp.evaluate(exp.compile_eval_step(), exp.create_state(), return_outputs=True)
  clean = np.mean(probs[:100].argmax(1) == exp.eval_labels()[:100])
  assert 0 < clean < 1
  assert report['robust_accuracy_fgsm_linf_0'] == pytest.approx(clean, abs=1e-6)  # float32
  assert report['robust_accuracy_fgsm_linf_0.1'] < clean


@pytest.mark.slow  # a second build and compile on 8 devices, ~30 s
def test_robust_eval_on_the_mesh_equals_one_device(eval_config, one_device_report):
  config = eval_config.copy_and_resolve_references()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  report, _ = _attacked(config, None)
  for key, value in one_device_report.items():
    if key.startswith('robust_accuracy'):
      assert abs(report[key] - value) <= 1 / 200 + 1e-9, (key, report[key], value)  # <= 1 example


@pytest.mark.slow  # >40 s on 2 busy cores: out of the default run (CI runs -m slow)
def test_pgd_on_a_sharded_batch_equals_one_device(data):
  x, labels, logits = data
  loss_fn = _loss_fn(logits, labels)
  attack = _attack('pgd', 'l2', 0.5, steps=5, restarts=2)
  run = jax.jit(lambda x: attacks.perturb(loss_fn, x, jax.random.key(7), attack, (0.0, 1.0)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  got = run(sharded)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, run(jax.device_put(x, jax.devices()[0])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('eps', (0.1, -0.1), r'config.eval_attacks.eps=-0.1 must be >= 0.0'),
    ('steps', 0, r'config.eval_attacks.steps=0 must be >= 1'),
    ('restarts', 0, r'config.eval_attacks.restarts=0 must be >= 1'),
    ('norm', 'l3', r"config.eval_attacks.norm='l3' is unknown; known attack norms: l2, linf"),
    (
      'methods',
      ('cw',),
      r"config.eval_attacks.methods holds 'cw', an unknown attack method; known .*: fgsm",
    ),
    ('eps', (), r"config.eval_attacks.methods=\('pgd',\) needs config.eval_attacks.eps"),
    ('max_examples', -1, r'config.eval_attacks.max_examples=-1 must be >= 0'),
  ],
)
def test_bad_eval_attacks_are_one_line(field, value, message, one_device):
  config = digits_cnn()
  config.eval_attacks.update(methods=('pgd',), eps=(0.1,))
  config.eval_attacks[field] = value
  with pytest.raises(UserError, match=message) as e:
    experiment.build(config, one_device)
  assert '\n' not in str(e.value)


def test_eval_attacks_need_a_classification_task(one_device):
  config = load_config('mlp_breast_cancer')
  config.task.name = 'regression'
  del config.task.kwargs['binary']
  config.eval_attacks.update(methods=('fgsm',), eps=(0.1,))
  with pytest.raises(UserError, match=r'config.eval_attacks needs a classification task'):
    experiment.build(config, one_device)
