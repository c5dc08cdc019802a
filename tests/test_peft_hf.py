"""HF PEFT interop (bigjax/peft/hf_directory.py, hf_import.py, hf_export.py): a PEFT LoRA
adapter with non-zero B, imported with config.peft.init_from onto its config.init_from.hf base,
gives PEFT's logits (<= 1e-4 relative), and an adapter bigjax writes loads in `peft` with
bigjax's logits: Llama with grouped-query attention (and a rank_pattern / alpha_pattern) and GPT-2
(fan_in_fan_out=True, the fused c_attn, DoRA). An adapter for another base, or one adapting a tied
head, is a one-line error naming the file; bfloat16 adapter tensors read exactly."""

import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import numpy as np  # noqa: E402
import peft as hf_peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bigjax import experiment, init_from  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from bigjax.peft import common, hf_directory, hf_export  # noqa: E402

from conftest import load_config, tiny_gpt2  # noqa: E402

torch.set_num_threads(1)
V = 260  # the 'bytes' tokenizer's vocabulary: the bases are built for it
IDS = np.random.default_rng(0).integers(0, V, size=(2, 16))


def _rel_error(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _perturbed(model):
  """Eval mode, with norm weights and biases moved off HF's init (1 and 0)."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _llama():
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
  )
  return _perturbed(transformers.LlamaForCausalLM(config))


def _gpt2():
  return _perturbed(tiny_gpt2(V))


def _with_lora(base, directory, **lora):
  """`base` wrapped by peft with non-zero B (and A, DoRA magnitudes) drawn at random, saved."""
  model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(**lora))
  torch.manual_seed(2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_' in name:
        p.add_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(str(directory))
  return model


def _peft_logits(base_dir, adapter_dir, base_cls):
  model = hf_peft.PeftModel.from_pretrained(base_cls.from_pretrained(base_dir), adapter_dir).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _config(family, base_dir, **peft_fields):
  name = {'llama': 'llama_shakespeare', 'gpt': 'gpt_shakespeare', 'bert': 'bert_shakespeare_mlm'}
  config = load_config(name[family], f'smoke,hf={base_dir}')
  config.data.tokenizer = 'bytes'
  config.peft.update(method='lora', **peft_fields)
  return config


def _imported(config):
  """(experiment, params: the base and adapter of config.init_from / config.peft.init_from)."""
  exp = experiment.build(config, jax.devices()[:1])
  put = init_from.prepare(config, exp.model, exp.abstract.params)
  return exp, put(exp.create_state().params)


def _logits(model, params):
  return np.asarray(jax.jit(model.apply)({'params': params}, IDS))


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """(base dir, adapter dir, PEFT's logits): LoRA r=4 on every linear layer and the head, o_proj
  at rank 2 (rank_pattern), down_proj at alpha 3 (alpha_pattern)."""
  root = tmp_path_factory.mktemp('llama')
  base, adapter = str(root / 'base'), str(root / 'adapter')
  _llama().save_pretrained(base)
  targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head']
  _with_lora(
    _llama(),
    adapter,
    r=4,
    lora_alpha=8,
    target_modules=targets,
    rank_pattern={'o_proj': 2},
    alpha_pattern={'down_proj': 3},
  )
  return base, adapter, _peft_logits(base, adapter, transformers.LlamaForCausalLM)


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
  """(base dir, adapter dir, PEFT's logits): DoRA r=4 on c_attn, both c_proj and c_fc."""
  root = tmp_path_factory.mktemp('gpt2')
  base, adapter = str(root / 'base'), str(root / 'adapter')
  _gpt2().save_pretrained(base)
  _with_lora(
    _gpt2(),
    adapter,
    r=4,
    lora_alpha=8,
    target_modules=['c_attn', 'c_proj', 'c_fc'],
    fan_in_fan_out=True,
    use_dora=True,
  )
  return base, adapter, _peft_logits(base, adapter, transformers.GPT2LMHeadModel)


@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_imported_llama_gqa_adapter_gives_peft_logits(llama, scan):
  base, adapter, want = llama
  config = _config('llama', base, init_from=adapter)
  config.model.kwargs.scan = scan  # scan: each adapter tensor stacked over the layers
  exp, params = _imported(config)
  layers = 1 if scan else 2
  stack = 'stack/layers' if scan else 'stack/layer_0'
  assert exp.model.num_kv_heads == 2 and len(exp.peft.trainable) == 2 * (7 * layers + 1)
  assert exp.peft.spec.rank_of(f'{stack}/self_attention/out') == 2
  flat = common.flat(jax.device_get(params))
  assert np.abs(flat[f'{stack}/mlp/wo/lora_b']).min() > 0  # non-zero B came in
  got = _logits(exp.model, params)
  assert _rel_error(got, want) <= 1e-4, _rel_error(got, want)
  base_logits = _logits(common.base_model(exp.model), common.unflat(exp.peft.split(params)[1]))
  assert _rel_error(base_logits, want) > 1e-2  # the adapter matters


@pytest.mark.slow  # a BERT base and PEFT model: ~30 s
def test_imported_bert_adapter_gives_peft_logits(tmp_path):
  """LoRA on BERT's query and value (BertForMaskedLM; HF module names 'bert.encoder.layer.0.
  attention.self.query'): the MLM logits are PEFT's."""
  config = transformers.BertConfig(
    vocab_size=V,
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=40,
    max_position_embeddings=128,
    pad_token_id=256,  # the byte tokenizer's PAD
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.1,
  )
  base_dir, adapter_dir = str(tmp_path / 'base'), str(tmp_path / 'adapter')

  def bert():  # the same random base each time
    torch.manual_seed(0)
    return _perturbed(transformers.BertForMaskedLM(config))

  bert().save_pretrained(base_dir)
  _with_lora(
    bert(),
    adapter_dir,
    r=4,
    lora_alpha=8,
    target_modules=['query', 'value'],
  )
  ids = IDS % 256  # no PAD: bigjax masks PAD tokens, HF (without an attention mask) does not
  model = hf_peft.PeftModel.from_pretrained(
    transformers.BertForMaskedLM.from_pretrained(base_dir), adapter_dir
  ).eval()
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids)).logits.numpy()
  exp, params = _imported(_config('bert', base_dir, init_from=adapter_dir))
  assert len(exp.peft.spec.targets) == 2 * 2  # query and value of both layers
  got = jax.jit(exp.model.apply)({'params': params}, ids)['mlm_logits']
  assert _rel_error(got, want) <= 1e-4, _rel_error(got, want)


@pytest.mark.slow  # a second base and PEFT model: ~25 s more
def test_imported_gpt2_dora_adapter_gives_peft_logits(gpt2):
  base, adapter, want = gpt2
  exp, params = _imported(_config('gpt', base, init_from=adapter))
  assert exp.peft.spec.dora and len(exp.peft.spec.targets) == 2 * 6  # q, k, v, out, wi, wo
  got = _logits(exp.model, params)
  assert _rel_error(got, want) <= 1e-4, _rel_error(got, want)


def _randomised(exp, params, seed=3):
  """params with every adapter parameter drawn at random (B non-zero, DoRA offsets too)."""
  rng = np.random.default_rng(seed)
  flat = common.flat(jax.device_get(params))
  for k in exp.peft.trainable:
    flat[k] = rng.normal(0, 0.3, flat[k].shape).astype(np.float32)
  return common.unflat(flat)


@pytest.mark.slow  # two builds, an export and two PEFT models per case: ~40 s each
@pytest.mark.parametrize(
  'family, target',
  [
    ('llama', '(query|key|value|out|wi_gate|wo|lm_head)/kernel'),
    # query and value of the fused c_attn only: exported at rank 2r with a zero key block
    ('gpt', 'self_attention/(query|value)/kernel|mlp/wo/kernel'),
  ],
)
def test_saved_adapter_loads_in_peft_with_bigjax_logits(family, target, llama, gpt2, tmp_path):
  base = (llama if family == 'llama' else gpt2)[0]
  config = _config(family, base, target=target, rank=3, alpha=5.0, dora=family == 'gpt')
  exp, params = _imported(config)
  params = _randomised(exp, params)
  want = _logits(exp.model, params)
  out = hf_export.save(config, exp.model, params, str(tmp_path / 'adapter'))
  with open(os.path.join(out, hf_directory.CONFIG)) as f:
    written = json.load(f)
  if family == 'gpt':
    assert written['fan_in_fan_out'] and written['rank_pattern'] == {'c_attn': 6}
  cls = transformers.LlamaForCausalLM if family == 'llama' else transformers.GPT2LMHeadModel
  got = _peft_logits(base, out, cls)
  assert _rel_error(got, want) <= 1e-4, _rel_error(got, want)
  # ... and bigjax reads its own adapter back to the same parameters
  back, again = _imported(_config(family, base, init_from=out))
  assert _rel_error(_logits(back.model, again), want) <= 1e-5


# ----------------------------------------------------------------------------------------------
# An adapter for another base: one line naming the file
# ----------------------------------------------------------------------------------------------
def _error(config) -> str:
  with pytest.raises(UserError) as e:
    _imported(config)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_adapter_for_another_base_is_a_one_line_error(llama, gpt2, tmp_path):
  base, adapter, _ = llama
  # wider: the same module names, other shapes
  wide = _llama().config.to_dict() | dict(hidden_size=48, head_dim=8)
  wide_dir = tmp_path / 'wide'
  _with_lora(
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**wide)),
    wide_dir,
    r=4,
    target_modules=['q_proj'],
  )
  message = _error(_config('llama', base, init_from=str(wide_dir)))
  assert 'adapter_model.safetensors' in message and 'has shape (4, 48)' in message
  # GPT-2's adapter on the Llama base: names its base class, and its modules are not there
  message = _error(_config('llama', base, init_from=gpt2[1]))
  assert 'adapter_model.safetensors' in message and "'transformer.h.0.attn.c_attn'" in message
  # more layers than the base has
  deep = _llama().config.to_dict() | dict(num_hidden_layers=3)
  deep_dir = tmp_path / 'deep'
  _with_lora(
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**deep)),
    deep_dir,
    r=4,
    target_modules=['v_proj'],
  )
  message = _error(_config('llama', base, init_from=str(deep_dir)))
  assert "'model.layers.2.self_attn.v_proj'" in message and 'another base model' in message
  # base_model_name_or_path naming another architecture
  named = tmp_path / 'named'
  os.makedirs(named)
  for name in (hf_directory.WEIGHTS,):
    os.symlink(os.path.join(adapter, name), named / name)
  with open(os.path.join(adapter, hf_directory.CONFIG)) as f:
    adapter_config = json.load(f)
  adapter_config['base_model_name_or_path'] = gpt2[0]
  with open(named / hf_directory.CONFIG, 'w') as f:
    json.dump(adapter_config, f)
  message = _error(_config('llama', base, init_from=str(named)))
  assert f'{named}/adapter_config.json' in message and 'model' in message


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(rank=2), 'config.peft.rank=2 contradicts {a}/adapter_config.json (r=4)'),
    (dict(target='query'), "config.peft.target='query': with config.peft.init_from"),
    (dict(method=''), "config.peft.init_from='{a}' puts a PEFT adapter (LoRA, prompt or prefix"),
    (dict(method='prompt'), "peft_type='LORA' is imported by config.peft.method='lora', not"),
    (dict(init_from='/nonexistent'), "config.peft.init_from='/nonexistent' is not a directory"),
  ],
)
def test_bad_adapter_fields_are_one_line_errors(llama, fields, message):
  base, adapter, _ = llama
  config = _config('llama', base, init_from=adapter)
  config.peft.update(fields)
  assert message.format(a=adapter) in _error(config)


