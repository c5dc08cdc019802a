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
             a kernel's input (contraction) axes, flattened, the n largest are kept; sparsity is
             1 - n/m. See `input_axes`: a dense kernel (in, out) groups along `in`, a conv kernel
             (H, W, in, out) along its input channels (as NVIDIA's ASP does), an attention output
             projection (heads, head_dim, embed) along its heads x head_dim inputs.
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


HEAD_AXES = ('heads', 'kv_heads', 'kv')  # logical names of attention heads and head_dim


def input_axes(shape: tuple[int, ...], names: tuple | None = None) -> tuple[int, ...]:
  """The axes of a kernel that its layer contracts with its input: what an N:M group runs along
  (flattened in row-major order, so 'consecutive inputs' are consecutive in the flattened input
  vector). Conv kernels (H, W, in, out) -> (2,): groups of input channels at one kernel position
  (NVIDIA ASP / Mishra et al. 2021 group along input channels). A kernel whose logical names
  (`names`) begin with attention heads / head_dim ('heads', 'kv_heads', 'kv'), e.g. an attention
  output projection (heads, head_dim, embed), contracts those leading axes -> (0, 1). Dense
  kernels (in, out) and input projections (embed, heads, head_dim) -> (0,)."""
  if len(shape) == 4:
    return (2,)
  lead = 0
  while names and lead < len(names) - 1 and names[lead] in HEAD_AXES:
    lead += 1
  return tuple(range(lead)) if lead else (0,)


def _leaf_names(x) -> tuple | None:
  """The logical axis names of a boxed (nn.Partitioned) parameter, else None."""
  return tuple(x.names) if isinstance(x, nn.Partitioned) else None


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def layer_input_axes(params) -> list[tuple[int, ...]]:
  """input_axes of every leaf of `params` (boxed: with their logical names; or plain arrays), in
  the order of jax.tree.leaves of the unboxed tree."""
  leaves = jax.tree.leaves(params, is_leaf=_is_box)
  return [input_axes(tuple(nn.meta.unbox(x).shape), _leaf_names(x)) for x in leaves]


def _grouped(w: jax.Array, axes: tuple[int, ...], m: int) -> tuple[jax.Array, Callable]:
  """w with its input `axes` moved last and flattened into groups of m: (..., in / m, m), and
  the function that takes an array of that shape back to w's layout."""
  rest = [i for i in range(w.ndim) if i not in axes]
  perm = rest + list(axes)
  moved = jnp.transpose(w, perm)
  lead = moved.shape[: len(rest)]
  groups = moved.reshape(*lead, -1, m)
  inverse = [int(i) for i in np.argsort(perm)]
  return groups, lambda g: jnp.transpose(g.reshape(moved.shape), inverse)


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
  flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))
  shapes = {path_name(p): x.shape for (p, x), keep in zip(flat, jax.tree.leaves(chosen)) if keep}
  axes = {
    path_name(p): a
    for (p, _), a, keep in zip(flat, layer_input_axes(params), jax.tree.leaves(chosen))
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
      size = int(np.prod([shape[a] for a in axes[name]]))
      if size % cfg.m:
        raise UserError(
          f'config.prune.m={cfg.m} does not divide {name} ({size} inputs: axes {axes[name]} of '
          f'shape {shape}); choose an m that divides it or leave the layer out of '
          'config.prune.params'
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
def magnitude_masks(
  cfg, magnitudes: list[jax.Array], sparsity: jax.Array, axes: list | None = None
) -> list[jax.Array]:
  """|w| of each pruned leaf (any shapes) -> masks of the same shapes: the smallest `sparsity` of
  all of them together (scope 'global') or of each leaf (scope 'layer') are False. (axes: unused,
  the signature of every method.)"""
  del axes
  if cfg.scope == 'layer':
    return [_keep_largest(w.ravel(), sparsity).reshape(w.shape) for w in magnitudes]
  keep = _keep_largest(jnp.concatenate([w.ravel() for w in magnitudes]), sparsity)
  sizes = np.cumsum([w.size for w in magnitudes])[:-1]
  return [k.reshape(w.shape) for k, w in zip(jnp.split(keep, sizes), magnitudes)]


@METHODS.register('n_m')
def n_m_masks(
  cfg, magnitudes: list[jax.Array], sparsity: jax.Array, axes: list | None = None
) -> list[jax.Array]:
  """|w| of each pruned kernel -> masks keeping the n largest of every m consecutive weights
  along its input axes (axes[i] for kernel i, default `input_axes(shape)`), flattened; exactly n
  non-zeros per group."""
  del sparsity
  masks = []
  for i, w in enumerate(magnitudes):
    groups, back = _grouped(w, axes[i] if axes else input_axes(w.shape), cfg.m)
    rank = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1)
    masks.append(back(rank < cfg.n))
  return masks


class PruneState(NamedTuple):
  """updates: () int32 updates done; masks: bool tree like params (True = kept; all True for the
  leaves not pruned); inner: the wrapped optimizer's state."""

  updates: jax.Array
  masks: Any
  inner: Any


def wrap(tx: optax.GradientTransformation, cfg, params=None) -> optax.GradientTransformation:
  """`tx` whose updates keep pruned weights exactly 0 and that re-computes the masks on the
  schedule's steps, from the magnitudes of the weights after that step's update. params: the
  (abstract) boxed parameters, whose logical axis names give N:M groups their input axes
  (layer_input_axes; None: from the shapes alone).

  Pruned weights get the update -w (w + (-w) == 0 exactly in IEEE arithmetic), so they are 0 after
  every step, whatever the inner optimizer does (momentum, weight decay)."""
  schedule = SCHEDULES.get(cfg.schedule)(cfg, target_sparsity(cfg))
  make_masks = METHODS.get(cfg.method)
  layout = layer_input_axes(params) if params is not None else None

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
    axes = [a for a, c in zip(layout or layer_input_axes(params), chosen) if c]
    fresh = iter(make_masks(cfg, mags, sparsity, axes))
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
