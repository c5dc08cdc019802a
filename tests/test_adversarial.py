"""config.adversarial (bigjax/robust/adversarial.py): eps = 0 is plain training (augmentation
applied once), an attacked batch has a higher loss, resume stays bitwise, embedding-space FGM for a
BERT classifier, adversarial training buys robust accuracy, and bad input."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks import digits_cnn

from bigjax import checkpoint, experiment, train
from bigjax.errors import UserError

from conftest import load_config


def _steps(config, devices, n=3):
  """(host params after n steps, [host metrics of each step])."""
  exp = experiment.build(config, devices)
  state = exp.create_state()
  train_step = exp.compile_train_step()
  metrics = []
  for i in range(n):
    state, m = train_step(state, exp.to_global(exp.batches.batch(i)))
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


def _adversarial(config, **kw):
  config = config.copy_and_resolve_references()
  config.adversarial.update(**kw)
  return config


@pytest.fixture(scope='module')
def augmented():
  """The digits CNN with random crops: the attack must see (and keep) the step's augmentation."""
  config = digits_cnn()
  config.augment.update(enabled=True, crop_padding=1)
  return config


@pytest.fixture(scope='module')
def plain(augmented):
  return _steps(augmented, jax.devices()[:1])


@pytest.mark.slow  # >40 s on 2 busy cores: out of the default run (CI runs -m slow)
def test_eps_zero_is_plain_training(augmented, plain):
  """FGSM with eps = 0 on the whole batch leaves the (augmented) inputs as they are: the same
  parameters as plain training after 3 steps (to float rounding), not augmented twice."""
  params, metrics = _steps(
    _adversarial(augmented, method='fgsm', eps=0.0, fraction=1.0), jax.devices()[:1]
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, plain[0]
  )
  np.testing.assert_allclose([m['loss'] for m in metrics], [m['loss'] for m in plain[1]], rtol=1e-6)


@pytest.mark.slow  # two more builds and compiles
def test_attacked_batches_have_a_higher_loss(augmented, plain):
  """PGD at eps 0.2 on the whole batch raises step 0's loss (same parameters) by more than 10%;
  on half the batch by about half as much."""
  config = _adversarial(augmented, method='pgd', eps=0.2, steps=3)
  whole = _steps(config, jax.devices()[:1], n=1)[1][0]['loss']
  half = _steps(_adversarial(config, fraction=0.5), jax.devices()[:1], n=1)[1][0]['loss']
  clean = plain[1][0]['loss']
  assert whole > 1.1 * clean, (whole, clean)
  assert clean < half < whole
  assert abs((half - clean) / (whole - clean) - 0.5) < 0.25


@pytest.mark.slow  # three runs through train_and_evaluate, ~60 s on 2 busy cores
def test_adversarial_training_resumes_bitwise(tmp_path, one_device):
  """6 steps of PGD training in one run equal 3 steps, then a resumed run to step 6 (the random
  starts come from the step's key): final parameters bitwise equal."""
  config = _adversarial(digits_cnn(), method='pgd', eps=0.1, steps=2, fraction=0.5)
  config.update(num_steps=6, checkpoint_every=3, log_every=3)
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight, devices=one_device)
  resumed = str(tmp_path / 'resumed')
  train.train_and_evaluate(_with_steps(config, 3), resumed, devices=one_device)
  results = train.train_and_evaluate(config, resumed, devices=one_device)
  assert results['steps_this_run'] == 3
  load = lambda d: checkpoint.load_latest(os.path.join(d, 'checkpoints'))[1]['params']
  jax.tree.map(np.testing.assert_array_equal, load(resumed), load(straight))


def _with_steps(config, n):
  config = config.copy_and_resolve_references()
  config.num_steps = n
  return config