def test_lora_on_a_tied_head_is_a_one_line_error_naming_the_tie(tmp_path):
  """A tied base (tie_word_embeddings: no lm_head.weight of its own) with an adapted lm_head: the
  error says the head is tied, not that the adapter is for another base."""
  tied = _llama().config.to_dict() | dict(tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tied)).eval()
  model.save_pretrained(str(tmp_path / 'base'))
  _with_lora(model, tmp_path / 'adapter', r=2, target_modules=['q_proj', 'lm_head'])
  message = _error(_config('llama', str(tmp_path / 'base'), init_from=str(tmp_path / 'adapter')))
  assert "adapts 'lm_head', which config.init_from.hf ties to its token embedding" in message
  assert 'another base' not in message and 'differs' not in message


def test_bfloat16_adapter_tensors_read_exactly(tmp_path):
  """An adapter saved in bfloat16 reads as float32 holding exactly the bfloat16 values."""
  torch.manual_seed(0)
  model = hf_peft.get_peft_model(_llama(), hf_peft.LoraConfig(r=2, target_modules=['q_proj']))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_' in name:
        p.add_(0.3 * torch.randn_like(p))
  model.to(torch.bfloat16).save_pretrained(str(tmp_path))
  adapter = hf_directory.read(str(tmp_path))
  name = 'model.layers.0.self_attn.q_proj.lora_B.weight'
  want = dict(model.named_parameters())[f'base_model.model.{name[:-7]}.default.weight']
  assert want.dtype == torch.bfloat16
  got = adapter.read(name)
  assert got.dtype == np.float32 and np.abs(got).max() > 0
  np.testing.assert_array_equal(got, want.detach().float().numpy())
