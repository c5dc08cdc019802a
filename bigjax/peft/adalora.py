"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"),
as HF PEFT's AdaLoraModel computes it.

Each targeted Dense / DenseGeneral gets an SVD-form update y += s * ((x' P) * lambda) Q with P
(in..., r), lambda (r,) and Q (r, out...) (PEFT's lora_A, lora_E, lora_B; r = config.peft.rank,
the initial rank; s = alpha / r; x' = x with config.peft.dropout in training, PEFT's
lora_dropout). lambda starts at 0 (so step 0 is the base exactly), P and Q at N(0, 0.02).
Training adds PEFT's orthogonality regulariser orth_reg * mean(||P^T P - I||_F,
||Q Q^T - I||_F) to the loss (here: its gradient to the adapter's, inside the optimizer, so the
task loss reported is the task's) and, after each step, prunes the singular values:

  importance of a triplet i: s_i = S(lambda_i) + mean_j S(P_ji) + mean_j S(Q_ij), S(w) = I_bar *
  U_bar with I = |w dL/dw| smoothed I_bar <- b1 I_bar + (1 - b1) I and its uncertainty
  U_bar <- b2 U_bar + (1 - b2) |I - I_bar| (eq. 8-10);
  budget b(t) (the total rank of all modules, a scanned stack's module counting once per layer,
  as PEFT counts its per-layer modules): b0 = r * modules for t <= tinit; then
  bT + (b0 - bT) (1 - (t - tinit) / (T - tinit - tfinal))^3 until T - tfinal (every delta_t
  steps, the lambdas outside the b(t) most important are set to 0); bT = target_rank * modules
  from then on, with the mask of that step kept fixed (eq. 11; T = config.num_steps).

All of it is an optax transformation around the trainable parameters' optimizer (`optimizer`):
the importance averages and the mask live in the optimizer state, so checkpoints and resumes
carry them. Parameters added to each targeted module: adalora_p, adalora_lambda, adalora_q.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigjax.errors import UserError
from bigjax.peft import common
from bigjax.peft.lora import contracted_axes, input_dropout

PARAMS = ('adalora_p', 'adalora_lambda', 'adalora_q')


@dataclasses.dataclass(frozen=True)
class Spec:
  targets: frozenset[str]
  rank: int
  alpha: float
  target_rank: int = 4
  tinit: int = 0
  tfinal: int = 0
  delta_t: int = 1
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg: float = 0.5
  dropout: float = 0.0

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def interceptor(self, train: bool):
    return functools.partial(_intercept, self, train)

  def describe(self) -> str:
    return (
      f'adalora (r={self.rank} -> {self.target_rank} on average, alpha={self.alpha:g}) on '
      f'{len(self.targets)} kernels'
    )

  def budget(self, step, total_steps: int, num_modules: int):
    """(total rank budget, whether to mask) after update `step` of `total_steps` (eq. 11).
    num_modules: the adapted modules, each layer of a scanned stack's counted (`num_modules`)."""
    b0, bt = self.rank * num_modules, self.target_rank * num_modules
    window = max(total_steps - self.tfinal - self.tinit, 1)
    frac = jnp.clip((step - self.tinit) / window, 0.0, 1.0)
    cubic = jnp.floor((b0 - bt) * (1 - frac) ** 3 + bt).astype(jnp.int32)
    final = step > total_steps - self.tfinal
    budget = jnp.where(step <= self.tinit, b0, jnp.where(final, bt, cubic))
    masking = (step > self.tinit) & (final | (step % self.delta_t == 0))
    return budget, masking

  def optimizer(self, tx: optax.GradientTransformation, total_steps: int):
    """`tx` for the adapter, wrapped in the regulariser, importance and budget masking."""
    if not total_steps:
      raise UserError(
        "config.peft.method='adalora' schedules its rank budget over config.num_steps, which "
        'is 0 (a run of config.num_epochs); set config.num_steps'
      )
    if self.tinit + self.tfinal >= total_steps:
      raise UserError(
        f'config.peft.adalora.tinit + tfinal = {self.tinit + self.tfinal} leaves none of '
        f'config.num_steps={total_steps} to prune in; lower them'
      )
    return _adalora_transform(self, tx, total_steps)

  def merge(self, flat_params: dict[str, Any]) -> dict[str, Any]:
    """{path: array} with each kernel W + s P diag(lambda) Q, the adapter removed."""
    out = dict(flat_params)
    for module in sorted(self.targets):
      p, lam, q = (jnp.asarray(out.pop(f'{module}/adalora_{n}')) for n in ('p', 'lambda', 'q'))
      kernel = jnp.asarray(out[f'{module}/kernel'])
      lead = lam.ndim - 1
      p2 = jnp.reshape(p, (*p.shape[:lead], -1, p.shape[-1]))
      q2 = jnp.reshape(q, (*q.shape[: lead + 1], -1))
      delta = (p2 * lam[..., None, :]) @ q2
      out[f'{module}/kernel'] = (kernel + self.scaling * jnp.reshape(delta, kernel.shape)).astype(
        kernel.dtype
      )
    return out


def make_spec(cfg, dense: dict[str, str], model: nn.Module) -> Spec:
  del model
  a = cfg.adalora
  if not 1 <= a.target_rank <= cfg.rank:
    raise UserError(
      f'config.peft.adalora.target_rank={a.target_rank} must be in [1, config.peft.rank='
      f'{cfg.rank}] (the average rank AdaLoRA prunes the initial rank down to)'
    )
  return Spec(
    common.select_kernels(cfg, dense),
    cfg.rank,
    float(cfg.alpha),
    a.target_rank,
    a.tinit,
    a.tfinal,
    a.delta_t,
    a.beta1,
    a.beta2,
    a.orth_reg,
    cfg.dropout,
  )


def spec_from_params(cfg, flat_params: dict[str, Any]) -> Spec:
  targets = frozenset(k.rsplit('/', 1)[0] for k in flat_params if k.endswith('/adalora_lambda'))
  if not targets:
    raise UserError(
      f'config.peft.method={cfg.method!r} but the parameters hold no adalora_lambda; the run was '
      'not trained with AdaLoRA'
    )
  return Spec(targets, cfg.rank, float(cfg.alpha), cfg.adalora.target_rank, dropout=cfg.dropout)


def _intercept(spec: Spec, train: bool, next_fun, args, kwargs, context):
  path = common.targeted(spec, context)
  if path is None:
    return next_fun(*args, **kwargs)
  module = context.module
  y = next_fun(*args, **kwargs)
  x = args[0] if args else kwargs['inputs']
  n_in = contracted_axes(module, x.ndim)
  scope = module.scope
  assert scope is not None
  boxed_kernel = scope.get_variable('params', 'kernel')
  names = getattr(boxed_kernel, 'names', None)
  shape = nn.meta.unbox(boxed_kernel).shape
  r, pdtype = spec.rank, module.param_dtype
  normal = nn.initializers.normal(0.02)  # PEFT's init of lora_A and lora_B
  p = scope.param(
    'adalora_p', common.boxed(normal, names and (*names[:n_in], None)), (*shape[:n_in], r), pdtype
  )
  lam = scope.param(
    'adalora_lambda', common.boxed(nn.initializers.zeros, names and (None,)), (r,), pdtype
  )
  q = scope.param(
    'adalora_q', common.boxed(normal, names and (None, *names[n_in:])), (r, *shape[n_in:]), pdtype
  )
  dtype = y.dtype
  if train and spec.dropout:  # PEFT's lora_dropout on the update's input
    x = input_dropout(x, spec.dropout, module.make_rng('dropout'))
  contract = tuple(range(x.ndim - n_in, x.ndim))
  dot = functools.partial(jax.lax.dot_general, precision=module.precision)
  xp = dot(x.astype(dtype), p.astype(dtype), ((contract, tuple(range(n_in))), ((), ())))
  delta = dot(xp * lam.astype(dtype), q.astype(dtype), (((xp.ndim - 1,), (0,)), ((), ())))
  return y + delta * spec.scaling


# ----------------------------------------------------------------------------------------------
# The optimizer: orthogonality gradient, importance averages, budget masking
# ----------------------------------------------------------------------------------------------
class State(NamedTuple):
  step: jax.Array  # updates done
  inner: Any  # the wrapped optimizer's state
  ipt: Any  # smoothed importance I_bar, per adapter element (like the trainable params)
  unc: Any  # smoothed uncertainty U_bar
  mask: Any  # {module: (lead..., r) 0/1} of the lambdas kept
  fixed: jax.Array  # whether the final mask is fixed


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _modules(tree) -> dict[str, dict[str, Any]]:
  """{module path: {'adalora_p': leaf, ...}} of a (multi_transform-masked) params-like tree."""
  out: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_masked):
    p = common.path_of(path)
    module, name = p.rsplit('/', 1)
    if name in PARAMS and not _is_masked(leaf):
      out.setdefault(module, {})[name] = leaf
  return out


def _replace(tree, values: dict[str, Any]):
  """`tree` with the leaves at the '/'-paths of `values` replaced."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: values.get(common.path_of(path), leaf), tree, is_leaf=_is_masked
  )


def _score(module: dict[str, Any], ipt: dict[str, Any], unc: dict[str, Any]) -> jax.Array:
  """Triplet importance (lead..., r): S(lambda) + mean S(P row) + mean S(Q column)."""
  lam = ipt['adalora_lambda'] * unc['adalora_lambda']
  lead = lam.ndim - 1
  sp, sq = ipt['adalora_p'] * unc['adalora_p'], ipt['adalora_q'] * unc['adalora_q']
  p_axes = tuple(range(lead, sp.ndim - 1))
  q_axes = tuple(range(lead + 1, sq.ndim))
  return lam + jnp.mean(sp, axis=p_axes) + jnp.mean(sq, axis=q_axes)


def _adalora_transform(spec: Spec, tx: optax.GradientTransformation, total_steps: int):
  def init(params):
    mods = _modules(params)
    zeros = lambda: {m: {n: jnp.zeros_like(v) for n, v in d.items()} for m, d in mods.items()}
    mask = {m: jnp.ones_like(d['adalora_lambda']) for m, d in mods.items()}
    return State(
      jnp.zeros([], jnp.int32), tx.init(params), zeros(), zeros(), mask, jnp.array(False)
    )

  def update(grads, state, params):
    mods, gmods = _modules(params), _modules(grads)

    reg = lambda trainable: spec.orth_reg * orthogonality(trainable)
    reg_grads = jax.grad(reg)({m: dict(d) for m, d in mods.items()})
    extra = {
      f'{m}/{n}': gmods[m][n] + reg_grads[m][n] for m in mods for n in ('adalora_p', 'adalora_q')
    }
    grads = _replace(grads, extra)
    updates, inner = tx.update(grads, state.inner, params)
    gmods = _modules(grads)
    # importance of the step's (task + regulariser) gradient, smoothed
    ipt, unc = {}, {}
    for m, d in mods.items():
      ipt[m], unc[m] = {}, {}
      for n, w in d.items():
        now = jnp.abs(w * gmods[m][n])
        ipt[m][n] = spec.beta1 * state.ipt[m][n] + (1 - spec.beta1) * now
        unc[m][n] = spec.beta2 * state.unc[m][n] + (1 - spec.beta2) * jnp.abs(now - ipt[m][n])
    count = state.step + 1
    budget, masking = spec.budget(count, total_steps, num_modules(mods))
    scores = {m: _score(mods[m], ipt[m], unc[m]) for m in mods}
    flat = jnp.concatenate([jnp.ravel(s) for s in scores.values()])
    threshold = jnp.sort(flat)[::-1][jnp.clip(budget, 1, flat.size) - 1]
    fresh = {m: (s >= threshold).astype(mods[m]['adalora_lambda'].dtype) for m, s in scores.items()}
    final = count > total_steps - spec.tfinal
    use_fixed = state.fixed & final
    mask = {
      m: jnp.where(use_fixed, state.mask[m], jnp.where(masking, fresh[m], state.mask[m]))
      for m in mods
    }
    apply = masking | use_fixed
    umods = _modules(updates)
    new_lambda = {}
    for m, d in mods.items():
      lam, step = d['adalora_lambda'], umods[m]['adalora_lambda']
      kept = (lam + step) * mask[m]
      new_lambda[f'{m}/adalora_lambda'] = jnp.where(apply, kept - lam, step)
    updates = _replace(updates, new_lambda)
    fixed = state.fixed | (final & masking)
    return updates, State(count, inner, ipt, unc, mask, fixed)

  return optax.GradientTransformation(init, update)


def num_modules(mods: dict[str, dict[str, Any]]) -> int:
  """The adapted modules of {module path: its adapter leaves}, each layer of a scanned stack
  (lambda (L, r)) counted."""
  return sum(math.prod(d['adalora_lambda'].shape[:-1]) for d in mods.values())


def orthogonality(mods: dict[str, dict[str, Any]]) -> jax.Array:
  """PEFT's orthogonality term: the mean of ||P^T P - I||_F and ||Q Q^T - I||_F over every
  adapted module, each layer of a scanned stack counted as its own module (as PEFT's are)."""
  norms = [
    _orth(d['adalora_p'], d['adalora_q'], d['adalora_lambda'].ndim - 1) for d in mods.values()
  ]
  return jnp.sum(jnp.stack(norms)) / (2 * num_modules(mods))


def _orth(p, q, lead: int) -> jax.Array:
  """||P^T P - I||_F + ||Q Q^T - I||_F of one module, summed over a scanned stack's layers
  (the regulariser divides by twice the number of modules: PEFT's mean over all P and Q)."""
  r = p.shape[-1]
  p2 = jnp.reshape(p, (*p.shape[:lead], -1, r))
  q2 = jnp.reshape(q, (*q.shape[: lead + 1], -1))
  eye = jnp.eye(r, dtype=p.dtype)
  pp = jnp.swapaxes(p2, -1, -2) @ p2 - eye
  qq = q2 @ jnp.swapaxes(q2, -1, -2) - eye
  fro = lambda m: jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1)))
  return jnp.sum(fro(pp) + fro(qq))


common.METHODS.add('adalora', sys.modules[__name__])
