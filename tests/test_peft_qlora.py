"""QLoRA (config.peft.quantize, bigjax/peft/qlora.py): the frozen base's kernels are stored as
int8 / nf4 codes read from a HuggingFace checkpoint, each weight within its quantization bound and
the logits near the float model's; LoRA over it trains (the loss falls) while every quantized
code and scale stays bitwise the same, and its merged weights equal the adapted model."""

import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bigjax import experiment, init_from  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from bigjax.peft import common, qlora  # noqa: E402

from conftest import load_config  # noqa: E402

V = 260  # the 'bytes' tokenizer's vocabulary
IDS = np.random.default_rng(0).integers(0, V, size=(2, 16))


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
  """A random LlamaForCausalLM whose MLP input rows (64) make two nf4 blocks of 64 in wo."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
  )
  directory = str(tmp_path_factory.mktemp('hf_llama'))
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


def _config(hf_dir, **peft_fields):
  config = load_config('llama_shakespeare', f'smoke,hf={hf_dir}')
  config.data.tokenizer = 'bytes'
  config.peft.update(method='lora', target='(query|value)/kernel', rank=4, alpha=8.0)
  config.peft.update(peft_fields)
  return config


def _loaded(config):
  exp = experiment.build(config, jax.devices()[:1])
  put = init_from.prepare(config, exp.model, exp.abstract.params)
  return exp, put(exp.create_state().params)


def _logits(model, params):
  return np.asarray(jax.jit(model.apply)({'params': params}, IDS))


@pytest.fixture(scope='module')
def float_run(hf_base):
  return _loaded(_config(hf_base))


# Logits error relative to the largest logit, measured on this random base: int8 0.026, nf4 0.33
# (4 bits, one block per 32-row column of the attention kernels).
@pytest.mark.parametrize(
  'kind, logits_bound', [('int8', 0.05), pytest.param('nf4', 0.5, marks=pytest.mark.slow)]
)
def test_quantized_base_is_within_the_quantization_bound(hf_base, float_run, kind, logits_bound):
  exp_f, params_f = float_run
  exp_q, params_q = _loaded(_config(hf_base, quantize=kind))
  flat_f, flat_q = common.flat(jax.device_get(params_f)), common.flat(jax.device_get(params_q))
  kernels = qlora.quantized_kernels(flat_q)
  assert len(kernels) == 2 * 7 + 1  # every Dense kernel: q, k, v, out, gate, up, down; the head
  for path, (k, lead, n_in) in kernels.items():
    codes, scale = flat_q[path], flat_q[path + '_scale']
    assert codes.dtype == qlora.CODE_DTYPES[kind] and k == kind
    w = np.asarray(qlora.dequantize(codes, scale, kind, lead, n_in))
    rows = int(np.prod(codes.shape[:n_in]))
    bound = np.repeat(qlora.error_bound(scale, kind), rows // scale.shape[0], axis=0)
    err = np.abs(w - flat_f[path]).reshape(bound.shape[0], -1)
    assert np.all(err <= bound.reshape(bound.shape[0], -1) * (1 + 1e-5) + 1e-7), path
  assert flat_q['stack/layer_0/mlp/wo/kernel_scale'].shape[0] == (2 if kind == 'nf4' else 1)
  # B = 0: the adapted quantized model is its quantized base; its logits are near the float ones
  want = _logits(exp_f.model, params_f)
  got = _logits(exp_q.model, params_q)
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'{kind}: logits relative error {err:.2e}')
  assert 0 < err <= logits_bound


@pytest.mark.slow  # 20 compiled steps of a DoRA over nf4: ~30 s
def test_qlora_trains_the_adapter_over_a_frozen_quantized_base(hf_base):
  config = _config(hf_base, quantize='nf4', dora=True, target='(query|value|lm_head)/kernel')
  config.optim.update(lr=1e-2, schedule='constant', warmup_steps=0)
  exp, params = _loaded(config)
  state = exp.create_state().replace(params=params)
  before = common.flat(jax.device_get(state.params))
  step = exp.compile_train_step()
  losses = []
  for i in range(20):
    state, metrics = step(state, exp.to_global(exp.batches.batch(i)))
    losses.append(float(metrics['loss']))
  after = common.flat(jax.device_get(state.params))
  names = {k.rsplit('/', 1)[1] for k in exp.peft.trainable}
  assert names == {'lora_a', 'lora_b', 'magnitude_offset'}
  for k in before:
    if not exp.peft.is_trainable(k):  # codes, scales, norms, embeddings: bitwise
      assert before[k].tobytes() == after[k].tobytes(), k
  print('losses', np.mean(losses[:5]), np.mean(losses[-5:]))
  # From the random base at ~ln(260) = 5.56 nats: measured 5.58 -> 3.54 (first / last 5 of 20).
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  # --merge: the dequantized base plus the adapter, in the float model
  merged = common.merged_params(config.peft, common.unflat(after))
  assert merged['stack']['layer_0']['mlp']['wo']['kernel'].dtype == np.float32
  adapted = _logits(exp.model, common.unflat(after))
  folded = _logits(common.base_model(exp.model), merged)
  np.testing.assert_allclose(folded, adapted, rtol=1e-5, atol=1e-5 * np.abs(adapted).max())


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(quantize='int3'), "config.peft.quantize='int3' is unknown; use one of int8, nf4"),
    (dict(quantize='int8', quantize_layers='nothing'), "quantize_layers='nothing' matches no"),
    (dict(quantize='nf4', save='trainable'), "config.peft.save='trainable' with config.peft.q"),
  ],
)
def test_bad_quantize_fields_are_one_line_errors(hf_base, fields, message):
  with pytest.raises(UserError) as e:
    experiment.build(_config(hf_base, **fields), jax.devices()[:1])
  assert message in str(e.value) and '\n' not in str(e.value)
