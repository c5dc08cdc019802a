"""bigjax.explain: the attribution methods' defining properties on tiny trained runs, the CLI, and
its one-line errors.

Completeness of integrated gradients (MLP, CNN, GPT), SmoothGrad with zero noise = saliency,
Grad-CAM against a hand-written gradient, attention rollout of a one-layer ViT = its residual-mixed
attention (computed independently from the query/key projections), SHAP vs IG feature rankings on
breast cancer, batching without recompiling, the 8-device mesh = one device, the CLI's files =
the Python API's arrays.
"""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import explain, train
from bigjax.errors import UserError
from bigjax.explain import attention, cli, gradcam, gradients, integrated, similarity

from conftest import REPO, load_config


def _train(tmp_path_factory, name, arg=None, **fields):
  config = load_config(name, arg)
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  workdir = tmp_path_factory.mktemp(name)
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return str(workdir)


@pytest.fixture(scope='module')
def cnn_dir(tmp_path_factory):
  return _train(tmp_path_factory, 'mnist_cnn', 'smoke', num_steps=60)


def _load(workdir):  # one device: 8 fake CPU devices on 2 cores are slow; one test uses all 8
  return explain.load_run(workdir, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def cnn(cnn_dir):
  return _load(cnn_dir)


@pytest.fixture(scope='module')
def mlp(tmp_path_factory):
  return _load(_train(tmp_path_factory, 'mlp_breast_cancer', None, num_epochs=20))


@pytest.fixture(scope='module')
def gpt(tmp_path_factory):
  return _load(_train(tmp_path_factory, 'gpt_shakespeare', 'smoke'))


@pytest.fixture(scope='module')
def vit(tmp_path_factory):  # the smoke config has one layer
  return _load(_train(tmp_path_factory, 'vit_mnist', 'smoke', num_steps=10))


def _relative_gap(out):
  total, diff = out['completeness'].T
  return np.abs(total - diff) / np.abs(diff)


# ----------------------------------------------------------------------------------------------
# Completeness and the other defining identities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'name',
  ['mlp', 'cnn', pytest.param('gpt', marks=pytest.mark.slow)],  # gpt: ~60 s on 2 cores
)
def test_integrated_gradients_complete_within_one_percent(name, request):
  run = request.getfixturevalue(name)
  out = explain.explain(run, 'integrated_gradients', indices=list(range(8)))
  total, diff = out['completeness'].T
  assert np.all(np.abs(diff) > 0.01)  # a real gap to recover, not 0 ~ 0
  assert _relative_gap(out).max() < 0.01, (total, diff)
  assert out['attributions'].shape == ((8, 32) if name == 'gpt' else (8, *run.input_shape))


@pytest.mark.slow
def test_integrated_gradients_baselines_complete(cnn):
  for baseline in ('blurred', 'noise'):
    out = explain.explain(cnn, 'integrated_gradients', indices=[0, 1], baseline=baseline)
    assert out['baseline'].shape == out['inputs'].shape
    assert not np.allclose(out['baseline'], 0)
    assert _relative_gap(out).max() < 0.02, baseline


def test_smoothgrad_without_noise_is_saliency(cnn):
  plain = explain.explain(cnn, 'saliency', indices=list(range(8)))['attributions']
  zero = explain.explain(cnn, 'smoothgrad', indices=list(range(8)), noise_level=0.0, num_samples=4)
  noisy = explain.explain(cnn, 'smoothgrad', indices=list(range(8)), num_samples=4)
  np.testing.assert_allclose(zero['attributions'], plain, rtol=1e-5, atol=1e-7)
  assert np.abs(noisy['attributions'] - plain).max() > 1e-3 * np.abs(plain).max()


def test_gradient_x_input_is_input_times_saliency(cnn):
  plain = explain.explain(cnn, 'saliency', indices=[0, 1])
  gxi = explain.explain(cnn, 'grad_x_input', indices=[0, 1])
  np.testing.assert_allclose(gxi['attributions'], plain['attributions'] * plain['inputs'], 1e-6)


