"""Attention: dot-product attention kernels, masks, positions and a multi-head attention layer.

Shapes use B batch, T query length, S key/value length, N query heads, K key/value heads (K divides
N; each group of G = N/K query heads shares one key/value head: K = N is multi-head, 1 < K < N
grouped-query, K = 1 multi-query attention), H head size, D model width.

Masks are boolean, broadcastable to (B, N, T, S), True = may attend. Biases are added to the logits
and are broadcastable to (B, N, T, S). A query row with no key to attend gives zeros (never NaN).
Causal masking aligns the *last* query with the *last* key, so that with T < S (decoding against a
cache of S keys) query i attends keys j <= i + S - T.

`dot_product_attention(..., implementation=)` picks the kernel by name from IMPLEMENTATIONS
(a `bigjax.registry.Registry`: 'xla', 'cudnn', 'chunked'); `MultiHeadAttention` is the Linen layer,
with an optional KV cache for incremental decoding. New logical axis names: 'heads' (query heads),
'kv_heads' (key/value heads), 'kv' (head size) and 'length' (position tables), next to 'embed'
from `layers`.

Modules: `kernels` (masks, reference, 'xla' and 'cudnn' kernels, the dispatch), `chunked` (the
blockwise kernel with its custom VJP), `positions` (sinusoidal, learned, rotary), `layer`.
"""

from bigjax.models.attention import chunked  # registers 'chunked' in IMPLEMENTATIONS
from bigjax.models.attention.kernels import (
  IMPLEMENTATIONS,
  causal_mask,
  combine_masks,
  dot_product_attention,
  padding_mask,
  reference_attention,
)
from bigjax.models.attention.layer import MultiHeadAttention, decode_start, decode_with_cache
from bigjax.models.attention.positions import LearnedPositions, apply_rotary, sinusoidal_positions

__all__ = [
  'IMPLEMENTATIONS',
  'LearnedPositions',
  'MultiHeadAttention',
  'apply_rotary',
  'causal_mask',
  'chunked',
  'combine_masks',
  'decode_start',
  'decode_with_cache',
  'dot_product_attention',
  'padding_mask',
  'reference_attention',
  'sinusoidal_positions',
]
