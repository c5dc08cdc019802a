"""bigjax/ensemble: NLL, Brier, ECE and entropy against hand-computed values, temperature scaling
on an overconfident model, N identical members equal one member (eval and training), the members
axis on the mesh, bigjax-ensemble's combination and MC dropout, and bad input."""

import json
import os

import jax
import numpy as np
import pytest
from test_attacks import digits_cnn

from bigjax import experiment, train
from bigjax.ensemble import combine, members, uncertainty
from bigjax.errors import UserError

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05]])
LABELS = np.array([0, 1, 0, 1])


def test_metrics_equal_hand_computed_values():
  r = uncertainty.report(PROBS, LABELS)
  # NLL: -(log .7 + log .1 + log .4 + log .9) / 4
  assert r['nll'] == pytest.approx(-(np.log(0.7) + np.log(0.1) + np.log(0.4) + np.log(0.9)) / 4)
  # Brier: (0.09+0.04+0.01) + (0.01+0.81+0.64) + (0.36+0.1225+0.0625) + (0.0025+0.01+0.0025)
  assert r['brier'] == pytest.approx((0.14 + 1.46 + 0.545 + 0.015) / 4)
  # ECE, 15 bins of width 1/15: confidences .7 (bin 10, right), .8 (bin 11, wrong), .4 (bin 5,
  # right), .9 (bin 13, right): each bin holds one example, |acc - conf| = .3, .8, .6, .1
  assert r['ece'] == pytest.approx((0.3 + 0.8 + 0.6 + 0.1) / 4)
  ent = lambda p: -np.sum(np.array(p) * np.log(p))
  want = np.mean([ent(p) for p in PROBS])
  assert r['entropy'] == pytest.approx(want)
  # two examples in one bin: |mean acc - mean conf| weighted by the bin's share
  assert uncertainty.ece(np.array([[0.70, 0.30], [0.72, 0.28]]), np.array([0, 1])) == (
    pytest.approx(abs(0.5 - 0.71))
  )
  # binary P(label = 1) columns are the two classes [1 - p, p]
  binary = uncertainty.report(np.array([[0.9], [0.2]]), np.array([1, 1]))
  assert binary['nll'] == pytest.approx(-(np.log(0.9) + np.log(0.2)) / 2)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model(tmp_path):
  """Logits of a 70%-accurate classifier multiplied by 8: the fitted T (on a held-out half) is
  > 2 and lowers the NLL and ECE of the other half by more than half; accuracy is unchanged."""
  rng = np.random.default_rng(0)
  n, k = 4000, 10
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k))
  right = rng.uniform(size=n) < 0.7
  logits[np.arange(n), np.where(right, labels, (labels + 1) % k)] += 2.5
  probs = np.exp(8 * logits - (8 * logits).max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  fit, test = slice(0, n // 2), slice(n // 2, n)
  t = uncertainty.fit_temperature(probs[fit], labels[fit])
  assert t > 2, t
  before, after = uncertainty.report(probs[test], labels[test]), None
  calibrated = uncertainty.with_temperature(probs[test], t)
  after = uncertainty.report(calibrated, labels[test])
  assert after['nll'] < 0.5 * before['nll'], (before, after)
  assert after['ece'] < 0.5 * before['ece'], (before, after)
  np.testing.assert_array_equal(calibrated.argmax(1), probs[test].argmax(1))
  uncertainty.reliability_diagram(calibrated, labels[test], str(tmp_path / 'r.png'), 'T')
  assert (tmp_path / 'r.png').stat().st_size > 5000


def _ensemble_config(n, **kw):
  config = digits_cnn()
  config.ensemble.update(members=n, **kw)
  config.optim.clip_norm = 0.0  # global-norm clipping would couple the members
  return config


@pytest.mark.slow  # >40 s on 2 busy cores: out of the default run (CI runs -m slow)
def test_identical_members_equal_one_member(one_device):
  """Members start from their own initialisations; 3 members all holding the single model's
  initial parameters: the same eval probabilities and, after 3 Adam steps, each member's
  parameters equal the single model's (to 1e-6)."""
  single = experiment.build(_ensemble_config(1), one_device)
  ens = experiment.build(_ensemble_config(3), one_device)
  s_state = single.create_state()
  e_state = ens.create_state()
  specs = jax.tree.leaves(ens.abstract.params)
  assert all(p.shape[0] == 3 for p in specs)
  fresh = jax.device_get(e_state.params)
  kernel = lambda m: members.member_params(fresh, m)['conv_0']['kernel']
  assert np.abs(kernel(0) - kernel(1)).max() > 1e-2  # each member its own initialisation
  assert {'nll', 'brier', 'ece', 'entropy'} <= set(ens.task.report_metrics)
  host = jax.device_get(s_state.params)
  stacked = members.stack([host] * 3)
  put = lambda tree, like: jax.tree.map(lambda v, x: jax.device_put(v, x.sharding), tree, like)
  e_state = e_state.replace(params=put(stacked, e_state.params))
  e_state = e_state.replace(opt_state=ens.tx.init(e_state.params))
  s_eval, s_out = single.evaluate(single.compile_eval_step(), s_state, return_outputs=True)
  e_eval, e_out = ens.evaluate(ens.compile_eval_step(), e_state, return_outputs=True)
  np.testing.assert_allclose(e_out, s_out, rtol=1e-5, atol=1e-7)
  assert e_eval['accuracy'] == s_eval['accuracy']
  assert e_eval['nll'] == pytest.approx(s_eval['loss'], rel=1e-5)
  s_step, e_step = single.compile_train_step(), ens.compile_train_step()
  for i in range(3):
    s_state, s_m = s_step(s_state, single.to_global(single.batches.batch(i)))
    e_state, e_m = e_step(e_state, ens.to_global(ens.batches.batch(i)))
    assert float(e_m['loss']) == pytest.approx(3 * float(s_m['loss']), rel=1e-5)  # the sum
  want = jax.device_get(s_state.params)
  for m in range(3):
    got = members.member_params(jax.device_get(e_state.params), m)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.slow  # two builds and compiles, one on 8 devices
def test_members_sharded_over_a_mesh_axis_equal_one_device(one_device):
  config = _ensemble_config(4, mesh_axis='data')
  config.optim.update(name='sgd', lr=0.1)
  ref = _train_steps(config, one_device)
  config.mesh.update(data=4, fsdp=1, tensor=2)
  exp = experiment.build(config)
  spec = exp.shardings.params['member']['conv_0']['kernel'].spec
  assert spec[0] == 'data', spec  # the members axis is split over 'data'
  got = _train_steps(config, None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)


def _train_steps(config, devices, n=3):
  exp = experiment.build(config, devices)
  state = exp.create_state()
  step = exp.compile_train_step()
  for i in range(n):
    state, _ = step(state, exp.to_global(exp.batches.batch(i)))
  return jax.device_get(state.params)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two 150-step digits CNN runs (seeds 0, 1; dropout 0.3) with their eval predictions."""
  root = tmp_path_factory.mktemp('ens_runs')
  out = []
  for seed in (0, 1):
    config = digits_cnn(steps=150)
    config.update(seed=seed, save_eval_predictions=True, checkpoint_every=150)
    config.model.kwargs.dropout = 0.3
    config.data.train_split = 'train[:1200]'
    train.train_and_evaluate(config, str(root / f's{seed}'), devices=jax.devices()[:1])
    out.append(str(root / f's{seed}'))
  return out


@pytest.mark.slow  # two training runs and four rebuilds, ~60 s on 2 busy cores
def test_bigjax_ensemble_averages_the_runs_probabilities(runs, tmp_path, one_device):
  outdir = str(tmp_path / 'ens')
  result = combine.combine(
    runs,
    calibration_split='train[1200:]',
    ood=['rotate90', 'noise'],
    outdir=outdir,
    devices=one_device,
  )
  scores = [np.load(os.path.join(r, 'eval_predictions.npz'))['scores'] for r in runs]
  labels = np.load(os.path.join(runs[0], 'eval_predictions.npz'))['labels']
  want = uncertainty.report(np.mean(scores, axis=0), labels)
  for key, value in want.items():
    assert result['eval'][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
  assert result['calibrated']['temperature'] > 0
  assert result['calibrated']['nll'] <= result['eval']['nll'] + 0.02  # fitted on other data
  # less certain on noise than on digits (rotated digits: see experiments/deep_ensembles)
  assert result['ood']['noise']['entropy'] > result['eval']['entropy'] + 0.1, result
  with open(os.path.join(outdir, 'report.json')) as f:
    assert json.load(f)['members'] == runs
  assert os.path.getsize(os.path.join(outdir, 'reliability_calibrated.png')) > 5000
  mc = combine.combine(runs[:1], mc_dropout=8, devices=one_device)
  single = combine.combine(runs[:1], devices=one_device)
  assert mc['eval']['entropy'] > single['eval']['entropy']  # dropout samples disagree


def test_bad_ensemble_input_is_one_line(one_device, tmp_path):
  cases = [
    (dict(members=0), r'config.ensemble.members=0 must be >= 1'),
    (dict(members=2, mesh_axis='model'), r"config.ensemble.mesh_axis='model' is unknown"),
  ]
  for fields, message in cases:
    n = fields.pop('members')
    with pytest.raises(UserError, match=message) as e:
      experiment.build(_ensemble_config(n, **fields), one_device)
    assert '\n' not in str(e.value)
  config = _ensemble_config(2)
  config.adversarial.method = 'pgd'
  with pytest.raises(UserError, match=r"members=2 does not combine with config.adversarial"):
    experiment.build(config, one_device)
  with pytest.raises(UserError, match=r'holds no config.json'):
    combine.combine([str(tmp_path)], devices=one_device)
  with pytest.raises(UserError, match=r"--ood='blur' is unknown; known input shifts: noise"):
    combine.combine([str(tmp_path)], ood=['blur'], devices=one_device)


def _run_dir(path, **data):
  """A digits CNN 'run' (its config.json only: these refusals come before any checkpoint is
  read), config.data updated from `data`."""
  config = digits_cnn()
  config.data.update(**data)
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json())
  return str(path)


def test_calibration_split_overlapping_a_runs_data_is_one_line(tmp_path, one_device):
  """The runs train on train[:1200] of the 1,437 training digits and are scored on test: a
  calibration split sharing a row with either is refused, naming the rows; train[1200:] is not."""
  run = _run_dir(tmp_path / 'run', train_split='train[:1200]')
  cases = [
    ('train[1000:]', r"config.data.train_split='train\[:1200\]' .* \(rows 1000-1199 of 'train'\)"),
    ('train[80%:]', r"config.data.train_split='train\[:1200\]' .* \(rows 1149-1199 of 'train'\)"),
    ('test[:10]', r"config.data.eval_split='test' .* \(rows 0-9 of 'test'\)"),
  ]
  for split, message in cases:
    with pytest.raises(UserError, match=r'--calibration_split=.* overlaps ' + message) as e:
      combine.combine([run], calibration_split=split, devices=one_device)
    assert '\n' not in str(e.value)
  exp = combine.build(run, one_device)
  combine.check_calibration_split([exp], [run], 'train[1200:]')  # disjoint: accepted


def test_streamed_runs_are_refused_in_one_line(tmp_path, one_device):
  run = _run_dir(tmp_path / 'streamed', load='stream')
  with pytest.raises(UserError, match=r"streams its data .*config.data.load='memory'") as e:
    combine.combine([run], devices=one_device)
  assert '\n' not in str(e.value)


def test_mc_dropout_with_one_sample_is_one_train_mode_forward(one_device):
  """combine.predict with 1 dropout sample: the softmax of one train-mode forward pass whose
  dropout key is fold_in(fold_in(key(seed), batch index), sample 0); 2 samples: the mean of two
  such passes; and dropout is really on (the eval-mode pass differs)."""
  import jax.numpy as jnp

  config = digits_cnn()
  config.model.kwargs.dropout = 0.5
  config.eval_batch_size = 64
  exp = experiment.build(config, one_device)
  state = exp.create_state()
  arrays = {k: v[:64] for k, v in exp.eval_arrays.items()}  # one eval batch: index 0
  x = jnp.asarray(arrays['inputs'], jnp.float32) / 255.0
  variables = {'params': state.params}

  def forward(sample):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 0), sample)
    return jax.nn.softmax(exp.model.apply(variables, x, train=True, rngs={'dropout': key}))

  one = combine.predict(exp, state, arrays, samples=1, seed=7)
  np.testing.assert_allclose(one, forward(0), rtol=1e-5, atol=1e-7)
  two = combine.predict(exp, state, arrays, samples=2, seed=7)
  np.testing.assert_allclose(two, (forward(0) + forward(1)) / 2, rtol=1e-5, atol=1e-7)
  plain = combine.predict(exp, state, arrays)
  assert np.abs(one - plain).max() > 1e-3


def test_in_step_ensemble_run_writes_its_reliability_diagram(tmp_path, one_device):
  """config.ensemble.members = 2: the run's final eval also draws workdir/reliability.png of the
  members' mean probabilities (what bigjax-ensemble draws for separate runs)."""
  config = _ensemble_config(2)
  config.update(num_steps=2, checkpoint_every=2, log_every=2)
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  assert 'ece' in results['eval']
  assert os.path.getsize(tmp_path / 'reliability.png') > 5000
