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
  stats = quantize.calibrate(model, cfg, params, {}, [{'inputs': x}, {'inputs': _inputs(1)}])
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
    model, cfg, params, quantize.calibrate(model, cfg, params, {}, [{'inputs': x}]), x
  )
  ptq = quantize.ptq_model(model, cfg)
  text = jax.jit(lambda p, x: ptq.apply({'params': p}, x)).lower(qparams, x).compile().as_text()
  dots = [line for line in text.splitlines() if ' dot(' in line]
  assert dots and all(line.split('=')[1].strip().startswith('s32[') for line in dots), dots
  assert 's8[' in text


class _Conv(nn.Module):
  """One 3x3 conv, 3 -> 4 channels."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(4, (3, 3), name='conv')(x)


def test_int8_convolutions_are_integer_convolutions_into_s32():
  """The lowered program asks for an i8 x i8 -> i32 convolution. XLA:CPU has no int8
  convolution kernel: the compiled convolution runs on s8 values widened to s32 (an integer conv
  accumulating in s32, not a float one; so int8 convs are not faster on this CPU)."""
  model, cfg = _Conv(), _cfg()
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
  params = nn.meta.unbox(model.init(jax.random.key(1), x)['params'])
  stats = quantize.calibrate(model, cfg, params, {}, [{'inputs': x}])
  qparams, _ = quantize.quantized_params(model, cfg, params, stats, x)
  ptq = quantize.ptq_model(model, cfg)
  lowered = jax.jit(lambda p, x: ptq.apply({'params': p}, x)).lower(qparams, x)
  convs = [line for line in lowered.as_text().splitlines() if 'stablehlo.convolution' in line]
  assert len(convs) == 1 and convs[0].endswith(
    '(tensor<2x8x8x3xi8>, tensor<3x3x3x4xi8>) -> tensor<2x8x8x4xi32>'
  ), convs
  compiled = lowered.compile().as_text()
  types = {}  # instruction name -> its result type, e.g. 's32'
  for line in compiled.splitlines():
    if ' = ' in line and line.strip().removeprefix('ROOT ').startswith('%'):
      name, rest = line.strip().removeprefix('ROOT ').split(' = ', 1)
      types[name] = rest.split('[')[0].strip()
  convs = [line.strip() for line in compiled.splitlines() if ' convolution(' in line]
  assert len(convs) == 1, convs
  result = convs[0].split(' = ', 1)[1]
  operands = result.split('convolution(')[1].split(')')[0].split(', ')
  assert result.startswith('s32['), convs
  assert all(types[o] in ('s8', 's32') for o in operands), (operands, convs)
  assert 's8[' in compiled


def _weight_error(dtype):
  """(float kernel w (32, 16), dequantized weight-only PTQ kernel, scales (16,), output error
  (8, 16), |x| @ |w - dequantized| (8, 16)) of the _Dense layer."""
  model, x = _Dense(), _inputs()
  params = nn.meta.unbox(model.init(jax.random.key(1), x)['params'])
  cfg = _cfg(act_dtype='', weight_dtype=dtype)
  qparams, _ = quantize.quantized_params(model, cfg, params, {}, x)
  kernel = qparams['dense']['kernel'].array
  w = np.asarray(params['dense']['kernel'], np.float64)
  dq = np.asarray(jnp.asarray(kernel.qvalue, jnp.float32), np.float64) * np.asarray(kernel.scale)
  y = np.asarray(model.apply({'params': params}, x), np.float64)
  y_q = np.asarray(quantize.ptq_model(model, cfg).apply({'params': qparams}, x), np.float64)
  bound = np.abs(np.asarray(x, np.float64)) @ np.abs(w - dq)
  return w, dq, np.asarray(kernel.scale).ravel(), np.abs(y_q - y), bound


def test_int4_and_fp8_weight_only_ptq_are_within_their_rounding_bounds():
  """int4: per-channel scale absmax / 7.5, integers in [-8, 7], each weight within half a step;
  fp8 (e4m3fn, 3 mantissa bits): scale absmax / 448, each weight within 2^-4 of itself (plus half
  a subnormal step, 2^-10 scales). Either way the layer's output error is at most |x| @ |dw|."""
  w, dq, s, error, bound = _weight_error('int4')
  np.testing.assert_allclose(s, np.abs(w).max(axis=0) / 7.5, rtol=1e-6)
  assert np.abs(dq / s).max() <= 8 and (np.abs(dq - w) <= s / 2 * (1 + 1e-5)).all()
  assert (error <= bound + 1e-5).all() and error.max() > 0.01  # int4 is coarse
  w, dq, s, error8, bound = _weight_error('fp8')
  np.testing.assert_allclose(s, np.abs(w).max(axis=0) / 448, rtol=1e-6)
  assert (np.abs(dq - w) <= 2**-4 * np.abs(w) + 2**-10 * s * (1 + 1e-5)).all()
  assert (error8 <= bound + 1e-5).all() and 0 < error8.max() < error.max()


