"""HuggingFace checkpoints by config: `config.init_from.hf=DIR` (save_pretrained directories read
with safetensors into the mesh's shardings, the architecture from DIR/config.json, the tokenizer
from DIR/tokenizer.json) and `bigjax-export` back to a directory transformers loads.

The HF models are small and random (built from config objects, HF_HUB_OFFLINE=1, saved with
save_pretrained); torch only computes the reference logits. Logits are compared with
rtol=1e-4, atol=1e-5 (float32 both sides; the worst relative error, max|a - b| / max|b|, is
asserted below 1e-4 too).
"""

import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bigjax import checkpoint as checkpoint_lib  # noqa: E402
from bigjax import config_lib, experiment, export, init_from, train  # noqa: E402
from bigjax import mesh as mesh_lib  # noqa: E402
from bigjax.data import tokenizers  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from bigjax.models import bert, gpt, hf, llama  # noqa: E402
from bigjax.models.hf import convert, safetensors_io  # noqa: E402

from conftest import load_config  # noqa: E402

torch.set_num_threads(1)
TOL = dict(rtol=1e-4, atol=1e-5)
V = 96


def _rel_error(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _check_logits(got, want):
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  assert _rel_error(got, want) <= 1e-4


def _perturb(model):
  """Eval mode, with biases and norm weights (HF initialises them to 0 and 1) moved off their
  initial values so a misplaced one changes the logits."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name.lower() or 'ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _llama_config(kind='llama', **overrides):
  common = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    rope_parameters={'rope_type': 'default', 'rope_theta': 5000.0},
  )
  cls = {
    'llama': transformers.LlamaConfig,
    'mistral': transformers.MistralConfig,
    'qwen2': transformers.Qwen2Config,
  }[kind]
  return cls(**{**common, **overrides})


def _hf_model(config):
  torch.manual_seed(0)
  return _perturb(transformers.AutoModelForCausalLM.from_config(config))


# name -> HF model factory (the parameter sets of the parity tests)
LLAMAS = {
  'llama_gqa_6h_2kv': lambda: _hf_model(_llama_config()),
  'llama_3h_mha_bias': lambda: _hf_model(
    _llama_config(num_attention_heads=3, num_key_value_heads=3, attention_bias=True)
  ),
  'llama_tied': lambda: _hf_model(_llama_config(tie_word_embeddings=True)),
  'mistral_window': lambda: _hf_model(_llama_config('mistral', sliding_window=32)),
  'qwen2_qkv_bias': lambda: _hf_model(_llama_config('qwen2', num_key_value_heads=3)),
}


def _gpt2():
  torch.manual_seed(0)
  config = transformers.GPT2Config(
    vocab_size=V,
    n_positions=32,
    n_embd=24,
    n_layer=2,
    n_head=3,
    bos_token_id=V - 1,
    eos_token_id=V - 1,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    initializer_range=0.2,
  )
  return _perturb(transformers.GPT2LMHeadModel(config))


def _bert():
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=V,
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=40,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=0,
    initializer_range=0.2,
  )
  return _perturb(transformers.BertForPreTraining(config))


def _save(model, directory, **kwargs):
  model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
  return str(directory)


def _ids(t=16, seed=1, low=0):
  return np.random.default_rng(seed).integers(low, V, size=(2, t))


def _hf_logits(model, ids):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids))
  return (out.prediction_logits if hasattr(out, 'prediction_logits') else out.logits).numpy()


def _bigjax_model(directory, **extra):
  """The bigjax model for an HF directory, as build() makes it: the family's architecture (plus
  the bigjax-side `extra` fields)."""
  hf_config = safetensors_io.read_config(directory)
  family = hf.family_of(hf_config, directory)
  cls = {'gpt': gpt.Model, 'bert': bert.Model, 'llama': llama.Model}[family.MODEL]
  return cls(**family.architecture(hf_config), **extra)


def _load(directory, model, mesh=None, rules=None):
  """(params tree of jax arrays, fresh paths) read by init_from.hf_params on `mesh` (default: one
  device, everything replicated)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  mesh = mesh or mesh_lib.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])
  rules = rules or config_lib.base_config().sharding_rules
  shardings = mesh_lib.tree_shardings(boxed, mesh, rules)
  abstract = flax.linen.meta.unbox(boxed)
  flat, fresh = init_from.hf_params(directory, model, abstract, shardings)
  return flax.traverse_util.unflatten_dict(flat, sep='/'), fresh