@pytest.mark.slow  # two 300-step runs with PGD evals, ~90 s on 2 busy cores
def test_adversarial_training_raises_robust_accuracy(tmp_path, one_device):
  """Digits CNN, 300 steps: PGD-5 training at eps 0.1 (fraction 1) against standard training,
  both evaluated with 10-step PGD at eps 0.05 and 0.1 on the 360 test digits. Measured (busy
  2-core AMD EPYC): standard 0.831 / 0.486, adversarial 0.875 / 0.669; bars: +0.1 at eps 0.1, not
  lower at 0.05, and clean accuracy above 0.9 for both."""
  config = digits_cnn(steps=300)
  config.update(log_every=100, checkpoint_every=300)
  config.eval_attacks.update(methods=('pgd',), eps=(0.05, 0.1), steps=10)
  std = train.train_and_evaluate(config, str(tmp_path / 'std'), devices=one_device)['eval']
  adv_config = _adversarial(config, method='pgd', eps=0.1, steps=5)
  adv = train.train_and_evaluate(adv_config, str(tmp_path / 'adv'), devices=one_device)['eval']
  assert std['accuracy'] > 0.9 and adv['accuracy'] > 0.9, (std, adv)
  key = 'robust_accuracy_pgd_linf_{}'
  assert adv[key.format(0.1)] > std[key.format(0.1)] + 0.1, (std, adv)
  assert adv[key.format(0.05)] >= std[key.format(0.05)], (std, adv)


# PGD training, 3 steps, (data=2, fsdp=2, tensor=2) against one device: only the order of float
# sums differs (measured by hand: 3e-8 after 2 steps on parameters of size ~0.3).
MESH_ATOL = 1e-6


@pytest.mark.slow  # two builds and compiles, one on 8 devices: ~60 s on 2 busy cores
def test_adversarial_training_on_the_mesh_equals_one_device(one_device):
  config = _adversarial(digits_cnn(), method='pgd', eps=0.1, steps=2, fraction=0.5)
  config.optim.update(name='sgd', lr=0.1)  # see tests/test_prune.py's mesh test
  ref, ref_metrics = _steps(config, one_device)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  exp = experiment.build(config)
  specs = [str(s.spec) for s in jax.tree.leaves(exp.shardings.params)]
  assert exp.mesh.size == 8 and any('fsdp' in s or 'tensor' in s for s in specs), specs
  got, metrics = _steps(config, None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=MESH_ATOL), got, ref)
  np.testing.assert_allclose(
    [m['loss'] for m in metrics], [m['loss'] for m in ref_metrics], rtol=1e-5
  )
  assert metrics[0]['loss'] != metrics[2]['loss']  # it trained


@pytest.mark.slow  # BERT smoke builds and compiles three times, ~60 s
def test_embedding_fgm_for_a_bert_classifier(one_device):
  """Token inputs: the perturbation goes onto the embeddings. eps = 0 equals plain fine-tuning;
  L2 FGM at eps 1 raises the first step's loss."""
  config = load_config('bert_genre', 'init=none,smoke')
  config.model.kwargs.dropout = 0.0
  plain_params, plain = _steps(config, one_device, n=2)
  zero_params, zero = _steps(
    _adversarial(config, method='fgsm', norm='l2', eps=0.0), one_device, n=2
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), zero_params, plain_params
  )
  _, fgm = _steps(_adversarial(config, method='fgsm', norm='l2', eps=1.0), one_device, n=1)
  assert fgm[0]['loss'] > plain[0]['loss'] + 1e-3, (fgm[0]['loss'], plain[0]['loss'])


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('eps', -0.1, r'config.adversarial.eps=-0.1 must be >= 0.0'),
    ('steps', 0, r'config.adversarial.steps=0 must be >= 1'),
    ('norm', 'l1', r"config.adversarial.norm='l1' is unknown; known attack norms: l2, linf"),
    ('method', 'cw', r"config.adversarial.method='cw' is unknown; known attack methods: fgsm"),
    ('fraction', 0.0, r'config.adversarial.fraction=0.0 must be in \(0, 1\]'),
    ('fraction', 1.5, r'config.adversarial.fraction=1.5 must be in \(0, 1\]'),
  ],
)
def test_bad_adversarial_config_is_one_line(field, value, message, one_device):
  config = _adversarial(digits_cnn(), method='pgd')
  config.adversarial[field] = value
  with pytest.raises(UserError, match=message) as e:
    experiment.build(config, one_device)
  assert '\n' not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Token inputs on a tiny model: PGD on the embeddings, FreeLB against a hand computation
