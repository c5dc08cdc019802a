"""Watching a run: console eval lines with the learning rate, TensorBoard scalars (lr, steps/s)
and an HParams entry, a W&B offline run (its config and scalars read back), and a jax.profiler
trace of config.profile_steps."""

import glob
import json
import os
import struct
import zlib

import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from bigjax import config_lib, train
from bigjax.errors import UserError

from conftest import load_config


def read_events(directory):
  """Every Event in the TensorBoard event files under `directory` (TFRecord framing: length,
  length CRC, payload, payload CRC; read directly so the test needs no TensorFlow)."""
  events = []
  for path in sorted(
    glob.glob(os.path.join(directory, '**', 'events.out.tfevents.*'), recursive=True)
  ):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset : offset + 8])
      payload = data[offset + 12 : offset + 12 + length]
      offset += 12 + length + 4
      events.append(event_pb2.Event.FromString(payload))
  return events


def scalars(events, tag):
  """[(step, value)] of a scalar tag."""
  return [
    (e.step, v.simple_value)
    for e in events
    if e.HasField('summary')
    for v in e.summary.value
    if v.tag == tag
  ]


def read_wandb_records(path):
  """Every record of a W&B run log (`run-<id>.wandb`, what `wandb sync` uploads): a 7-byte file
  header (':W&B', magic, version), then LevelDB's log format (32 KiB blocks; each piece a 7-byte
  header: CRC, length, type 1 full / 2 first / 3 middle / 4 last) around `Record` protobufs."""
  from wandb.proto import wandb_internal_pb2

  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B', data[:7]
  block, offset, pieces, records = 32768, 7, b'', []
  while offset + 7 <= len(data):
    left = block - offset % block
    if left < 7:  # a block's tail too short for a header is padding
      offset += left
      continue
    _, length, kind = struct.unpack('<IHB', data[offset : offset + 7])
    if kind == 0:  # zero padding to the end of the block
      offset += left
      continue
    pieces += data[offset + 7 : offset + 7 + length]
    offset += 7 + length
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(pieces))
      pieces = b''
  return records


def _wandb_key(item):
  return '/'.join(item.nested_key) or item.key


@pytest.fixture(scope='module')
def watched_run(tmp_path_factory):
  """The MLP smoke run (42 steps) with warmup + cosine, an eval every 14 steps, a trace of steps
  5..8 and a W&B offline run."""
  workdir = tmp_path_factory.mktemp('watched')
  config = load_config('mlp_breast_cancer', 'smoke')
  config.optim.schedule = 'warmup_cosine'
  config.optim.warmup_steps = 10
  config.log_every = 7
  config.eval_every = 14
  config.profile_steps = (5, 8)
  config.wandb.project = 'bigjax-test'
  import jax

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('WANDB_MODE', 'offline')
    mp.setenv('WANDB_SILENT', 'true')
    results = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return config, workdir, results


def test_tensorboard_has_lr_steps_per_s_and_hparams(watched_run):
  config, workdir, results = watched_run
  events = read_events(workdir / 'tensorboard')
  lr = scalars(events, 'train/lr')
  total = results['step']
  assert [s for s, _ in lr] == list(range(7, total + 1, 7))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.optim.lr, 10, total, config.optim.lr * config.optim.end_lr_fraction
  )
  np.testing.assert_allclose([v for _, v in lr], [float(schedule(s - 1)) for s, _ in lr], rtol=1e-6)
  rates = [v for _, v in scalars(events, 'train/steps_per_s')]
  assert len(rates) == len(lr) and all(r > 1 for r in rates)  # a smoke MLP runs >> 1 step/s
  # HParams: the plugin's experiment entry names config fields; the session entry holds values.
  plugin = [
    v
    for e in events
    if e.HasField('summary')
    for v in e.summary.value
    if v.tag.startswith('_hparams_')
  ]
  tags = {v.tag for v in plugin}
  assert {'_hparams_/experiment', '_hparams_/session_start_info'} <= tags
  start = next(
    v for v in plugin if v.tag == '_hparams_/session_start_info'
  ).metadata.plugin_data.content
  assert b'optim.lr' in start and b'model.name' in start and b'warmup_cosine' in start
  experiment = next(
    v for v in plugin if v.tag == '_hparams_/experiment'
  ).metadata.plugin_data.content
  assert b'eval/accuracy' in experiment
  assert scalars(events, 'eval/accuracy')[-1] == (total, pytest.approx(results['eval']['accuracy']))


def test_console_prints_every_eval_with_its_lr(watched_run, capsys, tmp_path):
  config, _, _ = watched_run
  import jax

  config.wandb.project = ''
  config.profile_steps = ()
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  err = capsys.readouterr()
  text = err.out + err.err
  lines = [l for l in text.splitlines() if l.startswith('step ') and ': eval ' in l]
  assert [l.split(':')[0] for l in lines] == ['step 14', 'step 28']  # the final eval prints apart
  assert all('accuracy=' in l and '(lr ' in l for l in lines)


def test_wandb_offline_run_holds_the_config_and_the_scalars(watched_run):
  config, workdir, results = watched_run
  runs = glob.glob(str(workdir / 'wandb' / 'offline-run-*'))
  assert len(runs) == 1, os.listdir(workdir / 'wandb')
  run_id = f'bigjax-{zlib.crc32(str(workdir).encode()):08x}'  # a resumed run logs into the same
  records = read_wandb_records(os.path.join(runs[0], f'run-{run_id}.wandb'))
  run = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
  assert (run.run_id, run.project) == (run_id, 'bigjax-test')
  sent = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert sent['optim.lr'] == config.optim.lr and sent['optim.schedule'] == 'warmup_cosine'
  assert sent['model.name'] == config.model.name and sent['eval_every'] == 14
  history = {}  # step -> {key: value}
  for r in records:
    if r.WhichOneof('record_type') == 'history':
      row = {_wandb_key(i): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(row['_step'], {}).update(row)
  # The same scalars as TensorBoard: train/lr at every log step, eval/accuracy at every eval.
  tb = read_events(workdir / 'tensorboard')
  lr = {s: h['train/lr'] for s, h in history.items() if 'train/lr' in h}
  assert sorted(lr) == [s for s, _ in scalars(tb, 'train/lr')]
  np.testing.assert_allclose([lr[s] for s in sorted(lr)], [v for _, v in scalars(tb, 'train/lr')])
  accuracy = {s: h['eval/accuracy'] for s, h in history.items() if 'eval/accuracy' in h}
  assert sorted(accuracy) == [14, 28, results['step']]
  assert accuracy[results['step']] == pytest.approx(results['eval']['accuracy'])


def test_profile_steps_write_a_trace(watched_run):
  _, workdir, _ = watched_run
  traces = glob.glob(str(workdir / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 10_000


@pytest.mark.parametrize('steps', [(5,), (8, 5), (-1, 3)])
def test_bad_profile_steps_are_one_line(steps):
  config = load_config('mlp_breast_cancer', 'smoke')
  config.profile_steps = steps
  with pytest.raises(UserError, match=r'^config.profile_steps=.* must be two step numbers'):
    config_lib.check_ranges(config)
