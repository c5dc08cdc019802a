"""FGSM and PGD attacks under the L-infinity and L2 norms, as pure jax functions of a loss.

FGSM (Goodfellow, Shlens & Szegedy 2015): one step of size eps along the loss gradient's sign (L2:
its direction; "FGM"). PGD (Madry et al. 2018): from a uniform random start in the eps-ball, `steps`
steps of `step_size` along the same direction, each followed by projection onto the ball and onto
the input range; with `restarts` R > 1, R independent starts and per example the perturbation that
scores highest (misclassified first, then the largest loss). The loops are `lax.fori_loop`s, so an
attack is one small graph under `jax.jit`, composes with `jax.vmap`, and runs on a sharded batch
like any other step (each example's gradient depends on that example only, for a model in eval
mode).

We write our own rather than take a library's: cleverhans' JAX attacks (2021) have no L2 PGD,
restarts or input bounds, and neither they nor foolbox's jax backend run inside a jitted train step.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from bigjax import registry
from bigjax.errors import UserError

LossFn = Callable[[jax.Array], jax.Array]  # inputs (B, ...) -> per-example scores (B,)
Bounds = tuple[float, float] | None  # the input range (lo, hi), or None for unbounded inputs

NORMS = registry.Registry('attack norms', 'norm')
METHODS = registry.Registry('attack methods', 'method')


def _per_example(fn, x: jax.Array) -> jax.Array:
  """fn reduced over every axis but the first and kept broadcastable: (B, ...) -> (B, 1, ...)."""
  return fn(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def _l2(x: jax.Array) -> jax.Array:
  """Per-example L2 norms (B, 1, ...) of x (B, ...)."""
  return jnp.sqrt(_per_example(jnp.sum, jnp.square(x)))


@dataclasses.dataclass(frozen=True)
class Norm:
  """A threat model: the step direction from a gradient, projection onto the eps-ball, and a
  uniform sample from the ball. All take and return (B, ...) arrays."""

  direction: Callable[[jax.Array], jax.Array]
  project: Callable[[jax.Array, float], jax.Array]
  sample: Callable[[jax.Array, tuple[int, ...], float], jax.Array]
  size: Callable[[jax.Array], jax.Array]  # per-example norm (B,) of a perturbation (B, ...)


def _l2_sample(rng: jax.Array, shape: tuple[int, ...], eps: float) -> jax.Array:
  """Uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d)."""
  k_dir, k_radius = jax.random.split(rng)
  d = jax.random.normal(k_dir, shape)
  dims = math.prod(shape[1:])
  u = jax.random.uniform(k_radius, (shape[0],) + (1,) * (len(shape) - 1))
  return d / jnp.maximum(_l2(d), 1e-12) * eps * u ** (1.0 / dims)


NORMS.add(
  'linf',
  Norm(
    direction=jnp.sign,
    project=lambda d, eps: jnp.clip(d, -eps, eps),
    sample=lambda rng, shape, eps: jax.random.uniform(rng, shape, minval=-eps, maxval=eps),
    size=lambda d: jnp.abs(d.reshape(d.shape[0], -1)).max(axis=1),
  ),
)
NORMS.add(
  'l2',
  Norm(
    direction=lambda g: g / jnp.maximum(_l2(g), 1e-12),
    project=lambda d, eps: d * jnp.minimum(1.0, eps / jnp.maximum(_l2(d), 1e-12)),
    sample=_l2_sample,
    size=lambda d: _l2(d).reshape(-1),
  ),
)


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack: method 'fgsm' | 'pgd', norm 'linf' | 'l2', radius eps >= 0; for PGD, steps >= 1
  of step_size (0 = 2.5 * eps / steps, Madry et al.'s choice), a uniform random start, and the
  best of `restarts` >= 1 starts. FGSM ignores steps, step_size, random_start and restarts."""

  method: str
  norm: str
  eps: float | jax.Array  # traced under vmap over radii, or an eps warm-up
  steps: int = 10
  step_size: float = 0.0
  random_start: bool = True
  restarts: int = 1

  @property
  def name(self) -> str:
    """'pgd_linf_0.1': the suffix of the eval report's robust_accuracy_<name> key."""
    return f'{self.method}_{self.norm}_{self.eps:g}'

  def schedule(self) -> tuple[int, float | jax.Array, bool, int]:
    """(steps, step size, random start, restarts) this attack runs."""
    return METHODS.get(self.method)(self)


@METHODS.register('fgsm')
def _fgsm(a: Attack) -> tuple[int, float | jax.Array, bool, int]:
  return 1, a.eps, False, 1


@METHODS.register('pgd')
def _pgd(a: Attack) -> tuple[int, float | jax.Array, bool, int]:
  return a.steps, a.step_size or 2.5 * a.eps / a.steps, a.random_start, a.restarts