# ----------------------------------------------------------------------------------------------
# Logits of imported checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', list(LLAMAS))
def test_llama_family_logits_match_transformers(name, tmp_path):
  hf_model = LLAMAS[name]()
  directory = _save(hf_model, tmp_path / name)
  model = _bigjax_model(directory)
  if name == 'mistral_window':
    assert model.max_len == 32  # the sliding window bounds the context
  if name == 'qwen2_qkv_bias':
    assert model.qkv_bias and not model.out_bias
  params, fresh = _load(directory, model)
  assert fresh == []
  assert ('lm_head' in params) == (name != 'llama_tied')
  ids = _ids(t=24)
  _check_logits(jax.jit(model.apply)({'params': params}, ids), _hf_logits(hf_model, ids))


def test_gpt2_three_heads_and_bert_logits_match_transformers(tmp_path):
  gpt2 = _gpt2()
  directory = _save(gpt2, tmp_path / 'gpt2')
  model = _bigjax_model(directory)
  assert model.num_heads == 3
  params, _ = _load(directory, model)
  ids = _ids()
  _check_logits(jax.jit(model.apply)({'params': params}, ids), _hf_logits(gpt2, ids))

  hf_bert = _bert()
  directory = _save(hf_bert, tmp_path / 'bert')
  model = _bigjax_model(directory, head='pretrain')
  assert model.pad_id == 0 and model.num_heads == 3
  params, fresh = _load(directory, model)
  assert fresh == []
  ids = _ids(low=1)  # no padding: bigjax zeroes padded queries, HF does not
  out = jax.jit(model.apply)({'params': params}, ids)
  _check_logits(out['mlm_logits'], _hf_logits(hf_bert, ids))


def test_bert_classify_keeps_a_fresh_classifier(tmp_path):
  directory = _save(_bert().bert, tmp_path / 'bert_model')  # BertModel: encoder and pooler only
  model = _bigjax_model(directory, head='classify', num_classes=3)
  params, fresh = _load(directory, model)
  assert fresh == ['classifier/bias', 'classifier/kernel']
  assert 'classifier' not in params and 'pooler' in params


# ----------------------------------------------------------------------------------------------
# Sharded loading and sharded checkpoints
# ----------------------------------------------------------------------------------------------
def test_loads_into_an_8_device_mesh_sharded_and_gives_the_same_logits(tmp_path):
  """mesh data=2, fsdp=2, tensor=2 with the base sharding rules: each device holds a quarter of
  the query kernel and of the embedding (never the whole), and the logits are HF's."""
  hf_model = LLAMAS['llama_gqa_6h_2kv']()
  directory = _save(hf_model, tmp_path / 'llama', max_shard_size='40KB')  # sharded: index.json
  assert os.path.exists(os.path.join(directory, safetensors_io.INDEX))
  with open(os.path.join(directory, safetensors_io.INDEX)) as f:
    assert len(set(json.load(f)['weight_map'].values())) > 1
  cfg = config_lib.base_config().mesh
  cfg.update(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:8])
  model = _bigjax_model(directory)
  params, _ = _load(directory, model, mesh)
  query = params['stack']['layer_0']['self_attention']['query']['kernel']
  key = params['stack']['layer_0']['self_attention']['key']['kernel']
  embed, head = params['embed']['embedding'], params['lm_head']['kernel']
  assert query.sharding.spec == P('fsdp', 'tensor', None)  # (D, N, H): embed, heads, kv
  assert key.sharding.spec == P('fsdp', 'tensor', None)  # 2 kv heads over tensor=2
  assert embed.sharding.spec == P('tensor', 'fsdp')  # (V, D): vocab, embed
  assert head.sharding.spec == P('fsdp', 'tensor')
  for x in (query, embed):
    shards = {s.data.shape for s in x.addressable_shards}
    assert len(x.addressable_shards) == 8 and shards == {
      (x.shape[0] // 2, x.shape[1] // 2, *x.shape[2:])
    }
  ids = _ids(t=24)
  got = jax.jit(model.apply)({'params': params}, ids)  # runs sharded: the params' shardings
  _check_logits(got, _hf_logits(hf_model, ids))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def _export_dir(params, model, family, directory):
  tensors = convert.to_hf(jax.device_get(params), family.mapping(model))
  return safetensors_io.save_pretrained(str(directory), tensors, family.hf_config(model))


@pytest.mark.parametrize(
  'name', ['gpt2', 'bert', 'llama_gqa_6h_2kv', 'qwen2_qkv_bias', 'llama_tied']
)
def test_exported_directories_load_in_transformers_with_equal_logits(name, tmp_path):
  hf_model = {'gpt2': _gpt2, 'bert': _bert, **LLAMAS}[name]()
  directory = _save(hf_model, tmp_path / 'in')
  extra = dict(head='pretrain') if name == 'bert' else {}
  model = _bigjax_model(directory, **extra)
  params, _ = _load(directory, model)
  family = hf.family_for_model({'gpt2': 'gpt', 'bert': 'bert'}.get(name, 'llama'))
  out = _export_dir(params, model, family, tmp_path / 'out')
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  cls = transformers.BertForPreTraining if name == 'bert' else transformers.AutoModelForCausalLM
  reloaded, info = cls.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  ids = _ids(low=1)
  _check_logits(_hf_logits(reloaded.eval(), ids), _hf_logits(hf_model, ids))
  # every exported tensor is the imported one, bitwise (import and export transpose exactly)
  written = safetensors.numpy.load_file(os.path.join(out, 'model.safetensors'))
  read = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))
  assert set(written) <= set(read)
  for name, tensor in written.items():
    assert tensor.tobytes() == read[name].tobytes(), name