def test_gradcam_matches_hand_written_gradient(cnn):
  """Grad-CAM at conv_2 from a forward pass written out by hand: A = conv_2's output, the rest of
  the CNN (ReLU, flatten, dense_0, ReLU, output) applied to A, its gradient by jax.grad."""
  out = explain.explain(cnn, 'gradcam', indices=[0, 1, 2])
  assert str(out['layer']) == 'conv_2' and out['maps'].shape == (3, 3, 3)
  x, target = jnp.asarray(out['inputs']), jnp.asarray(out['target'])
  variables = jax.device_get(cnn.variables)
  _, inter = cnn.exp.model.apply(
    variables, x, capture_intermediates=True, mutable=['intermediates']
  )
  acts = inter['intermediates']['conv_2']['__call__'][0]
  p = variables['params']

  def head(a):
    h = nn.relu(a).reshape(a.shape[0], -1)
    h = nn.relu(h @ p['dense_0']['kernel'] + p['dense_0']['bias'])
    logits = h @ p['output']['kernel'] + p['output']['bias']
    return jnp.take_along_axis(logits, target[:, None], 1).sum()

  grads = jax.grad(head)(acts)
  want = nn.relu((grads.mean(axis=(1, 2), keepdims=True) * acts).sum(-1))
  np.testing.assert_allclose(out['maps'], want, rtol=1e-4, atol=1e-6)
  assert out['upsampled'].shape == (3, 28, 28) and out['maps'].max() > 0


def test_guided_backprop_differs_from_gradient_and_has_no_negative_relu_gradients(cnn):
  guided = explain.explain(cnn, 'guided_backprop', indices=[0, 1])['attributions']
  plain = explain.explain(cnn, 'saliency', indices=[0, 1])['attributions']
  assert guided.shape == plain.shape and not np.allclose(guided, plain)


@pytest.mark.slow
def test_rollout_of_one_layer_vit_is_its_residual_mixed_attention(vit):
  assert vit.exp.model.num_layers == 1
  out = explain.explain(vit, 'rollout', indices=[0, 1, 2])
  x = jnp.asarray(out['inputs'])
  _, inter = vit.exp.model.apply(
    jax.device_get(vit.variables), x, capture_intermediates=True, mutable=['intermediates']
  )
  att = inter['intermediates']['stack']['layer_0']['self_attention']
  q, k = att['query']['__call__'][0], att['key']['__call__'][0]
  weights = jax.nn.softmax(jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1]), -1)
  want = 0.5 * np.eye(q.shape[1]) + 0.5 * np.asarray(weights).mean(1)
  np.testing.assert_allclose(out['rollout'], want, rtol=1e-5, atol=1e-6)
  assert out['patch_map'].shape == (3, 4, 4) and out['upsampled'].shape == (3, 28, 28)
  maps = explain.explain(vit, 'attention', indices=[0, 1, 2])['attention']
  assert maps.shape == (3, 1, vit.exp.model.num_heads, 17, 17)
  np.testing.assert_allclose(maps[:, 0], weights, rtol=1e-5, atol=1e-6)


def test_rollout_multiplies_layers():
  rng = np.random.default_rng(0)
  maps = rng.random((2, 3, 2, 5, 5))
  maps /= maps.sum(-1, keepdims=True)
  mixed = 0.5 * np.eye(5) + 0.5 * maps.mean(2)
  want = mixed[:, 2] @ mixed[:, 1] @ mixed[:, 0]
  np.testing.assert_allclose(attention.rollout(jnp.asarray(maps)), want, rtol=1e-5)


