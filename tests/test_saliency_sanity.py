"""The headline of experiments/saliency_sanity/ (Adebayo et al. 2018), loosely, on a CNN trained
briefly: the gradient's (signed) and Grad-CAM's maps decorrelate when every layer is
re-initialised, guided backprop's stay closer to the trained model's; cascading randomisation
replaces one more layer each step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import explain, train
from bigjax.explain import sanity

from conftest import load_config

pytestmark = pytest.mark.slow  # trains a CNN for 150 steps, ~60 s of CPU


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  config = load_config('mnist_cnn', 'smoke')
  config.num_steps = 150
  workdir = tmp_path_factory.mktemp('sanity_cnn')
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  run = explain.load_run(str(workdir), devices=jax.devices()[:1])
  rows = run.eval_rows(list(range(16)))
  x = jnp.asarray(run.check_inputs(rows['inputs']))
  fresh = nn.meta.unbox(run.exp.model.init(jax.random.key(1), x[:1])['params'])
  return run.exp.model, jax.device_get(run.variables), fresh, x, jnp.asarray(rows['label'])


def test_cascade_replaces_layers_from_the_output_down(trained):
  _, variables, fresh, _, _ = trained
  steps = sanity.cascade(variables['params'], fresh)
  assert [name for name, _ in steps] == ['output', 'dense_0', 'conv_2', 'conv_1', 'conv_0']
  for i, (_, params) in enumerate(steps):
    for j, (name, _) in enumerate(steps):
      same = params[name] is fresh[name]
      assert same == (j <= i), (i, name)


def test_gradient_and_gradcam_pass_guided_backprop_fails(trained):
  """Similarity with every layer re-initialised (the last cascading step): the gradient's signed
  map and Grad-CAM decorrelate; guided backprop's stays correlated; gradient x input's |map| stays
  near 1 (the zero background of MNIST is zero in every model's map)."""
  model, variables, fresh, x, target = trained
  final = {}
  for method in ('saliency', 'gradcam', 'guided_backprop', 'grad_x_input'):
    rows = sanity.cascading_similarity(method, model, variables, fresh, x, target)
    final[method] = rows[-1]
  assert abs(final['saliency']['spearman']) < 0.2, final
  assert final['gradcam']['spearman_abs'] < 0.5, final
  assert final['guided_backprop']['spearman'] > final['saliency']['spearman'] + 0.2, final
  assert final['grad_x_input']['spearman_abs'] > 0.9, final
  # and identical models give identical maps
  ref = sanity.maps('saliency', model, variables, x, target)
  np.testing.assert_allclose(sanity.compare(ref, ref)['spearman_abs'], 1.0)
