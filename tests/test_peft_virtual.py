"""Prompt tuning and prefix tuning (bigjax/peft/prompt.py, prefix.py; the models' hook:
bigjax/models/virtual_tokens.py).

Neither can be a no-op at step 0 (virtual tokens take attention weight), so what is checked
instead is that the base model's own computation is unchanged around them: prompt tuning whose
P embeddings are the token embeddings of P real tokens v gives the base model's logits on [v; x]
for x (positions shifted by P, every token attending v, the virtual rows' outputs dropped, BERT
pooling the first row), and prefix tuning whose prefixes are the base's own keys/values of v in
[v; x] (rotated, where the model rotates) gives the same; for gpt (learned and rotary positions),
llama (grouped-query) and bert. Also: logits equal HF PEFT's PromptTuning / PrefixTuning logits
on a tiny random Llama (GQA) and GPT-2 with the PEFT weights imported through
config.peft.init_from (<= 1e-4 relative); KV-cache decoding equals the full forward (and greedy
generation its argmax); only the virtual tokens train (every frozen parameter bitwise unchanged);
bad fields are one-line errors.
"""

import functools
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft as hf_peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bigjax import experiment, init_from  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from bigjax.models import attention, bert, gpt, llama  # noqa: E402
from bigjax.models.generate import generate  # noqa: E402
from bigjax.peft import common, prefix, prompt  # noqa: E402

from conftest import load_config, tiny_gpt2  # noqa: E402

torch.set_num_threads(1)
P = 3  # virtual tokens
MODELS = {
  'gpt': lambda: gpt.Model(vocab_size=50, num_layers=2, num_heads=2, embed_dim=16, max_len=16),
  'gpt_rotary': lambda: gpt.Model(
    vocab_size=50, num_layers=2, num_heads=2, embed_dim=16, max_len=16, positions='rotary'
  ),
  'llama': lambda: llama.Model(
    vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=16, max_len=16
  ),
  'llama_scan': lambda: llama.Model(
    vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=16, max_len=16, scan=True
  ),
  'bert': lambda: bert.Model(
    vocab_size=50, num_layers=2, num_heads=2, embed_dim=16, max_len=16, pad_id=49, dropout=0.0
  ),
}
X = np.random.default_rng(0).integers(0, 48, (1, 6))
V = np.random.default_rng(1).integers(0, 48, (1, P))


def _init(model, tokens=X, key=0):
  return nn.meta.unbox(model.init(jax.random.key(key), tokens)['params'])


def _key_value_modules(flat_params):
  return frozenset(
    k.rsplit('/', 1)[0]
    for k in flat_params
    if k.endswith(('self_attention/key/kernel', 'self_attention/value/kernel'))
  )


def _adapted(model, method):
  """(adapted model, its parameter names beyond the base's)."""
  flat = common.flat(_init(model))
  if method == 'prompt':
    spec = prompt.Spec(P)
  else:
    spec = prefix.Spec(_key_value_modules(flat), P)
  adapted = common.adapt(model, spec)
  new = set(common.flat(_init(adapted))) - set(flat)
  return adapted, new


