"""Every shipped config builds and its train step compiles at its real size (not only :smoke), and
the scaling switches reached through a config (chunked attention, scan, remat) train as the plain
config does.

The configs without a dataset available offline (cifar10) build over `tfds.testing.mock_data` and
run one real train step on it.
"""

import math

import flax
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax import cli, experiment, steps

from conftest import load_config


# The parameter counts the architectures imply. GPT: per block 12 D^2 + 13 D (qkv, output, MLP
# 4D, two layer norms), token and position embeddings, final norm, head tied to the embedding.
def _gpt_params(layers, width, context, vocab=260):
  return layers * (12 * width**2 + 13 * width) + (vocab + context) * width + 2 * width


# ResNet-18, CIFAR stem (3x3 conv, 64 channels), bias-free convs + batch norm, 10 classes: the
# standard 11,173,962 (e.g. kuangliu/pytorch-cifar's ResNet18).
RESNET18_CIFAR10 = 11_173_962

# Slow: the compiles of 5-20 s each (the default run keeps the small ones).
SLOW = pytest.mark.slow

# (config name, arg, total steps, parameter count or None). Step counts are the configs' own:
# epochs x (train examples // batch size), or num_steps.
SIZES = [
  pytest.param('bert_genre', 'init=none', 600, None, id='bert_genre:init=none', marks=SLOW),
  pytest.param('bert_shakespeare_mlm', None, 2000, None, id='bert_shakespeare_mlm', marks=SLOW),
  pytest.param('cifar10_cnn', None, None, None, id='cifar10_cnn', marks=SLOW),
  pytest.param('cifar10_resnet', None, None, RESNET18_CIFAR10, id='cifar10_resnet', marks=SLOW),
  pytest.param(
    'gpt_shakespeare',
    'size=nano',
    5000,
    _gpt_params(6, 384, 256),
    id='gpt_shakespeare:size=nano',
    marks=SLOW,
  ),
  pytest.param(
    'gpt_shakespeare', 'size=small', 5000, _gpt_params(4, 128, 128), id='gpt_shakespeare:size=small'
  ),
  # llama: per layer 2 D + D N H + 2 D K H + N H D + 3 D M (D 128, N 4, K 2, H 32, M 384), the
  # 260 x 128 embedding and untied head, the final norm.
  pytest.param('llama_shakespeare', None, 3000, 854_144, id='llama_shakespeare'),
  # The ImageNet and LM1B configs at their smoke size (a full-size ResNet-50 step at 224 px takes
  # minutes on a CPU); tests/test_data_configs.py compiles them on 8 devices.
  pytest.param('imagenet_resnet50', 'smoke', 2, None, id='imagenet_resnet50:smoke', marks=SLOW),
  pytest.param('imagenet_vit', 'smoke', 2, None, id='imagenet_vit:smoke', marks=SLOW),
  pytest.param('lm1b_gpt', 'smoke', 2, None, id='lm1b_gpt:smoke', marks=SLOW),
  pytest.param('mlp_breast_cancer', None, 50 * (455 // 32), None, id='mlp_breast_cancer'),
  pytest.param('mlp_mnist', None, 5 * (4000 // 64), None, id='mlp_mnist'),
  pytest.param('mnist_cnn', None, 10 * (4000 // 64), None, id='mnist_cnn'),
  pytest.param('mnist_mlp_student', None, 10 * (4000 // 64), 25_450, id='mnist_mlp_student'),
  pytest.param('vit_mnist', None, 20 * (4000 // 64), None, id='vit_mnist'),
]
MOCKED = {
  'cifar10_cnn',
  'cifar10_resnet',
  'imagenet_resnet50',
  'imagenet_vit',
  'lm1b_gpt',
}  # not offline
MOCK_EXAMPLES = 256  # two batches of 128


def test_every_shipped_config_is_covered():
  assert {p.values[0] for p in SIZES} == set(cli.shipped_configs())


def _leaves_moved(before, after):
  return [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]


@pytest.mark.parametrize('name, arg, total_steps, params', SIZES)
def test_shipped_config_builds_and_compiles_at_full_size(
  name, arg, total_steps, params, one_device, tmp_path
):
  config = load_config(name, arg)
  if name in MOCKED:
    config.data.data_dir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
      exp = experiment.build(config, one_device)
  else:
    exp = experiment.build(config, one_device)
  train_step = exp.compile_train_step()
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract.params))
  assert n > 0 and (params is None or n == params), n
  if total_steps is not None:
    assert exp.total_steps == total_steps
  else:  # mocked data: epochs x the mock split's batches
    assert exp.total_steps == config.num_epochs * (MOCK_EXAMPLES // config.batch_size)
  batch = exp.batches.batch(0)
  assert batch['inputs'].shape[0] == config.batch_size  # the batch the step was compiled for
  if config.data.view:  # text: model and data agree on the context (lm windows hold one more)
    assert exp.data.seq_len == config.data.seq_len
    assert batch['inputs'].shape[1] == config.data.seq_len + (config.data.view == 'lm')
  if name in MOCKED:  # one real train step on the mock images
    state = steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
    before = jax.device_get((state.params, state.model_state))
    new, metrics = train_step(state, exp.to_global(batch))
    metrics = jax.device_get(metrics)
    assert metrics['finite'] == 1.0 and metrics['grad_norm'] > 0
    assert 0.5 < metrics['loss'] < 10.0  # ~ln(10) for 10 classes at init
    assert int(new.step) == 1
    after = jax.device_get((new.params, new.model_state))
    params_moved = _leaves_moved(before[0], after[0])
    if config.optim.warmup_steps:  # warmup starts at lr 0: only the batch statistics move
      assert not any(params_moved) and any(_leaves_moved(before[1], after[1]))
    else:
      assert all(params_moved)


# ----------------------------------------------------------------------------------------------
# Chunked attention, scan and remat through the config
# ----------------------------------------------------------------------------------------------
SEQ_LEN = 160  # two key blocks of the chunked kernel's 128 (the second padded)
NUM_STEPS = 5


def _gpt_config(**kwargs):
  config = load_config('gpt_shakespeare', 'smoke')
  config.data.seq_len = SEQ_LEN  # and so the model's max_len
  config.model.kwargs.update(kwargs)
  return config


def _stacked(params, num_layers):
  """Unscanned GPT params (stack/layer_i/...) -> the scanned layout (stack/layers/..., leading L)."""
  stack = dict(params['stack'])
  layers = [stack.pop(f'layer_{i}') for i in range(num_layers)]
  stack['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return dict(params, stack=stack)


def _train(config, one_device, params=None):
  """NUM_STEPS train steps from the config's init (or `params`): (losses, final params)."""
  exp = experiment.build(config, one_device)
  assert exp.model.max_len == SEQ_LEN
  train_step = exp.compile_train_step()
  state = steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
  if params is not None:
    params = jax.tree.map(
      lambda p, s: jax.device_put(np.asarray(p, s.dtype), s.sharding), params, state.params
    )
    state = state.replace(params=params)
  losses = []
  for step in range(NUM_STEPS):
    state, metrics = train_step(state, exp.to_global(exp.batches.batch(step)))
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params)


def _flat(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


@pytest.mark.slow  # two builds and compiles at a 160-token context, ~17 s
def test_chunked_attention_scan_and_remat_train_like_the_plain_config(one_device):
  """gpt_shakespeare:smoke at a 160-token context, plain vs attention='chunked' + scan + remat='full'
  from the same initial parameters (restacked for scan), 5 AdamW steps: the same losses, and the
  same parameters up to float order, measured against how far training moved them all (Adam turns
  float noise in a zero gradient, e.g. the key biases', into steps of ~lr / 100: a per-element or
  per-parameter tolerance would be either loose or flaky)."""
  plain = _gpt_config()
  kw = plain.model.kwargs
  assert (kw.attention, kw.scan, kw.remat, plain.optim.weight_decay) == ('xla', False, 'none', 0.1)
  exp = experiment.build(plain, one_device)
  init = jax.device_get(
    steps.create_state(exp.model, exp.tx, exp.sample, plain.seed, exp.shardings).params
  )
  ref_losses, ref_params = _train(plain, one_device)
  assert ref_losses[-1] < ref_losses[0]

  variant = _gpt_config(attention='chunked', scan=True, remat='full')
  layers = variant.model.kwargs.num_layers
  losses, params = _train(variant, one_device, params=_stacked(init, layers))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  got, want, start = (
    _flat(params),
    _flat(_stacked(ref_params, layers)),
    _flat(_stacked(init, layers)),
  )
  assert sorted(got) == sorted(want)
  # Measured on CPU: chunked vs xla 1.1e-4, scan vs unscanned (without weight decay) 8e-5 of how
  # far the parameters moved.
  off = {k: np.linalg.norm(got[k] - want[k]) for k in got}
  total = np.sqrt(sum(v**2 for v in off.values()))
  moved = np.sqrt(sum(np.linalg.norm(want[k] - start[k]) ** 2 for k in got))
  worst = ', '.join(f'{k} ({off[k]:.3g})' for k in sorted(off, key=off.get, reverse=True)[:3])
  assert total <= 1e-3 * moved, f'{total:.3g} off, training moved them {moved:.3g}; most: {worst}'


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scan'])
def test_weight_decay_skips_biases_and_norm_scales(scan, one_device):
  """bigjax/optim.py: 'Weight decay never touches biases or norm scales'. AdamW (the GPT config's,
  weight decay 0.1, no warmup) applied to zero gradients leaves only the decay: non-zero for every
  kernel and embedding, zero for every bias and norm scale, with the blocks scanned or not."""
  config = _gpt_config(scan=scan)
  config.optim.warmup_steps = 0
  exp = experiment.build(config, one_device)
  params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), exp.abstract.params)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = exp.tx.update(zeros, exp.tx.init(params), params)
  decayed = {k: bool(np.all(np.asarray(u) != 0)) for k, u in _flat(updates).items()}
  untouched = {k: bool(not np.any(np.asarray(u))) for k, u in _flat(updates).items()}
  norms_and_biases = [k for k in decayed if k.rsplit('/', 1)[-1] in ('bias', 'scale')]
  assert len(norms_and_biases) >= 8
  decayed_by_mistake = sorted(k for k in norms_and_biases if not untouched[k])
  assert decayed_by_mistake == [], decayed_by_mistake
  assert all(decayed[k] for k in decayed if k not in norms_and_biases)
