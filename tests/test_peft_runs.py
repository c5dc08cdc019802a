"""config.peft through bigjax-train, -export and -sample: adapter-only checkpoints
(config.peft.save='trainable') resume bitwise from the config.init_from.hf base plus the small
checkpoint, `bigjax-export --merge` writes a directory transformers loads with the adapted model's
logits, `bigjax-export --adapter` one that peft loads with them, and `bigjax-sample` with an
adapter samples the tokens of its merged weights."""

import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bigjax import checkpoint, experiment, export, peft, sample, train  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from bigjax.models.generate import generate  # noqa: E402
from bigjax.peft import common  # noqa: E402

from conftest import load_config, subprocess_env  # noqa: E402

torch.set_num_threads(1)
BYTES_VOCAB = 260  # the 'bytes' tokenizer's vocabulary


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
  """A random LlamaForCausalLM save_pretrained directory over the bytes tokenizer's vocabulary."""
  config = transformers.LlamaConfig(
    vocab_size=BYTES_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.05,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
  )
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp('hf_llama')
  transformers.LlamaForCausalLM(config).eval().save_pretrained(str(directory))
  return str(directory)


def _llama_lora(hf_dir, num_steps, save='trainable'):
  cfg = load_config('llama_shakespeare', f'smoke,hf={hf_dir}')
  cfg.data.tokenizer = 'bytes'  # the test checkpoint has no tokenizer.json
  cfg.peft.update(method='lora', target='(query|value)/kernel', rank=4, alpha=8.0, save=save)
  # A constant learning rate: a longer re-run resumes without --allow_config_change.
  cfg.optim.update(schedule='constant', warmup_steps=0, lr=1e-2)
  cfg.update(num_steps=num_steps, checkpoint_every=3, log_every=3)
  cfg.data.eval_max_examples = 32  # the final eval of each run: one small batch
  return cfg


def _checkpoint_params(workdir):
  return common.flat(checkpoint.load_latest(os.path.join(workdir, 'checkpoints'))[1]['params'])


@pytest.fixture(scope='module')
def llama_runs(hf_base, tmp_path_factory):
  """Workdirs of 6 adapter-only-checkpoint steps: uninterrupted, and stopped at 3 then resumed."""
  root = tmp_path_factory.mktemp('runs')
  whole, resumed = str(root / 'whole'), str(root / 'resumed')
  one = jax.devices()[:1]
  train.train_and_evaluate(_llama_lora(hf_base, 6), whole, devices=one)
  train.train_and_evaluate(_llama_lora(hf_base, 3), resumed, devices=one)
  results = train.train_and_evaluate(_llama_lora(hf_base, 6), resumed, devices=one)
  assert results['steps_this_run'] == 3
  return whole, resumed


