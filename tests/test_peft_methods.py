"""The other config.peft methods (bigjax/peft/ia3.py, adapter.py) on the smoke Llama: each is
the base model exactly at step 0, only its parameters train (every frozen parameter bitwise
unchanged) and the loss falls by a stated amount; IA3's merged weights equal the adapted model,
and adapters (non-linear) have no merged form."""

import functools

import jax
import numpy as np
import pytest

from bigjax import experiment
from bigjax.errors import UserError
from bigjax.peft import common

from conftest import load_config

METHODS = {
  # IA3's placement (keys, values and the MLP's output layer, scaled on its input side) plus the
  # head: on a random base only the head's scales can learn much (the vocabulary's frequencies)
  'ia3': dict(target='(key|value|mlp/wo|lm_head)/kernel'),
  # Houlsby's placement (after the attention output projection and after the MLP), plus the head
  'adapter': dict(target='(self_attention/out|mlp/wo|lm_head)/kernel', bottleneck=8),
  # rank 4 pruned to 2 on average over q, v (2 layers) and the head: budget 20 -> 10 between
  # steps 4 and 30 - 8, a mask every 3 steps, then fixed
  'adalora': dict(
    target='(query|value|lm_head)/kernel',
    rank=4,
    alpha=8.0,
    adalora=dict(target_rank=2, tinit=4, tfinal=8, delta_t=3),
  ),
}
NAMES = {
  'adalora': {'adalora_p', 'adalora_lambda', 'adalora_q'},
  'ia3': {'ia3_scale'},
  'adapter': {'adapter_down', 'adapter_down_bias', 'adapter_up', 'adapter_up_bias'},
}


@functools.cache
def _run(method):
  """(experiment, initial params, final params, losses, nonzero lambdas after each step) of 30
  steps."""
  config = load_config('llama_shakespeare', 'smoke')
  config.peft.update(method=method, **METHODS[method])
  config.num_steps = 30
  # larger steps than the smoke config's 1e-2: IA3's scales around 1, AdaLoRA's N(0, 0.02) P, Q
  config.optim.lr = {'ia3': 0.1, 'adalora': 0.05}.get(method, config.optim.lr)
  exp = experiment.build(config, jax.devices()[:1])
  state = exp.create_state()
  initial = jax.device_get(state.params)
  step = exp.compile_train_step()
  losses, ranks = [], []
  for i in range(30):
    state, metrics = step(state, exp.to_global(exp.batches.batch(i)))
    losses.append(float(metrics['loss']))
    lambdas = [v for k, v in common.flat(state.params).items() if k.endswith('adalora_lambda')]
    ranks.append([np.asarray(v) != 0 for v in lambdas])
  return exp, initial, jax.device_get(state.params), losses, ranks


def _logits(model, params, exp):
  tokens = exp.eval_arrays['inputs'][:4, :-1]
  return np.asarray(jax.jit(model.apply)({'params': params}, tokens))


# one compiled 30-step run per method (~12 s each idle): adalora in the default pass (its run is
# shared with the budget test), the others in the slow pass
@pytest.mark.parametrize(
  'method', [pytest.param(m, marks=[] if m == 'adalora' else pytest.mark.slow) for m in METHODS]
)
def test_method_is_the_base_at_init_and_trains_only_its_parameters(method):
  exp, initial, final, losses, _ = _run(method)
  assert {k.rsplit('/', 1)[1] for k in exp.peft.trainable} == NAMES[method]
  _, frozen = exp.peft.split(initial)
  base = _logits(common.base_model(exp.model), common.unflat(frozen), exp)
  np.testing.assert_array_equal(_logits(exp.model, initial, exp), base)  # bitwise at step 0
  before, after = common.flat(initial), common.flat(final)
  for k in before:
    if not exp.peft.is_trainable(k):
      assert before[k].tobytes() == after[k].tobytes(), k
  moved = [k for k in exp.peft.trainable if np.any(after[k] != before[k])]
  pruned = {k for k in exp.peft.trainable if k.endswith('adalora_lambda') and not np.any(after[k])}
  assert set(moved) == set(exp.peft.trainable) - pruned  # AdaLoRA: a module may lose every rank
  print(method, 'loss', np.mean(losses[:5]), '->', np.mean(losses[-5:]))
  # From the random base at ln(260) = 5.56 nats (first and last 5 of 30 steps); measured:
  # ia3 5.56 -> 5.43 (scales of random features: little to learn), adapter 5.49 -> 3.37,
  # adalora 5.57 -> 3.51.
  assert (
    np.mean(losses[-5:])
    < np.mean(losses[:5]) - {'ia3': 0.1, 'adapter': 1.5, 'adalora': 1.5}[method]
  ), losses


@pytest.mark.slow  # the ia3 run
def test_ia3_merged_weights_equal_the_adapted_model():
  exp, _, final, _, _ = _run('ia3')
  merged = common.merged_params(exp.config.peft, final)
  adapted = _logits(exp.model, final, exp)
  assert np.abs(adapted - _logits(common.base_model(exp.model), merged, exp)).max() <= (
    1e-5 * np.abs(adapted).max()
  )