# ----------------------------------------------------------------------------------------------
class _TinyText(flax.linen.Module):
  """Token ids (B, T) -> embed (11 x 6) -> tanh -> mean over T -> Dense 3."""

  @flax.linen.compact
  def __call__(self, x, train=False):
    h = flax.linen.Embed(11, 6, name='embed')(x)
    return flax.linen.Dense(3, name='head')(jnp.tanh(h).mean(1))


def _tiny_text():
  """(model, classification task, params, batch of 4 sequences of 5 tokens)."""
  from bigjax.tasks import base, classification

  model = _TinyText()
  rng = np.random.default_rng(0)
  batch = {
    'inputs': jnp.asarray(rng.integers(0, 11, (4, 5)), jnp.int32),
    'label': jnp.asarray([0, 1, 2, 1], jnp.int32),
  }
  params = model.init(jax.random.key(0), batch['inputs'])['params']
  return model, classification.Task(base.DataInfo(3)), params, batch


def _hand_loss(params, batch, delta):
  """Per-example cross-entropy (B,) of _TinyText with its embeddings shifted by delta (B, T, D),
  written out by hand."""
  h = params['embed']['embedding'][batch['inputs']] + delta
  logits = jnp.tanh(h).mean(1) @ params['head']['kernel'] + params['head']['bias']
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch['label'][:, None], 1)[:, 0]


def _adv_cfg(**kw):
  from bigjax import config_lib

  cfg = config_lib.base_config().adversarial
  cfg.update(**{**dict(norm='l2', eps=0.5, steps=3, step_size=0.2, random_start=False), **kw})
  return cfg


def test_pgd_on_token_embeddings_stays_in_the_ball_and_raises_the_loss():
  from bigjax.robust import adversarial

  model, task, params, batch = _tiny_text()
  adv = adversarial.from_config(_adv_cfg(method='pgd'), task, np.int32, params)
  shifted, same, _ = adv.perturb(model, {'params': params}, batch, None, jax.random.key(1))
  assert same is batch and adv.text
  delta = shifted.delta
  assert delta.shape == (4, 5, 6)
  sizes = jnp.sqrt(jnp.sum(delta**2, axis=(1, 2)))
  assert float(sizes.max()) <= 0.5 * (1 + 1e-5) and float(sizes.min()) > 0.4  # to the surface
  clean = _hand_loss(params, batch, 0.0)
  attacked = _hand_loss(params, batch, delta)
  np.testing.assert_allclose(  # the model's own forward sees the shifted embeddings
    jnp.take_along_axis(
      -jax.nn.log_softmax(shifted.apply({'params': params}, batch['inputs'])),
      batch['label'][:, None],
      1,
    )[:, 0],
    attacked,
    rtol=1e-6,
  )
  assert bool(jnp.all(attacked > clean)), (attacked, clean)


def test_freelb_gradient_is_the_mean_of_the_k_perturbed_gradients():
  """FreeLB with K = 3 ascent steps (L2, eps 0.5, step 0.2, from delta_0 = 0): one SGD step of
  lr 1 moves the parameters by minus the mean over t = 0, 1, 2 of the gradient of the batch's
  mean loss at delta_t, where delta_{t+1} = proj(delta_t + 0.2 g_t / |g_t|) per example (g_t
  the gradient of that example's loss in delta_t): all computed by hand here."""
  import optax

  from bigjax import steps
  from bigjax.robust import adversarial

  model, task, params, batch = _tiny_text()
  adv = adversarial.from_config(_adv_cfg(method='freelb'), task, np.int32, params)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, optax.sgd(1.0).init(params))
  train_step = steps.make_train_step(model, task, optax.sgd(1.0), seed=0, adversarial=adv)
  new, metrics = jax.jit(train_step)(state, batch)
  got = jax.tree.map(jnp.subtract, params, new.params)  # lr 1: the gradient

  delta, grads, losses = jnp.zeros((4, 5, 6)), [], []
  for _ in range(3):
    loss, g = jax.value_and_grad(lambda p: _hand_loss(p, batch, delta).mean())(params)
    grads.append(g)
    losses.append(loss)
    g_delta = jax.grad(lambda d: _hand_loss(params, batch, d).sum())(delta)
    norm = jnp.sqrt(jnp.sum(g_delta**2, axis=(1, 2), keepdims=True))
    delta = delta + 0.2 * g_delta / norm
    size = jnp.sqrt(jnp.sum(delta**2, axis=(1, 2), keepdims=True))
    delta = delta * jnp.minimum(1.0, 0.5 / size)
  want = jax.tree.map(lambda *g: sum(g) / 3, *grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-6)
  assert losses[0] < losses[1] < losses[2]  # the ascent raised the loss
  # not plain PGD's gradient (at the last iterate alone), nor the clean one
  for other in (grads[0], grads[2]):
    assert (
      max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, other)))
      > 1e-4
    )


