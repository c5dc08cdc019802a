"""bigjax/compress/distill.py: the loss, alpha = 1 equals plain training, a teacher equal to the
student's init has KL 0, a teacher of another family, the mesh against one device, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from bigjax import checkpoint, experiment
from bigjax.compress import distill
from bigjax.data import pipeline
from bigjax.errors import DataError, UserError

from conftest import load_config


def _save_run(config, workdir, devices):
  """Writes workdir/config.json and workdir/checkpoints/0 = the config's initial train state (a
  'finished run' to distill from). Returns the state's params on the host."""
  exp = experiment.build(config, devices)
  state = exp.create_state()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(0, state)
  ckpt.close()
  return jax.device_get(state.params)


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  """{'init': the student's own initial state, 'cnn': an mnist_cnn's initial state} as run dirs."""
  root = tmp_path_factory.mktemp('teachers')
  device = jax.devices()[:1]
  _save_run(load_config('mnist_mlp_student', 'smoke'), str(root / 'init'), device)
  _save_run(load_config('mnist_cnn', 'smoke'), str(root / 'cnn'), device)
  return {'init': str(root / 'init'), 'cnn': str(root / 'cnn')}


def _student(teacher='', **kw):
  config = load_config('mnist_mlp_student', 'smoke')
  config.distill.update(teacher=teacher, **kw)
  return config


def _steps(config, devices, n=3):
  """(host params after n steps, [metrics of each step])."""
  exp = experiment.build(config, devices)
  state = exp.create_state()
  train_step = exp.compile_train_step()
  metrics = []
  for i in range(n):
    state, m = train_step(state, exp.to_global(exp.batches.batch(i)))
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


def test_kl_term_is_t_squared_kl_of_the_softened_distributions():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 5, 7)) * 3
  t = 3.0

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(teacher / t), softmax(student / t)
  want = t**2 * np.mean(np.sum(p * np.log(p / q), axis=-1))
  np.testing.assert_allclose(distill.kl_term(student, teacher, t), want, rtol=1e-5)
  assert float(distill.kl_term(student, student, t)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_equal_to_the_students_init_has_kl_zero_at_step_0(teachers, one_device):
  _, metrics = _steps(_student(teachers['init'], alpha=0.5), one_device, n=2)
  assert abs(float(metrics[0]['distill_kl'])) < 1e-6
  # loss = alpha * task + (1 - alpha) * 0 at step 0; after one update the student has moved
  np.testing.assert_allclose(metrics[0]['loss'], 0.5 * metrics[0]['task_loss'], rtol=1e-6)
  assert metrics[1]['distill_kl'] > 1e-6


@pytest.mark.slow  # two 20-step runs with a CNN teacher, ~80 s on 2 busy cores
def test_alpha_one_equals_plain_training(teachers, one_device):
  """A CNN teacher of an MLP student (another family): with alpha = 1 the parameters after 3 steps
  are bitwise those of plain training; with alpha = 0.5 they are not."""
  plain, plain_metrics = _steps(_student(), one_device)
  alone, metrics = _steps(_student(teachers['cnn'], alpha=1.0, temperature=4.0), one_device)
  jax.tree.map(np.testing.assert_array_equal, alone, plain)
  assert [m['loss'] for m in metrics] == [m['loss'] for m in plain_metrics]
  assert all(m['distill_kl'] > 1e-3 for m in metrics)  # the teacher ran and disagrees
  mixed, _ = _steps(_student(teachers['cnn'], alpha=0.5, temperature=4.0), one_device)
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), mixed, plain)
  assert max(jax.tree.leaves(diff)) > 1e-5


