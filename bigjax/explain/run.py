"""A trained run, loaded for explaining: config, model, newest checkpoint on the run's mesh, and
the inputs to explain (eval-split rows, an image file, a text string, or arrays), checked.

  run = load_run('runs/mnist_cnn')          # devices: default all, as the run's mesh config says
  x, context = run.inputs(indices=[0, 1])   # or run.inputs(array) / run.inputs(text='ROMEO.')
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from bigjax import checkpoint, experiment
from bigjax import mesh as mesh_lib
from bigjax.errors import UserError
from bigjax.explain.scores import Scorer

TEXT_MODELS = ('gpt', 'bert')


@dataclasses.dataclass
class Run:
  """exp: the run's Experiment (built from its config.json; nothing written). variables: {'params',
  ...model_state} placed with the run's shardings. kind: 'image' | 'tabular' | 'text'."""

  workdir: str
  exp: experiment.Experiment
  variables: Any
  step: int
  kind: str
  tokenizer: Any

  @property
  def model_name(self) -> str:
    return self.exp.config.model.name

  @property
  def scorer(self) -> Scorer:
    return Scorer(self.exp.model, text=self.kind == 'text')

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's model input shape (after the task's prepare): (H, W, C), (F,) or (T,)."""
    return tuple(self.exp.sample['inputs'].shape[1:])

  def describe(self) -> str:
    return f'this {self.exp.config.data.name} {self.model_name} run'

  def to_device(self, x: Any) -> Any:
    """Host arrays (B, ...) -> on the run's mesh: split over its batch axes when B divides, else
    replicated."""
    mesh = self.exp.mesh
    b = jax.tree.leaves(x)[0].shape[0]
    ok = b % mesh_lib.data_parallel_size(mesh) == 0
    sharding = mesh_lib.batch_sharding(mesh) if ok else mesh_lib.replicated(mesh)
    return jax.device_put(x, sharding)

  # -- inputs -----------------------------------------------------------------------------------
  def eval_rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Rows of the eval split, prepared as the task feeds the model ({'inputs', 'label'?, ...})."""
    arrays = self.exp.eval_arrays
    n = len(arrays['inputs'])
    bad = [i for i in indices if not -n <= i < n]
    if bad:
      raise UserError(
        f'--inputs: index {bad[0]} is outside the eval split ({n} examples); give indices 0..{n - 1}'
      )
    rows = {k: np.asarray(v)[list(indices)] for k, v in arrays.items()}
    if self.model_name == 'gpt':  # (B, T + 1) windows -> (B, T) inputs
      rows['inputs'] = rows['inputs'][:, :-1]
    return rows

  def check_inputs(self, x: Any) -> np.ndarray:
    """An array of model inputs, one example or a batch -> (B, *input_shape), images as float32 in
    [0, 1]; wrong shape or dtype -> one-line UserError."""
    x = np.asarray(x)
    want = self.input_shape
    if self.kind == 'text':
      if x.ndim == 1:
        x = x[None]
      if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise UserError(
          f'inputs of shape {x.shape} and dtype {x.dtype} do not fit {self.describe()}, which '
          'takes (B, T) integer token ids; give token ids or a text string'
        )
      vocab = self.exp.model.vocab_size
      if x.size and (x.min() < 0 or x.max() >= vocab):
        raise UserError(f'token ids must lie in [0, {vocab}); got {x.min()}..{x.max()}')
      if x.shape[1] > self.exp.model.max_len:
        raise UserError(
          f'{x.shape[1]} tokens exceed the model max_len={self.exp.model.max_len}; shorten the input'
        )
      return x.astype(np.int32)
    if x.shape == want:
      x = x[None]
    if x.ndim != len(want) + 1 or x.shape[1:] != want:
      kind = 'images' if self.kind == 'image' else 'feature rows'
      raise UserError(
        f'inputs of shape {x.shape} do not fit {self.describe()}, which takes {kind} of shape '
        f'(B, {", ".join(map(str, want))}); resize or select the inputs to that shape'
      )
    if x.dtype == np.uint8:
      return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
      raise UserError(
        f'inputs of dtype {x.dtype} do not fit {self.describe()}: give float inputs (or uint8 images)'
      )
    return x.astype(np.float32)

  def encode_text(self, texts: Sequence[str]) -> np.ndarray:
    """Text strings -> (B, T) token ids as the run's data view builds them: GPT the plain tokens,
    BERT [CLS] + tokens, padded to the longest."""
    if self.kind != 'text':
      raise UserError(
        f'--inputs is text but {self.describe()} takes {self.kind} inputs; give eval-split '
        'indices (e.g. --inputs=0,1,2) or an image file'
      )
    tok = self.tokenizer
    ids = [np.asarray(tok.encode(t), np.int32) for t in texts]
    if self.model_name == 'bert':
      ids = [np.concatenate([[tok.cls], i]).astype(np.int32) for i in ids]
    if any(len(i) == 0 for i in ids):
      raise UserError('--inputs: an empty text has no tokens to explain; give some text')
    width = max(len(i) for i in ids)
    pad = tok.pad if tok.pad is not None else 0
    return self.check_inputs(
      np.stack([np.concatenate([i, np.full(width - len(i), pad, np.int32)]) for i in ids])
    )

  def default_positions(self, tokens_BT: np.ndarray) -> np.ndarray:
    """(B,) the last real (non-pad) token of each row: where GPT's next token is predicted."""
    pad = self.tokenizer.pad if self.tokenizer is not None else None
    if pad is None:
      return np.full(len(tokens_BT), tokens_BT.shape[1] - 1, np.int32)
    real = tokens_BT != pad
    return np.where(real.any(1), tokens_BT.shape[1] - 1 - np.argmax(real[:, ::-1], 1), 0).astype(
      np.int32
    )


def _kind(config, sample_inputs) -> str:
  if config.model.name in TEXT_MODELS:
    return 'text'
  return 'tabular' if sample_inputs.ndim == 2 else 'image'


def load_run(workdir: str, devices: Sequence[Any] | None = None) -> Run:
  """Loads the run in `workdir` (its config.json and newest checkpoint) onto the mesh its config
  describes over `devices` (default: all). One-line UserErrors for a workdir without a config or
  checkpoint."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'--workdir={workdir} holds no config.json; give the workdir of a bigjax run')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpts = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpts) or not any(s.isdigit() for s in os.listdir(ckpts)):
    raise UserError(
      f'--workdir={workdir} holds no checkpoint yet; train it first (or wait for its first checkpoint)'
    )
  exp = experiment.build(config, devices)
  try:
    step, state = checkpoint.load_latest(ckpts)
  except FileNotFoundError:
    raise UserError(
      f'--workdir={workdir} holds no checkpoint yet; train it first (or wait for its first checkpoint)'
    ) from None
  shardings = exp.shardings
  variables = {
    'params': jax.device_put(state['params'], shardings.params),
    **jax.device_put(dict(state.get('model_state') or {}), dict(shardings.model_state)),
  }
  tokenizer = experiment.tokenizer_for(config)
  return Run(workdir, exp, variables, int(step), _kind(config, exp.sample['inputs']), tokenizer)
