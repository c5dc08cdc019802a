"""Weight pruning as an optax wrapper: magnitude (global or per layer) and N:M masks, one-shot or
gradual schedules (config.prune).

The design follows JaxPruner (Lee et al. 2023; not installable next to our jax): the pruner wraps
the run's optimizer, its state holds the masks beside the inner optimizer's state, and every update
is rewritten so that pruned weights land exactly on 0. The masks therefore live in the train state
(`state.opt_state.masks`), are initialised like the optimizer's moments from the boxed parameters
(so they carry the parameters' logical axis names and shardings), are checkpointed with it and
resume exactly.

config.prune fields:
  method     '' (off) | 'magnitude' | 'n_m'.
  sparsity   target fraction of pruned weights in [0, 1) (magnitude).
  scope      'global' (one threshold over all pruned layers) | 'layer' (each layer to `sparsity`).
  n, m       N:M structured sparsity (method 'n_m'): in every group of m consecutive weights along
             a kernel's input axis (axis 0 of a dense kernel, the input-channel axis of a conv
             kernel), the n largest are kept; sparsity is 1 - n/m.
  schedule   'one_shot' (prune once after begin_step updates) | 'gradual' (Zhu & Gupta 2017:
             s_t = s_f (1 - (1 - (t - begin) / (end - begin))^3), updated every `frequency` steps
             from begin_step to end_step).
  params     regular expression over parameter paths ('conv_0/kernel') selecting what is pruned.
"""

from __future__ import annotations

from collections.abc import Callable
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigjax import registry
from bigjax.errors import UserError

METHODS = registry.Registry('pruning methods', 'config.prune.method')
SCHEDULES = registry.Registry('pruning schedules', 'config.prune.schedule')
SCOPES = ('global', 'layer')


def enabled(cfg) -> bool:
  """True when config.prune asks for pruning."""
  return bool(cfg.method)


def path_name(path) -> str:
  """A key path of a (possibly boxed) parameter tree -> 'conv_0/kernel' (box attributes dropped)."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _names(tree) -> list[str]:
  return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def selected(params, pattern: str) -> Any:
  """Tree of bools like `params` (unboxed): True for the leaves whose path matches `pattern`."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(path_name(p))), params)


def group_axis(shape: tuple[int, ...]) -> int:
  """The input axis along which N:M groups run: conv kernels (H, W, in, out) -> 2, dense kernels
  (in, out) and DenseGeneral kernels (in, ...) -> 0."""
  return 2 if len(shape) == 4 else 0


def check(cfg, params) -> None:
  """UserError naming the config.prune field when it cannot prune `params` (shapes or arrays):
  an unknown method/schedule/scope, a pattern that selects nothing or non-kernels of rank < 2, N:M
  that is not 0 < n < m or whose m does not divide a layer's input axis, a bad gradual schedule.
  (config.prune.sparsity's range [0, 1) is checked with the other ranges in config_lib.)"""
  if not enabled(cfg):
    return
  METHODS.check(cfg.method)
  SCHEDULES.check(cfg.schedule)
  if cfg.scope not in SCOPES:
    raise UserError(f'config.prune.scope={cfg.scope!r} is unknown; use one of {", ".join(SCOPES)}')
  try:
    chosen = selected(nn.meta.unbox(params), cfg.params)
  except re.error as e:
    raise UserError(
      f'config.prune.params={cfg.params!r} is not a regular expression ({e})'
    ) from None
  shapes = {
    path_name(p): x.shape
    for (p, x), keep in zip(
      jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)), jax.tree.leaves(chosen)
    )
    if keep
  }
  if not shapes:
    raise UserError(
      f'config.prune.params={cfg.params!r} selects no parameter; parameters look like '
      f'{_names(nn.meta.unbox(params))[0]}'
    )
  for name, shape in shapes.items():
    if len(shape) < 2:
      raise UserError(
        f'config.prune.params={cfg.params!r} selects {name} of shape {shape}; prune kernels '
        "(rank >= 2) only, e.g. params='kernel$'"
      )
  if cfg.method == 'n_m':
    if not 0 < cfg.n < cfg.m:
      raise UserError(f'config.prune.n={cfg.n}, m={cfg.m}: N:M sparsity needs 0 < n < m (e.g. 2:4)')
    if cfg.schedule != 'one_shot':
      raise UserError(
        f"config.prune.schedule={cfg.schedule!r}: N:M masks are one-shot; use schedule='one_shot'"
      )
    for name, shape in shapes.items():
      size = shape[group_axis(shape)]
      if size % cfg.m:
        raise UserError(
          f'config.prune.m={cfg.m} does not divide {name} (input axis of size {size}, shape '
          f'{shape}); choose an m that divides it or leave the layer out of config.prune.params'
        )
  if cfg.schedule == 'gradual' and not (cfg.end_step > cfg.begin_step and cfg.frequency >= 1):
    raise UserError(
      f'config.prune.schedule=gradual needs end_step > begin_step and frequency >= 1 (got '
      f'begin_step={cfg.begin_step}, end_step={cfg.end_step}, frequency={cfg.frequency})'
    )


