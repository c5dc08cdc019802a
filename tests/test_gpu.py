"""GPU correctness: cuDNN flash attention and bf16 training against float32 (skipped without a GPU).

  JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_gpu.py

Deselected by default (addopts: -m 'not slow and not gpu'). conftest.py defaults JAX_PLATFORMS to
cpu, so give it explicitly on a GPU machine; without a GPU every test here is skipped. The checks
are those of experiments/bench/gpu_checks.py (the same functions, imported from that script; it
prints the full tables), asserted at its ATTENTION_TOL and TRAINING_REL_TOL:
  * cuDNN attention vs bigjax's XLA attention in float32 on the same bf16 inputs: relative error of
    the output and of the q, k, v gradients below ATTENTION_TOL, for causal, padded and plain
    attention.
  * gpt_shakespeare:size=small trained for a short run in bfloat16 (XLA and cuDNN attention)
    follows the float32 run's logged train losses within TRAINING_REL_TOL, and all of them learn.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(jax.devices()[0].platform != 'gpu', reason='needs a GPU'),
]

TRAIN_STEPS = 60  # logged every 10 steps: 6 points per curve


def _gpu_checks():
  """experiments/bench/gpu_checks.py as a module (a script, not a package: loaded by path)."""
  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'experiments',
    'bench',
    'gpu_checks.py',
  )
  spec = importlib.util.spec_from_file_location('bench_gpu_checks', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


checks = _gpu_checks()


def test_cudnn_attention_matches_float32_xla():
  rows = checks.attention_check()
  assert [name for name, _, _ in rows] == ['causal', 'padding', 'plain', 'causal+padding']
  for name, out_err, grad_err in rows:
    assert np.isfinite(out_err) and np.isfinite(grad_err), name
    assert out_err < checks.ATTENTION_TOL, (name, out_err)
    assert grad_err < checks.ATTENTION_TOL, (name, grad_err)


def test_bf16_training_follows_float32():
  rows = {r[0]: r[1:] for r in checks.training_check(TRAIN_STEPS)}
  assert list(rows) == list(checks.VARIANTS)
  for name, (dmax, drel, first, last, final) in rows.items():
    assert all(np.isfinite([dmax, drel, first, last, final])), name
    assert last < first - 0.5, (name, first, last)  # it learns: fp32 on CPU 5.49 -> 3.52 at 60
    assert drel < checks.TRAINING_REL_TOL, (name, drel)
    ref_final = rows['float32 + xla'][4]
    assert abs(final - ref_final) / ref_final < checks.TRAINING_REL_TOL, (name, final, ref_final)