@pytest.mark.slow  # 2 builds and compiles, one on 8 devices
def test_distillation_on_the_mesh_equals_one_device(teachers, one_device):
  config = _student(teachers['cnn'], alpha=0.3, temperature=2.0)
  config.optim.update(name='sgd', lr=0.1)  # see tests/test_prune.py's mesh test
  ref, ref_metrics = _steps(config, one_device)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  exp = experiment.build(config)
  specs = [str(s.spec) for s in jax.tree.leaves(exp.shardings.teacher)]
  assert any('fsdp' in s or 'tensor' in s for s in specs), specs  # the teacher is sharded
  got, metrics = _steps(config, None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
  np.testing.assert_allclose(
    [m['distill_kl'] for m in metrics], [m['distill_kl'] for m in ref_metrics], rtol=1e-5
  )


@pytest.mark.slow  # a build, a compile and a split read: ~35 s on 2 busy cores
def test_distillation_on_an_unlabelled_split(teachers, one_device):
  """config.distill.split: the train batches come from train[:3000] and each step also takes a
  batch of train[3000:] (labels unread). Step 0 (a CNN teacher, an MLP student without
  dropout): distill_kl is kl_term of the two models on the split's batch (computed here), not on
  the train batch; task_loss is the train batch's loss; loss = alpha task + (1 - alpha) KL."""
  config = _student(teachers['cnn'], alpha=0.25, temperature=2.0, split='train[3000:]')
  config.data.train_split = 'train[:3000]'
  exp = experiment.build(config, one_device)
  state = exp.create_state()
  batch = exp.batches.batch(0)
  split_inputs = batch[distill.INPUTS]
  assert split_inputs.shape == batch['inputs'].shape
  held = load_config('mnist_mlp_student').data
  rows = pipeline.load_split(held.name, 'train[3000:]')['inputs'].reshape(1000, -1)
  assert all((rows == x.reshape(1, -1)).all(1).any() for x in split_inputs[:8])  # its rows
  again = exp.batches.batch(0)[distill.INPUTS]
  np.testing.assert_array_equal(again, split_inputs)  # a pure function of the step
  student = {'params': jax.device_get(state.params)}
  teacher = jax.device_get(state.teacher)
  _, metrics = exp.compile_train_step()(state, exp.to_global(batch))  # donates the state
  logits = lambda model, variables, x: model.apply(
    variables, np.asarray(x, np.float32) / 255.0, train=False
  )
  kl = lambda x: float(
    distill.kl_term(logits(exp.model, student, x), logits(exp.teacher.model, teacher, x), 2.0)
  )
  np.testing.assert_allclose(metrics['distill_kl'], kl(split_inputs), rtol=1e-5)
  assert abs(kl(split_inputs) - kl(batch['inputs'])) > 1e-3  # the other batch would differ
  task = exp.task.loss_and_metrics(logits(exp.model, student, batch['inputs']), batch)[0]
  np.testing.assert_allclose(metrics['task_loss'], task, rtol=1e-5)
  np.testing.assert_allclose(
    metrics['loss'], 0.25 * metrics['task_loss'] + 0.75 * metrics['distill_kl'], rtol=1e-6
  )


def test_bad_distill_split_is_one_line(teachers, one_device):
  cases = [
    (_student('', split='train[3000:]'), r"config.distill.split='train\[3000:\]' needs config"),
    (
      _student(teachers['init'], split='nosuch'),
      r"split 'nosuch' of dataset 'mnist5k' cannot be read",
    ),
  ]
  streamed = _student(teachers['init'], split='test')
  streamed.data.load = 'stream'
  cases.append((streamed, r"reads that split into memory; set config.data.load='memory'"))
  for config, message in cases:
    with pytest.raises((UserError, DataError), match=message) as e:
      experiment.build(config, one_device)
    assert '\n' not in str(e.value)


def test_teacher_with_outputs_of_another_shape_is_one_line(teachers, one_device):
  """distill.load's last check: a teacher whose outputs are not the student's shape (here the
  student is said to output 3 classes) is refused before anything is written."""
  from bigjax import steps

  config = _student(teachers['cnn'])
  exp = experiment.build(_student(), one_device)
  sample = steps.sample_batch(exp.task, {k: v[:1] for k, v in exp.train_arrays.items()})
  make = lambda cfg, arch: experiment.make_model(cfg, exp.data, exp.task, arch)
  with pytest.raises(UserError, match=r'outputs shape \(1, 10\) but the student outputs \(1, 3\)'):
    distill.load(config.distill, make, sample, (1, 3))
  teacher = distill.load(config.distill, make, sample, (1, 10))  # the true shape passes
  assert teacher.temperature == config.distill.temperature


def test_bad_teacher_is_one_line(teachers, tmp_path, one_device):
  # a teacher trained on another task (30 breast-cancer features, 2 classes)
  other = load_config('mlp_breast_cancer')
  _save_run(other, str(tmp_path / 'other'), one_device)
  cases = [
    (
      _student(str(tmp_path / 'other')),
      r"config.distill.teacher='.*other': its checkpoint does "
      r'not fit its model on this task',
    ),
    (_student(str(tmp_path / 'nothing')), r"config.distill.teacher='.*nothing' has no config.json"),
    (_student(teachers['init'], temperature=0.0), r'config.distill.temperature=0.0 must be > 0'),
    (_student(teachers['init'], alpha=1.5), r'config.distill.alpha=1.5 must be in \[0, 1\]'),
  ]
  for config, message in cases:
    with pytest.raises(UserError, match=message) as e:
      experiment.build(config, one_device)
    assert '\n' not in str(e.value)
  with open(tmp_path / 'other' / 'config.json') as f:
    assert json.load(f)['data']['name'] == 'breast_cancer'


@pytest.mark.slow  # builds the Shakespeare data and a GPT twice: ~60 s on 2 idle cores
def test_huggingface_teacher_gives_transformers_logits_to_the_kl(tmp_path, one_device):
  """config.distill.teacher = a transformers GPT-2 save_pretrained directory (random weights, the
  byte vocabulary): a fresh GPT student's first-step KL term equals kl_term of the student's
  logits against transformers' own logits of that batch (so the teacher ran with the checkpoint's
  weights), and a checkpoint missing a tensor is one line naming it."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(
    vocab_size=260, n_positions=32, n_embd=24, n_layer=2, n_head=3, initializer_range=0.2
  )
  hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
  hf_model.save_pretrained(str(tmp_path / 'gpt2'), safe_serialization=True)
  config = load_config('gpt_shakespeare', 'smoke')
  config.distill.update(teacher=str(tmp_path / 'gpt2'), temperature=2.0, alpha=0.5)
  exp = experiment.build(config, one_device)
  state = exp.create_state()
  batch = exp.task.prepare(exp.batches.batch(0), None)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(np.asarray(batch['inputs'], np.int64))).logits.numpy()
  student = exp.model.apply({'params': state.params}, batch['inputs'], train=False)
  kl_want = float(distill.kl_term(student, want, 2.0))
  _, metrics = exp.compile_train_step()(state, exp.to_global(exp.batches.batch(0)))
  assert kl_want > 0.1  # a random student and a random teacher disagree
  np.testing.assert_allclose(float(metrics['distill_kl']), kl_want, rtol=1e-4)

  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(tmp_path / 'gpt2' / 'model.safetensors'))
  tensors = {k: v for k, v in tensors.items() if 'h.1.mlp.c_fc' not in k}
  save_file(tensors, str(tmp_path / 'gpt2' / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(UserError, match=r"h\.1\.mlp\.c_fc") as e:
    experiment.build(config, one_device)
  assert '\n' not in str(e.value)