@pytest.mark.parametrize(
  'fields,message',
  [
    (dict(fraction=0.5), r"config.adversarial.fraction=0.5 does not fit method='freelb'"),
    (dict(restarts=2), r"config.adversarial.restarts=2 does not fit method='freelb'"),
  ],
)
def test_bad_freelb_config_is_one_line(fields, message):
  from bigjax.robust import adversarial

  _, task, params, _ = _tiny_text()
  with pytest.raises(UserError, match=message) as e:
    adversarial.from_config(_adv_cfg(method='freelb', **fields), task, np.int32, params)
  assert '\n' not in str(e.value)
  with pytest.raises(
    UserError, match=r"method='freelb' perturbs token embeddings, and these inputs are uint8"
  ):
    adversarial.from_config(_adv_cfg(method='freelb'), task, np.uint8, params)


class _TinyDense(flax.linen.Module):
  """Features (B, 5) -> Dense 3."""

  @flax.linen.compact
  def __call__(self, x, train=False):
    return flax.linen.Dense(3)(x)


def test_eps_warmup_ramps_the_radius_linearly_and_zero_changes_nothing():
  """eps_warmup_steps = 4, FGSM L-inf eps 0.2 on float features (unbounded): the perturbation
  is 0, 0.1, 0.2, 0.2 in every coordinate at steps 0, 2, 4, 8 (through the train step: step 0's
  loss is the clean loss, step 4's the full attack's); warm-up 0 is the fixed attack itself."""
  import optax

  from bigjax import steps
  from bigjax.robust import adversarial
  from bigjax.tasks import base, classification

  model, task = _TinyDense(), classification.Task(base.DataInfo(3))
  rng = np.random.default_rng(0)
  batch = {
    'inputs': jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
    'label': jnp.asarray(rng.integers(0, 3, 8), jnp.int32),
  }
  params = model.init(jax.random.key(0), batch['inputs'])['params']
  cfg = lambda warmup: _adv_cfg(method='fgsm', norm='linf', eps=0.2, eps_warmup_steps=warmup)
  ramped = adversarial.from_config(cfg(4), task, np.float32, params)
  fixed = adversarial.from_config(cfg(0), task, np.float32, params)
  assert fixed.attack_at(jnp.int32(3)) is fixed.attack
  for step, eps in ((0, 0.0), (2, 0.1), (4, 0.2), (8, 0.2)):
    attacked = jax.jit(
      lambda s: ramped.perturb(model, {'params': params}, batch, None, jax.random.key(1), s)[1]
    )(jnp.int32(step))
    moved = np.abs(np.asarray(attacked['inputs'] - batch['inputs']))
    np.testing.assert_allclose(moved, eps, rtol=1e-6, atol=1e-7)

  def first_loss(adv, step):
    state = steps.TrainState(jnp.int32(step), params, {}, optax.sgd(0.1).init(params))
    step_fn = steps.make_train_step(model, task, optax.sgd(0.1), seed=0, adversarial=adv)
    return float(jax.jit(step_fn)(state, batch)[1]['loss'])

  clean = float(task.loss_and_metrics(model.apply({'params': params}, batch['inputs']), batch)[0])
  assert first_loss(ramped, 0) == pytest.approx(clean, rel=1e-6)
  assert first_loss(ramped, 4) == pytest.approx(first_loss(fixed, 0), rel=1e-6)
  assert first_loss(fixed, 0) > clean + 0.01
