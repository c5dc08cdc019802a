"""The ImageNet and LM1B configs (configs/imagenet_resnet50.py, imagenet_vit.py, lm1b_gpt.py) at
their smoke size over `tfds.testing.mock_data`: built on 8 fake CPU devices (mesh data=8, the
batch split 8 ways), the train step compiled and one real step taken; the images are streamed,
decoded and cropped per example (mock imagenet2012 images have random sizes)."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax import experiment, steps

from conftest import load_config


@pytest.mark.parametrize(
  'name, loss_at_init',
  [
    pytest.param('imagenet_resnet50', np.log(1000), marks=pytest.mark.slow),
    pytest.param('imagenet_vit', np.log(1000), marks=pytest.mark.slow),
    pytest.param('lm1b_gpt', np.log(260), marks=pytest.mark.slow),
  ],
)
def test_config_takes_one_step_on_mock_data_over_8_devices(name, loss_at_init, tmp_path):
  config = load_config(name, 'smoke')
  config.data.data_dir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=16):
    exp = experiment.build(config, jax.devices()[:8])
    assert exp.mesh.size == 8
    train_step = exp.compile_train_step()
    batch = exp.batches.batch(0)
    if config.data.image_size:
      assert batch['inputs'].shape == (8, 32, 32, 3) and batch['inputs'].dtype == np.uint8
    state = steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
    new, metrics = train_step(state, exp.to_global(batch))
    report = exp.evaluate(exp.compile_eval_step(), new)
  metrics = jax.device_get(metrics)
  assert metrics['finite'] == 1.0
  assert abs(metrics['loss'] - loss_at_init) < 0.5 * loss_at_init  # near chance at init
  assert np.isfinite(report['loss'])
