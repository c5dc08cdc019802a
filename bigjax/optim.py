"""The optax optimizer a config asks for.

config.optim fields: name (sgd | momentum | nesterov | adam | adamw), lr, schedule (constant |
warmup_cosine | warmup_linear | step), warmup_steps, end_lr_fraction (cosine/linear floor),
step_boundaries (fractions of training) with step_decay, momentum, b1, b2, eps, weight_decay,
clip_norm (global-norm clipping; 0 = off). Weight decay never touches biases or norm scales
(parameters with fewer than 2 dimensions).
"""
import jax
import optax

from bigjax.errors import UserError

SCHEDULES = ('constant', 'warmup_cosine', 'warmup_linear', 'step')


def learning_rate_schedule(cfg, total_steps):
  """Returns an optax schedule step -> learning rate for `total_steps` of training."""
  lr, warmup = cfg.lr, int(cfg.get('warmup_steps', 0))
  end = lr * cfg.get('end_lr_fraction', 0.0)
  name = cfg.get('schedule', 'constant')
  if name == 'constant':
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
  if name == 'warmup_linear':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.linear_schedule(lr, end, max(total_steps - warmup, 1))],
                                [warmup])
  if name == 'step':
    boundaries = {int(f * total_steps): cfg.get('step_decay', 0.1)
                  for f in cfg.get('step_boundaries', (0.5, 0.75))}
    return optax.piecewise_constant_schedule(lr, boundaries)
  raise UserError(f'config.optim.schedule={name!r} is unknown; known: {", ".join(SCHEDULES)}')


def decay_mask(params):
  """True for parameters that get weight decay: kernels/embeddings (ndim >= 2), not biases/scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _base(cfg, lr):
  name = cfg.name
  wd = cfg.get('weight_decay', 0.0)
  if name == 'sgd':
    return optax.sgd(lr)
  if name in ('momentum', 'nesterov'):
    return optax.sgd(lr, momentum=cfg.get('momentum', 0.9), nesterov=name == 'nesterov')
  if name == 'adam':
    return optax.adam(lr, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999), eps=cfg.get('eps', 1e-8))
  if name == 'adamw':
    return optax.adamw(lr, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999),
                       eps=cfg.get('eps', 1e-8), weight_decay=wd, mask=decay_mask)
  raise AssertionError(name)  # make_optimizer checked the name


OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adam', 'adamw')


def make_optimizer(cfg, total_steps):
  """optax.GradientTransformation for config.optim over `total_steps` steps.

  Chain: [global-norm clip] -> [L2-style decoupled weight decay for non-adamw] -> optimizer with
  its schedule. For adamw the decay is the optimizer's own (decoupled, scaled by the schedule).
  """
  if cfg.name not in OPTIMIZERS:
    raise UserError(f'config.optim.name={cfg.name!r} is unknown; known: {", ".join(OPTIMIZERS)}')
  lr = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.get('clip_norm', 0.0):
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.get('weight_decay', 0.0) and cfg.name != 'adamw':
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
  parts.append(_base(cfg, lr))
  return optax.chain(*parts)
