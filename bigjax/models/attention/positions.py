"""Position encodings: fixed sinusoids, learned absolute embeddings and rotary (RoPE).

Shapes: B batch, T positions, N heads, H head size, D model width.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError
from bigjax.models import layers


def sinusoidal_positions(T: int, D: int, base: float = 10000.0) -> jax.Array:
  """(T, D) float32 sinusoids (Vaswani et al.): [p, 2i] = sin(p / base^(2i/D)), [p, 2i+1] = cos."""
  pos = np.arange(T, dtype=np.float64)[:, None]
  dim = np.arange(D)
  angle = pos / np.power(base, (dim - dim % 2) / D)[None, :]
  return jnp.asarray(np.where(dim % 2 == 0, np.sin(angle), np.cos(angle)), jnp.float32)


class LearnedPositions(nn.Module):
  """Learned absolute position embeddings: positions (B, T) int -> (B, T, features).

  The 'embedding' param (max_len, features) has logical axes ('length', 'embed'). Positions must lie
  in [0, max_len); out-of-range positions give NaN (jnp.take's 'fill' mode).
  """

  max_len: int
  features: int
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    chex.assert_rank(positions_BT, 2)
    table = self.param(
      'embedding',
      layers.partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
      (self.max_len, self.features),
      jnp.dtype(self.param_dtype),
    )
    return jnp.take(table, positions_BT, axis=0).astype(jnp.dtype(self.dtype))


def apply_rotary(x_BTNH: jax.Array, positions_BT: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoPE) of (B, T, N, H) by positions (B, T) -> (B, T, N, H).

  Pairs (x[..., i], x[..., i + H/2]) (GPT-NeoX/LLaMA half split) rotate by positions * base^(-2i/H).
  Computed in float32, returned in x's dtype. H must be even.
  """
  chex.assert_rank(x_BTNH, 4)
  H = x_BTNH.shape[-1]
  if H % 2:
    raise UserError(
      f'rotary position embeddings need an even head size, got config.model.kwargs.head_dim={H}'
    )
  inv_freq = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # (H/2,)
  angle = jnp.asarray(positions_BT, jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)