def test_minmax_calibration_fits_skewed_activations_better_than_absmax():
  """Inputs in [-1, 3]: minmax takes the scale (max - min) / 255 and a zero point that maps min
  to -128; absmax takes max |x| / 127.5. The minmax layer's output error is the smaller, and both
  stay within the error bound of their own activation step."""
  model = _Dense()
  x = np.random.default_rng(0).uniform(-1, 3, (8, 32)).astype(np.float32)
  x[:, 0], x[:, 1] = -1.0, 3.0  # every row spans [-1, 3]: Qwix averages per-example min / max
  x, lo, hi = jnp.asarray(x), -1.0, 3.0
  params = nn.meta.unbox(model.init(jax.random.key(1), x)['params'])
  w, xs = np.asarray(params['dense']['kernel'], np.float64), np.asarray(x, np.float64)
  y = xs @ w + np.asarray(params['dense']['bias'])
  errors = {}
  for method, s_x in (('minmax', (hi - lo) / 255), ('absmax', max(hi, -lo) / 127.5)):
    cfg = _cfg(calibration=method)
    stats = quantize.calibrate(model, cfg, params, {}, [{'inputs': x}])
    qparams, _ = quantize.quantized_params(model, cfg, params, stats, x)
    q = qparams['dense']
    np.testing.assert_allclose(
      np.asarray(q['dot_general0_lhs_scale'].array).ravel(), s_x, rtol=1e-5
    )
    if method == 'minmax':
      zero = float(np.asarray(q['dot_general0_lhs_zero_point']).ravel()[0])
      assert abs(lo / s_x + zero - (-128)) <= 0.5 + 1e-4, zero
    y_q = np.asarray(quantize.ptq_model(model, cfg).apply({'params': qparams}, x), np.float64)
    s_w = np.abs(w).max(axis=0) / 127.5
    bound = (
      np.abs(xs) @ (s_w / 2 * np.ones_like(w)) + (s_x / 2) * np.abs(w).sum(0) + 32 * s_x * s_w / 4
    )
    errors[method] = np.abs(y_q - y)
    assert (errors[method] <= bound + 1e-5).all(), (method, (errors[method] / bound).max())
  # activation steps 4/255 vs 3/127.5 (0.67x); the weights' rounding is shared: measured 0.81x
  assert errors['minmax'].mean() < 0.9 * errors['absmax'].mean(), {
    k: v.mean() for k, v in errors.items()
  }


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
    (
      _Dense(),
      _inputs(),
      dict(weight_dtype='int4', act_dtype='int4'),
      r"config.quantize.act_dtype='int4' with weight_dtype='int4': XLA cannot compile",
    ),
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


# ----------------------------------------------------------------------------------------------
# A language model: weight-only PTQ of a GPT's stack (the byte embedding stays float)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def gpt_run(tmp_path_factory):
  """(workdir, final eval report) of gpt_shakespeare:smoke trained 10 steps with weight-only int8
  PTQ of its transformer stack: the run's own report quantizes it (task.prepare turns the
  (B, 33) windows into (B, 32) inputs and targets first)."""
  workdir = str(tmp_path_factory.mktemp('gpt_ptq'))
  config = load_config('gpt_shakespeare', 'smoke')
  config.num_steps = 10
  config.quantize.update(mode='ptq', act_dtype='', layers='stack.*')
  return workdir, train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])['eval']