def _base_keys_values(model, params, rotary: bool):
  """{key/value module: the base's own (P, K, H) outputs at the rows of V in [V; X]}, keys
  rotated by positions 0..P-1 where the model rotates them (as the attention layer does). A
  scanned stack's (L, P, K, H) come from the same model unscanned (intermediates are not
  collected through nn.scan)."""
  if model.scan:
    flat = common.flat(params)
    layers = {k: v for k, v in flat.items() if k.startswith('stack/layers/')}
    unscanned = {k: v for k, v in flat.items() if k not in layers}
    for k, v in layers.items():
      for i in range(v.shape[0]):
        unscanned[k.replace('stack/layers/', f'stack/layer_{i}/')] = v[i]
    per_layer = _base_keys_values(model.clone(scan=False), common.unflat(unscanned), rotary)
    stacked = {k.replace('stack/layer_0/', 'stack/layers/') for k in per_layer if 'layer_0/' in k}
    return {
      k: np.stack([per_layer[k.replace('stack/layers/', f'stack/layer_{i}/')] for i in range(2)])
      for k in stacked
    }
  tokens = np.concatenate([V, X], 1)
  pick = lambda m, name: name == '__call__' and m.name in ('key', 'value')
  _, state = model.apply(
    {'params': params}, tokens, capture_intermediates=pick, mutable=['intermediates']
  )
  out = {}
  for path, (value,) in common.flat(state['intermediates']).items():
    module = path.removesuffix('/__call__')
    kv = value[:, :P]  # (B, P, K, H)
    if rotary and module.endswith('key'):
      kv = attention.apply_rotary(kv, jnp.arange(P)[None])
    out[module] = np.asarray(kv)[0]  # batch of one
  return out


def _outputs(out):
  """The compared outputs: logits, or BERT's MLM logits and (pooled) NSP logits."""
  return (out['mlm_logits'], out['nsp_logits']) if isinstance(out, dict) else (out,)


@pytest.mark.parametrize('method', ['prompt', 'prefix'])
@pytest.mark.parametrize(
  'name',  # the scanned stack's case (~25 s each on the loaded 2-core machine) in the slow pass
  [pytest.param(n, marks=pytest.mark.slow) if 'scan' in n else n for n in MODELS],
)
def test_virtual_tokens_of_real_tokens_give_the_base_models_logits(name, method):
  model = MODELS[name]()
  base = _init(model)
  adapted, new = _adapted(model, method)
  expected_new = (
    {'virtual_tokens/prompt_embeddings'}
    if method == 'prompt'
    else {f'{m}/prefix' for m in _key_value_modules(common.flat(base))}
  )
  assert new == expected_new
  flat = dict(common.flat(base))
  if method == 'prompt':
    flat['virtual_tokens/prompt_embeddings'] = np.asarray(flat['embed/embedding'])[V[0]]
  else:
    rotary = name in ('gpt_rotary', 'llama', 'llama_scan')
    for module, kv in _base_keys_values(model, base, rotary).items():
      flat[f'{module}/prefix'] = kv
  got = _outputs(adapted.apply({'params': common.unflat(flat)}, X))
  full = _outputs(model.apply({'params': base}, np.concatenate([V, X], 1)))
  # BERT's pooled output is the first row's: V's first token under prompt tuning, x's own first
  # token under prefix tuning (not a row of [V; x]'s outputs: only the MLM logits are compared)
  want = (full[0][:, P:], *full[1:])[: 1 if method == 'prefix' else None]
  got = got[: len(want)]
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape
    assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), np.abs(g - w).max()
  # the virtual tokens matter: with other values the logits move
  rng = np.random.default_rng(5)
  moved = {k: rng.normal(0, 1, np.shape(v)).astype(np.float32) for k, v in flat.items() if k in new}
  other = _outputs(adapted.apply({'params': common.unflat({**flat, **moved})}, X))
  assert np.abs(other[0] - want[0]).max() > 1e-2 * np.abs(want[0]).max()


def _incremental(model, params, tokens, split):
  """Logits of a prefill of tokens[:, :split] then one token per call, through the KV cache."""
  cache = model.init(
    jax.random.key(0), jnp.zeros((tokens.shape[0], model.max_len), jnp.int32), decode=True
  )['cache']
  step = jax.jit(
    lambda c, t: model.apply({'params': params, 'cache': c}, t, decode=True, mutable=['cache'])
  )
  out, (logits, updates) = [], step(cache, tokens[:, :split])
  out.append(logits)
  for i in range(split, tokens.shape[1]):
    logits, updates = step(updates['cache'], tokens[:, i : i + 1])
    out.append(logits)
  return np.concatenate(out, 1)