# ----------------------------------------------------------------------------------------------
# Schedules: step t (updates done) -> (prune at t?, target sparsity at t)
# ----------------------------------------------------------------------------------------------
@SCHEDULES.register('one_shot')
def _one_shot(cfg, sparsity: float) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  return lambda t: (t == cfg.begin_step, jnp.asarray(sparsity, jnp.float32))


@SCHEDULES.register('gradual')
def _gradual(cfg, sparsity: float) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  begin, end, every = cfg.begin_step, cfg.end_step, cfg.frequency

  def at(t):
    progress = jnp.clip((t - begin) / (end - begin), 0.0, 1.0)
    due = (t >= begin) & (t <= end) & ((t - begin) % every == 0)
    return due, (sparsity * (1.0 - (1.0 - progress) ** 3)).astype(jnp.float32)

  return at


def target_sparsity(cfg) -> float:
  """The final fraction of pruned weights in the pruned layers."""
  return 1.0 - cfg.n / cfg.m if cfg.method == 'n_m' else float(cfg.sparsity)


# ----------------------------------------------------------------------------------------------
# Masks: (magnitudes of the selected leaves, sparsity) -> bool masks (True = kept)
# ----------------------------------------------------------------------------------------------
def _keep_largest(flat: jax.Array, sparsity: jax.Array) -> jax.Array:
  """(N,) magnitudes -> (N,) bool keeping all but the floor(sparsity * N) smallest (exact count,
  ties broken by position: a threshold would prune every tied weight)."""
  k = jnp.floor(sparsity * flat.shape[0]).astype(jnp.int32)
  ranks = (
    jnp.zeros(flat.shape, jnp.int32)
    .at[jnp.argsort(flat, stable=True)]
    .set(jnp.arange(flat.shape[0], dtype=jnp.int32))
  )
  return ranks >= k


@METHODS.register('magnitude')
def magnitude_masks(cfg, magnitudes: list[jax.Array], sparsity: jax.Array) -> list[jax.Array]:
  """|w| of each pruned leaf (any shapes) -> masks of the same shapes: the smallest `sparsity` of
  all of them together (scope 'global') or of each leaf (scope 'layer') are False."""
  if cfg.scope == 'layer':
    return [_keep_largest(w.ravel(), sparsity).reshape(w.shape) for w in magnitudes]
  keep = _keep_largest(jnp.concatenate([w.ravel() for w in magnitudes]), sparsity)
  sizes = np.cumsum([w.size for w in magnitudes])[:-1]
  return [k.reshape(w.shape) for k, w in zip(jnp.split(keep, sizes), magnitudes)]


@METHODS.register('n_m')
def n_m_masks(cfg, magnitudes: list[jax.Array], sparsity: jax.Array) -> list[jax.Array]:
  """|w| of each pruned kernel -> masks keeping the n largest of every m consecutive weights
  along its input axis (`group_axis`); exactly n non-zeros per group."""
  del sparsity
  masks = []
  for w in magnitudes:
    axis = group_axis(w.shape)
    moved = jnp.moveaxis(w, axis, -1)  # (..., in)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // cfg.m, cfg.m)
    rank = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1)
    keep = (rank < cfg.n).reshape(moved.shape)
    masks.append(jnp.moveaxis(keep, -1, axis))
  return masks


class PruneState(NamedTuple):
  """updates: () int32 updates done; masks: bool tree like params (True = kept; all True for the
  leaves not pruned); inner: the wrapped optimizer's state."""

  updates: jax.Array
  masks: Any
  inner: Any