# ----------------------------------------------------------------------------------------------
# Tokenizer and the training entry point
# ----------------------------------------------------------------------------------------------
def _shakespeare_lines(n=3000):
  from bigjax.data import text

  texts = text.load_texts('shakespeare', 'train')[0]
  lines = [line for t in texts[:3] for line in tokenizers.as_bytes(t).decode().split('\n')]
  return [line for line in lines if line.strip()][:n]


def _byte_bpe(directory, vocab_size=320):
  """A GPT-2-style byte-level BPE (trained on Shakespeare lines with `tokenizers`) saved with
  transformers' save_pretrained, so the directory has tokenizer.json + tokenizer_config.json."""
  import tokenizers as hf_tokenizers

  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=['<|endoftext|>'],
    initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_shakespeare_lines(), trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>')
  fast.save_pretrained(str(directory))
  return fast


def test_hf_tokenizer_matches_transformers(tmp_path):
  fast = _byte_bpe(tmp_path)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'vocab_size': 336}, f)  # a padded embedding: the model's vocabulary is larger
  tok = tokenizers.get_tokenizer('hf', pretrained_dir=str(tmp_path))
  assert (tok.num_regular_tokens, tok.vocab_size) == (len(fast), 336)
  assert tok.sep == fast.eos_token_id and tok.pad == -1
  sample = 'ROMEO.\nBut soft, what light through yonder window breaks? ☃ naïve\n'
  ids = tok.encode(sample.encode())
  assert ids.dtype == np.int32 and len(ids) < len(sample.encode())  # merges happened
  assert ids.tolist() == fast(sample, add_special_tokens=False)['input_ids']
  assert tok.decode(ids) == sample
  with pytest.raises(UserError, match="config.data.tokenizer='hf'.*config.init_from.hf"):
    tokenizers.get_tokenizer('hf')


@pytest.mark.slow  # a real training run, its eval and an export: ~25 s alone on 2 cores
def test_fine_tune_from_hf_through_bigjax_train_then_export(tmp_path, one_device):
  """llama_shakespeare:smoke,hf=DIR through bigjax.train (the checkpoint's own byte-level BPE, a
  random LlamaForCausalLM): the first step's loss is HF's loss on that batch (the weights were
  used), 30 steps lower the loss by more than 1.0 nat, and bigjax-export's directory loads in
  transformers with the trained model's logits."""
  source = tmp_path / 'hf'
  fast = _byte_bpe(source)
  config = _llama_config(
    vocab_size=len(fast), initializer_range=0.02, bos_token_id=None, eos_token_id=fast.eos_token_id
  )
  hf_model = _hf_model(config)
  _save(hf_model, source)
  cfg = load_config('llama_shakespeare', f'smoke,hf={source}')
  cfg.log_every = 1
  cfg.num_steps = 30
  exp = experiment.build(cfg, one_device)
  assert (exp.model.num_heads, exp.model.num_kv_heads, exp.model.rope_theta) == (6, 2, 5000.0)
  batch = exp.task.prepare(exp.batches.batch(0), None)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(np.asarray(batch['inputs'], np.int64)))
  logits = want.logits.numpy()
  nll = -jax.nn.log_softmax(logits, -1)
  hf_loss = float(np.take_along_axis(nll, np.asarray(batch['targets'])[..., None], -1).mean())

  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(cfg, str(workdir), devices=one_device)
  losses = [h['loss'] for h in results['history'] if h['split'] == 'train']
  assert len(losses) == 30
  np.testing.assert_allclose(losses[0], hf_loss, rtol=1e-4)
  assert losses[0] - np.mean(losses[-5:]) > 1.0, losses

  out = tmp_path / 'exported'
  export.main(['bigjax-export', f'--workdir={workdir}', f'--to={out}'])  # returns on success
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(os.listdir(out))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  _, model, params = export.load_run(str(workdir))
  ids = np.asarray(batch['inputs'])[:2]
  _check_logits(model.apply({'params': params}, ids), _hf_logits(reloaded, ids))
  assert (
    transformers.AutoTokenizer.from_pretrained(str(out))('ROMEO.')['input_ids']
    == fast('ROMEO.')['input_ids']
  )


