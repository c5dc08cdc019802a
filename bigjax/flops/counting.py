"""Model FLOPs of a training step (analytic, from the model family) and XLA's count.

The analytic count comes from the model: a model class may define

  train_flops_per_example(self, params, input_shape) -> int | None
      training FLOPs (forward + backward) of ONE example; params: the (abstract) params tree,
      input_shape: the shape of one example's inputs, e.g. (T,) for tokens, (H, W, C) for images;
  transformer_shape(self, input_shape) -> (kind, L, T, d, patches)   (transformers only)

and this module multiplies by the batch size. It imports no model class: adding a model never
edits bigjax.flops. Models without `train_flops_per_example` have no analytic count (None).
`transformer_train_flops` is the shared 6 * N * T + 12 * L * T^2 * d formula transformers use.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Top-level params that are only looked up (multiply nothing): position and segment embeddings,
# the ViT class token.
LOOKUP_TABLES = ('position_embed', 'segment_embed', 'cls')
# Top-level params of heads that run on one vector per example (BERT pooler, classifier and NSP
# head, the ViT head).
PER_EXAMPLE_HEADS = ('pooler', 'classifier', 'nsp', 'head')


def param_count(tree: Any) -> int:
  """Number of parameters (array elements) in a pytree of arrays or ShapeDtypeStructs."""
  import jax

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def transformer_train_flops(
  params: Mapping[str, Any],
  *,
  num_layers: int,
  seq_len: int,
  embed_dim: int,
  patches: int = 0,
  lookup: Iterable[str] = LOOKUP_TABLES,
  per_example: Iterable[str] = (),
  per_patch: Iterable[str] = (),
) -> int:
  """Training FLOPs of one example through a transformer: forward + backward = 3x forward.

  6 * N_token * T + 6 * N_patch * patches + 6 * N_example + 12 * L * T * d * T, where the N_* are
  parameter counts of the top-level entries of `params` grouped by how often they multiply:
  `lookup` entries never (left out), `per_patch` once per ViT patch, `per_example` once per
  example, all others once per token. T = seq_len (what the stack sees), d = embed_dim,
  L = num_layers; the last term is attention's scores and weighted sum (no causal saving).
  """
  lookup, per_example, per_patch = set(lookup), set(per_example), set(per_patch)
  n_token = n_patch = n_example = 0
  for name, sub in params.items():
    if name in lookup:
      continue
    n = param_count(sub)
    if name in per_patch:
      n_patch += n
    elif name in per_example:
      n_example += n
    else:
      n_token += n
  return (
    6 * n_token * seq_len
    + 6 * n_patch * patches
    + 6 * n_example
    + 12 * num_layers * seq_len * embed_dim * seq_len
  )


def _input_shape(exp) -> tuple[int, ...]:
  return tuple(int(n) for n in exp.sample['inputs'].shape[1:])


def transformer_shape(exp: Any) -> tuple[str, int, int, int, int] | None:
  """(kind, L, T, d, patches) of an Experiment whose model is a transformer, else None.

  From `exp.model.transformer_shape(input_shape)`. T: sequence length the transformer stack sees
  (ViT: patches + 1 with the class token); patches: ViT patches per image (0 otherwise)."""
  shape = getattr(exp.model, 'transformer_shape', None)
  return None if shape is None else shape(_input_shape(exp))


def analytic_train_flops(exp: Any) -> float | None:
  """Model FLOPs of one training step (forward + backward = 3x forward) for the global batch.

  exp.model.train_flops_per_example(exp.abstract.params, per-example input shape) times
  exp.config.batch_size. For gpt/bert/vit that is 6 * N * tokens + 12 * L * T * d * tokens with
  tokens = batch * T, N counting the parameters that act on every token (all but lookup tables:
  position/segment embeddings, the ViT class token, BERT's untied token embedding); heads that run
  once per example (BERT pooler, classifier and NSP head, ViT head) count 6 * params * batch and
  the ViT patch embedding 6 * params * batch * patches. Returns a float, or None for models with
  no analytic count.
  """
  count = getattr(exp.model, 'train_flops_per_example', None)
  if count is None:
    return None
  per_example = count(exp.abstract.params, _input_shape(exp))
  return None if per_example is None else float(per_example * exp.config.batch_size)


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a jax AOT `Compiled` per XLA's cost analysis, or None if unavailable.

  Per device: on a mesh this is the SPMD-partitioned program of one device (multiply by the
  number of devices for the whole step). A while loop's body (nn.scan, gradient accumulation)
  counts once, whatever its trip count; custom calls (cuDNN attention) count zero.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  if not analysis or analysis.get('flops') is None:
    return None
  flops = float(analysis['flops'])
  return flops if flops > 0 else None