def wrap(tx: optax.GradientTransformation, cfg) -> optax.GradientTransformation:
  """`tx` whose updates keep pruned weights exactly 0 and that re-computes the masks on the
  schedule's steps, from the magnitudes of the weights after that step's update.

  Pruned weights get the update -w (w + (-w) == 0 exactly in IEEE arithmetic), so they are 0 after
  every step, whatever the inner optimizer does (momentum, weight decay)."""
  schedule = SCHEDULES.get(cfg.schedule)(cfg, target_sparsity(cfg))
  make_masks = METHODS.get(cfg.method)

  def init(params):
    return PruneState(
      updates=jnp.zeros((), jnp.int32),
      masks=jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params),
      inner=tx.init(params),
    )

  def new_masks(params, masks, sparsity):
    chosen = jax.tree.leaves(selected(params, cfg.params))
    leaves, treedef = jax.tree.flatten(params)
    old = jax.tree.leaves(masks)
    # Pruned weights count as 0, so a growing sparsity never brings them back.
    mags = [jnp.abs(jnp.where(m, p, 0)) for p, m, c in zip(leaves, old, chosen) if c]
    fresh = iter(make_masks(cfg, mags, sparsity))
    return jax.tree.unflatten(treedef, [next(fresh) if c else m for m, c in zip(old, chosen)])

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('prune.wrap needs the parameters in update()')
    inner_updates, inner = tx.update(updates, state.inner, params)
    count = state.updates + 1
    due, sparsity = schedule(count)
    after = optax.apply_updates(params, inner_updates)
    masks = jax.lax.cond(due, lambda: new_masks(after, state.masks, sparsity), lambda: state.masks)
    out = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), inner_updates, params, masks)
    return out, PruneState(count, masks, inner)

  return optax.GradientTransformation(init, update)


def sparsity_metrics(params, cfg) -> dict[str, jax.Array]:
  """{'sparsity': fraction of exact zeros over the pruned layers, 'sparsity/<path>': per layer}:
  measured on the weights themselves, not read from the masks."""
  chosen = jax.tree.leaves(selected(params, cfg.params))
  flat = jax.tree_util.tree_leaves_with_path(params)
  layers = {path_name(p): x for (p, x), c in zip(flat, chosen) if c}
  zeros = sum(jnp.sum(x == 0) for x in layers.values())
  total = sum(x.size for x in layers.values())
  out = {'sparsity': zeros / total}
  out.update({f'sparsity/{name}': jnp.mean(x == 0) for name, x in layers.items()})
  return out


# ----------------------------------------------------------------------------------------------
# Compressed weights
# ----------------------------------------------------------------------------------------------
def sparse_params(params, pattern: str = 'kernel$') -> tuple[dict[str, np.ndarray], int]:
  """Params (host or device arrays) -> ({name: array}, total bytes): the leaves matching
  `pattern` as '<path>.values' (their non-zeros, row-major order, original dtype) + '<path>.mask'
  (np.packbits of the non-zero pattern, 1 bit per weight) + '<path>.shape' (int64); the other
  leaves as '<path>' unchanged. `dense_params` inverts it."""
  out: dict[str, np.ndarray] = {}
  chosen = jax.tree.leaves(selected(params, pattern))
  for (path, x), keep in zip(jax.tree_util.tree_leaves_with_path(params), chosen):
    name, x = path_name(path), np.asarray(x)
    if keep:
      nonzero = x != 0
      out[f'{name}.values'] = x[nonzero]
      out[f'{name}.mask'] = np.packbits(nonzero.ravel())
      out[f'{name}.shape'] = np.asarray(x.shape, np.int64)
    else:
      out[name] = x
  return out, int(sum(a.nbytes for a in out.values()))


def dense_params(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of sparse_params: {'conv_0/kernel': dense array, ...} (flat names)."""
  out = {}
  for name, a in arrays.items():
    if name.endswith('.values'):
      base = name[: -len('.values')]
      shape = tuple(arrays[f'{base}.shape'])
      nonzero = np.unpackbits(arrays[f'{base}.mask'], count=int(np.prod(shape))).astype(bool)
      dense = np.zeros(int(np.prod(shape)), a.dtype)
      dense[nonzero] = a
      out[base] = dense.reshape(shape)
    elif not name.endswith(('.mask', '.shape')):
      out[name] = a
  return out


def write_sparse(run_dir: str, path: str, pattern: str | None = None) -> int:
  """Writes the newest checkpoint's parameters of the run in `run_dir` in sparse form
  (sparse_params, as an uncompressed .npz) to `path` and returns its size on disk in bytes.
  pattern: which leaves to store sparse (default: the run's config.prune.params, else 'kernel$').
  What `bigjax-export --pruned` calls."""
  import io
  import json
  import os

  from bigjax import checkpoint, init_from, reporting

  if pattern is None:
    with open(os.path.join(run_dir, 'config.json')) as f:
      pattern = json.load(f).get('prune', {}).get('params') or 'kernel$'
  _, state = checkpoint.load_latest(init_from.checkpoint_dir(run_dir))
  arrays, _ = sparse_params(state['params'], pattern)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)  # type: ignore[arg-type]
  reporting.write_atomic(path, buffer.getvalue())
  return os.path.getsize(path)