def check(attack: Attack, field: str, method_field: str = 'method') -> None:
  """UserError naming `field` (the config section, e.g. 'config.eval_attacks') for an unknown
  method (field `method_field`) or norm, eps < 0, steps < 1, step_size < 0 or restarts < 1."""
  for what, key, reg, name in (
    ('method', method_field, METHODS, attack.method),
    ('norm', 'norm', NORMS, attack.norm),
  ):
    if name not in reg:
      raise UserError(
        f'{field}.{key} holds {name!r}, an unknown attack {what}; known attack {what}s: '
        f'{", ".join(reg.names())}'
        if key != what
        else f'{field}.{key}={name!r} is unknown; known attack {what}s: {", ".join(reg.names())}'
      )
  for what, value, lowest, meaning in (
    ('eps', attack.eps, 0.0, 'a perturbation radius'),
    ('steps', attack.steps, 1, 'a step count'),
    ('step_size', attack.step_size, 0.0, 'a step size (0 = 2.5 * eps / steps)'),
    ('restarts', attack.restarts, 1, 'a count of random starts'),
  ):
    if value < lowest:
      raise UserError(f'{field}.{what}={value} must be >= {lowest} ({meaning})')


def _clip(x: jax.Array, bounds: Bounds) -> jax.Array:
  return x if bounds is None else jnp.clip(x, *bounds)


def _one_start(loss_fn: LossFn, x0, rng, norm: Norm, eps, steps, step_size, random_start, bounds):
  grad = jax.grad(lambda x: jnp.sum(loss_fn(x)))
  x = x0 + norm.sample(rng, x0.shape, eps) if random_start else x0
  x = _clip(x, bounds)

  def body(_, x):
    x = x + step_size * norm.direction(grad(x))
    return _clip(x0 + norm.project(x - x0, eps), bounds)

  return jax.lax.fori_loop(0, steps, body, x)


def perturb(
  loss_fn: LossFn,
  x: jax.Array,
  rng: jax.Array,
  attack: Attack,
  bounds: Bounds = None,
  score_fn: LossFn | None = None,
) -> jax.Array:
  """The adversarial version of the clean inputs x (B, ...) float, same shape and dtype.

  loss_fn: inputs (B, ...) -> per-example losses (B,) that the attack ascends (their sum is
  differentiated, so each example's step uses its own gradient). bounds: the valid input range
  (e.g. (0, 1) for images) that every iterate is clipped to; None: unbounded. score_fn: per-example
  scores (B,) that pick the best of several restarts (default: loss_fn). rng: the random starts'
  key (unused by FGSM). Each result lies within eps of x in the attack's norm and within bounds.
  """
  chex.assert_type(x, float)
  steps, step_size, random_start, restarts = attack.schedule()
  norm = NORMS.get(attack.norm)
  x0 = jax.lax.stop_gradient(x)
  run = lambda r: jax.lax.stop_gradient(
    _one_start(
      loss_fn,
      x0,
      jax.random.fold_in(rng, r),
      norm,
      attack.eps,
      steps,
      step_size,
      random_start,
      bounds,
    )
  )
  if restarts == 1:
    return run(0)
  score = score_fn or loss_fn

  def body(r, carry):
    best, best_score = carry
    candidate = run(r)
    s = score(candidate)
    better = (s > best_score).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(better, candidate, best), jnp.maximum(s, best_score)

  first = run(0)
  best, _ = jax.lax.fori_loop(1, restarts, body, (first, score(first)))
  chex.assert_equal_shape((best, x))
  return best


def ascent_path(loss_fn: LossFn, x: jax.Array, rng: jax.Array, attack: Attack) -> jax.Array:
  """The first `steps` iterates of one PGD start from the clean x (B, ...), unbounded: (steps, B,
  ...) = x_0 (the random start, or x), x_1, ..., x_{steps-1}: the points at which FreeLB (Zhu et
  al. 2020) takes its parameter gradients (the last ascent step's result is not used). Iterate
  t + 1 is iterate t moved by step_size along the norm's direction of the loss gradient, then
  projected onto the eps-ball around x, as in `perturb`."""
  chex.assert_type(x, float)
  steps, step_size, random_start, _ = attack.schedule()
  norm = NORMS.get(attack.norm)
  x0 = jax.lax.stop_gradient(x)
  grad = jax.grad(lambda x: jnp.sum(loss_fn(x)))
  start = x0 + norm.sample(rng, x0.shape, attack.eps) if random_start else x0

  def body(x, _):
    x = x + step_size * norm.direction(grad(x))
    x = x0 + norm.project(x - x0, attack.eps)
    return x, x

  _, rest = jax.lax.scan(body, start, None, length=steps - 1)
  return jax.lax.stop_gradient(jnp.concatenate([start[None], rest]))


def perturbation_size(x_adv: jax.Array, x: jax.Array, norm: str) -> jax.Array:
  """Per-example size (B,) of x_adv - x in `norm` ('linf' | 'l2')."""
  return NORMS.get(norm).size(x_adv - x)


def input_bounds(dtype) -> Bounds:
  """The range the model's inputs live in, from the batch's stored dtype: uint8 images become
  [0, 1] floats (bigjax.steps.prepare_inputs), float features are unbounded."""
  return (0.0, 1.0) if jnp.dtype(dtype) == jnp.uint8 else None
