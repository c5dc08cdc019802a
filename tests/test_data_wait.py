"""results.json reports the time the training loop waited for its batches (issue 19's data path):
throughput.data_wait_s and data_wait_fraction = data_wait_s / the timed steps' wall time.

No timing threshold: a loader slowed by a known sleep per batch must be reported as waiting at
least that long, and the fraction must agree with its parts.
"""

import time

import pytest

from bigjax import experiment, train

from conftest import load_config

DELAY_S = 0.05  # slept before each batch is handed to the loop


def test_data_wait_is_reported_and_counts_a_slow_loader(tmp_path, monkeypatch, one_device):
  original = experiment.Experiment.device_batches

  def slow_batches(self, start):
    for batch in original(self, start):
      time.sleep(DELAY_S)
      yield batch

  monkeypatch.setattr(experiment.Experiment, 'device_batches', slow_batches)
  config = load_config('mnist_cnn', 'smoke')
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  t = results['throughput']
  timed_s = t['step_time_s'] * t['steps_timed']
  assert t['steps_timed'] == 19  # the first step is warm-up, as for the other throughput fields
  assert t['data_wait_s'] >= t['steps_timed'] * DELAY_S  # every timed step waited its sleep
  assert 0.0 <= t['data_wait_fraction'] <= 1.0
  assert t['data_wait_fraction'] == pytest.approx(t['data_wait_s'] / timed_s)