# ----------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors naming the file or field and the fix
# ----------------------------------------------------------------------------------------------
def _one_line(excinfo):
  assert '\n' not in str(excinfo.value)
  return str(excinfo.value)


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  return _save(LLAMAS['llama_gqa_6h_2kv'](), tmp_path_factory.mktemp('llama'))


def _config(directory, **kwargs):
  cfg = load_config('llama_shakespeare', f'smoke,hf={directory}')
  cfg.data.tokenizer = 'bytes'  # the test checkpoints have no tokenizer.json
  cfg.model.kwargs.update(kwargs)
  return cfg


def test_not_a_checkpoint_unsupported_architecture_and_wrong_model_name(tmp_path, llama_dir):
  with pytest.raises(UserError) as e:
    experiment.build(_config(tmp_path), jax.devices()[:1])
  assert f"config.init_from.hf='{tmp_path}' has no config.json" in _one_line(e)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 't5'}))
  (tmp_path / 'model.safetensors').write_bytes(b'')
  with pytest.raises(UserError) as e:
    experiment.build(_config(tmp_path), jax.devices()[:1])
  assert "model_type='t5' is not supported" in _one_line(e)
  cfg = _config(llama_dir)
  cfg.model.name = 'gpt'
  with pytest.raises(UserError) as e:
    experiment.build(cfg, jax.devices()[:1])
  assert "set config.model.name='llama'" in _one_line(e)
  cfg = _config(llama_dir)
  cfg.init_from.checkpoint = str(tmp_path)
  with pytest.raises(UserError, match='both set'):
    experiment.build(cfg, jax.devices()[:1])


def test_config_fields_that_contradict_the_checkpoint_are_refused(llama_dir):
  with pytest.raises(UserError) as e:
    experiment.build(_config(llama_dir, num_layers=3), jax.devices()[:1])
  msg = _one_line(e)
  assert 'config.model.kwargs.num_layers=3 contradicts' in msg and 'num_hidden_layers' in msg
  assert 'config.json' in msg and 'remove config.model.kwargs.num_layers' in msg
  # the same value is no contradiction
  with pytest.raises(UserError) as e:  # but the byte tokenizer's 260 ids are not the model's 96
    experiment.build(_config(llama_dir, num_layers=2), jax.devices()[:1])
  assert "gives vocab_size=96" in _one_line(e) and "config.data.tokenizer='hf'" in str(e.value)


def _rewrite(directory, out, change):
  """A copy of the checkpoint in `directory` with change(tensors) applied."""
  os.makedirs(out, exist_ok=True)
  tensors = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))
  change(tensors)
  safetensors.numpy.save_file(
    tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'}
  )
  with open(os.path.join(directory, 'config.json')) as f:
    (out / 'config.json').write_text(f.read())
  return str(out)


def test_missing_tensor_and_shape_mismatch_name_the_tensor_and_file(llama_dir, tmp_path):
  model = _bigjax_model(llama_dir)
  name = 'model.layers.1.mlp.up_proj.weight'
  missing = _rewrite(llama_dir, tmp_path / 'missing', lambda t: t.pop(name))
  with pytest.raises(UserError) as e:
    _load(missing, model)
  assert "has no tensor 'layers.1.mlp.up_proj.weight'" in _one_line(e)
  assert 'model.safetensors' in str(e.value)

  def shrink(t):
    t['model.layers.0.self_attn.k_proj.weight'] = t['model.layers.0.self_attn.k_proj.weight'][:8]

  bad = _rewrite(llama_dir, tmp_path / 'shape', shrink)
  with pytest.raises(UserError) as e:
    _load(bad, model)
  msg = _one_line(e)
  assert f"{bad}/model.safetensors entry 'layers.0.self_attn.k_proj.weight'" in msg
  assert 'has shape (8, 48) but the config expects (16, 48)' in msg