@pytest.mark.slow  # the adapter run
def test_adapters_have_no_merged_form():
  exp, _, final, _, _ = _run('adapter')
  with pytest.raises(UserError, match="config.peft.method='adapter' adds computation"):
    common.merged_params(exp.config.peft, final)


def test_adalora_total_rank_follows_the_budget_schedule():
  """Zhang et al. 2023 eq. 11 with b0 = 4 x 5 = 20, bT = 2 x 5 = 10, tinit 4, tfinal 8, T 30:
  all 20 singular values until step 4, then b(t) = 10 + 10 (1 - (t - 4) / 18)^3 kept at every
  third step, 10 from step 23 on with one fixed set."""
  exp, _, _, _, ranks = _run('adalora')
  spec = exp.peft.spec
  budgets = [int(spec.budget(t, 30, 5)[0]) for t in range(1, 31)]
  cubic = lambda t: 20 if t <= 4 else 10 if t > 22 else int(10 + 10 * (1 - (t - 4) / 18) ** 3)
  assert budgets == [cubic(t) for t in range(1, 31)]
  assert budgets[9] == 12 and budgets[21] == 10  # steps 10 and 22
  masked = [t for t in range(1, 31) if bool(spec.budget(t, 30, 5)[1])]
  assert masked == [6, 9, 12, 15, 18, 21] + list(range(23, 31))
  for t in masked:
    assert sum(int(r.sum()) for r in ranks[t - 1]) == budgets[t - 1], t
  final = ranks[22]
  for later in ranks[23:]:  # the final mask is fixed: the same singular values stay
    assert all(np.array_equal(a, b) for a, b in zip(final, later, strict=True))


def _adalora_modules(params) -> dict:
  """{module: {'adalora_p' | 'adalora_lambda' | 'adalora_q': array}} of a params tree."""
  out: dict = {}
  for k, v in common.flat(params).items():
    module, name = k.rsplit('/', 1)
    if name in NAMES['adalora']:
      out.setdefault(module, {})[name] = v
  return out


def _stacked(params) -> dict:
  """An unscanned stack's params ('stack/layer_i/...') as a scanned one's ('stack/layers/...')."""
  flat = common.flat(params)
  out = {k: v for k, v in flat.items() if '/layer_' not in k}
  for k in sorted(k for k in flat if k.startswith('stack/layer_0/')):
    layers = [flat[k.replace('layer_0/', f'layer_{i}/')] for i in range(2)]
    out[k.replace('layer_0/', 'layers/')] = np.stack(layers)
  return common.unflat(out)


@pytest.mark.slow  # two builds, compiles and 6 steps each: ~60 s on the loaded 2-core machine
def test_adalora_of_a_scanned_stack_equals_the_unscanned_one():
  """A scanned stack's AdaLoRA counts each layer's modules, as PEFT's per-layer modules are: the
  budget (b0 = 4 x 4 modules, not 4 x 2), the orthogonality regulariser (a mean over the 4, not L
  times it) and 6 pruning steps from the same parameters equal the unscanned model's."""
  from bigjax.peft import adalora

  exps, states = {}, {}
  for scan in (False, True):
    config = load_config('llama_shakespeare', 'smoke')
    config.model.kwargs.scan = scan
    config.peft.update(
      method='adalora',
      target='(query|value)/kernel',
      rank=4,
      alpha=8.0,
      adalora=dict(target_rank=2, tinit=1, tfinal=2, delta_t=1),
    )
    config.update(num_steps=6)
    config.optim.lr = 0.05
    exps[scan] = experiment.build(config, jax.devices()[:1])
  unscanned = exps[False].create_state()
  params = jax.device_get(unscanned.params)
  rng = np.random.default_rng(0)  # non-zero lambdas: the regulariser and importance see them
  flat = common.flat(params)
  for k in flat:
    if k.endswith('adalora_lambda'):
      flat[k] = rng.normal(0, 0.1, flat[k].shape).astype(np.float32)
  params = common.unflat(flat)
  stacked = _stacked(params)
  states[False] = unscanned.replace(params=params, opt_state=exps[False].tx.init(params))
  states[True] = exps[True].create_state()
  states[True] = states[True].replace(params=stacked, opt_state=exps[True].tx.init(stacked))
  mods = {scan: _adalora_modules(states[scan].params) for scan in (False, True)}
  assert adalora.num_modules(mods[False]) == adalora.num_modules(mods[True]) == 4
  spec = exps[True].peft.spec
  assert int(spec.budget(0, 6, adalora.num_modules(mods[True]))[0]) == 16  # b0 = r x 4 modules
  np.testing.assert_allclose(
    adalora.orthogonality(mods[True]), adalora.orthogonality(mods[False]), rtol=1e-6
  )
  losses = {}
  for scan in (False, True):
    step, state = exps[scan].compile_train_step(), states[scan]
    losses[scan] = []
    for i in range(6):
      state, metrics = step(state, exps[scan].to_global(exps[scan].batches.batch(i)))
      losses[scan].append(float(metrics['loss']))
    states[scan] = state
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  want, got = (
    common.flat(_stacked(jax.device_get(states[False].params))),
    common.flat(jax.device_get(states[True].params)),
  )
  kept = sum(int(np.sum(got[k] != 0)) for k in got if k.endswith('adalora_lambda'))
  assert kept == 2 * 4  # the final budget: target rank 2 x 4 modules
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
