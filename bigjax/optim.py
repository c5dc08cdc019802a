"""The optax optimizer a config asks for.

config.optim fields: name (sgd | momentum | nesterov | adam | adamw), lr, schedule (constant |
warmup_cosine | warmup_linear | step), warmup_steps, end_lr_fraction (cosine/linear floor),
step_boundaries (fractions of training) with step_decay, momentum, b1, b2, eps, weight_decay,
clip_norm (global-norm clipping; 0 = off). Weight decay touches only kernels and embeddings
(`decay_mask`: never biases, norm scales or class tokens).
"""

import jax
import optax

from bigjax import registry

SCHEDULES = registry.Registry('schedules', 'config.optim.schedule')
OPTIMIZERS = registry.Registry('optimizers', 'config.optim.name')


def _warmup_then(lr, warmup, after):
  """A linear warmup from 0 to `lr` over `warmup` steps, then `after` (counted from its end)."""
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


@SCHEDULES.register('constant')
def _constant(cfg, total_steps):
  del total_steps
  return _warmup_then(cfg.lr, cfg.warmup_steps, optax.constant_schedule(cfg.lr))


@SCHEDULES.register('warmup_cosine')
def _warmup_cosine(cfg, total_steps):
  warmup = cfg.warmup_steps
  return optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, warmup, max(total_steps, warmup + 1), cfg.lr * cfg.end_lr_fraction
  )


@SCHEDULES.register('warmup_linear')
def _warmup_linear(cfg, total_steps):
  warmup = cfg.warmup_steps
  return _warmup_then(
    cfg.lr,
    warmup,
    optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_fraction, max(total_steps - warmup, 1)),
  )


@SCHEDULES.register('step')
def _step(cfg, total_steps):
  # Boundaries are fractions of the whole run; after a warmup the decayed part counts from its end.
  warmup = cfg.warmup_steps
  boundaries = {int(f * total_steps) - warmup: cfg.step_decay for f in cfg.step_boundaries}
  return _warmup_then(cfg.lr, warmup, optax.piecewise_constant_schedule(cfg.lr, boundaries))


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Returns an optax schedule step -> learning rate for `total_steps` of training."""
  return SCHEDULES.get(cfg.schedule)(cfg, total_steps)


# Weight matrices and embedding tables, by their flax names; the PEFT methods' matrices too
# (bigjax/peft: LoRA's A, B, AdaLoRA's P, Q, the adapters'), as HF's Trainer and loralib decay them
# (for LoRA it pulls the update B A towards the base model); their vectors are not decayed.
DECAYED = (
  'kernel',
  'embedding',
  'lora_a',
  'lora_b',
  'adalora_p',
  'adalora_q',
  'adapter_down',
  'adapter_up',
)


def decay_mask(params):
  """True for the parameters that get weight decay: kernels and embeddings, by name (not biases,
  norm scales, class tokens). By name, not by rank: attention biases are (heads, head_dim) and a
  scanned stack gives every bias and scale a leading layer axis."""

  def decays(path, _):
    last = path[-1]
    return str(getattr(last, 'key', getattr(last, 'name', last))) in DECAYED

  return jax.tree_util.tree_map_with_path(decays, params)


OPTIMIZERS.add('sgd', lambda cfg, lr: optax.sgd(lr))
OPTIMIZERS.add('momentum', lambda cfg, lr: optax.sgd(lr, momentum=cfg.momentum))
OPTIMIZERS.add('nesterov', lambda cfg, lr: optax.sgd(lr, momentum=cfg.momentum, nesterov=True))
OPTIMIZERS.add('adam', lambda cfg, lr: optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
OPTIMIZERS.add(
  'adamw',
  lambda cfg, lr: optax.adamw(
    lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
  ),
)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """optax.GradientTransformation for config.optim over `total_steps` steps.

  Chain: [global-norm clip] -> [L2-style decoupled weight decay for non-adamw] -> optimizer with
  its schedule. For adamw the decay is the optimizer's own (decoupled, scaled by the schedule).
  """
  base = OPTIMIZERS.get(cfg.name)
  lr = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.weight_decay and cfg.name != 'adamw':
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
  parts.append(base(cfg, lr))
  return optax.chain(*parts)
