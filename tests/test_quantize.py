"""bigjax/compress/quantize.py (Qwix): int8 PTQ of a Dense layer within the quantization error
bound, int8 x int8 -> int32 ops, QAT's straight-through gradients, a PTQ run's report, QAT on
the mesh against one device, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import config_lib, experiment, train
from bigjax.compress import quantize
from bigjax.errors import UserError
from bigjax.models import layers

from conftest import load_config


class _Dense(nn.Module):
  """One Dense layer (32 -> 16) with the model zoo's logical axis names."""

  @nn.compact
  def __call__(self, x, train=False):
    return layers.dense(16, ('embed', 'mlp'), name='dense')(x)


class _WithEmbed(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Embed(50, 16, name='embed')(x)
    return layers.dense(4, ('embed', 'mlp'), name='head')(h)


def _cfg(**kw):
  cfg = config_lib.base_config().quantize
  cfg.update(**{'mode': 'ptq', **kw})
  return cfg


def _inputs(seed=0, rows=8):
  """(rows, 32) inputs whose rows all have absmax 5 (so one static scale clips none)."""
  x = np.random.default_rng(seed).normal(size=(rows, 32)).astype(np.float32)
  x[:, 0] = np.where(np.arange(rows) % 2, 5.0, -5.0)
  return jnp.asarray(x)


def test_int8_ptq_of_a_dense_layer_is_within_the_quantization_error_bound():
  model, cfg, x = _Dense(), _cfg(), _inputs()
  params = model.init(jax.random.key(1), x)['params']
  params = nn.meta.unbox(params)
  stats = quantize.calibrate(model, cfg, params, {}, [x, _inputs(1)])
  qparams, nbytes = quantize.quantized_params(model, cfg, params, stats, x)
  ptq = quantize.ptq_model(model, cfg)
  y_q = np.asarray(ptq.apply({'params': qparams}, x), np.float64)
  w, xs = np.asarray(params['dense']['kernel'], np.float64), np.asarray(x, np.float64)
  y = xs @ w + np.asarray(params['dense']['bias'])
  # static activation scale from the calibration batches (absmax 5 in every row), per-channel
  # symmetric weight scales (Qwix maps absmax to 127.5 and clips to 127: still |dv| <= s / 2):
  # |error| <= |x| dw + dx |w| + dx dw with dw = s_w / 2, dx = s_x / 2
  s_x = 5.0 / 127.5
  s_w = np.abs(w).max(axis=0) / 127.5
  q = qparams['dense']
  np.testing.assert_allclose(np.asarray(q['dot_general0_lhs_scale'].array).ravel(), s_x, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q['kernel'].array.scale).ravel(), s_w, rtol=1e-6)
  assert q['kernel'].array.qvalue.dtype == jnp.int8
  bound = (
    np.abs(xs) @ (s_w / 2 * np.ones_like(w)) + (s_x / 2) * np.abs(w).sum(0) + 32 * s_x * s_w / 4
  )
  error = np.abs(y_q - y)
  assert (error <= bound + 1e-5).all(), (error / bound).max()
  assert error.max() > 1e-4  # it did quantize
  assert error.max() < 0.05 * np.abs(y).max()  # ~1% of the output's range
  assert nbytes == 32 * 16 + 16 * 4 + 16 * 4 + 4  # int8 kernel + f32 scales + f32 bias + act scale


def test_int8_ops_accumulate_in_int32():
  model, cfg, x = _Dense(), _cfg(), _inputs()
  params = nn.meta.unbox(model.init(jax.random.key(1), x)['params'])
  qparams, _ = quantize.quantized_params(
    model, cfg, params, quantize.calibrate(model, cfg, params, {}, [x]), x
  )
  ptq = quantize.ptq_model(model, cfg)
  text = jax.jit(lambda p, x: ptq.apply({'params': p}, x)).lower(qparams, x).compile().as_text()
  dots = [line for line in text.splitlines() if ' dot(' in line]
  assert dots and all(line.split('=')[1].strip().startswith('s32[') for line in dots), dots
  assert 's8[' in text