@pytest.mark.parametrize(
  'name, method',  # ~40 s each on the loaded 2-core machine: half in the slow pass
  [
    # Llama's own KV cache (grouped-query: 2 key/value heads cached)
    pytest.param('llama', '', marks=pytest.mark.slow),
    ('llama', 'prompt'),
    pytest.param('gpt', 'prefix', marks=pytest.mark.slow),
    pytest.param('llama_scan', '', marks=pytest.mark.slow),
    pytest.param('llama_scan', 'prefix', marks=pytest.mark.slow),
    pytest.param('gpt', 'prompt', marks=pytest.mark.slow),
  ],
)
def test_incremental_decoding_equals_the_full_forward(name, method):
  model = MODELS[name]()
  if method:
    model, _ = _adapted(model, method)
  tokens = np.random.default_rng(2).integers(0, 48, (2, 9))
  params = _init(model, tokens, key=1)
  full = np.asarray(model.apply({'params': params}, tokens))
  got = _incremental(model, params, tokens, split=4)
  assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()
  # greedy generation: each new token the argmax of the full forward over what came before
  new = np.asarray(generate(model, params, tokens[:, :4], max_new_tokens=5, temperature=0.0))
  seq = np.concatenate([tokens[:, :4], new], 1)
  np.testing.assert_array_equal(
    new, np.asarray(model.apply({'params': params}, seq))[:, 3:8].argmax(-1)
  )
  if method:  # the virtual tokens take positions of max_len (16): 3 + 4 + 9 > 16
    with pytest.raises(ValueError, match=r'\+ 3 virtual tokens \(prompt / prefix tuning\)'):
      generate(model, params, tokens[:, :4], max_new_tokens=10)


# ----------------------------------------------------------------------------------------------
# HF PEFT parity: the PEFT weights imported with config.peft.init_from
# ----------------------------------------------------------------------------------------------
VOCAB = 260  # the 'bytes' tokenizer's
IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12))


def _hf_base(family):
  torch.manual_seed(0)
  if family == 'llama':
    config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,  # grouped-query attention: PEFT's prefixes have 2 heads
      max_position_embeddings=64,
      initializer_range=0.1,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(config).eval()
  return tiny_gpt2(VOCAB)


@functools.cache
def _peft_case(family, method, root):
  """(base dir, adapter dir, PEFT's logits on IDS) of a random PEFT prompt / prefix adapter
  (GPT-2's prefix trained through PEFT's reparameterization MLP: PEFT saves its output)."""
  base_dir, adapter_dir = f'{root}/{family}_base', f'{root}/{family}_{method}'
  _hf_base(family).save_pretrained(base_dir)
  if method == 'prompt':
    config = hf_peft.PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=5)
  else:
    projection = family == 'gpt'
    config = hf_peft.PrefixTuningConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=5, prefix_projection=projection
    )
  torch.manual_seed(3)
  model = hf_peft.get_peft_model(_hf_base(family), config).eval()
  model.save_pretrained(adapter_dir)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(IDS)).logits.numpy()
  return base_dir, adapter_dir, want[:, -IDS.shape[1] :]  # prompt tuning returns P + T rows


@pytest.fixture(scope='module')
def hf_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_virtual'))


def _imported(family, base_dir, **peft_fields):
  name = 'llama_shakespeare' if family == 'llama' else 'gpt_shakespeare'
  config = load_config(name, f'smoke,hf={base_dir}')
  config.data.tokenizer = 'bytes'  # the test bases have no tokenizer.json
  config.peft.update(peft_fields)
  exp = experiment.build(config, jax.devices()[:1])
  put = init_from.prepare(config, exp.model, exp.abstract.params)
  return exp, put(exp.create_state().params)


