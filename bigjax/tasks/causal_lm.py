"""Causal language modelling: next-token cross-entropy, perplexity, bits per byte.

A batch holds token windows {'inputs': (B, T + 1)}; `prepare` splits them into model inputs
(B, T) and targets (B, T) on device. Packed windows (config.data.pack, bigjax.data.packing) also
hold 'segment_ids' and 'positions' (B, T + 1): the model gets those of its inputs (attention stays
inside a document) and a target counts only when it lies in its input's document (`weights`), so
no loss crosses a document boundary. With the byte-level tokenizer one token is one byte, so
bits per byte = loss / ln 2.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigjax.data import pipeline
from bigjax.tasks import base


class Task(base.Task):
  """V = data.vocab_size (the tokenizer's), the model's output size; label_smoothing: as in
  classification."""

  def __init__(self, data: base.DataInfo, label_smoothing: float = 0.0):
    super().__init__(data)
    self.vocab_size = data.require('vocab_size', 'causal_lm')
    self.label_smoothing = label_smoothing

  @property
  def output_size(self) -> int:
    return self.vocab_size

  report_metrics = ('loss', 'perplexity', 'bits_per_byte', 'accuracy')

  def check_data(self, arrays, name, split):
    pipeline.check_tokens(arrays, self.vocab_size, name, split)

  def prepare(self, batch, rng):
    """{'inputs': (B, T+1)[, 'segment_ids', 'positions': (B, T+1)]} -> {'inputs': (B, T) tokens,
    'targets': (B, T) next tokens[, 'segment_ids', 'positions': (B, T) of the inputs, 'weights':
    (B, T) float32, 1 where the target lies in its input's document]}."""
    del rng
    tokens = batch['inputs']
    chex.assert_rank(tokens, 2)
    out = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    if 'segment_ids' in batch:
      segments = batch['segment_ids']
      chex.assert_equal_shape([tokens, segments, batch['positions']])
      out['segment_ids'] = segments[:, :-1]
      out['positions'] = batch['positions'][:, :-1]
      out['weights'] = (segments[:, 1:] == segments[:, :-1]).astype(jnp.float32)
    return out

  @staticmethod
  def _weights(batch):
    """(B, T) float32 target weights: the packed batch's, else all ones."""
    if 'weights' in batch:
      return batch['weights']
    return jnp.ones(batch['targets'].shape, jnp.float32)

  def _token_losses(self, logits, targets):
    chex.assert_shape(logits, (*targets.shape, self.vocab_size))
    if self.label_smoothing:
      soft = optax.smooth_labels(jax.nn.one_hot(targets, self.vocab_size), self.label_smoothing)
      return optax.softmax_cross_entropy(logits, soft)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  def loss_and_metrics(self, logits, batch):
    """logits (B, T, V) float32 -> (mean token loss, {'accuracy': next-token accuracy})."""
    weights = self._weights(batch)
    total = jnp.maximum(weights.sum(), 1.0)
    losses = self._token_losses(logits, batch['targets'])
    correct = logits.argmax(-1) == batch['targets']
    return (losses * weights).sum() / total, {'accuracy': (correct * weights).sum() / total}

  def eval_outputs(self, logits, batch):
    """Per example: summed token NLL (no smoothing), correct tokens, token count -> (B,) each."""
    targets, weights = batch['targets'], self._weights(batch)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return {
      'nll': (nll * weights).sum(-1),
      'correct': ((logits.argmax(-1) == targets) * weights).sum(-1),
      'tokens': weights.sum(-1),
    }

  def eval_report(self, outputs, labels):
    """-> {'loss' (nats/token), 'perplexity', 'bits_per_byte', 'accuracy'} over the eval split."""
    del labels
    tokens = outputs['tokens'].sum()
    loss = float(outputs['nll'].sum() / tokens)
    return {
      'loss': loss,
      'perplexity': float(np.exp(loss)),
      'bits_per_byte': loss / np.log(2),
      'accuracy': float(outputs['correct'].sum() / tokens),
    }