@pytest.mark.slow
def test_sowing_attention_changes_nothing_in_training_applies(gpt):
  tokens = jnp.asarray(gpt.eval_rows([0, 1])['inputs'])
  variables = jax.device_get(gpt.variables)
  plain = gpt.exp.model.apply(variables, tokens)
  sowed, state = gpt.exp.model.apply(variables, tokens, mutable=['attention'])
  np.testing.assert_array_equal(plain, sowed)
  assert len(jax.tree.leaves(state['attention'])) == gpt.exp.model.num_layers


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_methods_refuse_what_does_not_fit(gpt):
  with pytest.raises(UserError, match='--method=gradcam does not apply to .* gpt run'):
    explain.explain(gpt, 'gradcam', 'ROMEO.')
  with pytest.raises(UserError, match='token ids must lie in'):
    explain.explain(gpt, 'attention', np.full((1, 4), 10_000))
  with pytest.raises(UserError, match='exceed the model max_len=32'):
    explain.explain(gpt, 'attention', 'x' * 40)
  with pytest.raises(UserError, match="--baseline='blurred' does not apply to text"):
    explain.explain(gpt, 'integrated_gradients', 'ROMEO.', baseline='blurred')


@pytest.mark.slow
def test_gpt_text_input_attention_and_next_token(gpt):
  text = 'ROMEO. What light'
  attn = explain.explain(gpt, 'attention', text)
  maps = attn['attention']
  t = len(text)
  assert maps.shape == (1, 2, 2, t, t)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
  assert np.abs(np.triu(maps[0, :, :], 1)).max() == 0  # causal: nothing from later tokens
  nxt = explain.explain(gpt, 'next_token', text)
  logits = gpt.exp.model.apply(jax.device_get(gpt.variables), jnp.asarray(nxt['inputs']))
  np.testing.assert_allclose(nxt['probs'][0], jax.nn.softmax(logits[0, -1]), rtol=1e-5, atol=1e-7)
  assert nxt['target'][0] == nxt['top_tokens'][0, 0]
  ig = explain.explain(gpt, 'integrated_gradients', text, baseline='pad')
  assert ig['attributions'].shape == (1, t) and _relative_gap(ig).max() < 0.01


# ----------------------------------------------------------------------------------------------
# Tabular: SHAP and integrated gradients agree
# ----------------------------------------------------------------------------------------------
def test_shap_and_integrated_gradients_rank_features_alike(mlp):
  out = explain.explain(mlp, 'shap', indices=list(range(16)))
  assert out['shap_values'].shape == (16, 30) and out['integrated_gradients'].shape == (16, 30)
  # SHAP's local accuracy: values sum to f(x) - E f(background)
  logits = mlp.exp.model.apply(jax.device_get(mlp.variables), jnp.asarray(out['inputs']))[:, 0]
  np.testing.assert_allclose(
    out['shap_values'].sum(1), logits - out['shap_base_value'], rtol=1e-3, atol=1e-3
  )
  assert float(out['spearman_global']) > 0.8
  assert float(out['top5_overlap']) >= 0.6