def test_qat_gradients_pass_straight_through():
  """Weight-only int8 QAT of y = x W + b: the forward uses the fake-quantized W, the gradient of
  sum(c * y) with respect to W is x^T c (the rounding's derivative taken as 1); without the
  straight-through estimator it would be 0."""
  model, x = _Dense(), _inputs()
  cfg = _cfg(mode='qat', act_dtype='')
  params = nn.meta.unbox(model.init(jax.random.key(1), x)['params'])
  qat = quantize.qat_model(model, cfg)
  c = jnp.asarray(np.random.default_rng(3).normal(size=(8, 16)), jnp.float32)
  loss, grads = jax.value_and_grad(lambda p: jnp.sum(c * qat.apply({'params': p}, x)))(params)
  w = np.asarray(params['dense']['kernel'])
  # the int8 weights PTQ stores for these params, dequantized: qvalue (32, 16) x scale (1, 16)
  qparams, _ = quantize.quantized_params(model, _cfg(act_dtype=''), params, {}, x)
  kernel = qparams['dense']['kernel'].array
  fake = np.asarray(kernel.qvalue, np.float32) * np.asarray(kernel.scale)
  np.testing.assert_allclose(kernel.scale.ravel(), np.abs(w).max(axis=0) / 127.5, rtol=1e-6)
  want_loss = np.sum(np.asarray(c) * (np.asarray(x) @ fake + np.asarray(params['dense']['bias'])))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)  # forward: quantized weights
  assert not np.allclose(fake, w, rtol=0, atol=1e-7)
  np.testing.assert_allclose(
    grads['dense']['kernel'], np.asarray(x).T @ np.asarray(c), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(grads['dense']['bias'], np.asarray(c).sum(0), rtol=1e-5)


@pytest.mark.slow  # a 20-step run plus calibration, int8 eval and timing: ~30-60 s
def test_ptq_run_reports_int8_accuracy_size_and_speed(tmp_path, one_device):
  config = load_config('mnist_cnn', 'smoke')
  config.quantize.mode = 'ptq'
  report = train.train_and_evaluate(config, str(tmp_path), devices=one_device)['eval']
  assert abs(report['quant_accuracy'] - report['accuracy']) <= 0.02
  assert report['float_bytes'] == 4 * 93_322
  assert 3.5 < report['float_bytes'] / report['quant_bytes'] < 4
  assert report['float_ms'] > 0 and report['quant_ms'] > 0


@pytest.mark.slow  # 2 builds and compiles, one on 8 devices
def test_qat_on_the_mesh_equals_one_device(one_device):
  def steps(devices, mesh=None):
    config = load_config('mnist_cnn', 'smoke')
    config.quantize.mode = 'qat'
    # SGD (see tests/test_prune.py's mesh test) with a small lr: 3 steps stay close to the init.
    config.optim.update(name='sgd', lr=0.01)
    if mesh:
      config.mesh.update(**mesh)
    exp = experiment.build(config, devices)
    state = exp.create_state()
    train_step = exp.compile_train_step()
    losses = []
    for i in range(3):
      state, metrics = train_step(state, exp.to_global(exp.batches.batch(i)))
      losses.append(float(metrics['loss']))
    return jax.device_get(state.params), losses

  ref, ref_losses = steps(one_device)
  got, losses = steps(None, dict(data=2, fsdp=2, tensor=2))
  # Equal up to the int8 grid: a float rounding difference of 1e-7 (summation order) can move an
  # activation across a quantization boundary, which changes it by a whole grid step; the first
  # step's loss (same parameters on both) differed by 8e-5 relative.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4), got, ref)


@pytest.mark.parametrize(
  'model, x, change, message',
  [
    (_Dense(), _inputs(), dict(layers='nothing'), r"config.quantize.layers='nothing' matches no"),
    (
      _WithEmbed(),
      jnp.zeros((2, 3), jnp.int32),
      dict(layers='.*'),
      r"config.quantize.layers='.\*' matches embed, a layer type Qwix does not quantize",
    ),
    (
      _Dense(),
      _inputs(),
      dict(weight_dtype='int2'),
      r"config.quantize.weight_dtype='int2' is unknown",
    ),
    (_Dense(), _inputs(), dict(mode='dynamic'), r"config.quantize.mode='dynamic' is unknown"),
    (_Dense(), _inputs(), dict(calibration='mse'), r"config.quantize.calibration='mse' is unknown"),
  ],
)
def test_bad_quantize_config_is_one_line(model, x, change, message):
  with pytest.raises(UserError, match=message) as e:
    quantize.check(_cfg(**change), model, x)
  assert '\n' not in str(e.value)


def test_weight_only_conv_is_refused_before_anything_runs(one_device):
  config = load_config('mnist_cnn', 'smoke')
  config.quantize.update(mode='ptq', act_dtype='')
  with pytest.raises(UserError, match=r"config.quantize.act_dtype='': Qwix quantizes a conv"):
    experiment.build(config, one_device)