def _dequantized(qparams):
  """A weight-only PTQ param tree -> float params: qvalue * scale for each quantized kernel."""
  return jax.tree.map(
    lambda x: (
      jnp.asarray(x.array.qvalue, jnp.float32) * x.array.scale if quantize._is_quantized(x) else x
    ),
    qparams,
    is_leaf=quantize._is_quantized,
  )


@pytest.mark.slow  # builds the Shakespeare data and trains a GPT for 10 steps: ~50 s
def test_gpt_run_reports_weight_only_int8(gpt_run):
  _, report = gpt_run
  # measured: loss 3.91716 float, 3.91723 int8 (10-step model, logits within +-1.6)
  assert abs(report['quant_loss'] - report['loss']) < 1e-3, report
  # kernels at 1 byte + per-channel scales; the 260 x 32 and 32 x 32 embeddings stay float32
  assert report['quant_bytes'] < 0.55 * report['float_bytes'], report


# Measured max |logit difference| / max |logit| on one eval batch: int8 1.1e-3, fp8 4.6e-3,
# int4 1.6e-2; the bounds leave 5x / 3x room, and int4 must be coarser than int8.
PTQ_LOGIT_BOUND = {'int8': 0.005, 'fp8': 0.02, 'int4': 0.05}


@pytest.mark.slow  # three quantizations of the gpt_run above: ~20 s
def test_gpt_weight_only_ptq_logits_int8_fp8_int4(gpt_run):
  """For each weight type: the PTQ model's logits equal the float model's run on the
  dequantized weights (qvalue * scale, to float rounding: weight-only quantization is exactly
  that), and lie within PTQ_LOGIT_BOUND of the float logits."""
  from bigjax import checkpoint, config_lib, steps

  workdir, _ = gpt_run
  params = jax.tree.map(jnp.asarray, checkpoint.load_latest(f'{workdir}/checkpoints')[1]['params'])
  errors = {}
  for dtype, bound in PTQ_LOGIT_BOUND.items():
    config = config_lib.saved_config(f'{workdir}/config.json')
    config.quantize.weight_dtype = dtype
    exp = experiment.build(config, jax.devices()[:1])
    base, ptq, qvariables, _ = quantize.quantize_run(exp, params, {})
    batch = quantize.prepared(exp, next(exp.eval_batches()))
    assert batch['inputs'].shape == (config.eval_batch_size, 32)
    logits = np.asarray(steps.apply_model(base, {'params': params}, batch, train=False))
    quantized = np.asarray(steps.apply_model(ptq, qvariables, batch, train=False))
    dequantized = steps.apply_model(
      base, {'params': _dequantized(qvariables['params'])}, batch, train=False
    )
    np.testing.assert_allclose(quantized, dequantized, rtol=0, atol=1e-5)
    errors[dtype] = np.abs(quantized - logits).max() / np.abs(logits).max()
    assert 1e-5 < errors[dtype] < bound, (dtype, errors)
  assert errors['int4'] > 3 * errors['int8'], errors


@pytest.mark.slow  # exports the gpt_run above: ~15 s
def test_gpt_quantized_export_holds_int8_kernels_and_float_embeddings(gpt_run, tmp_path, capsys):
  from bigjax import checkpoint, export

  workdir, _ = gpt_run
  export.main(['bigjax-export', f'--workdir={workdir}', f'--to={tmp_path}', '--quantized'])
  assert 'quantized.npz' in capsys.readouterr().out
  params = checkpoint.load_latest(f'{workdir}/checkpoints')[1]['params']
  flat = {
    '/'.join(k.key for k in p): np.asarray(x)
    for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  with np.load(tmp_path / 'quantized.npz') as f:
    arrays = dict(f)
  kernels = [n for n in flat if n.startswith('stack/') and n.endswith('/kernel')]
  assert len(kernels) == 12  # 2 layers x (query, key, value, out, wi, wo)
  for name in kernels:
    q, scale = arrays[f'{name}.qvalue'], arrays[f'{name}.scale']
    assert q.dtype == np.int8 and q.shape == flat[name].shape, name
    err = np.abs(q * scale - flat[name])
    assert (err <= 0.5 * np.broadcast_to(scale, err.shape) * (1 + 1e-4)).all(), name
  for name in ('embed/embedding', 'stack/layer_0/attention_norm/scale'):  # not quantized
    np.testing.assert_array_equal(arrays[name], flat[name])