@pytest.mark.slow  # three bigjax-train runs and an export: ~1.5 min on the loaded 2-core machine
def test_adapter_only_checkpoints_resume_bitwise_and_export_merged(llama_runs, hf_base, tmp_path):
  whole, resumed = llama_runs
  saved = _checkpoint_params(whole)
  assert saved and all(k.endswith(('/lora_a', '/lora_b')) for k in saved)  # the adapter only
  resumed_saved = _checkpoint_params(resumed)
  assert set(saved) == set(resumed_saved)
  for k in saved:
    assert saved[k].tobytes() == resumed_saved[k].tobytes(), k
  # The run as bigjax-export / -sample load it: the base rebuilt from init_from.hf around it.
  _, model, params = export.load_run(whole)
  base = transformers.LlamaForCausalLM.from_pretrained(hf_base).eval()
  ids = np.random.default_rng(0).integers(0, BYTES_VOCAB, size=(2, 16))
  adapted = np.asarray(model.apply({'params': params}, ids))
  with torch.no_grad():
    base_logits = base(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(adapted - base_logits).max() > 1e-3  # the adapter moved the model

  with pytest.raises(UserError, match=r"trained a config.peft.method='lora' adapter.*--merge"):
    export.export(whole, str(tmp_path / 'plain'))
  out = tmp_path / 'merged'
  export.main(['bigjax-export', f'--workdir={whole}', f'--to={out}', '--merge'])
  merged = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  with torch.no_grad():
    want = merged(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(adapted - want).max() / np.abs(want).max() <= 1e-4


@pytest.mark.slow  # the runs of llama_runs (shared) and one export
def test_export_adapter_writes_a_peft_adapter_with_the_runs_logits(llama_runs, hf_base, tmp_path):
  import peft as hf_peft

  out = tmp_path / 'adapter'
  export.main(['bigjax-export', f'--workdir={llama_runs[0]}', f'--to={out}', '--adapter'])
  base = transformers.LlamaForCausalLM.from_pretrained(hf_base)
  adapted = hf_peft.PeftModel.from_pretrained(base, str(out)).eval()
  _, model, params = export.load_run(llama_runs[0])
  ids = np.random.default_rng(0).integers(0, BYTES_VOCAB, size=(2, 16))
  got = np.asarray(model.apply({'params': params}, ids))
  with torch.no_grad():
    want = adapted(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


@pytest.mark.slow  # one bigjax-train run and two generations: ~40 s on the loaded machine
@pytest.mark.parametrize('name', ['gpt_shakespeare', 'llama_shakespeare'])
def test_sample_with_an_adapter_equals_its_merged_weights(tmp_path, name):
  """bigjax-sample of a GPT / Llama run with a DoRA adapter gives the tokens of the base model
  with the adapter merged into its weights (greedy, through the KV cache)."""
  cfg = load_config(name, 'smoke')
  cfg.peft.update(method='lora', target='(query|value|wo)/kernel', rank=4, alpha=8.0, dora=True)
  cfg.num_steps = 10
  workdir = str(tmp_path / 'lora')
  train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  prompt = 'ROMEO.\n'
  got = sample.sample(workdir, prompt, max_new_tokens=24, temperature=0.0)
  config, tokenizer, model, params = experiment.load_run(workdir)
  base = common.base_model(model)
  merged = peft.merged_params(config.peft, params)
  ids = tokenizer.encode(prompt)[None]
  want = generate(base, merged, ids, max_new_tokens=24, temperature=0.0)
  assert got == prompt + tokenizer.decode(np.asarray(want)[0])
  adapted_logits = np.asarray(model.apply({'params': params}, ids))
  flat = common.flat(params)
  base_only = {k: v for k, v in flat.items() if k.rsplit('/', 1)[1] not in peft.lora.PARAMS}
  base_logits = np.asarray(base.apply({'params': common.unflat(base_only)}, ids))
  assert np.abs(adapted_logits - base_logits).max() > 1e-3  # the adapter is not a no-op


# config.peft flags of the methods the 2-process test runs
PROCESS_METHODS = {
  'dora': ['method=lora', 'target=(query|value|lm_head)/kernel', 'rank=4', 'dora=true'],
  'adalora': [
    'method=adalora',
    'target=(query|value|lm_head)/kernel',
    'rank=4',
    'adalora.target_rank=2',
    'adalora.tinit=1',
    'adalora.tfinal=1',
  ],
  'prefix': ['method=prefix', 'virtual_tokens=4'],
}


def _run_processes(workdir, num_processes, devices, extra, method='dora'):
  """bigjax-train of the smoke Llama with a `method` adapter (PROCESS_METHODS) as
  `num_processes` local processes of `devices` CPU devices each (gloo collectives); returns their
  exit codes and stderr."""
  import subprocess
  import sys

  from test_multiprocess import _free_port, _wait

  from conftest import REPO

  cmd = [
    sys.executable,
    '-m',
    'bigjax.train',
    f'--workdir={workdir}',
    '--config=configs/llama_shakespeare.py:smoke',
    *(f'--config.peft.{flag}' for flag in PROCESS_METHODS[method]),
    '--config.num_steps=6',
    '--config.log_every=1',
    '--config.data.eval_max_examples=32',
    *extra,
  ]
  port = _free_port()
  dist = lambda i: (
    [
      f'--config.distributed.coordinator_address=127.0.0.1:{port}',
      f'--config.distributed.num_processes={num_processes}',
      f'--config.distributed.process_id={i}',
      '--config.distributed.timeout_s=60',
    ]
    if num_processes > 1
    else []
  )
  procs = [
    subprocess.Popen(
      cmd + dist(i),
      cwd=REPO,
      env=subprocess_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(num_processes)
  ]
  return _wait(procs, timeout=400)


@pytest.mark.slow  # two bigjax-train runs as subprocesses (three processes): ~2 min per method
@pytest.mark.parametrize('method', list(PROCESS_METHODS))
def test_adapter_on_two_processes_equals_one_device(tmp_path, method):
  """6 adapter steps (DoRA, AdaLoRA with pruning, prefix tuning) on (data=2, fsdp=2, tensor=2)
  over 2 processes x 4 devices equal 6 on one device: losses to 1e-5, every adapter parameter to
  1e-4 and the frozen base bitwise."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  codes, errs = _run_processes(one, 1, 1, [], method)
  assert codes == [0], errs
  mesh = ['--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2']
  codes, errs = _run_processes(two, 2, 4, mesh, method)
  assert codes == [0, 0], errs
  assert 'across 2 processes' in open(two / 'sharding.txt').readline()
  losses = lambda w: [
    h['loss'] for h in json.load(open(w / 'results.json'))['history'] if h['split'] == 'train'
  ]
  np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
  a, b = _checkpoint_params(str(one)), _checkpoint_params(str(two))
  assert set(a) == set(b)
  trainable = peft.METHODS.get(PROCESS_METHODS[method][0].split('=')[1]).PARAMS
  for k in a:
    if k.rsplit('/', 1)[1] in trainable:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    else:
      assert a[k].tobytes() == b[k].tobytes(), k