def test_bigjax_train_with_a_bad_hf_directory_exits_2_with_one_line(tmp_path, capsys):
  workdir = tmp_path / 'run'
  with pytest.raises(SystemExit) as e:
    train.main(
      [
        'bigjax-train',
        f'--config=llama_shakespeare:smoke,hf={tmp_path / "nowhere"}',
        f'--workdir={workdir}',
      ]
    )
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'nowhere' in err[0] and 'is not a directory' in err[0], err
  assert not workdir.exists()


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  """Released checkpoints are mostly bfloat16, which safetensors' numpy backend cannot read: the
  bytes are widened to float32 exactly, so the logits equal transformers' float32 model of the
  same bfloat16 weights."""
  directory = _save(LLAMAS['llama_gqa_6h_2kv']().to(torch.bfloat16), tmp_path / 'bf16')
  reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model = _bigjax_model(directory)
  params, _ = _load(directory, model)
  want = reference.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(params['embed']['embedding']), want)
  ids = _ids()
  _check_logits(jax.jit(model.apply)({'params': params}, ids), _hf_logits(reference.eval(), ids))


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(mlp_bias=True), 'mlp_bias=True is not supported'),
    (
      dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}),
      "rope_type='linear' is not supported",
    ),
  ],
)
def test_llama_configs_bigjax_cannot_reproduce_are_refused(overrides, match):
  config = _llama_config(**overrides).to_dict()
  with pytest.raises(UserError, match=match):
    hf.llama.architecture(config)


# ----------------------------------------------------------------------------------------------
# GPT-2 and BERT through bigjax-train: the configs' hf=DIR argument
# ----------------------------------------------------------------------------------------------
BYTES = 260  # the 'bytes' tokenizer's vocabulary (the test checkpoints have no tokenizer.json)


def _bytes_checkpoint(family, directory):
  """A random GPT2LMHeadModel / BertForMaskedLM over the byte vocabulary (BERT's pad id is the
  byte tokenizer's PAD, 256), saved."""
  torch.manual_seed(0)
  if family == 'gpt2':
    config = transformers.GPT2Config(
      vocab_size=BYTES, n_positions=64, n_embd=24, n_layer=2, n_head=3, bos_token_id=None
    )
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.BertConfig(
      vocab_size=BYTES,
      hidden_size=24,
      num_hidden_layers=2,
      num_attention_heads=3,
      intermediate_size=40,
      max_position_embeddings=128,
      pad_token_id=tokenizers.PAD,
    )
    model = transformers.BertForMaskedLM(config)
  return _save(model.eval(), directory)


def _cli(argv, capsys):
  """(exit status, non-log stderr lines) of bigjax-train with argv."""
  try:
    train.main(['bigjax-train', *argv])
    code = 0
  except SystemExit as e:
    code = e.code
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('bigjax: error')]
  return code, lines


@pytest.mark.parametrize(
  'family, config, plain',  # plain: the config's args without hf (bert_genre: not from a run)
  [
    ('gpt2', 'gpt_shakespeare', 'smoke'),
    pytest.param('bert', 'bert_shakespeare_mlm', 'smoke', marks=pytest.mark.slow),
    pytest.param('bert', 'bert_genre', 'smoke,init=none', marks=pytest.mark.slow),
  ],
)
def test_bigjax_train_starts_gpt2_and_bert_from_hf_with_the_configs_hf_argument(
  family, config, plain, tmp_path, capsys
):
  """--config=NAME:smoke,hf=DIR trains from the checkpoint (the architecture DIR's: zero steps of
  learning rate leave every loaded parameter equal to DIR's tensors); --config.init_from.hf=DIR
  on the plain config is refused with one line whose fix is that argument."""
  directory = _bytes_checkpoint(family, tmp_path / 'hf')
  code, err = _cli(
    [f'--config={config}:{plain}', f'--config.init_from.hf={directory}', f'--workdir={tmp_path}/x'],
    capsys,
  )
  assert code == 2 and len(err) == 1, err
  assert 'contradicts' in err[0] and "--config=NAME:hf=DIR" in err[0] and config in err[0]
  workdir = tmp_path / 'run'
  code, err = _cli(
    [
      f'--config={config}:smoke,hf={directory}',
      '--config.data.tokenizer=bytes',
      '--config.num_steps=1',
      '--config.optim.lr=0',
      '--config.optim.warmup_steps=0',
      f'--workdir={workdir}',
    ],
    capsys,
  )
  assert code == 0, err
  params = flax.traverse_util.flatten_dict(
    checkpoint_lib.load_latest(str(workdir / 'checkpoints'))[1]['params'], sep='/'
  )
  tensors = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))
  embedding = next(
    v for k, v in tensors.items() if k.endswith(('wte.weight', 'word_embeddings.weight'))
  )
  np.testing.assert_array_equal(params['embed/embedding'], embedding)
  assert params['embed/embedding'].shape == (BYTES, 24)  # DIR's width, not the smoke config's 32