# ----------------------------------------------------------------------------------------------
# Batched, jitted, sharded
# ----------------------------------------------------------------------------------------------
def test_batch_compiles_once_and_equals_examples_one_by_one(cnn):
  scorer, variables = cnn.scorer, cnn.variables
  rows = cnn.eval_rows(list(range(16)))
  x = jnp.asarray(cnn.check_inputs(rows['inputs']))
  target = jnp.asarray(rows['label'], jnp.int32)
  base = jnp.zeros_like(x)
  ig = functools.partial(integrated.integrated_gradients, scorer, variables, steps=16)
  batched = ig(x[:8], target[:8], {}, base[:8])
  size = integrated.integrated_gradients._cache_size()
  again = ig(x[8:], target[8:], {}, base[8:])
  assert integrated.integrated_gradients._cache_size() == size  # a new batch: no recompilation
  assert not np.allclose(batched, again)
  one = ig(x[2:3], target[2:3], {}, base[2:3])
  np.testing.assert_allclose(batched[2:3], one, rtol=1e-4, atol=1e-6)
  chunked = ig(x[:8], target[:8], {}, base[:8], batch_steps=4)
  np.testing.assert_allclose(chunked, batched, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_eight_device_mesh_equals_one_device(cnn, cnn_dir):
  eight = explain.load_run(cnn_dir)  # the run's mesh config (data=-1) over all 8 devices
  assert len(eight.exp.mesh.devices.ravel()) == 8 and len(cnn.exp.mesh.devices.ravel()) == 1
  for method in ('smoothgrad', 'gradcam'):
    a = explain.explain(eight, method, indices=list(range(8)), num_samples=4)
    b = explain.explain(cnn, method, indices=list(range(8)), num_samples=4)
    key = 'attributions' if method == 'smoothgrad' else 'maps'
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Similarity measures of the sanity checks
# ----------------------------------------------------------------------------------------------
def test_similarity_measures():
  rng = np.random.default_rng(0)
  a = rng.random((3, 28, 28))
  np.testing.assert_allclose(similarity.ssim(a, a), 1.0)
  np.testing.assert_allclose(similarity.spearman(a, 2 * a + 1), 1.0)
  np.testing.assert_allclose(similarity.spearman(a, -a), -1.0)
  b = rng.random((3, 28, 28))
  assert np.all(similarity.ssim(a, b) < 0.2) and np.all(np.abs(similarity.spearman(a, b)) < 0.2)


# ----------------------------------------------------------------------------------------------
# Errors and the CLI
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_user_errors(cnn, mlp, tmp_path):
  with pytest.raises(UserError, match=r'shape \(2, 32, 32, 3\) do not fit .* \(B, 28, 28, 1\)'):
    explain.explain(cnn, 'saliency', np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(UserError, match='dtype int64 do not fit'):
    explain.explain(cnn, 'saliency', np.zeros((2, 28, 28, 1), np.int64))
  with pytest.raises(UserError, match='--method=gradcam does not apply to .* mlp run'):
    explain.explain(mlp, 'gradcam', indices=[0])
  with pytest.raises(UserError, match='--inputs is text but .* takes image inputs'):
    explain.explain(cnn, 'saliency', 'a digit')
  with pytest.raises(UserError, match="--method='lime' is unknown"):
    explain.explain(mlp, 'lime', indices=[0])
  with pytest.raises(UserError, match='outside the eval split'):
    explain.explain(mlp, 'saliency', indices=[10_000])
  with pytest.raises(UserError, match='--baseline=.*blurred.* needs images'):
    explain.explain(mlp, 'integrated_gradients', indices=[0], baseline='blurred')
  (tmp_path / 'config.json').write_text(open(os.path.join(cnn.workdir, 'config.json')).read())
  with pytest.raises(UserError, match='holds no checkpoint yet'):
    explain.load_run(str(tmp_path))


@pytest.mark.slow
def test_cli_writes_npz_and_png_equal_to_the_api(cnn, tmp_path):
  for method in ('integrated_gradients', 'gradcam'):
    cli.main(
      [
        'bigjax-explain',
        f'--workdir={cnn.workdir}',
        f'--method={method}',
        '--inputs=0:8',
        f'--outdir={tmp_path}',
      ]
    )
    saved = np.load(tmp_path / f'{method}.npz')
    api = explain.explain(cnn, method, indices=list(range(8)))
    key = 'attributions' if method == 'integrated_gradients' else 'maps'
    assert saved[key].shape == ((8, 28, 28, 1) if key == 'attributions' else (8, 3, 3))
    np.testing.assert_allclose(saved[key], api[key], rtol=1e-5, atol=1e-7)
    assert (tmp_path / f'{method}.png').read_bytes()[:4] == b'\x89PNG'


def test_cli_image_file_input(cnn, tmp_path):
  from PIL import Image

  digit = (cnn.exp.eval_arrays['inputs'][3][..., 0]).astype(np.uint8)
  Image.fromarray(digit).save(tmp_path / 'digit.png')
  kwargs = cli.parse_inputs(str(tmp_path / 'digit.png'), cnn)
  a = explain.explain(cnn, 'saliency', **kwargs)['attributions']
  b = explain.explain(cnn, 'saliency', indices=[3])['attributions']
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / 'small.png')
  with pytest.raises(UserError, match='is a 20x20 image but the run takes 28x28'):
    cli.parse_inputs(str(tmp_path / 'small.png'), cnn)


def test_cli_user_errors_exit_2_with_one_line(cnn, tmp_path, capsys):
  cases = [
    ([f'--workdir={cnn.workdir}', '--method=next_token'], '--method=next_token does not apply'),
    ([f'--workdir={cnn.workdir}', '--method=saliency', '--inputs=hello'], 'neither eval-split'),
    ([f'--workdir={cnn.workdir}', '--method=saliency', '--inputs=5000'], 'outside the eval split'),
    ([f'--workdir={cnn.workdir}', '--method=gradcam', '--steps=x'], '--steps'),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.main(['bigjax-explain', *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('bigjax: error:') and message in err[0], err


@pytest.mark.slow
def test_console_script_error_exits_2(tmp_path):
  """The installed entry point, in a fresh process: a workdir without a run."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(
    [sys.executable, '-m', 'bigjax.explain.cli', f'--workdir={tmp_path}', '--method=saliency'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == (
    f'bigjax: error: --workdir={tmp_path} holds no config.json; give the workdir of a bigjax run'
  )


def test_gradcam_layers_found(cnn):
  x = jnp.asarray(cnn.check_inputs(cnn.eval_rows([0])['inputs']))
  assert gradcam.feature_map_layers(cnn.exp.model, cnn.variables, x) == [
    'conv_0',
    'conv_1',
    'conv_2',
  ]


def test_saliency_is_jitted_per_shape(cnn):
  x = jnp.asarray(cnn.check_inputs(cnn.eval_rows(list(range(4)))['inputs']))
  t = jnp.zeros(4, jnp.int32)
  gradients.saliency(cnn.scorer, cnn.variables, x, t, {})
  size = gradients.saliency._cache_size()
  gradients.saliency(cnn.scorer, cnn.variables, x + 0.1, t + 1, {})
  assert gradients.saliency._cache_size() == size


# ----------------------------------------------------------------------------------------------
# BERT and ResNet (the text encoder and the batch-norm CNN): the same identities
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bert_integrated_gradients_on_embeddings_complete_and_attention_per_head(tmp_path_factory):
  bert = _load(_train(tmp_path_factory, 'bert_genre', 'smoke,init=none', num_steps=10))
  out = explain.explain(bert, 'integrated_gradients', indices=[0, 1, 2, 3])
  total, diff = out['completeness'].T
  assert np.all(np.abs(diff) > 1e-4)  # small after 10 steps (as for the GPT), but a real gap
  assert _relative_gap(out).max() < 0.01, (total, diff)
  seq_len = bert.exp.config.data.seq_len
  assert out['attributions'].shape == (4, seq_len)
  att = explain.explain(bert, 'attention', indices=[0])
  maps = att['attention']  # (examples, layers, heads, T, S), rows are distributions
  assert maps.shape[0] == 1 and maps.shape[-2:] == (seq_len, seq_len)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_resnet_gradcam_and_integrated_gradients(tmp_path_factory):
  resnet = _load(
    _train(tmp_path_factory, 'cifar10_resnet', 'smoke', num_steps=10, **{'data.name': 'mnist5k'})
  )
  out = explain.explain(resnet, 'gradcam', indices=[0, 1])
  assert out['upsampled'].shape == (2, 28, 28)
  assert np.all(out['maps'] >= 0) and out['maps'].max() > 0
  other = explain.explain(
    resnet, 'gradcam', indices=[0, 1], target=(int(out['target'][0]) + 1) % 10
  )
  assert not np.allclose(other['maps'], out['maps'])  # the map depends on the class explained
  # Batch-norm ResNet: 128 steps (the default) left a 2.7% gap on one digit (measured); 512 steps
  # recover f(x) - f(baseline) to 1%.
  ig = explain.explain(resnet, 'integrated_gradients', indices=[0, 1], steps=512)
  assert _relative_gap(ig).max() < 0.01