@pytest.mark.parametrize(
  'family, method',
  [
    pytest.param('llama', 'prompt', marks=pytest.mark.slow),
    ('llama', 'prefix'),
    pytest.param('gpt', 'prompt', marks=pytest.mark.slow),
    pytest.param('gpt', 'prefix', marks=pytest.mark.slow),
  ],
)
def test_imported_peft_virtual_tokens_give_peft_logits(family, method, hf_root):
  base_dir, adapter_dir, want = _peft_case(family, method, hf_root)
  exp, params = _imported(family, base_dir, method=method, init_from=adapter_dir)
  assert exp.model.virtual_tokens == 5
  got = np.asarray(jax.jit(exp.model.apply)({'params': params}, IDS))
  error = np.abs(got - want).max() / np.abs(want).max()
  assert error <= 1e-4, error
  base = np.asarray(
    common.base_model(exp.model).apply({'params': common.unflat(exp.peft.split(params)[1])}, IDS)
  )
  assert np.abs(base - want).max() / np.abs(want).max() > 1e-2  # the virtual tokens matter


# ----------------------------------------------------------------------------------------------
# Training through bigjax-train's step: only the virtual tokens move
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('method', [pytest.param('prompt', marks=pytest.mark.slow), 'prefix'])
def test_only_the_virtual_tokens_train(method):
  """8 steps on one batch: the virtual tokens move, every frozen parameter stays bitwise, and the
  batch's loss falls."""
  config = load_config('llama_shakespeare', 'smoke')
  config.peft.update(method=method, virtual_tokens=4)
  config.optim.update(lr=0.1, schedule='constant', warmup_steps=0)
  exp = experiment.build(config, jax.devices()[:1])
  assert exp.peft.num_trainable == (4 * 32 if method == 'prompt' else 2 * 2 * 4 * 1 * 16)
  state = exp.create_state()
  initial = common.flat(jax.device_get(state.params))
  step = exp.compile_train_step()
  batch = exp.to_global(exp.batches.batch(0))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  final = common.flat(jax.device_get(state.params))
  for k, v in initial.items():
    if exp.peft.is_trainable(k):
      assert np.abs(final[k] - v).max() > 1e-2, k
    else:
      assert final[k].tobytes() == v.tobytes(), k
  # On the random smoke base the virtual tokens can only fit the batch's byte frequencies a
  # little; measured: prompt 5.566 -> 5.536, prefix 5.563 -> 5.482 (first and eighth step).
  assert losses[-1] < losses[0] - {'prompt': 0.02, 'prefix': 0.05}[method], losses


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(method='prompt', target='query'), "config.peft.target='query' is not used by prompt"),
    (dict(method='prefix', dropout=0.1), 'config.peft.dropout=0.1 is not applied by prefix'),
    (dict(method='prompt', virtual_tokens=0), 'config.peft.virtual_tokens=0 must be >= 1'),
    (dict(method='ia3', dropout=0.1), 'config.peft.dropout=0.1 is not applied by IA3'),
    (dict(method='adapter', dropout=0.1), 'config.peft.dropout=0.1 is not applied by bottleneck'),
  ],
)
def test_bad_fields_are_one_line_errors(fields, message):
  config = load_config('llama_shakespeare', 'smoke')
  config.peft.update(fields)
  with pytest.raises(UserError) as e:
    experiment.build(config, jax.devices()[:1])
  assert message in str(e.value) and '\n' not in str(e.value)


def test_a_position_table_too_short_for_the_virtual_tokens_is_a_one_line_error():
  config = load_config('gpt_shakespeare', 'smoke')  # learned positions: max_len = seq_len = 32
  config.peft.update(method='prefix', virtual_tokens=4)
  with pytest.raises(UserError) as e:
    experiment.build(config, jax.devices()[:1])
  assert 'config.model.kwargs.max_len=32 is less than the sequence length 32 plus 4 virtual' in str(
    e.value
  )


def test_prompt_tuning_of_a_model_without_the_hook_is_refused():
  config = load_config('mlp_breast_cancer', 'smoke')
  config.peft.update(method='prompt')
  with pytest.raises(UserError, match="config.peft.method='prompt' adds no parameter"):
    experiment.build(config, jax.devices()[:1])
