"""Masked-LM pretraining (BERT): 15% of tokens chosen, 80% -> [MASK], 10% -> random, 10% kept;
plus the next-sentence loss when the batch has pairs (batch['label'] = is_next).

The model returns {'mlm_logits': (B, T, V), 'nsp_logits': (B, 2)} (bert.Model with head='pretrain').
"""

import chex
import jax
import jax.numpy as jnp
import optax

from bigjax.data import pipeline
from bigjax.tasks import base


class Task(base.Task):
  """V, the mask id and the regular-token count come from the tokenizer (data); token ids >=
  num_regular_tokens (PAD, CLS, SEP, MASK) are never chosen."""

  def __init__(self, data: base.DataInfo, mask_rate: float = 0.15, next_sentence: bool = True):
    super().__init__(data)
    self.vocab_size = data.require('vocab_size', 'masked_lm')
    self.mask_id = data.require('mask_id', 'masked_lm')
    self.num_regular_tokens = data.require('num_regular_tokens', 'masked_lm')
    self.mask_rate = mask_rate
    self.next_sentence = next_sentence

  @property
  def output_size(self) -> int:
    return self.vocab_size

  @property
  def report_metrics(self) -> tuple[str, ...]:
    return ('loss', 'mlm_loss', 'mlm_accuracy') + (('nsp_accuracy',) if self.next_sentence else ())

  def check_data(self, arrays, name, split):
    pipeline.check_tokens(arrays, self.vocab_size, name, split)

  def prepare(self, batch, rng):
    """{'inputs': (B, T)[, 'segment_ids', 'label']} -> adds 'targets' (B, T) original tokens and
    'weights' (B, T) 1.0 where a token was chosen; 'inputs' becomes the corrupted sequence."""
    tokens = batch['inputs']
    chex.assert_rank(tokens, 2)
    k_choose, k_how, k_random = jax.random.split(rng, 3)
    chosen = (jax.random.uniform(k_choose, tokens.shape) < self.mask_rate) & (
      tokens < self.num_regular_tokens
    )
    how = jax.random.uniform(k_how, tokens.shape)
    random_tokens = jax.random.randint(k_random, tokens.shape, 0, self.num_regular_tokens)
    corrupted = jnp.where(chosen & (how < 0.8), self.mask_id, tokens)
    corrupted = jnp.where(chosen & (how >= 0.8) & (how < 0.9), random_tokens, corrupted)
    out = dict(
      batch,
      inputs=corrupted.astype(tokens.dtype),
      targets=tokens,
      weights=chosen.astype(jnp.float32),
    )
    if not self.next_sentence:
      out.pop('label', None)
    return out

  def _mlm(self, logits, batch):
    chex.assert_shape(logits, (*batch['targets'].shape, self.vocab_size))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    correct = (logits.argmax(-1) == batch['targets']).astype(jnp.float32)
    return nll * batch['weights'], correct * batch['weights']

  def loss_and_metrics(self, outputs, batch):
    """MLM loss (mean over chosen tokens) + next-sentence loss when batch has 'label'."""
    nll, correct = self._mlm(outputs['mlm_logits'], batch)
    count = jnp.maximum(batch['weights'].sum(), 1.0)
    mlm_loss = nll.sum() / count
    metrics = {'mlm_loss': mlm_loss, 'mlm_accuracy': correct.sum() / count}
    loss = mlm_loss
    if 'label' in batch:
      nsp_logits = outputs['nsp_logits']
      loss = (
        loss + optax.softmax_cross_entropy_with_integer_labels(nsp_logits, batch['label']).mean()
      )
      metrics['nsp_accuracy'] = (nsp_logits.argmax(-1) == batch['label']).mean()
    return loss, metrics

  def eval_outputs(self, outputs, batch):
    """Per example (B,): MLM nll sum, correct and chosen counts; next-sentence correctness."""
    nll, correct = self._mlm(outputs['mlm_logits'], batch)
    out = {'nll': nll.sum(-1), 'correct': correct.sum(-1), 'count': batch['weights'].sum(-1)}
    if 'label' in batch:
      out['nsp_correct'] = (outputs['nsp_logits'].argmax(-1) == batch['label']).astype(jnp.float32)
    return out

  def eval_report(self, outputs, labels):
    """-> {'mlm_loss', 'mlm_accuracy'[, 'nsp_accuracy']}; 'loss' is the MLM loss."""
    del labels
    count = max(float(outputs['count'].sum()), 1.0)
    report = {
      'mlm_loss': float(outputs['nll'].sum()) / count,
      'mlm_accuracy': float(outputs['correct'].sum()) / count,
    }
    report['loss'] = report['mlm_loss']
    if 'nsp_correct' in outputs:
      report['nsp_accuracy'] = float(outputs['nsp_correct'].mean())
    return report
